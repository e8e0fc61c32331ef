//! The HTTP/1.1 accept loop, with the limits a server facing untrusted clients needs.
//!
//! `axum::serve` sets no timeouts: a client that opens a connection and never finishes its
//! headers, stops sending a body, or never reads its response holds a file descriptor forever,
//! and a few hundred of them exhaust the process. Here every connection has
//! - a header-read timeout, which also closes idle keep-alive connections (hyper starts it
//!   whenever it waits for the next request's head);
//! - a body-read timeout between two chunks of a request body, and a slowest pace for the whole
//!   body: after that timeout, at least [`MIN_BODY_BYTES_PER_SEC`] on average (as Apache's
//!   `mod_reqtimeout` `MinRate`), so a body trickling a byte at a time cannot hold a connection
//!   for hours;
//! - a write timeout for each write of the response;
//!
//! and at most `max_connections` are open at once: past that, new connections are closed as
//! soon as they are accepted, so the process keeps descriptors for its own files.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
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
        // Copy each piece of a response into hyper's own buffer rather than queue it: queued
        // pieces would keep the answer they were cut from (and its share of the query memory
        // pool) alive after the last piece was handed over, until the client has read them.
        .writev(false)
        .keep_alive(true);
    let body_timeout = limits.body_timeout;
    let service = tower::ServiceBuilder::new()
        .map_request(move |request: hyper::Request<hyper::body::Incoming>| {
            request.map(|body| PacedBody::new(body, body_timeout, MIN_BODY_BYTES_PER_SEC))
        })
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
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

/// The slowest pace of a request body: after its first `body_timeout`, at least this many bytes
/// a second in every following span of `body_timeout` (as Apache's `mod_reqtimeout`
/// `MinRate`, without letting a fast start pay for a slow end).
pub const MIN_BODY_BYTES_PER_SEC: u64 = 1024;

/// A request body that fails when, after `window` of grace, a span of `window` passes in which
/// fewer than `window × min_bytes_per_sec` bytes arrived. Hand-written because tower-http's body
/// timeout is reset by every chunk, and no crate offers a minimum rate.
struct PacedBody<B> {
    inner: B,
    window: Duration,
    /// Bytes each window after the first must bring.
    needed: u64,
    min_bytes_per_sec: u64,
    /// The window now running, and the bytes it brought so far.
    window_end: Instant,
    in_window: u64,
    /// The grace: the first window needs nothing.
    first: bool,
    /// Wakes the reader at the end of the window, so a body that sends nothing fails too.
    alarm: Pin<Box<Sleep>>,
}

/// A point `after` from `start`, or far in the future if that cannot be represented.
fn later(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 86_400))
}

impl<B> PacedBody<B> {
    fn new(inner: B, window: Duration, min_bytes_per_sec: u64) -> Self {
        let window_end = later(Instant::now(), window);
        let min_bytes_per_sec = min_bytes_per_sec.max(1);
        Self {
            inner,
            window,
            needed: (window.as_secs_f64() * min_bytes_per_sec as f64) as u64,
            min_bytes_per_sec,
            window_end,
            in_window: 0,
            first: true,
            alarm: Box::pin(tokio::time::sleep_until(window_end)),
        }
    }

    /// Closes every window that has ended by now; an error if one of them (after the first)
    /// brought too little.
    fn settle(&mut self, now: Instant) -> Result<(), TooSlow> {
        while now >= self.window_end {
            if !self.first && self.in_window < self.needed {
                return Err(TooSlow {
                    min_bytes_per_sec: self.min_bytes_per_sec,
                    window: self.window,
                });
            }
            self.first = false;
            self.in_window = 0;
            self.window_end = later(self.window_end, self.window.max(Duration::from_millis(1)));
        }
        Ok(())
    }
}

/// The error a [`PacedBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body came slower than {min_bytes_per_sec} bytes per second over {window:?}")]
struct TooSlow {
    min_bytes_per_sec: u64,
    window: Duration,
}

impl<B> Body for PacedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        // Bytes that arrived count toward the window they arrived in, which is still the
        // current one if the reader is polled promptly.
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.in_window = this.in_window.saturating_add(data.len() as u64);
        }
        match polled {
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Err(slow) = this.settle(Instant::now()) {
                    return Poll::Ready(Some(Err(Box::new(slow))));
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Pending => {}
        }
        if let Err(slow) = this.settle(Instant::now()) {
            return Poll::Ready(Some(Err(Box::new(slow))));
        }
        let window_end = this.window_end;
        if this.alarm.deadline() != window_end {
            this.alarm.as_mut().reset(window_end);
        }
        match this.alarm.as_mut().poll(cx) {
            // The window just ended: settle it at the next poll, which this wakes.
            Poll::Ready(()) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http_body_util::BodyExt;

    /// A body of `frames`: each waits its delay, then sends its number of bytes.
    fn body(
        frames: Vec<(Duration, usize)>,
    ) -> http_body_util::StreamBody<
        impl futures::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Unpin,
    > {
        let stream = futures::stream::iter(frames).then(|(delay, bytes)| async move {
            tokio::time::sleep(delay).await;
            Ok(Frame::data(Bytes::from(vec![b'x'; bytes])))
        });
        http_body_util::StreamBody::new(Box::pin(stream))
    }

    fn trickle(chunks: usize, every: Duration) -> Vec<(Duration, usize)> {
        vec![(every, 1); chunks]
    }

    #[tokio::test]
    async fn a_body_must_keep_its_pace_in_every_window() {
        // A byte every 20 ms against 4 bytes per 200 ms: it keeps pace.
        let kept = PacedBody::new(
            body(trickle(30, Duration::from_millis(20))),
            Duration::from_millis(200),
            20,
        );
        let bytes = kept.collect().await.expect("in pace").to_bytes();
        assert_eq!(bytes.len(), 30);
        // A byte every 100 ms, never stalling long, is cut off at the end of the first window
        // after the grace.
        let started = Instant::now();
        let slow = PacedBody::new(
            body(trickle(100, Duration::from_millis(100))),
            Duration::from_millis(500),
            1024,
        );
        let error = slow.collect().await.expect_err("too slow");
        assert!(
            error
                .to_string()
                .contains("slower than 1024 bytes per second"),
            "{error}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // A fast start does not pay for a slow end.
        let mut frames = vec![(Duration::ZERO, 100_000)];
        frames.extend(trickle(100, Duration::from_millis(100)));
        let banked = PacedBody::new(body(frames), Duration::from_millis(300), 1024);
        assert!(banked.collect().await.is_err());
        // A body that sends nothing fails after its second window.
        let silent = PacedBody::new(
            body(vec![(Duration::from_secs(3600), 1)]),
            Duration::from_millis(100),
            1024,
        );
        assert!(silent.collect().await.is_err());
        // A timeout too long to represent is as good as none.
        let endless = PacedBody::new(body(trickle(3, Duration::ZERO)), Duration::MAX, 1024);
        assert_eq!(
            endless.collect().await.expect("no limit").to_bytes().len(),
            3
        );
    }
}
