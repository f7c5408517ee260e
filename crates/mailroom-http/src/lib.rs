//! Mailroom's HTTP API: RabbitMQ's management API (its paths, verbs, JSON field names and error bodies:
//! overview, nodes, exchanges, queues, bindings, connections, channels, consumers, policies, definitions,
//! health checks, users, permissions and limits) plus Mailroom's own `peek` and `redrive`, with basic auth against the broker's users;
//! vhost `/` is written `%2F` in paths.
//!
//! One hyper HTTP/1 connection task per client; every request is authenticated, then routed by
//! `routes::handle` (a hand-written match on the path segments: the API is one flat table of paths, which
//! a `match` states as clearly as a routing library would, without the dependency). `GET /metrics`
//! (Prometheus text format, see [`metrics`]) needs no credentials, nor do the web UI's files at `/` and
//! `/ui/` (the `ui` module).

mod access_routes;
mod api;
mod client_metrics;
mod clients;
pub mod definitions;
mod json;
pub mod listing;
mod message_stats;
pub mod metrics;
mod node;
pub mod prometheus;
mod resources;
mod routes;
mod ui;

pub use api::ApiError;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mailroom_broker::Broker;
use std::future::Future;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Largest request body accepted (policy and redrive bodies are small JSON documents).
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// Most messages one peek returns (each is copied into the JSON answer).
pub const MAX_PEEK_COUNT: usize = 1000;

/// A listening socket the health checks and the overview report.
#[derive(Debug, Clone)]
pub struct Listener {
    /// RabbitMQ's protocol name: `amqp`, `http`.
    pub protocol: &'static str,
    /// The bound address.
    pub addr: SocketAddr,
}

/// What the API says about the server it runs in.
#[derive(Debug)]
pub(crate) struct ServerInfo {
    /// The node name (`mailroom@<host>`, as RabbitMQ's `rabbit@<host>`).
    pub node_name: String,
    /// The cluster name (the node name: a single node is its own cluster).
    pub cluster_name: String,
    /// Every listener, this API's included.
    pub listeners: Vec<Listener>,
    /// When the server started (uptime).
    pub started: std::time::Instant,
    /// Message rates as of the last sample (`message_stats`).
    pub rates: message_stats::Rates,
}

/// This machine's host name (for the node name), or `localhost`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The HTTP API server, bound and ready to run.
pub struct HttpServer {
    listener: TcpListener,
    broker: Broker,
    listeners: Vec<Listener>,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(broker: Broker, addr: SocketAddr) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        let http = Listener { protocol: "http", addr: listener.local_addr()? };
        Ok(HttpServer { listener, broker, listeners: vec![http] })
    }

    /// Adds the server's other listeners (AMQP) to what the overview and the listener health checks report.
    pub fn with_listeners(mut self, listeners: impl IntoIterator<Item = Listener>) -> Self {
        self.listeners.extend(listeners);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves; open connections finish on their own tasks.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let node_name = format!("mailroom@{}", host_name());
        let info = std::sync::Arc::new(ServerInfo {
            cluster_name: node_name.clone(),
            node_name,
            listeners: self.listeners,
            started: std::time::Instant::now(),
            rates: message_stats::Rates::default(),
        });
        // Samples message counts while the server runs (stopped when `_sampler` drops).
        let _sampler = message_stats::Sampler::start(self.broker.clone(), std::sync::Arc::clone(&info));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let broker = self.broker.clone();
            let info = std::sync::Arc::clone(&info);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let broker = broker.clone();
                    let info = std::sync::Arc::clone(&info);
                    async move { Ok::<_, std::convert::Infallible>(routes::handle(&broker, &info, peer, req).await) }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    tracing::debug!(error = %e, %peer, "http connection ended with an error");
                }
            });
        }
    }
}

/// A response body.
pub(crate) type Body = Full<Bytes>;
