//! The HTTP listener's defences against a real server: Host check, cross-site requests, body limit,
//! connection limit, idle and header timeouts, per-vhost and per-owner permissions, and HTTPS.

use base64::Engine;
use mailroom_broker::access::{Permissions, UserTag};
use mailroom_broker::{Broker, BrokerConfig, QueueOptions};
use mailroom_http::{HttpServer, HttpSettings};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start_with(settings: HttpSettings) -> (Broker, SocketAddr) {
    let broker = Broker::open(BrokerConfig::default()).unwrap();
    let server =
        HttpServer::bind(broker.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap().with_settings(settings);
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending()));
    (broker, addr)
}

fn basic(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// Sends `head` (request line and headers, without the blank line) and `body`, reads the answer to EOF.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, head: &str, body: &str) -> (u16, Value) {
    let req = format!("{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    parse(&out)
}

fn parse(out: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn send(addr: SocketAddr, head: &str, body: &str) -> (u16, Value) {
    exchange(TcpStream::connect(addr).await.unwrap(), head, body).await
}

const GUEST: &str = "Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=";

#[tokio::test]
async fn loopback_listener_refuses_foreign_host_names() {
    let settings = HttpSettings { allowed_hosts: vec!["mq.internal".into()], ..Default::default() };
    let (_b, addr) = start_with(settings).await;
    let p = addr.port();
    for host in [format!("localhost:{p}"), format!("127.0.0.1:{p}"), format!("[::1]:{p}"), "mq.internal".into()] {
        let (status, _) = send(addr, &format!("GET /api/overview HTTP/1.1\r\nHost: {host}\r\n{GUEST}"), "").await;
        assert_eq!(status, 200, "{host}");
    }
    for host in [format!("evil.example:{p}"), "attacker.test".into()] {
        let (status, body) = send(addr, &format!("GET /api/overview HTTP/1.1\r\nHost: {host}\r\n{GUEST}"), "").await;
        assert_eq!(status, 403, "{host}");
        assert_eq!(body["error"], "access_refused");
        // Unauthenticated paths too: a rebinding page must not read the metrics.
        let (status, _) = send(addr, &format!("GET /metrics HTTP/1.1\r\nHost: {host}"), "").await;
        assert_eq!(status, 403);
    }
}

#[tokio::test]
async fn cross_site_mutations_are_refused() {
    let (broker, addr) = start_with(HttpSettings::default()).await;
    let host = format!("Host: localhost:{}", addr.port());
    // Another origin, and the fetch metadata of a cross-site or same-site page: 403, nothing created.
    for extra in
        ["Origin: http://evil.example", "Origin: null", "Sec-Fetch-Site: cross-site", "Sec-Fetch-Site: same-site"]
    {
        let (status, body) =
            send(addr, &format!("PUT /api/vhosts/csrf HTTP/1.1\r\n{host}\r\n{GUEST}\r\n{extra}"), "").await;
        assert_eq!(status, 403, "{extra}");
        assert_eq!(body["error"], "cross_site_request");
        assert!(broker.vhost("csrf").is_err());
    }
    // Form bodies: 415.
    for ct in ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let head = format!("PUT /api/queues/%2F/csrfq HTTP/1.1\r\n{host}\r\n{GUEST}\r\nContent-Type: {ct}");
        let (status, body) = send(addr, &head, r#"{"durable":true}"#).await;
        assert_eq!(status, 415, "{ct}");
        assert_eq!(body["error"], "unsupported_media_type");
    }
    assert!(broker.vhost("/").unwrap().queues().is_empty());
    // The same origin, same-origin fetch metadata, JSON, and a body-less PUT without a Content-Type pass.
    let origin = format!("Origin: http://localhost:{}\r\nSec-Fetch-Site: same-origin", addr.port());
    let (status, _) = send(addr, &format!("PUT /api/vhosts/csrf HTTP/1.1\r\n{host}\r\n{GUEST}\r\n{origin}"), "").await;
    assert_eq!(status, 201);
    let head = format!("PUT /api/queues/csrf/q HTTP/1.1\r\n{host}\r\n{GUEST}\r\nContent-Type: application/json");
    assert_eq!(send(addr, &head, r#"{"durable":false}"#).await.0, 201);
    // GET from anywhere is not a mutation (CORS keeps the answer from the page).
    let (status, _) =
        send(addr, &format!("GET /api/vhosts/csrf HTTP/1.1\r\n{host}\r\n{GUEST}\r\nOrigin: http://evil.example"), "")
            .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn oversized_bodies_get_413_and_definitions_have_their_own_limit() {
    let settings = HttpSettings { max_body: 1000, max_definitions_body: 10_000, ..Default::default() };
    let (_b, addr) = start_with(settings).await;
    let host = format!("Host: localhost:{}\r\n{GUEST}\r\nContent-Type: application/json", addr.port());
    let big = format!(r#"{{"arguments":{{"x":"{}"}}}}"#, "a".repeat(2000));
    let (status, body) = send(addr, &format!("PUT /api/queues/%2F/big HTTP/1.1\r\n{host}"), &big).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "payload_too_large");
    assert!(body["reason"].as_str().unwrap().starts_with("Exceeded HTTP request body size limit"));
    // Chunked (no announced length): refused once the limit is crossed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("PUT /api/queues/%2F/big HTTP/1.1\r\n{host}\r\nTransfer-Encoding: chunked\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 600, "b".repeat(600));
    s.write_all(chunk.as_bytes()).await.unwrap();
    s.write_all(chunk.as_bytes()).await.unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut out)).await.unwrap().unwrap();
    assert_eq!(parse(&out[..n]).0, 413);
    // A definitions document over the general limit but under its own is read (and imported).
    let doc = format!(
        r#"{{"queues":[{{"name":"imported","vhost":"/","durable":false,"auto_delete":false,"arguments":{{"x-note":"{}"}}}}]}}"#,
        "c".repeat(3000)
    );
    let (status, body) = send(addr, &format!("POST /api/definitions HTTP/1.1\r\n{host}"), &doc).await;
    assert!(status == 204 || status == 200 || status == 201, "{status} {body}");
    let (status, _) = send(addr, &format!("POST /api/definitions HTTP/1.1\r\n{host}"), &"x".repeat(20_000)).await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let settings = HttpSettings { max_connections: 2, ..Default::default() };
    let (_b, addr) = start_with(settings).await;
    let held = [TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap()];
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(parse(&out).0, 503);
    // A slot freed is a slot for the next client.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let head = format!("GET /api/overview HTTP/1.1\r\nHost: localhost\r\n{GUEST}");
    assert_eq!(send(addr, &head, "").await.0, 200);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let settings = HttpSettings { idle_timeout: Duration::from_millis(300), ..Default::default() };
    let (_b, addr) = start_with(settings).await;
    // Silent from the start.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    // Idle after a keep-alive request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /api/overview HTTP/1.1\r\nHost: localhost\r\n{GUEST}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert_eq!(parse(&out).0, 200);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off() {
    let settings = HttpSettings {
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let (_b, addr) = start_with(settings).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    // One byte every 100 ms: never idle, never a whole head.
    let closed = async {
        for b in b"GET /api/overview HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(4), closed).await.expect("the connection was closed");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(started.elapsed() >= Duration::from_millis(400));
}

fn add_user(broker: &Broker, name: &str, tags: &str, vhosts: &[&str]) -> String {
    broker.access().add_user(name, b"pw", UserTag::parse_list(tags)).unwrap();
    for v in vhosts {
        broker.access().set_permissions(name, v, Permissions::full()).unwrap();
    }
    format!("Authorization: Basic {}", basic(name, "pw"))
}

fn names(v: &Value) -> Vec<String> {
    let items = v.get("items").unwrap_or(v);
    let mut out: Vec<String> =
        items.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_owned()).collect();
    out.sort();
    out
}

#[tokio::test]
async fn management_users_see_only_their_vhosts() {
    let (broker, addr) = start_with(HttpSettings::default()).await;
    for v in ["mine", "theirs"] {
        let vh = broker.add_vhost(v);
        vh.declare_queue(&format!("q-{v}"), &QueueOptions::default(), 1).unwrap();
    }
    let mgmt = add_user(&broker, "mgmt", "management", &["mine"]);
    let monitor = add_user(&broker, "mon", "monitoring", &[]);
    let policy = add_user(&broker, "pm", "policymaker", &["mine"]);
    let get = |auth: String, path: &str| {
        let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}");
        async move { send(addr, &head, "").await }
    };
    // Lists are cut to the vhosts with permissions; paging counts what is left.
    assert_eq!(names(&get(mgmt.clone(), "/api/vhosts").await.1), vec!["mine"]);
    assert_eq!(names(&get(mgmt.clone(), "/api/queues").await.1), vec!["q-mine"]);
    let page = get(mgmt.clone(), "/api/queues?page=1&page_size=10").await.1;
    assert_eq!(page["total_count"], 1, "{page}");
    assert_eq!(names(&page), vec!["q-mine"]);
    // Another vhost's objects: RabbitMQ's 401 "User not authorised to access virtual host".
    for path in ["/api/queues/theirs", "/api/queues/theirs/q-theirs", "/api/exchanges/theirs"] {
        let (status, body) = get(mgmt.clone(), path).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["reason"], "User not authorised to access virtual host");
    }
    assert_eq!(get(mgmt.clone(), "/api/queues/mine/q-mine").await.0, 200);
    // One vhost's own page is the administrator's, as in RabbitMQ 3.10.
    let (status, body) = get(mgmt.clone(), "/api/vhosts/mine").await;
    assert_eq!((status, body["reason"].as_str()), (401, Some("Not administrator user")));
    // A vhost that does not exist is not found, as RabbitMQ answers.
    assert_eq!(get(mgmt.clone(), "/api/queues/nowhere").await.0, 404);
    let put = |auth: &str, path: &str| {
        format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\nContent-Type: application/json")
    };
    assert_eq!(send(addr, &put(&mgmt, "/api/queues/theirs/x"), "{}").await.0, 401);
    assert_eq!(send(addr, &put(&mgmt, "/api/queues/mine/x"), "{}").await.0, 201);
    // Monitoring: every vhost in the vhost list, read-only; a vhost's own paths need permissions there ...
    assert!(names(&get(monitor.clone(), "/api/vhosts").await.1).len() >= 3);
    // ... but, as RabbitMQ 3.10's `filter_vhost`, only the objects of vhosts it has permissions in.
    assert!(names(&get(monitor.clone(), "/api/queues").await.1).is_empty());
    assert_eq!(get(monitor.clone(), "/api/queues/theirs/q-theirs").await.0, 401);
    assert_eq!(get(monitor.clone(), "/api/nodes").await.0, 200);
    let (status, body) = get(mgmt.clone(), "/api/nodes").await;
    assert_eq!((status, body["reason"].as_str()), (401, Some("Not monitor user")));
    assert_eq!(send(addr, &put(&monitor, "/api/queues/theirs/y"), "{}").await.0, 401);
    // Policies: policymaker in its own vhosts only; management not at all.
    let policy_body = r#"{"pattern":"^x$","definition":{"max-length":1}}"#;
    assert_eq!(send(addr, &put(&policy, "/api/policies/mine/p"), policy_body).await.0, 201);
    assert_eq!(send(addr, &put(&policy, "/api/policies/theirs/p"), policy_body).await.0, 401);
    assert_eq!(send(addr, &put(&mgmt, "/api/policies/mine/p2"), policy_body).await.0, 401);
    // Users, vhosts, permissions: administrator only.
    for (auth, path) in
        [(&mgmt, "/api/users/new"), (&monitor, "/api/vhosts/new"), (&policy, "/api/permissions/mine/mon")]
    {
        let (status, body) = send(addr, &put(auth, path), r#"{"password":"x","tags":""}"#).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["reason"], "Not administrator user");
    }
    assert_eq!(get(mgmt.clone(), "/api/users").await.0, 401);
    assert_eq!(get(GUEST.to_string(), "/api/users").await.0, 200);
}

/// Lists `user`'s connection in the registry, answering its snapshot requests with one channel, as a
/// connection task does; the registration lives as long as the returned task.
/// A registered connection's description, as a wire server would give it.
fn connection_info(id: u64, user: &str, vhost: &str) -> mailroom_broker::ConnectionInfo {
    mailroom_broker::ConnectionInfo {
        id,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000 + id as u16)),
        local: SocketAddr::from(([127, 0, 0, 1], 5672)),
        user: user.into(),
        vhost: vhost.into(),
        protocol: "AMQP 0-9-1",
        client_properties: Default::default(),
        frame_max: 131072,
        channel_max: 2047,
        heartbeat: 60,
        connected_at: std::time::SystemTime::now(),
        traffic: Arc::default(),
    }
}

fn fake_connection(broker: &Broker, id: u64, user: &str, vhost: &str) -> tokio::task::JoinHandle<()> {
    use mailroom_broker::{ChannelSnapshot, ConnectionControl};
    let (registration, mut control) = broker.connections().register(connection_info(id, user, vhost));
    // Its one channel, counted as a real connection's channel is at `channel.open`.
    let channel = broker.access().open_channel(user).unwrap();
    tokio::spawn(async move {
        let _registration = registration;
        let _channel = channel;
        loop {
            let request = control.recv().await;
            if let ConnectionControl::Snapshot(reply) = request {
                let _ = reply.send(vec![ChannelSnapshot {
                    number: 1,
                    prefetch_count: 0,
                    global_prefetch_count: 0,
                    confirm: false,
                    transactional: false,
                    unacknowledged: 0,
                    unconfirmed: 0,
                    uncommitted_publishes: 0,
                    uncommitted_acks: 0,
                    consumers: vec![],
                    message_stats: Default::default(),
                    publishes: vec![],
                    deliveries: vec![],
                }]);
            }
        }
    })
}

#[tokio::test]
async fn the_overview_counts_channels_without_asking_any_connection() {
    // The UI polls the overview: it must not wake every (idle) connection to count channels.
    let (broker, addr) = start_with(HttpSettings::default()).await;
    let (_registration, mut control) = broker.connections().register(connection_info(1, "guest", "/"));
    let _channels = [broker.access().open_channel("guest").unwrap(), broker.access().open_channel("guest").unwrap()];
    let head = format!("GET /api/overview HTTP/1.1\r\nHost: localhost\r\n{GUEST}");
    let (status, overview) = send(addr, &head, "").await;
    assert_eq!(status, 200);
    let o = &overview["object_totals"];
    assert_eq!((o["connections"].as_u64(), o["channels"].as_u64()), (Some(1), Some(2)), "{o}");
    assert!(control.try_recv().is_none(), "the connection was asked for its channels");
}

#[tokio::test]
async fn overview_totals_are_cut_to_what_a_non_monitoring_user_may_see() {
    use bytes::Bytes;
    use mailroom_broker::{BasicProperties, Message};
    let (broker, addr) = start_with(HttpSettings::default()).await;
    for (v, messages) in [("mine", 2), ("theirs", 3)] {
        let vh = broker.add_vhost(v);
        vh.declare_queue(&format!("q-{v}"), &QueueOptions::default(), 1).unwrap();
        for _ in 0..messages {
            let m = Message::new("", &format!("q-{v}"), BasicProperties::default(), Bytes::from_static(b"m"));
            vh.publish("", m).unwrap();
        }
    }
    let mgmt = add_user(&broker, "mgmt", "management", &["mine"]);
    let policy = add_user(&broker, "pm", "policymaker", &["mine", "theirs"]);
    let monitor = add_user(&broker, "mon", "monitoring", &[]);
    let _c1 = fake_connection(&broker, 1, "mgmt", "mine");
    let _c2 = fake_connection(&broker, 2, "guest", "/");
    let _c3 = fake_connection(&broker, 3, "pm", "theirs");
    let get = |auth: String, path: &str| {
        let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}");
        async move { send(addr, &head, "").await }
    };
    let exchanges_in = |v: &str| broker.vhost(v).unwrap().exchanges().len() as u64;
    let (status, whole) = get(GUEST.to_string(), "/api/overview").await;
    assert_eq!(status, 200);
    let all_exchanges = exchanges_in("/") + exchanges_in("mine") + exchanges_in("theirs");
    let o = &whole["object_totals"];
    assert_eq!((o["queues"].as_u64(), o["exchanges"].as_u64()), (Some(2), Some(all_exchanges)));
    assert_eq!(
        (o["connections"].as_u64(), o["channels"].as_u64(), o["consumers"].as_u64()),
        (Some(3), Some(3), Some(0))
    );
    assert_eq!(whole["queue_totals"]["messages"], 5);
    assert!(whole.get("node").is_some() && whole.get("listeners").is_some());
    // Monitoring sees the whole node, as an administrator.
    let (_, seen) = get(monitor, "/api/overview").await;
    assert_eq!(seen["object_totals"], whole["object_totals"]);
    assert_eq!(seen["queue_totals"]["messages"], 5);
    assert_eq!(seen["message_stats"]["publish"], whole["message_stats"]["publish"]);

    // Management: the vhosts it has permissions in, its own connections and channels.
    let (status, mine) = get(mgmt, "/api/overview").await;
    assert_eq!(status, 200);
    let o = &mine["object_totals"];
    assert_eq!((o["queues"].as_u64(), o["exchanges"].as_u64()), (Some(1), Some(exchanges_in("mine"))));
    assert_eq!((o["connections"].as_u64(), o["channels"].as_u64()), (Some(1), Some(1)));
    assert!(o.get("consumers").is_none(), "RabbitMQ leaves the consumer total out: {o}");
    assert_eq!(mine["queue_totals"]["messages"], 2);
    assert_eq!(mine["queue_totals"]["messages_ready"], 2);
    // The vhost's own message_stats, as the vhost list shows them.
    let (_, vhost) = get(GUEST.to_string(), "/api/vhosts/mine").await;
    assert_eq!(mine["message_stats"]["publish"], vhost["message_stats"]["publish"]);
    assert_eq!(mine["message_stats"]["publish"], 2);
    for node_level in ["node", "listeners", "contexts", "store_totals"] {
        assert!(mine.get(node_level).is_none(), "{node_level} shown: {mine}");
    }
    assert_eq!(mine["rabbitmq_version"], whole["rabbitmq_version"]);

    // Policymaker: both of its vhosts, its one connection.
    let (_, pm) = get(policy, "/api/overview").await;
    let o = &pm["object_totals"];
    let both = exchanges_in("mine") + exchanges_in("theirs");
    assert_eq!((o["queues"].as_u64(), o["exchanges"].as_u64()), (Some(2), Some(both)));
    assert_eq!(o["connections"], 1);
    assert_eq!(pm["queue_totals"]["messages"], 5);
    assert_eq!(pm["message_stats"]["publish"], 5);
}

