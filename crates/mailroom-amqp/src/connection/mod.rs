//! One AMQP connection's run loop and phases: reads frames and hands each to its class's handler, feeds broker
//! events to the encoders, and closes channels and the connection. The handlers, the encoders, the outbound
//! buffer and the writer task live in the submodules, one job each.
//!
//! The reader side lives in [`Connection::run`]; a separate writer task owns the socket's write half and is
//! fed whole batches of encoded frames through a bounded channel, so a slow client pushes back on us
//! instead of growing memory.

mod acks;
mod basic;
mod channel;
mod confirm;
mod control;
mod deliver;
mod events;
mod exchange;
mod fsync;
mod grants;
mod handshake;
mod liveness;
mod outbound;
mod publish;
mod queue;
mod rare;
mod tx;
mod writer;

use crate::channel::{settle, Channel, ChannelPhase};
use crate::codec::{self, access, channel as chan, connection as conn, FrameKind, Method, RawFrame, ShortString};
use crate::config::ServerContext;
use crate::error::{code, AmqpError};
use acks::AckBatch;
use bytes::{Buf, BytesMut};
use control::Registry;
use fsync::FsyncWaiter;
use mailroom_broker::client_memory::OutboundCredit;
use mailroom_broker::{AlarmState, ConnectionId, ConsumerEvent, ConsumerId, VHost};
use outbound::Outbound;
use rare::{Rare, RareWakes};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use writer::{WriteError, Writer, WriterSettings};

/// Time a client has to send the protocol header and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time we wait for `close-ok` after sending `connection.close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest we keep reading (and discarding) after answering the client's `connection.close`, waiting for it to
/// hang up (RabbitMQ's `CLOSING_TIMEOUT`; a shorter negotiated heartbeat wins, as there).
const CLOSE_LINGER_MAX: Duration = Duration::from_secs(30);
/// Consumer events handled per loop turn before reading the socket again (fairness).
const EVENTS_PER_TURN: usize = 256;
/// How long a write may wait for a peer that stopped reading when heartbeats are off.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Read buffer growth step while a client sends in bursts (a read returned READ_IDLE or more).
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read that count as one unit of tokio's cooperative budget (128 units per turn of a task). A read
/// alone counts one whatever its size, so a socket that stays readable kept this task running for 128
/// reads of up to 64 KiB, seconds in a debug build, while the tasks it woke waited: its writer with the
/// heartbeats and confirms, in the worker's LIFO slot, which no other worker steals.
const BUDGET_UNIT: usize = 4096;
/// Least room for a read while a client sends in bursts.
const READ_MIN_ROOM: usize = 4096;
/// Read buffer of a connection between bursts: the handshake fits.
const READ_IDLE: usize = 1024;
/// A parked connection (quiet since its last timer turn) reads into a stack array of this size and
/// allocates a read buffer only for what arrived: heartbeats cost no buffer between them.
const PARKED_READ: usize = 64;

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
    /// Frames encoded for the client, not yet handed to the writer.
    out: Outbound,
    writer: Writer,
    frame_max: u32,
    channel_max: u16,
    heartbeat: Duration,
    last_inbound: Instant,
    last_outbound: Instant,
    close_deadline: Option<Instant>,
    capabilities: ClientCapabilities,
    username: String,
    /// A login was just refused: wait [`crate::authz::LOGIN_REFUSED_DELAY`] before answering.
    login_refused: bool,
    /// A publish since the last read went to a queue whose consumers are falling behind
    /// ([`mailroom_broker::Queue::has_backlog`]): this task yields its turn before reading more.
    yield_to_consumers: bool,
    vhost: Option<Arc<VHost>>,
    /// Boxed: an idle connection's map holds a few pointers, not a few whole channels.
    channels: HashMap<u16, Box<Channel>, SmallKeys>,
    consumer_channels: HashMap<ConsumerId, ConsumerRoute, SmallKeys>,
    /// Deliveries and cancels from the queues this connection consumes.
    events: events::Events,
    /// No-ack deliveries written since the last flush, to hand their window credit back.
    noack_sent: Vec<(Arc<mailroom_broker::Queue>, ConsumerId, u32)>,
    /// The broker's resource alarms: while one is raised, a connection that publishes is not read.
    alarms: watch::Receiver<AlarmState>,
    /// This connection has published: resource alarms block it.
    has_published: bool,
    /// Awaits the fsyncs of persistent publishes and commits, and reports them back to the run loop.
    fsyncs: FsyncWaiter,
    /// Counts channel openings (see `Channel::epoch`).
    channel_epoch: u64,
    /// We told the client (or would have) that it is blocked.
    blocked: bool,
    /// Acks taken from their channels but not yet applied to their queues. Applied before any other method is
    /// handled and before anything is awaited, so no other operation can observe them pending.
    acks: AckBatch,
    /// [`Connection::cleanup`] ran (it runs when close-ok is sent, and again, as a no-op, at the end).
    cleaned_up: bool,
    /// Channels whose closes crossed: we were closing one, the client's `channel.close` got close-ok and the
    /// channel went; the client's `close-ok` for our close is still to come and is ignored (a close-ok on a
    /// channel never opened stays 504, as in RabbitMQ).
    crossed_closes: HashSet<u16>,
    /// This connection's entry in the broker's connection registry (management API).
    registry: Registry,
    /// Bytes and socket operations both ways (the writer task holds a clone).
    traffic: Arc<mailroom_broker::ConnectionTraffic>,
    /// Body bytes of deliveries handed to this connection and not yet written to its socket, and its bound:
    /// shared with its channels' consumers, so queues stop handing it more while it is full.
    credit: Arc<OutboundCredit>,
    /// The login name of the client's verified TLS certificate: SASL EXTERNAL is offered when set.
    external_login: Option<String>,
}

