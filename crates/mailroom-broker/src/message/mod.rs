//! Messages as the broker carries them: properties, body, and where they were published; with the
//! header conventions read from them ([`headers`]), their stored form ([`codec`]) and the conversion of
//! their deadlines to and from the wall clock ([`clock`]).

pub mod clock;
pub mod codec;
pub mod headers;

pub use headers::{header_routing_keys, parse_expiration};

use amq_protocol::protocol::BasicProperties;
use amq_protocol_types::FieldTable;
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

/// `a == b`, without calling `memcmp` for two empty strings (the default exchange's name). An empty `String`
/// points at a dangling address, and glibc's AVX-512 `memcmp` does a masked load from it even for zero bytes:
/// the CPU's fault-suppression assist then costs hundreds of cycles (perf showed 11% of a publishing
/// broker's time in such compares of "").
#[inline(always)]
pub fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

#[cfg(test)]
mod tests {
    use super::same_name;

    #[test]
    fn same_name_is_string_equality() {
        let empty = String::new();
        for (a, b) in [("", ""), ("", "a"), ("a", ""), ("ab", "ab"), ("ab", "ac"), ("ab", "abc"), (&*empty, "")] {
            assert_eq!(same_name(a, b), a == b, "{a:?} {b:?}");
        }
    }
}
