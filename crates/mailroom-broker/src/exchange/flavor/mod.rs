//! What an exchange does beyond routing: its flavor. RabbitMQ needs plugins for these; they are built in:
//! the delayed-message exchange (`x-delayed-message`, as rabbitmq-delayed-message-exchange, in
//! [`delayed`]) and the deduplicating exchange (`x-message-deduplication`, as
//! rabbitmq-message-deduplication, in [`dedup`]). This module parses the declared type into a routing kind
//! and a flavor (the consistent-hash plugin's type is only a routing kind,
//! [`super::consistent_hash`]), and gives every flavor one interface: [`FlavorState::admit`] a published
//! message, [`FlavorState::attach`] the flavor's store under the data dir (durable exchanges),
//! [`FlavorState::flush`] what it buffers for the store, [`FlavorState::destroy`] it with its exchange.
//!
//! Adding a flavor: a variant here (parse, type name, state, the four operations) and its own module.

pub mod dedup;
pub mod delayed;

use crate::args::{int_value, string_value};
use crate::error::{BrokerError, Result};
use crate::exchange::{consistent_hash, ExchangeKind, ExchangeSpec};
use crate::message::Message;
use crate::storage::Durability;
use crate::store::{StoreResult, SyncTicket};
use amq_protocol_types::FieldTable;
use dedup::{Admission, DedupCache};
use delayed::DelayedMessages;
use std::sync::Arc;

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
        /// `x-cache-persistence: disk`: the cache survives a restart (durable exchange, broker with a data dir).
        disk: bool,
    },
}

impl ExchangeFlavor {
    /// The type name declared for an exchange of this flavor routing by `kind`.
    pub fn type_name(&self, kind: ExchangeKind) -> &'static str {
        match self {
            ExchangeFlavor::Plain => kind.as_str(),
            ExchangeFlavor::Delayed => DELAYED_TYPE,
            ExchangeFlavor::Deduplicating { .. } => DEDUP_TYPE,
        }
    }

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
                let disk = match args.inner().get("x-cache-persistence") {
                    None => false,
                    Some(p) => match string_value(p).as_deref() {
                        Some("memory") => false,
                        Some("disk") => true,
                        _ => {
                            return Err(BrokerError::precondition(
                                "Invalid argument, 'x-cache-persistence' must be either 'disk' or 'memory'",
                            ))
                        }
                    },
                };
                Ok((ExchangeKind::Fanout, ExchangeFlavor::Deduplicating { cache_size: size as usize, ttl_ms, disk }))
            }
            consistent_hash::TYPE => {
                consistent_hash::parse_arguments(args).map_err(|e| BrokerError::precondition(e.to_string()))?;
                Ok((ExchangeKind::ConsistentHash, ExchangeFlavor::Plain))
            }
            other => Ok((ExchangeKind::parse(other)?, ExchangeFlavor::Plain)),
        }
    }
}

/// What became of a message published to an exchange, by its flavor's decision.
#[derive(Debug)]
pub enum Admit<R> {
    /// Routed now: what routing returned, and the ticket of the flavor's own record of the message (the
    /// confirm waits for it too).
    Routed(R, Option<SyncTicket>),
    /// Held back (a delayed message): counts as routed; the confirm waits for the ticket.
    Held(Option<SyncTicket>),
    /// Dropped (a duplicate): not routed, confirmed once the ticket (the record remembering it) is durable.
    Dropped(Option<SyncTicket>),
    /// Refused (nacked): the flavor could not record it.
    Refused {
        /// A delayed message that could not be stored (counts as routed and as refused by a store), rather
        /// than a deduplication value.
        held: bool,
    },
}

/// The state of an exchange's flavor, created with the exchange.
#[derive(Debug)]
pub struct FlavorState {
    state: State,
}

#[derive(Debug)]
enum State {
    Plain,
    Delayed(Arc<DelayedMessages>),
    Deduplicating { cache: DedupCache, cache_size: usize, ttl_ms: Option<u64> },
}

