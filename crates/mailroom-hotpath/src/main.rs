//! Fixed workloads over the broker's hot paths (parse a publish, route it, deliver, ack), one per
//! subcommand, for counting instructions under callgrind (`scripts/check-instructions.sh`).
//!
//! Each scenario builds its broker state, runs [`WARMUP_ROUNDS`] rounds, then its measured rounds
//! ([`ROUNDS`] for most) of [`BATCH`] operations. Only the measured rounds run inside the scenario's `measure_*` function, which
//! is never inlined, so `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*::measure_x'`
//! counts exactly those (callees included); setup between rounds (filling the read buffer, draining
//! queues) happens outside it. Instructions per operation = the count / the operations (`list` prints them).
//!
//! It drives mailroom-amqp and mailroom-broker only through their public APIs (the codec functions the
//! connection uses, `VHost::publish`, `VHost::consume`, `Queue::{dispatch, settle_sent, ack}`), so it
//! keeps measuring the same paths while their insides are restructured. What the connection does with
//! its private state (the channel's delivery-tag map, write batching) is not included.

use bytes::{Buf, Bytes, BytesMut};
use mailroom_amqp::codec::{self, basic, FrameKind, Method};
use mailroom_amqp::server::DEFAULT_FRAME_MAX;
use mailroom_broker::vhost::PublishCache;
use mailroom_broker::{
    BasicProperties, Broker, BrokerConfig, ChannelPrefetch, ConsumeOptions, ConsumerEvent, ExchangeOptions, FieldTable,
    Message, Queue, QueueOptions, VHost,
};
use std::hint::black_box;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Operations per round: a queue never holds more than this many of a scenario's messages.
const BATCH: usize = 1000;
/// Rounds run before measuring, so buffers and maps have grown to their steady size.
const WARMUP_ROUNDS: usize = if cfg!(test) { 1 } else { 3 };
/// Measured rounds of most scenarios.
const ROUNDS: usize = 50;
/// Measured rounds of `deliver_ack`: while the queue's unacked map used std's randomly seeded hasher, its
/// inserts cost more or less per run (table rehashes at different times): over 50 rounds runs differed by
/// up to 0.8%, over 400 by under 0.1%. The map now uses the queue's id hasher (no seed); 400 rounds stay so
/// that the counts remain comparable with the recorded ones.
const DELIVER_ACK_ROUNDS: usize = 400;
/// Measured rounds in the unit tests, which check the workloads, not their counts (and run unoptimised).
const TEST_ROUNDS: usize = 2;
/// Acks per `Queue::ack` call in `ack_batch` (the connection applies the acks of one read together;
/// a consumer with prefetch 100 has at most 100 in one read).
const ACK_BATCH: usize = 100;
/// Body size: the small-message case of the throughput targets.
const BODY: &[u8] = b"0123456789abcdef";
/// The AMQP channel every frame uses.
const CHANNEL: u16 = 1;
/// A consumer tag as long as a server-generated one.
const CONSUMER_TAG: &str = "amq.ctag-hotpath-000000000000000000";
/// The connection that owns the queues (any id: none are exclusive).
const OWNER: u64 = 1;

/// The measured rounds of a scenario in this build.
fn rounds(s: &Scenario) -> usize {
    if cfg!(test) {
        TEST_ROUNDS
    } else {
        s.rounds
    }
}

