//! The way into something that can be deleted while requests use it (a
//! topic): requests pass while it is open; closing it turns new requests away
//! and waits for those already inside, so nothing touches its files once the
//! close returns.
//!
//! Passing is two atomic operations and takes no lock; a request inside may
//! enter again (a nested call) without blocking, and the closer waits on a
//! condition variable instead of spinning.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Where a gate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// Requests pass.
    #[default]
    Open,
    /// Closed: no request passes; the closer removes what the gate guarded,
    /// then calls [`Gate::finish`] (or [`Gate::reopen`] if that failed).
    Closing,
    /// What the gate guarded is gone for good.
    Finished,
}

/// A gate; see the module docs.
#[derive(Debug, Default)]
pub struct Gate {
    closed: AtomicBool,
    inside: AtomicUsize,
    phase: Mutex<Phase>,
    changed: Condvar,
}

/// A request inside a gate; it leaves when this is dropped.
#[derive(Debug)]
#[must_use = "the request is inside the gate only while the pass lives"]
pub struct Pass<'a> {
    gate: &'a Gate,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        // SeqCst with `close`: either the closer sees this request inside, or
        // this request sees the gate closed and wakes the closer.
        if self.gate.inside.fetch_sub(1, Ordering::SeqCst) == 1
            && self.gate.closed.load(Ordering::SeqCst)
        {
            let _phase = self.gate.lock();
            self.gate.changed.notify_all();
        }
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a request in; `None` once the gate is closed.
    pub fn enter(&self) -> Option<Pass<'_>> {
        self.inside.fetch_add(1, Ordering::SeqCst);
        let pass = Pass { gate: self };
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        Some(pass)
    }

    /// Whether the gate is closed (closing or finished).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Whether what the gate guarded is gone for good (not just closing).
    pub fn is_finished(&self) -> bool {
        *self.lock() == Phase::Finished
    }

    /// Closes the gate and waits until no request is inside. False (at once)
    /// when it was closed already: someone else is closing it.
    ///
    /// The caller must not hold a [`Pass`] of this gate (it would wait for itself).
    pub fn close(&self) -> bool {
        let mut phase = self.lock();
        if *phase != Phase::Open {
            return false;
        }
        *phase = Phase::Closing;
        self.closed.store(true, Ordering::SeqCst);
        while self.inside.load(Ordering::SeqCst) > 0 {
            phase = self.changed.wait(phase).unwrap_or_else(|p| p.into_inner());
        }
        true
    }

    /// Opens a closing gate again: removing what it guards failed, so it stays.
    pub fn reopen(&self) {
        let mut phase = self.lock();
        if *phase == Phase::Closing {
            *phase = Phase::Open;
            self.closed.store(false, Ordering::SeqCst);
        }
        self.changed.notify_all();
    }

    /// Marks what the gate guarded as gone without waking those waiting in
    /// [`Gate::wait_settled`] (they wake at [`Gate::finish`]): the steps
    /// after a delete run while [`Gate::is_finished`] already holds.
    pub fn mark_finished(&self) {
        *self.lock() = Phase::Finished;
    }

    /// Marks what the gate guarded as gone, waking [`Gate::wait_settled`].
    pub fn finish(&self) {
        *self.lock() = Phase::Finished;
        self.changed.notify_all();
    }

    /// Waits while the gate is closing: returns once it is open again or
    /// finished.
    pub fn wait_settled(&self) {
        let mut phase = self.lock();
        while *phase == Phase::Closing {
            phase = self.changed.wait(phase).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn closing_waits_for_the_requests_inside_and_turns_new_ones_away() {
        let gate = Arc::new(Gate::default());
        let pass = gate.enter().expect("open");
        let nested = gate.enter().expect("a request inside may enter again");
        let closer = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || gate.close())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!closer.is_finished(), "waits for the requests inside");
        assert!(gate.is_closed());
        assert!(gate.enter().is_none(), "no new request passes");
        drop(nested);
        drop(pass);
        assert!(closer.join().expect("closer"), "closed");
        assert!(!gate.close(), "a second close is refused");
    }

    #[test]
    fn waiting_ends_when_the_gate_finishes_or_reopens() {
        for finish in [true, false] {
            let gate = Arc::new(Gate::default());
            assert!(gate.close());
            let waiter = {
                let gate = Arc::clone(&gate);
                std::thread::spawn(move || gate.wait_settled())
            };
            std::thread::sleep(Duration::from_millis(20));
            assert!(!waiter.is_finished());
            if finish {
                gate.finish();
                assert!(gate.enter().is_none());
            } else {
                gate.reopen();
                assert!(gate.enter().is_some());
            }
            waiter.join().expect("waiter");
        }
    }
}