impl FlavorState {
    /// The state of a new exchange of `flavor` (nothing held, nothing remembered, no store yet).
    pub fn new(flavor: &ExchangeFlavor) -> Self {
        let state = match flavor {
            ExchangeFlavor::Plain => State::Plain,
            ExchangeFlavor::Delayed => State::Delayed(Arc::default()),
            ExchangeFlavor::Deduplicating { cache_size, ttl_ms, .. } => {
                State::Deduplicating { cache: DedupCache::default(), cache_size: *cache_size, ttl_ms: *ttl_ms }
            }
        };
        FlavorState { state }
    }

    /// Whether the exchange only routes (no delayed messages, no deduplication).
    #[inline]
    pub fn is_plain(&self) -> bool {
        matches!(self.state, State::Plain)
    }

    /// Decides what happens to a message published to `exchange`: routed now with `route` (a plain
    /// exchange, a delayed exchange's message without a positive `x-delay`, a new deduplication value),
    /// held, dropped or refused. The message moves straight into `route` (no copy on the publish path).
    #[inline]
    pub fn admit<R>(&self, exchange: &str, message: Message, route: impl FnOnce(Message) -> R) -> Admit<R> {
        match &self.state {
            State::Plain => Admit::Routed(route(message), None),
            State::Delayed(delayed) => match delayed::requested_delay(&message) {
                None => Admit::Routed(route(message), None),
                Some(delay) => match delayed.hold(message, delay) {
                    Ok(ticket) => Admit::Held(ticket),
                    Err(e) => {
                        tracing::warn!(exchange, error = %e, "cannot store a delayed message; refusing it");
                        Admit::Refused { held: true }
                    }
                },
            },
            State::Deduplicating { cache, cache_size, ttl_ms } => match cache.admit(&message, *cache_size, *ttl_ms) {
                Admission::New(ticket) => Admit::Routed(route(message), ticket),
                Admission::Duplicate(ticket) => Admit::Dropped(ticket),
                Admission::Refused => Admit::Refused { held: false },
            },
        }
    }

    /// Opens the store of a new durable exchange whose flavor keeps one (delayed-message; deduplicating
    /// with `x-cache-persistence: disk`) and loads what it holds. `generation` is the exchange's store
    /// generation and whether it is fresh (a new exchange, not recovered).
    pub fn attach(
        &self,
        durability: &Durability,
        vhost: &str,
        spec: &ExchangeSpec,
        generation: (u64, bool),
    ) -> StoreResult<()> {
        if !spec.durable {
            return Ok(());
        }
        match (&self.state, &spec.flavor) {
            (State::Delayed(delayed), _) => delayed.attach(durability, vhost, &spec.name, generation),
            (State::Deduplicating { cache, cache_size, .. }, ExchangeFlavor::Deduplicating { disk: true, .. }) => {
                cache.attach(durability, vhost, &spec.name, generation, *cache_size)
            }
            _ => Ok(()),
        }
    }

    /// Writes what the flavor buffers for its store (a delayed exchange's settles of released messages),
    /// so a clean stop does not release those messages again after the restart.
    pub fn flush(&self) {
        if let State::Delayed(delayed) = &self.state {
            delayed.flush_settles();
        }
    }

    /// The exchange was deleted: drops held messages and remembered values, deleting their store files
    /// (and ending a delayed exchange's release task).
    pub fn destroy(&self) {
        match &self.state {
            State::Plain => {}
            State::Delayed(delayed) => delayed.destroy(),
            State::Deduplicating { cache, .. } => cache.destroy(),
        }
    }

    /// A delayed exchange's held messages (its release task runs on them).
    pub fn delayed(&self) -> Option<&Arc<DelayedMessages>> {
        match &self.state {
            State::Delayed(delayed) => Some(delayed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::{AMQPValue, LongString};

    #[test]
    fn delayed_type_is_required_and_checked() {
        let mut args = FieldTable::default();
        assert!(ExchangeFlavor::parse(DELAYED_TYPE, &args).is_err());
        args.insert("x-delayed-type".into(), AMQPValue::LongString(LongString::from("nope")));
        assert!(ExchangeFlavor::parse(DELAYED_TYPE, &args).is_err());
        args.insert("x-delayed-type".into(), AMQPValue::LongString(LongString::from("topic")));
        assert_eq!(ExchangeFlavor::parse(DELAYED_TYPE, &args).unwrap(), (ExchangeKind::Topic, ExchangeFlavor::Delayed));
    }
}
