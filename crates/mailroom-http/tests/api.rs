//! The HTTP API against a real server on port 0, with a raw HTTP/1.1 client.

use bytes::Bytes;
use mailroom_broker::{
    AMQPValue, BasicProperties, Broker, BrokerConfig, ExchangeOptions, FieldTable, Message, QueueOptions,
};
use mailroom_http::HttpServer;
use serde_json::Value;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start() -> (Broker, SocketAddr) {
    let broker = Broker::open(BrokerConfig::default()).unwrap();
    let server = HttpServer::bind(broker.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending()));
    (broker, addr)
}

const GUEST: &str = "Z3Vlc3Q6Z3Vlc3Q="; // guest:guest

async fn call(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(a) = auth {
        req += &format!("Authorization: Basic {a}\r\n");
    }
    let body = body.unwrap_or("");
    req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let json = if body.is_empty() { Value::Null } else { serde_json::from_str(body).unwrap() };
    (status, json)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    call(addr, "GET", path, Some(GUEST), None).await
}

fn publish(broker: &Broker, queue: &str, body: &[u8], headers: &[(&str, &str)]) {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert((*k).into(), AMQPValue::LongString((*v).into()));
    }
    let props = BasicProperties::default().with_headers(t).with_content_type("text/plain".into());
    broker.vhost("/").unwrap().publish("", Message::new("", queue, props, Bytes::copy_from_slice(body))).unwrap();
}

#[tokio::test]
async fn auth_is_required() {
    let (_broker, addr) = start().await;
    let (status, body) = call(addr, "GET", "/api/overview", None, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "not_authorised");
    let wrong = "Z3Vlc3Q6bm9wZQ=="; // guest:nope
    assert_eq!(call(addr, "GET", "/api/overview", Some(wrong), None).await.0, 401);
    assert_eq!(call(addr, "GET", "/api/overview", Some("!!!"), None).await.0, 401);
    assert_eq!(get(addr, "/api/overview").await.0, 200);
}

#[tokio::test]
async fn overview_and_queues() {
    let (broker, addr) = start().await;
    let v = broker.vhost("/").unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(10));
    v.declare_queue("q1", &QueueOptions { durable: true, arguments: args, ..Default::default() }, 1).unwrap();
    publish(&broker, "q1", b"a", &[]);
    publish(&broker, "q1", b"b", &[]);
    v.queue("q1", 1).unwrap().get(false).unwrap();
    let (status, o) = get(addr, "/api/overview").await;
    assert_eq!(status, 200);
    assert_eq!(o["object_totals"]["queues"], 1);
    assert_eq!(o["queue_totals"]["messages_ready"], 1);
    assert_eq!(o["queue_totals"]["messages_unacknowledged"], 1);
    let (_, list) = get(addr, "/api/queues").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (status, q) = get(addr, "/api/queues/%2F/q1").await;
    assert_eq!(status, 200);
    assert_eq!(q["name"], "q1");
    assert_eq!(q["vhost"], "/");
    assert_eq!(q["durable"], true);
    assert_eq!(q["messages_ready"], 1);
    assert_eq!(q["messages_unacknowledged"], 1);
    assert_eq!(q["messages"], 2);
    assert_eq!(q["consumers"], 0);
    assert_eq!(q["arguments"]["x-max-length"], 10);
    assert_eq!(get(addr, "/api/queues/%2F").await.1.as_array().unwrap().len(), 1);
    let (status, e) = get(addr, "/api/queues/%2F/missing").await;
    assert_eq!(status, 404);
    assert!(e["reason"].as_str().unwrap().contains("missing"));
    assert_eq!(get(addr, "/api/queues/nohost/q1").await.0, 404);
    assert_eq!(get(addr, "/api/nothing").await.0, 404);
    assert_eq!(get(addr, "/api/queues/%ZZ/q1").await.0, 400);
}

