//! The publish path: from an exchange (with its flavor: delayed, deduplicating) through routing to every
//! target queue, and what the publisher's confirm waits for.

use super::{read, VHost};
use crate::error::{BrokerError, Result};
use crate::exchange::flavor::Admit;
use crate::exchange::{Destination, Destinations, Exchange};
use crate::message::{header_routing_keys, same_name, Message};
use crate::queue::{PushOutcome, Queue};
use crate::store::SyncTicket;
use amq_protocol_types::FieldTable;
use smallvec::SmallVec;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The queues a message was routed to, one entry each: inline up to four (no allocation per publish).
pub type RouteTargets = SmallVec<[Arc<Queue>; 4]>;

/// The result of publishing one message.
#[derive(Debug, Clone, Default)]
pub struct PublishResult {
    /// At least one queue took the message.
    pub routed: bool,
    /// At least one routed queue still held it after the push (false when every target was deleted between
    /// routing and the push: the publish counts as routed, as RabbitMQ's, but a move must keep its source).
    pub kept: bool,
    /// A queue refused it (`reject-publish` overflow, or its store failed): confirms nack it.
    pub rejected: bool,
    /// A store refused it (backpressure, disk full, store failing), not a length limit: a move (delayed
    /// release) keeps its source and retries.
    pub refused: bool,
    /// One ticket per durable queue that stored it: a confirm waits until all are on disk.
    pub durable: Vec<SyncTicket>,
    /// The queues whose stores took it (a move whose ticket failed waits for a later fsync of these).
    pub stored_in: Vec<Arc<Queue>>,
    /// A queue that took it has a backlog ([`Queue::has_backlog`]): the publisher should let consumers run.
    pub backlogged: bool,
}

/// What one publisher (an AMQP channel) keeps from one publish to the next, so that a run of publishes to
/// one exchange with one routing key allocates no names and looks up no exchange: the names last seen, as
/// the `Arc<str>`s a [`Message`] carries, the exchange last published to and, for the default exchange,
/// the queue its routing key last resolved to.
///
/// The exchange is checked on every use: once deleted (`exchange.delete`, auto-delete, its vhost's
/// deletion) it is dropped and the name looked up again, so a publish after the delete gets the 404 it
/// got before, or the exchange re-declared under that name. Declared properties never change after a
/// declare (a re-declare must be equivalent), so a cached exchange is as publishable as when it was
/// looked up. The default exchange's queue is reused while the routing key is its name and it is not
/// deleted: a queue is marked deleted under the queue map's lock as it leaves the map, so a queue that is
/// not marked is still the map's entry for its name (a re-declared name is a new queue, looked up afresh).
/// One cache serves one vhost.
#[derive(Debug, Default)]
pub struct PublishCache {
    exchange_name: Option<Arc<str>>,
    routing_key: Option<Arc<str>>,
    exchange: Option<Arc<Exchange>>,
    /// Only while `exchange` is the default exchange (dropped with it, so no other exchange's publishes
    /// pin a deleted queue).
    default_queue: Option<Arc<Queue>>,
}

impl PublishCache {
    /// The exchange name and routing key of a publish as shared strings: the previous publish's when equal
    /// (an `Arc` clone), newly allocated otherwise.
    #[inline]
    pub fn names(&mut self, exchange: &str, routing_key: &str) -> (Arc<str>, Arc<str>) {
        (intern(&mut self.exchange_name, exchange), intern(&mut self.routing_key, routing_key))
    }
}

/// The string in `slot` if it is `s`; otherwise a new one, kept in `slot` for next time.
#[inline]
fn intern(slot: &mut Option<Arc<str>>, s: &str) -> Arc<str> {
    match slot {
        Some(last) if same_name(last, s) => Arc::clone(last),
        _ => Arc::clone(slot.insert(Arc::from(s))),
    }
}

