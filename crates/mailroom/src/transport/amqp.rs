//! The AMQP transport: lapin to a Mailroom server or RabbitMQ, with recovery.
//!
//! One connection; one confirm-mode channel for publishing that also carries the direct reply-to
//! consumer (the broker only routes replies to the channel that published the request); one channel
//! per consumer and a short-lived channel per declaration (a failed declare closes its channel, and
//! must not take the publisher with it).
//!
//! Recovery is deliberately simple: a supervisor task watches the connection; when it drops, it
//! reconnects with exponential backoff, declares every remembered piece of topology again, restarts
//! the reply consumer and then publishes the new link. Consumer tasks wait for the new link and
//! consume again. A publish that failed without a confirm is resent on the new link with the same
//! properties (so the same message id) until it is confirmed or `publish_timeout` passes: at-least-once,
//! duplicates are for the idempotent consumer.

use super::management::{Answer, ManagementApi};
use super::probe;
use super::{AckHandle, BoxFuture, Declaration, Inbound, Outbound, Published, Subscription, Transport};
use crate::error::TransportError;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::Confirmation;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind as LapinKind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Settings of the AMQP transport.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`, one per cluster node: the transport connects to the first
    /// that answers and, when its connection drops, fails over to the next (round robin).
    pub urls: Vec<String>,
    /// How long a publish may wait for its confirm, across reconnects.
    pub publish_timeout: Duration,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay (backoff doubles up to this).
    pub reconnect_max: Duration,
    /// How long [`Amqp::connect`] keeps trying before giving up.
    pub connect_timeout: Duration,
    /// How long a publish the broker nacked is resent (same id, backing off) before the nack is
    /// returned. A RabbitMQ cluster nacks publishes to a quorum queue for a few seconds while it
    /// elects a new leader; resending rides that out. Zero (the default) returns the first nack, so a
    /// full `reject-publish` queue fails fast.
    pub nack_retry: Duration,
    /// The HTTP API of the Mailroom server behind `urls` (`http://[user:password@]host:port`, the
    /// AMQP URL's credentials when it has none): with it, [`Bus::redrive`](crate::Bus::redrive) asks
    /// the server to move dead letters itself (`POST /api/queues/{vhost}/{dlq}/redrive`) instead of
    /// getting and republishing each. Used only when the connected broker is Mailroom (RabbitMQ has no
    /// such endpoint); only `http://` (the SDK carries no TLS stack for it). `None` (the default):
    /// redrive is client-side, lossless all the same.
    pub management_url: Option<String>,
}

impl AmqpConfig {
    /// Defaults for `url`: 30 s publish timeout, reconnects from 100 ms backing off to 5 s.
    /// A comma-separated list (`amqp://a:5672,amqp://b:5672`) names several cluster nodes.
    pub fn new(url: impl Into<String>) -> Self {
        let url: String = url.into();
        Self::cluster(url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned))
    }

    /// Defaults for a cluster: the transport fails over between these nodes.
    pub fn cluster(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            publish_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            nack_retry: Duration::ZERO,
            management_url: None,
        }
    }

    /// Sets [`AmqpConfig::management_url`].
    pub fn management_url(mut self, url: impl Into<String>) -> Self {
        self.management_url = Some(url.into());
        self
    }
}

/// Longest a single connection attempt (TCP + AMQP handshake) may take before the next node is tried.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// `url` without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// The pseudo-queue for direct reply-to (RabbitMQ and Mailroom substitute the real address).
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

struct Link {
    generation: u64,
    conn: Connection,
    publish: Channel,
    /// The node this link is connected to.
    url: String,
}

impl Link {
    fn healthy(&self) -> bool {
        self.conn.status().connected() && self.publish.status().connected()
    }
}

struct Inner {
    config: AmqpConfig,
    link: watch::Sender<Option<Arc<Link>>>,
    topology: Mutex<Vec<Declaration>>,
    reply_sink: Mutex<Option<mpsc::UnboundedSender<Inbound>>>,
    /// Serialises link setup with reply-consumer setup so the consumer exists before any request.
    setup: tokio::sync::Mutex<()>,
    kick: tokio::sync::Notify,
    closed: AtomicBool,
    /// Index (mod `urls.len()`) of the node to try next.
    next_url: AtomicUsize,
    /// The connected broker has the delayed-message exchange (it is a Mailroom server).
    delayed_exchange: AtomicBool,
    /// The Mailroom HTTP API for server-side redrive ([`AmqpConfig::management_url`]).
    management: Option<ManagementApi>,
}