/// Serves one accepted socket until it closes.
pub(crate) async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Arc<ServerContext>) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let (mut rd, wr) = stream.into_split();
    serve_on(&mut rd, wr, peer, local, ctx, None).await;
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
    let external_login = acceptor.external_login(tls.get_ref().1);
    let (mut rd, wr) = tokio::io::split(tls);
    serve_on(&mut rd, wr, peer, local, ctx, external_login).await;
}

async fn serve_on<R, W>(
    rd: &mut R,
    wr: W,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: Arc<ServerContext>,
    external_login: Option<String>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let traffic = Arc::new(mailroom_broker::ConnectionTraffic::default());
    let credit = OutboundCredit::new(ctx.config.outbound_bound);
    let settings = WriterSettings {
        peer,
        deadline: ctx.config.write_deadline,
        credit: Arc::clone(&credit),
        traffic: Arc::clone(&traffic),
    };
    let (writer, writer_task) = Writer::spawn(wr, settings);
    let mut conn = Connection {
        id: ctx.broker.next_connection_id(),
        ctx: Arc::clone(&ctx),
        peer,
        phase: Phase::AwaitStartOk,
        out: Outbound::new(),
        writer,
        frame_max: codec::FRAME_MIN_SIZE,
        channel_max: 0,
        heartbeat: Duration::ZERO,
        last_inbound: Instant::now(),
        last_outbound: Instant::now(),
        close_deadline: None,
        capabilities: ClientCapabilities::default(),
        username: String::new(),
        login_refused: false,
        yield_to_consumers: false,
        vhost: None,
        channels: HashMap::default(),
        consumer_channels: HashMap::default(),
        events: events::Events::default(),
        noack_sent: Vec::new(),
        alarms: ctx.broker.alarms(),
        has_published: false,
        blocked: false,
        fsyncs: FsyncWaiter::new(),
        channel_epoch: 0,
        acks: AckBatch::default(),
        cleaned_up: false,
        crossed_closes: HashSet::new(),
        registry: Registry::new(local),
        traffic,
        credit,
        external_login,
    };
    tracing::info!(%peer, %local, "accepting AMQP connection");
    if let Err(e) = conn.run(rd).await {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended");
    }
    conn.cleanup();
    let _ = conn.flush().await;
    drop(conn);
    let _ = writer_task.await;
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

/// The hasher of a connection's maps keyed by small integers (channel numbers, consumer ids): one folded
/// multiply instead of SipHash, which cost about 4% of a publishing broker's CPU (a publish looks its channel
/// up about ten times). No flooding to defend against: channel numbers are bounded by `channel_max`, and
/// consumer ids are the broker's own sequence numbers.
type SmallKeys = std::hash::BuildHasherDefault<SmallKeyHasher>;

/// See [`SmallKeys`].
#[derive(Default, Clone, Copy)]
struct SmallKeyHasher(u64);

impl std::hash::Hasher for SmallKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only integer keys are hashed here; bytes are folded in one at a time all the same.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        // Both halves of the 128-bit product: every key bit reaches the low bits (the bucket) and the high
        // bits (hashbrown's tag).
        let product = u128::from(n ^ self.0) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
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

/// Reads into `buf`; with `parked` (a quiet connection whose `buf` holds no allocation), reads into that small
/// array first and copies only what arrived, so waiting on the socket costs no buffer. Cancel-safe, as
/// `select!` needs: nothing is read unless the future completes.
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    parked: Option<&mut [u8; PARKED_READ]>,
) -> std::io::Result<usize> {
    match parked {
        None => rd.read_buf(buf).await,
        Some(small) => {
            let n = rd.read(small).await?;
            buf.extend_from_slice(&small[..n]);
            Ok(n)
        }
    }
}