/// One workload: its subcommand, the function callgrind counts, and what one operation is.
struct Scenario {
    name: &'static str,
    function: &'static str,
    about: &'static str,
    rounds: usize,
    run: fn(usize),
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "parse_publish",
        function: "measure_parse_publish",
        about: "split method + content header + body frames off the read buffer, parse them, build the message in its Arc (as the connection does at the content header), set its body",
        rounds: ROUNDS,
        run: parse_publish,
    },
    Scenario {
        name: "route_default_1q",
        function: "measure_route_default_1q",
        about: "VHost::publish to the default exchange, one queue, no consumer",
        rounds: ROUNDS,
        run: route_default_1q,
    },
    Scenario {
        name: "route_direct_1q",
        function: "measure_route_direct_1q",
        about: "VHost::publish to a direct exchange bound to one queue",
        rounds: ROUNDS,
        run: route_direct_1q,
    },
    Scenario {
        name: "route_direct_4q",
        function: "measure_route_direct_4q",
        about: "VHost::publish to a direct exchange bound to four queues with one key",
        rounds: ROUNDS,
        run: route_direct_4q,
    },
    Scenario {
        name: "route_fanout_1q",
        function: "measure_route_fanout_1q",
        about: "VHost::publish to a fanout exchange bound to one queue",
        rounds: ROUNDS,
        run: route_fanout_1q,
    },
    Scenario {
        name: "route_fanout_4q",
        function: "measure_route_fanout_4q",
        about: "VHost::publish to a fanout exchange bound to four queues",
        rounds: ROUNDS,
        run: route_fanout_4q,
    },
    Scenario {
        name: "route_default_1q_cached",
        function: "measure_route_default_1q_cached",
        about: "VHost::publish_cached (a channel's cache: exchange resolved once) to the default exchange, one queue",
        rounds: ROUNDS,
        run: route_default_1q_cached,
    },
    Scenario {
        name: "route_direct_1q_cached",
        function: "measure_route_direct_1q_cached",
        about: "VHost::publish_cached to a direct exchange bound to one queue",
        rounds: ROUNDS,
        run: route_direct_1q_cached,
    },
    Scenario {
        name: "publish_deliver_noack",
        function: "measure_publish_deliver_noack",
        about: "VHost::publish_cached to the default exchange, one empty queue whose no-ack consumer takes it at once",
        rounds: ROUNDS,
        run: publish_deliver_noack,
    },
    Scenario {
        name: "deliver_ack",
        function: "measure_deliver_ack",
        about: "Queue::dispatch to a manual-ack consumer, take the event, encode basic.deliver + header + body",
        rounds: DELIVER_ACK_ROUNDS,
        run: deliver_ack,
    },
    Scenario {
        name: "deliver_noack",
        function: "measure_deliver_noack",
        about: "Queue::settle_sent frees no-ack credit, dispatch, take the event, encode deliver + header + body",
        rounds: ROUNDS,
        run: deliver_noack,
    },
    Scenario {
        name: "ack",
        function: "measure_ack",
        about: "split + parse a basic.ack frame, Queue::ack of that one message",
        rounds: ROUNDS,
        run: ack_single,
    },
    Scenario {
        name: "ack_batch",
        function: "measure_ack_batch",
        about: "split + parse basic.ack frames, one Queue::ack per 100 messages",
        rounds: ROUNDS,
        run: ack_batch,
    },
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("list") => {
            // One line per scenario: name, the function to count, iterations, description.
            for s in SCENARIOS {
                println!("{}\t{}\t{}\t{}", s.name, s.function, rounds(s) * BATCH, s.about);
            }
        }
        Some("all") => {
            for s in SCENARIOS {
                run_scenario(s);
            }
        }
        Some(name) => match SCENARIOS.iter().find(|s| s.name == name) {
            Some(s) => run_scenario(s),
            None => usage(&format!("unknown scenario {name:?}")),
        },
        None => usage("no scenario given"),
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("mailroom-hotpath: {problem}");
    eprintln!("usage: mailroom-hotpath list | all | <scenario>");
    eprintln!("scenarios: {}", SCENARIOS.iter().map(|s| s.name).collect::<Vec<_>>().join(", "));
    std::process::exit(2);
}

fn run_scenario(s: &Scenario) {
    // `Broker::open` wants a runtime; nothing is awaited, so no task runs while a scenario does.
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a current-thread runtime");
    let _guard = rt.enter();
    (s.run)(rounds(s));
    println!("{}\titerations={}", s.name, rounds(s) * BATCH);
}

// ---- shared setup -----------------------------------------------------------------------------------

/// A fresh in-memory broker's vhost `/` (the broker lives as long as the vhost is used).
fn open_vhost() -> (Broker, Arc<VHost>) {
    let broker = Broker::open(BrokerConfig::default()).expect("an in-memory broker opens");
    let vhost = broker.vhost("/").expect("vhost / exists by default");
    (broker, vhost)
}

