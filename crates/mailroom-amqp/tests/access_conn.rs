//! Connection-level access with lapin: SASL EXTERNAL over TLS with client certificates (a CA made here with
//! rcgen), the PROXY protocol v1/v2, connection limits under concurrent opens, and connections closed
//! when their user or vhost is deleted.
//!
//! lapin is built without TLS here, so the TLS tests put a relay in front of the AMQPS listener: lapin
//! speaks plain AMQP to it and the relay speaks TLS (tokio-rustls, with the client's certificate) to
//! Mailroom. The PROXY tests' relay writes the header, then pipes lapin's bytes.
#![cfg(feature = "tls")]

mod common;

use common::{reply_code, WAIT};
use futures_lite::StreamExt;
use lapin::{Connection, ConnectionProperties};
use mailroom_amqp::cert_name::CertLoginFrom;
use mailroom_amqp::tls::{provider, ClientVerification, TlsAcceptor, TlsSettings};
use mailroom_amqp::{AmqpServer, ServerConfig};
use mailroom_broker::access::{Permissions, UserLimits, VhostLimits};
use mailroom_broker::{Broker, BrokerConfig};
use rcgen::DnType;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---- a server with optional AMQPS and PROXY protocol ------------------------------------------------

struct Server {
    broker: Broker,
    plain: SocketAddr,
    tls: Option<SocketAddr>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(tls: Option<TlsSettings>, proxy: bool) -> Server {
    let broker = Broker::open(BrokerConfig::default()).expect("broker opens");
    let config = ServerConfig { listen: vec!["127.0.0.1:0".parse().unwrap()], ..Default::default() };
    let mut server = AmqpServer::bind(broker.clone(), config).await.expect("binds");
    if let Some(settings) = tls {
        let acceptor = Arc::new(TlsAcceptor::new(settings).expect("TLS settings"));
        server.bind_tls(&["127.0.0.1:0".parse().unwrap()], acceptor).await.expect("binds AMQPS");
    }
    server.set_proxy_protocol(proxy);
    let plain = server.local_addrs()[0];
    let tls = server.tls_local_addrs().first().copied();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Server { broker, plain, tls, _stop: stop }
}

fn add_user(broker: &Broker, name: &str, password: &str) {
    broker.access().add_user(name, password.as_bytes(), vec![]).unwrap();
    broker.access().set_permissions(name, "/", Permissions::full()).unwrap();
}

async fn connect(url: &str) -> Result<Connection, lapin::Error> {
    tokio::time::timeout(WAIT, Connection::connect(url, ConnectionProperties::default())).await.expect("in time")
}

// ---- relays ----------------------------------------------------------------------------------------

/// Listens on 127.0.0.1:0; each connection gets `upstream()` and the bytes are piped both ways.
async fn relay<F, Fut, S>(upstream: F) -> SocketAddr
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = Arc::new(upstream);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move {
                // A failed upstream (TLS refused) drops the client: lapin sees the connection end.
                if let Ok(mut server) = upstream().await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

/// A relay that writes `header` to Mailroom first (a proxy speaking the PROXY protocol).
async fn proxy_relay(server: SocketAddr, header: Vec<u8>) -> SocketAddr {
    relay(move || {
        let header = header.clone();
        async move {
            let mut s = TcpStream::connect(server).await?;
            s.write_all(&header).await?;
            Ok(s)
        }
    })
    .await
}

/// A relay that speaks TLS to Mailroom, with `identity` as the client certificate.
async fn tls_relay(server: SocketAddr, ca: &Ca, identity: Option<(String, String)>) -> SocketAddr {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    relay(move || {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(server).await?;
            connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
        }
    })
    .await
}

// ---- certificates ----------------------------------------------------------------------------------

#[path = "support/test_ca.rs"]
mod test_ca;
use test_ca::TestCa as Ca;

/// Server TLS settings in a fresh directory: a `localhost` certificate from `ca`, which also verifies clients.
fn settings(ca: &Ca, verify: ClientVerification, from: CertLoginFrom) -> TlsSettings {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "mailroom-access-conn-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = ca.leaf_cn("mailroom", &["localhost"], false);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    TlsSettings {
        cert: write("server.pem", &cert),
        key: write("server.key", &key),
        ca: Some(write("ca.pem", &ca.pem())),
        verify,
        cert_login_from: from,
    }
}

fn external_url(addr: SocketAddr) -> String {
    format!("amqp://{addr}/%2f?auth_mechanism=external")
}

