//! The HTTP/1.1 accept loop, with the limits a server facing untrusted clients needs.
//!
//! `axum::serve` sets no timeouts: a client that opens a connection and never finishes its
//! headers, stops sending a body, or never reads its response holds a file descriptor forever,
//! and a few hundred of them exhaust the process. Here every connection has
//! - a header-read timeout, which also closes idle keep-alive connections (hyper starts it
//!   whenever it waits for the next request's head);
//! - a body-read timeout between two chunks of a request body;
//! - a write timeout for each write of the response;
//!
//! and at most `max_connections` are open at once: past that, new connections are closed as
//! soon as they are accepted, so the process keeps descriptors for its own files.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// The limits of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's head, and how long an idle keep-alive
    /// connection stays open.
    pub header_timeout: Duration,
    /// How long a request body may go without a new chunk.
    pub body_timeout: Duration,
    /// How long one write of a response may wait for the client to read.
    pub write_timeout: Duration,
    /// The most connections open at once.
    pub max_connections: usize,
}

/// File descriptors kept for everything but connections: the log, the dedup index, Parquet
/// files being written and read, and the store connections.
const RESERVED_DESCRIPTORS: u64 = 128;

/// `wanted`, lowered so that connections cannot take the descriptors the process needs for its
/// own files under its soft `RLIMIT_NOFILE`.
pub fn connection_cap(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _hard)) => {
            let available = soft
                .saturating_sub(RESERVED_DESCRIPTORS)
                .max(soft / 2)
                .max(1);
            wanted.min(usize::try_from(available).unwrap_or(usize::MAX))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE; keeping the configured connection cap");
            wanted
        }
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then waits for the open
/// connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let service = tower::ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .service(app);
    let mut refused: u64 = 0;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: wait rather than spin; the connections
                    // that hold them time out.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused,
                    "connection cap reached; closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let mut io = TimeoutStream::new(stream);
        io.set_write_timeout(Some(limits.write_timeout));
        let connection = http.serve_connection(
            TokioIo::new(Box::pin(io)),
            TowerToHyperService::new(service.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
