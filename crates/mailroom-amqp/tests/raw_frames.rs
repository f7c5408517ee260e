//! Malformed and hostile input over a raw TCP socket: the server answers with the right code, closes the
//! offending connection, never hangs, and keeps serving everyone else.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use mailroom_amqp::codec::{
    self, basic, channel as chan, confirm, connection as conn, queue, FieldTable, FrameKind, LongString, Method,
    RawFrame,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the server may take to react to bad input.
const REACT: Duration = Duration::from_secs(5);

/// A bare AMQP client: frames in, frames out, no state.
struct Raw {
    stream: TcpStream,
    rbuf: BytesMut,
}

/// What reading from the server produced.
#[derive(Debug)]
enum Read {
    Frame(RawFrame),
    Eof,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await.unwrap().unwrap();
        stream.set_nodelay(true).unwrap();
        Raw { stream, rbuf: BytesMut::new() }
    }

    /// Protocol header, start-ok (PLAIN guest/guest), tune-ok with `frame_max`, open "/".
    async fn handshake(addr: SocketAddr, frame_max: u32) -> Raw {
        Self::handshake_with(addr, frame_max, 0).await
    }

    async fn handshake_with(addr: SocketAddr, frame_max: u32, heartbeat: u16) -> Raw {
        Self::handshake_full(addr, frame_max, heartbeat, FieldTable::default()).await
    }

    async fn handshake_full(addr: SocketAddr, frame_max: u32, heartbeat: u16, client_properties: FieldTable) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send(codec::PROTOCOL_HEADER).await;
        let start = raw.method().await;
        assert!(matches!(start, (0, Method::Connection(conn::AMQPMethod::Start(_)))), "{start:?}");
        raw.send_method(
            0,
            Method::Connection(conn::AMQPMethod::StartOk(conn::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: LongString::from(b"\0guest\0guest".to_vec()),
                locale: "en_US".into(),
            })),
        )
        .await;
        let tune = raw.method().await;
        let Method::Connection(conn::AMQPMethod::Tune(tune)) = tune.1 else { panic!("expected tune, got {tune:?}") };
        raw.send_method(
            0,
            Method::Connection(conn::AMQPMethod::TuneOk(conn::TuneOk {
                channel_max: tune.channel_max,
                frame_max,
                heartbeat,
            })),
        )
        .await;
        raw.send_method(0, Method::Connection(conn::AMQPMethod::Open(conn::Open { virtual_host: "/".into() }))).await;
        let ok = raw.method().await;
        assert!(matches!(ok, (0, Method::Connection(conn::AMQPMethod::OpenOk(_)))), "{ok:?}");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    async fn send_method(&mut self, channel: u16, method: Method) {
        let mut out = BytesMut::new();
        codec::write_method(&mut out, channel, &method);
        self.send(&out).await;
    }

    async fn open_channel(&mut self, id: u16) {
        self.send_method(id, Method::Channel(chan::AMQPMethod::Open(chan::Open {}))).await;
        let ok = self.method().await;
        assert!(matches!(ok, (c, Method::Channel(chan::AMQPMethod::OpenOk(_))) if c == id), "{ok:?}");
    }

    /// The next frame, or EOF (a reset counts as EOF); panics after [`REACT`].
    async fn read(&mut self) -> Read {
        let deadline = tokio::time::Instant::now() + REACT;
        loop {
            if let Some(f) = codec::split_frame(&mut self.rbuf, 1 << 24).expect("server sends well-formed frames") {
                return Read::Frame(f);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf))
                .await
                .expect("the server reacts in time");
            match n {
                Ok(0) | Err(_) => {
                    assert!(self.rbuf.is_empty(), "EOF inside a frame: {:?}", self.rbuf);
                    return Read::Eof;
                }
                Ok(_) => {}
            }
        }
    }

    /// The next method (heartbeats skipped); panics on EOF or content frames.
    async fn method(&mut self) -> (u16, Method) {
        loop {
            match self.read().await {
                Read::Frame(f) if f.kind == FrameKind::Heartbeat => continue,
                Read::Frame(f) if f.kind == FrameKind::Method => {
                    return (f.channel, codec::parse_method(&f.payload).expect("server method parses"))
                }
                other => panic!("expected a method, got {other:?}"),
            }
        }
    }

    /// Expects `connection.close` with `code`, answers close-ok, then expects the socket to close.
    async fn expect_connection_close(&mut self, code: u16) -> conn::Close {
        let (ch, m) = self.method().await;
        let Method::Connection(conn::AMQPMethod::Close(close)) = m else {
            panic!("expected connection.close, got {m:?}")
        };
        assert_eq!(ch, 0);
        assert_eq!(close.reply_code, code, "reply text: {}", close.reply_text);
        // The server may already have hung up; ignore write errors.
        let mut out = BytesMut::new();
        codec::write_method(&mut out, 0, &Method::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})));
        let _ = self.stream.write_all(&out).await;
        self.expect_eof().await;
        close
    }

    /// Expects `channel.close` with `code` on `id` and answers close-ok.
    async fn expect_channel_close(&mut self, id: u16, code: u16) -> chan::Close {
        let (ch, m) = self.method().await;
        let Method::Channel(chan::AMQPMethod::Close(close)) = m else { panic!("expected channel.close, got {m:?}") };
        assert_eq!(ch, id);
        assert_eq!(close.reply_code, code, "reply text: {}", close.reply_text);
        self.send_method(id, Method::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {}))).await;
        close
    }

    /// Reads (and drops heartbeats and any other frames) until the server closes the socket.
    async fn expect_eof(&mut self) {
        loop {
            if let Read::Eof = self.read().await {
                return;
            }
        }
    }
}

