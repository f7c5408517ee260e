//! Structure-aware codec fuzzing: a small model of what a client sends (method frames for the methods the
//! server handles, with field tables and nested arrays/tables, content headers with any properties, body
//! frames, heartbeats), encoded with Mailroom's own writers, sometimes corrupted (wrong size, wrong frame
//! end, truncation, flipped byte), and read back the way a connection reads: `split_frame`, then the hot
//! parsers and `parse_method` / `parse_content_header`.
//!
//! Invariants: no panic; no single allocation above a fixed bound while parsing (a hostile size field must
//! never be believed); parse(encode(x)) re-encodes to the same bytes for every uncorrupted frame; the hot
//! parsers agree with the generic one.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use mailroom_amqp::codec::{
    self, basic, channel, confirm, connection, exchange, queue, tx, AMQPValue, BasicProperties, ByteArray,
    DecimalValue, FieldArray, FieldTable, FrameKind, LongString, Method, ShortString,
};

/// Whole-frame limit the stream is split with (the server's default frame_max).
const FRAME_MAX: u32 = 131_072;
/// Largest single allocation parsing may make: a frame's payload plus slack. The buffer split_frame
/// reserves for one announced frame is the biggest legitimate one.
const ALLOC_BOUND: usize = 2 * FRAME_MAX as usize;

/// Counts the largest allocation made while `WATCH` is set.
struct Counting;
static WATCH: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new, Ordering::Relaxed);
        }
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// A field value; no `ShortString` values (write_method's documented contract: their `'_'` tag is unreadable).
#[derive(Arbitrary, Debug)]
enum Value {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal(u8, u32),
    Long(Vec<u8>),
    Array(Vec<Value>),
    Timestamp(u64),
    Table(Vec<(String, Value)>),
    Bytes(Vec<u8>),
    Void,
}

/// Any string, cut to a short string's 255 bytes (on a char boundary).
fn short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

/// Converts a model value.
fn value(v: &Value) -> AMQPValue {
    match v {
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::I8(x) => AMQPValue::ShortShortInt(*x),
        Value::U8(x) => AMQPValue::ShortShortUInt(*x),
        Value::I16(x) => AMQPValue::ShortInt(*x),
        Value::U16(x) => AMQPValue::ShortUInt(*x),
        Value::I32(x) => AMQPValue::LongInt(*x),
        Value::U32(x) => AMQPValue::LongUInt(*x),
        Value::I64(x) => AMQPValue::LongLongInt(*x),
        Value::F32(x) => AMQPValue::Float(*x),
        Value::F64(x) => AMQPValue::Double(*x),
        Value::Decimal(scale, value) => AMQPValue::DecimalValue(DecimalValue { scale: *scale, value: *value }),
        Value::Long(b) => AMQPValue::LongString(LongString::from(b.clone())),
        Value::Array(items) => {
            let mut a = FieldArray::default();
            for i in items {
                a.push(value(i));
            }
            AMQPValue::FieldArray(a)
        }
        Value::Timestamp(t) => AMQPValue::Timestamp(*t),
        Value::Table(t) => AMQPValue::FieldTable(table(t, 0, &mut 0)),
        Value::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
        Value::Void => AMQPValue::Void,
    }
}

/// Converts a model table at nesting level `depth` (the outermost table is level 1); `deepest` tracks the
/// deepest table/array level, so over-deep input is expected to fail.
fn table(t: &[(String, Value)], depth: usize, deepest: &mut usize) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in t {
        // A repeated key replaces the earlier value, so depth is measured on what is kept.
        out.insert(short(k), value(v));
    }
    *deepest = (*deepest).max(table_depth(&out, depth));
    out
}

/// Deepest nesting level in `t`, itself at level `depth`.
fn table_depth(t: &FieldTable, depth: usize) -> usize {
    t.inner().values().map(|v| value_depth(v, depth + 1)).max().unwrap_or(depth).max(depth)
}

fn value_depth(v: &AMQPValue, depth: usize) -> usize {
    match v {
        AMQPValue::FieldTable(t) => table_depth(t, depth),
        AMQPValue::FieldArray(a) => {
            a.as_slice().iter().map(|v| value_depth(v, depth + 1)).max().unwrap_or(depth).max(depth)
        }
        _ => 0,
    }
}

