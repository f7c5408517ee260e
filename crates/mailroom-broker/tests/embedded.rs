//! The embedded broker with no sockets: routing through every exchange type, consumers through their
//! `ConsumerSink`, settlement, TTL with dead-lettering, length limits and queue expiry.
//!
//! Tests that depend on time run on tokio's paused clock, so they are instant and deterministic.

use bytes::Bytes;
use mailroom_broker::{
    AMQPValue, BasicProperties, Broker, BrokerConfig, ChannelPrefetch, ConnectionId, ConsumeOptions, ConsumerEvent,
    Delivery, ExchangeOptions, FieldArray, FieldTable, LongString, Message, Queue, QueueOptions, VHost,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

struct Env {
    _broker: Broker,
    vhost: Arc<VHost>,
    owner: ConnectionId,
}

fn env() -> Env {
    let broker = Broker::open(BrokerConfig::default()).unwrap();
    let vhost = broker.vhost("/").unwrap();
    let owner = broker.next_connection_id();
    Env { _broker: broker, vhost, owner }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

impl Env {
    fn queue(&self, name: &str) -> Arc<Queue> {
        self.queue_with(name, FieldTable::default())
    }

    fn queue_with(&self, name: &str, arguments: FieldTable) -> Arc<Queue> {
        let ok = self.vhost.declare_queue(name, &QueueOptions { arguments, ..Default::default() }, self.owner).unwrap();
        self.vhost.queue(&ok.name, self.owner).unwrap()
    }

    fn exchange(&self, name: &str, kind: &str) {
        self.vhost.declare_exchange(name, kind, &ExchangeOptions::default()).unwrap();
    }

    fn bind(&self, queue: &str, exchange: &str, key: &str, args: FieldTable) {
        self.vhost.bind_queue(queue, exchange, key, &args, self.owner).unwrap();
    }

    fn publish(&self, exchange: &str, key: &str, body: &str) -> bool {
        self.publish_props(exchange, key, body, BasicProperties::default())
    }

    fn publish_props(&self, exchange: &str, key: &str, body: &str, props: BasicProperties) -> bool {
        let msg = Message::new(exchange, key, props, Bytes::copy_from_slice(body.as_bytes()));
        self.vhost.publish(exchange, msg).unwrap().routed
    }

    /// A consumer with the given prefetch (0 = unlimited); returns the queue, its id and its event stream.
    fn consume(
        &self,
        queue: &str,
        no_ack: bool,
        prefetch: u32,
    ) -> (Arc<Queue>, u64, mpsc::UnboundedReceiver<ConsumerEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let options = ConsumeOptions {
            no_ack,
            exclusive: false,
            prefetch,
            channel_prefetch: Arc::new(ChannelPrefetch::default()),
            priority: 0,
            arguments: Default::default(),
        };
        let (q, id) = self.vhost.consume(queue, self.owner, options, tx).unwrap();
        (q, id, rx)
    }
}

/// Deliveries already waiting in a sink (dispatch is synchronous, so nothing is in flight).
fn drain(rx: &mut mpsc::UnboundedReceiver<ConsumerEvent>) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            ConsumerEvent::Deliver(d) => out.push(d),
            ConsumerEvent::Cancelled(id) => panic!("consumer {id} cancelled"),
        }
    }
    out
}

fn bodies(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(|d| String::from_utf8(d.message.body.to_vec()).unwrap()).collect()
}

fn header<'a>(d: &'a Delivery, key: &str) -> Option<&'a AMQPValue> {
    d.message.headers().and_then(|h| h.inner().get(key))
}

#[tokio::test]
async fn direct_exchange_routes_by_exact_key() {
    let e = env();
    e.exchange("ex.direct", "direct");
    e.queue("d1");
    e.queue("d2");
    e.bind("d1", "ex.direct", "red", FieldTable::default());
    e.bind("d2", "ex.direct", "green", FieldTable::default());
    e.bind("d2", "ex.direct", "red", FieldTable::default());
    let (_, _, mut r1) = e.consume("d1", true, 0);
    let (_, _, mut r2) = e.consume("d2", true, 0);
    assert!(e.publish("ex.direct", "red", "r"));
    assert!(e.publish("ex.direct", "green", "g"));
    assert!(!e.publish("ex.direct", "blue", "b"));
    assert_eq!(bodies(&drain(&mut r1)), ["r"]);
    assert_eq!(bodies(&drain(&mut r2)), ["r", "g"]);
    // The default exchange routes by queue name.
    assert!(e.publish("", "d1", "default"));
    let got = drain(&mut r1);
    assert_eq!(bodies(&got), ["default"]);
    assert_eq!((&*got[0].message.exchange, &*got[0].message.routing_key), ("", "d1"));
}