fn declare_queue(vhost: &VHost, name: &str) -> Arc<Queue> {
    vhost.declare_queue(name, &QueueOptions::default(), OWNER).expect("queue declared");
    vhost.queue(name, OWNER).expect("queue just declared")
}

/// Transient properties, as a client sends them for a plain publish.
fn properties() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(1)
}

/// The wire bytes of one publish: method, content header and one body frame.
fn publish_frames(exchange: &str, routing_key: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let method = Method::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: codec::short_string(exchange).expect("short name"),
        routing_key: codec::short_string(routing_key).expect("short key"),
        mandatory: false,
        immediate: false,
    }));
    codec::write_method(&mut out, CHANNEL, &method);
    let raw = codec::encode_properties(&properties());
    codec::write_content_header(&mut out, CHANNEL, 60, BODY.len() as u64, &raw);
    codec::write_body(&mut out, CHANNEL, BODY, DEFAULT_FRAME_MAX);
    out
}

/// A message as the connection builds it from a parsed publish (raw property bytes kept).
fn wire_message(exchange: &str, routing_key: &str) -> Message {
    let mut buf = publish_frames(exchange, routing_key);
    let mut parsed = Vec::with_capacity(1);
    parse_frames(&mut buf, &mut PublishCache::default(), &mut parsed);
    Arc::unwrap_or_clone(parsed.pop().expect("one publish was encoded"))
}

/// A publish in progress: what the method frame said, then the message its content header started (in
/// its `Arc`, body still empty, as the connection's `StartedMessage`).
struct Pending {
    exchange: Arc<str>,
    routing_key: Arc<str>,
    started: Option<Arc<Message>>,
}

/// Splits and parses every frame in `rbuf` as the connection does for publishes whose body is one frame,
/// pushing each completed message onto `out`; `cache` is the channel's (names repeated from the previous
/// publish are shared, not allocated). The input is encoded by this program with the same codec, so a frame
/// that does not parse is a bug here or in the codec: it panics.
#[inline(always)]
fn parse_frames(rbuf: &mut BytesMut, cache: &mut PublishCache, out: &mut Vec<Arc<Message>>) {
    let mut pending: Option<Pending> = None;
    while let Some(head) = codec::peek_frame(rbuf, DEFAULT_FRAME_MAX).expect("well-formed frames") {
        if head.kind == FrameKind::Method {
            // Read in place, as the connection reads method frames.
            let publish = codec::parse_basic_publish(head.payload(rbuf)).expect("a basic.publish");
            let (exchange, routing_key) = cache.names(publish.exchange, publish.routing_key);
            pending = Some(Pending { exchange, routing_key, started: None });
            rbuf.advance(head.frame_len());
            continue;
        }
        let frame = codec::take_frame(rbuf, head);
        match frame.kind {
            FrameKind::Method => unreachable!("handled above"),
            FrameKind::Header => {
                let header = codec::parse_content_header(frame.payload).expect("a content header");
                let p = pending.as_mut().expect("header after its method");
                p.started = Some(Arc::new(Message {
                    exchange: Arc::clone(&p.exchange),
                    routing_key: Arc::clone(&p.routing_key),
                    properties: header.properties,
                    raw_properties: Some(header.raw_properties),
                    body: Bytes::new(),
                }));
            }
            FrameKind::Body => {
                let p = pending.take().expect("body after its method");
                let mut message = p.started.expect("body after its header");
                Arc::make_mut(&mut message).body = frame.payload;
                out.push(message);
            }
            FrameKind::Heartbeat => {}
        }
    }
}