fn publish_method(routing_key: &str) -> Method {
    Method::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    }))
}

fn content_header(channel: u16, body_size: u64) -> BytesMut {
    let mut out = BytesMut::new();
    // Property flags 0: no properties.
    codec::write_content_header(&mut out, channel, 60, body_size, &[0, 0]);
    out
}

fn body_frame(channel: u16, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(3);
    out.put_u16(channel);
    out.put_u32(body.len() as u32);
    out.extend_from_slice(body);
    out.put_u8(codec::FRAME_END);
    out
}

fn declare_method(name: &str) -> Method {
    Method::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// Proves the server still serves: a full lapin round trip on a fresh connection.
async fn server_still_serves(server: &TestServer) {
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "").await;
    publish(&ch, &q, b"alive").await;
    let g = ch.basic_get(q.as_str().into(), lapin::options::BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(g.delivery.data, b"alive");
    conn.close(200, "ok".into()).await.unwrap();
}

/// Reads everything until EOF, bounded.
async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(REACT, stream.read_to_end(&mut all)).await.expect("server closes in time").ok();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_protocol_header_gets_ours_then_eof() {
    let server = TestServer::start().await;
    for bad in [
        &b"AMQP\x00\x00\x09\x00"[..],
        b"AMQP\x01\x01\x00\x09",
        b"AMQP\x00\x00\x08\x00",
        b"GET / HT",
        b"\x01\x00\x00\x00\x00\x00\x00\xce",
    ] {
        let mut raw = Raw::connect(server.addr).await;
        raw.send(bad).await;
        let reply = read_to_eof(&mut raw.stream).await;
        assert_eq!(reply, b"AMQP\x00\x00\x09\x01", "reply to {bad:?}");
    }
    server_still_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_protocol_header_then_eof_is_closed_quietly() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send(b"AMQ").await;
    raw.stream.shutdown().await.unwrap();
    let reply = read_to_eof(&mut raw.stream).await;
    assert!(reply.is_empty(), "got {reply:?}");
    server_still_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_larger_than_frame_max_is_501() {
    let server = TestServer::start().await;
    // After tuning to 4096: a method frame of 4089 payload bytes (4097 with overhead) is one too many.
    let mut raw = Raw::handshake(server.addr, 4096).await;
    raw.open_channel(1).await;
    let mut frame = BytesMut::new();
    frame.put_u8(1);
    frame.put_u16(1);
    frame.put_u32(4089);
    frame.extend_from_slice(&[0u8; 4089]);
    frame.put_u8(codec::FRAME_END);
    raw.send(&frame).await;
    raw.expect_connection_close(501).await;

    // Exactly frame_max is fine: a body frame of 4088 payload bytes.
    let mut raw = Raw::handshake(server.addr, 4096).await;
    raw.open_channel(1).await;
    raw.send_method(1, declare_method("exact-frame")).await;
    raw.method().await;
    raw.send_method(1, publish_method("exact-frame")).await;
    raw.send(&content_header(1, 4088)).await;
    raw.send(&body_frame(1, &[7u8; 4088])).await;
    raw.send_method(1, declare_method("exact-frame")).await;
    let (_, m) = raw.method().await;
    let Method::Queue(queue::AMQPMethod::DeclareOk(ok)) = m else { panic!("{m:?}") };
    assert_eq!(ok.message_count, 1);
    // Hang up first: an unanswered connection.close 320 would hold shutdown for its close timeout.
    drop(raw);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_size_field_is_refused_from_the_header_alone() {
    // Only the 7-byte header claiming ~4 GiB: the server must answer 501 without waiting for the payload.
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.send(&[1, 0, 1, 0xff, 0xff, 0xff, 0xf0]).await;
    raw.expect_connection_close(501).await;

    // Before tuning the limit is 4096: an oversized frame in place of start-ok is 501 too.
    let mut raw = Raw::connect(server.addr).await;
    raw.send(codec::PROTOCOL_HEADER).await;
    raw.method().await; // start
    raw.send(&[1, 0, 0, 0, 0, 0x20, 0x00]).await; // 8192-byte payload announced
    raw.expect_connection_close(501).await;
    server_still_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_then_eof_does_not_hang_the_server() {
    let server = TestServer::start().await;
    let mut frames = BytesMut::new();
    codec::write_method(&mut frames, 1, &declare_method("never-declared"));
    for cut in [1, 6, 7, frames.len() / 2, frames.len() - 1] {
        let mut raw = Raw::handshake(server.addr, 131_072).await;
        raw.open_channel(1).await;
        raw.send(&frames[..cut]).await;
        raw.stream.shutdown().await.unwrap();
        raw.expect_eof().await;
    }
    // Truncated inside a content body, too.
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.send_method(1, publish_method("never-declared")).await;
    raw.send(&content_header(1, 100)).await;
    raw.send(&body_frame(1, &[1u8; 100])[..50]).await;
    raw.stream.shutdown().await.unwrap();
    raw.expect_eof().await;

    // Truncated during the handshake.
    let mut raw = Raw::connect(server.addr).await;
    raw.send(codec::PROTOCOL_HEADER).await;
    raw.method().await;
    raw.send(&[1, 0, 0, 0, 0, 0, 50, 0, 10]).await;
    raw.stream.shutdown().await.unwrap();
    raw.expect_eof().await;

    assert!(server.broker.vhost("/").unwrap().queue("never-declared", 0).is_err());
    server_still_serves(&server).await;
    server.shutdown().await;
}

/// xorshift64*: deterministic garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_after_handshake_closes_only_that_connection() {
    let server = TestServer::start().await;
    // A bystander with a consumer keeps working throughout.
    let bystander = server.connect().await;
    let bch = channel(&bystander).await;
    let bq = declare(&bch, "bystander").await;
    let mut consumer = consume(&bch, &bq, true).await;

    let mut set = tokio::task::JoinSet::new();
    for seed in 1..=24u64 {
        let addr = server.addr;
        set.spawn(async move {
            // frame_max 4096, so 64 KiB of garbage always completes whatever frame it starts.
            let mut raw = Raw::handshake(addr, 4096).await;
            raw.open_channel(1).await;
            let junk = garbage(seed, 64 * 1024);
            // Writes may fail once the server has hung up.
            let _ = raw.stream.write_all(&junk).await;
            // Either a connection.close first or just EOF: read until the socket closes.
            let mut all = Vec::new();
            let closed = tokio::time::timeout(REACT, raw.stream.read_to_end(&mut all)).await;
            assert!(closed.is_ok(), "seed {seed}: server did not close within {REACT:?}");
            seed
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    publish(&bch, &bq, b"unaffected").await;
    assert_eq!(next(&mut consumer).await.data, b"unaffected");
    assert!(bystander.status().connected());
    server_still_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_without_publish_is_505() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.send(&body_frame(1, b"stray")).await;
    let close = raw.expect_connection_close(505).await;
    assert!(close.reply_text.as_str().contains("UNEXPECTED_FRAME") || !close.reply_text.as_str().is_empty());

    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.send(&content_header(1, 5)).await;
    raw.expect_connection_close(505).await;

    // A body after a complete publish is also unexpected.
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.send_method(1, publish_method("x")).await;
    raw.send(&content_header(1, 3)).await;
    raw.send(&body_frame(1, b"abc")).await;
    raw.send(&body_frame(1, b"def")).await;
    raw.expect_connection_close(505).await;
    server_still_serves(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_frames_of_two_channels_may_interleave() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 4096).await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    raw.send_method(1, declare_method("interleave")).await;
    raw.method().await;
    raw.send_method(1, publish_method("interleave")).await;
    raw.send_method(2, publish_method("interleave")).await;
    raw.send(&content_header(2, 6)).await;
    raw.send(&content_header(1, 6)).await;
    raw.send(&body_frame(1, b"one")).await;
    raw.send(&body_frame(2, b"TWO")).await;
    raw.send(&body_frame(2, b"two")).await;
    raw.send(&body_frame(1, b"111")).await;
    raw.send_method(1, declare_method("interleave")).await;
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Queue(queue::AMQPMethod::DeclareOk(ref ok)) if ok.message_count == 2), "{m:?}");
    let queue = server.broker.vhost("/").unwrap().queue("interleave", 0).unwrap();
    let a = queue.get(true).unwrap();
    let b = queue.get(true).unwrap();
    assert_eq!((&a.message.body[..], &b.message.body[..]), (&b"TWOtwo"[..], &b"one111"[..]));
    // Hang up first: an unanswered connection.close 320 would hold shutdown for its close timeout.
    drop(raw);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_trickled_byte_by_byte_are_reassembled() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    let mut all = BytesMut::new();
    codec::write_method(&mut all, 1, &Method::Channel(chan::AMQPMethod::Open(chan::Open {})));
    codec::write_method(&mut all, 1, &declare_method("trickle"));
    codec::write_method(&mut all, 1, &publish_method("trickle"));
    all.extend_from_slice(&content_header(1, 5));
    all.extend_from_slice(&body_frame(1, b"drip!"));
    codec::write_method(&mut all, 1, &declare_method("trickle"));
    for b in all.iter() {
        raw.send(&[*b]).await;
        raw.stream.flush().await.unwrap();
    }
    raw.method().await; // channel.open-ok
    raw.method().await; // declare-ok
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Queue(queue::AMQPMethod::DeclareOk(ref ok)) if ok.message_count == 1), "{m:?}");
    // Hang up first: an unanswered connection.close 320 would hold shutdown for its close timeout.
    drop(raw);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_406_before_its_body_is_sent() {
    let server = TestServer::start_with(|c| c.max_message_size = 1000).await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.send_method(1, publish_method("big")).await;
    // Announce 1 GiB and send nothing more: the refusal must come from the header alone.
    raw.send(&content_header(1, 1 << 30)).await;
    let close = raw.expect_channel_close(1, 406).await;
    assert_eq!((close.class_id, close.method_id), (60, 40));
    // The connection and the channel number are usable again.
    raw.open_channel(1).await;
    raw.send_method(1, declare_method("big")).await;
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Queue(queue::AMQPMethod::DeclareOk(_))), "{m:?}");
    // Exactly the limit is accepted.
    raw.send_method(1, publish_method("big")).await;
    raw.send(&content_header(1, 1000)).await;
    raw.send(&body_frame(1, &[0u8; 1000])).await;
    raw.send_method(1, declare_method("big")).await;
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Queue(queue::AMQPMethod::DeclareOk(ref ok)) if ok.message_count == 1), "{m:?}");
    // Hang up first: an unanswered connection.close 320 would hold shutdown for its close timeout.
    drop(raw);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_ok_frame_max_below_4096_is_530() {
    let server = TestServer::start().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.send(codec::PROTOCOL_HEADER).await;
    raw.method().await;
    raw.send_method(
        0,
        Method::Connection(conn::AMQPMethod::StartOk(conn::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: LongString::from(b"\0guest\0guest".to_vec()),
            locale: "en_US".into(),
        })),
    )
    .await;
    raw.method().await; // tune
    raw.send_method(
        0,
        Method::Connection(conn::AMQPMethod::TuneOk(conn::TuneOk { channel_max: 10, frame_max: 4095, heartbeat: 0 })),
    )
    .await;
    raw.expect_connection_close(530).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_closed_after_two_heartbeat_intervals() {
    let server = TestServer::start_with(|c| c.heartbeat = 1).await;
    let mut raw = Raw::handshake_with(server.addr, 131_072, 1).await;
    let started = std::time::Instant::now();
    let mut heartbeats = 0;
    loop {
        match raw.read().await {
            Read::Frame(f) if f.kind == FrameKind::Heartbeat => heartbeats += 1,
            Read::Frame(f) => panic!("unexpected frame {f:?}"),
            Read::Eof => break,
        }
    }
    let waited = started.elapsed();
    assert!(heartbeats >= 1, "the server sends heartbeats");
    assert!(waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4), "closed after {waited:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_frames_after_channel_error_are_ignored_including_content() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    let mut burst = BytesMut::new();
    codec::write_method(
        &mut burst,
        1,
        &Method::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "missing-q".into(),
            passive: true,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    );
    codec::write_method(&mut burst, 1, &publish_method("pipelined"));
    burst.extend_from_slice(&content_header(1, 4));
    burst.extend_from_slice(&body_frame(1, b"lost"));
    burst.extend_from_slice(&body_frame(1, b"stray"));
    burst.extend_from_slice(&content_header(1, 9));
    raw.send(&burst).await;
    raw.expect_channel_close(1, 404).await;
    raw.open_channel(1).await;
    raw.send_method(1, declare_method("pipelined")).await;
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Queue(queue::AMQPMethod::DeclareOk(ref ok)) if ok.message_count == 0), "{m:?}");
    // Hang up first: an unanswered connection.close 320 would hold shutdown for its close timeout.
    drop(raw);
    server.shutdown().await;
}