#[tokio::test]
async fn fanout_exchange_copies_to_every_bound_queue_once() {
    let e = env();
    e.exchange("ex.fanout", "fanout");
    for q in ["f1", "f2", "f3"] {
        e.queue(q);
        e.bind(q, "ex.fanout", "ignored", FieldTable::default());
    }
    // A second binding to the same queue does not duplicate.
    e.bind("f1", "ex.fanout", "other", FieldTable::default());
    let mut rxs: Vec<_> = ["f1", "f2", "f3"].iter().map(|q| e.consume(q, true, 0).2).collect();
    assert!(e.publish("ex.fanout", "any.key", "hello"));
    for rx in &mut rxs {
        assert_eq!(bodies(&drain(rx)), ["hello"]);
    }
}

#[tokio::test]
async fn topic_exchange_matches_words_and_wildcards() {
    let e = env();
    e.exchange("ex.topic", "topic");
    let patterns = [("t-star", "a.*"), ("t-hash", "a.#"), ("t-mid", "a.#.b"), ("t-all", "#"), ("t-exact", "a.b")];
    for (q, p) in patterns {
        e.queue(q);
        e.bind(q, "ex.topic", p, FieldTable::default());
    }
    let mut rxs: Vec<_> = patterns.iter().map(|(q, _)| (q.to_string(), e.consume(q, true, 0).2)).collect();
    for key in ["a", "a.b", "a.x.b", "a.", "", "b"] {
        e.publish("ex.topic", key, key);
    }
    let got: Vec<(String, Vec<String>)> = rxs.iter_mut().map(|(q, rx)| (q.clone(), bodies(&drain(rx)))).collect();
    let expect = |q: &str, keys: &[&str]| (q.to_string(), keys.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(
        got,
        vec![
            expect("t-star", &["a.b", "a."]),
            expect("t-hash", &["a", "a.b", "a.x.b", "a."]),
            expect("t-mid", &["a.b", "a.x.b"]),
            expect("t-all", &["a", "a.b", "a.x.b", "a.", "", "b"]),
            expect("t-exact", &["a.b"]),
        ]
    );
}

#[tokio::test]
async fn headers_exchange_all_and_any() {
    let e = env();
    e.exchange("ex.headers", "headers");
    e.queue("h-all");
    e.queue("h-any");
    e.queue("h-empty-all");
    e.bind(
        "h-all",
        "ex.headers",
        "",
        table(&[("x-match", text("all")), ("format", text("pdf")), ("type", text("report"))]),
    );
    e.bind(
        "h-any",
        "ex.headers",
        "",
        table(&[("x-match", text("any")), ("format", text("pdf")), ("type", text("log"))]),
    );
    e.bind("h-empty-all", "ex.headers", "", FieldTable::default());
    let (_, _, mut all) = e.consume("h-all", true, 0);
    let (_, _, mut any) = e.consume("h-any", true, 0);
    let (_, _, mut empty) = e.consume("h-empty-all", true, 0);
    let with = |h: &[(&str, AMQPValue)]| BasicProperties::default().with_headers(table(h));
    e.publish_props("ex.headers", "", "both", with(&[("format", text("pdf")), ("type", text("report"))]));
    e.publish_props("ex.headers", "", "pdf-only", with(&[("format", text("pdf"))]));
    e.publish_props("ex.headers", "", "log", with(&[("type", text("log"))]));
    // Values must match in type: integer 1 is not the string "pdf", and not a match for any binding.
    e.publish_props("ex.headers", "", "int", with(&[("format", AMQPValue::LongInt(1))]));
    e.publish("ex.headers", "", "none");
    assert_eq!(bodies(&drain(&mut all)), ["both"]);
    assert_eq!(bodies(&drain(&mut any)), ["both", "pdf-only", "log"]);
    assert_eq!(bodies(&drain(&mut empty)), ["both", "pdf-only", "log", "int", "none"]);
}

#[tokio::test]
async fn ack_reject_and_requeue_through_a_consumer() {
    let e = env();
    let q = e.queue("settle");
    for i in 1..=4 {
        e.publish("", "settle", &format!("m{i}"));
    }
    let (_, _, mut rx) = e.consume("settle", false, 2);
    let first = drain(&mut rx);
    assert_eq!(bodies(&first), ["m1", "m2"], "prefetch 2");
    assert_eq!((q.message_count(), q.unacked_count()), (2, 2));

    // Requeue m1: it goes back to the head, redelivered, and (prefetch freed) comes straight back.
    q.reject(&[first[0].id], true);
    let again = drain(&mut rx);
    assert_eq!(bodies(&again), ["m1"]);
    assert!(again[0].redelivered);
    assert!(!first[1].redelivered);

    // Ack m2: m3 arrives. Reject m1 without requeue: gone (no DLX), m4 arrives.
    q.ack(&[first[1].id]);
    let m3 = drain(&mut rx);
    assert_eq!(bodies(&m3), ["m3"]);
    q.reject(&[again[0].id], false);
    let m4 = drain(&mut rx);
    assert_eq!(bodies(&m4), ["m4"]);
    q.ack(&[m3[0].id, m4[0].id]);
    assert_eq!((q.message_count(), q.unacked_count()), (0, 0));
    // Settling twice, or an unknown id, is a no-op.
    q.ack(&[m3[0].id, 9999]);
    q.reject(&[m4[0].id], true);
    assert_eq!((q.message_count(), q.unacked_count()), (0, 0));
    assert!(drain(&mut rx).is_empty());
}

#[tokio::test]
async fn cancelled_consumer_leaves_its_unacked_and_others_take_over() {
    let e = env();
    let q = e.queue("handover");
    let (_, c1, mut r1) = e.consume("handover", false, 1);
    let (_, _, mut r2) = e.consume("handover", false, 1);
    for i in 1..=3 {
        e.publish("", "handover", &format!("m{i}"));
    }
    let d1 = drain(&mut r1);
    let d2 = drain(&mut r2);
    assert_eq!((bodies(&d1), bodies(&d2)), (vec!["m1".to_string()], vec!["m2".to_string()]), "round-robin");
    e.vhost.cancel(&q, c1);
    // Its delivery stays unacked until its owner settles it; requeue hands it to the remaining consumer
    // after that consumer's current one.
    q.reject(&[d1[0].id], true);
    assert!(drain(&mut r2).is_empty(), "r2 is at its prefetch");
    q.ack(&[d2[0].id]);
    let next = drain(&mut r2);
    assert_eq!(bodies(&next), ["m1"]);
    assert!(next[0].redelivered);
}

#[tokio::test]
async fn a_gone_consumer_is_dropped_and_its_message_kept() {
    let e = env();
    let q = e.queue("gone");
    let (_, _, rx) = e.consume("gone", false, 0);
    drop(rx);
    e.publish("", "gone", "kept");
    assert_eq!((q.message_count(), q.consumer_count(), q.unacked_count()), (1, 0, 0));
    let got = q.get(true).unwrap();
    assert_eq!(&got.message.body[..], b"kept");
}

fn death(d: &Delivery) -> &FieldTable {
    let Some(AMQPValue::FieldArray(deaths)) = header(d, "x-death") else {
        panic!("no x-death in {:?}", d.message.headers())
    };
    match deaths.as_slice().first() {
        Some(AMQPValue::FieldTable(t)) => t,
        other => panic!("bad x-death entry {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_dead_letters_with_x_death() {
    let e = env();
    e.exchange("dlx", "fanout");
    e.queue("dead");
    e.bind("dead", "dlx", "", FieldTable::default());
    let src = e.queue_with(
        "ttl-src",
        table(&[("x-message-ttl", AMQPValue::LongInt(100)), ("x-dead-letter-exchange", text("dlx"))]),
    );
    let (_, _, mut dead) = e.consume("dead", true, 0);
    e.publish_props("", "ttl-src", "short", BasicProperties::default().with_expiration("30".into()));
    e.publish("", "ttl-src", "queue-ttl");
    assert_eq!(src.message_count(), 2);

    tokio::time::sleep(Duration::from_millis(50)).await;
    // The lower of message expiration and queue TTL wins; expiry is prompt, with no consumer on the queue.
    let first = drain(&mut dead);
    assert_eq!(bodies(&first), ["short"]);
    assert_eq!(src.message_count(), 1);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let second = drain(&mut dead);
    assert_eq!(bodies(&second), ["queue-ttl"]);
    assert_eq!(src.message_count(), 0);

    let d = &first[0];
    assert_eq!(d.message.properties.expiration(), &None, "expiration removed");
    assert_eq!(&*d.message.exchange, "dlx");
    assert_eq!(&*d.message.routing_key, "ttl-src", "routed by the original key without a DL routing key");
    let t = death(d).inner();
    assert_eq!(t.get("count"), Some(&AMQPValue::LongLongInt(1)));
    assert_eq!(t.get("reason"), Some(&text("expired")));
    assert_eq!(t.get("queue"), Some(&text("ttl-src")));
    assert_eq!(t.get("exchange"), Some(&text("")));
    assert_eq!(t.get("routing-keys"), Some(&AMQPValue::FieldArray(FieldArray::from(vec![text("ttl-src")]))));
    assert_eq!(t.get("original-expiration"), Some(&text("30")));
    assert!(matches!(t.get("time"), Some(AMQPValue::Timestamp(_))));
    assert_eq!(header(d, "x-first-death-reason"), Some(&text("expired")));
    assert_eq!(header(d, "x-first-death-queue"), Some(&text("ttl-src")));
    assert_eq!(header(d, "x-first-death-exchange"), Some(&text("")));
    assert!(death(&second[0]).inner().get("original-expiration").is_none());
}

#[tokio::test(start_paused = true)]
async fn rejected_messages_dead_letter_and_x_death_counts_repeat_deaths() {
    let e = env();
    e.queue_with("retry", table(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("work"))]));
    let work = e.queue_with(
        "work",
        table(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("retry"))]),
    );
    e.publish("", "work", "job");
    for round in 1..=3i64 {
        // Reject from work -> retry; move it back from retry -> work by rejecting there as well.
        let got = work.get(false).unwrap();
        work.reject(&[got.id], false);
        let retry = e.vhost.queue("retry", e.owner).unwrap();
        let back = retry.get(false).unwrap();
        let Some(AMQPValue::FieldArray(deaths)) =
            back.message.headers().and_then(|h| h.inner().get("x-death")).cloned()
        else {
            panic!("x-death")
        };
        let AMQPValue::FieldTable(newest) = &deaths.as_slice()[0] else { panic!() };
        assert_eq!(newest.inner().get("queue"), Some(&text("work")));
        assert_eq!(newest.inner().get("reason"), Some(&text("rejected")));
        assert_eq!(newest.inner().get("count"), Some(&AMQPValue::LongLongInt(round)));
        retry.reject(&[back.id], false);
    }
    assert_eq!(work.message_count(), 1, "rejection breaks the cycle check, so the message keeps circulating");
}

