//! Compatibility with `amqprs`, a second Rust client beside lapin (different codec, its own dispatcher
//! and callback model). One scenario prints what the client sees as lines; Mailroom (in-process, as in
//! the lapin tests) and RabbitMQ (at `RABBITMQ_URL`, default amqp://guest:guest@127.0.0.1:5672/%2F) must
//! both produce the expected lines: connect and open a channel, declare and bind, publish with confirms
//! (and a mandatory unroutable publish returned before its ack), `basic.get`, consume with manual ack and
//! prefetch, a 404 channel error that leaves the connection usable, and a clean close.

mod common;
use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments, BasicPublishArguments,
    BasicQosArguments, Channel, ConfirmSelectArguments, ConsumerMessage, ExchangeDeclareArguments,
    ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, FieldTable, FieldValue, Nack, Return};
use common::{TestServer, WAIT};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc;

/// The default RabbitMQ used when `RABBITMQ_URL` is not set (the local oracle, see tests/amqp/README.md).
const DEFAULT_RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2F";

/// Something the client was told asynchronously, through its callbacks.
#[derive(Debug)]
enum Event {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
    Return { code: u16, text: String, exchange: String, routing_key: String, body: Vec<u8> },
    ChannelClose { code: u16, text: String, class_id: u16, method_id: u16 },
    Cancel { consumer_tag: String },
    ConnectionClose { code: u16, text: String },
}

/// Forwards every channel callback to the scenario as an [`Event`].
struct Events(mpsc::UnboundedSender<Event>);

#[async_trait::async_trait]
impl ChannelCallback for Events {
    async fn close(&mut self, _channel: &Channel, close: CloseChannel) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::ChannelClose {
            code: close.reply_code(),
            text: close.reply_text().clone(),
            class_id: close.class_id(),
            method_id: close.method_id(),
        });
        Ok(())
    }
    async fn cancel(&mut self, _channel: &Channel, cancel: Cancel) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::Cancel { consumer_tag: cancel.consumer_tag().clone() });
        Ok(())
    }
    async fn flow(&mut self, _channel: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        let _ = self.0.send(Event::Ack { tag: ack.delivery_tag(), multiple: ack.mutiple() });
    }
    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        let _ = self.0.send(Event::Nack { tag: nack.delivery_tag(), multiple: nack.multiple() });
    }
    async fn publish_return(&mut self, _channel: &Channel, ret: Return, _props: BasicProperties, body: Vec<u8>) {
        let _ = self.0.send(Event::Return {
            code: ret.reply_code(),
            text: ret.reply_text().clone(),
            exchange: ret.exchange().clone(),
            routing_key: ret.routing_key().clone(),
            body,
        });
    }
}

#[async_trait::async_trait]
impl ConnectionCallback for Events {
    async fn close(&mut self, _connection: &Connection, close: Close) -> Result<(), amqprs::error::Error> {
        let _ = self.0.send(Event::ConnectionClose { code: close.reply_code(), text: close.reply_text().clone() });
        Ok(())
    }
    async fn blocked(&mut self, _connection: &Connection, _reason: String) {}
    async fn unblocked(&mut self, _connection: &Connection) {}
    async fn secret_updated(&mut self, _connection: &Connection) {}
}

/// `amqp://user:pass@host:port/vhost` as amqprs arguments (amqprs parses URIs only with its `urispec`
/// feature, which pulls in another crate; this is all the tests need).
fn open_args(url: &str) -> OpenConnectionArguments {
    let rest = url.strip_prefix("amqp://").expect("amqp:// URL");
    let (auth, rest) = rest.split_once('@').expect("URL with user:password@");
    let (user, password) = auth.split_once(':').expect("URL with user:password");
    let (host_port, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = host_port.rsplit_once(':').map_or((host_port, 5672), |(h, p)| (h, p.parse().expect("port")));
    let vhost = if vhost.is_empty() { "/".to_string() } else { percent_decode(vhost) };
    OpenConnectionArguments::new(host, port, &percent_decode(user), &percent_decode(password))
        .virtual_host(&vhost)
        .connection_name("mailroom-amqprs-compat")
        .finish()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).expect("UTF-8 URL component")
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("callback event in time").expect("callback channel open")
}

async fn next_message(rx: &mut mpsc::UnboundedReceiver<ConsumerMessage>) -> ConsumerMessage {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("delivery in time").expect("consumer open")
}

async fn open_channel(conn: &Connection) -> (Channel, mpsc::UnboundedReceiver<Event>) {
    let ch = conn.open_channel(None).await.expect("channel opens");
    let (tx, rx) = mpsc::unbounded_channel();
    ch.register_callback(Events(tx)).await.expect("channel callback registers");
    (ch, rx)
}

