//! One AMQP connection: handshake, then frames to broker calls and broker events to frames.
//!
//! The reader side lives in [`Connection::run`]; a separate writer task owns the socket's write half and is
//! fed whole batches of encoded frames through a bounded channel, so a slow client pushes back on us
//! instead of growing memory.

use crate::authz;
use crate::channel::{
    settle, BodyBuffer, Channel, ChannelConsumer, ChannelPhase, PendingPublish, TxOp, UnackedDelivery,
};
use crate::codec::{
    self, access, basic, channel as chan, confirm, connection as conn, exchange, queue, tx, AMQPValue, FieldTable,
    FrameKind, LongString, Method, RawFrame, ShortString,
};
use crate::error::{code, AmqpError};
use crate::server::ServerContext;
use bytes::{Bytes, BytesMut};
use mailroom_broker::access::Operation;
use mailroom_broker::store::SyncTicket;
use mailroom_broker::vhost::DIRECT_REPLY_TO;
use mailroom_broker::AlarmState;
use mailroom_broker::{
    message::parse_expiration, ConnectionId, ConsumeOptions, ConsumerEvent, ConsumerId, Delivery, Message, VHost,
};
use mailroom_broker::{ChannelSnapshot, ConnectionControl, ConnectionInfo, ConsumerSnapshot, Registration};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, Instant};

/// A persistent publish's confirm once its fsync returned: (channel, channel epoch, sequence number, stored ok).
type DurableConfirm = (u16, u64, u64, bool);
/// A persistent publish waiting for its fsyncs: (channel, channel epoch, sequence number, the store tickets).
type DurableWait = (u16, u64, u64, Vec<SyncTicket>);
/// Batches of encoded frames queued for the writer: bounds per-connection outbound memory.
const OUTBOUND_BATCHES: usize = 64;
/// Time a client has to send the protocol header and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time we wait for `close-ok` after sending `connection.close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest we keep reading (and discarding) after answering the client's `connection.close`, waiting for it to
/// hang up (RabbitMQ's `CLOSING_TIMEOUT`; a shorter negotiated heartbeat wins, as there).
const CLOSE_LINGER_MAX: Duration = Duration::from_secs(30);
/// Consumer events handled per loop turn before reading the socket again (fairness).
const EVENTS_PER_TURN: usize = 256;
/// Outbound bytes gathered before handing a batch to the writer.
const OUTBOUND_BATCH_BYTES: usize = 256 * 1024;
/// How long a write may wait for a peer that stopped reading when heartbeats are off.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The fsync waiter's marker for a transaction commit (publish sequence numbers start at 1).
const COMMIT_SEQ: u64 = 0;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitStartOk,
    AwaitTuneOk,
    AwaitOpen,
    Open,
    /// We sent `connection.close`; waiting for `close-ok`.
    Closing,
    /// We answered the client's `connection.close` with `close-ok`. The peer that receives close-ok closes the
    /// socket, so we write nothing more (except close-ok to a repeated close, as RabbitMQ) and read and discard
    /// what the client still sends until it hangs up or `close_deadline` passes: closing a socket with unread
    /// bytes, or one the client is still writing to, makes Linux answer with a reset, and clients such as
    /// amqplib crash on the resulting `EPIPE` (the Go client reports `EOF` to its other callers).
    Draining,
    /// Done: flush and drop the socket.
    Closed,
}

/// What the client told us about itself.
#[derive(Debug, Default)]
struct ClientCapabilities {
    consumer_cancel_notify: bool,
    authentication_failure_close: bool,
    connection_blocked: bool,
}

/// Where a consumer's deliveries go: looked up once per delivery, so it holds what the frame needs.
#[derive(Debug, Clone)]
struct ConsumerRoute {
    channel: u16,
    tag: Arc<str>,
    no_ack: bool,
}

/// One client connection.
pub(crate) struct Connection {
    ctx: Arc<ServerContext>,
    id: ConnectionId,
    peer: SocketAddr,
    phase: Phase,
    out: BytesMut,
    writer: mpsc::Sender<Vec<Bytes>>,
    /// Sealed outbound chunks (large bodies sent as slices of their own `Bytes`), written before `out`.
    sealed: Vec<Bytes>,
    /// Bytes in `sealed`.
    sealed_bytes: usize,
    frame_max: u32,
    channel_max: u16,
    heartbeat: Duration,
    last_inbound: Instant,
    last_outbound: Instant,
    close_deadline: Option<Instant>,
    capabilities: ClientCapabilities,
    username: String,
    /// A login was just refused: wait [`authz::LOGIN_REFUSED_DELAY`] before answering.
    login_refused: bool,
    vhost: Option<Arc<VHost>>,
    channels: HashMap<u16, Channel>,
    consumer_channels: HashMap<ConsumerId, ConsumerRoute>,
    events_tx: mpsc::UnboundedSender<ConsumerEvent>,
    events_rx: mpsc::UnboundedReceiver<ConsumerEvent>,
    /// No-ack deliveries written since the last flush, to hand their window credit back.
    noack_sent: Vec<(Arc<mailroom_broker::Queue>, ConsumerId, u32)>,
    /// The broker's resource alarms: while one is raised, a connection that publishes is not read.
    alarms: watch::Receiver<AlarmState>,
    /// This connection has published: resource alarms block it.
    has_published: bool,
    /// Confirms of persistent publishes, reported once their fsync returned: (channel, epoch, seq, stored ok).
    durable_confirms_tx: mpsc::UnboundedSender<DurableConfirm>,
    durable_confirms_rx: mpsc::UnboundedReceiver<DurableConfirm>,
    /// Counts channel openings (see `Channel::epoch`).
    channel_epoch: u64,
    /// Feeds the fsync waiter task (see [`Connection::durable_waiter`]).
    durable_waiter: Option<mpsc::UnboundedSender<DurableWait>>,
    /// We told the client (or would have) that it is blocked.
    blocked: bool,
    /// Acks taken from their channels but not yet applied to their queues, grouped by queue: the acks of one
    /// read batch reach each queue as one call (one store write). Applied before any other method is handled
    /// and before anything is awaited, so no other operation can observe them pending.
    acks: Vec<(Arc<mailroom_broker::Queue>, Vec<mailroom_broker::queue::MessageId>)>,
    /// Channels with a channel-wide prefetch among those acks: their other queues get a dispatch after.
    acks_channels: Vec<u16>,
    /// [`Connection::cleanup`] ran (it runs when close-ok is sent, and again, as a no-op, at the end).
    cleaned_up: bool,
    /// Channels whose closes crossed: we were closing one, the client's `channel.close` got close-ok and the
    /// channel went; the client's `close-ok` for our close is still to come and is ignored (a close-ok on a
    /// channel never opened stays 504, as in RabbitMQ).
    crossed_closes: HashSet<u16>,
    /// `client_properties` of `connection.start-ok`, for the connection registry.
    client_properties: FieldTable,
    /// Our address the client connected to (the registry's connection name).
    local: SocketAddr,
    /// Keeps this connection in the broker's registry (management API) while it is open; dropping it
    /// deregisters.
    registration: Option<Registration>,
    /// The management API's requests (snapshot, close), once registered.
    control: Option<mpsc::Receiver<ConnectionControl>>,
}

/// Serves one accepted socket until it closes.
pub(crate) async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<ServerContext>) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let (mut rd, wr) = stream.into_split();
    serve_on(&mut rd, wr, peer, local, ctx).await;
    discard_unread(&rd);
}

/// Serves one AMQPS connection: the TLS handshake (bounded by the AMQP handshake timeout), then AMQP.
#[cfg(feature = "tls")]
pub(crate) async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ServerContext>,
    acceptor: Arc<crate::tls::TlsAcceptor>,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let tls = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::info!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::info!(%peer, "TLS handshake timed out"),
    };
    let (mut rd, wr) = tokio::io::split(tls);
    serve_on(&mut rd, wr, peer, local, ctx).await;
}

async fn serve_on<R, W>(rd: &mut R, wr: W, peer: SocketAddr, local: SocketAddr, ctx: Arc<ServerContext>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (writer_tx, writer_rx) = mpsc::channel(OUTBOUND_BATCHES);
    let writer = tokio::spawn(write_loop(wr, writer_rx));
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (durable_confirms_tx, durable_confirms_rx) = mpsc::unbounded_channel();
    let mut conn = Connection {
        id: ctx.broker.next_connection_id(),
        ctx: Arc::clone(&ctx),
        peer,
        phase: Phase::AwaitStartOk,
        out: BytesMut::with_capacity(8192),
        writer: writer_tx,
        sealed: Vec::new(),
        sealed_bytes: 0,
        frame_max: codec::FRAME_MIN_SIZE,
        channel_max: 0,
        heartbeat: Duration::ZERO,
        last_inbound: Instant::now(),
        last_outbound: Instant::now(),
        close_deadline: None,
        capabilities: ClientCapabilities::default(),
        username: String::new(),
        login_refused: false,
        vhost: None,
        channels: HashMap::new(),
        consumer_channels: HashMap::new(),
        events_tx,
        events_rx,
        noack_sent: Vec::new(),
        alarms: ctx.broker.alarms(),
        has_published: false,
        blocked: false,
        durable_confirms_tx,
        durable_confirms_rx,
        channel_epoch: 0,
        durable_waiter: None,
        acks: Vec::new(),
        acks_channels: Vec::new(),
        cleaned_up: false,
        crossed_closes: HashSet::new(),
        client_properties: FieldTable::default(),
        local,
        registration: None,
        control: None,
    };
    if let Err(e) = conn.run(rd).await {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended");
    }
    conn.cleanup();
    let _ = conn.flush().await;
    drop(conn);
    let _ = writer.await;
}