// ---- EXTERNAL ----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_logs_in_as_the_certificate_distinguished_name() {
    let ca = Ca::new("access_conn test CA");
    let server =
        start(Some(settings(&ca, ClientVerification::Required, CertLoginFrom::DistinguishedName)), false).await;
    let tls = server.tls.unwrap();
    add_user(&server.broker, "CN=alice,O=Org", "unused");

    let alice = tls_relay(tls, &ca, Some(ca.client("alice"))).await;
    let conn = connect(&external_url(alice)).await.expect("EXTERNAL login as CN=alice,O=Org");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare("ext-q".into(), Default::default(), Default::default()).await.expect("declare");
    let listed = server.broker.connections().list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].info().user, "CN=alice,O=Org");

    // A certificate whose name is no user: 403, as for PLAIN.
    let bob = tls_relay(tls, &ca, Some(ca.client("bob"))).await;
    let err = connect(&external_url(bob)).await.expect_err("no user CN=bob,O=Org");
    assert_eq!(reply_code(&err), Some(403), "{err:?}");

    // PLAIN still works over TLS with a certificate.
    add_user(&server.broker, "carol", "pw");
    let plain = connect(&format!("amqp://carol:pw@{bob}/%2f")).await.expect("PLAIN over TLS");
    plain.close(200, "bye".into()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_with_common_name() {
    let ca = Ca::new("access_conn test CA");
    let server = start(Some(settings(&ca, ClientVerification::Required, CertLoginFrom::CommonName)), false).await;
    let tls = server.tls.unwrap();
    add_user(&server.broker, "alice", "unused");
    let alice = tls_relay(tls, &ca, Some(ca.client("alice"))).await;
    let conn = connect(&external_url(alice)).await.expect("EXTERNAL login as alice");
    assert_eq!(server.broker.connections().list()[0].info().user, "alice");
    conn.close(200, "bye".into()).await.unwrap();
    // The DN is not a user here.
    add_user(&server.broker, "CN=dave,O=Org", "unused");
    let dave = tls_relay(tls, &ca, Some(ca.client("dave"))).await;
    assert_eq!(reply_code(&connect(&external_url(dave)).await.expect_err("no user dave")), Some(403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required_and_expired_refused() {
    let ca = Ca::new("access_conn test CA");
    let server = start(Some(settings(&ca, ClientVerification::Required, CertLoginFrom::CommonName)), false).await;
    let tls = server.tls.unwrap();
    add_user(&server.broker, "alice", "pw");
    // No certificate: the TLS handshake fails, even for a password login.
    let none = tls_relay(tls, &ca, None).await;
    assert!(connect(&format!("amqp://alice:pw@{none}/%2f")).await.is_err());
    // An expired certificate from the right CA.
    let expired = ca.leaf(&[(DnType::CommonName, "alice")], &[], true);
    let old = tls_relay(tls, &ca, Some(expired)).await;
    assert!(connect(&external_url(old)).await.is_err());
    // A certificate from another CA.
    let other = Ca::new("access_conn test CA");
    let stranger = tls_relay(tls, &ca, Some(other.client("alice"))).await;
    assert!(connect(&external_url(stranger)).await.is_err());
    assert!(server.broker.connections().is_empty());
    // The good one.
    let good = tls_relay(tls, &ca, Some(ca.client("alice"))).await;
    connect(&external_url(good)).await.expect("valid certificate").close(200, "bye".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_is_not_offered_without_a_verified_certificate() {
    let ca = Ca::new("access_conn test CA");
    let server = start(Some(settings(&ca, ClientVerification::Optional, CertLoginFrom::CommonName)), false).await;
    add_user(&server.broker, "alice", "pw");
    // TLS without a client certificate: PLAIN works, EXTERNAL is refused as an unknown mechanism (503).
    let anonymous = tls_relay(server.tls.unwrap(), &ca, None).await;
    connect(&format!("amqp://alice:pw@{anonymous}/%2f")).await.expect("PLAIN").close(200, "".into()).await.unwrap();
    let err = connect(&external_url(anonymous)).await.expect_err("EXTERNAL without a certificate");
    assert!(matches!(reply_code(&err), Some(503) | None), "{err:?}");
    // Nor on the plain listener.
    assert!(connect(&external_url(server.plain)).await.is_err());
    // With a certificate on the optional listener, it is.
    let with_cert = tls_relay(server.tls.unwrap(), &ca, Some(ca.client("alice"))).await;
    connect(&external_url(with_cert)).await.expect("EXTERNAL").close(200, "".into()).await.unwrap();
}

// ---- PROXY protocol ------------------------------------------------------------------------------------

fn v2_inet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, command: u8) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_give_the_client_address() {
    let server = start(None, true).await;
    add_user(&server.broker, "remote", "pw");

    let v1 = proxy_relay(server.plain, b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 5672\r\n".to_vec()).await;
    let conn = connect(&format!("amqp://remote:pw@{v1}/%2f")).await.expect("v1");
    let peers: Vec<_> = server.broker.connections().list().iter().map(|c| c.info().peer).collect();
    assert_eq!(peers, ["192.0.2.7:56324".parse::<SocketAddr>().unwrap()]);
    conn.close(200, "".into()).await.unwrap();
    // guest is loopback-only: refused when the header says the client is elsewhere…
    let err = connect(&format!("amqp://guest:guest@{v1}/%2f")).await.expect_err("guest from afar");
    assert_eq!(reply_code(&err), Some(403), "{err:?}");
    // …and accepted when it says loopback.
    let local_v1 = proxy_relay(server.plain, b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 5672\r\n".to_vec()).await;
    connect(&format!("amqp://guest:guest@{local_v1}/%2f")).await.expect("guest").close(200, "".into()).await.unwrap();

    let v2 = proxy_relay(server.plain, v2_inet([198, 51, 100, 9], 4242, [10, 0, 0, 1], 5672, 1)).await;
    let conn = connect(&format!("amqp://remote:pw@{v2}/%2f")).await.expect("v2");
    let peers: Vec<_> = server.broker.connections().list().iter().map(|c| c.info().peer).collect();
    assert_eq!(peers, ["198.51.100.9:4242".parse::<SocketAddr>().unwrap()]);
    assert_eq!(reply_code(&connect(&format!("amqp://guest:guest@{v2}/%2f")).await.unwrap_err()), Some(403));
    conn.close(200, "".into()).await.unwrap();
    // v2 LOCAL (a health check): the socket's own address, loopback here.
    let local = proxy_relay(server.plain, v2_inet([0; 4], 0, [0; 4], 0, 0)).await;
    connect(&format!("amqp://guest:guest@{local}/%2f")).await.expect("LOCAL").close(200, "".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_before_tls() {
    let ca = Ca::new("access_conn test CA");
    let server = start(Some(settings(&ca, ClientVerification::Required, CertLoginFrom::CommonName)), true).await;
    add_user(&server.broker, "alice", "unused");
    let tls = server.tls.unwrap();
    // PROXY header, then TLS (with the client certificate), then AMQP with EXTERNAL.
    let (cert, key) = ca.client("alice");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = relay(move || {
        let connector = connector.clone();
        async move {
            let mut tcp = TcpStream::connect(tls).await?;
            tcp.write_all(&v2_inet([203, 0, 113, 5], 1234, [10, 0, 0, 1], 5671, 1)).await?;
            connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
        }
    })
    .await;
    let conn = connect(&external_url(addr)).await.expect("PROXY v2 + TLS + EXTERNAL");
    let listed = server.broker.connections().list();
    assert_eq!(listed[0].info().peer, "203.0.113.5:1234".parse::<SocketAddr>().unwrap());
    assert_eq!(listed[0].info().user, "alice");
    conn.close(200, "".into()).await.unwrap();
    // Without the header, the TLS listener closes the connection too.
    let bare = tls_relay(tls, &ca, Some(ca.client("alice"))).await;
    assert!(connect(&external_url(bare)).await.is_err());
}

/// Sends `bytes` on a raw socket and reads until the server closes: what it answered.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await.expect("server closes in time").ok();
    answer
}

#[tokio::test]
async fn proxy_protocol_required_connections_without_a_valid_header_are_closed() {
    let server = start(None, true).await;
    // The AMQP header alone: closed, with nothing written (not even the protocol header back).
    assert_eq!(raw_exchange(server.plain, b"AMQP\x00\x00\x09\x01").await, b"");
    // A malformed v1 line, and an over-long v2 length.
    assert_eq!(raw_exchange(server.plain, b"PROXY TCP4 1.2.3.4 nope 1 2\r\nAMQP\x00\x00\x09\x01").await, b"");
    let mut huge = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    assert_eq!(raw_exchange(server.plain, &huge).await, b"");
    // A valid header then the AMQP header: connection.start comes back.
    let ok = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 5672\r\nAMQP\x00\x00\x09\x01";
    let mut s = TcpStream::connect(server.plain).await.unwrap();
    s.write_all(ok).await.unwrap();
    let mut frame_head = [0u8; 7];
    tokio::time::timeout(WAIT, s.read_exact(&mut frame_head)).await.unwrap().unwrap();
    assert_eq!(frame_head[0], 1, "a method frame (connection.start)");
    // Without --proxy-protocol a header is just a bad protocol header.
    let plain = start(None, false).await;
    let answer = raw_exchange(plain.plain, b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 5672\r\n").await;
    assert_eq!(answer, b"AMQP\x00\x00\x09\x01");
}

// ---- connection limits under concurrent opens --------------------------------------------------------

async fn open_many(url: String, n: usize) -> (Vec<Connection>, Vec<lapin::Error>) {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(connect_owned(url.clone()))).collect();
    let (mut ok, mut err) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(c) => ok.push(c),
            Err(e) => err.push(e),
        }
    }
    (ok, err)
}

async fn connect_owned(url: String) -> Result<Connection, lapin::Error> {
    connect(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_connection_limit_holds_under_concurrent_opens() {
    let server = start(None, false).await;
    add_user(&server.broker, "racer", "pw");
    let limit = 3;
    server
        .broker
        .access()
        .set_user_limits("racer", UserLimits { max_connections: Some(limit), max_channels: None })
        .unwrap();
    let (ok, err) = open_many(format!("amqp://racer:pw@{}/%2f", server.plain), 24).await;
    assert_eq!(ok.len() as u64, limit, "exactly the limit succeed");
    assert_eq!(err.len(), 24 - limit as usize);
    for e in &err {
        assert_eq!(reply_code(e), Some(530), "{e:?}");
    }
    assert_eq!(server.broker.connections().count_of_user("racer"), limit);
    // Closing one frees a slot.
    ok[0].close(200, "".into()).await.unwrap();
    common::eventually("the closed connection leaves the registry", || {
        server.broker.connections().count_of_user("racer") == limit - 1
    })
    .await;
    connect(&format!("amqp://racer:pw@{}/%2f", server.plain)).await.expect("a freed slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vhost_connection_limit_holds_under_concurrent_opens() {
    let server = start(None, false).await;
    server.broker.add_vhost("limited");
    server.broker.access().set_permissions("guest", "limited", Permissions::full()).unwrap();
    server.broker.access().set_vhost_limits("limited", VhostLimits { max_connections: Some(5), max_queues: None });
    let (ok, err) = open_many(format!("amqp://guest:guest@{}/limited", server.plain), 30).await;
    assert_eq!(ok.len(), 5);
    assert!(err.iter().all(|e| reply_code(e) == Some(530)), "{err:?}");
    // Other vhosts are not limited.
    connect(&format!("amqp://guest:guest@{}/%2f", server.plain)).await.expect("vhost /");
}

// ---- deleting users and vhosts closes their connections -------------------------------------------

/// The first error event of a connection's `events` (bounded wait), as text.
async fn closed_reason(mut events: impl futures_lite::Stream<Item = lapin::Event> + Unpin) -> String {
    let waited = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                return format!("{e}");
            }
        }
        String::from("event stream ended")
    });
    waited.await.expect("the connection is closed in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_or_a_vhost_closes_its_connections() {
    let server = start(None, false).await;
    add_user(&server.broker, "doomed", "pw");
    add_user(&server.broker, "bystander", "pw");
    let url = |u: &str, v: &str| format!("amqp://{u}:pw@{}/{v}", server.plain);
    let a = connect(&url("doomed", "%2f")).await.unwrap();
    let b = connect(&url("doomed", "%2f")).await.unwrap();
    let other = connect(&url("bystander", "%2f")).await.unwrap();
    let (ra, rb) = (closed_reason(Box::pin(a.events_listener())), closed_reason(Box::pin(b.events_listener())));
    server.broker.access().delete_user("doomed").unwrap();
    let (ra, rb) = tokio::join!(ra, rb);
    for reason in [ra, rb] {
        assert!(reason.contains("CONNECTION_FORCED - user 'doomed' is deleted"), "{reason}");
    }
    common::eventually("only the bystander stays", || server.broker.connections().len() == 1).await;
    assert!(other.status().connected());
    // And it cannot log in again.
    assert_eq!(reply_code(&connect(&url("doomed", "%2f")).await.unwrap_err()), Some(403));

    server.broker.add_vhost("doomed-vhost");
    server.broker.access().set_permissions("bystander", "doomed-vhost", Permissions::full()).unwrap();
    let c = connect(&url("bystander", "doomed-vhost")).await.unwrap();
    let reason = closed_reason(Box::pin(c.events_listener()));
    server.broker.delete_vhost("doomed-vhost").unwrap();
    let reason = reason.await;
    assert!(reason.contains("CONNECTION_FORCED - vhost 'doomed-vhost' is deleted"), "{reason}");
    common::eventually("the vhost's connection leaves", || server.broker.connections().len() == 1).await;
    assert!(other.status().connected(), "connections to other vhosts stay");
}