/// AMQP 0-9-1 transport over lapin, with reconnection.
#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp").field("urls", &self.inner.config.urls).finish()
    }
}

fn err(e: lapin::Error) -> TransportError {
    if e.is_amqp_soft_error() {
        TransportError::Broker(e.to_string())
    } else {
        TransportError::Disconnected(e.to_string())
    }
}

fn lapin_kind(kind: super::ExchangeKind) -> LapinKind {
    match kind {
        super::ExchangeKind::Direct => LapinKind::Direct,
        super::ExchangeKind::Topic => LapinKind::Topic,
        super::ExchangeKind::Fanout => LapinKind::Fanout,
        super::ExchangeKind::Headers => LapinKind::Headers,
        super::ExchangeKind::Delayed => LapinKind::Custom(super::DELAYED_EXCHANGE_TYPE.into()),
        super::ExchangeKind::ConsistentHash => LapinKind::Custom(super::CONSISTENT_HASH_EXCHANGE_TYPE.into()),
    }
}

async fn apply(ch: &Channel, d: &Declaration) -> Result<(), lapin::Error> {
    match d {
        Declaration::Exchange { name, kind } => {
            ch.exchange_declare(
                name.as_str().into(),
                lapin_kind(*kind),
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                kind.arguments(),
            )
            .await
        }
        Declaration::Queue { name, durable, arguments } => ch
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions { durable: *durable, ..Default::default() },
                arguments.clone(),
            )
            .await
            .map(|_| ()),
        Declaration::Bind { queue, exchange, routing_key, arguments } => {
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                routing_key.as_str().into(),
                QueueBindOptions::default(),
                arguments.clone(),
            )
            .await
        }
        Declaration::BindExchange { destination, source, routing_key } => {
            ch.exchange_bind(
                destination.as_str().into(),
                source.as_str().into(),
                routing_key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    }
}

impl Amqp {
    /// Connects (retrying with backoff for up to `connect_timeout`) and starts the recovery supervisor.
    pub async fn connect(config: AmqpConfig) -> Result<Amqp, TransportError> {
        let (link, _) = watch::channel(None);
        let management = config.management_url.as_deref().map(ManagementApi::parse).transpose()?;
        let inner = Arc::new(Inner {
            management,
            config,
            link,
            topology: Mutex::new(Vec::new()),
            reply_sink: Mutex::new(None),
            setup: tokio::sync::Mutex::new(()),
            kick: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            next_url: AtomicUsize::new(0),
            delayed_exchange: AtomicBool::new(false),
        });
        if inner.config.urls.is_empty() {
            return Err(TransportError::Disconnected("no broker URL given".into()));
        }
        let deadline = Instant::now() + inner.config.connect_timeout;
        let first = Inner::establish(&inner, 1, deadline).await?;
        inner.link.send_replace(Some(first));
        tokio::spawn(supervise(Arc::downgrade(&inner)));
        Ok(Amqp { inner })
    }

    /// Connects to `url` with default settings.
    pub async fn connect_url(url: &str) -> Result<Amqp, TransportError> {
        Self::connect(AmqpConfig::new(url)).await
    }

    /// Closes the connection and stops recovering.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.kick.notify_waiters();
        if let Some(link) = self.inner.link.send_replace(None) {
            let _ = link.conn.close(200, "bye".into()).await;
        }
    }

    /// The node currently connected to (`None` while reconnecting).
    pub fn connected_url(&self) -> Option<String> {
        self.inner.link.borrow().as_ref().map(|l| l.url.clone())
    }

    /// How many times the transport has connected (1 = never reconnected). For tests and metrics.
    pub fn generation(&self) -> u64 {
        self.inner.link.borrow().as_ref().map(|l| l.generation).unwrap_or(0)
    }

    async fn channel(&self) -> Result<(Arc<Link>, Channel), TransportError> {
        let link = self.inner.wait_link(0, Instant::now() + self.inner.config.publish_timeout).await?;
        let ch = link.conn.create_channel().await.map_err(|e| {
            self.inner.kick.notify_one();
            err(e)
        })?;
        Ok((link, ch))
    }

    /// Runs `op` on a fresh channel, closing it afterwards (a failure closes it anyway).
    async fn with_channel<T, F, Fut>(&self, op: F) -> Result<T, TransportError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, lapin::Error>>,
    {
        let (_link, ch) = self.channel().await?;
        let r = op(ch.clone()).await.map_err(err);
        if ch.status().connected() {
            let _ = ch.close(200, "done".into()).await;
        }
        r
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(link) = self.link.send_replace(None) {
            tokio::spawn(async move {
                let _ = link.conn.close(200, "bye".into()).await;
            });
        }
    }
}