impl VHost {
    /// Publishes a message to `exchange`: routes it (CC/BCC included) and enqueues it. A delayed exchange
    /// holds a message with a positive `x-delay` (counted as routed: the plugin ignores `mandatory`); a
    /// deduplicating exchange drops a recent duplicate (unroutable, but still confirmed).
    pub fn publish(&self, exchange: &str, message: Message) -> Result<PublishResult> {
        crate::counters::MESSAGES_RECEIVED.inc();
        crate::client_input::check_message(&message)?;
        let ex = self.publishable_exchange(exchange)?;
        ex.count_publish_in();
        if ex.flavor().is_plain() {
            // The common case skips the flavor's decision: the message moves once, into the Arc every
            // queue shares, and is routed from there. (Here, not in a shared function: LLVM kept one
            // more move of the message through one, even inlined.)
            return Ok(self.route_and_enqueue_shared(&ex, Arc::new(message)));
        }
        Ok(self.admit_and_route(&ex, message))
    }

    /// [`Self::publish`] through a publisher's [`PublishCache`]: the exchange is looked up only when the
    /// previous publish through `cache` went elsewhere, or its exchange was deleted since. The publisher
    /// builds the message straight into the `Arc` every queue shares (not shared with anyone yet), so a
    /// publish to a plain exchange moves no `Message` (~320 bytes) on the way.
    pub fn publish_cached(
        &self,
        cache: &mut PublishCache,
        exchange: &str,
        message: Arc<Message>,
    ) -> Result<PublishResult> {
        crate::counters::MESSAGES_RECEIVED.inc();
        crate::client_input::check_message(&message)?;
        self.fill_exchange_cache(cache, exchange)?;
        // Filled just above; two fields borrowed apart, so the exchange is not cloned.
        let (Some(ex), default_queue) = (cache.exchange.as_ref(), &mut cache.default_queue) else {
            return Err(self.not_found_exchange(exchange));
        };
        ex.count_publish_in();
        if ex.flavor().is_plain() {
            return Ok(self.route_and_enqueue_through(ex, message, Some(default_queue)));
        }
        // A flavor's decision takes the message by value: moved out of the Arc (not shared: no clone).
        Ok(self.admit_and_route(ex, Arc::unwrap_or_clone(message)))
    }

