//! Content header frames, keeping the property bytes verbatim.
//!
//! A published message's properties are sent back on deliver exactly as they arrived:
//! re-encoding through amq-protocol sorts header tables (it stores them in a `BTreeMap`),
//! drops duplicate keys, and rewrites type tags ('U' becomes 's', 'L' becomes 'l'), so the
//! consumer would not see what the publisher sent. [`encode_properties`] is the re-encode
//! path for messages the broker changes (dead-lettering, x-delivery-count, …).

use amq_protocol::protocol::basic::{gen_properties, parse_properties};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{put_frame_header, FrameKind};
use super::nesting;
use super::writer::gen_into;
use super::FRAME_END;

/// class-id (2) + weight (2) + body-size (8), before the property flags.
const HEADER_FIXED_LEN: usize = 12;
/// The only content class in AMQP 0-9-1.
const BASIC_CLASS_ID: u16 = 60;

/// A parsed content header that keeps the property bytes verbatim (flags + property list) for re-sending unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    /// Content class; always 60 (basic) once parsed.
    pub class_id: u16,
    /// Total body size announced for the following body frames.
    pub body_size: u64,
    /// Decoded properties, for routing and inspection.
    pub properties: BasicProperties,
    /// Property flags and property list exactly as received (zero-copy slice of the payload).
    pub raw_properties: Bytes,
}

/// Why a content header payload could not be decoded.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than class-id + weight + body-size + property flags (14 bytes).
    #[error("content header shorter than 14 bytes")]
    Truncated,
    /// Not class 60 (basic); RabbitMQ answers 505 UNEXPECTED_FRAME for a class mismatch.
    #[error("content header for class {class_id}, expected 60 (basic)")]
    WrongClass {
        /// Class id found in the header.
        class_id: u16,
    },
    /// The property list does not decode (bad flags, lengths, UTF-8, nesting, trailing bytes); 502 SYNTAX_ERROR.
    #[error("malformed content header properties")]
    Malformed,
}

/// Parse a content header payload; never panics, whatever the bytes.
pub fn parse_content_header(payload: Bytes) -> Result<ContentHeader, HeaderError> {
    if payload.len() < HEADER_FIXED_LEN + 2 {
        return Err(HeaderError::Truncated);
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    if class_id != BASIC_CLASS_ID {
        return Err(HeaderError::WrongClass { class_id });
    }
    // Weight (bytes 2..4) must be 0 but is ignored, as amq-protocol and RabbitMQ do.
    let mut size = [0u8; 8];
    size.copy_from_slice(&payload[4..HEADER_FIXED_LEN]);
    let body_size = u64::from_be_bytes(size);
    let raw_properties = payload.slice(HEADER_FIXED_LEN..);
    // Bit 0 is the continuation flag and bit 1 is unused for basic's 14 properties;
    // amq-protocol ignores both, but forwarding them verbatim would confuse consumers.
    if raw_properties[1] & 0b11 != 0 {
        return Err(HeaderError::Malformed);
    }
    nesting::check_properties(&raw_properties).map_err(|_| HeaderError::Malformed)?;
    match parse_properties(&raw_properties[..]) {
        Ok((rest, properties)) if rest.is_empty() => Ok(ContentHeader {
            class_id,
            body_size,
            properties,
            raw_properties,
        }),
        _ => Err(HeaderError::Malformed),
    }
}

/// Re-encode path (e.g. a broker-modified message): properties -> raw property bytes.
///
/// `AMQPValue::ShortString` in the headers is written as a long string: amq-protocol
/// would tag it `'_'`, which no peer (amq-protocol included) can read back.
pub fn encode_properties(props: &BasicProperties) -> Bytes {
    let fixed;
    let props = match props.headers() {
        Some(h) if table_has_short_string(h) => {
            fixed = props.clone().with_headers(fix_table(h));
            &fixed
        }
        _ => props,
    };
    let mut out = BytesMut::with_capacity(64);
    if let Err(e) = gen_into!(&mut out, gen_properties(props)) {
        // Unreachable with a growable buffer and valid ShortStrings.
        tracing::error!(error = %e, "could not serialise basic properties");
        debug_assert!(false, "could not serialise properties: {e}");
        // Flags 0: no properties, still a valid header.
        out.clear();
        out.put_u16(0);
    }
    out.freeze()
}

fn value_has_short_string(v: &AMQPValue) -> bool {
    match v {
        AMQPValue::ShortString(_) => true,
        AMQPValue::FieldTable(t) => table_has_short_string(t),
        AMQPValue::FieldArray(a) => a.as_slice().iter().any(value_has_short_string),
        _ => false,
    }
}

fn table_has_short_string(t: &FieldTable) -> bool {
    t.inner().values().any(value_has_short_string)
}

fn fix_value(v: &AMQPValue) -> AMQPValue {
    match v {
        AMQPValue::ShortString(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        AMQPValue::FieldTable(t) => AMQPValue::FieldTable(fix_table(t)),
        AMQPValue::FieldArray(a) => {
            let mut out = FieldArray::default();
            for v in a.as_slice() {
                out.push(fix_value(v));
            }
            AMQPValue::FieldArray(out)
        }
        other => other.clone(),
    }
}

fn fix_table(t: &FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in t {
        out.insert(k.clone(), fix_value(v));
    }
    out
}

/// Append a content header frame using raw property bytes.
pub fn write_content_header(
    out: &mut BytesMut,
    channel: u16,
    class_id: u16,
    body_size: u64,
    raw_properties: &[u8],
) {
    let size = (HEADER_FIXED_LEN + raw_properties.len()) as u32;
    out.reserve(size as usize + 8);
    put_frame_header(out, FrameKind::Header, channel, size);
    out.put_u16(class_id);
    out.put_u16(0); // weight
    out.put_u64(body_size);
    out.extend_from_slice(raw_properties);
    out.put_u8(FRAME_END);
}