/// Takes every delivery the sink holds up to `n`, encoding each as the connection writes it.
#[inline(always)]
fn take_and_encode(
    events: &mut UnboundedReceiver<ConsumerEvent>,
    n: usize,
    next_tag: &mut u64,
    out: &mut BytesMut,
    ids: Option<&mut Vec<u64>>,
) {
    let mut ids = ids;
    for _ in 0..n {
        let Ok(ConsumerEvent::Deliver(d)) = events.try_recv() else { panic!("a delivery is waiting") };
        let tag = *next_tag;
        *next_tag += 1;
        codec::write_basic_deliver(
            out,
            CHANNEL,
            CONSUMER_TAG,
            tag,
            d.redelivered,
            &d.message.exchange,
            &d.message.routing_key,
        );
        match &d.message.raw_properties {
            Some(raw) => codec::write_content_header(out, CHANNEL, 60, d.message.body.len() as u64, raw),
            None => {
                let raw = codec::encode_properties(&d.message.properties);
                codec::write_content_header(out, CHANNEL, 60, d.message.body.len() as u64, &raw);
            }
        }
        codec::write_body(out, CHANNEL, &d.message.body, DEFAULT_FRAME_MAX);
        if let Some(ids) = ids.as_deref_mut() {
            ids.push(d.id);
        }
    }
}

// ---- parse --------------------------------------------------------------------------------------------

fn parse_publish(rounds: usize) {
    let one = publish_frames("amq.direct", "hotpath.key");
    let mut messages = Vec::with_capacity(BATCH);
    let mut cache = PublishCache::default();
    let fill = || {
        let mut rbuf = BytesMut::with_capacity(one.len() * BATCH);
        for _ in 0..BATCH {
            rbuf.extend_from_slice(&one);
        }
        rbuf
    };
    for _ in 0..WARMUP_ROUNDS {
        parse_frames(&mut fill(), &mut cache, &mut messages);
        assert_eq!(messages.len(), BATCH);
        messages.clear();
    }
    for _ in 0..rounds {
        let mut rbuf = fill();
        measure_parse_publish(&mut rbuf, &mut cache, &mut messages);
        assert_eq!(messages.len(), BATCH, "every publish parsed");
        black_box(&messages);
        messages.clear();
    }
}

#[inline(never)]
fn measure_parse_publish(rbuf: &mut BytesMut, cache: &mut PublishCache, out: &mut Vec<Arc<Message>>) {
    parse_frames(rbuf, cache, out);
}

// ---- route --------------------------------------------------------------------------------------------

/// How a route scenario publishes: its measured function, and the same work unmeasured (warm-up), both
/// given the publisher's cache (which only the `_cached` scenarios use).
type Publish = fn(&VHost, &str, &mut PublishCache, &mut Vec<Message>);

/// Publishes `BATCH` messages to `exchange` per round through `measure`, then drains each queue (outside
/// the measurement, keeping its capacity) and checks every queue got every message.
fn route(
    exchange: &str,
    routing_key: &str,
    queues: &[Arc<Queue>],
    vhost: &VHost,
    (measure, warm_up): (Publish, Publish),
    rounds: usize,
) {
    let template = wire_message(exchange, routing_key);
    let mut batch = Vec::with_capacity(BATCH);
    // One channel's cache for the whole run, as a channel publishing all along keeps it.
    let mut cache = PublishCache::default();
    let mut round = |measured: bool| {
        batch.extend((0..BATCH).map(|_| template.clone()));
        if measured {
            measure(vhost, exchange, &mut cache, &mut batch);
        } else {
            warm_up(vhost, exchange, &mut cache, &mut batch);
        }
        for q in queues {
            let mut n = 0;
            while q.get(true).is_some() {
                n += 1;
            }
            assert_eq!(n, BATCH, "queue {} got every message", q.name());
        }
    };
    for _ in 0..WARMUP_ROUNDS {
        round(false);
    }
    for _ in 0..rounds {
        round(true);
    }
}

/// Publishes and drops the results. The route scenarios' `measure_*` functions differ only in a
/// `black_box` of their name: LLVM merges functions with identical bodies into one symbol, and callgrind
/// would then find nothing under the other names.
#[inline(always)]
fn publish_all(vhost: &VHost, exchange: &str, batch: &mut Vec<Message>) {
    for m in batch.drain(..) {
        let r = vhost.publish(exchange, m).expect("the exchange exists");
        assert!(r.routed && !r.rejected, "routed and taken");
        black_box(&r);
    }
}

