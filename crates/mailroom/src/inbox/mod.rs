//! Idempotent consumer: a processed-id store so a redelivered or duplicated message has no second effect.
//!
//! Two kinds of store. A plain store ([`MemoryInbox`]) is asked "seen?" before the handler and told
//! "record" after it succeeded, so a crash between the handler's effect and the mark can still repeat
//! the effect once (a documented window). A transactional store ([`PgInbox`](postgres::PgInbox), with
//! the `postgres` feature) claims the id inside a database transaction that the handler joins through
//! `ctx.tx()`: the inbox row and the handler's own writes commit together or not at all, so the effect
//! happens exactly once even when the worker crashes mid-way.

#[cfg(feature = "postgres")]
pub mod postgres;

use crate::transport::BoxFuture;
use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A store of processed message ids per consumer.
pub trait InboxStore: Send + Sync + 'static {
    /// Whether `consumer` already processed `message_id`.
    fn seen<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<bool, String>>;
    /// Records that `consumer` processed `message_id`.
    fn record<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Transactional stores: claims `message_id` for `consumer` in a new unit of work that the handler
    /// joins and the pipeline commits only if the handler succeeded. `None` (the default): a plain
    /// store, used through `seen` and `record`.
    fn begin<'a>(&'a self, _consumer: &'a str, _message_id: &'a str) -> Option<BoxFuture<'a, Result<Claim, String>>> {
        None
    }
}

/// What a transactional store answered when asked to claim a message id.
pub enum Claim {
    /// Already processed: an earlier delivery's unit of work committed it.
    Duplicate,
    /// New: the id is recorded in this open unit of work; the handler's writes go in it too.
    Claimed(Box<dyn UnitOfWork>),
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Claim::Duplicate => "Duplicate",
            Claim::Claimed(_) => "Claimed",
        })
    }
}

/// Shared slot for a delivery's unit of work: the handler borrows it, the pipeline commits it.
pub(crate) type UnitSlot = std::sync::Arc<Mutex<Option<Box<dyn UnitOfWork>>>>;

/// An open transaction of a transactional inbox store.
pub trait UnitOfWork: Send + 'static {
    /// Makes the inbox row and the handler's writes durable.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), String>>;
    /// Discards them (the message will be handled again when redelivered or retried).
    fn rollback(self: Box<Self>) -> BoxFuture<'static, Result<(), String>>;
    /// For `ctx.tx()`: the store-specific transaction behind it, to downcast.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// Default retention: longer than any redelivery horizon (delayed retries, DLQ redrive within a week).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Recorded ids by (consumer, message id), with when.
type Recorded = HashMap<(String, String), Instant>;
/// Recorded ids in recording order, for the retention purge.
type Expiry = VecDeque<(Instant, String, String)>;

/// An in-memory store with a retention window (entries older than it are forgotten).
#[derive(Debug)]
pub struct MemoryInbox {
    retention: Duration,
    state: Mutex<(Recorded, Expiry)>,
}

impl Default for MemoryInbox {
    fn default() -> Self {
        Self::new(DEFAULT_RETENTION)
    }
}

impl MemoryInbox {
    /// A store keeping ids for `retention`.
    pub fn new(retention: Duration) -> Self {
        Self { retention, state: Mutex::new((HashMap::new(), VecDeque::new())) }
    }

    /// Ids currently held.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().0.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn purge(&self, now: Instant) {
        let mut st = self.state.lock().unwrap();
        let (map, order) = &mut *st;
        while let Some((at, c, m)) = order.front() {
            if now.duration_since(*at) < self.retention {
                break;
            }
            let key = (c.clone(), m.clone());
            if map.get(&key) == Some(at) {
                map.remove(&key);
            }
            order.pop_front();
        }
    }
}

impl InboxStore for MemoryInbox {
    fn seen<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        self.purge(Instant::now());
        let hit = self.state.lock().unwrap().0.contains_key(&(consumer.to_owned(), message_id.to_owned()));
        Box::pin(async move { Ok(hit) })
    }
    fn record<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<(), String>> {
        let now = Instant::now();
        {
            let mut st = self.state.lock().unwrap();
            st.0.insert((consumer.to_owned(), message_id.to_owned()), now);
            st.1.push_back((now, consumer.to_owned(), message_id.to_owned()));
        }
        self.purge(now);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_within_retention_and_forgets_after() {
        let inbox = MemoryInbox::new(Duration::from_millis(50));
        assert!(!inbox.seen("c", "1").await.unwrap());
        inbox.record("c", "1").await.unwrap();
        assert!(inbox.seen("c", "1").await.unwrap());
        assert!(!inbox.seen("other", "1").await.unwrap());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!inbox.seen("c", "1").await.unwrap());
        assert!(inbox.is_empty());
    }
}
