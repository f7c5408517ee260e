//! The connection's fsync waiter: one task awaits the store tickets of persistent publishes (and of transaction
//! commits) in order, as fsync rounds complete in append order, and reports each back to the run loop, instead
//! of a task per message.

use mailroom_broker::store::SyncTicket;
use tokio::sync::mpsc;

/// A publish's (or commit's) fsync outcome: (channel, channel epoch, sequence number, stored ok).
pub(super) type Fsynced = (u16, u64, u64, bool);
/// What the waiter task is fed: (channel, channel epoch, sequence number, the store tickets).
type Waiting = (u16, u64, u64, Vec<SyncTicket>);
/// The sequence number that marks a transaction commit (publish sequence numbers start at 1).
pub(super) const COMMIT_SEQ: u64 = 0;

/// Feeds the waiter task and receives its reports.
pub(super) struct FsyncWaiter {
    /// Feeds the task, started on the connection's first persistent publish.
    feed: Option<mpsc::UnboundedSender<Waiting>>,
    /// The task's reports, from then on (an idle connection holds no channel).
    done_rx: Option<mpsc::UnboundedReceiver<Fsynced>>,
}

impl FsyncWaiter {
    /// A waiter whose task is not started yet.
    pub(super) fn new() -> Self {
        Self { feed: None, done_rx: None }
    }

    /// Reports `seq` on `channel` once every ticket's fsync returned (ok only if all succeeded).
    pub(super) fn wait(&mut self, channel: u16, epoch: u64, seq: u64, tickets: Vec<SyncTicket>) {
        let done_rx = &mut self.done_rx;
        let feed = self.feed.get_or_insert_with(|| {
            let (done, rx) = mpsc::unbounded_channel();
            *done_rx = Some(rx);
            let (tx, mut rx) = mpsc::unbounded_channel::<Waiting>();
            tokio::spawn(async move {
                while let Some((channel, epoch, seq, tickets)) = rx.recv().await {
                    let mut ok = true;
                    for ticket in tickets {
                        ok &= ticket.wait().await.is_ok();
                    }
                    if done.send((channel, epoch, seq, ok)).is_err() {
                        return;
                    }
                }
            });
            tx
        });
        feed.send((channel, epoch, seq, tickets)).ok();
    }

    /// The next report (cancel-safe: for the run loop's `select!`).
    pub(super) async fn next(&mut self) -> Option<Fsynced> {
        match &mut self.done_rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// A report already waiting, if any.
    pub(super) fn try_next(&mut self) -> Option<Fsynced> {
        self.done_rx.as_mut()?.try_recv().ok()
    }
}
