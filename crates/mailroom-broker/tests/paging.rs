//! Deep queues keep bodies on disk (issue 5): a tiny per-queue memory budget forces paging, then every
//! queue feature is checked against the paged messages: order, bodies and properties, priorities, TTL,
//! requeue, restart recovery (index only), transient paging, and a damaged record.

use bytes::Bytes;
use mailroom_broker::{
    AMQPValue, BasicProperties, Broker, BrokerConfig, ChannelPrefetch, ConsumeOptions, ConsumerEvent, Delivery,
    ExchangeOptions, FieldTable, LongString, Message, PagingConfig, Queue, QueueOptions, ShortString, VHost,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A budget of a few messages: everything past the first handful is paged.
fn small_paging() -> PagingConfig {
    PagingConfig { queue_memory_bytes: 4096, read_ahead_messages: 8, read_ahead_bytes: 4096, dir: None }
}

fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("mailroom-paging-tests").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn open(data_dir: Option<&Path>) -> Broker {
    Broker::open(BrokerConfig {
        data_dir: data_dir.map(Path::to_path_buf),
        paging: small_paging(),
        ..Default::default()
    })
    .unwrap()
}

fn args(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn declare(v: &VHost, name: &str, durable: bool, arguments: FieldTable) -> Arc<Queue> {
    v.declare_queue(name, &QueueOptions { durable, arguments, ..Default::default() }, 1).unwrap();
    v.queue(name, 1).unwrap()
}

fn body(i: usize) -> String {
    // Bodies of different sizes, so a wrong offset or length shows.
    format!("message-{i}-{}", "x".repeat(100 + i % 37))
}

fn props(i: usize, persistent: bool) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("n".into(), AMQPValue::LongLongInt(i as i64));
    BasicProperties::default()
        .with_delivery_mode(if persistent { 2 } else { 1 })
        .with_message_id(ShortString::from(format!("id-{i}")))
        .with_headers(headers)
}

async fn publish(v: &VHost, queue: &str, i: usize, properties: BasicProperties) {
    let m = Message::new("", queue, properties, Bytes::from(body(i)));
    let r = v.publish("", m).unwrap();
    assert!(r.routed && !r.rejected, "message {i} not taken");
    for t in r.durable {
        t.wait().await.unwrap();
    }
}

fn consume(v: &VHost, queue: &str, prefetch: u32) -> mpsc::UnboundedReceiver<ConsumerEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let options = ConsumeOptions {
        no_ack: false,
        exclusive: false,
        prefetch,
        channel_prefetch: Arc::new(ChannelPrefetch::default()),
        priority: 0,
        arguments: Default::default(),
    };
    v.consume(queue, 1, options, tx).unwrap();
    rx
}

/// Receives `n` deliveries, acking each (so a prefetch-limited consumer keeps going).
async fn take(rx: &mut mpsc::UnboundedReceiver<ConsumerEvent>, n: usize, ack: bool) -> Vec<Delivery> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} deliveries arrived", out.len()))
            .expect("consumer sink open");
        let ConsumerEvent::Deliver(d) = ev else { panic!("consumer cancelled") };
        if ack {
            d.queue.ack(&[d.id]);
        }
        out.push(d);
    }
    out
}

fn number(d: &Delivery) -> i64 {
    match d.message.headers().and_then(|h| h.inner().get("n")) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        other => panic!("header n missing: {other:?}"),
    }
}