/// [`publish_all`] through a channel's [`PublishCache`], as the connection publishes.
#[inline(always)]
fn publish_all_cached(vhost: &VHost, exchange: &str, cache: &mut PublishCache, batch: &mut Vec<Message>) {
    for m in batch.drain(..) {
        // Into its Arc here, as the connection builds it (the allocation stays in the count).
        let r = vhost.publish_cached(cache, exchange, Arc::new(m)).expect("the exchange exists");
        assert!(r.routed && !r.rejected, "routed and taken");
        black_box(&r);
    }
}

/// The measured and warm-up publishes of the scenarios that publish by name, through `VHost::publish`.
macro_rules! by_name {
    ($measure:ident) => {
        (|v, x, _, b| $measure(v, x, b), |v, x, _, b| publish_all(v, x, b))
    };
}

/// ... and of those that publish through a channel's cache (`VHost::publish_cached`).
macro_rules! cached {
    ($measure:ident) => {
        ($measure, publish_all_cached)
    };
}

/// Declares `n` queues bound to `exchange` (declared with `kind` unless it is the default) with `key`.
fn bound_queues(vhost: &VHost, exchange: &str, kind: &str, key: &str, n: usize) -> Vec<Arc<Queue>> {
    if !exchange.is_empty() {
        vhost.declare_exchange(exchange, kind, &ExchangeOptions::default()).expect("exchange declared");
    }
    (0..n)
        .map(|i| {
            let name = format!("hotpath.{kind}.{i}");
            let q = declare_queue(vhost, &name);
            if !exchange.is_empty() {
                vhost.bind_queue(&name, exchange, key, &FieldTable::default(), OWNER).expect("bound");
            }
            q
        })
        .collect()
}

fn route_default_1q(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let queues = bound_queues(&vhost, "", "direct", "", 1);
    route("", queues[0].name(), &queues, &vhost, by_name!(measure_route_default_1q), rounds);
}

#[inline(never)]
fn measure_route_default_1q(vhost: &VHost, exchange: &str, batch: &mut Vec<Message>) {
    black_box("route_default_1q");
    publish_all(vhost, exchange, batch);
}

fn route_direct_1q(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let queues = bound_queues(&vhost, "hotpath.direct", "direct", "hotpath.key", 1);
    route("hotpath.direct", "hotpath.key", &queues, &vhost, by_name!(measure_route_direct_1q), rounds);
}

#[inline(never)]
fn measure_route_direct_1q(vhost: &VHost, exchange: &str, batch: &mut Vec<Message>) {
    black_box("route_direct_1q");
    publish_all(vhost, exchange, batch);
}

fn route_default_1q_cached(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let queues = bound_queues(&vhost, "", "direct", "", 1);
    route("", queues[0].name(), &queues, &vhost, cached!(measure_route_default_1q_cached), rounds);
}

#[inline(never)]
fn measure_route_default_1q_cached(vhost: &VHost, exchange: &str, cache: &mut PublishCache, batch: &mut Vec<Message>) {
    black_box("route_default_1q_cached");
    publish_all_cached(vhost, exchange, cache, batch);
}

fn route_direct_1q_cached(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let queues = bound_queues(&vhost, "hotpath.direct", "direct", "hotpath.key", 1);
    route("hotpath.direct", "hotpath.key", &queues, &vhost, cached!(measure_route_direct_1q_cached), rounds);
}

#[inline(never)]
fn measure_route_direct_1q_cached(vhost: &VHost, exchange: &str, cache: &mut PublishCache, batch: &mut Vec<Message>) {
    black_box("route_direct_1q_cached");
    publish_all_cached(vhost, exchange, cache, batch);
}

fn route_direct_4q(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let queues = bound_queues(&vhost, "hotpath.direct", "direct", "hotpath.key", 4);
    route("hotpath.direct", "hotpath.key", &queues, &vhost, by_name!(measure_route_direct_4q), rounds);
}