#[tokio::test]
async fn max_length_drop_head_dead_letters_the_oldest() {
    let e = env();
    e.queue("overflowed");
    let q = e.queue_with(
        "bounded",
        table(&[
            ("x-max-length", AMQPValue::LongInt(3)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("overflowed")),
        ]),
    );
    for i in 1..=5 {
        assert!(e.publish("", "bounded", &format!("m{i}")));
    }
    assert_eq!(q.message_count(), 3);
    let kept: Vec<String> =
        (0..3).map(|_| String::from_utf8(q.get(true).unwrap().message.body.to_vec()).unwrap()).collect();
    assert_eq!(kept, ["m3", "m4", "m5"]);
    let (_, _, mut rx) = e.consume("overflowed", true, 0);
    let dropped = drain(&mut rx);
    assert_eq!(bodies(&dropped), ["m1", "m2"]);
    assert_eq!(death(&dropped[0]).inner().get("reason"), Some(&text("maxlen")));
}

#[tokio::test]
async fn max_length_counts_ready_messages_only() {
    let e = env();
    let q = e.queue_with("bounded2", table(&[("x-max-length", AMQPValue::LongInt(2))]));
    e.publish("", "bounded2", "a");
    e.publish("", "bounded2", "b");
    let a = q.get(false).unwrap();
    e.publish("", "bounded2", "c");
    assert_eq!((q.message_count(), q.unacked_count()), (2, 1), "an unacked message does not count");
    q.ack(&[a.id]);
}