fn method_ids(m: &Method) -> (u16, u16) {
    (m.get_amqp_class_id(), m.get_amqp_method_id())
}

impl Connection {
    async fn run<R: tokio::io::AsyncRead + Unpin>(&mut self, rd: &mut R) -> std::io::Result<()> {
        let mut rbuf = BytesMut::with_capacity(READ_IDLE);
        // Bytes the last read returned: a read that filled READ_IDLE or more means a burst.
        let mut last_read = 0;
        // Quiet: `rbuf` holds no allocation, and reads go through `parked_read` first.
        let mut parked = false;
        let mut parked_read = [0u8; PARKED_READ];
        // This turn did channel work (see ConnectionTraffic::channel_turn): the API's snapshots may differ.
        let mut worked = false;
        // Protocol header.
        let mut header = [0u8; 8];
        match timeout(HANDSHAKE_TIMEOUT, rd.read_exact(&mut header)).await {
            Ok(Ok(n)) => self.traffic.received(n),
            _ => return Ok(()),
        }
        if &header != codec::PROTOCOL_HEADER {
            self.out.protocol_header();
            self.phase = Phase::Closed;
            return Ok(());
        }
        self.send_start();
        self.flush().await?;
        let mut timer = liveness::Timer::new(Instant::now() + HANDSHAKE_TIMEOUT);
        let mut rare =
            RareWakes::new(&self.ctx.bells, self.ctx.shutdown.clone(), self.alarms.clone(), Arc::clone(&self.credit));
        loop {
            // Handle every complete frame already buffered.
            loop {
                if self.phase == Phase::Closed {
                    return Ok(());
                }
                let head = match codec::peek_frame(&mut rbuf, self.frame_max) {
                    Ok(Some(h)) => h,
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
                worked |= head.kind != FrameKind::Heartbeat;
                if head.kind == FrameKind::Method && !matches!(self.phase, Phase::Draining | Phase::Closed) {
                    // Parsed in place: a method's parser copies what it keeps, so no `Bytes` is cut per frame.
                    self.handle_method_frame(head.channel, head.payload(&rbuf));
                    rbuf.advance(head.frame_len());
                } else {
                    self.handle_frame(codec::take_frame(&mut rbuf, head));
                }
                if std::mem::take(&mut self.login_refused) {
                    tokio::time::sleep(crate::authz::LOGIN_REFUSED_DELAY).await;
                }
                if self.out.is_full() {
                    self.flush().await?;
                }
            }
            self.flush_confirms();
            self.flush().await?;
            if std::mem::take(&mut self.yield_to_consumers) {
                // One read's publishes went to a queue with a backlog: let its consumers' connections run
                // before reading more. Without it a publisher's turn (a budget of many reads) outweighs a
                // consumer's (its prefetch), the queue grows and pages to disk, and delivery falls behind
                // (10 publishers and 10 consumers on one queue: 310k delivered/s, 675k with it; BENCHMARKS.md).
                tokio::task::yield_now().await;
            }
            if std::mem::take(&mut worked) {
                self.traffic.channel_turn();
            }
            if self.phase == Phase::Closed {
                return Ok(());
            }
            if parked && rbuf.is_empty() {
                // A parked read brought only whole frames (heartbeats, most likely): give the bytes back.
                rbuf = BytesMut::new();
            } else {
                parked = false;
                let bursting = last_read >= READ_IDLE;
                if rbuf.capacity() - rbuf.len() < if bursting { READ_MIN_ROOM } else { READ_IDLE / 2 } {
                    rbuf.reserve(if bursting { READ_CHUNK } else { READ_IDLE });
                }
            }
            self.update_blocked();
            self.flush().await?;
            self.arm_timer(&mut timer);
            let read_allowed = !self.blocked;
            tokio::select! {
                biased;
                wake = std::future::poll_fn(|cx| rare.poll_next(cx)) => match wake {
                    Rare::Shutdown => {
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
                    Rare::Alarms => {} // applied at the loop's next turn (`update_blocked`)
                    Rare::Room => {
                        self.resume_consumers();
                        worked = true;
                    }
                },
                // Before the socket: a client that keeps it readable must not starve heartbeats and deadlines.
                _ = timer.fired() => {
                    // Park before the tick writes its heartbeat, so the heartbeat goes out as a static chunk.
                    // Done here, not per read or write, so a busy connection does not churn buffers.
                    self.out.park();
                    self.writer.park();
                    self.on_tick(&mut timer);
                    if rbuf.is_empty() {
                        // Nothing half-read: any burst is over (frames split off keep their own bytes).
                        rbuf = BytesMut::new();
                        parked = true;
                    }
                }
                read = read_some(rd, &mut rbuf, parked.then_some(&mut parked_read)), if read_allowed => {
                    match read {
                        Ok(0) | Err(_) => {
                            if self.phase != Phase::Draining {
                                tracing::info!(peer = %self.peer, user = %self.username,
                                    "closing AMQP connection: client unexpectedly closed TCP connection");
                            }
                            self.phase = Phase::Closed;
                        }
                        Ok(n) => {
                            if n == PARKED_READ {
                                parked = false; // a full parked read: more is likely on its way
                            }
                            // Any frame counts as the client's heartbeat (as RabbitMQ).
                            self.last_inbound = Instant::now();
                            self.traffic.received(n);
                            last_read = n;
                            // A large read is much work: it spends budget by its size (see BUDGET_UNIT).
                            for _ in 1..n / BUDGET_UNIT {
                                tokio::task::coop::consume_budget().await;
                            }
                        }
                    }
                }
                () = std::future::poll_fn(|cx| self.writer.poll_closed(cx)) => {
                    // The writer gave up (socket error, or the client read nothing within the write deadline).
                    self.phase = Phase::Closed;
                }
                request = std::future::poll_fn(|cx| self.registry.poll_request(cx)) => self.on_control(request),
                Some((channel, epoch, seq, ok)) = self.fsyncs.next() => {
                    worked = true;
                    self.durable_confirmed(channel, epoch, seq, ok);
                    while let Some((channel, epoch, seq, ok)) = self.fsyncs.try_next() {
                        self.durable_confirmed(channel, epoch, seq, ok);
                    }
                }
                Some(event) = self.events.recv() => {
                    worked = true;
                    self.handle_event(event);
                    for _ in 1..EVENTS_PER_TURN {
                        match self.events.try_recv() {
                            Ok(event) => self.handle_event(event),
                            Err(_) => break,
                        }
                        if self.out.is_full() {
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
        if !self.out.is_empty() {
            let batch = self.out.take_batch();
            self.last_outbound = Instant::now();
            // A peer that stops reading must not pin this task (and its unacked messages) forever.
            let stall_limit = if self.heartbeat.is_zero() { WRITE_STALL_TIMEOUT } else { self.heartbeat * 2 };
            match self.writer.send(batch, stall_limit).await {
                Ok(()) => {}
                Err(WriteError::Gone) => {
                    self.phase = Phase::Closed;
                    return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer gone"));
                }
                Err(WriteError::Stalled) => {
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

    // ---- sending helpers -------------------------------------------------------------------------

    fn send(&mut self, channel: u16, method: Method) {
        self.out.method(channel, &method);
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
        tracing::info!(peer = %self.peer, user = %self.username, code = err.code, text = %err.text, "closing AMQP connection");
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
            FrameKind::Method => self.handle_method_frame(frame.channel, &frame.payload),
            FrameKind::Header => self.handle_content_header(frame.channel, frame.payload),
            FrameKind::Body => self.handle_content_body(frame.channel, frame.payload),
        }
    }

    /// A method frame's payload, in any phase but `Closed` and `Draining` (which [`Self::handle_frame`]
    /// handles).
    fn handle_method_frame(&mut self, channel: u16, payload: &[u8]) {
        if self.basic_fast_path(channel, payload) {
            return;
        }
        match codec::parse_method(payload) {
            Ok(method) => self.handle_method(channel, method),
            Err(e) => {
                let err = match e {
                    codec::MethodError::Unknown { class_id, method_id } => {
                        AmqpError::connection(code::COMMAND_INVALID, format!("unknown method {class_id}.{method_id}"))
                            .on(class_id, method_id)
                    }
                    codec::MethodError::Malformed { class_id, method_id } => AmqpError::connection(
                        code::SYNTAX_ERROR,
                        format!("malformed arguments for method {class_id}.{method_id}"),
                    )
                    .on(class_id, method_id),
                    codec::MethodError::Truncated => AmqpError::connection(code::FRAME_ERROR, "method frame too short"),
                };
                if self.phase == Phase::Closing {
                    return;
                }
                self.close_connection(err);
            }
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
        tracing::info!(peer = %self.peer, user = %self.username, "closing AMQP connection (the client closed it)");
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

    fn vhost(&self) -> Arc<VHost> {
        // Only called in the Open phase, which is entered by setting the vhost.
        Arc::clone(self.vhost.as_ref().expect("vhost is set once the connection is open"))
    }

    fn channel(&mut self, id: u16) -> &mut Channel {
        // Callers checked the channel exists and is open.
        self.channels.get_mut(&id).expect("channel checked by caller")
    }

    /// Hands a method on an open channel to its class's handler.
    fn handle_channel_command(&mut self, id: u16, method: Method) -> Result<(), AmqpError> {
        match method {
            Method::Exchange(m) => self.handle_exchange(id, m),
            Method::Queue(m) => self.handle_queue(id, m),
            Method::Basic(m) => self.handle_basic(id, m),
            Method::Confirm(m) => self.handle_confirm(id, m),
            Method::Tx(m) => self.handle_tx(id, m),
            Method::Access(access::AMQPMethod::Request(_)) => {
                // Access tickets are obsolete; RabbitMQ still answers them.
                self.send(id, Method::Access(access::AMQPMethod::RequestOk(access::RequestOk {})));
                Ok(())
            }
            _ => Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected method")),
        }
    }

    // ---- content ---------------------------------------------------------------------------------

    // ---- broker events ---------------------------------------------------------------------------

    // ---- teardown --------------------------------------------------------------------------------

    /// Cancels a channel's consumers and requeues its unacked deliveries.
    fn release_channel_resources(&mut self, id: u16) {
        // Acked deliveries must not be requeued below.
        self.apply_acks();
        let Some(ch) = self.channels.get_mut(&id) else { return };
        let released = ch.release();
        let (consumers, unacked) = (released.consumers, released.unacked);
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
        self.registry.leave();
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel_resources(id);
        }
        self.channels.clear();
        // Deliveries still queued for us go back to their queues.
        self.events.close();
        while let Ok(event) = self.events.try_recv() {
            // Never written to the client: back to the queue untouched (no-ack ones included).
            if let ConsumerEvent::Deliver(d) = event {
                self.return_undelivered(d);
            }
        }
        self.ctx.broker.connection_closed(self.id);
    }
}

/// Hooks of the broker's connection registry (what the management API lists and closes).
impl Connection {}