/// Reads and drops whatever the client sent that is still in the kernel's receive buffer: closing a socket
/// with unread bytes sends a reset instead of a FIN, and the client may lose our last frames (close-ok).
fn discard_unread(rd: &OwnedReadHalf) {
    let mut scratch = [0u8; 8192];
    // Bounded: a client writing faster than we discard must not keep us here.
    for _ in 0..1024 {
        match rd.try_read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Vec<Bytes>>) {
    while let Some(batch) = rx.recv().await {
        for chunk in batch {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// Cuts a string to the 255 bytes a short string holds, at a char boundary. Names we send come from short
/// strings or are checked at declare; this keeps a longer one (e.g. a dead-letter routing key taken from a
/// long-string argument) from corrupting a frame.
fn clip(s: &str) -> &str {
    if s.len() <= 255 {
        return s;
    }
    let mut end = 255;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn short(s: &str) -> ShortString {
    // clip() guarantees the length, so this cannot fail.
    codec::short_string(clip(s)).unwrap_or_default()
}

/// Reply texts are short strings: RabbitMQ cuts them to 255 bytes ending in "...".
fn reply_text(text: &str) -> ShortString {
    if text.len() <= 255 {
        return short(text);
    }
    let mut end = 252;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    short(&format!("{}...", &text[..end]))
}

fn method_ids(m: &Method) -> (u16, u16) {
    (m.get_amqp_class_id(), m.get_amqp_method_id())
}

impl Connection {
    async fn run<R: tokio::io::AsyncRead + Unpin>(&mut self, rd: &mut R) -> std::io::Result<()> {
        let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
        // Protocol header.
        let mut header = [0u8; 8];
        match timeout(HANDSHAKE_TIMEOUT, rd.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        if &header != codec::PROTOCOL_HEADER {
            self.out.extend_from_slice(codec::PROTOCOL_HEADER);
            self.phase = Phase::Closed;
            return Ok(());
        }
        self.send_start();
        self.flush().await?;
        let handshake_deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut shutdown = self.ctx.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Handle every complete frame already buffered.
            loop {
                if self.phase == Phase::Closed {
                    return Ok(());
                }
                let frame = match codec::split_frame(&mut rbuf, self.frame_max) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) if self.phase == Phase::Draining => {
                        // Whatever follows is discarded anyway.
                        rbuf.clear();
                        break;
                    }
                    Err(e) => {
                        // The stream is out of sync: say why and hang up.
                        self.send_connection_close(&AmqpError::connection(code::FRAME_ERROR, e.to_string()));
                        self.phase = Phase::Closed;
                        return Ok(());
                    }
                };
                self.handle_frame(frame);
                if std::mem::take(&mut self.login_refused) {
                    tokio::time::sleep(authz::LOGIN_REFUSED_DELAY).await;
                }
                if self.out.len() + self.sealed_bytes >= OUTBOUND_BATCH_BYTES {
                    self.flush().await?;
                }
            }
            self.flush_confirms();
            self.flush().await?;
            if self.phase == Phase::Closed {
                return Ok(());
            }
            if rbuf.capacity() - rbuf.len() < 4096 {
                rbuf.reserve(READ_CHUNK);
            }
            self.update_blocked();
            self.flush().await?;
            let read_allowed = !self.blocked;
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    // A draining connection stops waiting for its client to hang up (the else branch).
                    if self.phase == Phase::Open {
                        self.close_connection(AmqpError::connection(
                            code::CONNECTION_FORCED,
                            "broker forced connection closure with reason 'shutdown'",
                        ));
                    } else {
                        self.phase = Phase::Closed;
                    }
                }
                Ok(()) = self.alarms.changed() => {}
                read = rd.read_buf(&mut rbuf), if read_allowed => {
                    match read {
                        Ok(0) | Err(_) => { self.phase = Phase::Closed; }
                        Ok(_) => { self.last_inbound = Instant::now(); }
                    }
                }
                _ = tick.tick() => self.on_tick(handshake_deadline),
                Some(request) = next_control(&mut self.control) => self.on_control(request),
                Some((channel, epoch, seq, ok)) = self.durable_confirms_rx.recv() => {
                    self.durable_confirmed(channel, epoch, seq, ok);
                    while let Ok((channel, epoch, seq, ok)) = self.durable_confirms_rx.try_recv() {
                        self.durable_confirmed(channel, epoch, seq, ok);
                    }
                }
                Some(event) = self.events_rx.recv() => {
                    self.handle_event(event);
                    for _ in 1..EVENTS_PER_TURN {
                        match self.events_rx.try_recv() {
                            Ok(event) => self.handle_event(event),
                            Err(_) => break,
                        }
                        if self.out.len() + self.sealed_bytes >= OUTBOUND_BATCH_BYTES {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Hands the encoded frames to the writer (waiting if it is behind), then returns no-ack credit.
    async fn flush(&mut self) -> std::io::Result<()> {
        self.apply_acks();
        if !self.out.is_empty() || !self.sealed.is_empty() {
            let mut batch = std::mem::take(&mut self.sealed);
            self.sealed_bytes = 0;
            if !self.out.is_empty() {
                batch.push(self.out.split().freeze());
            }
            self.last_outbound = Instant::now();
            // A peer that stops reading must not pin this task (and its unacked messages) forever.
            let stall_limit = if self.heartbeat.is_zero() { WRITE_STALL_TIMEOUT } else { self.heartbeat * 2 };
            match timeout(stall_limit, self.writer.send(batch)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    self.phase = Phase::Closed;
                    return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer gone"));
                }
                Err(_) => {
                    tracing::info!(peer = %self.peer, "client stopped reading, closing");
                    self.phase = Phase::Closed;
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"));
                }
            }
        }
        for (queue, consumer, n) in self.noack_sent.drain(..) {
            queue.settle_sent(consumer, n);
        }
        Ok(())
    }

    fn on_tick(&mut self, handshake_deadline: Instant) {
        let now = Instant::now();
        match self.phase {
            Phase::AwaitStartOk | Phase::AwaitTuneOk | Phase::AwaitOpen if now >= handshake_deadline => {
                self.phase = Phase::Closed;
                return;
            }
            Phase::Closing | Phase::Draining if self.close_deadline.is_some_and(|d| now >= d) => {
                self.phase = Phase::Closed;
                return;
            }
            // Nothing is written while draining, heartbeats included, and the deadline bounds the wait.
            Phase::Draining => return,
            _ => {}
        }
        if !self.heartbeat.is_zero() {
            // A blocked connection is not read, so its silence is ours: heartbeat checks pause (as RabbitMQ).
            if self.blocked {
                self.last_inbound = now;
            }
            if now.duration_since(self.last_inbound) > self.heartbeat * 2 {
                tracing::info!(peer = %self.peer, "missed heartbeats from client, closing");
                self.phase = Phase::Closed;
                return;
            }
            if now.duration_since(self.last_outbound) >= self.heartbeat / 2 {
                codec::write_heartbeat(&mut self.out);
            }
        }
        if self.phase == Phase::Open {
            self.check_consumer_timeouts(now);
        }
    }

    /// Applies the resource alarms: a connection that has published stops being read while one is raised,
    /// and clients that advertised `connection.blocked` are told (and told again when it clears).
    fn update_blocked(&mut self) {
        let alarm = *self.alarms.borrow_and_update();
        let should_block = self.phase == Phase::Open && self.has_published && alarm.any();
        if should_block == self.blocked {
            return;
        }
        self.blocked = should_block;
        if !self.capabilities.connection_blocked || self.phase != Phase::Open {
            // A closing connection is not told anything more.
            return;
        }
        let method = if should_block {
            conn::AMQPMethod::Blocked(conn::Blocked { reason: short(alarm.reason()) })
        } else {
            conn::AMQPMethod::Unblocked(conn::Unblocked {})
        };
        self.send(0, Method::Connection(method));
    }

    fn check_consumer_timeouts(&mut self, now: Instant) {
        let limit = self.ctx.config.consumer_timeout;
        if limit.is_zero() {
            return;
        }
        let late: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                c.phase == ChannelPhase::Open && c.oldest_unacked().is_some_and(|t| now.duration_since(t) > limit)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let err = AmqpError::channel(
                code::PRECONDITION_FAILED,
                format!(
                    "delivery acknowledgement on channel {id} timed out. Timeout value used: {} ms. \
                     This timeout value can be configured, see consumers doc guide to learn more",
                    limit.as_millis()
                ),
            );
            self.close_channel_with(id, err);
        }
    }

    // ---- sending helpers -------------------------------------------------------------------------

    fn send(&mut self, channel: u16, method: Method) {
        codec::write_method(&mut self.out, channel, &method);
    }

    fn send_start(&mut self) {
        let cfg = &self.ctx.config;
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        props.insert("cluster_name".into(), text(&cfg.cluster_name));
        props.insert("copyright".into(), text("Copyright (c) the Mailroom authors"));
        props.insert("information".into(), text(&cfg.information));
        props.insert("platform".into(), text(&format!("Mailroom {} (Rust)", env!("CARGO_PKG_VERSION"))));
        props.insert("product".into(), text(&cfg.product));
        props.insert("version".into(), text(&cfg.product_version));
        self.send(
            0,
            Method::Connection(conn::AMQPMethod::Start(conn::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: LongString::from(b"PLAIN AMQPLAIN".to_vec()),
                locales: LongString::from(b"en_US".to_vec()),
            })),
        );
    }

    fn send_connection_close(&mut self, err: &AmqpError) {
        let close = conn::Close {
            reply_code: err.code,
            reply_text: reply_text(&err.text),
            class_id: err.class_id,
            method_id: err.method_id,
        };
        self.send(0, Method::Connection(conn::AMQPMethod::Close(close)));
    }

    /// Starts a server-initiated connection close; frames other than close/close-ok are ignored from now.
    fn close_connection(&mut self, err: AmqpError) {
        tracing::debug!(peer = %self.peer, code = err.code, text = %err.text, "closing connection");
        // Channels go first (as RabbitMQ): consumers stop and unacked deliveries go back now, not after
        // the client's close-ok, which may never come.
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel_resources(id);
        }
        self.send_connection_close(&err);
        self.phase = Phase::Closing;
        self.close_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
    }

    /// Starts a server-initiated channel close after a channel error.
    fn close_channel_with(&mut self, id: u16, err: AmqpError) {
        tracing::debug!(peer = %self.peer, channel = id, code = err.code, text = %err.text, "closing channel");
        self.release_channel_resources(id);
        if let Some(ch) = self.channels.get_mut(&id) {
            ch.phase = ChannelPhase::Closing;
        }
        let close = chan::Close {
            reply_code: err.code,
            reply_text: reply_text(&err.text),
            class_id: err.class_id,
            method_id: err.method_id,
        };
        self.send(id, Method::Channel(chan::AMQPMethod::Close(close)));
    }

    fn fail(&mut self, channel: u16, err: AmqpError) {
        if err.connection || channel == 0 {
            self.close_connection(err);
        } else {
            self.close_channel_with(channel, err);
        }
    }

    // ---- frames ----------------------------------------------------------------------------------

    fn handle_frame(&mut self, frame: RawFrame) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.phase == Phase::Draining {
            self.handle_frame_while_draining(frame);
            return;
        }
        match frame.kind {
            FrameKind::Heartbeat if frame.channel != 0 => {
                self.close_connection(AmqpError::connection(
                    code::UNEXPECTED_FRAME,
                    format!("heartbeat frame on channel {}", frame.channel),
                ));
            }
            FrameKind::Heartbeat => {}
            FrameKind::Method => {
                // basic.qos's prefetch_size is not kept by the codec; RabbitMQ refuses non-zero values.
                if frame.payload.len() >= 8
                    && frame.payload[..4] == [0, 60, 0, 10]
                    && frame.payload[4..8] != [0, 0, 0, 0]
                {
                    if self.channel_accepts(frame.channel) {
                        self.close_connection(
                            AmqpError::connection(code::NOT_IMPLEMENTED, "prefetch_size!=0 (1)").on(60, 10),
                        );
                    }
                    return;
                }
                // The per-message methods skip the generic parser (and its allocations) when well-formed.
                if let Some(publish) = codec::parse_basic_publish(&frame.payload) {
                    self.has_published = true;
                    if self.channel_accepts(frame.channel)
                        && !publish.immediate
                        && self.channels.get(&frame.channel).is_some_and(|c| c.pending.is_none())
                    {
                        if let Err(e) = self.check_publish(frame.channel, publish.exchange, publish.routing_key) {
                            self.fail(frame.channel, e.on(60, 40));
                            return;
                        }
                        if let Some(ch) = self.channels.get_mut(&frame.channel) {
                            ch.pending = Some(PendingPublish {
                                exchange: publish.exchange.into(),
                                routing_key: publish.routing_key.into(),
                                mandatory: publish.mandatory,
                                header: None,
                                body: BodyBuffer::Empty,
                            });
                            return;
                        }
                    }
                }
                if let Some((tag, multiple)) = codec::parse_basic_ack(&frame.payload) {
                    if self.channel_accepts(frame.channel)
                        && self.channels.get(&frame.channel).is_some_and(|c| c.pending.is_none())
                    {
                        if let Err(e) = self.settle_deliveries(frame.channel, tag, multiple, true, false) {
                            self.fail(frame.channel, e.on(60, 80));
                        }
                        return;
                    }
                }
                match codec::parse_method(&frame.payload) {
                    Ok(method) => self.handle_method(frame.channel, method),
                    Err(e) => {
                        let err = match e {
                            codec::MethodError::Unknown { class_id, method_id } => AmqpError::connection(
                                code::COMMAND_INVALID,
                                format!("unknown method {class_id}.{method_id}"),
                            )
                            .on(class_id, method_id),
                            codec::MethodError::Malformed { class_id, method_id } => AmqpError::connection(
                                code::SYNTAX_ERROR,
                                format!("malformed arguments for method {class_id}.{method_id}"),
                            )
                            .on(class_id, method_id),
                            codec::MethodError::Truncated => {
                                AmqpError::connection(code::FRAME_ERROR, "method frame too short")
                            }
                        };
                        if self.phase == Phase::Closing {
                            return;
                        }
                        self.close_connection(err);
                    }
                }
            }
            FrameKind::Header => self.handle_content_header(frame.channel, frame.payload),
            FrameKind::Body => self.handle_content_body(frame.channel, frame.payload),
        }
    }

    /// After our close-ok: a repeated `connection.close` gets another close-ok (RabbitMQ does this, and the Go
    /// client sends one close per `Connection.Close()` caller); everything else is dropped unread.
    fn handle_frame_while_draining(&mut self, frame: RawFrame) {
        if frame.kind == FrameKind::Method
            && frame.channel == 0
            && matches!(codec::parse_method(&frame.payload), Ok(Method::Connection(conn::AMQPMethod::Close(_))))
        {
            self.send(0, Method::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})));
        }
    }

    /// Answers the client's `connection.close`: resources go now (as RabbitMQ, before close-ok), then close-ok,
    /// then we drain the socket until the client hangs up (see [`Phase::Draining`]).
    fn answer_connection_close(&mut self) {
        self.cleanup();
        self.send(0, Method::Connection(conn::AMQPMethod::CloseOk(conn::CloseOk {})));
        let linger = if self.heartbeat.is_zero() { CLOSE_LINGER_MAX } else { self.heartbeat.min(CLOSE_LINGER_MAX) };
        self.close_deadline = Some(Instant::now() + linger);
        self.phase = Phase::Draining;
    }

    /// Whether frames on this channel should be processed (not closing, connection open).
    fn channel_accepts(&self, channel: u16) -> bool {
        self.phase == Phase::Open && self.channels.get(&channel).is_some_and(|c| c.phase == ChannelPhase::Open)
    }

    fn handle_method(&mut self, channel: u16, method: Method) {
        // Anything but an ack may depend on earlier acks having reached their queues.
        self.apply_acks();
        let (class_id, method_id) = method_ids(&method);
        match self.phase {
            Phase::Closed | Phase::Draining => return,
            Phase::Closing => {
                // Only close and close-ok matter now.
                match method {
                    Method::Connection(conn::AMQPMethod::CloseOk(_)) => self.phase = Phase::Closed,
                    // Crossing closes: the client did not see ours yet; it will answer it with close-ok.
                    Method::Connection(conn::AMQPMethod::Close(_)) => self.answer_connection_close(),
                    _ => {}
                }
                return;
            }
            Phase::AwaitStartOk | Phase::AwaitTuneOk | Phase::AwaitOpen => {
                if channel != 0 {
                    self.close_connection(
                        AmqpError::connection(code::CHANNEL_ERROR, "expected channel 0 during the handshake")
                            .on(class_id, method_id),
                    );
                    return;
                }
                if let Err(e) = self.handle_handshake(method) {
                    self.close_connection(e.on(class_id, method_id));
                }
                return;
            }
            Phase::Open => {}
        }
        if channel == 0 {
            if let Err(e) = self.handle_connection_method(method) {
                self.close_connection(e.on(class_id, method_id));
            }
            return;
        }
        if channel > self.channel_max {
            self.close_connection(
                AmqpError::connection(
                    code::CHANNEL_ERROR,
                    format!("channel number {channel} exceeds the negotiated channel_max {}", self.channel_max),
                )
                .on(class_id, method_id),
            );
            return;
        }
        // A closing channel ignores everything except close and close-ok.
        if let Some(ch) = self.channels.get(&channel) {
            if ch.phase == ChannelPhase::Closing {
                match method {
                    Method::Channel(chan::AMQPMethod::CloseOk(_)) => {
                        self.channels.remove(&channel);
                    }
                    Method::Channel(chan::AMQPMethod::Close(_)) => {
                        self.send(channel, Method::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})));
                        self.channels.remove(&channel);
                        self.crossed_closes.insert(channel);
                    }
                    _ => {}
                }
                return;
            }
            if ch.pending.is_some() {
                self.close_connection(
                    AmqpError::connection(
                        code::UNEXPECTED_FRAME,
                        "expected content header for class 60, got non content header frame instead",
                    )
                    .on(class_id, method_id),
                );
                return;
            }
        }
        let result = match method {
            Method::Channel(m) => self.handle_channel_method(channel, m),
            other => {
                if !self.channels.contains_key(&channel) {
                    Err(AmqpError::connection(code::CHANNEL_ERROR, "expected 'channel.open'"))
                } else {
                    self.handle_channel_command(channel, other)
                }
            }
        };
        if let Err(e) = result {
            self.fail(channel, e.on(class_id, method_id));
        }
    }

    fn handle_handshake(&mut self, method: Method) -> Result<(), AmqpError> {
        match (self.phase, method) {
            (Phase::AwaitStartOk, Method::Connection(conn::AMQPMethod::StartOk(ok))) => {
                if let Some(AMQPValue::FieldTable(caps)) = ok.client_properties.inner().get("capabilities") {
                    let flag = |name: &str| matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)));
                    self.client_properties = ok.client_properties.clone();
                    self.capabilities = ClientCapabilities {
                        consumer_cancel_notify: flag("consumer_cancel_notify"),
                        authentication_failure_close: flag("authentication_failure_close"),
                        connection_blocked: flag("connection.blocked"),
                    };
                }
                let mechanism = ok.mechanism.as_str();
                if mechanism != "PLAIN" && mechanism != "AMQPLAIN" {
                    return Err(AmqpError::connection(
                        code::COMMAND_INVALID,
                        format!("unknown authentication mechanism '{mechanism}'"),
                    ));
                }
                let authenticated =
                    authz::login(&self.ctx.broker, mechanism, ok.response.as_bytes(), self.peer).ok().map(|u| u.name);
                match authenticated {
                    Some(name) => {
                        self.username = name;
                        self.phase = Phase::AwaitTuneOk;
                        let cfg = &self.ctx.config;
                        self.send(
                            0,
                            Method::Connection(conn::AMQPMethod::Tune(conn::Tune {
                                channel_max: cfg.channel_max,
                                frame_max: cfg.frame_max,
                                heartbeat: cfg.heartbeat,
                            })),
                        );
                        Ok(())
                    }
                    None => {
                        self.login_refused = true;
                        let err = AmqpError::connection(
                            code::ACCESS_REFUSED,
                            format!("Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."),
                        );
                        if self.capabilities.authentication_failure_close {
                            Err(err)
                        } else {
                            // Older clients get the socket closed, as RabbitMQ does.
                            self.phase = Phase::Closed;
                            Ok(())
                        }
                    }
                }
            }
            (Phase::AwaitTuneOk, Method::Connection(conn::AMQPMethod::TuneOk(ok))) => {
                let cfg = &self.ctx.config;
                let frame_max = if ok.frame_max == 0 { cfg.frame_max } else { ok.frame_max };
                if frame_max < codec::FRAME_MIN_SIZE {
                    return Err(AmqpError::connection(
                        code::NOT_ALLOWED,
                        format!("frame_max={frame_max} < {} min size", codec::FRAME_MIN_SIZE),
                    ));
                }
                if frame_max > cfg.frame_max {
                    return Err(AmqpError::connection(
                        code::NOT_ALLOWED,
                        format!("frame_max={frame_max} > {} max size", cfg.frame_max),
                    ));
                }
                let channel_max = if ok.channel_max == 0 { cfg.channel_max } else { ok.channel_max };
                if channel_max > cfg.channel_max {
                    return Err(AmqpError::connection(
                        code::NOT_ALLOWED,
                        format!("channel_max={channel_max} > {} max", cfg.channel_max),
                    ));
                }
                self.frame_max = frame_max;
                self.channel_max = channel_max;
                self.heartbeat = Duration::from_secs(ok.heartbeat as u64);
                self.phase = Phase::AwaitOpen;
                Ok(())
            }
            (Phase::AwaitOpen, Method::Connection(conn::AMQPMethod::Open(open))) => {
                let vhost = authz::open_vhost(&self.ctx.broker, &self.username, open.virtual_host.as_str())?;
                self.register(vhost.name());
                self.vhost = Some(vhost);
                self.phase = Phase::Open;
                self.send(0, Method::Connection(conn::AMQPMethod::OpenOk(conn::OpenOk {})));
                Ok(())
            }
            (_, Method::Connection(conn::AMQPMethod::Close(_))) => {
                self.answer_connection_close();
                Ok(())
            }
            (_, other) => {
                let (c, m) = method_ids(&other);
                Err(AmqpError::connection(
                    code::COMMAND_INVALID,
                    format!("unexpected method {c}.{m} during the handshake"),
                ))
            }
        }
    }

    fn handle_connection_method(&mut self, method: Method) -> Result<(), AmqpError> {
        match method {
            Method::Connection(conn::AMQPMethod::Close(_)) => {
                self.answer_connection_close();
                Ok(())
            }
            Method::Connection(conn::AMQPMethod::CloseOk(_)) => {
                self.phase = Phase::Closed;
                Ok(())
            }
            Method::Connection(conn::AMQPMethod::UpdateSecret(_)) => {
                // PLAIN secrets carry no expiry; accepting the new one is all there is to do.
                self.send(0, Method::Connection(conn::AMQPMethod::UpdateSecretOk(conn::UpdateSecretOk {})));
                Ok(())
            }
            Method::Connection(_) => Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected connection method")),
            _ => Err(AmqpError::connection(code::CHANNEL_ERROR, "expected 'connection.*' method on channel 0")),
        }
    }

    fn handle_channel_method(&mut self, id: u16, method: chan::AMQPMethod) -> Result<(), AmqpError> {
        match method {
            chan::AMQPMethod::Open(_) => {
                if self.channels.contains_key(&id) {
                    return Err(AmqpError::connection(code::CHANNEL_ERROR, "second 'channel.open' seen"));
                }
                // A client that reuses the number sent whatever close-ok it meant to send.
                self.crossed_closes.remove(&id);
                let (access, slot) = authz::open_channel(&self.ctx.broker, &self.username, self.vhost().name())?;
                self.channel_epoch += 1;
                let (access, user_slot) = (access, Some(slot));
                self.channels.insert(id, Channel { epoch: self.channel_epoch, access, user_slot, ..Channel::new() });
                self.send(id, Method::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})));
                Ok(())
            }
            // Crossing closes: the client's close-ok for our close, after its own close. Nothing to do.
            chan::AMQPMethod::CloseOk(_) if self.crossed_closes.remove(&id) => Ok(()),
            _ if !self.channels.contains_key(&id) => {
                Err(AmqpError::connection(code::CHANNEL_ERROR, "expected 'channel.open'"))
            }
            chan::AMQPMethod::Close(_) => {
                self.release_channel_resources(id);
                self.channels.remove(&id);
                self.send(id, Method::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})));
                Ok(())
            }
            chan::AMQPMethod::CloseOk(_) => {
                self.channels.remove(&id);
                Ok(())
            }
            chan::AMQPMethod::Flow(flow) => {
                if !flow.active {
                    return Err(AmqpError::connection(code::NOT_IMPLEMENTED, "active=false"));
                }
                self.send(id, Method::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk { active: true })));
                Ok(())
            }
            chan::AMQPMethod::FlowOk(_) => Ok(()),
            _ => Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected channel method")),
        }
    }

    /// Checks `op` against channel `id`'s grants (403 closes the channel).
    fn check_access(&mut self, id: u16, op: &Operation<'_>) -> Result<(), AmqpError> {
        let vhost = self.vhost.as_deref().map_or("", |v| v.name());
        let ch = self.channels.get_mut(&id).expect("channel checked by caller");
        authz::check(&mut ch.access, &self.username, vhost, op)
    }

    /// Checks a `basic.publish` (one atomic load and a cached grant on the usual path).
    fn check_publish(&mut self, id: u16, exchange: &str, routing_key: &str) -> Result<(), AmqpError> {
        let Some(vhost) = self.vhost.as_deref() else { return Ok(()) };
        let ch = self.channels.get_mut(&id).expect("channel checked by caller");
        let exchange_is_topic = authz::publish_is_topic(&ch.access, vhost, exchange);
        authz::check(
            &mut ch.access,
            &self.username,
            vhost.name(),
            &Operation::Publish { exchange, routing_key, exchange_is_topic },
        )
    }

    /// The vhost's `max-queues` limit, before a queue is created (406).
    fn check_queue_limit(&self, vhost: &VHost, queue: &str) -> Result<(), AmqpError> {
        let limits = self.ctx.broker.access().vhost_limits(vhost.name());
        if limits.max_queues.is_none() {
            return Ok(());
        }
        let existing = vhost.queues().len() as u64;
        limits
            .check_queue(vhost.name(), queue, existing)
            .map_err(|e| AmqpError::from(mailroom_broker::BrokerError::from(e)))
    }

    fn vhost(&self) -> Arc<VHost> {
        // Only called in the Open phase, which is entered by setting the vhost.
        Arc::clone(self.vhost.as_ref().expect("vhost is set once the connection is open"))
    }

    fn channel(&mut self, id: u16) -> &mut Channel {
        // Callers checked the channel exists and is open.
        self.channels.get_mut(&id).expect("channel checked by caller")
    }

    /// Resolves the empty queue name to the channel's last declared queue, as the spec allows.
    fn queue_name(&mut self, id: u16, name: &ShortString) -> Result<String, AmqpError> {
        if !name.as_str().is_empty() {
            return Ok(name.as_str().to_owned());
        }
        self.channel(id)
            .last_queue
            .clone()
            .ok_or_else(|| AmqpError::channel(code::NOT_FOUND, "no previously declared queue"))
    }

    fn handle_channel_command(&mut self, id: u16, method: Method) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        let owner = self.id;
        match method {
            Method::Exchange(m) => match m {
                exchange::AMQPMethod::Declare(d) => {
                    let name = d.exchange.as_str();
                    let exists = vhost.exchange(name).is_ok();
                    let alternate_exchange = authz::str_arg(&d.arguments, "alternate-exchange");
                    let op =
                        Operation::ExchangeDeclare { exchange: name, passive: d.passive, exists, alternate_exchange };
                    self.check_access(id, &op)?;
                    let options = mailroom_broker::ExchangeOptions {
                        passive: d.passive,
                        durable: d.durable,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                        arguments: d.arguments,
                    };
                    vhost.declare_exchange(d.exchange.as_str(), d.kind.as_str(), &options)?;
                    if !d.nowait {
                        self.send(id, Method::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})));
                    }
                }
                exchange::AMQPMethod::Delete(d) => {
                    self.check_access(id, &Operation::ExchangeDelete { exchange: d.exchange.as_str() })?;
                    vhost.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                    if !d.nowait {
                        self.send(id, Method::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})));
                    }
                }
                exchange::AMQPMethod::Bind(b) => {
                    let op = Operation::ExchangeBind {
                        destination: b.destination.as_str(),
                        source: b.source.as_str(),
                        routing_key: b.routing_key.as_str(),
                        source_is_topic: authz::is_topic(&vhost, b.source.as_str()),
                    };
                    self.check_access(id, &op)?;
                    vhost.bind_exchange(
                        b.destination.as_str(),
                        b.source.as_str(),
                        b.routing_key.as_str(),
                        &b.arguments,
                    )?;
                    if !b.nowait {
                        self.send(id, Method::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})));
                    }
                }
                exchange::AMQPMethod::Unbind(b) => {
                    let op = Operation::ExchangeUnbind {
                        destination: b.destination.as_str(),
                        source: b.source.as_str(),
                        routing_key: b.routing_key.as_str(),
                        source_is_topic: authz::is_topic(&vhost, b.source.as_str()),
                    };
                    self.check_access(id, &op)?;
                    vhost.unbind_exchange(
                        b.destination.as_str(),
                        b.source.as_str(),
                        b.routing_key.as_str(),
                        &b.arguments,
                    )?;
                    if !b.nowait {
                        self.send(id, Method::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})));
                    }
                }
                _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected exchange method")),
            },
            Method::Queue(m) => match m {
                queue::AMQPMethod::Declare(d) => {
                    let server_named = !d.passive && d.queue.as_str().is_empty();
                    if !d.passive {
                        let name = d.queue.as_str();
                        let exists = !server_named && vhost.queue(name, owner).is_ok();
                        if !server_named {
                            let op = Operation::QueueDeclare {
                                queue: name,
                                server_named,
                                passive: false,
                                exists,
                                dead_letter_exchange: authz::str_arg(&d.arguments, "x-dead-letter-exchange"),
                            };
                            self.check_access(id, &op)?;
                        }
                        if !exists {
                            self.check_queue_limit(&vhost, name)?;
                        }
                    }
                    let dead_letter_exchange =
                        authz::str_arg(&d.arguments, "x-dead-letter-exchange").map(str::to_owned);
                    let options = mailroom_broker::QueueOptions {
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: d.arguments,
                    };
                    if d.passive && d.queue.as_str() == DIRECT_REPLY_TO {
                        // RabbitMQ answers this pseudo-queue's passive declare as if one consumer were on it.
                        if !d.nowait {
                            self.send(
                                id,
                                Method::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                                    queue: d.queue,
                                    message_count: 0,
                                    consumer_count: 1,
                                })),
                            );
                        }
                        return Ok(());
                    }
                    let name = if d.passive && d.queue.as_str().is_empty() {
                        self.queue_name(id, &d.queue)?
                    } else {
                        d.queue.as_str().to_owned()
                    };
                    let ok = vhost.declare_queue(&name, &options, owner)?;
                    if server_named {
                        // The generated name is known only now; a refused one is deleted again (new and empty).
                        let op = Operation::QueueDeclare {
                            queue: &ok.name,
                            server_named,
                            passive: false,
                            exists: false,
                            dead_letter_exchange: dead_letter_exchange.as_deref(),
                        };
                        if let Err(e) = self.check_access(id, &op) {
                            let _ = vhost.delete_queue(&ok.name, false, false, owner);
                            return Err(e);
                        }
                    }
                    self.channel(id).last_queue = Some(ok.name.clone());
                    if !d.nowait {
                        self.send(
                            id,
                            Method::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                                queue: short(&ok.name),
                                message_count: ok.message_count,
                                consumer_count: ok.consumer_count,
                            })),
                        );
                    }
                }
                queue::AMQPMethod::Bind(b) => {
                    let name = self.queue_name(id, &b.queue)?;
                    let op = Operation::QueueBind {
                        queue: &name,
                        exchange: b.exchange.as_str(),
                        routing_key: b.routing_key.as_str(),
                        exchange_is_topic: authz::is_topic(&vhost, b.exchange.as_str()),
                    };
                    self.check_access(id, &op)?;
                    vhost.bind_queue(&name, b.exchange.as_str(), b.routing_key.as_str(), &b.arguments, owner)?;
                    if !b.nowait {
                        self.send(id, Method::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                    }
                }
                queue::AMQPMethod::Unbind(b) => {
                    let name = self.queue_name(id, &b.queue)?;
                    let op = Operation::QueueUnbind {
                        queue: &name,
                        exchange: b.exchange.as_str(),
                        routing_key: b.routing_key.as_str(),
                        exchange_is_topic: authz::is_topic(&vhost, b.exchange.as_str()),
                    };
                    self.check_access(id, &op)?;
                    vhost.unbind_queue(&name, b.exchange.as_str(), b.routing_key.as_str(), &b.arguments, owner)?;
                    self.send(id, Method::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
                }
                queue::AMQPMethod::Purge(p) => {
                    let name = self.queue_name(id, &p.queue)?;
                    self.check_access(id, &Operation::Purge { queue: &name })?;
                    let n = vhost.purge_queue(&name, owner)?;
                    if !p.nowait {
                        self.send(id, Method::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count: n })));
                    }
                }
                queue::AMQPMethod::Delete(d) => {
                    let name = self.queue_name(id, &d.queue)?;
                    self.check_access(id, &Operation::QueueDelete { queue: &name })?;
                    let n = vhost.delete_queue(&name, d.if_unused, d.if_empty, owner)?;
                    // The broker queued our own consumers' cancellations synchronously: they go out before
                    // delete-ok, so a client that closes on delete-ok still hears them (RabbitMQ usually sends
                    // them first too, but each of its channels writes on its own, so not always).
                    self.handle_queued_events();
                    if !d.nowait {
                        self.send(id, Method::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk { message_count: n })));
                    }
                }
                _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected queue method")),
            },
            Method::Basic(m) => self.handle_basic(id, m)?,
            Method::Confirm(confirm::AMQPMethod::Select(s)) => {
                let ch = self.channel(id);
                if ch.tx.is_some() {
                    return Err(AmqpError::channel(code::PRECONDITION_FAILED, "cannot switch from tx to confirm mode"));
                }
                ch.confirm = true;
                if !s.nowait {
                    self.send(id, Method::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})));
                }
            }
            Method::Tx(m) => self.handle_tx(id, m)?,
            Method::Access(access::AMQPMethod::Request(_)) => {
                // Access tickets are obsolete; RabbitMQ still answers them.
                self.send(id, Method::Access(access::AMQPMethod::RequestOk(access::RequestOk {})));
            }
            _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected method")),
        }
        Ok(())
    }

    fn handle_tx(&mut self, id: u16, method: tx::AMQPMethod) -> Result<(), AmqpError> {
        match method {
            tx::AMQPMethod::Select(_) => {
                let ch = self.channel(id);
                if ch.confirm {
                    return Err(AmqpError::channel(code::PRECONDITION_FAILED, "cannot switch from confirm to tx mode"));
                }
                if ch.tx.is_none() {
                    ch.tx = Some(Vec::new());
                }
                self.send(id, Method::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
            }
            tx::AMQPMethod::Commit(_) => {
                let ops = match self.channel(id).tx.as_mut() {
                    Some(ops) => std::mem::take(ops),
                    None => return Err(AmqpError::channel(code::PRECONDITION_FAILED, "channel is not transactional")),
                };
                let mut ops = ops.into_iter();
                let mut tickets = Vec::new();
                while let Some(op) = ops.next() {
                    match op {
                        TxOp::Publish { exchange, message, mandatory } => {
                            match self.route_publish(id, &exchange, *message, mandatory) {
                                Ok(stored) => tickets.extend(stored),
                                Err(e) => {
                                    // The commit fails: settlements not applied yet stay unacked, so the
                                    // channel's close requeues them instead of losing them.
                                    let ch = self.channel(id);
                                    for rest in ops {
                                        if let TxOp::Settle { deliveries, .. } = rest {
                                            ch.unacked.extend(deliveries);
                                        }
                                    }
                                    return Err(e);
                                }
                            }
                        }
                        TxOp::Settle { deliveries, ack, requeue } => {
                            settle(deliveries.into_iter().map(|(_, d)| d), ack, requeue)
                        }
                    }
                }
                self.poke_channel_consumers(id);
                if tickets.is_empty() {
                    self.send(id, Method::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                } else {
                    // commit-ok only once the transaction's persistent messages are on disk.
                    let epoch = self.channel(id).epoch;
                    self.durable_waiter().send((id, epoch, COMMIT_SEQ, tickets)).ok();
                }
            }
            tx::AMQPMethod::Rollback(_) => {
                let ops = match self.channel(id).tx.as_mut() {
                    Some(ops) => std::mem::take(ops),
                    None => return Err(AmqpError::channel(code::PRECONDITION_FAILED, "channel is not transactional")),
                };
                // Rolled-back acks leave their deliveries unacked, under their tags, as RabbitMQ.
                let ch = self.channel(id);
                for op in ops {
                    if let TxOp::Settle { deliveries, .. } = op {
                        ch.unacked.extend(deliveries);
                    }
                }
                self.send(id, Method::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})));
            }
            _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected tx method")),
        }
        Ok(())
    }

    fn handle_basic(&mut self, id: u16, method: basic::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        match method {
            basic::AMQPMethod::Qos(q) => {
                let ch = self.channel(id);
                if q.global {
                    ch.channel_prefetch.set_limit(q.prefetch_count as u32);
                } else {
                    ch.consumer_prefetch = q.prefetch_count as u32;
                }
                self.send(id, Method::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
                if q.global {
                    self.poke_channel_consumers(id);
                }
            }
            basic::AMQPMethod::Consume(c) => {
                let direct_reply = c.queue.as_str() == DIRECT_REPLY_TO;
                if direct_reply && !c.no_ack {
                    return Err(AmqpError::channel(code::PRECONDITION_FAILED, "reply consumer cannot acknowledge"));
                }
                if direct_reply && self.channel(id).reply_queue.is_some() {
                    return Err(AmqpError::channel(code::PRECONDITION_FAILED, "reply consumer already set"));
                }
                let priority = match c.arguments.inner().get("x-priority") {
                    None => 0,
                    Some(v) => match mailroom_broker::args::int_value(v) {
                        Some(p) if (i32::MIN as i128..=i32::MAX as i128).contains(&p) => p as i32,
                        _ => {
                            return Err(AmqpError::channel(
                                code::PRECONDITION_FAILED,
                                format!("invalid arg 'x-priority' for consumer: {:?}", v),
                            ))
                        }
                    },
                };
                let queue_name = if direct_reply {
                    let name = vhost.declare_reply_queue(self.id);
                    self.channel(id).reply_queue = Some(name.clone());
                    name
                } else {
                    let name = self.queue_name(id, &c.queue)?;
                    self.check_access(id, &Operation::Consume { queue: &name })?;
                    name
                };
                let tag = if c.consumer_tag.as_str().is_empty() {
                    generate_consumer_tag()
                } else {
                    c.consumer_tag.as_str().to_owned()
                };
                let ch = self.channel(id);
                if ch.consumers.contains_key(&tag) {
                    return Err(AmqpError::connection(
                        code::NOT_ALLOWED,
                        format!("attempt to reuse consumer tag '{tag}'"),
                    ));
                }
                let options = ConsumeOptions {
                    no_ack: c.no_ack,
                    exclusive: c.exclusive,
                    prefetch: ch.consumer_prefetch,
                    channel_prefetch: Arc::clone(&ch.channel_prefetch),
                    priority,
                };
                // consume-ok must precede the first delivery: write it before the queue can dispatch.
                let mark = self.out.len();
                if !c.nowait {
                    self.send(
                        id,
                        Method::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk { consumer_tag: short(&tag) })),
                    );
                }
                match vhost.consume(&queue_name, self.id, options, self.events_tx.clone()) {
                    Ok((queue, consumer)) => {
                        self.consumer_channels.insert(
                            consumer,
                            ConsumerRoute { channel: id, tag: tag.as_str().into(), no_ack: c.no_ack },
                        );
                        self.channel(id).consumers.insert(tag, ChannelConsumer { id: consumer, queue });
                    }
                    Err(e) => {
                        self.out.truncate(mark);
                        return Err(e.into());
                    }
                }
            }
            basic::AMQPMethod::Cancel(c) => {
                let ch = self.channel(id);
                let removed = ch.consumers.remove(c.consumer_tag.as_str());
                if removed.as_ref().is_some_and(|r| ch.reply_queue.as_deref() == Some(r.queue.name())) {
                    ch.reply_queue = None;
                }
                if let Some(consumer) = removed {
                    self.consumer_channels.remove(&consumer.id);
                    vhost.cancel(&consumer.queue, consumer.id);
                }
                if !c.nowait {
                    self.send(
                        id,
                        Method::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk { consumer_tag: c.consumer_tag })),
                    );
                }
            }
            basic::AMQPMethod::Publish(p) => {
                self.has_published = true;
                if p.immediate {
                    return Err(AmqpError::connection(code::NOT_IMPLEMENTED, "immediate=true"));
                }
                self.check_publish(id, p.exchange.as_str(), p.routing_key.as_str())?;
                self.channel(id).pending = Some(PendingPublish {
                    exchange: p.exchange.as_str().into(),
                    routing_key: p.routing_key.as_str().into(),
                    mandatory: p.mandatory,
                    header: None,
                    body: BodyBuffer::Empty,
                });
            }
            basic::AMQPMethod::Get(g) => {
                let name = self.queue_name(id, &g.queue)?;
                self.check_access(id, &Operation::Get { queue: &name })?;
                let queue = vhost.queue(&name, self.id)?;
                match queue.get(g.no_ack) {
                    Some(got) => {
                        let ch = self.channel(id);
                        let tag = ch.next_delivery_tag;
                        ch.next_delivery_tag += 1;
                        if !g.no_ack {
                            ch.unacked.insert(
                                tag,
                                UnackedDelivery { queue: Arc::clone(&queue), id: got.id, sent_at: Instant::now() },
                            );
                        }
                        self.send(
                            id,
                            Method::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                                delivery_tag: tag,
                                redelivered: got.redelivered,
                                exchange: short(&got.message.exchange),
                                routing_key: short(&got.message.routing_key),
                                message_count: got.remaining,
                            })),
                        );
                        self.write_content(id, &got.message);
                    }
                    None => self.send(id, Method::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}))),
                }
            }
            basic::AMQPMethod::Ack(a) => self.settle_deliveries(id, a.delivery_tag, a.multiple, true, false)?,
            basic::AMQPMethod::Nack(n) => self.settle_deliveries(id, n.delivery_tag, n.multiple, false, n.requeue)?,
            basic::AMQPMethod::Reject(r) => self.settle_deliveries(id, r.delivery_tag, false, false, r.requeue)?,
            basic::AMQPMethod::Recover(basic::Recover { requeue })
            | basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue }) => {
                if !requeue {
                    return Err(AmqpError::connection(code::NOT_IMPLEMENTED, "requeue=false"));
                }
                let all = std::mem::take(&mut self.channel(id).unacked);
                settle(all.into_values(), false, true);
                self.send(id, Method::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
            }
            _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected basic method")),
        }
        Ok(())
    }

    fn settle_deliveries(
        &mut self,
        id: u16,
        tag: u64,
        multiple: bool,
        ack: bool,
        requeue: bool,
    ) -> Result<(), AmqpError> {
        let ch = self.channel(id);
        let deliveries = ch.take_unacked(tag, multiple)?;
        if let Some(ops) = ch.tx.as_mut() {
            ops.push(TxOp::Settle { deliveries, ack, requeue });
            return Ok(());
        }
        if ack {
            // Batched with the other acks of this read (see `Connection::acks`).
            if ch.channel_prefetch.limit() != 0 && !self.acks_channels.contains(&id) {
                self.acks_channels.push(id);
            }
            for (_, d) in deliveries {
                match self.acks.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &d.queue)) {
                    Some((_, ids)) => ids.push(d.id),
                    None => self.acks.push((d.queue, vec![d.id])),
                }
            }
            return Ok(());
        }
        self.apply_acks();
        settle(deliveries.into_iter().map(|(_, d)| d), ack, requeue);
        self.poke_channel_consumers(id);
        Ok(())
    }

    /// Applies the batched acks: one `Queue::ack` per queue.
    fn apply_acks(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        for (queue, ids) in std::mem::take(&mut self.acks) {
            queue.ack(&ids);
        }
        for id in std::mem::take(&mut self.acks_channels) {
            self.poke_channel_consumers(id);
        }
    }

    /// With a channel-wide prefetch, an ack on one queue frees room for consumers on others.
    fn poke_channel_consumers(&mut self, id: u16) {
        let Some(ch) = self.channels.get(&id) else { return };
        if ch.channel_prefetch.limit() == 0 {
            return;
        }
        let queues: Vec<_> = ch.consumers.values().map(|c| Arc::clone(&c.queue)).collect();
        for q in queues {
            q.dispatch();
        }
    }

    // ---- content ---------------------------------------------------------------------------------

    /// The publish a content frame belongs to; None (after closing the connection if needed) when the frame
    /// must be dropped: connection not open, channel closing, or no publish before it (505).
    fn pending_publish(&mut self, id: u16, what: &str) -> Option<&mut PendingPublish> {
        if self.phase != Phase::Open {
            return None;
        }
        let state = self.channels.get(&id).map(|c| (c.phase, c.pending.is_some()));
        match state {
            None => {
                self.close_connection(AmqpError::connection(code::CHANNEL_ERROR, "expected 'channel.open'"));
                None
            }
            Some((ChannelPhase::Closing, _)) => None,
            Some((_, false)) => {
                self.close_connection(AmqpError::connection(
                    code::UNEXPECTED_FRAME,
                    format!("{what} without a preceding publish"),
                ));
                None
            }
            Some(_) => self.channels.get_mut(&id).and_then(|c| c.pending.as_mut()),
        }
    }

    fn handle_content_header(&mut self, id: u16, payload: Bytes) {
        let max = self.ctx.config.max_message_size;
        let Some(pending) = self.pending_publish(id, "content header") else { return };
        if pending.header.is_some() {
            self.close_connection(AmqpError::connection(
                code::UNEXPECTED_FRAME,
                "second content header for one publish",
            ));
            return;
        }
        let header = match codec::parse_content_header(payload) {
            Ok(h) => h,
            Err(e) => {
                let code = match e {
                    codec::HeaderError::WrongClass { .. } => code::UNEXPECTED_FRAME,
                    codec::HeaderError::Malformed => code::SYNTAX_ERROR,
                    _ => code::FRAME_ERROR,
                };
                self.close_connection(AmqpError::connection(code, format!("bad content header: {e}")));
                return;
            }
        };
        if header.body_size > max as u64 {
            let size = header.body_size;
            // Closing the channel drops the pending publish; its body frames are ignored from now on.
            self.close_channel_with(
                id,
                AmqpError::channel(
                    code::PRECONDITION_FAILED,
                    format!("message size {size} is larger than configured max size {max}"),
                )
                .on(60, 40),
            );
            return;
        }
        let complete = header.body_size == 0;
        pending.header = Some(header);
        if complete {
            self.finish_publish(id);
        }
    }

    fn handle_content_body(&mut self, id: u16, payload: Bytes) {
        let Some(pending) = self.pending_publish(id, "content body") else { return };
        let Some(header) = pending.header.as_ref() else {
            self.close_connection(AmqpError::connection(
                code::UNEXPECTED_FRAME,
                "content body before its content header",
            ));
            return;
        };
        let expected = header.body_size as usize;
        if pending.body.len() + payload.len() > expected {
            self.close_connection(AmqpError::connection(code::FRAME_ERROR, "content body larger than announced"));
            return;
        }
        pending.body.push(payload, expected);
        if pending.body.len() == expected {
            self.finish_publish(id);
        }
    }

    fn finish_publish(&mut self, id: u16) {
        // Called only with a complete pending publish on an open channel.
        let Some(pending) = self.channel(id).pending.take() else { return };
        let Some(header) = pending.header else { return };
        let mut message = Message {
            exchange: Arc::clone(&pending.exchange),
            routing_key: Arc::clone(&pending.routing_key),
            properties: header.properties,
            raw_properties: Some(header.raw_properties),
            body: pending.body.finish(),
        };
        if message.properties.reply_to().as_ref().is_some_and(|r| r.as_str() == DIRECT_REPLY_TO) {
            // Direct reply-to: point the reply at this channel's reply queue, which must exist.
            let Some(reply_queue) = self.channel(id).reply_queue.clone() else {
                self.fail(
                    id,
                    AmqpError::channel(code::PRECONDITION_FAILED, "fast reply consumer does not exist").on(60, 40),
                );
                return;
            };
            message.properties = message.properties.with_reply_to(short(&reply_queue));
            message.raw_properties = None;
        }
        if let Err(e) = self.validate_message(&message) {
            self.fail(id, e.on(60, 40));
            return;
        }
        if self.channel(id).tx.is_some() {
            // The exchange must exist now, even though routing waits for commit.
            if let Err(e) = self.vhost().publishable_exchange(&pending.exchange) {
                self.fail(id, AmqpError::from(e).on(60, 40));
                return;
            }
            let Some(ops) = self.channel(id).tx.as_mut() else { return };
            ops.push(TxOp::Publish {
                exchange: pending.exchange.to_string(),
                message: Box::new(message),
                mandatory: pending.mandatory,
            });
            return;
        }
        if let Err(e) = self.route_publish(id, &pending.exchange, message, pending.mandatory) {
            self.fail(id, e.on(60, 40));
        }
    }

    fn validate_message(&self, message: &Message) -> Result<(), AmqpError> {
        if let Some(user) = message.properties.user_id() {
            if user.as_str() != self.username {
                return Err(AmqpError::channel(
                    code::PRECONDITION_FAILED,
                    format!(
                        "user_id property set to '{}' but authenticated user was '{}'",
                        user.as_str(),
                        self.username
                    ),
                ));
            }
        }
        if let Some(exp) = message.properties.expiration() {
            parse_expiration(exp.as_str()).map_err(|_| {
                AmqpError::channel(
                    code::PRECONDITION_FAILED,
                    format!("invalid expiration '{}': no_integer", exp.as_str()),
                )
            })?;
        }
        Ok(())
    }

    /// Routes one publish; returns the store tickets a caller must wait for when confirms do not
    /// (a transaction's commit), empty otherwise.
    fn route_publish(
        &mut self,
        id: u16,
        exchange: &str,
        message: Message,
        mandatory: bool,
    ) -> Result<Vec<SyncTicket>, AmqpError> {
        // A publish may depend on earlier acks having reached their queues (a deduplicating queue frees a
        // value on ack), and the fast publish path never passes through `handle_method`.
        self.apply_acks();
        let vhost = self.vhost();
        // What a basic.return needs, kept without deep-copying the properties (the usual case has their raw bytes).
        let returned = mandatory.then(|| {
            let raw = message.raw_properties.clone().unwrap_or_else(|| codec::encode_properties(&message.properties));
            (Arc::clone(&message.routing_key), raw, message.body.clone())
        });
        let result = vhost.publish(exchange, message)?;
        if let Some((routing_key, raw, body)) = returned.filter(|_| !result.routed) {
            self.send(
                id,
                Method::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: code::NO_ROUTE,
                    reply_text: short("NO_ROUTE"),
                    exchange: short(exchange),
                    routing_key: short(&routing_key),
                })),
            );
            codec::write_content_header(&mut self.out, id, 60, body.len() as u64, &raw);
            self.write_body(id, &body);
        }
        let ch = self.channel(id);
        if ch.confirm {
            let seq = ch.next_publish_seq;
            ch.next_publish_seq += 1;
            if result.rejected {
                self.flush_channel_confirms(id);
                self.send_confirm(id, seq, false);
            } else if !result.durable.is_empty() {
                // Confirmed only once every durable queue's copy is fsynced.
                ch.durable_pending.insert(seq);
                let epoch = ch.epoch;
                self.durable_waiter().send((id, epoch, seq, result.durable)).ok();
            } else if ch.durable_pending.is_empty() {
                ch.queue_confirm_ack(seq);
            } else {
                self.flush_channel_confirms(id);
                self.send_confirm(id, seq, true);
            }
            return Ok(Vec::new());
        }
        Ok(result.durable)
    }

    /// The connection's fsync waiter, started on its first persistent publish: one task awaits every
    /// publish's tickets in order (fsync rounds complete in append order) instead of a task per message.
    fn durable_waiter(&mut self) -> &mpsc::UnboundedSender<DurableWait> {
        let done = self.durable_confirms_tx.clone();
        self.durable_waiter.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<DurableWait>();
            tokio::spawn(async move {
                while let Some((channel, epoch, seq, tickets)) = rx.recv().await {
                    let mut ok = true;
                    for ticket in tickets {
                        ok &= ticket.wait().await.is_ok();
                    }
                    if done.send((channel, epoch, seq, ok)).is_err() {
                        return;
                    }
                }
            });
            tx
        })
    }

    /// Sends one confirm (no `multiple`): ack, or nack for a message the broker could not take.
    fn send_confirm(&mut self, id: u16, seq: u64, ok: bool) {
        let method = if ok {
            basic::AMQPMethod::Ack(basic::Ack { delivery_tag: seq, multiple: false })
        } else {
            basic::AMQPMethod::Nack(basic::Nack { delivery_tag: seq, multiple: false, requeue: false })
        };
        self.send(id, Method::Basic(method));
    }

    /// A persistent publish's fsync returned (or failed): confirm it if its channel is still open.
    fn durable_confirmed(&mut self, id: u16, epoch: u64, seq: u64, ok: bool) {
        let Some(ch) = self.channels.get_mut(&id).filter(|c| c.phase == ChannelPhase::Open && c.epoch == epoch) else {
            return;
        };
        if seq == COMMIT_SEQ {
            if ok {
                self.send(id, Method::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
            } else {
                let err =
                    AmqpError::channel(code::INTERNAL_ERROR, "could not store the transaction's messages").on(90, 20);
                self.close_channel_with(id, err);
            }
            return;
        }
        if !ch.durable_pending.remove(&seq) {
            return;
        }
        if ok && ch.durable_pending.first().is_none_or(|&first| first > seq) {
            // Every earlier publish is settled: one multiple-ack (sent at the end of this turn) covers this one and
            // any others completing in the same turn.
            ch.queue_confirm_ack(seq);
            return;
        }
        self.flush_channel_confirms(id);
        self.send_confirm(id, seq, ok);
    }

    /// Sends the coalesced confirm ack of one channel (`multiple` covers every earlier sequence number).
    fn flush_channel_confirms(&mut self, id: u16) {
        let Some(ch) = self.channels.get_mut(&id) else { return };
        let Some(seq) = ch.pending_confirm_ack.take() else { return };
        // Acks are coalesced only over runs that started right after the last sent confirm.
        let multiple = seq > ch.pending_confirm_first;
        self.send(id, Method::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: seq, multiple })));
    }

    fn flush_confirms(&mut self) {
        let ids: Vec<u16> =
            self.channels.iter().filter(|(_, c)| c.pending_confirm_ack.is_some()).map(|(i, _)| *i).collect();
        for id in ids {
            self.flush_channel_confirms(id);
        }
    }

    /// Appends a message's content header and body frames.
    fn write_content(&mut self, id: u16, message: &Message) {
        match &message.raw_properties {
            Some(raw) => codec::write_content_header(&mut self.out, id, 60, message.body.len() as u64, raw),
            None => {
                let raw = codec::encode_properties(&message.properties);
                codec::write_content_header(&mut self.out, id, 60, message.body.len() as u64, &raw);
            }
        }
        self.write_body(id, &message.body);
    }

    /// Appends body frames: large bodies go out as slices of the message's own buffer (no copy).
    fn write_body(&mut self, id: u16, body: &Bytes) {
        if body.len() < codec::SHARED_BODY_MIN {
            codec::write_body(&mut self.out, id, body, self.frame_max);
            return;
        }
        let before = self.sealed.len();
        codec::write_body_shared(&mut self.out, &mut self.sealed, id, body, self.frame_max);
        self.sealed_bytes += self.sealed[before..].iter().map(Bytes::len).sum::<usize>();
    }

    // ---- broker events ---------------------------------------------------------------------------

    fn handle_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Deliver(d) => self.deliver(d),
            ConsumerEvent::Cancelled(consumer) => {
                let Some(ConsumerRoute { channel: id, tag, .. }) = self.consumer_channels.remove(&consumer) else {
                    return;
                };
                let open = self.channels.get(&id).is_some_and(|c| c.phase == ChannelPhase::Open);
                if let Some(ch) = self.channels.get_mut(&id) {
                    ch.consumers.remove(&*tag);
                }
                if open && self.capabilities.consumer_cancel_notify && self.phase == Phase::Open {
                    self.send(
                        id,
                        Method::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: short(&tag),
                            nowait: true,
                        })),
                    );
                }
            }
        }
    }

    /// Handles the consumer events already queued for this connection (not those arriving meanwhile).
    fn handle_queued_events(&mut self) {
        for _ in 0..self.events_rx.len() {
            match self.events_rx.try_recv() {
                Ok(event) => self.handle_event(event),
                Err(_) => break,
            }
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let route = self.consumer_channels.get(&d.consumer).filter(|_| self.phase == Phase::Open);
        let Some(ConsumerRoute { channel: id, tag, no_ack }) = route.cloned() else {
            // The consumer went away while this was in flight: it goes back untouched.
            Arc::clone(&d.queue).return_undelivered(d);
            return;
        };
        let Some(ch) = self.channels.get_mut(&id).filter(|c| c.phase == ChannelPhase::Open) else {
            Arc::clone(&d.queue).return_undelivered(d);
            return;
        };
        let delivery_tag = ch.next_delivery_tag;
        ch.next_delivery_tag += 1;
        if no_ack {
            match self.noack_sent.iter_mut().find(|(q, c, _)| *c == d.consumer && Arc::ptr_eq(q, &d.queue)) {
                Some(entry) => entry.2 += 1,
                None => self.noack_sent.push((Arc::clone(&d.queue), d.consumer, 1)),
            }
        } else {
            ch.unacked.insert(
                delivery_tag,
                UnackedDelivery { queue: Arc::clone(&d.queue), id: d.id, sent_at: Instant::now() },
            );
        }
        codec::write_basic_deliver(
            &mut self.out,
            id,
            &tag,
            delivery_tag,
            d.redelivered,
            clip(&d.message.exchange),
            clip(&d.message.routing_key),
        );
        self.write_content(id, &d.message);
    }

    // ---- teardown --------------------------------------------------------------------------------

    /// Cancels a channel's consumers and requeues its unacked deliveries.
    fn release_channel_resources(&mut self, id: u16) {
        // Acked deliveries must not be requeued below.
        self.apply_acks();
        let Some(ch) = self.channels.get_mut(&id) else { return };
        let consumers: Vec<_> = ch.consumers.drain().map(|(_, c)| c).collect();
        let mut unacked: Vec<UnackedDelivery> = std::mem::take(&mut ch.unacked).into_values().collect();
        // Settlements in an uncommitted transaction never happened: their deliveries go back too.
        for op in ch.tx.take().unwrap_or_default() {
            if let TxOp::Settle { deliveries, .. } = op {
                unacked.extend(deliveries.into_iter().map(|(_, d)| d));
            }
        }
        ch.pending = None;
        ch.reply_queue = None;
        if let Some(vhost) = self.vhost.clone() {
            for c in consumers {
                self.consumer_channels.remove(&c.id);
                vhost.cancel(&c.queue, c.id);
            }
        }
        settle(unacked, false, true);
    }

    fn cleanup(&mut self) {
        if std::mem::replace(&mut self.cleaned_up, true) {
            return;
        }
        self.registration = None;
        self.control = None;
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel_resources(id);
        }
        self.channels.clear();
        // Deliveries still queued for us go back to their queues.
        self.events_rx.close();
        while let Ok(event) = self.events_rx.try_recv() {
            // Never written to the client: back to the queue untouched (no-ack ones included).
            if let ConsumerEvent::Deliver(d) = event {
                Arc::clone(&d.queue).return_undelivered(d);
            }
        }
        self.ctx.broker.connection_closed(self.id);
    }
}

