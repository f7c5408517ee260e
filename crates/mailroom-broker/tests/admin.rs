//! Peek and redrive through the broker's public API.

use bytes::Bytes;
use mailroom_broker::{
    AMQPValue, BasicProperties, Broker, BrokerConfig, ExchangeOptions, FieldTable, Message, QueueOptions,
    RedriveOptions, RedriveTarget, VHost,
};
use std::sync::Arc;

fn vhost() -> Arc<VHost> {
    Broker::open(BrokerConfig::default()).unwrap().vhost("/").unwrap()
}

fn declare(v: &VHost, name: &str, args: &[(&str, AMQPValue)]) {
    let mut arguments = FieldTable::default();
    for (k, val) in args {
        arguments.insert((*k).into(), val.clone());
    }
    v.declare_queue(name, &QueueOptions { arguments, ..Default::default() }, 1).unwrap();
}

fn publish(v: &VHost, key: &str, body: &str, headers: &[(&str, &str)]) {
    let mut t = FieldTable::default();
    for (k, val) in headers {
        t.insert((*k).into(), AMQPValue::LongString((*val).into()));
    }
    let props = BasicProperties::default().with_headers(t);
    v.publish("", Message::new("", key, props, Bytes::from(body.to_owned()))).unwrap();
}

fn bodies(v: &VHost, queue: &str) -> Vec<String> {
    v.queue(queue, 1)
        .unwrap()
        .peek(0, usize::MAX)
        .iter()
        .map(|p| String::from_utf8(p.message.body.to_vec()).unwrap())
        .collect()
}

/// `work` dead-letters into `dlq` through the fanout `dlx`; `n` messages rejected into the DLQ.
fn setup_dlq(v: &VHost, n: usize) {
    v.declare_exchange("dlx", "fanout", &ExchangeOptions::default()).unwrap();
    declare(v, "dlq", &[]);
    v.bind_queue("dlq", "dlx", "", &FieldTable::default(), 1).unwrap();
    declare(v, "work", &[("x-dead-letter-exchange", AMQPValue::LongString("dlx".into()))]);
    for i in 0..n {
        let kind = if i % 2 == 0 { "even" } else { "odd" };
        publish(v, "work", &format!("m{i}"), &[("kind", kind)]);
    }
    let q = v.queue("work", 1).unwrap();
    for _ in 0..n {
        let got = q.get(false).unwrap();
        q.reject(&[got.id], false);
    }
}

#[tokio::test]
async fn peek_reads_without_consuming_or_reordering() {
    let v = vhost();
    declare(&v, "q", &[]);
    for i in 0..5 {
        publish(&v, "q", &format!("m{i}"), &[]);
    }
    let q = v.queue("q", 1).unwrap();
    let page = q.peek(1, 2);
    assert_eq!(page.len(), 2);
    assert_eq!(&page[0].message.body[..], b"m1");
    assert_eq!(&page[1].message.body[..], b"m2");
    assert!(q.peek(5, 10).is_empty());
    assert_eq!(q.message_count(), 5);
    // Still FIFO and never marked redelivered.
    let first = q.get(true).unwrap();
    assert_eq!(&first.message.body[..], b"m0");
    assert!(!first.redelivered);
    assert_eq!(bodies(&v, "q"), ["m1", "m2", "m3", "m4"]);
}

#[tokio::test]
async fn redrive_returns_messages_to_their_first_death_with_history() {
    let v = vhost();
    setup_dlq(&v, 4);
    assert_eq!(bodies(&v, "dlq").len(), 4);
    let out = v.redrive("dlq", &RedriveOptions::default()).await.unwrap();
    assert_eq!((out.moved, out.skipped), (4, 0));
    assert!(bodies(&v, "dlq").is_empty());
    assert_eq!(bodies(&v, "work"), ["m0", "m1", "m2", "m3"]);
    let back = v.queue("work", 1).unwrap().peek(0, 1);
    let headers = back[0].message.headers().unwrap();
    assert!(matches!(headers.inner().get("x-death"), Some(AMQPValue::FieldArray(_))));
    assert_eq!(headers.inner().get("kind"), Some(&AMQPValue::LongString("even".into())));
}

#[tokio::test]
async fn redrive_count_filter_and_target_queue() {
    let v = vhost();
    setup_dlq(&v, 6);
    declare(&v, "parking", &[]);
    let filtered = RedriveOptions {
        count: Some(2),
        header_filter: Some(("kind".into(), "odd".into())),
        target: Some(RedriveTarget::Queue("parking".into())),
    };
    let out = v.redrive("dlq", &filtered).await.unwrap();
    assert_eq!(out.moved, 2);
    assert_eq!(bodies(&v, "parking"), ["m1", "m3"]);
    assert_eq!(bodies(&v, "dlq"), ["m0", "m2", "m4", "m5"]);
    let to_exchange = RedriveOptions {
        count: Some(1),
        target: Some(RedriveTarget::Exchange { exchange: "".into(), routing_key: "parking".into() }),
        ..Default::default()
    };
    assert_eq!(v.redrive("dlq", &to_exchange).await.unwrap().moved, 1);
    assert_eq!(bodies(&v, "parking"), ["m1", "m3", "m0"]);
    // Missing target: 404, nothing moved.
    let missing = RedriveOptions { target: Some(RedriveTarget::Queue("nope".into())), ..Default::default() };
    assert!(v.redrive("dlq", &missing).await.is_err());
    assert_eq!(bodies(&v, "dlq"), ["m2", "m4", "m5"]);
}