/// Content frames of a publish with the given deduplication value.
fn dedup_publish(channel: u16, queue: &str, value: &str, body: &[u8]) -> BytesMut {
    let mut headers = FieldTable::default();
    headers.insert("x-deduplication-header".into(), codec::AMQPValue::LongString(LongString::from(value)));
    let props = codec::encode_properties(&codec::BasicProperties::default().with_headers(headers));
    let mut out = BytesMut::new();
    codec::write_method(&mut out, channel, &publish_method(queue));
    codec::write_content_header(&mut out, channel, 60, body.len() as u64, &props);
    out.extend_from_slice(&body_frame(channel, body));
    out
}

/// An ack and a publish read together: the publish sees the ack (a deduplicating queue frees the acked
/// message's value, so the new message with that value is accepted). Acks are batched per read, and the
/// fast publish path must apply them first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_sees_the_acks_sent_before_it_in_the_same_read() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 4096).await;
    raw.open_channel(1).await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-deduplication".into(), codec::AMQPValue::Boolean(true));
    let Method::Queue(queue::AMQPMethod::Declare(mut declare)) = declare_method("dedup-ack") else { unreachable!() };
    declare.arguments = arguments;
    raw.send_method(1, Method::Queue(queue::AMQPMethod::Declare(declare))).await;
    raw.method().await;
    raw.send(&dedup_publish(1, "dedup-ack", "k", b"first")).await;
    raw.send_method(1, Method::Basic(basic::AMQPMethod::Get(basic::Get { queue: "dedup-ack".into(), no_ack: false })))
        .await;
    let (_, m) = raw.method().await;
    let Method::Basic(basic::AMQPMethod::GetOk(ok)) = m else { panic!("expected get-ok, got {m:?}") };
    raw.read().await; // content header
    raw.read().await; // body
                      // One write: the ack, then a message with the same value.
    let mut both = BytesMut::new();
    codec::write_method(
        &mut both,
        1,
        &Method::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: ok.delivery_tag, multiple: false })),
    );
    both.extend_from_slice(&dedup_publish(1, "dedup-ack", "k", b"second"));
    raw.send(&both).await;
    raw.send_method(1, declare_method("probe")).await; // a round trip: everything before it is handled
    raw.method().await;
    let queue = server.broker.vhost("/").unwrap().queue("dedup-ack", 0).unwrap();
    let got = queue.get(true).expect("the second message was accepted, not dropped as a duplicate");
    assert_eq!(&got.message.body[..], b"second");
    drop(raw);
    server.shutdown().await;
}

