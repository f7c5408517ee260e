//! Scenarios whose outcomes were recorded from RabbitMQ 3.10.8 through lapin: Mailroom must produce the
//! same lines. Set `RABBITMQ_URL` (e.g. amqp://guest:guest@127.0.0.1:5672/%2f) to replay them against a
//! RabbitMQ as well and check the recording.

mod common;
// Which services are reachable, and the one-line skip: shared with the SDK's tests.
#[path = "../../mailroom/tests/common/services.rs"]
mod services;
use common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use std::time::Duration;

async fn count(conn: &lapin::Connection, q: &str) -> String {
    let ch = channel(conn).await;
    match ch
        .queue_declare(q.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
    {
        Ok(x) => format!("{}/{}", x.message_count(), x.consumer_count()),
        Err(e) => format!("err {:?}", reply_code(&e)),
    }
}
fn args(kv: &[(&str, i64)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in kv {
        t.insert((*k).into(), AMQPValue::LongLongInt(*v));
    }
    t
}

async fn scenario(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let conn = connect(url).await;
    let sfx = std::process::id();
    // u: ack after cancel
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-u-{sfx}")).await;
    publish(&ch, &q, b"u").await;
    let mut c = ch
        .basic_consume(q.as_str().into(), "ctag-u".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let d = next(&mut c).await;
    ch.basic_cancel("ctag-u".into(), BasicCancelOptions::default()).await.unwrap();
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    out.push(format!("u: ack after cancel: channel ok={} count={}", ch.status().connected(), count(&conn, &q).await));
    // w: qos after consume
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-w-{sfx}")).await;
    for i in 0..5 {
        publish(&ch, &q, format!("{i}").as_bytes()).await;
    }
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut c = consume(&ch, &q, false).await;
    ch.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut n = 0;
    while next_within(&mut c, Duration::from_millis(200)).await.is_some() {
        n += 1;
    }
    out.push(format!("w: consumer with prefetch 1 then qos 3 got {n}"));
    // x: global qos
    let ch = channel(&conn).await;
    let q1 = declare(&ch, &format!("zz-x1-{sfx}")).await;
    let q2 = declare(&ch, &format!("zz-x2-{sfx}")).await;
    for i in 0..5 {
        publish(&ch, &q1, format!("{i}").as_bytes()).await;
        publish(&ch, &q2, format!("{i}").as_bytes()).await;
    }
    ch.basic_qos(3, BasicQosOptions { global: true }).await.unwrap();
    let mut c1 = consume(&ch, &q1, false).await;
    let mut c2 = consume(&ch, &q2, false).await;
    let mut n1 = 0;
    while next_within(&mut c1, Duration::from_millis(200)).await.is_some() {
        n1 += 1;
    }
    let mut n2 = 0;
    while next_within(&mut c2, Duration::from_millis(200)).await.is_some() {
        n2 += 1;
    }
    out.push(format!("x: global qos 3 over two consumers: total {}", n1 + n2));
    // y: auto-delete after last cancel
    let ch = channel(&conn).await;
    let q = declare_with(
        &ch,
        &format!("zz-y-{sfx}"),
        QueueDeclareOptions { auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await;
    ch.basic_consume(q.as_str().into(), "ctag-y".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ch.basic_cancel("ctag-y".into(), BasicCancelOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    out.push(format!("y: auto-delete after cancel: {}", count(&conn, &q).await));
    // z: channel close requeues unacked in order
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-z-{sfx}")).await;
    for i in 0..4 {
        publish(&ch, &q, format!("{i}").as_bytes()).await;
    }
    let cch = channel(&conn).await;
    let mut c = consume(&cch, &q, false).await;
    let mut got = vec![];
    for _ in 0..3 {
        got.push(next(&mut c).await);
    }
    got[1].acker.ack(BasicAckOptions::default()).await.unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    let mut bodies = vec![];
    while let Some(g) = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        bodies.push((String::from_utf8(g.delivery.data).unwrap(), g.delivery.redelivered));
    }
    out.push(format!("z: after channel close: {bodies:?}"));
    // aa: nack multiple tag 0
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-aa-{sfx}")).await;
    for i in 0..3 {
        publish(&ch, &q, format!("{i}").as_bytes()).await;
    }
    for _ in 0..3 {
        ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    }
    ch.basic_nack(0, BasicNackOptions { multiple: true, requeue: true }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    out.push(format!("aa: nack(0, multiple): {} ok={}", count(&conn, &q).await, ch.status().connected()));
    // bb: recover
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-bb-{sfx}")).await;
    publish(&ch, &q, b"r").await;
    let mut c = consume(&ch, &q, false).await;
    let d = next(&mut c).await;
    ch.basic_recover(BasicRecoverOptions { requeue: true }).await.unwrap();
    let d2 = next_within(&mut c, Duration::from_millis(300)).await;
    out.push(format!(
        "bb: recover: first tag {} redelivered again {:?}",
        d.delivery_tag,
        d2.map(|d| (d.delivery_tag, d.redelivered))
    ));
    // cc: queue delete under consumer
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-cc-{sfx}")).await;
    let mut c = consume(&ch, &q, false).await;
    channel(&conn).await.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let end = tokio::time::timeout(Duration::from_millis(500), c.next()).await;
    out.push(format!(
        "cc: consumer after queue delete: {:?} channel ok={}",
        end.map(|o| o.map(|r| r.is_ok())),
        ch.status().connected()
    ));
    // dd: expiration 0
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-dd-{sfx}")).await;
    publish_with(&ch, "", &q, b"now", BasicProperties::default().with_expiration("0".into())).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c0 = count(&conn, &q).await;
    let mut c = consume(&ch, &q, true).await;
    publish_with(&ch, "", &q, b"now2", BasicProperties::default().with_expiration("0".into())).await;
    let got = next_within(&mut c, Duration::from_millis(300)).await.map(|d| d.data);
    out.push(format!("dd: expiration 0: no consumer -> {c0}; consumer got {got:?}"));
    // ee: priority requeue
    let ch = channel(&conn).await;
    let q = declare_with(&ch, &format!("zz-ee-{sfx}"), QueueDeclareOptions::default(), args(&[("x-max-priority", 5)]))
        .await;
    for (b, p) in [("lo", 1u8), ("hi", 5), ("mid", 3), ("hi2", 9)] {
        publish_with(&ch, "", &q, b.as_bytes(), BasicProperties::default().with_priority(p)).await;
    }
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    let first = String::from_utf8(g.delivery.data.clone()).unwrap();
    g.delivery.acker.reject(BasicRejectOptions { requeue: true }).await.unwrap();
    let mut bodies = vec![first];
    while let Some(g) = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        bodies.push(String::from_utf8(g.delivery.data).unwrap());
    }
    out.push(format!("ee: priority: {bodies:?}"));
    // ff: purge count with unacked, declare-ok count
    let ch = channel(&conn).await;
    let q = declare(&ch, &format!("zz-ff-{sfx}")).await;
    for i in 0..3 {
        publish(&ch, &q, format!("{i}").as_bytes()).await;
    }
    let _g = ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    let purged = ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()).await.unwrap();
    let del = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    out.push(format!("ff: purge {purged} delete {del}"));
    // Leave nothing behind on a shared broker.
    let ch = channel(&conn).await;
    for n in ["u", "w", "x1", "x2", "y", "z", "aa", "bb", "cc", "dd", "ee", "ff"] {
        let _ = ch.queue_delete(format!("zz-{n}-{sfx}").as_str().into(), QueueDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "".into()).await;
    out
}

/// What RabbitMQ 3.10.8 answered, one line per scenario.
const RABBITMQ_3_10: &[&str] = &[
    "u: ack after cancel: channel ok=true count=0/0",
    "w: consumer with prefetch 1 then qos 3 got 1",
    "x: global qos 3 over two consumers: total 3",
    "y: auto-delete after cancel: err Some(404)",
    "z: after channel close: [(\"0\", true), (\"2\", true), (\"3\", true)]",
    "aa: nack(0, multiple): 3/0 ok=true",
    "bb: recover: first tag 1 redelivered again Some((2, true))",
    "cc: consumer after queue delete: Ok(None) channel ok=true",
    "dd: expiration 0: no consumer -> 0/0; consumer got Some([110, 111, 119, 50])",
    "ee: priority: [\"hi\", \"hi\", \"hi2\", \"mid\", \"lo\"]",
    "ff: purge 2 delete 0",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailroom_matches_recorded_rabbitmq_outcomes() {
    let server = TestServer::start().await;
    let got = scenario(&server.url).await;
    assert_eq!(got, RABBITMQ_3_10);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_still_matches_rabbitmq() {
    let Ok(url) = std::env::var("RABBITMQ_URL") else { return };
    if !services::can_run(&[services::Service::RabbitMq], "lapin_oracle::recording_still_matches_rabbitmq") {
        return;
    }
    assert_eq!(scenario(&url).await, RABBITMQ_3_10);
}