#[tokio::test]
async fn reject_publish_overflow_refuses_new_messages() {
    let e = env();
    let q =
        e.queue_with("full", table(&[("x-max-length", AMQPValue::LongInt(1)), ("x-overflow", text("reject-publish"))]));
    let first =
        e.vhost.publish("", Message::new("", "full", BasicProperties::default(), Bytes::from_static(b"1"))).unwrap();
    assert!(first.routed && !first.rejected);
    let second =
        e.vhost.publish("", Message::new("", "full", BasicProperties::default(), Bytes::from_static(b"2"))).unwrap();
    assert!(second.rejected, "{second:?}");
    assert_eq!(&q.get(true).unwrap().message.body[..], b"1");
    assert!(q.get(true).is_none());
}

#[tokio::test(start_paused = true)]
async fn x_expires_deletes_an_unused_queue() {
    let e = env();
    e.queue_with("ephemeral", table(&[("x-expires", AMQPValue::LongInt(100))]));
    tokio::time::sleep(Duration::from_millis(60)).await;
    // A passive declare is use: the timer starts over.
    e.vhost.declare_queue("ephemeral", &QueueOptions { passive: true, ..Default::default() }, e.owner).unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(e.vhost.queue("ephemeral", e.owner).is_ok(), "touched 60 ms ago");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(e.vhost.queue("ephemeral", e.owner).is_err(), "unused for 120 ms with x-expires 100");
}