/// One publish (method, header, body) of `body` to the default exchange with `routing_key`, on channel `id`.
fn publish_frames(out: &mut BytesMut, id: u16, routing_key: &str, body: &[u8]) {
    codec::write_method(out, id, &publish_method(routing_key));
    out.extend_from_slice(&content_header(id, body.len() as u64));
    out.extend_from_slice(&body_frame(id, body));
}

fn connection_close() -> Method {
    Method::Connection(conn::AMQPMethod::Close(conn::Close {
        reply_code: 200,
        reply_text: "bye".into(),
        class_id: 0,
        method_id: 0,
    }))
}

/// What the server did with its side of the socket within `wait`: nothing yet, a clean FIN, or a reset.
#[derive(Debug, PartialEq)]
enum SocketEnd {
    StillOpen,
    Fin,
    Reset,
}

/// Reads (and drops frames) until the server closes its side or `wait` passes.
async fn watch_server_end(raw: &mut Raw, wait: Duration) -> SocketEnd {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, raw.stream.read_buf(&mut raw.rbuf)).await {
            Err(_) => return SocketEnd::StillOpen,
            Ok(Ok(0)) => return SocketEnd::Fin,
            Ok(Ok(_)) => raw.rbuf.clear(),
            Ok(Err(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                return SocketEnd::Reset;
            }
        }
    }
}

