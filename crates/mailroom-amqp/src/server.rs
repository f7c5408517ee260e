//! The AMQP listener: binds its addresses, accepts connections (reading a PROXY protocol header first when
//! asked to, then the TLS handshake on AMQPS listeners), and shuts them down cleanly.

use crate::codec;
use crate::config::ServerContext;
pub use crate::config::{
    ServerConfig, DEFAULT_CHANNEL_MAX, DEFAULT_CONSUMER_TIMEOUT, DEFAULT_FRAME_MAX, DEFAULT_HEARTBEAT_SECS,
    DEFAULT_MAX_MESSAGE_SIZE,
};
use crate::fds::FdBudget;
use crate::proxy_protocol::{self, ProxyHeader};
use mailroom_broker::Broker;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long shutdown waits for connections to finish their close handshake.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a listener's connections are served: plain, or through TLS (AMQPS).
#[cfg(feature = "tls")]
type Tls = Option<Arc<crate::tls::TlsAcceptor>>;
#[cfg(not(feature = "tls"))]
type Tls = Option<std::convert::Infallible>;

/// A bound AMQP server, ready to run.
pub struct AmqpServer {
    listeners: Vec<(TcpListener, Tls)>,
    ctx: Arc<ServerContext>,
    shutdown_tx: watch::Sender<bool>,
    proxy_protocol: bool,
}

impl AmqpServer {
    /// Binds every configured address. An IPv6 wildcard that fails (no IPv6 on the host) is skipped with a warning.
    pub async fn bind(broker: Broker, config: ServerConfig) -> std::io::Result<AmqpServer> {
        if config.frame_max < codec::FRAME_MIN_SIZE {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame_max below 4096"));
        }
        let mut listeners = Vec::new();
        for addr in &config.listen {
            match bind_one(*addr).await {
                Ok(l) => listeners.push((l, None)),
                Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && !listeners.is_empty() => {
                    tracing::warn!(%addr, error = %e, "IPv6 listener not available");
                }
                Err(e) => return Err(std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))),
            }
        }
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(AmqpServer {
            listeners,
            ctx: Arc::new(ServerContext { broker, config, shutdown, bells: Default::default() }),
            shutdown_tx,
            proxy_protocol: false,
        })
    }

    /// Requires a PROXY protocol v1 or v2 header on every connection of every listener, AMQP and AMQPS
    /// (`--proxy-protocol`, RabbitMQ's `proxy_protocol`): the client's address is the header's, for the
    /// loopback rule, the logs and the management API; a connection without a valid header is closed.
    /// Only trusted proxies may then reach the listeners, since the header is believed.
    pub fn set_proxy_protocol(&mut self, required: bool) {
        self.proxy_protocol = required;
    }

    /// The plain AMQP addresses actually bound (with real ports when 0 was asked for).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter(|(_, tls)| tls.is_none()).filter_map(|(l, _)| l.local_addr().ok()).collect()
    }

    /// The AMQPS addresses actually bound.
    pub fn tls_local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter(|(_, tls)| tls.is_some()).filter_map(|(l, _)| l.local_addr().ok()).collect()
    }

    /// Also listens for AMQPS on `addrs` (`--amqps-listen`), handshaking with `acceptor`, whose
    /// certificates [`crate::tls::TlsAcceptor::reload`] replaces for new connections.
    #[cfg(feature = "tls")]
    pub async fn bind_tls(
        &mut self,
        addrs: &[SocketAddr],
        acceptor: Arc<crate::tls::TlsAcceptor>,
    ) -> std::io::Result<()> {
        for addr in addrs {
            let l = bind_one(*addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            self.listeners.push((l, Some(Arc::clone(&acceptor))));
        }
        Ok(())
    }

    /// Accepts connections until `shutdown` completes, then closes every connection with 320 and waits for them.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let AmqpServer { listeners, ctx, shutdown_tx, proxy_protocol } = self;
        let mut connections = JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel(64);
        let mut acceptors = JoinSet::new();
        for (listener, tls) in listeners {
            let conn_tx = conn_tx.clone();
            acceptors.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            // `Tls` is an `Arc` with the tls feature and a `Copy` placeholder without it.
                            #[allow(clippy::clone_on_copy)]
                            let tls = tls.clone();
                            if conn_tx.send((stream, peer, tls)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        drop(conn_tx);
        // Connections look at the alarms when rung (`connection::rare`), not on every turn.
        let alarm_ringer = tokio::spawn({
            let ctx = Arc::clone(&ctx);
            async move {
                let mut alarms = ctx.broker.alarms();
                while alarms.changed().await.is_ok() {
                    ctx.bells.ring_all();
                }
            }
        });
        let mut fds = FdBudget::new(ctx.config.fd_reserve);
        let (limit, reserve) = fds.describe();
        tracing::info!(fd_limit = ?limit, fd_reserve = reserve, "file descriptors kept back for the stores");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some((stream, peer, tls)) = conn_rx.recv() => {
                    if fds.admit() {
                        connections.spawn(serve_accepted(stream, peer, Arc::clone(&ctx), tls, proxy_protocol));
                    } else {
                        // Closed at once: the last descriptors belong to the stores, so that existing
                        // connections can keep publishing to every queue.
                        tracing::warn!(%peer, "connection refused: too few file descriptors left for the stores");
                        drop(stream);
                    }
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        acceptors.abort_all();
        let _ = shutdown_tx.send(true);
        ctx.bells.ring_all();
        alarm_ringer.abort();
        let drained =
            tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            connections.abort_all();
        }
    }
}

/// Serves one accepted socket: its PROXY protocol header if required (before TLS, as proxies send it),
/// then AMQP, over TLS on an AMQPS listener.
async fn serve_accepted(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<ServerContext>, tls: Tls, proxy: bool) {
    let peer = if proxy {
        // Boxed, as the TLS path below: an async fn's state is as large as its largest await, and every
        // connection's task would otherwise carry these rarely used states (header buffer, TLS session).
        match Box::pin(proxy_protocol::read_header(&mut stream)).await {
            Ok(ProxyHeader::Proxied { source, .. }) => source,
            Ok(ProxyHeader::Local) => peer,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing connection: PROXY protocol header required");
                return;
            }
        }
    } else {
        peer
    };
    match tls {
        None => crate::connection::serve(stream, peer, ctx).await,
        #[cfg(feature = "tls")]
        Some(acceptor) => Box::pin(crate::connection::serve_tls(stream, peer, ctx, acceptor)).await,
        #[cfg(not(feature = "tls"))]
        Some(never) => match never {},
    }
}

async fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Keep `[::]` to IPv6 so `0.0.0.0` on the same port can bind too.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
