//! What RabbitMQ needs plugins for, built in: the delayed-message exchange (`x-delayed-message`, as
//! rabbitmq-delayed-message-exchange) and the deduplicating exchange (`x-message-deduplication`, as
//! rabbitmq-message-deduplication).

use crate::args::{int_value, string_value};
use crate::error::{BrokerError, Result};
use crate::exchange::ExchangeKind;
use crate::message::Message;
use amq_protocol_types::{AMQPValue, FieldTable};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Exchange type name of the delayed-message exchange.
pub const DELAYED_TYPE: &str = "x-delayed-message";
/// Exchange type name of the deduplicating exchange.
pub const DEDUP_TYPE: &str = "x-message-deduplication";

/// What an exchange does beyond routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeFlavor {
    /// A plain exchange.
    Plain,
    /// Holds messages with a positive `x-delay` header back, then routes them by its `x-delayed-type`.
    Delayed,
    /// Routes like fanout, dropping messages whose `x-deduplication-header` was seen recently.
    Deduplicating {
        /// `x-cache-size`: most remembered values (older ones are evicted).
        cache_size: usize,
        /// `x-cache-ttl`: how long a value is remembered, in ms (None = until evicted).
        ttl_ms: Option<u64>,
    },
}

impl ExchangeFlavor {
    /// Parses a declared exchange type with its arguments into (routing kind, flavor).
    pub fn parse(type_name: &str, args: &FieldTable) -> Result<(ExchangeKind, ExchangeFlavor)> {
        match type_name {
            DELAYED_TYPE => {
                let inner = args.inner().get("x-delayed-type").and_then(string_value).ok_or_else(|| {
                    BrokerError::precondition("Invalid argument, 'x-delayed-type' must be an existing exchange type")
                })?;
                let kind = ExchangeKind::parse(&inner).map_err(|_| {
                    BrokerError::precondition("Invalid argument, 'x-delayed-type' must be an existing exchange type")
                })?;
                Ok((kind, ExchangeFlavor::Delayed))
            }
            DEDUP_TYPE => {
                let size =
                    args.inner().get("x-cache-size").and_then(int_value).filter(|n| *n > 0).ok_or_else(|| {
                        BrokerError::precondition(
                            "Missing or invalid argument, 'x-cache-size' must be a positive integer",
                        )
                    })?;
                let ttl_ms = match args.inner().get("x-cache-ttl") {
                    None => None,
                    Some(v) => Some(int_value(v).filter(|n| *n >= 0).ok_or_else(|| {
                        BrokerError::precondition("Invalid argument, 'x-cache-ttl' must be a non-negative integer")
                    })? as u64),
                };
                if let Some(p) = args.inner().get("x-cache-persistence") {
                    match string_value(p).as_deref() {
                        Some("memory") | Some("disk") => {}
                        _ => {
                            return Err(BrokerError::precondition(
                                "Invalid argument, 'x-cache-persistence' must be either 'disk' or 'memory'",
                            ))
                        }
                    }
                }
                Ok((ExchangeKind::Fanout, ExchangeFlavor::Deduplicating { cache_size: size as usize, ttl_ms }))
            }
            other => Ok((ExchangeKind::parse(other)?, ExchangeFlavor::Plain)),
        }
    }
}

/// The delay a message asks for: its `x-delay` header in ms, when positive.
pub fn requested_delay(message: &Message) -> Option<u64> {
    let delay = message.headers()?.inner().get("x-delay").and_then(int_value)?;
    (delay > 0).then_some(delay as u64)
}

/// Marks a released message as the plugin does: `x-delay` becomes the negated delay.
pub fn mark_released(mut message: Message, delay_ms: u64) -> Message {
    let mut headers = message.headers().cloned().unwrap_or_default();
    headers.insert("x-delay".into(), AMQPValue::LongLongInt(-(delay_ms as i64)));
    message.properties = message.properties.with_headers(headers);
    message.raw_properties = None;
    message
}