    /// [`Self::publishable_exchange`] through a publisher's [`PublishCache`] (see [`Self::publish_cached`]).
    #[inline]
    pub fn publishable_exchange_cached<'c>(
        &self,
        cache: &'c mut PublishCache,
        exchange: &str,
    ) -> Result<&'c Arc<Exchange>> {
        self.fill_exchange_cache(cache, exchange)?;
        // Filled just above.
        cache.exchange.as_ref().ok_or_else(|| self.not_found_exchange(exchange))
    }

    /// Makes `cache.exchange` the publishable exchange named `exchange`, looking it up unless it already is.
    #[inline]
    fn fill_exchange_cache(&self, cache: &mut PublishCache, exchange: &str) -> Result<()> {
        let hit = cache.exchange.as_ref().is_some_and(|ex| same_name(ex.name(), exchange) && !ex.is_deleted());
        if !hit {
            // Dropped first: a failed lookup must not leave a deleted exchange (or queue) pinned by the cache.
            cache.exchange = None;
            cache.default_queue = None;
            cache.exchange = Some(self.publishable_exchange(exchange)?);
        }
        Ok(())
    }

    /// Publishes a checked message to a delayed or deduplicating exchange (counted already) through its
    /// flavor's decision.
    fn admit_and_route(&self, ex: &Arc<Exchange>, message: Message) -> PublishResult {
        match ex.admit(message, |message| self.route_and_enqueue(ex, message)) {
            Admit::Routed(mut result, ticket) => {
                result.durable.extend(ticket);
                result
            }
            Admit::Held(ticket) => {
                PublishResult { routed: true, kept: true, durable: ticket.into_iter().collect(), ..Default::default() }
            }
            Admit::Dropped(ticket) => {
                PublishResult { durable: ticket.into_iter().collect(), ..PublishResult::default() }
            }
            Admit::Refused { held: true } => {
                PublishResult { routed: true, rejected: true, refused: true, ..Default::default() }
            }
            Admit::Refused { held: false } => PublishResult { rejected: true, ..PublishResult::default() },
        }
    }

    /// The exchange a client may publish to: it exists (404) and is not internal (403).
    pub fn publishable_exchange(&self, exchange: &str) -> Result<Arc<Exchange>> {
        let ex = self.exchange(exchange)?;
        if ex.spec().internal {
            return Err(BrokerError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                self.name
            )));
        }
        Ok(ex)
    }

    /// Routes a message from `ex` (with its CC/BCC keys, BCC then stripped) and pushes it onto every target queue.
    pub(super) fn route_and_enqueue(&self, ex: &Arc<Exchange>, message: Message) -> PublishResult {
        self.route_and_enqueue_shared(ex, Arc::new(message))
    }

    /// [`Self::route_and_enqueue`] of a message already in its shared `Arc` (not yet shared with anyone).
    fn route_and_enqueue_shared(&self, ex: &Arc<Exchange>, message: Arc<Message>) -> PublishResult {
        self.route_and_enqueue_through(ex, message, None)
    }

    /// [`Self::route_and_enqueue_shared`] through `default_queue`, a publisher's cached queue of the
    /// default exchange ([`PublishCache`]), if any. Always inlined, so the uncached paths (`None`) drop the
    /// cache's code (with it out of line they counted ~45 more instructions per publish; ~30 remain).
    #[inline(always)]
    fn route_and_enqueue_through(
        &self,
        ex: &Arc<Exchange>,
        mut message: Arc<Message>,
        default_queue: Option<&mut Option<Arc<Queue>>>,
    ) -> PublishResult {
        let has_bcc = message.headers().is_some_and(|h| h.contains_key("BCC"));
        let has_cc = message.headers().is_some_and(|h| h.contains_key("CC"));
        if !has_cc && !has_bcc {
            // The common case: one key, borrowed from the message; nothing allocated for routing.
            let queues = match default_queue {
                Some(slot) if ex.name().is_empty() => self.route_default_cached(ex, slot, &message),
                _ => self.route(ex, &[&*message.routing_key], message.headers()),
            };
            ex.count_publish_out(queues.len());
            let mut result = self.enqueue_all(&queues, message);
            self.wait_for_unsaved(&queues, &mut result);
            return result;
        }
        let headers = message.headers();
        let mut keys = vec![message.routing_key.to_string()];
        keys.extend(header_routing_keys(headers, "CC"));
        keys.extend(header_routing_keys(headers, "BCC"));
        let queues = self.route(ex, &keys, message.headers());
        ex.count_publish_out(queues.len());
        if has_bcc {
            // BCC keys must not reach consumers.
            let mut table = message.headers().cloned().unwrap_or_default();
            let mut stripped = FieldTable::default();
            for (k, v) in table.inner() {
                if k.as_str() != "BCC" {
                    stripped.insert(k.clone(), v.clone());
                }
            }
            table = stripped;
            // Not shared yet: no copy is made.
            let message = Arc::make_mut(&mut message);
            message.properties = message.properties.clone().with_headers(table);
            message.raw_properties = None;
        }
        let mut result = self.enqueue_all(&queues, message);
        self.wait_for_unsaved(&queues, &mut result);
        result
    }

    /// Routes a message without CC/BCC keys from the default exchange `ex` through a publisher's cached
    /// queue: the cached queue when its name is the routing key and it is not deleted (no map lookup),
    /// otherwise [`Self::route`], whose queue is cached when it is the one named by the key.
    #[inline]
    fn route_default_cached(
        &self,
        ex: &Arc<Exchange>,
        slot: &mut Option<Arc<Queue>>,
        message: &Message,
    ) -> RouteTargets {
        let key = &*message.routing_key;
        if let Some(q) = slot.as_ref().filter(|q| same_name(q.name(), key) && !q.is_deleted()) {
            let mut queues = RouteTargets::new();
            queues.push(Arc::clone(q));
            return queues;
        }
        // Dropped first: a deleted queue is not kept pinned, and an unroutable key caches nothing.
        *slot = None;
        let queues = self.route(ex, &[key], message.headers());
        if let [q] = queues.as_slice() {
            if same_name(q.name(), key) {
                *slot = Some(Arc::clone(q));
            }
        }
        queues
    }

    /// Routes `message` from `ex` by `keys` (no CC/BCC processing) and pushes it onto every target queue.
    pub(super) fn route_and_enqueue_keys(
        &self,
        ex: &Arc<Exchange>,
        message: Message,
        keys: &[String],
    ) -> PublishResult {
        let queues = self.route(ex, keys, message.headers());
        self.enqueue_all(&queues, Arc::new(message))
    }

    /// Finds the queues a message reaches from `start` for any of `keys`: follows exchange-to-exchange
    /// bindings once each and alternate exchanges where an exchange matched nothing; one entry per queue.
    /// Allocates nothing while it meets at most four queues, destinations and exchanges.
    pub fn route<K: AsRef<str>>(
        &self,
        start: &Arc<Exchange>,
        keys: &[K],
        headers: Option<&FieldTable>,
    ) -> RouteTargets {
        let mut queues = RouteTargets::new();
        let mut found = Destinations::new();
        self.route_step(start, keys, headers, &mut found);
        if !found.is_empty() && found.iter().all(|d| matches!(d, Destination::Queue(_))) {
            // The usual case: queues only, straight from the start exchange (no exchange to walk on to).
            for d in found.drain(..) {
                if let Destination::Queue(q) = d {
                    add_queue(&mut queues, q);
                }
            }
            return queues;
        }
        // Exchanges reached through exchange-to-exchange bindings and alternate exchanges: seen, and still to
        // route through. The start exchange is in neither (no Arc clone in the common case).
        let mut visited: SmallVec<[Arc<Exchange>; 4]> = SmallVec::new();
        let mut pending: SmallVec<[Arc<Exchange>; 4]> = SmallVec::new();
        // The exchange `found` holds the destinations of (None: the start).
        let mut current: Option<Arc<Exchange>> = None;
        loop {
            let ex = current.as_ref().unwrap_or(start);
            if found.is_empty() {
                if let Some(ae) = ex.spec().alternate_exchange.as_deref().and_then(|n| self.exchange(n).ok()) {
                    found.push(Destination::Exchange(ae));
                }
            }
            for d in found.drain(..) {
                match d {
                    Destination::Queue(q) => add_queue(&mut queues, q),
                    Destination::Exchange(e) => {
                        if !Arc::ptr_eq(&e, start) && !visited.iter().any(|x| Arc::ptr_eq(x, &e)) {
                            visited.push(Arc::clone(&e));
                            pending.push(e);
                        }
                    }
                }
            }
            let Some(next) = pending.pop() else { break };
            self.route_step(&next, keys, headers, &mut found);
            current = Some(next);
        }
        queues
    }

    /// The destinations `ex` itself routes a message with `keys` and `headers` to, added to `found`.
    #[inline]
    fn route_step<K: AsRef<str>>(
        &self,
        ex: &Exchange,
        keys: &[K],
        headers: Option<&FieldTable>,
        found: &mut Destinations,
    ) {
        if ex.name().is_empty() {
            let all = read(&self.queues);
            for key in keys {
                if let Some(q) = all.get(key.as_ref()) {
                    found.push(Destination::Queue(Arc::clone(q)));
                }
            }
        } else {
            for key in keys {
                ex.route(key.as_ref(), headers, found);
            }
        }
    }

    /// Makes the confirm of a message stored in a queue whose definition is not on disk yet wait for it.
    fn wait_for_unsaved(&self, queues: &[Arc<Queue>], result: &mut PublishResult) {
        if result.durable.is_empty() || self.unsaved_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        for (q, rx) in unsaved.iter() {
            if queues.iter().any(|t| Arc::ptr_eq(t, q)) {
                result.durable.push(SyncTicket::for_batch(rx.clone()));
            }
        }
    }
}