#[tokio::test]
async fn peek_shows_messages_without_taking_them() {
    let (broker, addr) = start().await;
    let v = broker.vhost("/").unwrap();
    v.declare_queue("q", &QueueOptions::default(), 1).unwrap();
    publish(&broker, "q", b"hello", &[("h", "v")]);
    publish(&broker, "q", &[0xff, 0x00], &[]);
    publish(&broker, "q", b"third", &[]);
    let (status, page) = get(addr, "/api/queues/%2F/q/peek?offset=0&count=2").await;
    assert_eq!(status, 200);
    let page = page.as_array().unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["payload"], "hello");
    assert_eq!(page[0]["payload_encoding"], "string");
    assert_eq!(page[0]["routing_key"], "q");
    assert_eq!(page[0]["exchange"], "");
    assert_eq!(page[0]["properties"]["headers"]["h"], "v");
    assert_eq!(page[0]["properties"]["content_type"], "text/plain");
    assert_eq!(page[1]["payload"], "/wA=");
    assert_eq!(page[1]["payload_encoding"], "base64");
    let (_, rest) = get(addr, "/api/queues/%2F/q/peek?offset=2").await;
    assert_eq!(rest[0]["payload"], "third");
    assert_eq!(v.queue("q", 1).unwrap().message_count(), 3);
    assert_eq!(&v.queue("q", 1).unwrap().get(true).unwrap().message.body[..], b"hello");
    assert_eq!(get(addr, "/api/queues/%2F/q/peek?count=x").await.0, 400);
    assert_eq!(get(addr, "/api/queues/%2F/q/peek?count=100000").await.0, 400);
}