/// amqplib writes `connection.close` ahead of publishes still in its buffer. The server answers close-ok, then
/// reads and drops what follows until the client hangs up: it never closes a socket the client is still
/// writing to (Linux would answer the client's next write with a reset: amqplib dies on `EPIPE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_followed_by_publishes_is_drained_until_the_client_hangs_up() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.send_method(1, declare_method("after-close")).await;
    raw.method().await;
    // One write: close, then a burst of publishes behind it.
    let mut burst = BytesMut::new();
    codec::write_method(&mut burst, 0, &connection_close());
    for i in 0..2000 {
        publish_frames(&mut burst, 1, "after-close", format!("late {i}").as_bytes());
    }
    raw.send(&burst).await;
    let (ch, m) = raw.method().await;
    assert!(matches!(m, Method::Connection(conn::AMQPMethod::CloseOk(_))) && ch == 0, "{m:?}");
    // The server keeps its side open (and reads) while the client goes on writing, in later writes too.
    assert_eq!(watch_server_end(&mut raw, Duration::from_millis(300)).await, SocketEnd::StillOpen);
    for _ in 0..5 {
        let mut more = BytesMut::new();
        for i in 0..500 {
            publish_frames(&mut more, 1, "after-close", format!("later {i}").as_bytes());
        }
        raw.stream.write_all(&more).await.expect("the server still reads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(watch_server_end(&mut raw, Duration::from_millis(300)).await, SocketEnd::StillOpen);
    // Once we hang up, the server closes its side cleanly.
    raw.stream.shutdown().await.unwrap();
    assert_eq!(watch_server_end(&mut raw, REACT).await, SocketEnd::Fin);
    // Publishes after connection.close are dropped, as RabbitMQ does.
    let queue = server.broker.vhost("/").unwrap().queue("after-close", 0).unwrap();
    assert!(queue.get(true).is_none(), "a publish sent after connection.close was routed");
    server_still_serves(&server).await;
    server.shutdown().await;
}

/// A client that never hangs up after close-ok is let go after the smaller of its heartbeat and 30 s, with a
/// FIN, and a repeated `connection.close` in the meantime gets another close-ok (RabbitMQ does both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_lingers_for_one_heartbeat_and_answers_a_repeated_close() {
    let server = TestServer::start_with(|c| c.heartbeat = 1).await;
    let mut raw = Raw::handshake_with(server.addr, 131_072, 1).await;
    raw.send_method(0, connection_close()).await;
    let started = std::time::Instant::now();
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Connection(conn::AMQPMethod::CloseOk(_))), "{m:?}");
    raw.send_method(0, connection_close()).await;
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Connection(conn::AMQPMethod::CloseOk(_))), "{m:?}");
    // No heartbeats (nor anything else) after close-ok, then a clean FIN once the linger time is up.
    let mut trailing = BytesMut::new();
    let end = loop {
        match tokio::time::timeout(REACT, raw.stream.read_buf(&mut trailing)).await.expect("server closes in time") {
            Ok(0) => break SocketEnd::Fin,
            Ok(_) => {}
            Err(_) => break SocketEnd::Reset,
        }
    };
    let waited = started.elapsed();
    assert_eq!(end, SocketEnd::Fin);
    assert!(trailing.is_empty(), "frames after close-ok: {trailing:?}");
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(4), "closed after {waited:?}");
    server.shutdown().await;
}