/// Confirm bookkeeping for one channel: the highest tag settled so far, so that a `multiple` ack or
/// nack is expanded to exactly the tags it newly covers.
#[derive(Default)]
struct Confirms {
    highest: u64,
}

impl Confirms {
    /// Reads events until `n` more tags are settled; returns (acked, nacked) with `multiple` expanded,
    /// and the returns seen in between, in order, as lines.
    async fn settle(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Event>,
        n: u64,
    ) -> (BTreeSet<u64>, BTreeSet<u64>, Vec<String>) {
        let (mut acked, mut nacked, mut others) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
        while acked.len() + nacked.len() < n as usize {
            let (tag, multiple, set) = match next_event(rx).await {
                Event::Ack { tag, multiple } => (tag, multiple, &mut acked),
                Event::Nack { tag, multiple } => (tag, multiple, &mut nacked),
                Event::Return { code, text, exchange, routing_key, body } => {
                    others.push(format!(
                        "return {code} {text} exchange={exchange} rk={routing_key} body={} (before ack of tag {})",
                        String::from_utf8_lossy(&body),
                        self.highest + 1
                    ));
                    continue;
                }
                other => panic!("unexpected event while waiting for confirms: {other:?}"),
            };
            let from = if multiple { self.highest + 1 } else { tag };
            set.extend(from..=tag);
            self.highest = self.highest.max(tag);
        }
        (acked, nacked, others)
    }
}

fn span(tags: &BTreeSet<u64>) -> String {
    match (tags.first(), tags.last()) {
        (Some(a), Some(b)) if tags.len() as u64 == b - a + 1 => format!("{a}..={b}"),
        (None, None) => "none".to_string(),
        _ => format!("{tags:?}"),
    }
}

fn header_i(props: &BasicProperties) -> String {
    match props.headers().and_then(|h| h.get(&"i".try_into().expect("short string"))) {
        Some(FieldValue::I(v)) => v.to_string(),
        other => format!("{other:?}"),
    }
}

