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
const BASIC_CLASS_ID: u16 = super::ids::class::BASIC;

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
        Ok(([], properties)) => Ok(ContentHeader { class_id, body_size, properties, raw_properties }),
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
pub fn write_content_header(out: &mut BytesMut, channel: u16, class_id: u16, body_size: u64, raw_properties: &[u8]) {
    let size = (HEADER_FIXED_LEN + raw_properties.len()) as u32;
    out.reserve(size as usize + 8);
    put_frame_header(out, FrameKind::Header, channel, size);
    out.put_u16(class_id);
    out.put_u16(0); // weight
    out.put_u64(body_size);
    out.extend_from_slice(raw_properties);
    out.put_u8(FRAME_END);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::nesting::tests::nested_tables;
    use crate::codec::{
        short_string, split_frame, ByteArray, DecimalValue, FrameKind, ShortString, FRAME_MIN_SIZE, MAX_FIELD_NESTING,
    };

    fn ss(s: &str) -> ShortString {
        short_string(s).unwrap()
    }

    /// A table holding every field type amq-protocol can write and read back.
    fn every_type() -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(ss("bool"), AMQPValue::Boolean(true));
        t.insert(ss("i8"), AMQPValue::ShortShortInt(-8));
        t.insert(ss("u8"), AMQPValue::ShortShortUInt(200));
        t.insert(ss("i16"), AMQPValue::ShortInt(-16_000));
        t.insert(ss("u16"), AMQPValue::ShortUInt(60_000));
        t.insert(ss("i32"), AMQPValue::LongInt(-2_000_000_000));
        t.insert(ss("u32"), AMQPValue::LongUInt(4_000_000_000));
        t.insert(ss("i64"), AMQPValue::LongLongInt(i64::MIN));
        t.insert(ss("f32"), AMQPValue::Float(1.5));
        t.insert(ss("f64"), AMQPValue::Double(-2.25e300));
        t.insert(ss("dec"), AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 12_345 }));
        t.insert(ss("str"), AMQPValue::LongString(LongString::from(&b"bin\0ary \xff"[..])));
        t.insert(ss("ts"), AMQPValue::Timestamp(1_700_000_000));
        t.insert(ss("bytes"), AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 255])));
        t.insert(ss("void"), AMQPValue::Void);
        t
    }

    fn all_properties() -> BasicProperties {
        let mut death = every_type();
        let mut keys = FieldArray::default();
        keys.push(AMQPValue::LongString(LongString::from("rk")));
        keys.push(AMQPValue::FieldArray(FieldArray::default()));
        keys.push(AMQPValue::FieldTable(every_type()));
        death.insert(ss("routing-keys"), AMQPValue::FieldArray(keys));
        let mut deaths = FieldArray::default();
        deaths.push(AMQPValue::FieldTable(death));
        let mut headers = every_type();
        headers.insert(ss("x-death"), AMQPValue::FieldArray(deaths));
        headers.insert(ss("empty"), AMQPValue::FieldTable(FieldTable::default()));
        BasicProperties::default()
            .with_content_type(ss("application/json"))
            .with_content_encoding(ss("gzip"))
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(9)
            .with_correlation_id(ss("corr"))
            .with_reply_to(ss("amq.rabbitmq.reply-to.g1h2AA"))
            .with_expiration(ss("60000"))
            .with_message_id(ss("id-1"))
            .with_timestamp(1_700_000_000)
            .with_type(ss("order.created"))
            .with_user_id(ss("guest"))
            .with_app_id(ss("mailroom"))
            .with_cluster_id(ss("c"))
    }

    fn header_payload(class_id: u16, body_size: u64, raw: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        write_content_header(&mut out, 5, class_id, body_size, raw);
        let f = split_frame(&mut out, FRAME_MIN_SIZE).unwrap().unwrap();
        assert_eq!((f.kind, f.channel), (FrameKind::Header, 5));
        f.payload
    }

    #[test]
    fn all_properties_round_trip() {
        let props = all_properties();
        assert_eq!(props.bitmask(), 0xFFFC, "all 14 flags set");
        let raw = encode_properties(&props);
        let h = parse_content_header(header_payload(60, 1234, &raw)).unwrap();
        assert_eq!(h.class_id, 60);
        assert_eq!(h.body_size, 1234);
        assert_eq!(h.properties, props);
        assert_eq!(h.raw_properties, raw);
    }

    #[test]
    fn no_properties() {
        let raw = encode_properties(&BasicProperties::default());
        assert_eq!(&raw[..], &[0, 0]);
        let h = parse_content_header(header_payload(60, 0, &raw)).unwrap();
        assert_eq!(h.properties, BasicProperties::default());
    }

    /// Properties as a client might send them: keys unsorted, RabbitMQ's 'U'/'L' tags.
    fn client_raw_properties() -> Vec<u8> {
        let mut table = Vec::new();
        for (key, tag, value) in [
            ("zz", b'U', &[0x00u8, 0x07][..]),
            ("aa", b'L', &[0, 0, 0, 0, 0, 0, 0, 9][..]),
            ("mm", b'S', &[0, 0, 0, 2, b'h', b'i'][..]),
        ] {
            table.push(key.len() as u8);
            table.extend_from_slice(key.as_bytes());
            table.push(tag);
            table.extend_from_slice(value);
        }
        let mut raw = vec![0b1010_0000, 0]; // content-type + headers
        raw.push(4);
        raw.extend_from_slice(b"text");
        raw.extend_from_slice(&(table.len() as u32).to_be_bytes());
        raw.extend_from_slice(&table);
        raw
    }

    #[test]
    fn raw_bytes_are_kept_verbatim() {
        let raw = client_raw_properties();
        let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 42];
        payload.extend_from_slice(&raw);
        let payload = Bytes::from(payload);
        let h = parse_content_header(payload.clone()).unwrap();
        assert_eq!(&h.raw_properties[..], &raw[..]);
        assert_eq!(h.body_size, 42);
        assert_eq!(h.properties.content_type().as_ref().map(ShortString::as_str), Some("text"));
        let headers = h.properties.headers().as_ref().unwrap();
        assert_eq!(headers.inner().get("zz"), Some(&AMQPValue::ShortInt(7)));
        assert_eq!(headers.inner().get("aa"), Some(&AMQPValue::LongLongInt(9)));
        // Zero-copy: raw_properties points into the payload.
        assert_eq!(h.raw_properties.as_ptr(), payload[12..].as_ptr());
        // Re-encoding is NOT byte-identical (sorted keys, 's'/'l' tags): why raw bytes are kept.
        assert_ne!(&encode_properties(&h.properties)[..], &raw[..]);
        // Writing the header back from raw bytes reproduces the original payload exactly.
        let again = header_payload(60, 42, &h.raw_properties);
        assert_eq!(again, payload);
    }

    #[test]
    fn errors() {
        assert_eq!(parse_content_header(Bytes::new()), Err(HeaderError::Truncated));
        assert_eq!(
            parse_content_header(Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
            Err(HeaderError::Truncated)
        );
        assert_eq!(
            parse_content_header(Bytes::from_static(&[0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
            Err(HeaderError::WrongClass { class_id: 20 })
        );
        // Continuation flag set.
        assert_eq!(
            parse_content_header(Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])),
            Err(HeaderError::Malformed)
        );
        // content-type flagged but missing.
        assert_eq!(
            parse_content_header(Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0])),
            Err(HeaderError::Malformed)
        );
        // Invalid UTF-8 in content-type.
        assert_eq!(
            parse_content_header(Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 1, 0xff])),
            Err(HeaderError::Malformed)
        );
        // Trailing bytes after the property list.
        assert_eq!(
            parse_content_header(Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7])),
            Err(HeaderError::Malformed)
        );
    }

    #[test]
    fn deeply_nested_headers_are_rejected() {
        let fixed = [0u8, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for (levels, ok) in [(MAX_FIELD_NESTING, true), (MAX_FIELD_NESTING + 1, false), (20_000, false)] {
            let mut p = fixed.to_vec();
            p.extend_from_slice(&[0xE0, 0, 1, b'a', 0]); // content-type "a", content-encoding "", headers
            p.extend(nested_tables(levels));
            assert_eq!(parse_content_header(Bytes::from(p)).is_ok(), ok, "{levels} levels");
        }
    }

    #[test]
    fn short_string_header_values_are_written_as_long_strings() {
        let mut inner = FieldTable::default();
        inner.insert(ss("s"), AMQPValue::ShortString(ss("deep")));
        let mut arr = FieldArray::default();
        arr.push(AMQPValue::ShortString(ss("in-array")));
        let mut headers = FieldTable::default();
        headers.insert(ss("s"), AMQPValue::ShortString(ss("top")));
        headers.insert(ss("t"), AMQPValue::FieldTable(inner));
        headers.insert(ss("a"), AMQPValue::FieldArray(arr));
        let props = BasicProperties::default().with_headers(headers);
        let raw = encode_properties(&props);
        let h = parse_content_header(header_payload(60, 0, &raw)).unwrap();
        let got = h.properties.headers().as_ref().unwrap().inner();
        assert_eq!(got.get("s"), Some(&AMQPValue::LongString(LongString::from("top"))));
        let AMQPValue::FieldTable(t) = &got["t"] else { panic!() };
        assert_eq!(t.inner().get("s"), Some(&AMQPValue::LongString(LongString::from("deep"))));
        let AMQPValue::FieldArray(a) = &got["a"] else { panic!() };
        assert_eq!(a.as_slice(), &[AMQPValue::LongString(LongString::from("in-array"))]);
    }
}
