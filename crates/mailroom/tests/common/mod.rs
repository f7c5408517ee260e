//! Test harness: every pattern test runs on the embedded broker, a Mailroom server on port 0, and the
//! RabbitMQ at `RABBITMQ_URL`.
#![allow(dead_code)]

pub mod order_saga;
pub mod services;

#[allow(unused_imports)] // each test binary uses a different subset
pub use services::{can_run, pg_url, rabbit_url, Service};

use mailroom::{Amqp, AmqpConfig, Bus, Embedded};
use mailroom_amqp::{AmqpServer, ServerConfig};
use mailroom_broker::{Broker, BrokerConfig};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Where a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Embedded,
    Server,
    Rabbit,
}

/// One test's world: a bus, a way to open more connections, unique names, cleanup.
pub struct Env {
    pub target: Target,
    pub bus: Bus,
    pub prefix: String,
    broker: Option<Broker>,
    pub url: Option<String>,
    names: Mutex<Vec<String>>,
    _server: Option<oneshot::Sender<()>>,
}

pub async fn env(target: Target, test: &str) -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let prefix = format!("t.{test}.{}", &uuid_short());
    match target {
        Target::Embedded => {
            let t = Embedded::start().unwrap();
            let broker = t.broker().clone();
            Env {
                target,
                bus: Bus::new(t),
                prefix,
                broker: Some(broker),
                url: None,
                names: Mutex::default(),
                _server: None,
            }
        }
        Target::Server => {
            let (url, api, stop) = start_server_with_api().await;
            // With the HTTP API named, redrive is server-side (as on the embedded broker).
            let bus = Bus::new(Amqp::connect(AmqpConfig::new(&url).management_url(api)).await.unwrap());
            Env { target, bus, prefix, broker: None, url: Some(url), names: Mutex::default(), _server: Some(stop) }
        }
        Target::Rabbit => {
            let url = rabbit_url();
            let bus = Bus::new(Amqp::connect(AmqpConfig::new(&url)).await.unwrap());
            Env { target, bus, prefix, broker: None, url: Some(url), names: Mutex::default(), _server: None }
        }
    }
}

fn uuid_short() -> String {
    mailroom::envelope::new_message_id().replace('-', "")[20..].to_owned()
}

pub async fn start_server() -> (String, oneshot::Sender<()>) {
    let (url, _api, stop) = start_server_with_api().await;
    (url, stop)
}

/// A Mailroom server on port 0 with its HTTP API on another: the AMQP URL, the API's URL, and the
/// sender that stops both.
pub async fn start_server_with_api() -> (String, String, oneshot::Sender<()>) {
    let broker = Broker::open(BrokerConfig::default()).unwrap();
    let server = AmqpServer::bind(
        broker.clone(),
        ServerConfig { listen: vec!["127.0.0.1:0".parse().unwrap()], ..Default::default() },
    )
    .await
    .unwrap();
    let addr = server.local_addrs()[0];
    let http = mailroom_http::HttpServer::bind(broker, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let api = http.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let (http_tx, http_rx) = oneshot::channel::<()>();
    tokio::spawn(http.run(async move {
        let _ = http_rx.await;
    }));
    tokio::spawn(server.run(async move {
        let _ = rx.await;
        let _ = http_tx.send(());
    }));
    (format!("amqp://guest:guest@{addr}/%2F"), format!("http://{api}"), tx)
}

impl Env {
    /// A unique name for this test (queue, group, topic prefix), remembered for cleanup.
    pub fn q(&self, name: &str) -> String {
        let n = format!("{}.{name}", self.prefix);
        self.names.lock().unwrap().push(n.clone());
        n
    }

    /// Another connection to the same broker (a second process, as far as the broker can tell).
    pub async fn another_bus(&self) -> Bus {
        match (&self.broker, &self.url) {
            (Some(b), _) => Bus::new(Embedded::on(b).unwrap()),
            (None, Some(url)) => Bus::new(Amqp::connect(AmqpConfig::new(url)).await.unwrap()),
            _ => unreachable!(),
        }
    }

    /// Deletes everything this test declared (matters on the shared RabbitMQ).
    pub async fn cleanup(self) {
        let names = self.names.lock().unwrap().clone();
        let t = self.bus.transport();
        for n in names {
            for suffix in ["", ".dlq", ".retry.0", ".retry.1", ".retry.2", ".retry.3"] {
                let _ = t.delete_queue(&format!("{n}{suffix}")).await;
            }
            let _ = t.delete_exchange(&format!("{n}.filter")).await;
        }
    }
}

/// Polls `cond` until true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// A TCP proxy whose connections can be cut, to drop a client connection from outside.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let c2 = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c2.lock().unwrap().push(h);
            }
        });
        Proxy { addr, conns, accept }
    }

    /// Drops every proxied connection (both sockets close).
    pub fn cut(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Host and port of an amqp:// URL plus the rest, to point a client at a proxy.
pub fn split_url(url: &str) -> (String, std::net::SocketAddr, String) {
    let (scheme_auth, rest) = url.split_once('@').unwrap();
    let (hostport, path) = rest.split_once('/').unwrap();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport).unwrap().next().unwrap();
    (scheme_auth.to_owned(), addr, path.to_owned())
}

/// Generates one test per target for each async fn taking a `Target`. `needs [Postgres];` first: every
/// target's test also needs those services. A test whose services are unreachable is skipped with one
/// line (`can_run`); the `rabbit` one always needs RabbitMQ.
#[macro_export]
macro_rules! on_all_targets {
    (needs [$($svc:ident),*]; $($name:ident),* $(,)?) => {
        $crate::on_all_targets!(@needs [$($crate::common::Service::$svc),*]; $($name),*);
    };
    (@needs $needs:tt; $($name:ident),*) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn embedded() {
                    let needs: &[$crate::common::Service] = &$needs;
                    if $crate::common::can_run(needs, concat!(module_path!(), "::embedded")) {
                        super::$name($crate::common::Target::Embedded).await
                    }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn server() {
                    let needs: &[$crate::common::Service] = &$needs;
                    if $crate::common::can_run(needs, concat!(module_path!(), "::server")) {
                        super::$name($crate::common::Target::Server).await
                    }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn rabbit() {
                    let needs: &[$crate::common::Service] = &$needs;
                    let test = concat!(module_path!(), "::rabbit");
                    if $crate::common::can_run(needs, test)
                        && $crate::common::can_run(&[$crate::common::Service::RabbitMq], test)
                    {
                        super::$name($crate::common::Target::Rabbit).await
                    }
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $crate::on_all_targets!(@needs []; $($name),*);
    };
}