#[tokio::test(start_paused = true)]
async fn x_expires_waits_while_a_consumer_is_attached() {
    let e = env();
    let q = e.queue_with("watched", table(&[("x-expires", AMQPValue::LongInt(100))]));
    let (_, id, _rx) = e.consume("watched", true, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(e.vhost.queue("watched", e.owner).is_ok(), "a queue with a consumer is in use");
    e.vhost.cancel(&q, id);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(e.vhost.queue("watched", e.owner).is_ok(), "the timer counts from the last cancel");
    tokio::time::sleep(Duration::from_millis(70)).await;
    assert!(e.vhost.queue("watched", e.owner).is_err());
    assert!(q.is_deleted());
}

#[tokio::test(start_paused = true)]
async fn requeued_message_past_its_ttl_expires_promptly() {
    // A message whose TTL passes while it is unacked must expire as soon as it is requeued (RabbitMQ drops
    // expired messages after a requeue; issue 6 asks Mailroom to expire promptly even with no consumer).
    let e = env();
    e.queue("dead2");
    let q = e.queue_with(
        "ttl-requeue",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dead2")),
        ]),
    );
    e.publish("", "ttl-requeue", "stale");
    let got = q.get(false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    q.reject(&[got.id], true);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let dead = e.vhost.queue("dead2", e.owner).unwrap();
    assert_eq!(
        (q.message_count(), dead.message_count()),
        (0, 1),
        "the requeued message is past its TTL: it should be dead-lettered, not left ready"
    );
}

#[tokio::test(start_paused = true)]
async fn requeued_message_after_purge_still_expires() {
    // Purge drops ready messages only; an unacked one requeued afterwards keeps its TTL.
    let e = env();
    let q = e.queue_with("ttl-purge", table(&[("x-message-ttl", AMQPValue::LongInt(100))]));
    e.publish("", "ttl-purge", "held");
    e.publish("", "ttl-purge", "purged");
    let got = q.get(false).unwrap();
    assert_eq!(q.purge(), 1);
    q.reject(&[got.id], true);
    assert_eq!(q.message_count(), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(q.message_count(), 0, "the requeued message is past its 100 ms TTL");
}

#[tokio::test]
async fn max_length_bytes_does_not_drop_a_message_a_waiting_consumer_takes() {
    let e = env();
    e.queue("mlb-dead");
    e.queue_with(
        "mlb",
        table(&[
            ("x-max-length-bytes", AMQPValue::LongInt(10)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("mlb-dead")),
        ]),
    );
    let (_, _, mut rx) = e.consume("mlb", true, 0);
    e.publish("", "mlb", &"x".repeat(100));
    assert_eq!(drain(&mut rx).len(), 1, "delivered directly to the waiting consumer");
    assert_eq!(e.vhost.queue("mlb-dead", e.owner).unwrap().message_count(), 0);
}

#[tokio::test]
async fn max_length_zero_still_feeds_a_waiting_consumer() {
    let e = env();
    e.queue_with("ml0", table(&[("x-max-length", AMQPValue::LongInt(0))]));
    let (_, _, mut rx) = e.consume("ml0", true, 0);
    e.publish("", "ml0", "zero");
    assert_eq!(bodies(&drain(&mut rx)), ["zero"]);
}

#[tokio::test]
async fn requeue_respects_max_length() {
    let e = env();
    let q = e.queue_with("ml-requeue", table(&[("x-max-length", AMQPValue::LongInt(2))]));
    e.publish("", "ml-requeue", "1");
    e.publish("", "ml-requeue", "2");
    let one = q.get(false).unwrap();
    e.publish("", "ml-requeue", "3");
    q.reject(&[one.id], true);
    let left: Vec<String> =
        std::iter::from_fn(|| q.get(true)).map(|g| String::from_utf8(g.message.body.to_vec()).unwrap()).collect();
    assert_eq!(left, ["2", "3"]);
}

/// A TTL-0 queue dead-lettering to itself, fed a message with a forged 'rejected' x-death entry, must
/// neither loop nor overflow the stack: RabbitMQ's cycle walk stops at the queue's own newest death.
#[tokio::test]
async fn forged_x_death_cannot_keep_a_dead_letter_loop_alive() {
    let e = env();
    let args = table(&[
        ("x-message-ttl", AMQPValue::LongInt(0)),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text("loopq")),
    ]);
    let q = e.queue_with("loopq", args);
    let mut forged = FieldTable::default();
    forged.insert("reason".into(), text("rejected"));
    forged.insert("queue".into(), text("elsewhere"));
    let headers = table(&[("x-death", AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(forged)])))]);
    e.publish_props("", "loopq", "m", BasicProperties::default().with_headers(headers));
    assert_eq!(q.message_count(), 0);
}

