//! Messages as the broker carries them: properties, body, and where they were published.

use amq_protocol::protocol::BasicProperties;
use amq_protocol_types::{AMQPValue, FieldTable};
use bytes::Bytes;
use std::sync::Arc;

/// A published message. Shared (`Arc`) between every queue it was routed to; never copied.
#[derive(Debug, Clone)]
pub struct Message {
    /// The exchange it was published to (what `basic.deliver` reports).
    pub exchange: Arc<str>,
    /// The routing key it was published with.
    pub routing_key: Arc<str>,
    /// Parsed properties: what routing and queue features read.
    pub properties: BasicProperties,
    /// The property bytes exactly as the publisher sent them, re-sent verbatim on delivery
    /// (re-encoding would reorder field tables). `None` once the broker changed the properties.
    pub raw_properties: Option<Bytes>,
    /// The body, carried without copies from socket to queue to socket.
    pub body: Bytes,
}

impl Message {
    /// A message with the given properties and body, as an in-process publisher builds it.
    pub fn new(exchange: &str, routing_key: &str, properties: BasicProperties, body: Bytes) -> Self {
        Self { exchange: exchange.into(), routing_key: routing_key.into(), properties, raw_properties: None, body }
    }

    /// Whether the publisher asked for the message to be persisted (`delivery_mode = 2`).
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }

    /// The per-message TTL in milliseconds, if the `expiration` property holds a valid one.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.properties.expiration().as_ref().and_then(|e| parse_expiration(e.as_str()).ok())
    }

    /// The message's headers table, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }
}

/// Parses an `expiration` property: a non-negative decimal integer of milliseconds, as RabbitMQ requires.
pub fn parse_expiration(text: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid expiration '{text}'"));
    }
    text.parse::<u64>().map_err(|_| format!("invalid expiration '{text}'"))
}

/// Reads the routing keys of a `CC` or `BCC` header: an array of strings (non-string items ignored).
pub fn header_routing_keys(headers: Option<&FieldTable>, name: &str) -> Vec<String> {
    let Some(value) = headers.and_then(|h| h.inner().get(name)) else {
        return Vec::new();
    };
    match value {
        AMQPValue::FieldArray(items) => items
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            })
            .collect(),
        // RabbitMQ accepts only arrays; a lone string is ignored, as there.
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_must_be_digits() {
        assert_eq!(parse_expiration("1000"), Ok(1000));
        assert_eq!(parse_expiration("0"), Ok(0));
        assert!(parse_expiration("").is_err());
        assert!(parse_expiration("-1").is_err());
        assert!(parse_expiration("abc").is_err());
        assert!(parse_expiration("1.5").is_err());
    }
}
