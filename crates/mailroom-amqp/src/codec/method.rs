//! Method frames: parse a method payload, write a full method frame.

use amq_protocol::protocol::{gen_class, parse_class, AMQPClass};
use bytes::{BufMut, BytesMut};

use super::frame::{put_frame_header, FrameKind};
use super::ids::class;
use super::nesting;
use super::writer::gen_into;
use super::{FRAME_END, FRAME_HEADER_LEN};

/// Why a method payload could not be turned into a [`super::Method`].
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodError {
    /// Fewer than 4 bytes: not even a class and method id.
    #[error("method payload shorter than class and method id")]
    Truncated,
    /// A class/method pair AMQP 0-9-1 does not define; the caller answers 503/540 as RabbitMQ does.
    #[error("unknown method {class_id}.{method_id}")]
    Unknown {
        /// Class id from the payload.
        class_id: u16,
        /// Method id from the payload.
        method_id: u16,
    },
    /// A known method whose arguments do not decode; the caller answers 502 SYNTAX_ERROR.
    #[error("malformed arguments for method {class_id}.{method_id}")]
    Malformed {
        /// Class id from the payload.
        class_id: u16,
        /// Method id from the payload.
        method_id: u16,
    },
}

/// Every (class, method) amq-protocol knows, so an unknown id is told apart from bad arguments.
fn is_known(class_id: u16, method_id: u16) -> bool {
    match class_id {
        class::CONNECTION => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51 | 60 | 61 | 70 | 71),
        class::CHANNEL => matches!(method_id, 10 | 11 | 20 | 21 | 40 | 41),
        class::ACCESS => matches!(method_id, 10 | 11),
        class::EXCHANGE => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 51),
        class::QUEUE => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51),
        class::BASIC => matches!(
            method_id,
            10 | 11 | 20 | 21 | 30 | 31 | 40 | 50 | 60 | 70 | 71 | 72 | 80 | 90 | 100 | 110 | 111 | 120
        ),
        class::CONFIRM => matches!(method_id, 10 | 11),
        class::TX => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31),
        _ => false,
    }
}