/// The methods a client sends and the server handles.
#[derive(Arbitrary, Debug)]
enum M {
    StartOk { props: Vec<(String, Value)>, mechanism: String, response: Vec<u8>, locale: String },
    TuneOk { channel_max: u16, frame_max: u32, heartbeat: u16 },
    Open { vhost: String },
    ConnClose { code: u16, text: String, class_id: u16, method_id: u16 },
    ConnCloseOk,
    UpdateSecret { secret: Vec<u8>, reason: String },
    ChOpen,
    Flow { active: bool },
    ChClose { code: u16, text: String, class_id: u16, method_id: u16 },
    ChCloseOk,
    ExDeclare { name: String, kind: String, flags: u8, args: Vec<(String, Value)> },
    ExDelete { name: String, flags: u8 },
    ExBind { dest: String, src: String, key: String, nowait: bool, args: Vec<(String, Value)> },
    ExUnbind { dest: String, src: String, key: String, nowait: bool, args: Vec<(String, Value)> },
    QDeclare { name: String, flags: u8, args: Vec<(String, Value)> },
    QBind { name: String, ex: String, key: String, nowait: bool, args: Vec<(String, Value)> },
    QPurge { name: String, nowait: bool },
    QDelete { name: String, flags: u8 },
    QUnbind { name: String, ex: String, key: String, args: Vec<(String, Value)> },
    Qos { count: u16, global: bool },
    Consume { queue: String, tag: String, flags: u8, args: Vec<(String, Value)> },
    Cancel { tag: String, nowait: bool },
    Publish { ex: String, key: String, mandatory: bool, immediate: bool },
    Get { queue: String, no_ack: bool },
    Ack { tag: u64, multiple: bool },
    Reject { tag: u64, requeue: bool },
    Recover { requeue: bool },
    RecoverAsync { requeue: bool },
    Nack { tag: u64, multiple: bool, requeue: bool },
    ConfirmSelect { nowait: bool },
    TxSelect,
    TxCommit,
    TxRollback,
}

fn bit(flags: u8, n: u8) -> bool {
    flags & (1 << n) != 0
}

