//! The lapin client's view of Mailroom: a real server on 127.0.0.1:0, driven over TCP.

mod common;

use common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// A headers table with a nested table, an array holding a table and an array, and every value type
/// RabbitMQ's table grammar has.
fn rich_headers() -> FieldTable {
    let mut inner = FieldTable::default();
    inner.insert("deep-string".into(), long("deep"));
    inner.insert("deep-int".into(), AMQPValue::LongInt(-7));
    let mut innermost = FieldTable::default();
    innermost.insert("bottom".into(), AMQPValue::Boolean(false));
    inner.insert("deeper".into(), AMQPValue::FieldTable(innermost));

    let mut arr = FieldArray::default();
    arr.push(long("one"));
    arr.push(AMQPValue::LongInt(2));
    arr.push(AMQPValue::FieldTable(inner.clone()));
    let mut nested_arr = FieldArray::default();
    nested_arr.push(AMQPValue::Boolean(true));
    nested_arr.push(AMQPValue::Void);
    arr.push(AMQPValue::FieldArray(nested_arr));

    let mut h = FieldTable::default();
    h.insert("string".into(), long("hello, wörld"));
    h.insert("empty-string".into(), long(""));
    h.insert("bool-true".into(), AMQPValue::Boolean(true));
    h.insert("bool-false".into(), AMQPValue::Boolean(false));
    h.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    h.insert("u8".into(), AMQPValue::ShortShortUInt(200));
    h.insert("i16".into(), AMQPValue::ShortInt(-16_000));
    h.insert("u16".into(), AMQPValue::ShortUInt(60_000));
    h.insert("i32".into(), AMQPValue::LongInt(-2_000_000_000));
    h.insert("u32".into(), AMQPValue::LongUInt(4_000_000_000));
    h.insert("i64".into(), AMQPValue::LongLongInt(-9_000_000_000_000));
    h.insert("f32".into(), AMQPValue::Float(1.5));
    h.insert("f64".into(), AMQPValue::Double(-2.25));
    h.insert("decimal".into(), AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 12345 }));
    h.insert("timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
    h.insert("bytes".into(), AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])));
    h.insert("void".into(), AMQPValue::Void);
    h.insert("table".into(), AMQPValue::FieldTable(inner));
    h.insert("array".into(), AMQPValue::FieldArray(arr));
    h.insert("empty-table".into(), AMQPValue::FieldTable(FieldTable::default()));
    h.insert("empty-array".into(), AMQPValue::FieldArray(FieldArray::default()));
    h
}