/// Hooks of the broker's connection registry (what the management API lists and closes).
impl Connection {
    /// Lists the connection once it is open (`connection.open-ok`).
    fn register(&mut self, vhost: &str) {
        let info = ConnectionInfo {
            id: self.id,
            peer: self.peer,
            local: self.local,
            user: self.username.clone(),
            vhost: vhost.to_owned(),
            protocol: "AMQP 0-9-1",
            client_properties: std::mem::take(&mut self.client_properties),
            frame_max: self.frame_max,
            channel_max: self.channel_max,
            heartbeat: self.heartbeat.as_secs() as u16,
            connected_at: std::time::SystemTime::now(),
        };
        let (registration, control) = self.ctx.broker.connections().register(info);
        self.registration = Some(registration);
        self.control = Some(control);
    }

    /// Answers a management API request.
    fn on_control(&mut self, request: ConnectionControl) {
        match request {
            ConnectionControl::Snapshot(reply) => {
                let _ = reply.send(self.channel_snapshots());
            }
            ConnectionControl::Close { reason } => {
                if self.phase == Phase::Open {
                    tracing::info!(peer = %self.peer, %reason, "closing connection on the management API's request");
                    self.close_connection(AmqpError::connection(code::CONNECTION_FORCED, reason));
                }
            }
        }
    }