fn method(m: &M, deepest: &mut usize) -> Method {
    let t = |a: &[(String, Value)], d: &mut usize| table(a, 1, d);
    match m {
        M::StartOk { props, mechanism, response, locale } => {
            Method::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: t(props, deepest),
                mechanism: short(mechanism),
                response: LongString::from(response.clone()),
                locale: short(locale),
            }))
        }
        M::TuneOk { channel_max, frame_max, heartbeat } => {
            Method::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: *channel_max,
                frame_max: *frame_max,
                heartbeat: *heartbeat,
            }))
        }
        M::Open { vhost } => {
            Method::Connection(connection::AMQPMethod::Open(connection::Open { virtual_host: short(vhost) }))
        }
        M::ConnClose { code, text, class_id, method_id } => {
            Method::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: *code,
                reply_text: short(text),
                class_id: *class_id,
                method_id: *method_id,
            }))
        }
        M::ConnCloseOk => Method::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        M::UpdateSecret { secret, reason } => {
            Method::Connection(connection::AMQPMethod::UpdateSecret(connection::UpdateSecret {
                new_secret: LongString::from(secret.clone()),
                reason: short(reason),
            }))
        }
        M::ChOpen => Method::Channel(channel::AMQPMethod::Open(channel::Open {})),
        M::Flow { active } => Method::Channel(channel::AMQPMethod::Flow(channel::Flow { active: *active })),
        M::ChClose { code, text, class_id, method_id } => Method::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: *code,
            reply_text: short(text),
            class_id: *class_id,
            method_id: *method_id,
        })),
        M::ChCloseOk => Method::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        M::ExDeclare { name, kind, flags, args } => {
            Method::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: short(name),
                kind: short(kind),
                passive: bit(*flags, 0),
                durable: bit(*flags, 1),
                auto_delete: bit(*flags, 2),
                internal: bit(*flags, 3),
                nowait: bit(*flags, 4),
                arguments: t(args, deepest),
            }))
        }
        M::ExDelete { name, flags } => Method::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
            exchange: short(name),
            if_unused: bit(*flags, 0),
            nowait: bit(*flags, 1),
        })),
        M::ExBind { dest, src, key, nowait, args } => Method::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: short(dest),
            source: short(src),
            routing_key: short(key),
            nowait: *nowait,
            arguments: t(args, deepest),
        })),
        M::ExUnbind { dest, src, key, nowait, args } => {
            Method::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: short(dest),
                source: short(src),
                routing_key: short(key),
                nowait: *nowait,
                arguments: t(args, deepest),
            }))
        }
        M::QDeclare { name, flags, args } => Method::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: short(name),
            passive: bit(*flags, 0),
            durable: bit(*flags, 1),
            exclusive: bit(*flags, 2),
            auto_delete: bit(*flags, 3),
            nowait: bit(*flags, 4),
            arguments: t(args, deepest),
        })),
        M::QBind { name, ex, key, nowait, args } => Method::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: short(name),
            exchange: short(ex),
            routing_key: short(key),
            nowait: *nowait,
            arguments: t(args, deepest),
        })),
        M::QPurge { name, nowait } => {
            Method::Queue(queue::AMQPMethod::Purge(queue::Purge { queue: short(name), nowait: *nowait }))
        }
        M::QDelete { name, flags } => Method::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: short(name),
            if_unused: bit(*flags, 0),
            if_empty: bit(*flags, 1),
            nowait: bit(*flags, 2),
        })),
        M::QUnbind { name, ex, key, args } => Method::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
            queue: short(name),
            exchange: short(ex),
            routing_key: short(key),
            arguments: t(args, deepest),
        })),
        M::Qos { count, global } => {
            Method::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: *count, global: *global }))
        }
        M::Consume { queue, tag, flags, args } => Method::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: short(queue),
            consumer_tag: short(tag),
            no_local: bit(*flags, 0),
            no_ack: bit(*flags, 1),
            exclusive: bit(*flags, 2),
            nowait: bit(*flags, 3),
            arguments: t(args, deepest),
        })),
        M::Cancel { tag, nowait } => {
            Method::Basic(basic::AMQPMethod::Cancel(basic::Cancel { consumer_tag: short(tag), nowait: *nowait }))
        }
        M::Publish { ex, key, mandatory, immediate } => Method::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: short(ex),
            routing_key: short(key),
            mandatory: *mandatory,
            immediate: *immediate,
        })),
        M::Get { queue, no_ack } => {
            Method::Basic(basic::AMQPMethod::Get(basic::Get { queue: short(queue), no_ack: *no_ack }))
        }
        M::Ack { tag, multiple } => {
            Method::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: *tag, multiple: *multiple }))
        }
        M::Reject { tag, requeue } => {
            Method::Basic(basic::AMQPMethod::Reject(basic::Reject { delivery_tag: *tag, requeue: *requeue }))
        }
        M::Recover { requeue } => Method::Basic(basic::AMQPMethod::Recover(basic::Recover { requeue: *requeue })),
        M::RecoverAsync { requeue } => {
            Method::Basic(basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue: *requeue }))
        }
        M::Nack { tag, multiple, requeue } => Method::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: *tag,
            multiple: *multiple,
            requeue: *requeue,
        })),
        M::ConfirmSelect { nowait } => {
            Method::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: *nowait }))
        }
        M::TxSelect => Method::Tx(tx::AMQPMethod::Select(tx::Select {})),
        M::TxCommit => Method::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
        M::TxRollback => Method::Tx(tx::AMQPMethod::Rollback(tx::Rollback {})),
    }
}

/// Content-header properties; each one present or not.
#[derive(Arbitrary, Debug)]
struct Props {
    content_type: Option<String>,
    content_encoding: Option<String>,
    headers: Option<Vec<(String, Value)>>,
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    expiration: Option<String>,
    message_id: Option<String>,
    timestamp: Option<u64>,
    kind: Option<String>,
    user_id: Option<String>,
    app_id: Option<String>,
    cluster_id: Option<String>,
}

fn properties(p: &Props, deepest: &mut usize) -> BasicProperties {
    let mut b = BasicProperties::default();
    let s = |o: &Option<String>| o.as_deref().map(short);
    if let Some(v) = s(&p.content_type) {
        b = b.with_content_type(v);
    }
    if let Some(v) = s(&p.content_encoding) {
        b = b.with_content_encoding(v);
    }
    if let Some(h) = &p.headers {
        b = b.with_headers(table(h, 1, deepest));
    }
    if let Some(v) = p.delivery_mode {
        b = b.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        b = b.with_priority(v);
    }
    if let Some(v) = s(&p.correlation_id) {
        b = b.with_correlation_id(v);
    }
    if let Some(v) = s(&p.reply_to) {
        b = b.with_reply_to(v);
    }
    if let Some(v) = s(&p.expiration) {
        b = b.with_expiration(v);
    }
    if let Some(v) = s(&p.message_id) {
        b = b.with_message_id(v);
    }
    if let Some(v) = p.timestamp {
        b = b.with_timestamp(v);
    }
    if let Some(v) = s(&p.kind) {
        b = b.with_type(v);
    }
    if let Some(v) = s(&p.user_id) {
        b = b.with_user_id(v);
    }
    if let Some(v) = s(&p.app_id) {
        b = b.with_app_id(v);
    }
    if let Some(v) = s(&p.cluster_id) {
        b = b.with_cluster_id(v);
    }
    b
}

