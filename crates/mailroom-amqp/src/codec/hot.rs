//! Hand-written encoders and decoders for the per-message methods (`basic.deliver`, `basic.publish`,
//! `basic.ack`). amq-protocol builds a map of flag names (`String`s) for every method it reads or
//! writes; on the publish/deliver/ack path that was the largest allocation cost, so these bypass it.
//! Each is tested to produce or accept exactly what the generic codec does.

use bytes::{BufMut, BytesMut};

use super::frame::{put_frame_header, FrameKind};
use super::ids::{BASIC_ACK, BASIC_DELIVER, BASIC_PUBLISH, BASIC_QOS};

/// The first payload bytes of the methods read here, computed at compile time.
const PUBLISH_PREFIX: [u8; 4] = BASIC_PUBLISH.prefix();
const ACK_PREFIX: [u8; 4] = BASIC_ACK.prefix();
const QOS_PREFIX: [u8; 4] = BASIC_QOS.prefix();
use super::{FRAME_END, FRAME_HEADER_LEN};

/// Appends a `basic.deliver` method frame. Strings must be at most 255 bytes (callers pass short strings).
pub fn write_basic_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    debug_assert!(consumer_tag.len() <= 255 && exchange.len() <= 255 && routing_key.len() <= 255);
    let size = 4 + 1 + consumer_tag.len() + 8 + 1 + 1 + exchange.len() + 1 + routing_key.len();
    out.reserve(FRAME_HEADER_LEN + size + 1);
    put_frame_header(out, FrameKind::Method, channel, size as u32);
    out.put_u16(BASIC_DELIVER.class);
    out.put_u16(BASIC_DELIVER.method);
    put_short_str(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(redelivered as u8);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u8(FRAME_END);
}

fn put_short_str(out: &mut BytesMut, s: &str) {
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

/// A `basic.publish` read without allocating: the strings borrow the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRef<'a> {
    /// Target exchange.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Return the message if unroutable.
    pub mandatory: bool,
    /// Unsupported by RabbitMQ (540).
    pub immediate: bool,
}

/// Reads a `basic.publish` payload (class and method ids included); None if it is not one or is malformed
/// (the caller then falls back to the generic parser, which reports the error).
pub fn parse_basic_publish(payload: &[u8]) -> Option<PublishRef<'_>> {
    let rest = payload.strip_prefix(&PUBLISH_PREFIX)?;
    // reserved-1 (ticket, short)
    let rest = rest.get(2..)?;
    let (exchange, rest) = short_str(rest)?;
    let (routing_key, rest) = short_str(rest)?;
    let (&bits, rest) = rest.split_first()?;
    if !rest.is_empty() {
        return None;
    }
    Some(PublishRef { exchange, routing_key, mandatory: bits & 1 != 0, immediate: bits & 2 != 0 })
}

/// Reads a `basic.ack` payload into (delivery tag, multiple); None if it is not one.
pub fn parse_basic_ack(payload: &[u8]) -> Option<(u64, bool)> {
    let rest = payload.strip_prefix(&ACK_PREFIX)?;
    if rest.len() != 9 {
        return None;
    }
    let tag = u64::from_be_bytes(rest[..8].try_into().ok()?);
    Some((tag, rest[8] & 1 != 0))
}

/// Reads the `prefetch_size` of a `basic.qos` payload, which the generic codec does not keep (RabbitMQ refuses
/// non-zero values); None if it is not a `basic.qos` with at least that field.
pub fn parse_basic_qos_prefetch_size(payload: &[u8]) -> Option<u32> {
    let rest = payload.strip_prefix(&QOS_PREFIX)?;
    Some(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?))
}

fn short_str(input: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = input.split_first()?;
    let len = len as usize;
    let bytes = rest.get(..len)?;
    // Names are nearly always ASCII, which `is_ascii` checks a word at a time; `from_utf8` goes byte by byte on
    // short input (~180 instructions for a publish's two names).
    let s = if bytes.is_ascii() {
        // SAFETY: every byte is below 0x80, and ASCII is valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    } else {
        std::str::from_utf8(bytes).ok()?
    };
    Some((s, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{basic, parse_method, short_string, split_frame, write_method, Method};

    #[test]
    fn deliver_matches_the_generic_encoder() {
        for redelivered in [false, true] {
            let mut fast = BytesMut::new();
            write_basic_deliver(&mut fast, 7, "ctag", 123_456_789, redelivered, "ex", "a.b.c");
            let mut slow = BytesMut::new();
            let m = Method::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: short_string("ctag").unwrap(),
                delivery_tag: 123_456_789,
                redelivered,
                exchange: short_string("ex").unwrap(),
                routing_key: short_string("a.b.c").unwrap(),
            }));
            write_method(&mut slow, 7, &m);
            assert_eq!(fast, slow);
        }
    }

    fn payload_of(m: &Method) -> bytes::Bytes {
        let mut buf = BytesMut::new();
        write_method(&mut buf, 1, m);
        split_frame(&mut buf, 1 << 20).unwrap().unwrap().payload
    }

    #[test]
    fn publish_and_ack_match_the_generic_parser() {
        for (mandatory, immediate) in [(false, false), (true, false), (false, true), (true, true)] {
            let m = Method::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: short_string("amq.topic").unwrap(),
                routing_key: short_string("k.é").unwrap(),
                mandatory,
                immediate,
            }));
            let p = payload_of(&m);
            let fast = parse_basic_publish(&p).unwrap();
            assert_eq!(fast, PublishRef { exchange: "amq.topic", routing_key: "k.é", mandatory, immediate });
            assert_eq!(parse_method(&p).unwrap(), m);
        }
        for multiple in [false, true] {
            let m = Method::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 42, multiple }));
            assert_eq!(parse_basic_ack(&payload_of(&m)), Some((42, multiple)));
        }
    }

    #[test]
    fn malformed_input_falls_back() {
        assert_eq!(parse_basic_publish(&[0, 60, 0, 40, 0]), None);
        assert_eq!(parse_basic_publish(&[0, 60, 0, 40, 0, 0, 5, b'a']), None);
        assert_eq!(parse_basic_publish(&[0, 60, 0, 40, 0, 0, 1, 0xff, 0, 0]), None, "invalid UTF-8");
        let long_invalid = [&[0, 60, 0, 40, 0, 0, 12][..], b"abcdefghij\xc3(", &[0, 0]].concat();
        assert_eq!(parse_basic_publish(&long_invalid), None, "invalid UTF-8 after ASCII");
        assert_eq!(parse_basic_ack(&[0, 60, 0, 80, 0]), None);
        assert_eq!(parse_basic_ack(&[0, 60, 0, 81, 0, 0, 0, 0, 0, 0, 0, 1, 0]), None);
    }

    #[test]
    fn qos_prefetch_size() {
        let m = Method::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: 7, global: true }));
        assert_eq!(parse_basic_qos_prefetch_size(&payload_of(&m)), Some(0));
        assert_eq!(parse_basic_qos_prefetch_size(&[0, 60, 0, 10, 0, 0, 1, 0, 0, 7, 1]), Some(256));
        assert_eq!(parse_basic_qos_prefetch_size(&[0, 60, 0, 10, 0, 0]), None);
        assert_eq!(parse_basic_qos_prefetch_size(&[0, 60, 0, 11, 0, 0, 0, 1]), None);
    }
}
