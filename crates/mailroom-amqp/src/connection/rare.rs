//! The run loop's rare wake-ups: the broker shutting down, the resource alarms changing, outbound credit
//! coming back. Polling tokio's `watch` and `Notify` waits costs 100-200 instructions each even when nothing
//! happened, on every turn of every connection; these are polled only after one of them woke the task.

use mailroom_broker::client_memory::OutboundCredit;
use mailroom_broker::AlarmState;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
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

type Wait<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The rare waits, kept across the loop's turns and polled with [`Bell`]'s waker.
pub(super) struct RareWakes {
    bell: Arc<Bell>,
    bell_waker: Waker,
    /// None once the shutdown came.
    shutdown: Option<Wait<()>>,
    /// The next alarm change, owning its receiver; None inside once the broker is gone.
    alarms: Wait<Option<watch::Receiver<AlarmState>>>,
    credit: Arc<OutboundCredit>,
    room: Wait<()>,
}

/// Rung by any rare wait's wake-up; wakes the connection's task.
struct Bell {
    rung: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Bell {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rung.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl RareWakes {
    /// Waits on `shutdown` (a change), `alarms` (each change) and `credit` (room again).
    pub(super) fn new(
        mut shutdown: watch::Receiver<bool>,
        alarms: watch::Receiver<AlarmState>,
        credit: Arc<OutboundCredit>,
    ) -> Self {
        // Rung at first, so the first poll registers every wait.
        let bell = Arc::new(Bell { rung: AtomicBool::new(true), task: Mutex::new(None) });
        Self {
            bell_waker: Waker::from(Arc::clone(&bell)),
            bell,
            shutdown: Some(Box::pin(async move {
                let _ = shutdown.changed().await;
            })),
            alarms: next_alarm_change(alarms),
            room: room_again(Arc::clone(&credit)),
            credit,
        }
    }

    /// The next rare wake-up; `Pending` at the cost of one uncontended lock unless one rang.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Rare> {
        {
            let mut task = self.bell.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        // After storing the waker: a ring from now on wakes this task again.
        if !self.bell.rung.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let rare = self.poll_waits();
        if rare.is_ready() {
            // The others were not all polled: look at them again next time.
            self.bell.rung.store(true, Ordering::Release);
        }
        rare
    }

    fn poll_waits(&mut self) -> Poll<Rare> {
        let mut cx = Context::from_waker(&self.bell_waker);
        if let Some(shutdown) = &mut self.shutdown {
            if shutdown.as_mut().poll(&mut cx).is_ready() {
                self.shutdown = None;
                return Poll::Ready(Rare::Shutdown);
            }
        }
        if let Poll::Ready(changed) = self.alarms.as_mut().poll(&mut cx) {
            self.alarms = match changed {
                Some(alarms) => next_alarm_change(alarms),
                None => Box::pin(std::future::pending()), // the broker is gone
            };
            return Poll::Ready(Rare::Alarms);
        }
        if self.room.as_mut().poll(&mut cx).is_ready() {
            self.room = room_again(Arc::clone(&self.credit));
            return Poll::Ready(Rare::Room);
        }
        Poll::Pending
    }
}

fn next_alarm_change(mut alarms: watch::Receiver<AlarmState>) -> Wait<Option<watch::Receiver<AlarmState>>> {
    Box::pin(async move { alarms.changed().await.ok().map(|()| alarms) })
}

fn room_again(credit: Arc<OutboundCredit>) -> Wait<()> {
    Box::pin(async move { credit.room().await })
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
        let waker = Waker::noop();
        rare.poll_next(&mut Context::from_waker(waker)).is_pending()
    }

    #[tokio::test]
    async fn each_wake_up_comes_once_and_nothing_comes_while_quiet() {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (alarms_tx, alarms_rx) = watch::channel(AlarmState::default());
        let credit = OutboundCredit::new(10);
        let mut rare = RareWakes::new(shutdown_rx, alarms_rx, Arc::clone(&credit));
        assert!(quiet(&mut rare), "nothing happened");
        assert!(quiet(&mut rare), "still nothing");

        // Two at once: both come, one per poll.
        credit.take(10);
        credit.release(10);
        alarms_tx.send_modify(|_| {});
        let mut got = vec![next(&mut rare).await, next(&mut rare).await];
        got.sort_by_key(|r| *r as u8);
        assert_eq!(got, [Rare::Alarms, Rare::Room]);
        assert!(quiet(&mut rare));

        // Again, from a task woken by the bell.
        let waiter = tokio::spawn(async move {
            let first = next(&mut rare).await;
            (first, rare)
        });
        tokio::task::yield_now().await;
        shutdown_tx.send(true).unwrap();
        let (first, mut rare) = waiter.await.unwrap();
        assert_eq!(first, Rare::Shutdown);
        assert!(quiet(&mut rare), "the shutdown comes once");

        drop(alarms_tx);
        assert_eq!(next(&mut rare).await, Rare::Alarms, "the alarms' sender went: one last change");
        assert!(quiet(&mut rare), "and then nothing");
    }
}
