//! Dead-lettering: the message a queue republishes to its dead-letter exchange, with RabbitMQ's `x-death`
//! history, and the settling of the source records once the copies are safe. The loop that routes and
//! pushes dead letters is the vhost's (`vhost/dead_letters.rs`).

use crate::message::{header_routing_keys, Message};
use crate::queue::{DeadLetterReason, PushOutcome, Queue};
use crate::store::{MsgRef, SyncTicket};
use amq_protocol_types::{AMQPValue, FieldArray, FieldTable, LongString};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn table_str(table: &FieldTable, key: &str) -> Option<String> {
    table.inner().get(key).and_then(crate::args::string_value)
}

/// Builds the dead-lettered copy of `message` leaving `queue` for `reason`.
///
/// As RabbitMQ 3.10: `x-death` is a list, newest first; an entry for the same queue and reason has its
/// count raised and moves to the front; `x-first-death-*` are set once; `expiration` is removed and kept
/// as `original-expiration`; with a dead-letter routing key the message is routed by that key alone.
pub fn make_dead_letter(
    message: &Message,
    dead_letter_exchange: &str,
    queue: &str,
    reason: DeadLetterReason,
    dead_letter_routing_key: Option<&str>,
) -> Message {
    crate::counters::record_dead_letter(reason);
    let mut headers = message.headers().cloned().unwrap_or_default();
    let original_keys = {
        let mut keys = vec![message.routing_key.to_string()];
        keys.extend(header_routing_keys(message.headers(), "CC"));
        keys
    };
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(items)) => items.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = deaths.iter().position(|d| match d {
        AMQPValue::FieldTable(t) => {
            table_str(t, "queue").as_deref() == Some(queue)
                && table_str(t, "reason").as_deref() == Some(reason.as_str())
        }
        _ => false,
    });
    let entry = match same {
        Some(pos) => {
            let AMQPValue::FieldTable(mut t) = deaths.remove(pos) else { unreachable!("matched a table above") };
            let count = t.inner().get("count").and_then(crate::args::int_value).unwrap_or(0) as i64;
            t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), text(reason.as_str()));
            t.insert("queue".into(), text(queue));
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            t.insert("time".into(), AMQPValue::Timestamp(now));
            t.insert("exchange".into(), text(&message.exchange));
            let keys: Vec<AMQPValue> = original_keys.iter().map(|k| text(k)).collect();
            t.insert("routing-keys".into(), AMQPValue::FieldArray(FieldArray::from(keys)));
            if let Some(exp) = message.properties.expiration() {
                t.insert("original-expiration".into(), text(exp.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(deaths)));
    if !headers.contains_key("x-first-death-reason") {
        headers.insert("x-first-death-reason".into(), text(reason.as_str()));
        headers.insert("x-first-death-queue".into(), text(queue));
        headers.insert("x-first-death-exchange".into(), text(&message.exchange));
    }
    let mut properties = message.properties.clone().with_headers(headers);
    if properties.expiration().is_some() {
        properties = strip_expiration(properties);
    }
    let routing_key: &str = dead_letter_routing_key.unwrap_or(&message.routing_key);
    let mut dead = Message::new(dead_letter_exchange, routing_key, properties, message.body.clone());
    if dead_letter_routing_key.is_some() {
        // Routed by the dead-letter key alone: CC keys no longer apply.
        dead.properties = remove_header(dead.properties, "CC");
    }
    dead
}

/// The keys a dead-lettered message is routed with: its routing key plus `CC`.
pub fn routing_keys(message: &Message) -> Vec<String> {
    let mut keys = vec![message.routing_key.to_string()];
    keys.extend(header_routing_keys(message.headers(), "CC"));
    keys
}

/// Whether dead-lettering `message` (already carrying its new `x-death` entry) to `target` closes a fully
/// automatic cycle, as RabbitMQ decides: walk `x-death` from the newest entry to the first one for
/// `target`; a cycle exists if that entry is found and none of the walked entries is a rejection (a
/// consumer's decision, or anything a client put there, makes the cycle "not automatic").
/// Messages dead-lettered *because* they were rejected are never checked (see [`check_cycles`]).
pub fn is_cycle(message: &Message, target: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = message.headers().and_then(|h| h.inner().get("x-death")) else {
        return false;
    };
    for d in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = d else { return false };
        if table_str(t, "reason").as_deref() == Some("rejected") {
            return false;
        }
        if table_str(t, "queue").as_deref() == Some(target) {
            return true;
        }
    }
    false
}

/// Whether cycle detection applies to a death for `reason`: RabbitMQ skips it for rejections.
pub fn check_cycles(reason: DeadLetterReason) -> bool {
    reason != DeadLetterReason::Rejected
}

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

