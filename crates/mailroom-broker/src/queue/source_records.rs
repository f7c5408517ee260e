//! The store records of messages a queue dead-lettered, kept until every copy is safe: settled once the
//! copies in durable targets are fsynced, with refused copies pushed again meanwhile.

use super::{PushOutcome, Queue};
use crate::message::Message;
use crate::store::{MsgRef, SyncTicket};
use std::sync::Arc;
use std::time::Duration;

/// The store records of messages a queue dead-lettered, with the store tickets of their copies.
///
/// The source records are settled only once every copy stored in a durable target is fsynced: settling
/// at once would leave a window (until the next group commit) in which a crash loses the message, its
/// source record gone and its copy not yet on disk. A crash in between now brings the source message
/// back as well as the copy: a duplicate, never a loss. A copy whose write or fsync failed (its ticket
/// nacked) is kept and rewritten by its store: the source stays unsettled until a later fsync of that store
/// succeeds. A copy the target's store refused (backpressure,
/// disk full, store failing) is pushed again after a backoff until the target takes it (or is gone); the
/// source records stay unsettled meanwhile, so a crash brings the message back.
#[derive(Debug)]
pub struct SourceRecords {
    queue: Arc<Queue>,
    records: Vec<MsgRef>,
    /// Each stored copy's target and ticket.
    copies: Vec<(Arc<Queue>, SyncTicket)>,
    /// Copies whose target store refused them, to push again.
    refused: Vec<(Arc<Queue>, Arc<Message>)>,
}

/// First pause before pushing a refused dead-lettered copy again; it doubles up to [`MOVE_RETRY_MAX`].
pub const MOVE_RETRY_MIN: Duration = Duration::from_millis(20);
/// Longest pause between pushes of a copy whose target store keeps refusing it.
pub const MOVE_RETRY_MAX: Duration = Duration::from_secs(2);

impl SourceRecords {
    /// The records of messages leaving `queue` for its dead-letter exchange.
    pub fn new(queue: Arc<Queue>, records: Vec<MsgRef>) -> SourceRecords {
        SourceRecords { queue, records, copies: Vec::new(), refused: Vec::new() }
    }

    /// The queue the messages leave.
    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// Records what pushing a copy of one of the messages onto `target` did: a stored copy (or the stored
    /// original of a duplicate) is waited for before the sources settle; a refused one is pushed again.
    pub(crate) fn record_push(&mut self, target: Arc<Queue>, message: &Arc<Message>, outcome: PushOutcome) {
        match outcome {
            PushOutcome::Refused => self.refused.push((target, Arc::clone(message))),
            // Taken, a duplicate, gone, or dropped by the target's own length limit: only a stored copy
            // (or original) is waited for.
            outcome => self.copies.extend(outcome.ticket().map(|t| (target, t))),
        }
    }

    /// Settles the source records now if no copy needs an fsync, else once every copy's ticket completed.
    pub fn finish(self) {
        let SourceRecords { queue, records, mut copies, mut refused } = self;
        if !refused.is_empty() {
            // Retried whether or not the source has a store record: the message lives only in this task now.
            let in_flight = queue.move_started();
            tokio::spawn(async move {
                let _in_flight = in_flight;
                let mut pause = MOVE_RETRY_MIN;
                while !refused.is_empty() {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MOVE_RETRY_MAX);
                    let mut still = Vec::new();
                    for (target, message) in refused {
                        match target.push(Arc::clone(&message)) {
                            PushOutcome::Refused => still.push((target, message)),
                            // Taken, a duplicate, gone, or dropped by the target's own length limit (as a
                            // first push would be): only a stored copy (or original) is waited for.
                            outcome => copies.extend(outcome.ticket().map(|t| (target, t))),
                        }
                    }
                    if !still.is_empty() {
                        tracing::warn!(queue = %queue.name(), copies = still.len(),
                            "dead-lettered copies refused by their target's store; source kept, retrying");
                    }
                    refused = still;
                }
                SourceRecords { queue, records, copies, refused: Vec::new() }.finish();
            });
            return;
        }
        if records.is_empty() {
            return;
        }
        if copies.is_empty() {
            // Dropped (no dead-letter exchange or route) or copied only to transient queues: nothing to wait for.
            queue.settle_left(&records);
            return;
        }
        // Queues only exist inside a tokio runtime (each runs a timer task), so one is available here.
        let in_flight = queue.move_started();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            for (target, ticket) in copies {
                let mut result = ticket.wait().await;
                let mut pause = MOVE_RETRY_MIN;
                // A failed write or fsync nacks the ticket, but the target's store keeps the copy and writes it
                // again: wait for a later fsync of that store to cover it before settling the source.
                while let Err(e) = result {
                    tracing::warn!(queue = %queue.name(), target = %target.name(), error = %e,
                        "dead-lettered copy not durable yet; source kept, waiting for the target's store");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MOVE_RETRY_MAX);
                    result = match target.sync_ticket() {
                        Some(t) => t.wait().await,
                        // The target was deleted, and the copy with it (as a dead letter routed nowhere).
                        None => Ok(()),
                    };
                }
            }
            queue.settle_left(&records);
        });
    }
}

