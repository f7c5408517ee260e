//! AMQP 0-9-1 wire codec: frame splitting, method and content-header (de)serialisation, SASL.
//!
//! `amq-protocol` (the codec under lapin) does the per-method work, but it breaks its API
//! often, so it is pinned and hidden here: the rest of Mailroom sees only this module.
//! What we add on top of it, and why:
//! - our own frame splitter over `BytesMut` ([`split_frame`]): the size field is checked
//!   against `frame_max` before a single payload byte is buffered, and bodies stay zero-copy
//!   `Bytes` (amq-protocol's `parse_frame` copies bodies byte by byte and trusts the size);
//! - content headers keep their property bytes verbatim ([`ContentHeader::raw_properties`]),
//!   because re-encoding reorders field tables and rewrites some type tags;
//! - a nesting guard in front of every field-table parse: amq-protocol's table parser is
//!   recursive, so a 30 KiB frame of nested tables would overflow a tokio worker's stack
//!   (an abort, not a catchable panic);
//! - a writer that serialises straight into the outgoing `BytesMut` (no temporary `Vec`s).

// The connection code is written against this API: keep every item documented.
#![warn(missing_docs)]

mod frame;
mod header;
mod hot;
pub mod ids;
mod method;
mod nesting;
mod sasl;
mod writer;

#[cfg(test)]
mod proptests;

pub use amq_protocol::protocol::BasicProperties;
pub use amq_protocol::protocol::{
    access, basic, channel, confirm, connection, exchange, queue, tx, AMQPClass as Method,
};
pub use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
// Beyond the contract: needed to build the `AMQPValue::ByteArray` and `DecimalValue` variants.
pub use amq_protocol::types::{ByteArray, DecimalValue};

pub use frame::{
    peek_frame, split_frame, take_frame, write_body, write_body_shared, write_heartbeat, FrameError, FrameHead,
    FrameKind, RawFrame, SHARED_BODY_MIN,
};
pub use header::{encode_properties, parse_content_header, write_content_header, ContentHeader, HeaderError};
pub use hot::{parse_basic_ack, parse_basic_publish, parse_basic_qos_prefetch_size, write_basic_deliver, PublishRef};
pub use ids::MethodId;
pub use method::{parse_method, write_method, MethodError};
pub use nesting::MAX_FIELD_NESTING;
pub use sasl::{parse_sasl_response, Credentials};

/// Marks the end of every frame; anything else there means the stream is out of sync.
pub const FRAME_END: u8 = 0xCE;
/// Frame header: type (1) + channel (2) + payload size (4).
pub const FRAME_HEADER_LEN: usize = 7;
/// Frame overhead: 7-byte header + frame-end octet.
pub const FRAME_OVERHEAD: u32 = 8;
/// The spec's minimum frame_max; also the limit before tuning.
pub const FRAME_MIN_SIZE: u32 = 4096;
/// What a client sends first; the only protocol version Mailroom speaks.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// A string we built was too long for an AMQP short string (255 bytes max).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("short string is {len} bytes, the limit is 255")]
pub struct ShortStringTooLong {
    /// Length in bytes of the rejected string.
    pub len: usize,
}

/// Fallible short-string constructor for strings we build (dead-letter keys, reply-to names…): Err if > 255 bytes.
///
/// `ShortString::from` panics past 255 bytes, and an unchecked length byte would corrupt the
/// frame, so every broker-built short string goes through here.
pub fn short_string(s: &str) -> Result<ShortString, ShortStringTooLong> {
    ShortString::try_new(s).map_err(|_| ShortStringTooLong { len: s.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_string_limits() {
        assert_eq!(short_string(&"a".repeat(255)).unwrap().as_str().len(), 255);
        assert_eq!(short_string(&"a".repeat(256)), Err(ShortStringTooLong { len: 256 }));
        // 128 two-byte characters: 256 bytes, although only 128 chars.
        assert!(short_string(&"é".repeat(128)).is_err());
        assert!(short_string("").is_ok());
    }

    #[test]
    fn protocol_header_constant() {
        assert_eq!(PROTOCOL_HEADER, b"AMQP\0\0\x09\x01");
        assert_eq!(FRAME_OVERHEAD as usize, FRAME_HEADER_LEN + 1);
    }
}