/// The server-initiated direction is unchanged: after the client's close-ok the server hangs up at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_close_hangs_up_after_the_clients_close_ok() {
    let mut server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    server.trigger_shutdown();
    let started = std::time::Instant::now();
    raw.expect_connection_close(320).await;
    assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
    server.shutdown().await;
}

/// Crossing `channel.close`: the server closes channel 1 (404 on publish) while the client closes it too. The
/// client's close gets close-ok, its late close-ok for ours is ignored, and channel 2, the connection and the
/// channel number are untouched (the Go client's `504 expected 'channel.open'` bug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_channel_closes_leave_other_channels_alone() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    let mut both = BytesMut::new();
    codec::write_method(
        &mut both,
        1,
        &Method::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "no-such-exchange".into(),
            routing_key: "k".into(),
            mandatory: false,
            immediate: false,
        })),
    );
    both.extend_from_slice(&content_header(1, 3));
    both.extend_from_slice(&body_frame(1, b"404"));
    codec::write_method(
        &mut both,
        1,
        &Method::Channel(chan::AMQPMethod::Close(chan::Close {
            reply_code: 200,
            reply_text: "client close".into(),
            class_id: 0,
            method_id: 0,
        })),
    );
    raw.send(&both).await;
    let (ch, m) = raw.method().await;
    let Method::Channel(chan::AMQPMethod::Close(close)) = m else { panic!("expected channel.close, got {m:?}") };
    assert_eq!((ch, close.reply_code), (1, 404));
    let (ch, m) = raw.method().await;
    assert!(matches!(m, Method::Channel(chan::AMQPMethod::CloseOk(_))) && ch == 1, "{m:?}");
    // The client answers the server's close; the channel is already gone on the server.
    raw.send_method(1, Method::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {}))).await;
    raw.send_method(
        2,
        Method::Exchange(codec::exchange::AMQPMethod::Declare(codec::exchange::Declare {
            exchange: "crossing-x".into(),
            kind: "fanout".into(),
            passive: false,
            durable: false,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    let (ch, m) = raw.method().await;
    assert!(matches!(m, Method::Exchange(codec::exchange::AMQPMethod::DeclareOk(_))) && ch == 2, "{m:?}");
    raw.open_channel(1).await;
    raw.send_method(1, declare_method("crossing-q")).await;
    let (ch, m) = raw.method().await;
    assert!(matches!(m, Method::Queue(queue::AMQPMethod::DeclareOk(_))) && ch == 1, "{m:?}");
    // Only a crossed close is forgiven: close-ok on a channel never opened is 504, as in RabbitMQ.
    raw.send_method(7, Method::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {}))).await;
    let close = raw.expect_connection_close(504).await;
    assert_eq!(close.reply_text.as_str(), "CHANNEL_ERROR - expected 'channel.open'");
    server.shutdown().await;
}

/// A queue deleted under a consumer of the same connection: the consumer's `basic.cancel` goes out before
/// `delete-ok` (RabbitMQ usually, not always, orders them so), so a client that closes the connection on
/// delete-ok still hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_cancel_precedes_delete_ok_on_the_same_connection() {
    let server = TestServer::start().await;
    let mut caps = FieldTable::default();
    caps.insert("consumer_cancel_notify".into(), codec::AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), codec::AMQPValue::FieldTable(caps));
    let mut raw = Raw::handshake_full(server.addr, 131_072, 0, props).await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    raw.send_method(1, declare_method("cancel-order")).await;
    raw.method().await;
    raw.send_method(
        1,
        Method::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "cancel-order".into(),
            consumer_tag: "ctag".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    let (_, m) = raw.method().await;
    assert!(matches!(m, Method::Basic(basic::AMQPMethod::ConsumeOk(_))), "{m:?}");
    raw.send_method(
        2,
        Method::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "cancel-order".into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })),
    )
    .await;
    let (ch, m) = raw.method().await;
    let Method::Basic(basic::AMQPMethod::Cancel(cancel)) = m else { panic!("expected basic.cancel first, got {m:?}") };
    assert_eq!((ch, cancel.consumer_tag.as_str()), (1, "ctag"));
    let (ch, m) = raw.method().await;
    assert!(matches!(m, Method::Queue(queue::AMQPMethod::DeleteOk(_))) && ch == 2, "{m:?}");
    drop(raw);
    server.shutdown().await;
}

