//! Server-wide wake-ups of every connection task (the shutdown, a change of the resource alarms), rung by the
//! server: a connection registers a [`Bell`] once instead of keeping its own `watch` waits, which cost a lock
//! of their waiter list on every turn of its loop (and ~300 bytes each).

use mailroom_broker::waker_slot::remember_waker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Wake, Waker};

/// Wakes one connection task and remembers that it rang.
pub(crate) struct Bell {
    rung: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Bell {
    /// A bell that has rung, so its owner's first look checks everything.
    pub(crate) fn new() -> Arc<Bell> {
        Arc::new(Bell { rung: AtomicBool::new(true), task: Mutex::new(None) })
    }

    /// Wakes `waker`'s task at the next ring.
    pub(crate) fn register(&self, waker: &Waker) {
        remember_waker(&mut self.task.lock().unwrap_or_else(|e| e.into_inner()), waker);
    }

    /// Whether it rang since the last call.
    pub(crate) fn take_rung(&self) -> bool {
        self.rung.swap(false, Ordering::AcqRel)
    }

    /// Rings: the next [`Bell::take_rung`] says so, and the registered task wakes.
    pub(crate) fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl Wake for Bell {
    fn wake(self: Arc<Self>) {
        self.ring();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
    }
}

/// Every live connection's bell.
#[derive(Default)]
pub(crate) struct Bells {
    all: Mutex<Vec<Weak<Bell>>>,
}

impl Bells {
    /// Adds `bell` until it is dropped.
    pub(crate) fn add(&self, bell: &Arc<Bell>) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() == all.capacity() {
            // Before growing, drop the closed connections' entries: amortized, as the growth.
            all.retain(|b| b.strong_count() > 0);
        }
        all.push(Arc::downgrade(bell));
    }

    /// Rings every live bell.
    pub(crate) fn ring_all(&self) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|b| match b.upgrade() {
            Some(bell) => {
                bell.ring();
                true
            }
            None => false,
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.all.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ringing_reaches_live_bells_once_and_forgets_dropped_ones() {
        let bells = Bells::default();
        let kept = Bell::new();
        assert!(kept.take_rung(), "new bells have rung");
        assert!(!kept.take_rung());
        bells.add(&kept);
        for _ in 0..100 {
            bells.add(&Bell::new()); // dropped at once
        }
        assert!(bells.len() < 100, "dropped bells are pruned as the list grows");
        bells.ring_all();
        assert_eq!(bells.len(), 1);
        assert!(kept.take_rung());
        assert!(!kept.take_rung(), "one ring, one look");
    }
}
