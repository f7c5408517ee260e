//! The waker of the one task waiting on something (a connection's inbox, its outbound credit, its writer):
//! cheaper than a `tokio::sync::Notify` for a wait polled on every turn of a loop, whose `Notified` takes
//! the waiter list's lock on each poll and again when dropped.

use std::task::Waker;

/// Keeps `waker` in `slot`, cloning it only when the one there would wake another task.
pub fn remember_waker(slot: &mut Option<Waker>, waker: &Waker) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}