/// A confirm that covers one publish goes out without `multiple` (as RabbitMQ sends it: the Java
/// client's ConfirmListener sees `multiple=false`); a run of publishes confirmed together is one ack
/// with `multiple`.
#[tokio::test]
async fn a_single_confirm_is_not_multiple_and_a_run_is() {
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 4096).await;
    raw.open_channel(1).await;
    raw.send_method(1, declare_method("confirm-single")).await;
    raw.method().await;
    raw.send_method(1, Method::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false }))).await;
    raw.method().await;

    let mut one = BytesMut::new();
    publish_frames(&mut one, 1, "confirm-single", b"a");
    raw.send(&one).await;
    let (_, m) = raw.method().await;
    let Method::Basic(basic::AMQPMethod::Ack(ack)) = m else { panic!("expected an ack, got {m:?}") };
    assert_eq!((ack.delivery_tag, ack.multiple), (1, false));

    // Three publishes in one write are confirmed in the same turn: one ack covering 2..=4.
    let mut three = BytesMut::new();
    for _ in 0..3 {
        publish_frames(&mut three, 1, "confirm-single", b"b");
    }
    raw.send(&three).await;
    let (_, m) = raw.method().await;
    let Method::Basic(basic::AMQPMethod::Ack(ack)) = m else { panic!("expected an ack, got {m:?}") };
    assert_eq!((ack.delivery_tag, ack.multiple), (4, true));
    drop(raw);
    server.shutdown().await;
}