/// Runs the scenario and returns what the client saw, one line per step, with the generated names
/// replaced by placeholders so the lines compare across brokers.
async fn scenario(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    // Unique per run: the RabbitMQ target is shared and may hold leftovers of an interrupted run.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let sfx = format!("{}.{nanos}", std::process::id());
    let x = format!("compat.amqprs.x.{sfx}");
    let q = format!("compat.amqprs.q.{sfx}");
    let missing = format!("compat.amqprs.missing.{sfx}");
    let names = |s: &str| s.replace(&x, "<x>").replace(&q, "<q>").replace(&missing, "<missing>");

    // Connect and open a channel.
    let conn = Connection::open(&open_args(url)).await.expect("connection opens");
    let (conn_tx, mut conn_events) = mpsc::unbounded_channel();
    conn.register_callback(Events(conn_tx)).await.expect("connection callback registers");
    let (ch, mut events) = open_channel(&conn).await;
    out.push(format!("open: connection={} channel={} id={}", conn.is_open(), ch.is_open(), ch.channel_id()));

    // Declare and bind.
    ch.exchange_declare(ExchangeDeclareArguments::new(&x, "direct")).await.expect("exchange declares");
    let (name, messages, consumers) =
        ch.queue_declare(QueueDeclareArguments::new(&q)).await.expect("queue declares").expect("declare-ok");
    ch.queue_bind(QueueBindArguments::new(&q, &x, "k")).await.expect("queue binds");
    let (server_named, _, _) = ch
        .queue_declare(QueueDeclareArguments::exclusive_server_named())
        .await
        .expect("server-named queue declares")
        .expect("declare-ok");
    out.push(names(&format!(
        "declare: {name} messages={messages} consumers={consumers}; server-named amq.gen-={}",
        server_named.starts_with("amq.gen-")
    )));

    // Publish with confirms: ten persistent messages, then a mandatory unroutable one.
    ch.confirm_select(ConfirmSelectArguments::default()).await.expect("confirm.select");
    let mut confirms = Confirms::default();
    for i in 0..10 {
        let mut headers = FieldTable::new();
        headers.insert("i".try_into().expect("short string"), FieldValue::I(i));
        let props = BasicProperties::default()
            .with_message_id(&format!("m{i}"))
            .with_content_type("text/plain")
            .with_persistence(true)
            .with_headers(headers)
            .finish();
        ch.basic_publish(props, format!("m{i}").into_bytes(), BasicPublishArguments::new(&x, "k"))
            .await
            .expect("publish");
    }
    let (acked, nacked, others) = confirms.settle(&mut events, 10).await;
    out.push(format!("confirms: acked {} nacked {} other {others:?}", span(&acked), span(&nacked)));
    ch.basic_publish(
        BasicProperties::default(),
        b"lost".to_vec(),
        BasicPublishArguments::new(&x, "nowhere").mandatory(true).finish(),
    )
    .await
    .expect("publish");
    let (acked, nacked, others) = confirms.settle(&mut events, 1).await;
    out.push(names(&format!(
        "mandatory unroutable: {} acked {} nacked {}",
        others.join("; "),
        span(&acked),
        span(&nacked)
    )));

    // basic.get: the first message, its properties, and how many are left.
    let (get_ok, props, body) =
        ch.basic_get(BasicGetArguments::new(&q)).await.expect("basic.get").expect("a message is ready");
    out.push(format!(
        "get: {} tag={} redelivered={} remaining={} message_id={:?} content_type={:?} header i={} persistent={:?}",
        String::from_utf8_lossy(&body),
        get_ok.delivery_tag(),
        get_ok.redelivered(),
        get_ok.message_count(),
        props.message_id(),
        props.content_type(),
        header_i(&props),
        props.delivery_mode(),
    ));
    ch.basic_ack(BasicAckArguments::new(get_ok.delivery_tag(), false)).await.expect("ack");

    // Consume with manual ack and prefetch 3: three arrive, the fourth only after an ack.
    ch.basic_qos(BasicQosArguments::new(0, 3, false)).await.expect("basic.qos");
    let (tag, mut deliveries) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&q, "amqprs-consumer").manual_ack(true).finish())
        .await
        .expect("basic.consume");
    let mut window = Vec::new();
    for _ in 0..3 {
        window.push(next_message(&mut deliveries).await);
    }
    let over_window = tokio::time::timeout(Duration::from_millis(300), deliveries.recv()).await.is_ok();
    let mut got = Vec::new();
    let mut pending = window;
    while got.len() < 9 {
        let m = pending.remove(0);
        let d = m.deliver.expect("deliver method");
        got.push(format!(
            "{}:{}:{}:{}",
            String::from_utf8_lossy(&m.content.expect("body")),
            d.delivery_tag(),
            d.redelivered(),
            header_i(&m.basic_properties.expect("properties"))
        ));
        ch.basic_ack(BasicAckArguments::new(d.delivery_tag(), false)).await.expect("ack");
        if got.len() + pending.len() < 9 {
            pending.push(next_message(&mut deliveries).await);
        }
    }
    out.push(format!("consume: tag={tag} fourth before an ack={over_window} got {}", got.join(",")));
    let cancelled = ch.basic_cancel(BasicCancelArguments::new(&tag)).await.expect("basic.cancel");
    let (_, messages, consumers) = ch
        .queue_declare(QueueDeclareArguments::new(&q).passive(true).finish())
        .await
        .expect("passive declare")
        .expect("declare-ok");
    out.push(format!("cancel: {cancelled} then messages={messages} consumers={consumers}"));

    // Consumer cancel notification: another channel deletes the queue under a consumer; the client's
    // cancel callback runs and its delivery stream ends, and the channel stays open.
    let cq = format!("compat.amqprs.cq.{sfx}");
    ch.queue_declare(QueueDeclareArguments::new(&cq)).await.expect("queue declares");
    let (ctag, mut cancelled_rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(&cq, "amqprs-cancelled").manual_ack(true).finish())
        .await
        .expect("basic.consume");
    let (other, _other_events) = open_channel(&conn).await;
    other.queue_delete(QueueDeleteArguments::new(&cq)).await.expect("queue.delete");
    other.close().await.expect("channel.close");
    match next_event(&mut events).await {
        Event::Cancel { consumer_tag } => {
            let ended = tokio::time::timeout(WAIT, cancelled_rx.recv()).await.expect("stream ends in time").is_none();
            out.push(format!(
                "cancel notification: for our consumer={} stream ended={ended} channel={}",
                consumer_tag == ctag,
                ch.is_open()
            ));
        }
        other => panic!("expected basic.cancel, got {other:?}"),
    }

    // A channel error: publishing to a missing exchange closes that channel with 404 ...
    let (bad, mut bad_events) = open_channel(&conn).await;
    bad.basic_publish(BasicProperties::default(), b"x".to_vec(), BasicPublishArguments::new(&missing, "k"))
        .await
        .expect("publish is asynchronous");
    match next_event(&mut bad_events).await {
        Event::ChannelClose { code, text, class_id, method_id } => {
            // The callback runs before amqprs marks the channel closed: give it a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            out.push(names(&format!(
                            "publish to missing exchange: channel.close {code} {text} class={class_id} method={method_id} channel open={}",
                bad.is_open()
            )))
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
    // ... and so does a passive declare of it, which returns an error to the caller.
    let (bad2, mut bad2_events) = open_channel(&conn).await;
    let passive = bad2.exchange_declare(ExchangeDeclareArguments::new(&missing, "direct").passive(true).finish()).await;
    match next_event(&mut bad2_events).await {
        Event::ChannelClose { code, class_id, method_id, .. } => out.push(format!(
            "passive declare of missing exchange: error={} channel.close {code} class={class_id} method={method_id}",
            passive.is_err()
        )),
        other => panic!("expected channel.close, got {other:?}"),
    }
    // ... while the connection and the first channel carry on.
    ch.basic_publish(BasicProperties::default(), b"alive".to_vec(), BasicPublishArguments::new("", &q))
        .await
        .expect("publish");
    let (acked, _, _) = confirms.settle(&mut events, 1).await;
    let (_, _, body) = ch
        .basic_get(BasicGetArguments::new(&q).no_ack(true).finish())
        .await
        .expect("basic.get")
        .expect("a message is ready");
    let (fresh, _fresh_events) = open_channel(&conn).await;
    out.push(format!(
        "after the errors: connection={} channel={} confirm {} get={} new channel={}",
        conn.is_open(),
        ch.is_open(),
        span(&acked),
        String::from_utf8_lossy(&body),
        fresh.is_open()
    ));

    // Clean close: deletes, channel.close, connection.close; the broker never closed anything itself.
    let deleted = ch.queue_delete(QueueDeleteArguments::new(&q)).await.expect("queue.delete");
    ch.exchange_delete(ExchangeDeleteArguments::new(&x)).await.expect("exchange.delete");
    let fresh_close = fresh.close().await;
    let ch_close = ch.close().await;
    let conn_close = conn.close().await;
    let conn_closed_by_broker = conn_events.try_recv().ok().map(|e| match e {
        Event::ConnectionClose { code, text } => format!("{code} {text}"),
        other => format!("{other:?}"),
    });
    out.push(format!(
        "close: queue.delete={deleted:?} channel close ok={} {} connection close ok={} broker close={conn_closed_by_broker:?}",
        fresh_close.is_ok(),
        ch_close.is_ok(),
        conn_close.is_ok()
    ));
    out
}

