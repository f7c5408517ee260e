//! The run loop's rare wake-ups: the broker shutting down, the resource alarms changing, outbound credit
//! coming back. Polling tokio's `watch` and `Notify` waits costs 100-200 instructions each even when nothing
//! happened, on every turn of every connection; these are looked at only after the connection's [`Bell`] rang
//! (the server rings every bell on shutdown and alarm changes, the outbound credit rings its owner's).

use crate::bells::{Bell, Bells};
use mailroom_broker::client_memory::OutboundCredit;
use mailroom_broker::AlarmState;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::sync::watch;

/// Which rare wake-up came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rare {
    /// The broker is shutting down (comes once).
    Shutdown,
    /// The resource alarms changed: apply them.
    Alarms,
    /// A release took the outbound credit from full to having room.
    Room,
}

/// A connection's rare wake-ups and its bell.
pub(super) struct RareWakes {
    bell: Arc<Bell>,
    bell_waker: Waker,
    shutdown: watch::Receiver<bool>,
    shut_down: bool,
    alarms: watch::Receiver<AlarmState>,
    credit: Arc<OutboundCredit>,
}

impl RareWakes {
    /// Watches `shutdown` and `alarms` (rung through `bells`) and `credit`.
    pub(super) fn new(
        bells: &Bells,
        shutdown: watch::Receiver<bool>,
        alarms: watch::Receiver<AlarmState>,
        credit: Arc<OutboundCredit>,
    ) -> Self {
        let bell = Bell::new();
        bells.add(&bell);
        Self { bell_waker: Waker::from(Arc::clone(&bell)), bell, shutdown, shut_down: false, alarms, credit }
    }

    /// The next rare wake-up; `Pending` at the cost of one uncontended lock unless the bell rang.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Rare> {
        // Before looking: a ring from now on wakes this task again.
        self.bell.register(cx.waker());
        if !self.bell.take_rung() {
            return Poll::Pending;
        }
        let rare = self.poll_sources();
        if rare.is_ready() {
            // The others were not all looked at: look again next time.
            self.bell.ring();
        }
        rare
    }

    fn poll_sources(&mut self) -> Poll<Rare> {
        // A gone sender means the server is gone: shut down as well.
        if !self.shut_down && self.shutdown.has_changed().unwrap_or(true) {
            self.shut_down = true;
            return Poll::Ready(Rare::Shutdown);
        }
        if self.alarms.has_changed().unwrap_or(false) {
            self.alarms.mark_unchanged();
            return Poll::Ready(Rare::Alarms);
        }
        if self.credit.poll_room(&mut Context::from_waker(&self.bell_waker)).is_ready() {
            return Poll::Ready(Rare::Room);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    async fn next(rare: &mut RareWakes) -> Rare {
        tokio::time::timeout(Duration::from_secs(5), poll_fn(|cx| rare.poll_next(cx))).await.expect("a wake-up came")
    }

    fn quiet(rare: &mut RareWakes) -> bool {
        rare.poll_next(&mut Context::from_waker(Waker::noop())).is_pending()
    }

    #[tokio::test]
    async fn each_wake_up_comes_once_and_nothing_comes_while_quiet() {
        let bells = Bells::default();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (alarms_tx, alarms_rx) = watch::channel(AlarmState::default());
        let credit = OutboundCredit::new(10);
        let mut rare = RareWakes::new(&bells, shutdown_rx, alarms_rx, Arc::clone(&credit));
        assert!(quiet(&mut rare), "nothing happened");
        assert!(quiet(&mut rare), "still nothing");

        // Two at once: both come, one per poll.
        credit.take(10);
        credit.release(10);
        alarms_tx.send_modify(|_| {});
        bells.ring_all();
        let mut got = vec![next(&mut rare).await, next(&mut rare).await];
        got.sort_by_key(|r| *r as u8);
        assert_eq!(got, [Rare::Alarms, Rare::Room]);
        assert!(quiet(&mut rare));

        // A change nobody rang for is not looked at.
        alarms_tx.send_modify(|_| {});
        assert!(quiet(&mut rare));

        // From a task woken by the server's ring.
        let waiter = tokio::spawn(async move {
            let mut seen = Vec::new();
            seen.push(next(&mut rare).await);
            seen.push(next(&mut rare).await);
            (seen, rare)
        });
        tokio::task::yield_now().await;
        shutdown_tx.send(true).unwrap();
        bells.ring_all();
        let (seen, mut rare) = waiter.await.unwrap();
        assert_eq!(seen, [Rare::Shutdown, Rare::Alarms]);
        assert!(quiet(&mut rare), "the shutdown comes once");
    }
}