/// A CA and a server certificate for `localhost`, made in the test.
fn tls_config(cn: &str) -> (Arc<rustls::ServerConfig>, rustls::RootCertStore) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, format!("{cn} CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    (Arc::new(config), roots)
}

async fn https_get(addr: SocketAddr, roots: rustls::RootCertStore, path: &str) -> std::io::Result<(u16, Value)> {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await?;
    Ok(exchange(tls, &format!("GET {path} HTTP/1.1\r\nHost: localhost:{}\r\n{GUEST}", addr.port()), "").await)
}

#[tokio::test]
async fn https_serves_the_api_and_takes_reloaded_certificates() {
    let (first, first_roots) = tls_config("first");
    let (second, second_roots) = tls_config("second");
    let current = Arc::new(RwLock::new(first));
    let source = {
        let current = Arc::clone(&current);
        Arc::new(move || Arc::clone(&current.read().unwrap())) as mailroom_http::https::TlsConfigSource
    };
    let broker = Broker::open(BrokerConfig::default()).unwrap();
    let server = HttpServer::bind(broker, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
        .bind_https("127.0.0.1:0".parse().unwrap(), source)
        .await
        .unwrap();
    let addr = server.https_local_addr().unwrap();
    tokio::spawn(server.run(std::future::pending()));
    let (status, overview) = https_get(addr, first_roots.clone(), "/api/overview").await.unwrap();
    assert_eq!(status, 200);
    let listeners = overview["listeners"].as_array().unwrap();
    assert!(listeners.iter().any(|l| l["protocol"] == "https" && l["port"] == addr.port()), "{listeners:?}");
    // Plain HTTP on the TLS port gets no answer.
    let (status, _) = send(addr, "GET /api/overview HTTP/1.1\r\nHost: localhost", "").await;
    assert_eq!(status, 0);
    // A reload: new connections get the new certificate, which the old CA does not sign.
    *current.write().unwrap() = second;
    assert!(https_get(addr, first_roots, "/api/overview").await.is_err());
    assert_eq!(https_get(addr, second_roots, "/api/overview").await.unwrap().0, 200);
}