/// A long chain of TTL-0 queues, each dead-lettering into the next, delivers to the end without
/// recursing once per hop (which would overflow the stack).
#[tokio::test]
async fn a_long_dead_letter_chain_does_not_recurse() {
    let e = env();
    // Each hop lengthens x-death, so hops cost O(n) each; 300 on a small stack is enough to catch recursion.
    const HOPS: usize = 300;
    for i in 0..HOPS {
        let args = table(&[
            ("x-message-ttl", AMQPValue::LongInt(0)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&format!("chain-{}", i + 1))),
        ]);
        e.queue_with(&format!("chain-{i}"), args);
    }
    let last = e.queue(&format!("chain-{HOPS}"));
    let vhost = Arc::clone(&e.vhost);
    // Publishing needs no runtime; a 128 KiB stack would overflow if each hop recursed.
    std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || {
            let m = Message::new("", "chain-0", BasicProperties::default(), Bytes::from_static(b"m"));
            vhost.publish("", m).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(last.message_count(), 1);
}

/// Durable queue: a dispatch round logs its deliveries as delivered before handing them to the consumers'
/// sinks. Checks that doing so keeps each consumer's queue order (persistent and transient messages mixed)
/// and that a consumer found gone at hand-over time gives its messages back to the others.
#[tokio::test]
async fn durable_dispatch_rounds_keep_order_and_survive_a_gone_consumer() {
    let dir = std::env::temp_dir().join(format!("mailroom-embedded-durable-dispatch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
    let e = Env { vhost: broker.vhost("/").unwrap(), owner: broker.next_connection_id(), _broker: broker };
    e.vhost.declare_queue("dd", &QueueOptions { durable: true, ..Default::default() }, e.owner).unwrap();
    // A consumer whose owner is gone before the first round that feeds it.
    let (q, _, gone) = e.consume("dd", false, 2);
    drop(gone);
    let persistent = BasicProperties::default().with_delivery_mode(2);
    for i in 0..6 {
        let props = if i % 2 == 0 { persistent.clone() } else { BasicProperties::default() };
        e.publish_props("", "dd", &format!("m{i}"), props);
    }
    assert_eq!((q.message_count(), q.consumer_count(), q.unacked_count()), (6, 0, 0), "gone consumer dropped");
    // One round delivers all six to a new consumer.
    let (_, _, mut live) = e.consume("dd", false, 0);
    let got = drain(&mut live);
    assert_eq!(bodies(&got), ["m0", "m1", "m2", "m3", "m4", "m5"]);
    assert_eq!((q.message_count(), q.consumer_count(), q.unacked_count()), (0, 1, 6));
    q.ack(&got.iter().map(|d| d.id).collect::<Vec<_>>());
    assert_eq!(q.unacked_count(), 0);
    drop(e);
    let _ = std::fs::remove_dir_all(&dir);
}