impl Inner {
    /// Waits for a healthy link newer than `after` (0 = any).
    async fn wait_link(&self, after: u64, deadline: Instant) -> Result<Arc<Link>, TransportError> {
        let mut rx = self.link.subscribe();
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(TransportError::Closed);
            }
            if let Some(l) = rx.borrow_and_update().as_ref() {
                if l.generation > after && l.healthy() {
                    return Ok(Arc::clone(l));
                }
            }
            // Poll as well as watch: a dead link is only noticed by the supervisor's check.
            let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout("waiting for a broker connection".into()));
            }
        }
    }

    /// Connects, opens the publisher channel, re-declares topology and restarts the reply consumer.
    async fn establish(self: &Arc<Self>, generation: u64, deadline: Instant) -> Result<Arc<Link>, TransportError> {
        let mut delay = self.config.reconnect_min;
        let nodes = self.config.urls.len();
        let mut failed_in_round = 0;
        loop {
            let index = self.next_url.load(Ordering::SeqCst);
            let url = &self.config.urls[index % nodes];
            match self.try_establish(generation, url).await {
                Ok(link) => return Ok(link),
                Err(e) => {
                    // Next node first; back off only once every node has failed in this round.
                    self.next_url.store(index.wrapping_add(1), Ordering::SeqCst);
                    failed_in_round += 1;
                    if self.closed.load(Ordering::SeqCst) || Instant::now() >= deadline {
                        return Err(e);
                    }
                    if failed_in_round < nodes {
                        tracing::warn!(error = %e, url = %redact(url), "amqp connect failed; trying the next node");
                        continue;
                    }
                    failed_in_round = 0;
                    if Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "amqp connect failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.reconnect_max);
                }
            }
        }
    }

    async fn try_establish(self: &Arc<Self>, generation: u64, url: &str) -> Result<Arc<Link>, TransportError> {
        let _setup = self.setup.lock().await;
        // A connect to a dead node can hang (SYN to a stopped host): bound it so failover moves on.
        let conn =
            tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, Connection::connect(url, ConnectionProperties::default()))
                .await
                .map_err(|_| TransportError::Timeout(format!("connecting to {}", redact(url))))?
                .map_err(err)?;
        let mailroom = probe::server_properties(url).await.is_some_and(|p| probe::is_mailroom(&p));
        self.delayed_exchange.store(mailroom, Ordering::SeqCst);
        let publish = conn.create_channel().await.map_err(err)?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(err)?;
        let topology = self.topology.lock().unwrap().clone();
        if !topology.is_empty() {
            let ch = conn.create_channel().await.map_err(err)?;
            for d in &topology {
                if let Err(e) = apply(&ch, d).await {
                    // Keep going: one stale declaration must not block recovery of the rest.
                    tracing::warn!(error = %e, ?d, "re-declaration failed");
                    if !ch.status().connected() {
                        break;
                    }
                }
            }
            let _ = ch.close(200, "done".into()).await;
        }
        let sink = self.reply_sink.lock().unwrap().clone();
        if let Some(sink) = sink {
            start_reply_consumer(&publish, sink).await.map_err(err)?;
        }
        tracing::info!(generation, url = %redact(url), delayed_exchange = mailroom, "amqp connected");
        Ok(Arc::new(Link { generation, conn, publish, url: url.to_owned() }))
    }
}