/// What amqprs sees, identical on RabbitMQ 3.10.8 and Mailroom.
const EXPECTED: &[&str] = &[
    "open: connection=true channel=true id=1",
    "declare: <q> messages=0 consumers=0; server-named amq.gen-=true",
    "confirms: acked 1..=10 nacked none other []",
    "mandatory unroutable: return 312 NO_ROUTE exchange=<x> rk=nowhere body=lost (before ack of tag 11) acked 11..=11 nacked none",
    "get: m0 tag=1 redelivered=false remaining=9 message_id=Some(\"m0\") content_type=Some(\"text/plain\") header i=0 persistent=Some(2)",
    "consume: tag=amqprs-consumer fourth before an ack=false got m1:2:false:1,m2:3:false:2,m3:4:false:3,m4:5:false:4,m5:6:false:5,m6:7:false:6,m7:8:false:7,m8:9:false:8,m9:10:false:9",
    "cancel: amqprs-consumer then messages=0 consumers=0",
    "cancel notification: for our consumer=true stream ended=true channel=true",
    "publish to missing exchange: channel.close 404 NOT_FOUND - no exchange '<missing>' in vhost '/' class=60 method=40 channel open=false",
    "passive declare of missing exchange: error=true channel.close 404 class=40 method=10",
    "after the errors: connection=true channel=true confirm 12..=12 get=alive new channel=true",
    "close: queue.delete=Some(0) channel close ok=true true connection close ok=true broker close=None",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_against_mailroom() {
    let server = TestServer::start().await;
    let got = scenario(&server.url).await;
    assert_eq!(got, EXPECTED);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_against_rabbitmq() {
    let (url, explicit) = match std::env::var("RABBITMQ_URL") {
        Ok(url) => (url, true),
        Err(_) => (DEFAULT_RABBITMQ_URL.to_string(), false),
    };
    let args = open_args(&url);
    if !explicit && tokio::net::TcpStream::connect((args.get_host(), args.get_port())).await.is_err() {
        eprintln!("skipped: no RabbitMQ at {url} (set RABBITMQ_URL to require one)");
        return;
    }
    assert_eq!(scenario(&url).await, EXPECTED);
}