#[inline(never)]
fn measure_route_direct_4q(vhost: &VHost, exchange: &str, batch: &mut Vec<Message>) {
    black_box("route_direct_4q");
    publish_all(vhost, exchange, batch);
}

fn route_fanout_1q(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let queues = bound_queues(&vhost, "hotpath.fanout", "fanout", "", 1);
    route("hotpath.fanout", "hotpath.key", &queues, &vhost, by_name!(measure_route_fanout_1q), rounds);
}

#[inline(never)]
fn measure_route_fanout_1q(vhost: &VHost, exchange: &str, batch: &mut Vec<Message>) {
    black_box("route_fanout_1q");
    publish_all(vhost, exchange, batch);
}

fn route_fanout_4q(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let queues = bound_queues(&vhost, "hotpath.fanout", "fanout", "", 4);
    route("hotpath.fanout", "hotpath.key", &queues, &vhost, by_name!(measure_route_fanout_4q), rounds);
}

#[inline(never)]
fn measure_route_fanout_4q(vhost: &VHost, exchange: &str, batch: &mut Vec<Message>) {
    black_box("route_fanout_4q");
    publish_all(vhost, exchange, batch);
}

/// A plain consumer's options: no prefetch limit, no priority, no arguments.
fn consumer_options(no_ack: bool) -> ConsumeOptions {
    ConsumeOptions { no_ack, ..Default::default() }
}

/// A publish that a waiting no-ack consumer takes at once (the queue stays empty), as in
/// `mailroom bench --auto-ack` while the consumer keeps up: route, push, dispatch into the consumer's sink.
/// Between rounds (unmeasured) the connection's part: take every delivery and hand back its credit.
fn publish_deliver_noack(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let q = declare_queue(&vhost, "hotpath.direct_delivery");
    let (sink, mut events) = unbounded_channel();
    let options = consumer_options(true);
    let (_, consumer) = vhost.consume(q.name(), OWNER, options, sink).expect("consumer added");
    let template = wire_message("", q.name());
    let mut batch = Vec::with_capacity(BATCH);
    let mut cache = PublishCache::default();
    let mut round = |measured: bool| {
        batch.extend((0..BATCH).map(|_| template.clone()));
        if measured {
            measure_publish_deliver_noack(&vhost, &mut cache, &mut batch);
        } else {
            publish_all_cached(&vhost, "", &mut cache, &mut batch);
        }
        assert_eq!(q.message_count(), 0, "every message taken at once");
        let mut n = 0;
        while let Ok(ConsumerEvent::Deliver(d)) = events.try_recv() {
            black_box(&d);
            n += 1;
        }
        assert_eq!(n, BATCH, "every message delivered");
        q.settle_sent(consumer, BATCH as u32);
    };
    for _ in 0..WARMUP_ROUNDS {
        round(false);
    }
    for _ in 0..rounds {
        round(true);
    }
}

#[inline(never)]
fn measure_publish_deliver_noack(vhost: &VHost, cache: &mut PublishCache, batch: &mut Vec<Message>) {
    publish_all_cached(vhost, "", cache, batch);
}

// ---- deliver ------------------------------------------------------------------------------------------

/// Publishes `n` messages to the default exchange for `queue`, outside any measurement.
fn fill_queue(vhost: &VHost, queue: &str, n: usize) {
    let template = wire_message("", queue);
    for _ in 0..n {
        vhost.publish("", template.clone()).expect("default exchange");
    }
}