async fn supervise(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let current = inner.link.borrow().clone();
        let broken = match &current {
            Some(l) => !l.healthy(),
            None => true,
        };
        if !broken {
            drop(current);
            // Wait on a clone of the Arc-held Notify only briefly, then re-check: the Weak lets the
            // transport be dropped while the supervisor sleeps.
            let _ = tokio::time::timeout(Duration::from_millis(100), inner.kick.notified()).await;
            drop(inner);
            continue;
        }
        let generation = current.as_ref().map(|l| l.generation).unwrap_or(0) + 1;
        if let Some(old) = inner.link.send_replace(None) {
            let _ = tokio::time::timeout(Duration::from_millis(500), old.conn.close(320, "recovering".into())).await;
            // Fail over: start with the node after the one that went away.
            if inner.config.urls.len() > 1 {
                inner.next_url.fetch_add(1, Ordering::SeqCst);
            }
        }
        tracing::warn!(generation, "amqp connection lost; reconnecting");
        // No overall deadline: keep trying until the broker is back or the transport is dropped.
        let far = Instant::now() + Duration::from_secs(3600 * 24 * 365);
        match inner.establish(generation, far).await {
            Ok(link) => {
                inner.link.send_replace(Some(link));
            }
            Err(e) => {
                tracing::warn!(error = %e, "amqp reconnect gave up");
                return;
            }
        }
    }
}

async fn start_reply_consumer(ch: &Channel, sink: mpsc::UnboundedSender<Inbound>) -> Result<(), lapin::Error> {
    let consumer = ch
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(forward(consumer, sink, true));
    Ok(())
}

/// Forwards deliveries until the consumer ends (cancelled or the channel died).
async fn forward(mut consumer: lapin::Consumer, sink: mpsc::UnboundedSender<Inbound>, no_ack: bool) {
    while let Some(d) = consumer.next().await {
        let Ok(d) = d else { break };
        let acker: Option<Box<dyn AckHandle>> = if no_ack { None } else { Some(Box::new(LapinAck(d.acker.clone()))) };
        let inbound = Inbound {
            exchange: d.exchange.as_str().to_owned(),
            routing_key: d.routing_key.as_str().to_owned(),
            properties: d.properties.clone(),
            body: d.data.into(),
            redelivered: d.redelivered,
            acker,
        };
        if sink.send(inbound).is_err() {
            break;
        }
    }
}

struct LapinAck(lapin::Acker);

/// Longest an ack or reject may take to be written. lapin can leave the future of an ack sent on a
/// connection that is dying pending for good; the broker redelivers an unacked message anyway, so
/// giving up is safe and keeps a stopping worker from waiting forever.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

async fn settle(
    what: &str,
    op: impl std::future::Future<Output = Result<(), lapin::Error>>,
) -> Result<(), TransportError> {
    match tokio::time::timeout(SETTLE_TIMEOUT, op).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(TransportError::Timeout(format!("{what} not written (connection lost?)"))),
    }
}

impl AckHandle for LapinAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        // A failed ack (channel gone) is harmless: the broker redelivers and the inbox absorbs it.
        Box::pin(async move { settle("ack", async { self.0.ack(BasicAckOptions::default()).await.map(|_| ()) }).await })
    }
    fn reject(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            settle("reject", async { self.0.reject(BasicRejectOptions { requeue: false }).await.map(|_| ()) }).await
        })
    }
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            settle("release", async { self.0.reject(BasicRejectOptions { requeue: true }).await.map(|_| ()) }).await
        })
    }
}

/// Stops a consumer task; closing its channel returns unacked deliveries to the queue.
struct ConsumerGuard {
    stop: Arc<AtomicBool>,
    channel: Arc<Mutex<Option<Channel>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.abort();
        if let Some(ch) = self.channel.lock().unwrap().take() {
            tokio::spawn(async move {
                let _ = ch.close(200, "consumer stopped".into()).await;
            });
        }
    }
}