#[cfg(test)]
mod crash_window_tests {
    use crate::store::ack_log;
    use crate::store::queue_store::test_dir;
    use crate::store::queue_store::tests::{FaultIo, Faults};
    use crate::vhost::QueueOptions;
    use crate::{BasicProperties, Broker, BrokerConfig, FieldTable, LongString, Message};
    use bytes::Bytes;
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Every id logged as settled in any queue's ack logs under `dir`: what a restart would treat as gone.
    fn settled_on_disk(dir: &Path) -> HashSet<u64> {
        let mut settled = HashSet::new();
        for queue_dir in std::fs::read_dir(dir.join("msgs")).unwrap().flatten() {
            for f in std::fs::read_dir(queue_dir.path()).unwrap().flatten() {
                if f.path().extension().is_some_and(|e| e == "ack") {
                    settled.extend(ack_log::parse(&std::fs::read(f.path()).unwrap()).settled);
                }
            }
        }
        settled
    }

    fn set_gate(faults: &Faults, closed: bool) {
        *faults.gate_closed.lock().unwrap() = closed;
        faults.gate.notify_all();
    }

    /// Issue 5: a rejected message's source record must stay unsettled until its copy in the durable
    /// dead-letter queue is fsynced. With fsyncs blocked (the copy not yet durable) nothing may be settled on
    /// disk, so a crash at that moment brings the source message back; once the fsync returns, it is settled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn source_record_is_settled_only_after_the_dead_lettered_copy_is_durable() {
        let dir = test_dir("dlx-window");
        let faults = Arc::new(Faults::default());
        let broker = Broker::open(BrokerConfig {
            data_dir: Some(dir.clone()),
            store_io: Some(Arc::new(FaultIo(faults.clone()))),
            ..BrokerConfig::default()
        })
        .unwrap();
        let v = broker.vhost("/").unwrap();
        let durable = QueueOptions { durable: true, ..Default::default() };
        v.declare_queue("dlq", &durable, 1).unwrap();
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), crate::AMQPValue::LongString(LongString::from("")));
        args.insert("x-dead-letter-routing-key".into(), crate::AMQPValue::LongString(LongString::from("dlq")));
        v.declare_queue("work", &QueueOptions { durable: true, arguments: args, ..Default::default() }, 1).unwrap();

        let props = BasicProperties::default().with_delivery_mode(2);
        let published = v.publish("", Message::new("", "work", props, Bytes::from_static(b"keep me"))).unwrap();
        for t in published.durable {
            t.wait().await.unwrap();
        }
        let work = v.queue("work", 1).unwrap();
        let got = work.get(false).unwrap();

        set_gate(&faults, true);
        work.reject(&[got.id], false);
        assert_eq!(v.queue("dlq", 1).unwrap().message_count(), 1, "copy enqueued in the DLQ");
        // The copy's fsync is blocked; give a wrongly eager settle every chance to reach the file.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !settled_on_disk(&dir).contains(&got.id),
            "source record settled before the dead-lettered copy was fsynced: a crash now loses the message"
        );

        set_gate(&faults, false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !settled_on_disk(&dir).contains(&got.id) {
            assert!(Instant::now() < deadline, "source record never settled after the copy became durable");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
