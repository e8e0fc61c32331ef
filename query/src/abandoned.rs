//! Queries given up on at their deadline whose tasks have not stopped yet.
//!
//! A query that times out is aborted, but a task only stops at its next yield point, and some
//! operators run for seconds without one (a sort spilling, a large hash build). Until it stops,
//! the abandoned query keeps its share of the memory pool, and a query that starts meanwhile
//! may be refused memory it would have had a moment later. Such a query is not too large: it
//! waits until every query abandoned while it ran has stopped, and runs again, within its own
//! deadline. A query refused memory while no abandoned query held any is refused at once.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// How many abandoned queries are still running, and how many have stopped since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    running: usize,
    stopped: u64,
}

/// Counts abandoned queries until their tasks stop; shared by every query of a service.
#[derive(Debug, Default)]
pub(crate) struct Abandoned {
    counts: watch::Sender<Counts>,
}

impl Abandoned {
    /// A new query's pair of handles: [`Running`] travels with its task, [`Caller`] stays with
    /// whoever awaits it.
    pub(crate) fn start(self: &Arc<Self>) -> (Running, Caller) {
        let shared = Arc::new(Shared {
            abandoned: Arc::clone(self),
            state: Mutex::new(State::Running),
        });
        (
            Running {
                shared: Arc::clone(&shared),
            },
            Caller { shared },
        )
    }

    /// What a query notes before it runs, to tell afterwards whether an abandoned query was
    /// running at any time in between.
    pub(crate) fn mark(&self) -> Mark {
        Mark(*self.counts.borrow())
    }

    /// Whether an abandoned query was running at some time since `mark`: one still is, or one
    /// has stopped since.
    pub(crate) fn any_since(&self, mark: Mark) -> bool {
        let now = *self.counts.borrow();
        now.running > 0 || now.stopped != mark.0.stopped
    }

    /// Waits until no abandoned query is running.
    pub(crate) async fn none_running(&self) {
        let mut counts = self.counts.subscribe();
        // The sender lives as long as `self`, so the wait ends only when the count does.
        let _ = counts.wait_for(|c| c.running == 0).await;
    }

    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.counts.borrow().running
    }
}

/// See [`Abandoned::mark`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark(Counts);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Abandoned,
    Stopped,
}

#[derive(Debug)]
struct Shared {
    abandoned: Arc<Abandoned>,
    state: Mutex<State>,
}

impl Shared {
    /// Moves to `to` from `from`; false if the query was elsewhere.
    fn transition(&self, from: State, to: State) -> bool {
        // The state is a plain enum: a panic elsewhere cannot leave it half written.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *state != from {
            if to == State::Stopped {
                *state = State::Stopped;
            }
            return false;
        }
        *state = to;
        true
    }
}

/// Held by a query's task; dropping it (the task ended or was dropped) ends the query.
#[derive(Debug)]
pub(crate) struct Running {
    shared: Arc<Shared>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.shared.transition(State::Abandoned, State::Stopped) {
            self.shared.abandoned.counts.send_modify(|c| {
                c.running = c.running.saturating_sub(1);
                c.stopped = c.stopped.wrapping_add(1);
            });
        }
    }
}

/// Held by whoever awaits a query. Dropping it before the query ended (a timeout, a client that
/// went away) abandons the query: until its task stops, it counts.
#[derive(Debug)]
pub(crate) struct Caller {
    shared: Arc<Shared>,
}

impl Drop for Caller {
    fn drop(&mut self) {
        if self.shared.transition(State::Running, State::Abandoned) {
            self.shared
                .abandoned
                .counts
                .send_modify(|c| c.running = c.running.saturating_add(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_query_counts_until_its_task_stops() {
        let abandoned = Arc::new(Abandoned::default());
        let before = abandoned.mark();
        let (running, caller) = abandoned.start();
        assert!(!abandoned.any_since(before));
        drop(caller);
        assert_eq!(abandoned.running(), 1);
        assert!(abandoned.any_since(before));
        drop(running);
        assert_eq!(abandoned.running(), 0);
        // It ran and stopped since the mark.
        assert!(abandoned.any_since(before));
        assert!(!abandoned.any_since(abandoned.mark()));
    }

    #[test]
    fn a_query_that_ended_before_its_caller_gave_up_never_counts() {
        let abandoned = Arc::new(Abandoned::default());
        let before = abandoned.mark();
        let (running, caller) = abandoned.start();
        drop(running);
        drop(caller);
        assert_eq!(abandoned.running(), 0);
        assert!(!abandoned.any_since(before));
    }

    #[tokio::test]
    async fn the_wait_ends_when_the_last_abandoned_query_stops() {
        let abandoned = Arc::new(Abandoned::default());
        let (first, first_caller) = abandoned.start();
        let (second, second_caller) = abandoned.start();
        drop((first_caller, second_caller));
        let waiting = tokio::spawn({
            let abandoned = Arc::clone(&abandoned);
            async move { abandoned.none_running().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the wait ends")
            .expect("the task does not panic");
    }
}