/// Parse a method frame payload; never panics, whatever the bytes.
///
/// Trailing bytes after the last argument are `Malformed`, as in amq-protocol's own frame
/// parser and RabbitMQ's exact-match decoder.
pub fn parse_method(payload: &[u8]) -> Result<AMQPClass, MethodError> {
    if payload.len() < 4 {
        return Err(MethodError::Truncated);
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    if !is_known(class_id, method_id) {
        return Err(MethodError::Unknown { class_id, method_id });
    }
    let malformed = MethodError::Malformed { class_id, method_id };
    nesting::check_method(class_id, method_id, &payload[4..]).map_err(|_| malformed)?;
    match parse_class(payload) {
        Ok(([], method)) => Ok(method),
        // Trailing bytes, or nom's Incomplete/Error/Failure.
        _ => Err(malformed),
    }
}

/// Append a full method frame.
///
/// Field-table values must not use `AMQPValue::ShortString`: amq-protocol writes it with a
/// type tag of `'_'` that no peer can read; build strings as `LongString`.
pub fn write_method(out: &mut BytesMut, channel: u16, method: &AMQPClass) {
    let start = out.len();
    // Size patched below, once the arguments are written.
    put_frame_header(out, FrameKind::Method, channel, 0);
    match gen_into!(out, gen_class(method)) {
        Ok(()) => {
            let size = (out.len() - start - FRAME_HEADER_LEN) as u32;
            out[start + 3..start + FRAME_HEADER_LEN].copy_from_slice(&size.to_be_bytes());
            out.put_u8(FRAME_END);
        }
        Err(e) => {
            // Unreachable with a growable buffer and valid ShortStrings; dropping the frame
            // keeps the stream in sync, the error names the bug.
            out.truncate(start);
            tracing::error!(error = %e, ?method, "could not serialise method");
            debug_assert!(false, "could not serialise {method:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::nesting::tests::nested_tables;
    use crate::codec::{
        access, basic, channel, confirm, connection, exchange, queue, split_frame, tx, AMQPValue, FieldArray,
        FieldTable, FrameKind, LongString, Method, FRAME_MIN_SIZE, MAX_FIELD_NESTING,
    };

    fn ss(s: &str) -> crate::codec::ShortString {
        crate::codec::short_string(s).unwrap()
    }

    fn args() -> FieldTable {
        let mut inner = FieldTable::default();
        inner.insert(ss("n"), AMQPValue::LongLongInt(-5));
        let mut array = FieldArray::default();
        array.push(AMQPValue::LongString(LongString::from("a")));
        array.push(AMQPValue::FieldTable(inner.clone()));
        let mut t = FieldTable::default();
        t.insert(ss("x-message-ttl"), AMQPValue::LongInt(60_000));
        t.insert(ss("x-dead-letter-exchange"), AMQPValue::LongString(LongString::from("dlx")));
        t.insert(ss("x-single-active-consumer"), AMQPValue::Boolean(true));
        t.insert(ss("list"), AMQPValue::FieldArray(array));
        t.insert(ss("nested"), AMQPValue::FieldTable(inner));
        t
    }

    fn all_methods() -> Vec<Method> {
        use Method as M;
        let t = args;
        vec![
            M::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: t(),
                mechanisms: LongString::from("PLAIN AMQPLAIN"),
                locales: LongString::from("en_US"),
            })),
            M::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: t(),
                mechanism: ss("PLAIN"),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: ss("en_US"),
            })),
            M::Connection(connection::AMQPMethod::Secure(connection::Secure { challenge: LongString::from("c") })),
            M::Connection(connection::AMQPMethod::SecureOk(connection::SecureOk { response: LongString::from("r") })),
            M::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 60,
            })),
            M::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 60,
            })),
            M::Connection(connection::AMQPMethod::Open(connection::Open { virtual_host: ss("/") })),
            M::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
            M::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 320,
                reply_text: ss("CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"),
                class_id: 0,
                method_id: 0,
            })),
            M::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            M::Connection(connection::AMQPMethod::Blocked(connection::Blocked { reason: ss("low on memory") })),
            M::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
            M::Connection(connection::AMQPMethod::UpdateSecret(connection::UpdateSecret {
                new_secret: LongString::from("token"),
                reason: ss("refresh"),
            })),
            M::Connection(connection::AMQPMethod::UpdateSecretOk(connection::UpdateSecretOk {})),
            M::Channel(channel::AMQPMethod::Open(channel::Open {})),
            M::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            M::Channel(channel::AMQPMethod::Flow(channel::Flow { active: false })),
            M::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk { active: true })),
            M::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 404,
                reply_text: ss("NOT_FOUND - no queue 'q'"),
                class_id: 50,
                method_id: 10,
            })),
            M::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            M::Access(access::AMQPMethod::Request(access::Request {
                realm: ss("/data"),
                exclusive: false,
                passive: true,
                active: true,
                write: true,
                read: true,
            })),
            M::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
            M::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: ss("ex"),
                kind: ss("x-delayed-message"),
                passive: false,
                durable: true,
                auto_delete: false,
                internal: true,
                nowait: false,
                arguments: t(),
            })),
            M::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
            M::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                exchange: ss("ex"),
                if_unused: true,
                nowait: false,
            })),
            M::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
            M::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: ss("d"),
                source: ss("s"),
                routing_key: ss("a.*.#"),
                nowait: true,
                arguments: t(),
            })),
            M::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
            M::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: ss("d"),
                source: ss("s"),
                routing_key: ss("rk"),
                nowait: false,
                arguments: FieldTable::default(),
            })),
            M::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
            M::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: ss("q"),
                passive: false,
                durable: true,
                exclusive: false,
                auto_delete: true,
                nowait: false,
                arguments: t(),
            })),
            M::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: ss("amq.gen-abc"),
                message_count: 7,
                consumer_count: 2,
            })),
            M::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: ss("q"),
                exchange: ss("amq.headers"),
                routing_key: ss(""),
                nowait: false,
                arguments: t(),
            })),
            M::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
            M::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                queue: ss("q"),
                exchange: ss("e"),
                routing_key: ss("rk"),
                arguments: t(),
            })),
            M::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
            M::Queue(queue::AMQPMethod::Purge(queue::Purge { queue: ss("q"), nowait: true })),
            M::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count: 12 })),
            M::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: ss("q"),
                if_unused: true,
                if_empty: false,
                nowait: true,
            })),
            M::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk { message_count: u32::MAX })),
            M::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: 100, global: true })),
            M::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
            M::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: ss("q"),
                consumer_tag: ss("ctag"),
                no_local: false,
                no_ack: true,
                exclusive: true,
                nowait: false,
                arguments: t(),
            })),
            M::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk { consumer_tag: ss("amq.ctag-1") })),
            M::Basic(basic::AMQPMethod::Cancel(basic::Cancel { consumer_tag: ss("ctag"), nowait: true })),
            M::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk { consumer_tag: ss("ctag") })),
            M::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: ss(""),
                routing_key: ss("q"),
                mandatory: true,
                immediate: false,
            })),
            M::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: 312,
                reply_text: ss("NO_ROUTE"),
                exchange: ss("ex"),
                routing_key: ss("nowhere"),
            })),
            M::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: ss("ctag"),
                delivery_tag: u64::MAX,
                redelivered: true,
                exchange: ss("ex"),
                routing_key: ss(&"k".repeat(255)),
            })),
            M::Basic(basic::AMQPMethod::Get(basic::Get { queue: ss("q"), no_ack: true })),
            M::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: 1,
                redelivered: false,
                exchange: ss(""),
                routing_key: ss("q"),
                message_count: 3,
            })),
            M::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            M::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 42, multiple: true })),
            M::Basic(basic::AMQPMethod::Reject(basic::Reject { delivery_tag: 43, requeue: false })),
            M::Basic(basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue: true })),
            M::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: true })),
            M::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
            M::Basic(basic::AMQPMethod::Nack(basic::Nack { delivery_tag: 44, multiple: false, requeue: true })),
            M::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false })),
            M::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
            M::Tx(tx::AMQPMethod::Select(tx::Select {})),
            M::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
            M::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
            M::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
            M::Tx(tx::AMQPMethod::Rollback(tx::Rollback {})),
            M::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
        ]
    }

    #[test]
    fn every_method_round_trips() {
        let methods = all_methods();
        // 14 connection + 6 channel + 2 access + 8 exchange + 10 queue + 18 basic + 2 confirm + 6 tx
        assert_eq!(methods.len(), 66);
        let mut out = BytesMut::new();
        for (i, m) in methods.iter().enumerate() {
            write_method(&mut out, i as u16, m);
        }
        for (i, m) in methods.iter().enumerate() {
            let f = split_frame(&mut out, FRAME_MIN_SIZE).unwrap().unwrap();
            assert_eq!((f.kind, f.channel), (FrameKind::Method, i as u16));
            assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), m.get_amqp_class_id());
            assert_eq!(u16::from_be_bytes([f.payload[2], f.payload[3]]), m.get_amqp_method_id());
            assert_eq!(&parse_method(&f.payload).unwrap(), m);
        }
        assert!(out.is_empty());
    }

    #[test]
    fn known_ids_match_amq_protocol() {
        for m in all_methods() {
            assert!(is_known(m.get_amqp_class_id(), m.get_amqp_method_id()), "{m:?}");
        }
    }

    #[test]
    fn wire_bytes_of_a_simple_method() {
        let mut out = BytesMut::new();
        write_method(
            &mut out,
            1,
            &Method::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 5, multiple: true })),
        );
        assert_eq!(&out[..], &[1, 0, 1, 0, 0, 0, 13, 0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 5, 1, 0xCE]);
    }

    #[test]
    fn write_method_appends() {
        let mut out = BytesMut::from(&b"prefix"[..]);
        write_method(&mut out, 3, &Method::Tx(tx::AMQPMethod::Select(tx::Select {})));
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(&out[6..], &[1, 0, 3, 0, 0, 0, 4, 0, 90, 0, 10, 0xCE]);
    }

    #[test]
    fn errors() {
        assert_eq!(parse_method(&[]), Err(MethodError::Truncated));
        assert_eq!(parse_method(&[0, 60, 0]), Err(MethodError::Truncated));
        assert_eq!(parse_method(&[0, 61, 0, 10]), Err(MethodError::Unknown { class_id: 61, method_id: 10 }));
        assert_eq!(parse_method(&[0, 60, 0, 12]), Err(MethodError::Unknown { class_id: 60, method_id: 12 }));
        // exchange.unbind-ok is 51, not 41.
        assert_eq!(parse_method(&[0, 40, 0, 41]), Err(MethodError::Unknown { class_id: 40, method_id: 41 }));
        // basic.ack cut short.
        assert_eq!(parse_method(&[0, 60, 0, 80, 0, 0]), Err(MethodError::Malformed { class_id: 60, method_id: 80 }));
        // Trailing byte after basic.ack.
        let ack = [0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert!(parse_method(&ack).is_ok());
        let mut trailing = ack.to_vec();
        trailing.push(0);
        assert_eq!(parse_method(&trailing), Err(MethodError::Malformed { class_id: 60, method_id: 80 }));
        // Invalid UTF-8 in a short string (connection.open vhost) is an error, not a panic.
        let open = [0, 10, 0, 40, 2, 0xC3, 0x28, 0, 0];
        assert_eq!(parse_method(&open), Err(MethodError::Malformed { class_id: 10, method_id: 40 }));
        // Unknown field type in queue.declare arguments.
        let mut declare = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        declare.extend_from_slice(&[0, 0, 0, 3, 1, b'k', b'Z']);
        assert_eq!(parse_method(&declare), Err(MethodError::Malformed { class_id: 50, method_id: 10 }));
        // A long string claiming 4 GiB is Malformed without allocating it.
        let secure_ok = [0, 10, 0, 21, 0xff, 0xff, 0xff, 0xff, b'x'];
        assert_eq!(parse_method(&secure_ok), Err(MethodError::Malformed { class_id: 10, method_id: 21 }));
    }

    fn queue_declare_with(table: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        p.extend_from_slice(table);
        p
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_stack_overflow() {
        // ~20 000 levels in 128 KiB; without the guard this aborts the test process.
        let deep = queue_declare_with(&nested_tables(20_000));
        assert_eq!(parse_method(&deep), Err(MethodError::Malformed { class_id: 50, method_id: 10 }));
        // The same for every table-carrying method: tables at the right offset in each.
        let t = nested_tables(MAX_FIELD_NESTING + 1);
        let cases: Vec<(u16, u16, Vec<u8>)> = vec![
            (10, 10, [&[0u8, 9][..], &t, &[0, 0, 0, 0, 0, 0, 0, 0]].concat()),
            (10, 11, [&t[..], &[0, 0, 0, 0, 0, 0]].concat()),
            (40, 10, [&[0u8, 0, 1, b'e', 6][..], b"direct", &[0], &t].concat()),
            (40, 30, [&[0u8, 0, 1, b'd', 1, b's', 0, 0][..], &t].concat()),
            (40, 40, [&[0u8, 0, 1, b'd', 1, b's', 0, 0][..], &t].concat()),
            (50, 20, [&[0u8, 0, 1, b'q', 1, b'e', 0, 0][..], &t].concat()),
            (50, 50, [&[0u8, 0, 1, b'q', 1, b'e', 0][..], &t].concat()),
            (60, 20, [&[0u8, 0, 1, b'q', 0, 0][..], &t].concat()),
        ];
        for (c, m, args) in cases {
            let mut p = [c.to_be_bytes(), m.to_be_bytes()].concat();
            p.extend(&args);
            assert_eq!(parse_method(&p), Err(MethodError::Malformed { class_id: c, method_id: m }), "{c}.{m}");
            // One level less parses (the guard and amq-protocol agree on the layout).
            let ok_t = nested_tables(MAX_FIELD_NESTING);
            let args_ok = {
                let prefix = &args[..args.len()
                    - t.len()
                    - if c == 10 && m == 10 {
                        8
                    } else if c == 10 {
                        6
                    } else {
                        0
                    }];
                let mut v = prefix.to_vec();
                v.extend(&ok_t);
                v.extend(&args[prefix.len() + t.len()..]);
                v
            };
            let mut p = [c.to_be_bytes(), m.to_be_bytes()].concat();
            p.extend(&args_ok);
            assert!(parse_method(&p).is_ok(), "{c}.{m} at the limit");
        }
    }

    #[test]
    fn max_nesting_fits_a_small_stack() {
        // Tokio workers get 2 MiB; the deepest accepted table must parse in far less, even
        // unoptimised (measured: ~10 KiB of stack per level in debug, ~2 KiB in release).
        let p = queue_declare_with(&nested_tables(MAX_FIELD_NESTING));
        let r = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || parse_method(&p).is_ok())
            .unwrap()
            .join()
            .unwrap();
        assert!(r);
    }

    #[test]
    fn short_string_value_quirk() {
        // amq-protocol tags AMQPValue::ShortString as '_' on the wire, which it cannot parse back.
        let mut t = FieldTable::default();
        t.insert(ss("k"), AMQPValue::ShortString(ss("v")));
        let m = Method::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: ss("q"),
            arguments: t,
            ..Default::default()
        }));
        let mut out = BytesMut::new();
        write_method(&mut out, 1, &m);
        let f = split_frame(&mut out, FRAME_MIN_SIZE).unwrap().unwrap();
        assert!(f.payload.windows(2).any(|w| w == [b'k', b'_']));
        assert!(parse_method(&f.payload).is_err());
    }
}
