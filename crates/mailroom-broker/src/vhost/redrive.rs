//! Redrive: moving messages out of a dead-letter queue back to where they first died (or elsewhere),
//! removing each original only once its copy is safe at the target.

use super::VHost;
use crate::args;
use crate::error::Result;
use crate::message::Message;
use crate::queue::{ConnectionId, MessageId, Queue};
use crate::store::SyncTicket;
use std::sync::Arc;

/// Where a redrive sends messages instead of their first death's exchange and routing keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveTarget {
    /// Through an exchange with a routing key.
    Exchange {
        /// The exchange name ("" is the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// Straight to a queue (through the default exchange).
    Queue(String),
}

/// What a redrive moves.
#[derive(Debug, Clone, Default)]
pub struct RedriveOptions {
    /// Most messages to move (None = all).
    pub count: Option<usize>,
    /// Only messages whose header `name` has this string value.
    pub header_filter: Option<(String, String)>,
    /// Where to send them (None = back to their first death's exchange and routing keys).
    pub target: Option<RedriveTarget>,
}

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedriveOutcome {
    /// Messages enqueued at their target and removed from the dead-letter queue.
    pub moved: u64,
    /// Messages left in place: filtered out, without death history, unroutable or refused by the target.
    pub skipped: u64,
}

/// Messages a redrive copies before waiting for their store tickets: one group-commit covers a batch
/// instead of one fsync wait per message.
const REDRIVE_BATCH: usize = 256;

/// Waits until the pending copies are durable at their targets, then removes their originals from the DLQ
/// (a copy whose store write failed leaves its original in place, counted as skipped).
async fn settle_redriven(
    dlq: &Arc<Queue>,
    pending: &mut Vec<(MessageId, Vec<SyncTicket>)>,
    outcome: &mut RedriveOutcome,
) {
    for (id, tickets) in pending.drain(..) {
        let mut stored = true;
        for ticket in tickets {
            if ticket.wait().await.is_err() {
                stored = false;
            }
        }
        if stored {
            // Consumed or expired meanwhile: the copy at the target is then a duplicate, still counted as moved.
            dlq.remove_ready(id);
            outcome.moved += 1;
        } else {
            outcome.skipped += 1;
        }
    }
}

/// The exchange and routing keys of a message's first death: the oldest `x-death` entry, else
/// `x-first-death-exchange` with the message's routing key.
pub fn first_death(message: &Message) -> Option<(String, Vec<String>)> {
    use amq_protocol_types::AMQPValue;
    let headers = message.headers()?;
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") {
        if let Some(AMQPValue::FieldTable(t)) = deaths.as_slice().last() {
            let exchange = t.inner().get("exchange").and_then(args::string_value);
            let keys: Vec<String> = match t.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(items)) => items.as_slice().iter().filter_map(args::string_value).collect(),
                _ => Vec::new(),
            };
            if let Some(exchange) = exchange {
                let keys = if keys.is_empty() { vec![message.routing_key.to_string()] } else { keys };
                return Some((exchange, keys));
            }
        }
    }
    let exchange = headers.inner().get("x-first-death-exchange").and_then(args::string_value)?;
    Some((exchange, vec![message.routing_key.to_string()]))
}

impl VHost {
    /// Moves ready messages of `queue` (a dead-letter queue) back to where they first died (the exchange and
    /// routing keys of the oldest `x-death` entry, else `x-first-death-exchange` with their routing key) or
    /// to `options.target`. Bodies and properties (with the `x-death` history) are kept. Each message is
    /// removed from `queue` only after its copy is enqueued at the target and, for durable targets, on disk:
    /// a crash mid-redrive leaves every message in the DLQ or the target (possibly both).
    pub async fn redrive(&self, queue: &str, options: &RedriveOptions) -> Result<RedriveOutcome> {
        const NO_OWNER: ConnectionId = 0;
        let dlq = self.queue(queue, NO_OWNER)?;
        if let Some(RedriveTarget::Queue(name)) = &options.target {
            self.queue(name, NO_OWNER)?;
        }
        if let Some(RedriveTarget::Exchange { exchange, .. }) = &options.target {
            self.exchange(exchange)?;
        }
        let limit = options.count.unwrap_or(usize::MAX);
        // A snapshot: messages the redrive itself routes back into this queue are not moved twice.
        let snapshot = dlq.peek(0, usize::MAX);
        let mut outcome = RedriveOutcome::default();
        // Copies enqueued at their target whose originals are still in the DLQ, with their store tickets.
        let mut pending: Vec<(MessageId, Vec<SyncTicket>)> = Vec::new();
        for peeked in snapshot {
            if outcome.moved as usize + pending.len() >= limit {
                break;
            }
            let message = &peeked.message;
            if let Some((name, value)) = &options.header_filter {
                let matches = message
                    .headers()
                    .and_then(|h| h.inner().get(name.as_str()))
                    .and_then(args::string_value)
                    .is_some_and(|v| &v == value);
                if !matches {
                    outcome.skipped += 1;
                    continue;
                }
            }
            let (exchange, keys) = match &options.target {
                Some(RedriveTarget::Queue(name)) => (String::new(), vec![name.clone()]),
                Some(RedriveTarget::Exchange { exchange, routing_key }) => {
                    (exchange.clone(), vec![routing_key.clone()])
                }
                None => match first_death(message) {
                    Some(found) => found,
                    None => {
                        outcome.skipped += 1;
                        continue;
                    }
                },
            };
            let Ok(ex) = self.exchange(&exchange) else {
                outcome.skipped += 1;
                continue;
            };
            let mut copy = (**message).clone();
            copy.exchange = exchange.as_str().into();
            copy.routing_key = keys.first().map(String::as_str).unwrap_or("").into();
            let result = self.route_and_enqueue_keys(&ex, copy, &keys);
            if !result.routed || result.rejected {
                outcome.skipped += 1;
                continue;
            }
            pending.push((peeked.id, result.durable));
            if pending.len() >= REDRIVE_BATCH {
                settle_redriven(&dlq, &mut pending, &mut outcome).await;
            }
        }
        settle_redriven(&dlq, &mut pending, &mut outcome).await;
        Ok(outcome)
    }
}
