//! A message's stored form ([`StoredMessage`]) and back: the record the queue, paging and delayed stores
//! keep, with the property bytes kept verbatim when the broker has them.

use super::clock::wall_clock_ms;
use super::Message;
use crate::store::StoredMessage;
use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use tokio::time::Instant;

/// The stored form of a message (property bytes kept verbatim when the broker has them).
pub fn to_stored(id: u64, message: &Message, expires_at: Option<Instant>) -> StoredMessage {
    StoredMessage {
        id,
        exchange: message.exchange.to_string(),
        routing_key: message.routing_key.to_string(),
        properties: message.raw_properties.clone().unwrap_or_else(|| encode_properties(&message.properties)),
        body: message.body.clone(),
        expires_at_ms: expires_at.map(wall_clock_ms),
        delivery_count: 0,
    }
}

/// The message back from its stored form; None if its property bytes do not parse.
pub fn from_stored(stored: StoredMessage) -> Option<Message> {
    let properties = parse_properties(&stored.properties)?;
    Some(Message {
        exchange: stored.exchange.into(),
        routing_key: stored.routing_key.into(),
        properties,
        raw_properties: Some(stored.properties),
        body: stored.body,
    })
}

/// Encodes content-header property bytes (flags + list) for a message the broker changed.
pub(crate) fn encode_properties(properties: &BasicProperties) -> Bytes {
    match cookie_factory::gen_simple(amq_protocol::protocol::basic::gen_properties(properties), Vec::new()) {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) => {
            // Only a ShortString over 255 bytes can fail; such a property could not have been received.
            tracing::error!(error = %e, "cannot encode message properties; storing none");
            Bytes::from_static(&[0, 0])
        }
    }
}

/// Parses content-header property bytes; None if they do not parse completely.
pub(crate) fn parse_properties(bytes: &[u8]) -> Option<BasicProperties> {
    match amq_protocol::protocol::basic::parse_properties(bytes) {
        Ok((&[], p)) => Some(p),
        _ => None,
    }
}