async fn consume_loop(
    inner: Weak<Inner>,
    queue: String,
    prefetch: u16,
    sink: mpsc::UnboundedSender<Inbound>,
    stop: Arc<AtomicBool>,
    slot: Arc<Mutex<Option<Channel>>>,
    first: Option<(Channel, lapin::Consumer)>,
) {
    let mut first = first;
    let mut last_generation = 0;
    let mut delay = Duration::from_millis(100);
    loop {
        let (ch, consumer) = match first.take() {
            Some(pair) => pair,
            None => {
                let Some(strong) = inner.upgrade() else { return };
                let far = Instant::now() + Duration::from_secs(3600 * 24 * 365);
                let Ok(link) = strong.wait_link(0, far).await else { return };
                drop(strong);
                last_generation = last_generation.max(link.generation);
                match open_consumer(&link.conn, &queue, prefetch).await {
                    Ok(pair) => {
                        delay = Duration::from_millis(100);
                        pair
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, queue, "re-consume failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
        };
        *slot.lock().unwrap() = Some(ch);
        forward(consumer, sink.clone(), false).await;
        if stop.load(Ordering::SeqCst) || sink.is_closed() {
            return;
        }
        if let Some(strong) = inner.upgrade() {
            strong.kick.notify_one();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn open_consumer(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
) -> Result<(Channel, lapin::Consumer), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer =
        ch.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    Ok((ch, consumer))
}

impl Transport for Amqp {
    fn publish(&self, m: Outbound) -> BoxFuture<'_, Result<Published, TransportError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let started = Instant::now();
            let deadline = started + inner.config.publish_timeout;
            let nack_deadline = started + inner.config.nack_retry.min(inner.config.publish_timeout);
            let mut nack_backoff = Duration::from_millis(50);
            let mut after = 0;
            loop {
                let link = inner.wait_link(after, deadline).await?;
                let attempt = async {
                    let confirm = link
                        .publish
                        .basic_publish(
                            m.exchange.as_str().into(),
                            m.routing_key.as_str().into(),
                            BasicPublishOptions { mandatory: m.mandatory, ..Default::default() },
                            &m.body,
                            m.properties.clone(),
                        )
                        .await?;
                    confirm.await
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(remaining, attempt).await {
                    Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => {
                        return Ok(Published::Confirmed)
                    }
                    Ok(Ok(Confirmation::Ack(Some(_)))) => return Ok(Published::Unroutable),
                    Ok(Ok(Confirmation::Nack(_))) => {
                        if Instant::now() + nack_backoff >= nack_deadline {
                            return Err(TransportError::Nacked);
                        }
                        tracing::debug!(message_id = ?m.properties.message_id(), "publish nacked; resending");
                        tokio::time::sleep(nack_backoff).await;
                        nack_backoff = (nack_backoff * 2).min(Duration::from_secs(1));
                    }
                    Ok(Err(e)) if e.is_amqp_soft_error() => {
                        // The channel is closed by the broker (e.g. unknown exchange): not worth resending.
                        inner.kick.notify_one();
                        return Err(err(e));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, message_id = ?m.properties.message_id(), "publish unconfirmed; resending after reconnect");
                        inner.kick.notify_one();
                        after = link.generation;
                    }
                    Err(_) => return Err(TransportError::Timeout("publish confirm".into())),
                }
            }
        })
    }

    fn declare(&self, d: Declaration) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let dd = d.clone();
            self.with_channel(|ch| async move { apply(&ch, &dd).await }).await?;
            let mut topo = self.inner.topology.lock().unwrap();
            if !topo.contains(&d) {
                topo.push(d);
            }
            Ok(())
        })
    }

    fn consume(&self, queue: &str, prefetch: u16) -> BoxFuture<'_, Result<Subscription, TransportError>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            // The first consume is done here so errors (missing queue) reach the caller.
            let (link, _) = {
                let link = self.inner.wait_link(0, Instant::now() + self.inner.config.publish_timeout).await?;
                (link, ())
            };
            let (ch, consumer) = open_consumer(&link.conn, &queue, prefetch).await.map_err(err)?;
            let (tx, rx) = mpsc::unbounded_channel();
            let stop = Arc::new(AtomicBool::new(false));
            let slot = Arc::new(Mutex::new(None));
            let task = tokio::spawn(consume_loop(
                Arc::downgrade(&self.inner),
                queue,
                prefetch,
                tx,
                Arc::clone(&stop),
                Arc::clone(&slot),
                Some((ch, consumer)),
            ));
            Ok(Subscription::new(rx, Box::new(ConsumerGuard { stop, channel: slot, task })))
        })
    }

    fn reply_endpoint(&self) -> BoxFuture<'_, Result<(String, Subscription), TransportError>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let _setup = self.inner.setup.lock().await;
            *self.inner.reply_sink.lock().unwrap() = Some(tx.clone());
            let current = self.inner.link.borrow().clone();
            if let Some(link) = current {
                // If this fails the link is dying; the supervisor starts the consumer on the next one.
                if let Err(e) = start_reply_consumer(&link.publish, tx).await {
                    tracing::warn!(error = %e, "reply consumer failed; will retry on reconnect");
                    self.inner.kick.notify_one();
                }
            }
            Ok((DIRECT_REPLY_TO.to_owned(), Subscription::new(rx, Box::new(()))))
        })
    }

    fn get(&self, queue: &str) -> BoxFuture<'_, Result<Option<Inbound>, TransportError>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            // Not `with_channel`: the delivery must be acked on the channel that got it, so that
            // channel stays open until the ack (it closes when the acker and channel are dropped).
            let (_link, ch) = self.channel().await?;
            let got = ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.map_err(err)?;
            Ok(got.map(|g| {
                let d = g.delivery;
                Inbound {
                    exchange: d.exchange.as_str().to_owned(),
                    routing_key: d.routing_key.as_str().to_owned(),
                    properties: d.properties.clone(),
                    body: d.data.into(),
                    redelivered: d.redelivered,
                    acker: Some(Box::new(GetAck { acker: d.acker, channel: ch }) as Box<dyn AckHandle>),
                }
            }))
        })
    }

    fn message_count(&self, queue: &str) -> BoxFuture<'_, Result<u32, TransportError>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            self.with_channel(|ch| async move {
                ch.queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .map(|q| q.message_count())
            })
            .await
        })
    }

    fn delete_queue(&self, queue: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            self.inner.topology.lock().unwrap().retain(|d| match d {
                Declaration::Queue { name, .. } => name != &queue,
                Declaration::Bind { queue: q, .. } => q != &queue,
                _ => true,
            });
            let q = queue.clone();
            self.with_channel(|ch| async move {
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.map(|_| ())
            })
            .await
        })
    }

    fn has_delayed_exchange(&self) -> bool {
        self.inner.delayed_exchange.load(Ordering::SeqCst)
    }

    /// Through the Mailroom server's HTTP API when [`AmqpConfig::management_url`] is set and the
    /// connected broker is Mailroom; else `None` (client-side). An API that cannot be reached or
    /// refuses (credentials, an old server) is logged and the bus redrives client-side.
    fn redrive<'a>(&'a self, dlq: &'a str, target: &'a str) -> BoxFuture<'a, Result<Option<u64>, TransportError>> {
        Box::pin(async move {
            let Some(api) = &self.inner.management else { return Ok(None) };
            let link = self.inner.wait_link(0, Instant::now() + self.inner.config.publish_timeout).await?;
            // The server's properties, read when this link connected: only Mailroom has the endpoint.
            if !self.inner.delayed_exchange.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let Ok(uri) = link.url.parse::<lapin::uri::AMQPUri>() else { return Ok(None) };
            let login = (uri.authority.userinfo.username.as_str(), uri.authority.userinfo.password.as_str());
            let filter = (crate::envelope::headers::DEAD_LETTERED, target);
            let timeout = self.inner.config.publish_timeout;
            match api.redrive(&uri.vhost, dlq, filter, target, login, timeout).await {
                Ok(Answer::Moved(n)) => Ok(Some(n)),
                // The DLQ or the target is missing: the client-side pass reports it (error or unroutable).
                Ok(Answer::NotFound) => Ok(Some(0)),
                // Still running on the server (it finishes on its own task): do not move the same
                // messages from here meanwhile.
                Err(e @ TransportError::Timeout(_)) => Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, dlq, "server-side redrive unavailable; redriving client-side");
                    Ok(None)
                }
            }
        })
    }

    fn delete_exchange(&self, name: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let name = name.to_owned();
        Box::pin(async move {
            self.inner.topology.lock().unwrap().retain(|d| match d {
                Declaration::Exchange { name: n, .. } => n != &name,
                Declaration::Bind { exchange, .. } => exchange != &name,
                Declaration::BindExchange { destination, source, .. } => destination != &name && source != &name,
                _ => true,
            });
            let n = name.clone();
            self.with_channel(|ch| async move {
                ch.exchange_delete(n.as_str().into(), ExchangeDeleteOptions::default()).await
            })
            .await
        })
    }
}

/// Acks a `basic.get` delivery, then closes the channel it came on.
struct GetAck {
    acker: lapin::Acker,
    channel: Channel,
}

impl AckHandle for GetAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let r = self.acker.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(err);
            let _ = self.channel.close(200, "done".into()).await;
            r
        })
    }
    fn reject(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let r = self.acker.reject(BasicRejectOptions { requeue: false }).await.map(|_| ()).map_err(err);
            let _ = self.channel.close(200, "done".into()).await;
            r
        })
    }
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let r = self.acker.reject(BasicRejectOptions { requeue: true }).await.map(|_| ()).map_err(err);
            let _ = self.channel.close(200, "done".into()).await;
            r
        })
    }
}
