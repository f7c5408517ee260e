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
mod connection;
pub mod definitions;
pub mod hardening;
pub mod https;
mod json;
pub mod listing;
mod message_stats;
pub mod metrics;
mod node;
pub mod prometheus;
mod resources;
mod routes;
mod snapshots;
mod ui;

pub use api::ApiError;

pub use hardening::HttpSettings;

use bytes::Bytes;
use http_body_util::Full;
use mailroom_broker::Broker;
use std::future::Future;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Largest request body accepted by default (policy and redrive bodies are small JSON documents).
pub const MAX_REQUEST_BODY: usize = hardening::DEFAULT_MAX_BODY;
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

/// The HTTP API server, bound and ready to run: a plain listener and, optionally, an HTTPS one.
pub struct HttpServer {
    listener: TcpListener,
    https: Option<(TcpListener, https::TlsConfigSource)>,
    broker: Broker,
    listeners: Vec<Listener>,
    settings: HttpSettings,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(broker: Broker, addr: SocketAddr) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        let http = Listener { protocol: "http", addr: listener.local_addr()? };
        Ok(HttpServer { listener, https: None, broker, listeners: vec![http], settings: HttpSettings::default() })
    }

    /// Also serves the API over TLS on `addr`, each connection with the configuration `config` returns at
    /// its accept (so a certificate reload reaches new connections).
    pub async fn bind_https(mut self, addr: SocketAddr, config: https::TlsConfigSource) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        self.listeners.push(Listener { protocol: "https", addr: listener.local_addr()? });
        self.https = Some((listener, config));
        Ok(self)
    }

    /// Replaces the limits, timeouts and allowed host names.
    pub fn with_settings(mut self, settings: HttpSettings) -> Self {
        self.settings = settings;
        self
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

    /// The HTTPS listener's bound address, if there is one.
    pub fn https_local_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
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
        let plain = connection::Shared::new(
            self.broker.clone(),
            std::sync::Arc::clone(&info),
            self.settings.clone(),
            &self.listener,
            false,
        );
        let (tls_listener, tls) = match self.https {
            Some((listener, config)) => {
                let shared = connection::Shared::new(self.broker, info, self.settings, &listener, true);
                (Some(listener), Some((shared, config)))
            }
            None => (None, None),
        };
        tokio::pin!(shutdown);
        loop {
            let accept_tls = async {
                match &tls_listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            let (accepted, secure) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = self.listener.accept() => (accepted, false),
                accepted = accept_tls => (accepted, true),
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            match (&tls, secure) {
                (Some((shared, config)), true) => shared.spawn_tls(stream, peer, config()),
                _ => plain.spawn_plain(stream, peer),
            }
        }
    }
}

/// A response body.
pub(crate) type Body = Full<Bytes>;