#[derive(Debug)]
struct Pending {
    due: Instant,
    seq: u64,
    delay_ms: u64,
    message: Message,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Messages a delayed exchange holds back, earliest due first (ties in publish order).
#[derive(Debug, Default)]
pub struct DelayedMessages {
    heap: Mutex<(BinaryHeap<Reverse<Pending>>, u64)>,
    /// Wakes the release task when an earlier deadline arrives.
    pub wake: Notify,
}

impl DelayedMessages {
    /// Holds `message` for `delay_ms`.
    pub fn schedule(&self, message: Message, delay_ms: u64) {
        let due = Instant::now() + Duration::from_millis(delay_ms);
        let mut guard = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let (heap, seq) = &mut *guard;
        *seq += 1;
        let earliest = heap.peek().is_none_or(|Reverse(p)| due < p.due);
        heap.push(Reverse(Pending { due, seq: *seq, delay_ms, message }));
        drop(guard);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Takes every message due by `now`, in due order, each with its delay.
    pub fn take_due(&self, now: Instant) -> Vec<(Message, u64)> {
        let mut guard = self.heap.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        while guard.0.peek().is_some_and(|Reverse(p)| p.due <= now) {
            if let Some(Reverse(p)) = guard.0.pop() {
                out.push((p.message, p.delay_ms));
            }
        }
        out
    }

    /// When the next message is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.lock().unwrap_or_else(|p| p.into_inner()).0.peek().map(|Reverse(p)| p.due)
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.heap.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The deduplicating exchange's memory of recent `x-deduplication-header` values.
#[derive(Debug, Default)]
pub struct DedupCache {
    state: Mutex<DedupState>,
}

#[derive(Debug, Default)]
struct DedupState {
    expires: HashMap<String, Option<Instant>>,
    order: VecDeque<String>,
}

/// The value a message is deduplicated on, rendered to a canonical key.
pub fn dedup_key(message: &Message) -> Option<String> {
    let value = message.headers()?.inner().get("x-deduplication-header")?;
    Some(match value {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => format!("s:{}", string_value(value)?),
        v => match int_value(v) {
            Some(i) => format!("i:{i}"),
            None => format!("v:{v:?}"),
        },
    })
}

impl DedupCache {
    /// Records the message's key; returns false when it is a duplicate still remembered (drop it).
    pub fn admit(&self, message: &Message, cache_size: usize, default_ttl_ms: Option<u64>) -> bool {
        let Some(key) = dedup_key(message) else { return true };
        let ttl = message
            .headers()
            .and_then(|h| h.inner().get("x-cache-ttl"))
            .and_then(int_value)
            .filter(|n| *n >= 0)
            .map(|n| n as u64)
            .or(default_ttl_ms);
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(expiry) = st.expires.get(&key) {
            if expiry.is_none_or(|at| at > now) {
                return false;
            }
        }
        let fresh = st.expires.insert(key.clone(), ttl.map(|ms| now + Duration::from_millis(ms))).is_none();
        if fresh {
            st.order.push_back(key);
        }
        // Evict oldest (or expired) entries beyond the size limit.
        while st.expires.len() > cache_size {
            let Some(old) = st.order.pop_front() else { break };
            st.expires.remove(&old);
        }
        true
    }
}

/// The services only some exchanges have, created with the exchange.
#[derive(Debug, Default)]
pub struct ExchangeExtras {
    /// Held-back messages (delayed exchanges).
    pub delayed: Arc<DelayedMessages>,
    /// Recently seen values (deduplicating exchanges).
    pub dedup: DedupCache,
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol_types::LongString;
    use bytes::Bytes;

    fn msg(headers: &[(&str, AMQPValue)]) -> Message {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        Message::new("x", "k", BasicProperties::default().with_headers(t), Bytes::new())
    }

    #[test]
    fn delayed_type_is_required_and_checked() {
        let mut args = FieldTable::default();
        assert!(ExchangeFlavor::parse(DELAYED_TYPE, &args).is_err());
        args.insert("x-delayed-type".into(), AMQPValue::LongString(LongString::from("nope")));
        assert!(ExchangeFlavor::parse(DELAYED_TYPE, &args).is_err());
        args.insert("x-delayed-type".into(), AMQPValue::LongString(LongString::from("topic")));
        assert_eq!(ExchangeFlavor::parse(DELAYED_TYPE, &args).unwrap(), (ExchangeKind::Topic, ExchangeFlavor::Delayed));
    }

    #[test]
    fn delay_header() {
        assert_eq!(requested_delay(&msg(&[("x-delay", AMQPValue::LongInt(500))])), Some(500));
        assert_eq!(requested_delay(&msg(&[("x-delay", AMQPValue::LongInt(-5))])), None);
        assert_eq!(requested_delay(&msg(&[])), None);
        let released = mark_released(msg(&[("x-delay", AMQPValue::LongInt(500))]), 500);
        assert_eq!(released.headers().unwrap().inner().get("x-delay"), Some(&AMQPValue::LongLongInt(-500)));
    }

    #[tokio::test]
    async fn delayed_messages_come_out_in_due_order() {
        let d = DelayedMessages::default();
        d.schedule(msg(&[]), 30);
        d.schedule(msg(&[]), 10);
        d.schedule(msg(&[]), 20);
        assert!(d.take_due(Instant::now()).is_empty());
        let later = Instant::now() + Duration::from_millis(40);
        let due: Vec<u64> = d.take_due(later).into_iter().map(|(_, ms)| ms).collect();
        assert_eq!(due, vec![10, 20, 30]);
    }

    #[test]
    fn dedup_cache_drops_seen_values_and_evicts() {
        let c = DedupCache::default();
        let a = msg(&[("x-deduplication-header", AMQPValue::LongString(LongString::from("a")))]);
        let b = msg(&[("x-deduplication-header", AMQPValue::LongString(LongString::from("b")))]);
        assert!(c.admit(&a, 1, None));
        assert!(!c.admit(&a, 1, None));
        assert!(c.admit(&b, 1, None), "b evicts a");
        assert!(c.admit(&a, 1, None), "a was evicted");
        assert!(c.admit(&msg(&[]), 1, None), "no header: never a duplicate");
    }
}
