//! The memory a query's answer takes, counted against the same pool as its operators.
//!
//! DataFusion's pool accounts for what operators buffer (sorts, hash tables, aggregates), not
//! for the batches a caller collects nor for the encoded body. Without this, a query within the
//! pool could still hold gigabytes of result rows and their JSON at once. Here the collected
//! batches and the encoded response each hold a reservation in the pool, and the response may
//! not pass its own size cap, whatever the pool.

use std::io;
use std::sync::Arc;

use arrow::array::RecordBatch;
use bytes::Bytes;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};

use crate::error::{Error, Result};

/// The reservation is grown in steps of this size, so charging per row stays cheap.
const STEP_BYTES: usize = 64 * 1024;

/// Holds the memory of the batches a query has collected so far.
#[derive(Debug)]
pub(crate) struct ResultBudget {
    reservation: MemoryReservation,
    memory_limit_bytes: usize,
}

impl ResultBudget {
    pub(crate) fn new(pool: &Arc<dyn MemoryPool>, memory_limit_bytes: usize) -> Self {
        Self {
            reservation: MemoryConsumer::new("query result").register(pool),
            memory_limit_bytes,
        }
    }

    /// Accounts for `batch`, which the caller keeps until the answer is encoded.
    pub(crate) fn hold(&self, batch: &RecordBatch) -> Result<()> {
        self.reservation
            .try_grow(batch.get_array_memory_size())
            .map_err(|source| Error::MemoryLimit {
                limit_bytes: self.memory_limit_bytes,
                source,
            })
    }
}

/// The encoded response, growing under the pool and the response cap. Encoders write into it
/// through `io::Write` or [`Output::buf`] followed by [`Output::charge`].
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) buf: Vec<u8>,
    reservation: MemoryReservation,
    memory_limit_bytes: usize,
    max_bytes: usize,
    /// Why a write was refused: the encoder only sees an I/O error.
    refused: Option<Error>,
}

impl Output {
    pub(crate) fn new(
        pool: &Arc<dyn MemoryPool>,
        memory_limit_bytes: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            buf: Vec::new(),
            reservation: MemoryConsumer::new("query response").register(pool),
            memory_limit_bytes,
            max_bytes,
            refused: None,
        }
    }

    /// Checks that `buf` may grow by `more` bytes and makes room for them, holding memory for
    /// all the buffer has allocated (its capacity, which grows by doubling, not its length).
    fn admit(&mut self, more: usize) -> Result<()> {
        let wanted = self.buf.len().saturating_add(more);
        if wanted > self.max_bytes {
            return Err(Error::ResponseTooLarge {
                max_bytes: self.max_bytes,
            });
        }
        self.buf.reserve(more);
        let held = self.buf.capacity();
        if held > self.reservation.size() {
            let step = (held - self.reservation.size()).next_multiple_of(STEP_BYTES);
            self.reservation
                .try_grow(step)
                .map_err(|source| Error::MemoryLimit {
                    limit_bytes: self.memory_limit_bytes,
                    source,
                })?;
        }
        Ok(())
    }

    /// Accounts for what was appended to `buf` directly. A refusal is kept for
    /// [`Output::take_refusal`], as for a refused write.
    pub(crate) fn charge(&mut self) -> io::Result<()> {
        self.admit(0).map_err(|e| self.refuse(e))
    }

    fn refuse(&mut self, e: Error) -> io::Error {
        let error = io::Error::other(e.to_string());
        self.refused = Some(e);
        error
    }

    /// The error that made a write fail, if the budget refused it.
    pub(crate) fn take_refusal(&mut self) -> Option<Error> {
        self.refused.take()
    }

    /// The body, which keeps its reservation until the last reference to it is dropped.
    pub(crate) fn into_body(self) -> Bytes {
        Bytes::from_owner(Body {
            buf: self.buf,
            _reservation: self.reservation,
        })
    }
}

impl io::Write for Output {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.admit(data.len()).map_err(|e| self.refuse(e))?;
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Body {
    buf: Vec<u8>,
    _reservation: MemoryReservation,
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use datafusion::execution::memory_pool::GreedyMemoryPool;

    use super::*;

    #[test]
    fn the_response_stops_at_its_cap_and_at_the_pool() {
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(8 * STEP_BYTES));
        let mut out = Output::new(&pool, 8 * STEP_BYTES, 3 * STEP_BYTES);
        out.write_all(&vec![b'x'; 2 * STEP_BYTES])
            .expect("within the cap");
        assert!(pool.reserved() >= 2 * STEP_BYTES);
        assert!(out.write_all(&vec![b'x'; 2 * STEP_BYTES]).is_err());
        assert!(matches!(
            out.take_refusal(),
            Some(Error::ResponseTooLarge { .. })
        ));
        let body = out.into_body();
        assert_eq!(body.len(), 2 * STEP_BYTES);
        assert!(pool.reserved() >= 2 * STEP_BYTES, "held by the body");
        drop(body);
        assert_eq!(pool.reserved(), 0);

        let mut small = Output::new(&pool, 8 * STEP_BYTES, usize::MAX);
        assert!(small.write_all(&vec![b'x'; 9 * STEP_BYTES]).is_err());
        assert!(matches!(
            small.take_refusal(),
            Some(Error::MemoryLimit { .. })
        ));
    }
}