/// The process's virtual memory size in KiB (`VmSize` in /proc/self/status).
fn vm_size_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let line = status.lines().find(|l| l.starts_with("VmSize:")).expect("VmSize line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
}

/// A content header announcing 16 MiB followed by two 1-byte body frames, on 50 channels of one
/// connection: the broker must not reserve the announced size (it did: 800 MiB of virtual memory, where
/// RabbitMQ takes none). Buffers grow with what arrives.
#[tokio::test]
async fn an_announced_body_size_is_not_allocated_before_it_arrives() {
    const CHANNELS: u16 = 50;
    const ANNOUNCED: u64 = 16 * 1024 * 1024;
    let server = TestServer::start().await;
    let mut raw = Raw::handshake(server.addr, 131_072).await;
    // One more channel for a round trip that leaves the partly received messages alone.
    for id in 1..=CHANNELS + 1 {
        raw.open_channel(id).await;
    }
    let before = vm_size_kib();
    let mut frames = BytesMut::new();
    for id in 1..=CHANNELS {
        codec::write_method(&mut frames, id, &publish_method("nowhere"));
        frames.extend_from_slice(&content_header(id, ANNOUNCED));
        frames.extend_from_slice(&body_frame(id, b"a"));
        frames.extend_from_slice(&body_frame(id, b"b"));
    }
    raw.send(&frames).await;
    raw.send_method(CHANNELS + 1, declare_method("probe-announced")).await; // a round trip: all was read
    let (id, m) = raw.method().await;
    assert!(id == CHANNELS + 1 && matches!(m, Method::Queue(queue::AMQPMethod::DeclareOk(_))), "{id} {m:?}");
    let grown_mib = vm_size_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 100, "virtual memory grew by {grown_mib} MiB for {CHANNELS} x 2 bytes received");
    drop(raw);
    server.shutdown().await;
}

/// A connection quiet for a timer turn parks its read buffer (reads go through a 64-byte array until
/// traffic resumes). Frames split across writes, a publish larger than that array and a burst must all
/// arrive whole afterwards, and heartbeats keep flowing both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_reads_split_frames_and_bursts_whole() {
    let server = TestServer::start_with(|c| c.heartbeat = 1).await;
    let mut raw = Raw::handshake_with(server.addr, 131_072, 1).await;
    raw.open_channel(1).await;
    raw.send_method(1, declare_method("parked")).await;
    raw.method().await;
    // Stay quiet past a timer turn (heartbeats every 0.5 s), answering the server's heartbeats.
    let heartbeat = [8u8, 0, 0, 0, 0, 0, 0, codec::FRAME_END];
    let mut heartbeats = 0;
    while heartbeats < 3 {
        match raw.read().await {
            Read::Frame(f) if f.kind == FrameKind::Heartbeat => {
                heartbeats += 1;
                raw.send(&heartbeat).await;
            }
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }
    // One small publish split into three writes, with pauses: each piece is a parked read.
    let mut one = BytesMut::new();
    publish_frames(&mut one, 1, "parked", b"split");
    for piece in [&one[..5], &one[5..30], &one[30..]] {
        raw.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Then a burst: 200 publishes of 1 KiB and one of 100 KB in one write.
    let mut burst = BytesMut::new();
    for i in 0..200u32 {
        publish_frames(&mut burst, 1, "parked", &[i as u8; 1024]);
    }
    publish_frames(&mut burst, 1, "parked", &vec![7u8; 100_000]);
    raw.send(&burst).await;
    raw.send_method(1, declare_method("probe-parked")).await; // a round trip: everything before it is handled
    raw.method().await;
    let queue = server.broker.vhost("/").unwrap().queue("parked", 0).unwrap();
    assert_eq!(&queue.get(true).expect("the split publish").message.body[..], b"split");
    for i in 0..200u32 {
        assert_eq!(&queue.get(true).expect("a burst publish").message.body[..], &[i as u8; 1024][..]);
    }
    assert_eq!(queue.get(true).expect("the large publish").message.body.len(), 100_000);
    assert!(queue.get(true).is_none());
    drop(raw);
    server.shutdown().await;
}