/// A manual-ack consumer on a queue whose ready messages are held back by a channel-wide prefetch (one
/// delivery stays unacked for good), then released: lifting the limit and calling `Queue::dispatch` is
/// what the connection does after a global `basic.qos`, and the dispatch loop is the one every delivery
/// to an acking consumer goes through.
fn deliver_ack(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let q = declare_queue(&vhost, "hotpath.deliver");
    let prefetch = Arc::new(ChannelPrefetch::default());
    prefetch.set_limit(1);
    let (sink, mut events) = unbounded_channel();
    let options = ConsumeOptions {
        no_ack: false,
        exclusive: false,
        prefetch: 0,
        channel_prefetch: Arc::clone(&prefetch),
        priority: 0,
        arguments: Default::default(),
    };
    vhost.consume(q.name(), OWNER, options, sink).expect("consumer added");
    // The one delivery that keeps the channel at its limit between rounds.
    fill_queue(&vhost, q.name(), 1);
    let mut tag = 1;
    let mut out = BytesMut::with_capacity(BATCH * 128);
    take_and_encode(&mut events, 1, &mut tag, &mut out, None);
    let mut ids = Vec::with_capacity(BATCH);
    let mut round = |measured: bool| {
        fill_queue(&vhost, q.name(), BATCH);
        assert_eq!(q.message_count() as usize, BATCH, "held back by the channel limit");
        prefetch.set_limit(0);
        if measured {
            measure_deliver_ack(&q, &mut events, &mut tag, &mut out, &mut ids);
        } else {
            q.dispatch();
            take_and_encode(&mut events, BATCH, &mut tag, &mut out, Some(&mut ids));
        }
        assert_eq!(q.message_count(), 0, "every message delivered");
        black_box(&out);
        out.clear();
        q.ack(&ids);
        ids.clear();
        prefetch.set_limit(1);
    };
    for _ in 0..WARMUP_ROUNDS {
        round(false);
    }
    for _ in 0..rounds {
        round(true);
    }
}

#[inline(never)]
fn measure_deliver_ack(
    q: &Arc<Queue>,
    events: &mut UnboundedReceiver<ConsumerEvent>,
    tag: &mut u64,
    out: &mut BytesMut,
    ids: &mut Vec<u64>,
) {
    q.dispatch();
    take_and_encode(events, BATCH, tag, out, Some(ids));
}

/// A no-ack consumer whose in-flight window is full, on a queue with ready messages: each round the
/// connection hands back the credit of `BATCH` deliveries it wrote (`Queue::settle_sent`, as after a
/// flush), the queue dispatches that many, and the connection takes and encodes as many from its sink.
fn deliver_noack(rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let q = declare_queue(&vhost, "hotpath.deliver");
    let (sink, mut events) = unbounded_channel();
    let options = consumer_options(true);
    let (_, consumer) = vhost.consume(q.name(), OWNER, options, sink).expect("consumer added");
    // Fill the consumer's in-flight window: publish until one message stays ready.
    let mut published = 0;
    while q.message_count() == 0 {
        fill_queue(&vhost, q.name(), 1);
        published += 1;
        assert!(published < 1_000_000, "a no-ack consumer's window is bounded");
    }
    let mut tag = 1;
    let mut out = BytesMut::with_capacity(BATCH * 128);
    let mut round = |measured: bool| {
        fill_queue(&vhost, q.name(), BATCH);
        assert_eq!(q.message_count() as usize, BATCH + 1, "the window is full");
        if measured {
            measure_deliver_noack(&q, consumer, &mut events, &mut tag, &mut out);
        } else {
            q.settle_sent(consumer, BATCH as u32);
            take_and_encode(&mut events, BATCH, &mut tag, &mut out, None);
        }
        assert_eq!(q.message_count(), 1, "BATCH more delivered");
        black_box(&out);
        out.clear();
    };
    for _ in 0..WARMUP_ROUNDS {
        round(false);
    }
    for _ in 0..rounds {
        round(true);
    }
}

#[inline(never)]
fn measure_deliver_noack(
    q: &Arc<Queue>,
    consumer: u64,
    events: &mut UnboundedReceiver<ConsumerEvent>,
    tag: &mut u64,
    out: &mut BytesMut,
) {
    q.settle_sent(consumer, BATCH as u32);
    take_and_encode(events, BATCH, tag, out, None);
}

// ---- ack ----------------------------------------------------------------------------------------------

