//! The publish path: from an exchange (with its flavor: delayed, deduplicating) through routing to every
//! target queue, and what the publisher's confirm waits for.

use super::{read, VHost};
use crate::error::{BrokerError, Result};
use crate::exchange::flavor::Admit;
use crate::exchange::{Destination, Destinations, Exchange};
use crate::message::{header_routing_keys, Message};
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
            // queue shares, and is routed from there.
            return Ok(self.route_and_enqueue_shared(&ex, Arc::new(message)));
        }
        Ok(match ex.admit(message, |message| self.route_and_enqueue(&ex, message)) {
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
        })
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
    fn route_and_enqueue_shared(&self, ex: &Arc<Exchange>, mut message: Arc<Message>) -> PublishResult {
        let has_bcc = message.headers().is_some_and(|h| h.contains_key("BCC"));
        let has_cc = message.headers().is_some_and(|h| h.contains_key("CC"));
        if !has_cc && !has_bcc {
            // The common case: one key, borrowed from the message; nothing allocated for routing.
            let queues = self.route(ex, &[&*message.routing_key], message.headers());
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
        // Exchanges reached through exchange-to-exchange bindings and alternate exchanges: seen, and still to
        // route through. The start exchange is in neither (no Arc clone in the common case).
        let mut visited: SmallVec<[Arc<Exchange>; 4]> = SmallVec::new();
        let mut pending: SmallVec<[Arc<Exchange>; 4]> = SmallVec::new();
        let mut found = Destinations::new();
        let mut next: Option<Arc<Exchange>> = None;
        loop {
            let ex = next.as_ref().unwrap_or(start);
            found.clear();
            if ex.name().is_empty() {
                let all = read(&self.queues);
                for key in keys {
                    if let Some(q) = all.get(key.as_ref()) {
                        found.push(Destination::Queue(Arc::clone(q)));
                    }
                }
            } else {
                for key in keys {
                    ex.route(key.as_ref(), headers, &mut found);
                }
            }
            if found.is_empty() {
                if let Some(ae) = ex.spec().alternate_exchange.as_deref().and_then(|n| self.exchange(n).ok()) {
                    found.push(Destination::Exchange(ae));
                }
            }
            for d in found.drain(..) {
                match d {
                    Destination::Queue(q) => {
                        if !q.is_deleted() && !queues.iter().any(|x| Arc::ptr_eq(x, &q)) {
                            queues.push(q);
                        }
                    }
                    Destination::Exchange(e) => {
                        if !Arc::ptr_eq(&e, start) && !visited.iter().any(|x| Arc::ptr_eq(x, &e)) {
                            visited.push(Arc::clone(&e));
                            pending.push(e);
                        }
                    }
                }
            }
            match pending.pop() {
                Some(e) => next = Some(e),
                None => break,
            }
        }
        queues
    }

    /// Makes the confirm of a message stored in a queue whose definition is not on disk yet wait for it.
    fn wait_for_unsaved(&self, queues: &[Arc<Queue>], result: &mut PublishResult) {
        if self.unsaved_count.load(Ordering::SeqCst) == 0 || result.durable.is_empty() {
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

impl VHost {
    /// Pushes one message onto every routed queue; what the publisher's confirm depends on. Deaths a push
    /// causes (a drop-head length limit, a zero TTL) are settled before the next queue's push, as they
    /// always were; a publish without deaths allocates nothing for them.
    fn enqueue_all(&self, queues: &[Arc<Queue>], message: Arc<Message>) -> PublishResult {
        let mut result = PublishResult { routed: !queues.is_empty(), ..PublishResult::default() };
        let mut deaths = Vec::new();
        for q in queues {
            let outcome = q.push_into(Arc::clone(&message), &mut deaths);
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
    use crate::vhost::QueueOptions;
    use crate::{BasicProperties, Broker, BrokerConfig, Message};
    use bytes::Bytes;

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
}
