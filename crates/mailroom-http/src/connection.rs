//! One client connection of the API's listeners, plain or TLS: the connection limit (a semaphore per
//! listener; a connection over it gets a one-line 503 and is closed at once), the TLS handshake, hyper's
//! HTTP/1 connection with its request-head timeout, and the idle timeout (no byte in either direction
//! and no request in flight).

use crate::hardening::{HttpSettings, ListenerContext};
use crate::{routes, ServerInfo};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use mailroom_broker::Broker;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What every connection of one listener shares.
pub(crate) struct Shared {
    broker: Broker,
    info: Arc<ServerInfo>,
    context: Arc<ListenerContext>,
    slots: Arc<Semaphore>,
}

/// The answer to a connection over the limit, written without waiting before the socket is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 69\r\nConnection: close\r\n\r\n{\"error\":\"service_unavailable\",\"reason\":\"too many HTTP connections\"}\n";

impl Shared {
    /// The shared state of the connections `listener` accepts (`tls`: it is the HTTPS listener).
    pub fn new(
        broker: Broker,
        info: Arc<ServerInfo>,
        settings: HttpSettings,
        listener: &TcpListener,
        tls: bool,
    ) -> Self {
        let loopback_only = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
        let slots = Arc::new(Semaphore::new(settings.max_connections));
        Self { broker, info, context: Arc::new(ListenerContext { settings, loopback_only, tls }), slots }
    }

    /// A slot for one more connection, or None (the socket is answered 503 and closed).
    fn admit(&self, stream: &TcpStream, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                // Best effort, never blocking: a fresh socket's send buffer takes these few bytes.
                let _ = stream.try_write(BUSY);
                tracing::warn!(%peer, limit = self.context.settings.max_connections, "HTTP connection refused: too many connections");
                None
            }
        }
    }

    /// Serves a plain connection on its own task.
    pub fn spawn_plain(&self, stream: TcpStream, peer: SocketAddr) {
        let Some(permit) = self.admit(&stream, peer) else { return };
        let (broker, info, context) = (self.broker.clone(), Arc::clone(&self.info), Arc::clone(&self.context));
        tokio::spawn(async move {
            serve(stream, peer, broker, info, context).await;
            drop(permit);
        });
    }

    /// Runs the TLS handshake (bounded by the head timeout), then serves the connection, on its own task.
    pub fn spawn_tls(&self, stream: TcpStream, peer: SocketAddr, config: Arc<rustls::ServerConfig>) {
        let Some(permit) = self.admit(&stream, peer) else { return };
        let (broker, info, context) = (self.broker.clone(), Arc::clone(&self.info), Arc::clone(&self.context));
        tokio::spawn(async move {
            let timeout = context.settings.header_read_timeout;
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve(tls, peer, broker, info, context).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
            }
            drop(permit);
        });
    }
}

/// When the connection last moved a byte, and how many of its requests are being answered.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Marks a request in flight until dropped.
struct InFlight(Arc<Activity>);
impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(activity))
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A stream that records its activity.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let out = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        out
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let out = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(out, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        out
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves HTTP/1 on `stream` until the client leaves, a timeout closes it, or an error ends it.
async fn serve<S>(stream: S, peer: SocketAddr, broker: Broker, info: Arc<ServerInfo>, context: Arc<ListenerContext>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity =
        Arc::new(Activity { start: Instant::now(), last_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) });
    let idle_timeout = context.settings.idle_timeout;
    let header_timeout = context.settings.header_read_timeout;
    let tracked = Tracked { inner: stream, activity: Arc::clone(&activity) };
    let requests = Arc::clone(&activity);
    let service = service_fn(move |req| {
        let (broker, info, context) = (broker.clone(), Arc::clone(&info), Arc::clone(&context));
        let in_flight = InFlight::new(&requests);
        async move {
            let resp = routes::handle(&broker, &info, &context, peer, req).await;
            drop(in_flight);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(tracked), service);
    tokio::pin!(conn);
    let mut closing = false;
    let result = loop {
        let check = tokio::time::sleep(idle_timeout.saturating_sub(activity.idle_for()).max(Duration::from_millis(10)));
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = check => {
                if activity.in_flight.load(Ordering::Relaxed) == 0 && activity.idle_for() >= idle_timeout {
                    if closing {
                        // Still not closed a whole idle period later (a client that stopped reading its
                        // answer): drop the connection.
                        break Ok(());
                    }
                    tracing::debug!(%peer, "closing an idle HTTP connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    activity.touch();
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "http connection ended with an error");
    }
}