/// Adds a routed queue to `queues` unless it is deleted or there already (one copy per queue).
#[inline]
fn add_queue(queues: &mut RouteTargets, q: Arc<Queue>) {
    if !q.is_deleted() && !queues.iter().any(|x| Arc::ptr_eq(x, &q)) {
        queues.push(q);
    }
}

impl VHost {
    /// Pushes one message onto every routed queue; what the publisher's confirm depends on. Deaths a push
    /// causes (a drop-head length limit, a zero TTL) are settled before the next queue's push, as they
    /// always were; a publish without deaths allocates nothing for them.
    fn enqueue_all(&self, queues: &[Arc<Queue>], message: Arc<Message>) -> PublishResult {
        let mut result = PublishResult { routed: !queues.is_empty(), ..PublishResult::default() };
        let mut deaths = Vec::new();
        for q in queues {
            let outcome = q.push_into(Arc::clone(&message), &mut deaths);
            result.backlogged |= q.has_backlog();
            if !deaths.is_empty() {
                self.settle_all_deaths(std::mem::take(&mut deaths));
            }
            match outcome {
                // A duplicate counts as stored where its original is: its confirm waits for that fsync.
                PushOutcome::Stored(ticket) | PushOutcome::Duplicate(Some(ticket)) => {
                    result.kept = true;
                    result.durable.push(ticket);
                    result.stored_in.push(Arc::clone(q));
                }
                PushOutcome::Enqueued | PushOutcome::Duplicate(None) => result.kept = true,
                // Still counted as routed, as before the outcome told these apart.
                PushOutcome::QueueDeleted => {}
                PushOutcome::Rejected => result.rejected = true,
                PushOutcome::Refused => {
                    result.rejected = true;
                    result.refused = true;
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::PublishCache;
    use crate::error::ErrorKind;
    use crate::vhost::{ExchangeOptions, QueueOptions};
    use crate::{BasicProperties, Broker, BrokerConfig, FieldTable, Message};
    use bytes::Bytes;
    use std::sync::Arc;

    /// A queue deleted between routing and the push: the publish still counts as routed (as RabbitMQ's), but
    /// nothing kept the message, which is what a move (redrive) checks before removing its source.
    #[tokio::test]
    async fn a_queue_deleted_after_routing_keeps_nothing() {
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("gone", &QueueOptions::default(), 1).unwrap();
        v.declare_queue("here", &QueueOptions::default(), 1).unwrap();
        let gone = v.queue("gone", 1).unwrap();
        let here = v.queue("here", 1).unwrap();
        v.delete_queue("gone", false, false, 1).unwrap();
        let message = || Message::new("", "gone", BasicProperties::default(), Bytes::from_static(b"m"));

        let result = v.enqueue_all(std::slice::from_ref(&gone), std::sync::Arc::new(message()));
        assert!(result.routed && !result.kept && !result.rejected);

        let result = v.enqueue_all(&[gone, here], std::sync::Arc::new(message()));
        assert!(result.routed && result.kept, "one live target keeps it");
    }

    /// A run of publishes with the same names shares one allocation of each; a new name replaces it.
    #[test]
    fn names_are_reused_while_they_repeat() {
        let mut cache = PublishCache::default();
        let (x1, k1) = cache.names("ex", "key");
        let (x2, k2) = cache.names("ex", "key");
        assert!(Arc::ptr_eq(&x1, &x2) && Arc::ptr_eq(&k1, &k2));
        let (x3, k3) = cache.names("ex", "other");
        assert!(Arc::ptr_eq(&x1, &x3));
        assert!(!Arc::ptr_eq(&k1, &k3));
        assert_eq!((&*x3, &*k3), ("ex", "other"));
        let (_, k4) = cache.names("ex", "key");
        assert_eq!(&*k4, "key");
        assert!(!Arc::ptr_eq(&k1, &k4), "only the last key is kept");
    }

    /// The cached exchange is used until it is deleted: the next publish is the 404 of a missing exchange,
    /// and once the name is declared again it reaches the new exchange's bindings, not the old one's.
    #[tokio::test]
    async fn a_cached_exchange_is_dropped_when_deleted() {
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        for q in ["old", "new"] {
            v.declare_queue(q, &QueueOptions::default(), 1).unwrap();
        }
        v.declare_exchange("x", "direct", &ExchangeOptions::default()).unwrap();
        v.bind_queue("old", "x", "k", &FieldTable::default(), 1).unwrap();
        let message = || Message::new("x", "k", BasicProperties::default(), Bytes::from_static(b"m"));
        let mut cache = PublishCache::default();

        let first = Arc::clone(v.publishable_exchange_cached(&mut cache, "x").unwrap());
        assert!(v.publish_cached(&mut cache, "x", Arc::new(message())).unwrap().routed);
        assert!(Arc::ptr_eq(&first, v.publishable_exchange_cached(&mut cache, "x").unwrap()), "looked up once");

        v.delete_exchange("x", false).unwrap();
        let err = v.publish_cached(&mut cache, "x", Arc::new(message())).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
        assert!(cache.exchange.is_none(), "the deleted exchange is not kept");

        v.declare_exchange("x", "fanout", &ExchangeOptions::default()).unwrap();
        v.bind_queue("new", "x", "", &FieldTable::default(), 1).unwrap();
        assert!(v.publish_cached(&mut cache, "x", Arc::new(message())).unwrap().routed);
        assert_eq!(v.queue("old", 1).unwrap().message_count(), 1, "only the publish before the delete");
        assert_eq!(v.queue("new", 1).unwrap().message_count(), 1);

        // Another exchange through the same cache, then back.
        assert!(!v.publish_cached(&mut cache, "amq.direct", Arc::new(message())).unwrap().routed);
        assert!(v.publish_cached(&mut cache, "x", Arc::new(message())).unwrap().routed);
        assert_eq!(v.queue("new", 1).unwrap().message_count(), 2);
    }

    /// Publishes to the default exchange with one routing key resolve the queue once; another exchange
    /// drops it from the cache.
    #[tokio::test]
    async fn the_default_exchange_reuses_its_cached_queue() {
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("q", &QueueOptions::default(), 1).unwrap();
        let q = v.queue("q", 1).unwrap();
        let message = || Arc::new(Message::new("", "q", BasicProperties::default(), Bytes::from_static(b"m")));
        let mut cache = PublishCache::default();
        for _ in 0..3 {
            let result = v.publish_cached(&mut cache, "", message()).unwrap();
            assert!(result.routed && result.kept);
            assert!(cache.default_queue.as_ref().is_some_and(|c| Arc::ptr_eq(c, &q)), "cached");
        }
        assert_eq!(q.message_count(), 3);

        let other = Arc::new(Message::new("", "missing", BasicProperties::default(), Bytes::from_static(b"m")));
        assert!(!v.publish_cached(&mut cache, "", other).unwrap().routed, "another key is looked up");
        assert!(cache.default_queue.is_none(), "an unroutable key caches nothing");
        assert!(v.publish_cached(&mut cache, "", message()).unwrap().routed);
        assert!(cache.default_queue.is_some());
        assert!(!v.publish_cached(&mut cache, "amq.direct", message()).unwrap().routed);
        assert!(cache.default_queue.is_none(), "dropped with the default exchange");
        assert_eq!(q.message_count(), 4);
    }

    /// A cached queue that was deleted is not routed to: the publish is unroutable (a mandatory one is
    /// returned), and the dead queue is no longer pinned by the cache.
    #[tokio::test]
    async fn a_deleted_cached_queue_is_unroutable() {
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("q", &QueueOptions::default(), 1).unwrap();
        let old = v.queue("q", 1).unwrap();
        let message = || Arc::new(Message::new("", "q", BasicProperties::default(), Bytes::from_static(b"m")));
        let mut cache = PublishCache::default();
        assert!(v.publish_cached(&mut cache, "", message()).unwrap().routed);
        v.delete_queue("q", false, false, 1).unwrap();

        let result = v.publish_cached(&mut cache, "", message()).unwrap();
        assert!(!result.routed && !result.kept, "unroutable, as without the cache");
        assert!(cache.default_queue.is_none());
        assert_eq!(old.message_count(), 0);
    }

    /// Delete and re-declare of the cached queue's name: the next publish reaches the new queue, also when
    /// the old one has left the map but its deletion has not finished (the window `remove_queue_saved`
    /// leaves between the map and `mark_deleted`, reproduced here).
    #[tokio::test]
    async fn a_redeclared_queue_replaces_the_cached_one() {
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        let message = || Arc::new(Message::new("", "q", BasicProperties::default(), Bytes::from_static(b"m")));
        let mut cache = PublishCache::default();

        v.declare_queue("q", &QueueOptions::default(), 1).unwrap();
        let old = v.queue("q", 1).unwrap();
        assert!(v.publish_cached(&mut cache, "", message()).unwrap().routed);
        v.delete_queue("q", false, false, 1).unwrap();
        v.declare_queue("q", &QueueOptions::default(), 1).unwrap();
        let new = v.queue("q", 1).unwrap();
        assert!(v.publish_cached(&mut cache, "", message()).unwrap().kept);
        assert!(cache.default_queue.as_ref().is_some_and(|c| Arc::ptr_eq(c, &new)));
        assert_eq!((old.message_count(), new.message_count()), (0, 1));

        // Out of the map as `remove_queue_saved` takes it out, not yet `mark_deleted`.
        {
            let mut queues = crate::vhost::write(&v.queues);
            new.stop_routing();
            queues.remove("q");
        }
        v.declare_queue("q", &QueueOptions::default(), 1).unwrap();
        let newest = v.queue("q", 1).unwrap();
        assert!(v.publish_cached(&mut cache, "", message()).unwrap().kept);
        assert_eq!((new.message_count(), newest.message_count()), (1, 1), "not the queue leaving");
        assert!(cache.default_queue.as_ref().is_some_and(|c| Arc::ptr_eq(c, &newest)));
    }

    /// A flavored exchange takes the message out of its Arc through `publish_cached`: a deduplicating one
    /// routes the first message with a value and drops the second (unroutable), as through `publish`.
    #[tokio::test]
    async fn a_flavored_exchange_decides_on_a_cached_publish() {
        use amq_protocol_types::{AMQPValue, LongString};
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-cache-size".into(), AMQPValue::LongInt(100));
        let options = ExchangeOptions { arguments, ..ExchangeOptions::default() };
        v.declare_exchange("dd", "x-message-deduplication", &options).unwrap();
        v.declare_queue("q", &QueueOptions::default(), 1).unwrap();
        v.bind_queue("q", "dd", "", &FieldTable::default(), 1).unwrap();
        let message = || {
            let mut headers = FieldTable::default();
            headers.insert("x-deduplication-header".into(), AMQPValue::LongString(LongString::from("a")));
            let props = BasicProperties::default().with_headers(headers);
            Arc::new(Message::new("dd", "", props, Bytes::from_static(b"m")))
        };
        let mut cache = PublishCache::default();
        assert!(v.publish_cached(&mut cache, "dd", message()).unwrap().routed);
        assert!(!v.publish_cached(&mut cache, "dd", message()).unwrap().routed, "the duplicate is dropped");
        assert_eq!(v.queue("q", 1).unwrap().message_count(), 1);
    }

    /// An internal exchange is refused on every publish, as without the cache; a missing one is a 404.
    #[tokio::test]
    async fn refusals_are_not_cached() {
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        let options = ExchangeOptions { internal: true, ..ExchangeOptions::default() };
        v.declare_exchange("inner", "fanout", &options).unwrap();
        let message = || Message::new("inner", "", BasicProperties::default(), Bytes::from_static(b"m"));
        let mut cache = PublishCache::default();
        for _ in 0..2 {
            let err = v.publish_cached(&mut cache, "inner", Arc::new(message())).unwrap_err();
            assert_eq!(err.kind, ErrorKind::AccessRefused, "{err}");
        }
        let err = v.publish_cached(&mut cache, "missing", Arc::new(message())).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    }
}
