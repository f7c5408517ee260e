//! Mailroom's HTTP API: the admin surface (queues, peek, redrive) on a small JSON API with basic auth
//! against the broker's users. Paths and field names follow RabbitMQ's management API where it has an
//! equivalent; vhost `/` is written `%2F` in paths.
//!
//! One hyper HTTP/1 connection task per client; every request is authenticated, then routed by
//! [`routes::handle`]. `GET /metrics` (Prometheus text format, see [`metrics`]) needs no credentials.

mod json;
pub mod metrics;
mod routes;

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

/// The HTTP API server, bound and ready to run.
pub struct HttpServer {
    listener: TcpListener,
    broker: Broker,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(broker: Broker, addr: SocketAddr) -> std::io::Result<HttpServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(HttpServer { listener, broker })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves; open connections finish on their own tasks.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
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
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let broker = broker.clone();
                    async move { Ok::<_, std::convert::Infallible>(routes::handle(&broker, peer, req).await) }
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
