//! Dead-lettering: the message a queue republishes to its dead-letter exchange, with RabbitMQ's `x-death`
//! history. The loop that routes and pushes dead letters is the vhost's (`vhost/dead_letters.rs`); the
//! settling of the source records once the copies are safe is the queue's (`queue/source_records.rs`).

use crate::message::{header_routing_keys, Message};
use crate::queue::DeadLetterReason;
use amq_protocol_types::{AMQPValue, FieldArray, FieldTable, LongString};

use std::time::{SystemTime, UNIX_EPOCH};

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
    crate::counters::DEAD_LETTERED[reason.counter_index()].inc();
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