#[tokio::test]
async fn redrive_skips_messages_without_death_history_or_route() {
    let v = vhost();
    declare(&v, "dlq", &[]);
    publish(&v, "dlq", "plain", &[]);
    let out = v.redrive("dlq", &RedriveOptions::default()).await.unwrap();
    assert_eq!((out.moved, out.skipped), (0, 1));
    assert_eq!(bodies(&v, "dlq"), ["plain"]);
}

#[tokio::test]
async fn redrive_to_durable_target_waits_for_the_store() {
    let dir = std::env::temp_dir().join(format!("mailroom-redrive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
        let v = broker.vhost("/").unwrap();
        let durable = QueueOptions { durable: true, ..Default::default() };
        v.declare_queue("dlq", &durable, 1).unwrap();
        v.declare_queue("target", &durable, 1).unwrap();
        let mut t = FieldTable::default();
        t.insert("x-first-death-exchange".into(), AMQPValue::LongString("".into()));
        let props = BasicProperties::default().with_delivery_mode(2).with_headers(t);
        v.publish("", Message::new("", "target", props, Bytes::from_static(b"p"))).unwrap();
        // Routed by the default exchange to "target" directly; move it into the DLQ by hand.
        let copy = v.queue("target", 1).unwrap().get(true).unwrap().message;
        v.publish("", Message::new("", "dlq", copy.properties.clone(), copy.body.clone())).unwrap();
        let out = v
            .redrive(
                "dlq",
                &RedriveOptions { target: Some(RedriveTarget::Queue("target".into())), ..Default::default() },
            )
            .await
            .unwrap();
        assert_eq!(out.moved, 1);
    }
    let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
    let v = broker.vhost("/").unwrap();
    assert_eq!(v.queue("target", 1).unwrap().message_count(), 1);
    assert_eq!(v.queue("dlq", 1).unwrap().message_count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn policy(name: &str, pattern: &str, priority: i64, pairs: &[(&str, AMQPValue)]) -> mailroom_broker::Policy {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    mailroom_broker::Policy::new(name, pattern, mailroom_broker::ApplyTo::Queues, priority, t).unwrap()
}

#[tokio::test]
async fn policies_apply_to_existing_and_future_queues() {
    let v = vhost();
    declare(&v, "orders", &[]);
    for i in 0..5 {
        publish(&v, "orders", &format!("m{i}"), &[]);
    }
    v.set_policy(policy("len", "^ord", 0, &[("max-length", AMQPValue::LongInt(2))]));
    let q = v.queue("orders", 1).unwrap();
    assert_eq!(q.policy_name().as_deref(), Some("len"));
    assert_eq!(bodies(&v, "orders"), ["m3", "m4"]);
    publish(&v, "orders", "m5", &[]);
    assert_eq!(bodies(&v, "orders"), ["m4", "m5"]);
    // A later queue gets it at declare; a non-matching one does not.
    declare(&v, "orders2", &[]);
    declare(&v, "other", &[]);
    assert_eq!(v.queue("orders2", 1).unwrap().args().max_length, Some(2));
    assert_eq!(v.queue("other", 1).unwrap().policy_name(), None);
    // A higher priority policy takes over; deleting it falls back.
    v.set_policy(policy("big", "^orders$", 5, &[("max-length", AMQPValue::LongInt(100))]));
    assert_eq!(q.policy_name().as_deref(), Some("big"));
    assert_eq!(q.args().max_length, Some(100));
    v.delete_policy("big").unwrap();
    assert_eq!(q.args().max_length, Some(2));
    v.delete_policy("len").unwrap();
    assert_eq!(q.args().max_length, None);
    assert!(v.delete_policy("len").is_err());
    // Declared arguments stay what equivalence checks compare.
    assert!(q.spec().arguments.inner().is_empty());
}

#[tokio::test(start_paused = true)]
async fn policy_message_ttl_and_dead_letter_exchange() {
    let v = vhost();
    v.declare_exchange("dlx", "fanout", &ExchangeOptions::default()).unwrap();
    declare(&v, "dead", &[]);
    v.bind_queue("dead", "dlx", "", &FieldTable::default(), 1).unwrap();
    declare(&v, "short", &[("x-message-ttl", AMQPValue::LongInt(50_000))]);
    v.set_policy(policy(
        "ttl",
        "^short$",
        0,
        &[("message-ttl", AMQPValue::LongInt(100)), ("dead-letter-exchange", AMQPValue::LongString("dlx".into()))],
    ));
    publish(&v, "short", "x", &[]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(bodies(&v, "short").is_empty());
    assert_eq!(bodies(&v, "dead"), ["x"]);
}

#[tokio::test]
async fn policies_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("mailroom-policies-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("kept", &QueueOptions { durable: true, ..Default::default() }, 1).unwrap();
        v.set_policy(policy("p", "^kept$", 3, &[("max-length", AMQPValue::LongInt(7))]));
    }
    let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
    let v = broker.vhost("/").unwrap();
    let p = v.policy("p").unwrap();
    assert_eq!((p.pattern.as_str(), p.priority), ("^kept$", 3));
    assert_eq!(v.queue("kept", 1).unwrap().args().max_length, Some(7));
    let _ = std::fs::remove_dir_all(&dir);
}