#[tokio::test]
async fn redrive_moves_dead_letters_back() {
    let (broker, addr) = start().await;
    let v = broker.vhost("/").unwrap();
    v.declare_exchange("dlx", "fanout", &ExchangeOptions::default()).unwrap();
    v.declare_queue("dlq", &QueueOptions::default(), 1).unwrap();
    v.bind_queue("dlq", "dlx", "", &FieldTable::default(), 1).unwrap();
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("dlx".into()));
    v.declare_queue("work", &QueueOptions { arguments: args, ..Default::default() }, 1).unwrap();
    v.declare_queue("other", &QueueOptions::default(), 1).unwrap();
    for i in 0..4 {
        publish(&broker, "work", format!("m{i}").as_bytes(), &[("kind", if i < 2 { "a" } else { "b" })]);
    }
    let work = v.queue("work", 1).unwrap();
    for _ in 0..4 {
        let g = work.get(false).unwrap();
        work.reject(&[g.id], false);
    }
    let (status, out) = call(
        addr,
        "POST",
        "/api/queues/%2F/dlq/redrive",
        Some(GUEST),
        Some(r#"{"count":1,"target":{"queue":"other"}}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(out["moved"], 1);
    let body = r#"{"header_filter":{"name":"kind","value":"b"}}"#;
    let (_, out) = call(addr, "POST", "/api/queues/%2F/dlq/redrive", Some(GUEST), Some(body)).await;
    assert_eq!((out["moved"].as_u64(), out["skipped"].as_u64()), (Some(2), Some(1)));
    let (_, out) = call(addr, "POST", "/api/queues/%2F/dlq/redrive", Some(GUEST), Some("")).await;
    assert_eq!(out["moved"], 1);
    assert_eq!(v.queue("dlq", 1).unwrap().message_count(), 0);
    assert_eq!(work.message_count(), 3);
    assert_eq!(v.queue("other", 1).unwrap().message_count(), 1);
    let (status, _) = call(addr, "POST", "/api/queues/%2F/dlq/redrive", Some(GUEST), Some("{nope")).await;
    assert_eq!(status, 400);
    let bad_target = r#"{"target":{"queue":"x","exchange":"y"}}"#;
    assert_eq!(call(addr, "POST", "/api/queues/%2F/dlq/redrive", Some(GUEST), Some(bad_target)).await.0, 400);
    let missing = r#"{"target":{"queue":"missing"}}"#;
    assert_eq!(call(addr, "POST", "/api/queues/%2F/dlq/redrive", Some(GUEST), Some(missing)).await.0, 404);
    assert_eq!(call(addr, "DELETE", "/api/queues/%2F/dlq/redrive", Some(GUEST), None).await.0, 405);
}

#[tokio::test]
async fn policies_crud_and_effect() {
    let (broker, addr) = start().await;
    let v = broker.vhost("/").unwrap();
    v.declare_queue("jobs", &QueueOptions::default(), 1).unwrap();
    for _ in 0..4 {
        publish(&broker, "jobs", b"x", &[]);
    }
    let body =
        r#"{"pattern":"^jobs$","definition":{"max-length":1,"message-ttl":60000},"priority":2,"apply-to":"queues"}"#;
    assert_eq!(call(addr, "PUT", "/api/policies/%2F/cap", Some(GUEST), Some(body)).await.0, 201);
    assert_eq!(call(addr, "PUT", "/api/policies/%2F/cap", Some(GUEST), Some(body)).await.0, 204);
    assert_eq!(v.queue("jobs", 1).unwrap().message_count(), 1);
    let (status, p) = get(addr, "/api/policies/%2F/cap").await;
    assert_eq!(status, 200);
    assert_eq!(p["pattern"], "^jobs$");
    assert_eq!(p["apply-to"], "queues");
    assert_eq!(p["priority"], 2);
    assert_eq!(p["definition"]["max-length"], 1);
    assert_eq!(get(addr, "/api/policies/%2F").await.1.as_array().unwrap().len(), 1);
    assert_eq!(get(addr, "/api/policies").await.1.as_array().unwrap().len(), 1);
    let (_, q) = get(addr, "/api/queues/%2F/jobs").await;
    assert_eq!(q["policy"], "cap");
    assert_eq!(q["effective_policy_definition"]["max-length"], 1);
    let bad = [
        r#"{"pattern":"^jobs$","definition":{"max-priority":5}}"#,
        r#"{"pattern":"^jobs$","definition":{"nope":5}}"#,
        r#"{"pattern":"(","definition":{"max-length":5}}"#,
        r#"{"pattern":"^jobs$","definition":{"max-length":"five"}}"#,
        r#"{"pattern":"^jobs$","definition":[]}"#,
        r#"{"pattern":"^jobs$","definition":{"max-length":5},"apply-to":"bindings"}"#,
        r#"{"definition":{"max-length":5}}"#,
    ];
    for b in bad {
        let (status, e) = call(addr, "PUT", "/api/policies/%2F/bad", Some(GUEST), Some(b)).await;
        assert_eq!(status, 400, "{b}");
        assert!(e["reason"].is_string());
    }
    assert_eq!(call(addr, "DELETE", "/api/policies/%2F/cap", Some(GUEST), None).await.0, 204);
    assert_eq!(call(addr, "DELETE", "/api/policies/%2F/cap", Some(GUEST), None).await.0, 404);
    assert_eq!(get(addr, "/api/policies/%2F/cap").await.0, 404);
    assert_eq!(v.queue("jobs", 1).unwrap().args().max_length, None);
}

/// GET without credentials; returns status, content type and body text.
async fn scrape(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: ").or_else(|| l.strip_prefix("Content-Type: ")))
        .unwrap_or("")
        .to_owned();
    (status, content_type, body.to_owned())
}

fn sample(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn metrics_and_overview_count_the_stores_fsyncs() {
    let dir = std::env::temp_dir().join(format!("mailroom-http-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
    let server = HttpServer::bind(broker.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending()));

    let (status, content_type, before) = scrape(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let fsyncs_before = sample(&before, "mailroom_fsyncs_total");

    let v = broker.vhost("/").unwrap();
    v.declare_queue("dq", &QueueOptions { durable: true, ..Default::default() }, 1).unwrap();
    let props = BasicProperties::default().with_delivery_mode(2);
    for i in 0..3u8 {
        let result = v.publish("", Message::new("", "dq", props.clone(), Bytes::from(vec![i; 100]))).unwrap();
        for t in result.durable {
            t.wait().await.unwrap();
        }
    }
    let (_, _, after) = scrape(addr, "/metrics").await;
    assert!(sample(&after, "mailroom_fsyncs_total") > fsyncs_before, "{after}");
    assert_eq!(sample(&after, "mailroom_synced_records_total"), 3.0);
    assert_eq!(sample(&after, "mailroom_queue_messages_ready"), 3.0);
    assert_eq!(sample(&after, "mailroom_queues"), 1.0);

    let (status, o) = get(addr, "/api/overview").await;
    assert_eq!(status, 200);
    assert!(o["store_totals"]["fsyncs"].as_u64().unwrap() >= sample(&after, "mailroom_fsyncs_total") as u64);
    assert_eq!(o["store_totals"]["records_synced"], 3);
    assert_eq!(call(addr, "POST", "/metrics", None, None).await.0, 405);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    call(addr, method, path, Some(GUEST), Some(body)).await
}

#[tokio::test]
async fn declare_publish_get_with_each_ack_mode() {
    let (broker, addr) = start().await;
    assert_eq!(send(addr, "PUT", "/api/queues/%2F/dlq", r#"{"durable":false}"#).await.0, 201);
    let args = r#"{"durable":false,"arguments":{"x-dead-letter-exchange":"","x-dead-letter-routing-key":"dlq"}}"#;
    assert_eq!(send(addr, "PUT", "/api/queues/%2F/q", args).await.0, 201);
    assert_eq!(send(addr, "PUT", "/api/queues/%2F/q", args).await.0, 204);
    for i in 0..3 {
        let body = format!(
            r#"{{"properties":{{"headers":{{"n":{i}}}}},"routing_key":"q","payload":"m{i}","payload_encoding":"string"}}"#
        );
        assert_eq!(send(addr, "POST", "/api/exchanges/%2F/amq.default/publish", &body).await.1["routed"], true);
    }
    let get = |mode: &str| format!(r#"{{"count":1,"ackmode":"{mode}","encoding":"auto"}}"#);
    let (_, got) = send(addr, "POST", "/api/queues/%2F/q/get", &get("ack_requeue_true")).await;
    assert_eq!(got[0]["payload"], "m0");
    assert_eq!(got[0]["properties"]["headers"]["n"], 0);
    let q = broker.vhost("/").unwrap().queue("q", 0).unwrap();
    assert_eq!((q.message_count(), q.unacked_count()), (3, 0), "requeued, nothing left unacked");
    let (_, got) = send(addr, "POST", "/api/queues/%2F/q/get", &get("ack_requeue_false")).await;
    assert_eq!((got[0]["payload"].as_str(), got[0]["redelivered"].as_bool()), (Some("m0"), Some(true)));
    assert_eq!(q.message_count(), 2);
    send(addr, "POST", "/api/queues/%2F/q/get", &get("reject_requeue_false")).await;
    assert_eq!(q.message_count(), 1);
    assert_eq!(broker.vhost("/").unwrap().queue("dlq", 0).unwrap().message_count(), 1, "dead-lettered");
    assert_eq!(send(addr, "POST", "/api/queues/%2F/q/get", &get("bogus")).await.0, 400);
    assert_eq!(call(addr, "DELETE", "/api/queues/%2F/q?if-empty=true", Some(GUEST), None).await.0, 400);
    assert_eq!(call(addr, "DELETE", "/api/queues/%2F/q/contents", Some(GUEST), None).await.0, 204);
    assert_eq!(call(addr, "DELETE", "/api/queues/%2F/q?if-empty=true", Some(GUEST), None).await.0, 204);
    assert_eq!(call(addr, "DELETE", "/api/queues/%2F/q", Some(GUEST), None).await.0, 404);
}

#[tokio::test]
async fn bindings_are_addressed_by_properties_key() {
    let (_broker, addr) = start().await;
    send(addr, "PUT", "/api/exchanges/%2F/x", r#"{"type":"direct","durable":false}"#).await;
    send(addr, "PUT", "/api/queues/%2F/q", r#"{"durable":false}"#).await;
    assert_eq!(send(addr, "POST", "/api/bindings/%2F/e/x/q/q", r#"{"routing_key":"a~b%"}"#).await.0, 201);
    assert_eq!(send(addr, "POST", "/api/bindings/%2F/e/x/q/q", r#"{"routing_key":""}"#).await.0, 201);
    let (_, list) = get(addr, "/api/bindings/%2F/e/x/q/q").await;
    let keys: Vec<&str> = list.as_array().unwrap().iter().map(|b| b["properties_key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["~", "a%7Eb%25"]);
    assert_eq!(get(addr, "/api/bindings/%2F/e/x/q/q/a%257Eb%2525").await.1["routing_key"], "a~b%");
    assert_eq!(call(addr, "DELETE", "/api/bindings/%2F/e/x/q/q/~", Some(GUEST), None).await.0, 204);
    assert_eq!(get(addr, "/api/bindings/%2F/e/x/q/q").await.1.as_array().unwrap().len(), 1);
    assert_eq!(get(addr, "/api/bindings/%2F/e/x/q/q/~").await.0, 404);
}

#[tokio::test]
async fn definitions_import_keeps_existing_objects_and_overwrites_policies() {
    let (broker, addr) = start().await;
    send(addr, "PUT", "/api/queues/%2F/kept", r#"{"durable":true,"arguments":{"x-max-length":3}}"#).await;
    let doc = r#"{
        "users": [{"name": "u", "password_hash": "XLzAOrwLW3UNWHalIrxlv5nfO5TMvu0OfDaxBgJd0l1i5qe5",
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}],
        "vhosts": [{"name": "/"}, {"name": "other"}],
        "policies": [{"vhost": "/", "name": "p", "pattern": "^kept$", "apply-to": "queues", "priority": 0,
                      "definition": {"max-length": 5}}],
        "queues": [{"name": "kept", "vhost": "/", "durable": true, "auto_delete": false,
                    "arguments": {"x-max-length": 99}},
                   {"name": "new", "vhost": "other", "durable": true, "auto_delete": false, "arguments": {}}],
        "exchanges": [{"name": "x", "vhost": "other", "type": "fanout", "durable": true, "auto_delete": false,
                       "internal": false, "arguments": {}}],
        "bindings": [{"source": "x", "vhost": "other", "destination": "new", "destination_type": "queue",
                      "routing_key": "", "arguments": {}}]
    }"#;
    assert_eq!(send(addr, "POST", "/api/definitions", doc).await.0, 204);
    let (_, kept) = get(addr, "/api/queues/%2F/kept").await;
    assert_eq!(kept["arguments"]["x-max-length"], 3, "an existing queue is kept as it is");
    assert_eq!(kept["policy"], "p");
    assert!(broker.vhost("other").is_ok(), "vhost created");
    assert_eq!(get(addr, "/api/bindings/other/e/x/q/new").await.1.as_array().unwrap().len(), 1);
    let again = doc.replace(r#"{"max-length": 5}"#, r#"{"max-length": 7}"#);
    assert_eq!(send(addr, "POST", "/api/definitions", &again).await.0, 204);
    assert_eq!(get(addr, "/api/policies/%2F/p").await.1["definition"]["max-length"], 7, "policy overwritten");
    let (_, exported) = get(addr, "/api/definitions").await;
    assert_eq!(exported["vhosts"].as_array().unwrap().len(), 2);
    assert!(exported["exchanges"].as_array().unwrap().iter().all(|e| e["name"] == "x"), "no amq.* or default");

    let bad = r#"{"exchanges": [{"name": "b1", "vhost": "/", "type": "nope"}, {"name": "b2", "vhost": "/", "type": "nope2"}]}"#;
    let (status, e) = send(addr, "POST", "/api/definitions", bad).await;
    assert_eq!(status, 400);
    let reason = e["reason"].as_str().unwrap();
    assert!(reason.contains("b1") && !reason.contains("b2"), "{reason}");
}

/// Issue 13 item 2: a stored record that fails its checksum is quarantined, and counted in the queue's
/// `quarantined` field and in `mailroom_quarantined_records_total`.
#[tokio::test]
async fn quarantined_records_are_counted_in_the_queue_and_the_metrics() {
    let dir = std::env::temp_dir().join(format!("mailroom-http-quarantine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = || Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
    {
        let broker = open();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("cq", &QueueOptions { durable: true, ..Default::default() }, 1).unwrap();
        let props = BasicProperties::default().with_delivery_mode(2);
        for body in ["good-1", "spoil-me", "good-2"] {
            let result = v.publish("", Message::new("", "cq", props.clone(), Bytes::from(body))).unwrap();
            for t in result.durable {
                t.wait().await.unwrap();
            }
        }
        broker.flush_stores().await;
    }
    // Reopened, every body is on disk; damage one of them there.
    let broker = open();
    let segment = walk(&dir.join("msgs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .find(|p| std::fs::read(p).unwrap().windows(8).any(|w| w == b"spoil-me"))
        .expect("the segment holding the record");
    let mut data = std::fs::read(&segment).unwrap();
    let at = data.windows(8).position(|w| w == b"spoil-me").unwrap();
    data[at] = b'S';
    std::fs::write(&segment, &data).unwrap();
    let server = HttpServer::bind(broker.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending()));

    let q = broker.vhost("/").unwrap().queue("cq", 1).unwrap();
    let mut got = Vec::new();
    while let Some(m) = q.get(true) {
        got.push(String::from_utf8_lossy(&m.message.body).into_owned());
    }
    assert_eq!(got, vec!["good-1", "good-2"]);
    let (status, json) = get(addr, "/api/queues/%2F/cq").await;
    assert_eq!(status, 200);
    assert_eq!(json["quarantined"], 1, "{json}");
    assert_eq!(json["read_errors"], 0, "{json}");
    let (_, _, text) = scrape(addr, "/metrics").await;
    assert!(sample(&text, "mailroom_quarantined_records_total") >= 1.0, "{text}");
    assert_eq!(sample(&text, "mailroom_stores_failing"), 0.0);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
