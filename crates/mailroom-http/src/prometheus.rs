//! The Prometheus listener (RabbitMQ's `rabbitmq_prometheus` plugin, port 15692): `GET /metrics` (aggregated),
//! `GET /metrics/per-object` (one sample per queue) and `GET /metrics/detailed?family=...` (the families
//! asked for, per object), without credentials, as the plugin serves them.
//! Scrapers whose `Accept` header asks for OpenMetrics get it; everyone else gets the 0.0.4 text format.

use crate::metrics::{self, Detailed, Format, Scope};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mailroom_broker::Broker;
use std::future::Future;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// The Prometheus endpoint, bound and ready to run.
pub struct PrometheusServer {
    listener: TcpListener,
    broker: Broker,
}

impl PrometheusServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(broker: Broker, addr: SocketAddr) -> std::io::Result<PrometheusServer> {
        Ok(PrometheusServer { listener: TcpListener::bind(addr).await?, broker })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "prometheus accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let broker = self.broker.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let broker = broker.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&broker, req).await) }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    tracing::debug!(error = %e, %peer, "prometheus connection ended with an error");
                }
            });
        }
    }
}

/// Answers one scrape.
async fn handle(broker: &Broker, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let scope = match req.uri().path() {
        "/metrics" | "/metrics/" => Some(Scope::Aggregated),
        "/metrics/per-object" => Some(Scope::PerObject),
        "/metrics/detailed" => None,
        _ => {
            return plain(StatusCode::NOT_FOUND, "not found: try /metrics, /metrics/per-object or /metrics/detailed\n")
        }
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let format = Format::from_accept(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    let body = match scope {
        Some(scope) => metrics::render_scope(broker, scope, format).await,
        None => metrics::render_detailed(broker, Detailed::from_query(req.uri().query()), format).await,
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
