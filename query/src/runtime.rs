//! The tokio runtime DataFusion runs on, kept apart from the one serving HTTP and ingest so a
//! heavy query cannot starve them.

use std::future::Future;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::task::AbortOnDropHandle;

use crate::error::{Error, Result};

/// The stack of each query thread. Parsing, planning and optimizing recurse over the statement;
/// DataFusion's own recursion grows its stack on demand (`recursive_protection`), the rest
/// (walking, formatting and dropping syntax trees) runs on this stack, sized for the deepest
/// statement [`crate::bounds`] lets through with a wide margin. Only the pages a query touches
/// are ever committed.
const QUERY_STACK_BYTES: usize = 64 * 1024 * 1024;

/// A dedicated multi-thread runtime that shuts down without blocking when dropped, so the
/// service may be dropped from inside another runtime (a plain `Runtime` drop panics there).
#[derive(Debug)]
pub(crate) struct QueryRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl QueryRuntime {
    /// A runtime for `threads` busy queries, with one worker more. A query is aborted at its
    /// deadline, but only at its next yield point, and some operators run for seconds without
    /// one (a sort spilling half a gigabyte, a large hash build). The spare worker keeps the
    /// other queries answering meanwhile, instead of queueing behind a query already refused.
    pub(crate) fn new(threads: usize) -> Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1) + 1)
            .thread_stack_size(QUERY_STACK_BYTES)
            .thread_name("meterd-query")
            .enable_all()
            .build()
            .map_err(Error::StartRuntime)?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    /// Runs `future` on the query runtime. Dropping the returned handle aborts it: a query
    /// whose caller went away (timeout, client disconnect) stops at its next yield point
    /// instead of running to completion.
    pub(crate) fn spawn<F>(&self, future: F) -> AbortOnDropHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        AbortOnDropHandle::new(self.handle.spawn(future))
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