/// `BATCH` unacked deliveries to a manual-ack consumer per round, and the `basic.ack` frames a client
/// sends for them (one per message, delivery tags 1..=BATCH). The channel's tag→message map is private
/// to mailroom-amqp, so here a tag indexes `ids`.
fn ack_rounds(measure: fn(&Arc<Queue>, &mut BytesMut, &[u64]), rounds: usize) {
    let (_broker, vhost) = open_vhost();
    let q = declare_queue(&vhost, "hotpath.ack");
    let (sink, mut events) = unbounded_channel();
    let options = consumer_options(false);
    vhost.consume(q.name(), OWNER, options, sink).expect("consumer added");
    let mut acks = BytesMut::new();
    for tag in 1..=BATCH as u64 {
        let ack = basic::Ack { delivery_tag: tag, multiple: false };
        codec::write_method(&mut acks, CHANNEL, &Method::Basic(basic::AMQPMethod::Ack(ack)));
    }
    let mut ids = Vec::with_capacity(BATCH);
    let mut round = |measured: bool| {
        fill_queue(&vhost, q.name(), BATCH);
        while let Ok(ConsumerEvent::Deliver(d)) = events.try_recv() {
            ids.push(d.id);
        }
        assert_eq!(ids.len(), BATCH, "every message delivered at once");
        assert_eq!(q.unacked_count() as usize, BATCH);
        let mut rbuf = acks.clone();
        if measured {
            measure(&q, &mut rbuf, &ids);
        } else {
            ack_frames(&q, &mut rbuf, &ids, 1);
        }
        assert_eq!(q.unacked_count(), 0, "every delivery acked");
        ids.clear();
    };
    for _ in 0..WARMUP_ROUNDS {
        round(false);
    }
    for _ in 0..rounds {
        round(true);
    }
}

/// Parses the ack frames in `rbuf` in place (as the connection reads method frames), acking `per_call`
/// messages per `Queue::ack`.
#[inline(always)]
fn ack_frames(q: &Arc<Queue>, rbuf: &mut BytesMut, ids: &[u64], per_call: usize) {
    let mut pending = [0u64; ACK_BATCH];
    let mut n = 0;
    while let Some(head) = codec::peek_frame(rbuf, DEFAULT_FRAME_MAX).expect("well-formed frames") {
        let (tag, _multiple) = codec::parse_basic_ack(head.payload(rbuf)).expect("a basic.ack");
        rbuf.advance(head.frame_len());
        pending[n] = ids[tag as usize - 1];
        n += 1;
        if n == per_call {
            q.ack(&pending[..n]);
            n = 0;
        }
    }
    if n > 0 {
        q.ack(&pending[..n]);
    }
}

fn ack_single(rounds: usize) {
    ack_rounds(measure_ack, rounds);
}

#[inline(never)]
fn measure_ack(q: &Arc<Queue>, rbuf: &mut BytesMut, ids: &[u64]) {
    ack_frames(q, rbuf, ids, 1);
}

fn ack_batch(rounds: usize) {
    ack_rounds(measure_ack_batch, rounds);
}

#[inline(never)]
fn measure_ack_batch(q: &Arc<Queue>, rbuf: &mut BytesMut, ids: &[u64]) {
    ack_frames(q, rbuf, ids, ACK_BATCH);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scenario runs to the end natively: its own checks (every message routed, delivered, acked)
    /// hold, so the counts it gives under callgrind are of the work it claims to do.
    #[test]
    fn every_scenario_runs() {
        for s in SCENARIOS {
            run_scenario(s);
        }
    }

    /// Scenario and function names are unique, so `--toggle-collect` counts one scenario's function only.
    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = SCENARIOS.iter().flat_map(|s| [s.name, s.function]).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before);
    }

    /// The wire publish parses back to the message the route scenarios publish.
    #[test]
    fn wire_message_round_trips() {
        let m = wire_message("hotpath.direct", "hotpath.key");
        assert_eq!(&*m.exchange, "hotpath.direct");
        assert_eq!(&*m.routing_key, "hotpath.key");
        assert_eq!(&m.body[..], BODY);
        assert_eq!(m.properties.delivery_mode(), &Some(1));
        assert!(!m.is_persistent());
        let _: &bytes::Bytes = m.raw_properties.as_ref().expect("raw properties kept");
    }
}