    /// The open channels with their consumers, as the management API shows them.
    fn channel_snapshots(&self) -> Vec<ChannelSnapshot> {
        let mut out: Vec<ChannelSnapshot> = self
            .channels
            .iter()
            .map(|(&number, ch)| ChannelSnapshot {
                number,
                prefetch_count: ch.consumer_prefetch,
                global_prefetch_count: ch.channel_prefetch.limit(),
                confirm: ch.confirm,
                transactional: ch.tx.is_some(),
                unacknowledged: ch.unacked.len() as u64,
                unconfirmed: ch.durable_pending.len() as u64,
                uncommitted_publishes: ch.tx.iter().flatten().filter(|op| matches!(op, TxOp::Publish { .. })).count()
                    as u64,
                uncommitted_acks: ch.tx.iter().flatten().filter(|op| matches!(op, TxOp::Settle { .. })).count() as u64,
                consumers: ch
                    .consumers
                    .iter()
                    .map(|(tag, c)| ConsumerSnapshot {
                        tag: tag.clone(),
                        id: c.id,
                        queue: c.queue.name().to_owned(),
                        ack_required: !self.consumer_channels.get(&c.id).is_some_and(|r| r.no_ack),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by_key(|c| c.number);
        out
    }
}

/// The next management API request, or never when the connection is not registered.
async fn next_control(control: &mut Option<mpsc::Receiver<ConnectionControl>>) -> Option<ConnectionControl> {
    match control {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A server-generated consumer tag, as RabbitMQ's `amq.ctag-…`.
fn generate_consumer_tag() -> String {
    let name = mailroom_broker::vhost::generate_queue_name();
    format!("amq.ctag-{}", &name["amq.gen-".len()..])
}