/// All 14 basic properties set.
fn all_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(rich_headers())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-42".into())
        .with_reply_to("reply-here".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_123)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("mailroom-tests".into())
        .with_cluster_id("cluster-x".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_declare_and_close() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    assert!(conn.status().connected());
    let ch = channel(&conn).await;
    let q = ch.queue_declare("".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    assert!(q.name().as_str().starts_with("amq.gen-"), "server-named queue: {}", q.name());
    assert_eq!(q.message_count(), 0);
    ch.exchange_declare(
        "it.topic".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.name().clone(),
        "it.topic".into(),
        "a.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish_with(&ch, "it.topic", "a.b.c", b"topic", BasicProperties::default()).await;
    let got = ch.basic_get(q.name().clone(), BasicGetOptions { no_ack: true }).await.unwrap().expect("routed");
    assert_eq!(got.delivery.data, b"topic");
    assert_eq!(got.delivery.exchange.as_str(), "it.topic");
    assert_eq!(got.delivery.routing_key.as_str(), "a.b.c");
    conn.close(200, "bye".into()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_properties_and_nested_headers_round_trip_exactly() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "props-roundtrip").await;
    let props = all_properties();
    publish_with(&ch, "", &q, b"{\"id\":1}", props.clone()).await;

    let mut consumer = consume(&ch, &q, false).await;
    let d = next(&mut consumer).await;
    assert_eq!(d.properties, props, "properties differ after a consume");
    assert_eq!(d.data, b"{\"id\":1}");
    assert!(!d.redelivered);

    // Requeued: the same bytes come back again.
    d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    let d = next(&mut consumer).await;
    assert!(d.redelivered);
    assert_eq!(d.properties, props, "properties differ after a requeue");
    d.acker.ack(BasicAckOptions::default()).await.unwrap();

    // basic.get takes the same path.
    publish_with(&ch, "", &q, b"again", props.clone()).await;
    let d = next(&mut consumer).await;
    assert_eq!(d.properties, props);
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_message_keeps_its_properties_and_gains_x_death() {
    // Dead-lettering re-encodes the properties: every property but `expiration` must survive, and the
    // headers keep every original entry next to x-death.
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let dlq = declare(&ch, "props-dlq").await;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(&dlq));
    let src = declare_with(&ch, "props-src", QueueDeclareOptions::default(), args).await;
    let props = all_properties().with_expiration("50".into());
    publish_with(&ch, "", &src, b"dying", props.clone()).await;

    let mut consumer = consume(&ch, &dlq, true).await;
    let d = next(&mut consumer).await;
    assert_eq!(d.data, b"dying");
    let p = &d.properties;
    assert_eq!(p.expiration(), &None, "expiration is removed when dead-lettered");
    assert_eq!(p.content_type(), props.content_type());
    assert_eq!(p.content_encoding(), props.content_encoding());
    assert_eq!(p.delivery_mode(), props.delivery_mode());
    assert_eq!(p.priority(), props.priority());
    assert_eq!(p.correlation_id(), props.correlation_id());
    assert_eq!(p.reply_to(), props.reply_to());
    assert_eq!(p.message_id(), props.message_id());
    assert_eq!(p.timestamp(), props.timestamp());
    assert_eq!(p.kind(), props.kind());
    assert_eq!(p.user_id(), props.user_id());
    assert_eq!(p.app_id(), props.app_id());
    assert_eq!(p.cluster_id(), props.cluster_id());
    let headers = p.headers().as_ref().expect("headers").inner();
    for (k, v) in rich_headers().inner() {
        assert_eq!(headers.get(k), Some(v), "header {k} changed by dead-lettering");
    }
    let Some(AMQPValue::FieldArray(deaths)) = headers.get("x-death") else { panic!("x-death missing: {headers:?}") };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else { panic!("x-death entry") };
    let death = death.inner();
    assert_eq!(death.get("reason"), Some(&long("expired")));
    assert_eq!(death.get("queue"), Some(&long(&src)));
    assert_eq!(death.get("original-expiration"), Some(&long("50")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_confirms_many_in_flight_all_acked() {
    const N: usize = 2000;
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "confirms").await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut pending = Vec::with_capacity(N);
    for i in 0..N {
        let confirm = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        pending.push(confirm);
    }
    for (i, confirm) in pending.into_iter().enumerate() {
        let c = tokio::time::timeout(WAIT, confirm).await.expect("confirm in time").expect("confirm");
        assert!(c.is_ack(), "publish {i} not acked: {c:?}");
    }
    assert!(ch.wait_for_confirms().await.unwrap().is_empty());
    let q = ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count() as usize, N);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn competing_consumers_each_message_exactly_once_round_robin() {
    const N: usize = 300;
    const CONSUMERS: usize = 3;
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let setup = channel(&conn).await;
    let q = declare(&setup, "work").await;
    let received = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONSUMERS {
        let consumer_conn = server.connect().await;
        let ch = channel(&consumer_conn).await;
        ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
        let mut consumer = consume(&ch, &q, false).await;
        let received = Arc::clone(&received);
        tasks.push(tokio::spawn(async move {
            let _keep = consumer_conn;
            let mut bodies = Vec::new();
            let deadline = tokio::time::Instant::now() + WAIT;
            while received.load(Ordering::SeqCst) < N && tokio::time::Instant::now() < deadline {
                if let Some(d) = next_within(&mut consumer, Duration::from_millis(100)).await {
                    bodies.push(String::from_utf8(d.data.clone()).unwrap());
                    d.acker.ack(BasicAckOptions::default()).await.unwrap();
                    received.fetch_add(1, Ordering::SeqCst);
                }
            }
            bodies
        }));
    }
    let publisher = channel(&conn).await;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..N {
        // The per-message confirm futures are dropped: wait_for_confirms below covers them all.
        #[allow(clippy::let_underscore_future)]
        let _ = publisher
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    publisher.wait_for_confirms().await.unwrap();
    let mut all = Vec::new();
    for t in tasks {
        let bodies = t.await.unwrap();
        // Round-robin over three consumers with room: each gets about a third.
        assert!(
            bodies.len() >= N / CONSUMERS / 2 && bodies.len() <= N / CONSUMERS * 2,
            "uneven distribution: one consumer got {} of {N}",
            bodies.len()
        );
        all.extend(bodies);
    }
    assert_eq!(all.len(), N, "each message exactly once");
    let distinct: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(distinct.len(), N, "no duplicates");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_is_never_exceeded() {
    const PREFETCH: u16 = 5;
    const N: usize = 40;
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "prefetch").await;
    for i in 0..N {
        publish(&ch, &q, format!("{i}").as_bytes()).await;
    }
    let cch = channel(&conn).await;
    cch.basic_qos(PREFETCH, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&cch, &q, false).await;
    let queue = server.broker.vhost("/").unwrap().queue(&q, 0).unwrap();
    let mut held = std::collections::VecDeque::new();
    let mut seen = 0;
    let mut checked_quiet = 0;
    while seen < N {
        if held.len() < PREFETCH as usize {
            let d = next(&mut consumer).await;
            assert_eq!(d.data, format!("{seen}").as_bytes(), "FIFO order");
            seen += 1;
            held.push_back(d);
            assert!(queue.unacked_count() <= PREFETCH as u32, "server holds {} unacked", queue.unacked_count());
            continue;
        }
        // At the limit: nothing more may arrive until we ack.
        if checked_quiet < 3 {
            assert!(
                next_within(&mut consumer, Duration::from_millis(150)).await.is_none(),
                "a delivery beyond prefetch {PREFETCH} arrived"
            );
            checked_quiet += 1;
        }
        assert_eq!(queue.unacked_count(), PREFETCH as u32);
        let d = held.pop_front().unwrap();
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    for d in held {
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    eventually("all acked", || queue.unacked_count() == 0 && queue.message_count() == 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_requeue_sets_redelivered_and_keeps_fifo_position() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "requeue").await;
    for i in 1..=5 {
        publish(&ch, &q, format!("m{i}").as_bytes()).await;
    }
    let get = |no_ack| {
        let ch = ch.clone();
        let q = q.clone();
        async move { ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack }).await.unwrap().expect("a message") }
    };
    let m1 = get(false).await;
    let m2 = get(false).await;
    let m3 = get(false).await;
    assert_eq!(m3.delivery.data, b"m3");
    m2.delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
    m1.delivery.acker.reject(BasicRejectOptions { requeue: true }).await.unwrap();
    // m1 and m2 go back in front of m4, in their original order.
    let order: Vec<(Vec<u8>, bool)> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let g = get(true).await;
            v.push((g.delivery.data.clone(), g.delivery.redelivered));
        }
        v
    };
    assert_eq!(
        order,
        vec![(b"m1".to_vec(), true), (b"m2".to_vec(), true), (b"m4".to_vec(), false), (b"m5".to_vec(), false)]
    );
    m3.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();

    // The same through a consumer: a nacked delivery comes straight back, flagged.
    publish(&ch, &q, b"c1").await;
    publish(&ch, &q, b"c2").await;
    let cch = channel(&conn).await;
    cch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&cch, &q, false).await;
    let d = next(&mut consumer).await;
    assert_eq!((d.data.as_slice(), d.redelivered), (&b"c1"[..], false));
    d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!((d.data.as_slice(), d.redelivered), (&b"c1"[..], true));
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!((d.data.as_slice(), d.redelivered), (&b"c2"[..], false));
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_counts_and_acks() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "get").await;
    assert!(ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().is_none(), "get-empty");
    for i in 0..3 {
        publish_with(
            &ch,
            "",
            &q,
            format!("g{i}").as_bytes(),
            BasicProperties::default().with_message_id(format!("id{i}").into()),
        )
        .await;
    }
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
    assert_eq!(g.message_count, 2, "remaining after the first");
    assert_eq!(g.delivery.data, b"g0");
    assert_eq!(g.delivery.routing_key.as_str(), q);
    assert_eq!(g.delivery.exchange.as_str(), "");
    assert_eq!(g.delivery.properties.message_id().as_ref().map(|s| s.as_str()), Some("id0"));
    g.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!((g.message_count, g.delivery.data.as_slice()), (1, &b"g1"[..]));
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
    assert_eq!((g.message_count, g.delivery.data.as_slice()), (0, &b"g2"[..]));
    let queue = server.broker.vhost("/").unwrap().queue(&q, 0).unwrap();
    assert_eq!((queue.message_count(), queue.unacked_count()), (0, 1));
    g.delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    eventually("ack reaches the queue", || queue.unacked_count() == 0).await;
    assert!(ch.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().is_none());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_is_returned_then_acked() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let props = BasicProperties::default().with_correlation_id("c-1".into()).with_headers(rich_headers());
    let confirm = ch
        .basic_publish(
            "".into(),
            "no-such-queue".into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"lost?",
            props.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "unroutable messages are still acked: {confirm:?}");
    let returned = confirm.take_message().expect("basic.return before the ack");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.routing_key.as_str(), "no-such-queue");
    assert_eq!(returned.delivery.data, b"lost?");
    assert_eq!(returned.delivery.properties, props);

    // Not mandatory: silently dropped, still acked.
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            "nowhere".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, Confirmation::Ack(None));

    // Mandatory and routable: no return.
    let q = declare(&ch, "routable").await;
    let confirm = ch
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"y",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, Confirmation::Ack(None));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_request_response() {
    let server = TestServer::start().await;
    // Responder.
    let rconn = server.connect().await;
    let rch = channel(&rconn).await;
    let rpc = declare(&rch, "rpc-requests").await;
    let mut requests = consume(&rch, &rpc, false).await;
    let responder = tokio::spawn(async move {
        let _keep = rconn;
        for _ in 0..3 {
            let req = next(&mut requests).await;
            let reply_to = req.properties.reply_to().clone().expect("reply_to").to_string();
            assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "responder sees the real address: {reply_to}");
            let corr = req.properties.correlation_id().clone().expect("correlation_id");
            let mut body = b"re:".to_vec();
            body.extend_from_slice(&req.data);
            publish_with(&rch, "", &reply_to, &body, BasicProperties::default().with_correlation_id(corr)).await;
            req.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    });

    // Requester.
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let mut replies = consume(&ch, "amq.rabbitmq.reply-to", true).await;
    for i in 0..3 {
        let corr = format!("corr-{i}");
        publish_with(
            &ch,
            "",
            &rpc,
            format!("q{i}").as_bytes(),
            BasicProperties::default()
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id(corr.as_str().into()),
        )
        .await;
        let reply = next(&mut replies).await;
        assert_eq!(reply.data, format!("re:q{i}").as_bytes());
        assert_eq!(reply.properties.correlation_id().as_ref().map(|s| s.as_str()), Some(corr.as_str()));
    }
    tokio::time::timeout(WAIT, responder).await.unwrap().unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_without_consumer_is_406() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "rpc-nobody").await;
    let mut events = conn.events_listener();
    // Without confirms the publish itself cannot fail: the channel.close shows up as a connection event.
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    let err = loop {
        match tokio::time::timeout(WAIT, events.next()).await.expect("channel closed in time") {
            Some(lapin::Event::Error(e)) => break e,
            Some(_) => continue,
            None => panic!("event stream ended"),
        }
    };
    assert_eq!(reply_code(&err), Some(406), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queue_is_405_from_another_connection() {
    let server = TestServer::start().await;
    let owner = server.connect().await;
    let och = channel(&owner).await;
    let q = declare_with(
        &och,
        "mine-only",
        QueueDeclareOptions { exclusive: true, ..Default::default() },
        FieldTable::default(),
    )
    .await;
    publish(&och, &q, b"private").await;

    let other = server.connect().await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let attempts: Vec<(&str, lapin::Error)> = vec![
        (
            "declare",
            channel(&other)
                .await
                .queue_declare(q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
                .await
                .unwrap_err(),
        ),
        (
            "passive declare",
            channel(&other).await.queue_declare(q.as_str().into(), passive, FieldTable::default()).await.unwrap_err(),
        ),
        (
            "consume",
            channel(&other)
                .await
                .basic_consume(q.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
                .unwrap_err(),
        ),
        ("get", channel(&other).await.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap_err()),
        (
            "purge",
            channel(&other).await.queue_purge(q.as_str().into(), QueuePurgeOptions::default()).await.unwrap_err(),
        ),
        (
            "delete",
            channel(&other).await.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.unwrap_err(),
        ),
    ];
    for (what, err) in attempts {
        assert_eq!(reply_code(&err), Some(405), "{what}: {err}");
    }
    assert!(other.status().connected(), "405 is a channel error");
    // Still intact for its owner.
    let got = och.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(got.delivery.data, b"private");

    // Gone once the owner disconnects.
    owner.close(200, "bye".into()).await.unwrap();
    let vhost = server.broker.vhost("/").unwrap();
    eventually("exclusive queue deleted with its connection", || vhost.queue(&q, 0).is_err()).await;
    let err = channel(&other).await.queue_declare(q.as_str().into(), passive, FieldTable::default()).await.unwrap_err();
    assert_eq!(reply_code(&err), Some(404));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_error_leaves_the_connection_usable() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let good = channel(&conn).await;
    let q = declare(&good, "survivor").await;
    let bad = channel(&conn).await;
    let err = bad
        .queue_declare(
            "does-not-exist".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404), "{err}");
    assert!(!bad.status().connected(), "the failing channel is closed");
    // Other errors too: unknown delivery tag (406), publish to a missing exchange (404).
    let bad2 = channel(&conn).await;
    let mut events = conn.events_listener();
    bad2.basic_ack(999, BasicAckOptions::default()).await.unwrap();
    let err = loop {
        match tokio::time::timeout(WAIT, events.next()).await.expect("channel closed in time") {
            Some(lapin::Event::Error(e)) => break e,
            Some(_) => continue,
            None => panic!("event stream ended"),
        }
    };
    assert_eq!(reply_code(&err), Some(406), "unknown delivery tag: {err}");
    eventually("the channel is closed", || !bad2.status().connected()).await;

    assert!(conn.status().connected());
    publish(&good, &q, b"still here").await;
    let fresh = channel(&conn).await;
    let got = fresh.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(got.delivery.data, b"still here");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_empty_bodies() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "sizes").await;
    // 16 MiB: 128+ body frames at the default frame_max, with a pattern that catches reordering.
    let big: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let sizes = [0usize, 1, 131_072 - 8, 131_072 - 7, 131_072 * 3 + 5];
    let mut consumer = consume(&ch, &q, false).await;
    for &n in &sizes {
        publish(&ch, &q, &big[..n]).await;
        let d = next(&mut consumer).await;
        assert_eq!(d.data.len(), n);
        assert!(d.data == big[..n], "body of {n} bytes corrupted");
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    publish(&ch, &q, &big).await;
    let d = next(&mut consumer).await;
    assert_eq!(d.data.len(), big.len());
    assert!(d.data == big, "16 MiB body corrupted");
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body_via_get() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "empty").await;
    publish_with(&ch, "", &q, b"", BasicProperties::default().with_content_type("text/plain".into())).await;
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert!(g.delivery.data.is_empty());
    assert_eq!(g.delivery.properties.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));
    // The connection is still in sync afterwards.
    publish(&ch, &q, b"next").await;
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(g.delivery.data, b"next");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_channels_on_one_connection() {
    const CHANNELS: usize = 200;
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..CHANNELS {
        let ch = channel(&conn).await;
        set.spawn(async move {
            let q = declare(&ch, &format!("per-channel-{i}")).await;
            let mut consumer = consume(&ch, &q, false).await;
            for j in 0..3 {
                publish(&ch, &q, format!("{i}/{j}").as_bytes()).await;
            }
            for j in 0..3 {
                let d = next(&mut consumer).await;
                assert_eq!(d.data, format!("{i}/{j}").as_bytes());
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
            }
            ch.close(200, "done".into()).await.unwrap();
            ch.id()
        });
    }
    let mut ids = HashSet::new();
    while let Some(r) = tokio::time::timeout(WAIT, set.join_next()).await.expect("channels finish") {
        assert!(ids.insert(r.unwrap()));
    }
    assert_eq!(ids.len(), CHANNELS);
    assert!(conn.status().connected());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_timeout_closes_channel_406_and_requeues() {
    let server = TestServer::start_with(|c| c.consumer_timeout = Duration::from_millis(500)).await;
    let conn = server.connect().await;
    let ch = channel(&conn).await;
    let q = declare(&ch, "slowpoke").await;
    publish(&ch, &q, b"late").await;
    let cch = channel(&conn).await;
    let mut consumer = consume(&cch, &q, false).await;
    let d = next(&mut consumer).await;
    assert!(!d.redelivered);
    let started = std::time::Instant::now();
    // Hold it unacked: the channel must be closed with 406.
    let err = match tokio::time::timeout(WAIT, consumer.next()).await.expect("channel closed in time") {
        Some(Err(e)) => e,
        Some(Ok(d)) => panic!("unexpected delivery {:?}", d.data),
        None => panic!("consumer ended without an error"),
    };
    assert_eq!(reply_code(&err), Some(406), "{err}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(3), "closed after {waited:?}");
    assert!(!cch.status().connected());
    assert!(conn.status().connected(), "only the channel is closed");
    // The message went back to the queue.
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("requeued");
    assert_eq!(g.delivery.data, b"late");
    assert!(g.delivery.redelivered);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_an_idle_connection_alive() {
    let server = TestServer::start_with(|c| c.heartbeat = 1).await;
    let conn = server.connect().await;
    assert_eq!(conn.configuration().heartbeat(), 1, "lapin takes the server's heartbeat");
    let ch = channel(&conn).await;
    let q = declare(&ch, "idle").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(conn.status().connected(), "connection closed while idle with heartbeats on");
    publish(&ch, &q, b"awake").await;
    let g = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(g.delivery.data, b"awake");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_clients_with_320() {
    let mut server = TestServer::start().await;
    let conn = server.connect().await;
    let mut events = conn.events_listener();
    let ch = channel(&conn).await;
    let q = declare(&ch, "shutdown").await;
    let mut consumer = consume(&ch, &q, false).await;
    let conn2 = server.connect().await;
    let mut events2 = conn2.events_listener();

    server.trigger_shutdown();
    let code_from = |e: &lapin::Error| reply_code(e);
    // The consumer sees the connection error…
    let err = match tokio::time::timeout(WAIT, consumer.next()).await.expect("consumer notified") {
        Some(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert_eq!(code_from(&err), Some(320), "{err}");
    // …and so do the connections' event listeners.
    for events in [&mut events, &mut events2] {
        let code = loop {
            match tokio::time::timeout(WAIT, events.next()).await.expect("event in time") {
                Some(lapin::Event::Error(e)) => break code_from(&e),
                Some(_) => continue,
                None => break None,
            }
        };
        assert_eq!(code, Some(320));
    }
    server.shutdown().await;
    eventually("lapin sees the connection closed", || !conn.status().connected() && !conn2.status().connected()).await;
}