fn check_message(d: &Delivery, i: usize) {
    assert_eq!(String::from_utf8(d.message.body.to_vec()).unwrap(), body(i), "body of {i}");
    assert_eq!(number(d), i as i64, "header of {i}");
    assert_eq!(d.message.properties.message_id().as_ref().map(|s| s.as_str().to_owned()), Some(format!("id-{i}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_messages_come_back_in_order_with_bodies_and_properties() {
    let dir = test_dir("order");
    let broker = open(Some(&dir));
    let v = broker.vhost("/").unwrap();
    // A durable queue (persistent bodies are in its store) and a transient one (bodies go to paging).
    for (name, durable) in [("durable", true), ("transient", false)] {
        let q = declare(&v, name, durable, FieldTable::default());
        for i in 0..600 {
            publish(&v, name, i, props(i, durable)).await;
        }
        assert_eq!(q.message_count(), 600);
        assert!(q.paged_count() > 550, "{name}: only {} paged", q.paged_count());
        assert!(q.held_bytes() <= 4096, "{name}: {} bytes in RAM", q.held_bytes());
        let mut rx = consume(&v, name, 50);
        let got = take(&mut rx, 600, true).await;
        for (i, d) in got.iter().enumerate() {
            check_message(d, i);
            assert!(!d.redelivered);
        }
        assert_eq!(q.message_count(), 0);
        assert_eq!(q.paged_count(), 0);
    }
    // basic.get and peek read paged bodies too.
    let q = declare(&v, "get", false, FieldTable::default());
    for i in 0..100 {
        publish(&v, "get", i, props(i, false)).await;
    }
    let peeked = q.peek(90, 5);
    assert_eq!(
        peeked.iter().map(|p| String::from_utf8(p.message.body.to_vec()).unwrap()).collect::<Vec<_>>(),
        (90..95).map(body).collect::<Vec<_>>()
    );
    for i in 0..100 {
        let g = q.get(true).unwrap();
        assert_eq!(String::from_utf8(g.message.body.to_vec()).unwrap(), body(i));
    }
    assert!(q.get(true).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_are_kept_across_paging() {
    let broker = open(None);
    let v = broker.vhost("/").unwrap();
    let q = declare(&v, "prio", false, args(&[("x-max-priority", AMQPValue::ShortShortUInt(5))]));
    for i in 0..300 {
        publish(&v, "prio", i, props(i, false).with_priority((i % 6) as u8)).await;
    }
    assert!(q.paged_count() > 250);
    let mut rx = consume(&v, "prio", 10);
    let got: Vec<i64> = take(&mut rx, 300, true).await.iter().map(number).collect();
    let mut expected: Vec<i64> = (0..300).collect();
    // Highest priority first, FIFO within one priority.
    expected.sort_by_key(|n| (std::cmp::Reverse(n % 6), *n));
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_messages_expire_and_are_dead_lettered_with_their_bodies() {
    let broker = open(None);
    let v = broker.vhost("/").unwrap();
    v.declare_exchange("dlx", "fanout", &ExchangeOptions::default()).unwrap();
    let dlq = declare(&v, "dlq", false, FieldTable::default());
    v.bind_queue("dlq", "dlx", "", &FieldTable::default(), 1).unwrap();
    let q = declare(
        &v,
        "ttl",
        false,
        args(&[
            ("x-message-ttl", AMQPValue::LongUInt(300)),
            ("x-dead-letter-exchange", AMQPValue::LongString(LongString::from(&b"dlx"[..]))),
        ]),
    );
    for i in 0..200 {
        publish(&v, "ttl", i, props(i, false)).await;
    }
    assert!(q.paged_count() > 150);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(q.message_count(), 0, "all expired");
    assert_eq!(dlq.message_count(), 200);
    let mut rx = consume(&v, "dlq", 20);
    let got = take(&mut rx, 200, true).await;
    for (i, d) in got.iter().enumerate() {
        check_message(d, i);
        assert!(d.message.headers().unwrap().inner().contains_key("x-death"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_message_goes_back_to_its_place_in_a_paged_queue() {
    let dir = test_dir("requeue");
    let broker = open(Some(&dir));
    let v = broker.vhost("/").unwrap();
    let q = declare(&v, "rq", true, FieldTable::default());
    for i in 0..300 {
        publish(&v, "rq", i, props(i, true)).await;
    }
    let mut rx = consume(&v, "rq", 5);
    // Take five without acking, requeue them: they come back first, marked redelivered.
    let first = take(&mut rx, 5, false).await;
    assert_eq!(first.iter().map(number).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    let ids: Vec<u64> = first.iter().map(|d| d.id).collect();
    q.reject(&ids, true);
    let got = take(&mut rx, 300, true).await;
    for (i, d) in got.iter().enumerate() {
        check_message(d, i);
        assert_eq!(d.redelivered, i < 5, "redelivered flag of {i}");
    }
    assert_eq!(q.message_count() + q.unacked_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_the_index_without_loading_bodies() {
    let dir = test_dir("recovery");
    {
        let broker = open(Some(&dir));
        let v = broker.vhost("/").unwrap();
        declare(&v, "deep", true, FieldTable::default());
        for i in 0..1000 {
            publish(&v, "deep", i, props(i, true)).await;
        }
        // Two taken and not acked: they come back redelivered.
        let q = v.queue("deep", 1).unwrap();
        q.get(false).unwrap();
        q.get(false).unwrap();
    }
    let broker = open(Some(&dir));
    let v = broker.vhost("/").unwrap();
    let q = v.queue("deep", 1).unwrap();
    assert_eq!(q.message_count(), 1000);
    assert_eq!(q.paged_count(), 1000, "every body stays on disk after recovery");
    assert_eq!(q.held_bytes(), 0);
    assert_eq!(q.ready_bytes(), (0..1000).map(|i| body(i).len() as u64).sum::<u64>());
    let mut rx = consume(&v, "deep", 20);
    let got = take(&mut rx, 1000, true).await;
    for (i, d) in got.iter().enumerate() {
        check_message(d, i);
        assert_eq!(d.redelivered, i < 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_messages_past_the_budget_are_paged_to_disk() {
    let paging_dir = test_dir("transient");
    let broker = Broker::open(BrokerConfig {
        paging: PagingConfig { dir: Some(paging_dir.clone()), ..small_paging() },
        ..Default::default()
    })
    .unwrap();
    let v = broker.vhost("/").unwrap();
    let q = declare(&v, "t", false, FieldTable::default());
    for i in 0..2000 {
        publish(&v, "t", i, props(i, i % 2 == 0)).await;
    }
    assert!(q.held_bytes() <= 4096, "{} bytes in RAM", q.held_bytes());
    assert!(broker.held_bytes() <= 4096);
    // The bodies are in segment files under the paging directory (written by its own thread).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let on_disk = || -> u64 {
        walk(&paging_dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .map(|p| p.metadata().unwrap().len())
            .sum()
    };
    while on_disk() < 2000 * 100 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(on_disk() >= 2000 * 100, "paging files hold {} bytes", on_disk());
    let mut rx = consume(&v, "t", 100);
    let got = take(&mut rx, 2000, true).await;
    for (i, d) in got.iter().enumerate() {
        check_message(d, i);
    }
    // Settled paging segments are deleted (the active one stays).
    v.delete_queue("t", false, false, 1).unwrap();
    assert_eq!(on_disk(), 0);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_reported_and_skipped_while_reading_ahead() {
    let dir = test_dir("damaged");
    let broker = open(Some(&dir));
    let v = broker.vhost("/").unwrap();
    let q = declare(&v, "dmg", true, FieldTable::default());
    for i in 0..300 {
        publish(&v, "dmg", i, props(i, true)).await;
    }
    assert!(q.paged_count() > 250);
    // Flip a byte inside message 150's body in its segment file: its CRC no longer checks.
    let needle = body(150);
    let mut hit = false;
    for seg in walk(&dir.join("msgs")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "seg")) {
        let mut data = std::fs::read(&seg).unwrap();
        if let Some(at) = data.windows(needle.len()).position(|w| w == needle.as_bytes()) {
            data[at + 3] ^= 0xff;
            std::fs::write(&seg, &data).unwrap();
            hit = true;
        }
    }
    assert!(hit, "message 150 not found on disk");
    let mut rx = consume(&v, "dmg", 30);
    let got: Vec<i64> = take(&mut rx, 299, true).await.iter().map(number).collect();
    let expected: Vec<i64> = (0..300).filter(|&i| i != 150).collect();
    assert_eq!(got, expected);
    assert_eq!(q.message_count(), 0, "the damaged message was dropped, not left blocking the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovered_messages_past_the_delivery_limit_are_dead_lettered_at_restore() {
    let dir = test_dir("limit");
    let durable = ExchangeOptions { durable: true, ..Default::default() };
    {
        let broker = open(Some(&dir));
        let v = broker.vhost("/").unwrap();
        v.declare_exchange("dlx", "fanout", &durable).unwrap();
        declare(&v, "dlq", true, FieldTable::default());
        v.bind_queue("dlq", "dlx", "", &FieldTable::default(), 1).unwrap();
        let q = declare(
            &v,
            "limited",
            true,
            args(&[
                ("x-delivery-limit", AMQPValue::LongUInt(0)),
                ("x-dead-letter-exchange", AMQPValue::LongString(LongString::from(&b"dlx"[..]))),
            ]),
        );
        for i in 0..3 {
            publish(&v, "limited", i, props(i, true)).await;
        }
        // Message 0 is delivered once and the broker stops without an ack: that delivery used its limit.
        assert_eq!(number_of(&q.get(false).unwrap().message), 0);
    }
    let broker = open(Some(&dir));
    let v = broker.vhost("/").unwrap();
    let q = v.queue("limited", 1).unwrap();
    let dlq = v.queue("dlq", 1).unwrap();
    assert_eq!(q.message_count(), 2);
    assert_eq!(dlq.message_count(), 1);
    assert_eq!(number_of(&dlq.get(true).unwrap().message), 0);
    assert_eq!(number_of(&q.get(true).unwrap().message), 1);
}

fn number_of(m: &Message) -> i64 {
    match m.headers().and_then(|h| h.inner().get("n")) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        other => panic!("header n missing: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeued_bodies_past_the_budget_are_paged_out_again() {
    let broker = open(None);
    let v = broker.vhost("/").unwrap();
    let q = declare(&v, "back", false, FieldTable::default());
    for i in 0..400 {
        publish(&v, "back", i, props(i, false)).await;
    }
    // Take 200 (read from disk one by one), then return them all: 200 bodies land in RAM at once.
    let ids: Vec<u64> = (0..200).map(|_| q.get(false).unwrap().id).collect();
    q.reject(&ids, true);
    assert_eq!(q.message_count(), 400);
    assert!(q.held_bytes() <= 4096, "{} bytes still in RAM after the requeue", q.held_bytes());
    for i in 0..400 {
        let g = q.get(true).unwrap();
        assert_eq!(String::from_utf8(g.message.body.to_vec()).unwrap(), body(i));
        assert_eq!(g.redelivered, i < 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_usable_paging_directory_bodies_stay_in_ram_and_nothing_is_lost() {
    // A path under a regular file can never be created.
    let file = test_dir("no-paging").join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let broker = Broker::open(BrokerConfig {
        paging: PagingConfig { dir: Some(file.join("paging")), ..small_paging() },
        ..Default::default()
    })
    .unwrap();
    let v = broker.vhost("/").unwrap();
    let q = declare(&v, "stuck", false, FieldTable::default());
    for i in 0..300 {
        publish(&v, "stuck", i, props(i, false)).await;
    }
    assert_eq!(q.paged_count(), 0);
    assert!(q.held_bytes() > 4096, "the bodies had nowhere else to go");
    let mut rx = consume(&v, "stuck", 50);
    for (i, d) in take(&mut rx, 300, true).await.iter().enumerate() {
        check_message(d, i);
    }
}