fn strip_expiration(properties: amq_protocol::protocol::BasicProperties) -> amq_protocol::protocol::BasicProperties {
    rebuild(properties, |_| true, false)
}

fn remove_header(
    properties: amq_protocol::protocol::BasicProperties,
    name: &str,
) -> amq_protocol::protocol::BasicProperties {
    let keep_expiration = properties.expiration().is_some();
    rebuild(properties, |k| k != name, keep_expiration)
}

/// Copies properties, filtering headers and optionally dropping `expiration` (the builder cannot unset a field).
fn rebuild(
    p: amq_protocol::protocol::BasicProperties,
    keep_header: impl Fn(&str) -> bool,
    keep_expiration: bool,
) -> amq_protocol::protocol::BasicProperties {
    use amq_protocol::protocol::BasicProperties;
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(h) = p.headers() {
        let mut t = FieldTable::default();
        for (k, v) in h.inner() {
            if keep_header(k.as_str()) {
                t.insert(k.clone(), v.clone());
            }
        }
        out = out.with_headers(t);
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if keep_expiration {
        if let Some(v) = p.expiration() {
            out = out.with_expiration(v.clone());
        }
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;
    use bytes::Bytes;

    fn deaths(m: &Message) -> Vec<FieldTable> {
        match m.headers().unwrap().inner().get("x-death") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .map(|v| match v {
                    AMQPValue::FieldTable(t) => t.clone(),
                    _ => panic!("not a table"),
                })
                .collect(),
            _ => panic!("no x-death"),
        }
    }

    #[test]
    fn builds_x_death_like_rabbitmq() {
        let props = BasicProperties::default().with_expiration("5000".into());
        let m = Message::new("ex", "rk", props, Bytes::from_static(b"x"));
        let d1 = make_dead_letter(&m, "dlx", "q1", DeadLetterReason::Expired, None);
        assert!(d1.properties.expiration().is_none());
        let h = deaths(&d1);
        assert_eq!(h.len(), 1);
        assert_eq!(table_str(&h[0], "queue").as_deref(), Some("q1"));
        assert_eq!(table_str(&h[0], "original-expiration").as_deref(), Some("5000"));
        assert_eq!(table_str(d1.headers().unwrap(), "x-first-death-reason").as_deref(), Some("expired"));

        let d2 = make_dead_letter(&d1, "dlx", "q2", DeadLetterReason::Rejected, Some("other"));
        assert_eq!(&*d2.routing_key, "other");
        let h = deaths(&d2);
        assert_eq!(table_str(&h[0], "queue").as_deref(), Some("q2"));
        assert_eq!(table_str(&h[1], "queue").as_deref(), Some("q1"));
        // First-death headers stay as they were.
        assert_eq!(table_str(d2.headers().unwrap(), "x-first-death-queue").as_deref(), Some("q1"));

        let d3 = make_dead_letter(&d2, "dlx", "q1", DeadLetterReason::Expired, None);
        let h = deaths(&d3);
        assert_eq!(h.len(), 2, "same queue and reason reuse the entry");
        assert_eq!(table_str(&h[0], "queue").as_deref(), Some("q1"));
        assert_eq!(h[0].inner().get("count").and_then(crate::args::int_value), Some(2));
    }

    #[test]
    fn cycles_are_broken_unless_rejected() {
        let m = Message::new("ex", "rk", BasicProperties::default(), Bytes::new());
        let d = make_dead_letter(&m, "dlx", "q1", DeadLetterReason::Expired, None);
        assert!(is_cycle(&d, "q1"));
        assert!(!is_cycle(&d, "q2"));
        let r = make_dead_letter(&m, "dlx", "q1", DeadLetterReason::Rejected, None);
        assert!(!is_cycle(&r, "q1"));
        assert!(!check_cycles(DeadLetterReason::Rejected));
        // A rejection older than the target's newest death does not break the cycle (RabbitMQ's walk
        // stops at the target's entry); a forged 'rejected' entry for another queue cannot keep a TTL loop alive.
        let looped = make_dead_letter(&r, "dlx", "q1", DeadLetterReason::Expired, None);
        assert!(is_cycle(&looped, "q1"));
        let mut forged_headers = FieldTable::default();
        let mut forged = FieldTable::default();
        forged.insert("reason".into(), text("rejected"));
        forged.insert("queue".into(), text("elsewhere"));
        forged_headers
            .insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(forged)])));
        let f = Message::new("ex", "rk", BasicProperties::default().with_headers(forged_headers), Bytes::new());
        let f = make_dead_letter(&f, "dlx", "loopq", DeadLetterReason::Expired, None);
        assert!(is_cycle(&f, "loopq"));
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
