//! What RabbitMQ needs plugins for, built in: the delayed-message exchange (`x-delayed-message`, as
//! rabbitmq-delayed-message-exchange), the deduplicating exchange (`x-message-deduplication`, as
//! rabbitmq-message-deduplication) and the consistent-hash exchange (`x-consistent-hash`, as
//! rabbitmq_consistent_hash_exchange; routing in [`crate::routing::consistent_hash`]). This module parses their declarations and headers; the held messages
//! live in [`crate::delayed`] and the deduplication cache in [`crate::dedup`], each with its own store
//! under the data dir when the exchange is durable (see [`ExchangeExtras::attach`]).

use crate::args::{int_value, string_value};
use crate::error::{BrokerError, Result};
use crate::exchange::{ExchangeKind, ExchangeSpec};
use crate::message::Message;
use crate::storage::Durability;
use crate::store::{StoreConfig, StoreResult};
use amq_protocol_types::{AMQPValue, FieldTable};
use std::sync::Arc;

pub use crate::dedup::{Admission, DedupCache};
pub use crate::delayed::DelayedMessages;

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
            crate::routing::consistent_hash::TYPE => {
                crate::routing::consistent_hash::parse_arguments(args)
                    .map_err(|e| BrokerError::precondition(e.to_string()))?;
                Ok((ExchangeKind::ConsistentHash, ExchangeFlavor::Plain))
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
    // Encoded once here: the queue's store and every delivery then reuse these bytes.
    message.raw_properties = Some(crate::message::codec::encode_properties(&message.properties));
    message
}

/// The services only some exchanges have, created with the exchange.
#[derive(Debug, Default)]
pub struct ExchangeExtras {
    /// Held-back messages (delayed exchanges).
    pub delayed: Arc<DelayedMessages>,
    /// Recently seen values (deduplicating exchanges).
    pub dedup: DedupCache,
}

impl ExchangeExtras {
    /// Opens the stores of a new durable exchange that needs one (delayed-message; deduplicating with
    /// `x-cache-persistence: disk`) and loads what they hold. `generation` is the exchange's store
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
        match spec.flavor {
            ExchangeFlavor::Delayed => {
                let store = durability.open_exchange_store(
                    "delayed",
                    vhost,
                    &spec.name,
                    generation,
                    StoreConfig::default(),
                    |r| self.delayed.recover(&r),
                )?;
                self.delayed.attach_store(store);
                if !self.delayed.is_empty() {
                    tracing::info!(exchange = %spec.name, messages = self.delayed.len(), "recovered delayed messages");
                }
            }
            ExchangeFlavor::Deduplicating { cache_size, disk: true, .. } => {
                let store = durability.open_exchange_store(
                    "dedup",
                    vhost,
                    &spec.name,
                    generation,
                    crate::dedup::store_config(),
                    |r| self.dedup.recover(&r),
                )?;
                self.dedup.attach_store(store, cache_size);
            }
            _ => {}
        }
        Ok(())
    }

    /// The exchange was deleted: drops held messages and remembered values, deleting their store files.
    pub fn destroy(&self) {
        self.delayed.destroy();
        self.dedup.destroy();
    }
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
        let raw = released.raw_properties.clone().expect("encoded once at release");
        let reparsed =
            crate::message::codec::from_stored(crate::store::StoredMessage { properties: raw, ..Default::default() });
        assert_eq!(reparsed.unwrap().properties, released.properties, "raw bytes match the properties");
    }
}