/// One frame a client may send.
#[derive(Arbitrary, Debug)]
enum Frame {
    Method { channel: u16, m: M },
    Header { channel: u16, class_id: bool, body_size: u64, props: Props },
    Body { channel: u16, body: Vec<u8> },
    Heartbeat,
}

/// Damage done to one encoded frame.
#[derive(Arbitrary, Debug)]
enum Corruption {
    /// Rewrite the 4-byte size field (any value, hostile ones included).
    Size(u32),
    /// Replace the frame-end octet.
    FrameEnd(u8),
    /// Cut the frame short by this many bytes (mod its length).
    Truncate(u16),
    /// XOR one byte (index mod length).
    Flip(u16, u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    frames: Vec<(Frame, Option<Corruption>)>,
    /// Read-chunk sizes: the stream arrives in pieces, as from a socket.
    chunks: Vec<u16>,
}

/// What one encoded frame should read back as, when it was left intact.
enum Expect {
    Method(Vec<u8>, bool),
    Header(Vec<u8>, bool),
    Body(Vec<u8>),
    Heartbeat,
}

fn encode(f: &Frame, out: &mut BytesMut) -> Expect {
    match f {
        Frame::Method { channel, m } => {
            let mut deepest = 0;
            let method = method(m, &mut deepest);
            let start = out.len();
            codec::write_method(out, *channel, &method);
            Expect::Method(out[start..].to_vec(), deepest <= codec::MAX_FIELD_NESTING)
        }
        Frame::Header { channel, class_id, body_size, props } => {
            let mut deepest = 0;
            let raw = codec::encode_properties(&properties(props, &mut deepest));
            let start = out.len();
            codec::write_content_header(out, *channel, if *class_id { 60 } else { 50 }, *body_size, &raw);
            Expect::Header(out[start..].to_vec(), *class_id && deepest <= codec::MAX_FIELD_NESTING)
        }
        Frame::Body { channel, body } => {
            codec::write_body(out, *channel, body, FRAME_MAX);
            Expect::Body(body.clone())
        }
        Frame::Heartbeat => {
            codec::write_heartbeat(out);
            Expect::Heartbeat
        }
    }
}

fn corrupt(frame: &mut Vec<u8>, c: &Corruption) {
    let n = frame.len();
    match *c {
        Corruption::Size(s) => frame[3..7].copy_from_slice(&s.to_be_bytes()),
        Corruption::FrameEnd(b) => frame[n - 1] = if b == codec::FRAME_END { 0 } else { b },
        Corruption::Truncate(k) => frame.truncate(n - 1 - (k as usize % n)),
        Corruption::Flip(i, x) => frame[i as usize % n] ^= x.max(1),
    }
}

/// Reads one frame the way a connection does: the hot parsers first, the generic ones after.
fn read_frame(frame: &codec::RawFrame) -> (Option<Bytes>, Option<Bytes>) {
    match frame.kind {
        FrameKind::Method => {
            let generic = codec::parse_method(&frame.payload);
            let _ = codec::parse_basic_qos_prefetch_size(&frame.payload);
            if let Some(p) = codec::parse_basic_publish(&frame.payload) {
                match &generic {
                    Ok(Method::Basic(basic::AMQPMethod::Publish(g))) => {
                        assert_eq!(g.exchange.as_str(), p.exchange);
                        assert_eq!(g.routing_key.as_str(), p.routing_key);
                        assert_eq!((g.mandatory, g.immediate), (p.mandatory, p.immediate));
                    }
                    other => panic!("hot publish parser accepted what the generic one read as {other:?}"),
                }
            }
            if let Some((tag, multiple)) = codec::parse_basic_ack(&frame.payload) {
                match &generic {
                    Ok(Method::Basic(basic::AMQPMethod::Ack(g))) => {
                        assert_eq!((g.delivery_tag, g.multiple), (tag, multiple))
                    }
                    other => panic!("hot ack parser accepted what the generic one read as {other:?}"),
                }
            }
            let reencoded = generic.ok().map(|m| {
                let mut out = BytesMut::new();
                codec::write_method(&mut out, frame.channel, &m);
                out.freeze()
            });
            (reencoded, None)
        }
        FrameKind::Header => {
            let h = codec::parse_content_header(frame.payload.clone());
            let reencoded = h.ok().map(|h| {
                assert_eq!(h.class_id, 60);
                let mut out = BytesMut::new();
                codec::write_content_header(&mut out, frame.channel, h.class_id, h.body_size, &h.raw_properties);
                // Decoded properties re-encode to the bytes received (the writer's own output came in).
                (out.freeze(), codec::encode_properties(&h.properties))
            });
            match reencoded {
                Some((frame_bytes, props)) => (Some(frame_bytes), Some(props)),
                None => (None, None),
            }
        }
        FrameKind::Body | FrameKind::Heartbeat => (None, None),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let mut stream = BytesMut::new();
    // Per frame: what it should read back as; None once the stream is corrupted (a corrupt frame
    // desynchronises everything after it, so only the frames before it are checked).
    let mut expected = Vec::new();
    let mut corrupted = false;
    for (f, c) in &input.frames {
        let mut one = BytesMut::new();
        let exp = encode(f, &mut one);
        let mut bytes = one.to_vec();
        if bytes.is_empty() {
            // An empty body is sent as no body frame at all.
            continue;
        }
        if let Some(c) = c {
            corrupt(&mut bytes, c);
            corrupted = true;
        }
        // write_body splits a big body into several frames; only single-frame bodies are checked.
        if !corrupted && bytes.len() <= FRAME_MAX as usize {
            expected.push(exp);
        } else {
            corrupted = true;
        }
        stream.extend_from_slice(&bytes);
    }

    // Feed the stream in chunks, splitting frames as a connection does, with allocations watched.
    let mut rbuf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest: &[u8] = &stream;
    let mut chunks = input.chunks.iter().map(|&c| c as usize + 1).chain(std::iter::repeat(4096));
    let mut failed = false;
    LARGEST.store(0, Ordering::Relaxed);
    WATCH.store(true, Ordering::Relaxed);
    while !rest.is_empty() && !failed {
        let n = chunks.next().unwrap_or(4096).min(rest.len());
        rbuf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec::split_frame(&mut rbuf, FRAME_MAX) {
                Ok(Some(frame)) => {
                    let read = read_frame(&frame);
                    frames.push((frame, read));
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
    }
    WATCH.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    // The stream itself and the frames are bounded by the input; the parser may not add more than a frame.
    assert!(largest <= ALLOC_BOUND.max(2 * stream.len()), "allocation of {largest} bytes while parsing");

    // Every intact frame before the first corruption reads back as written.
    for (i, exp) in expected.iter().enumerate() {
        let (frame, (reencoded, props)) =
            frames.get(i).unwrap_or_else(|| panic!("intact frame {i} not read: {:?}", input.frames));
        match exp {
            Expect::Method(bytes, valid) => {
                assert_eq!(frame.kind, FrameKind::Method);
                if *valid {
                    let again = reencoded
                        .as_ref()
                        .unwrap_or_else(|| panic!("frame {i} did not parse: {:?}\n{:?}", input.frames[i], bytes));
                    assert_eq!(&again[..], &bytes[..], "method frame {i} does not round-trip");
                }
            }
            Expect::Header(bytes, valid) => {
                assert_eq!(frame.kind, FrameKind::Header);
                if *valid {
                    let again = reencoded.as_ref().unwrap_or_else(|| panic!("header {i} did not parse"));
                    assert_eq!(&again[..], &bytes[..], "content header {i} does not round-trip");
                    let raw = &bytes[codec::FRAME_HEADER_LEN + 12..bytes.len() - 1];
                    assert_eq!(&props.as_ref().unwrap()[..], raw, "properties of header {i} re-encode differently");
                } else {
                    assert!(
                        reencoded.is_none(),
                        "header {i} (wrong class or too deep) was accepted: {:?}",
                        input.frames[i]
                    );
                }
            }
            Expect::Body(body) => {
                assert_eq!(frame.kind, FrameKind::Body);
                assert_eq!(&frame.payload[..], &body[..]);
            }
            Expect::Heartbeat => {
                assert_eq!(frame.kind, FrameKind::Heartbeat);
                assert!(frame.payload.is_empty());
            }
        }
    }
});
