//! Workers and the handler pipeline.
//!
//! Slots, outer to inner, fixed: **tracing** (span `process <queue>`, `traceparent` continued),
//! **metrics**, **filter**, **dead-letter**, **retry**, **idempotency** (inbox), **user layers**
//! ([`Middleware`]), **decode**, **handler**. Built-ins are builder switches, not hand-stacked layers, so
//! retries always run inside the dead-letter slot (Watermill #580/#645: poison queue before retries).
//! Only the dispatcher settles a delivery: `Ack`, or publish (retry queue / DLQ) with a confirm and
//! then ack. It never rejects with requeue (no hot loops); if that publish fails it rejects without
//! requeue and the queue's dead-letter backstop moves the message to `<queue>.dlq`.

use crate::bus::{Bus, Context};
use crate::envelope::{headers, millis, truncate, Envelope, Metadata, Payload, MAX_ERROR_HEADER};
use crate::error::{HandlerError, Result};
use crate::filter::Filter;
use crate::inbox::UnitSlot;
use crate::inbox::{Claim, InboxStore};
use crate::retry::RetryPolicy;
use crate::trace::{TraceContext, TRACEPARENT};
use crate::transport::{BoxFuture, Declaration, ExchangeKind, Inbound, Outbound, Subscription, X_DELAY};
use crate::wire::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

/// What handling a delivery came to; the dispatcher turns it into broker operations.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Done: ack.
    Ack,
    /// Failed, may succeed later: the retry slot decides.
    Retry(HandlerError),
    /// Failed for good: to the DLQ.
    DeadLetter(HandlerError),
    /// Deliberately ignored (filtered, duplicate): ack and count.
    Drop(String),
}

/// A delivery as the pipeline sees it (body still encoded).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Metadata read from the AMQP properties.
    pub meta: Arc<Metadata>,
    /// The encoded body.
    pub body: Bytes,
    /// The handler context (bus, trace, queue).
    pub ctx: Context,
}

/// A user layer between the idempotency slot and decoding (auth checks, tenant scoping, timing).
pub trait Middleware: Send + Sync + 'static {
    /// Handles `msg`, usually by calling `next.run(msg)` and inspecting or mapping the outcome.
    fn call(&self, msg: Incoming, next: Next) -> BoxFuture<'static, Outcome>;
}

type Terminal = Arc<dyn Fn(Incoming) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// The rest of the pipeline after a user layer.
#[derive(Clone)]
pub struct Next {
    layers: Arc<[Arc<dyn Middleware>]>,
    index: usize,
    terminal: Terminal,
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next").field("index", &self.index).finish()
    }
}

impl Next {
    /// Runs the remaining layers, then decode and the handler.
    pub fn run(self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        match self.layers.get(self.index).cloned() {
            Some(layer) => layer.call(msg, Next { index: self.index + 1, ..self }),
            None => (self.terminal)(msg),
        }
    }
}

/// Per-worker counters; with the `metrics` feature also exported through the `metrics` facade.
#[derive(Debug, Default)]
pub struct Metrics {
    received: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    filtered: AtomicU64,
    duplicates: AtomicU64,
    latency_us: AtomicU64,
    #[cfg(feature = "metrics")]
    exported: Option<exported::Exported>,
}

/// What a worker counts.
#[derive(Debug, Clone, Copy)]
enum Count {
    Received,
    Ok,
    Failed,
    Retried,
    DeadLettered,
    Filtered,
    Duplicates,
}

/// The `metrics`-facade side of a worker's counters: handles registered once per worker (labels
/// `queue` and `handler`), so counting a message allocates nothing.
#[cfg(feature = "metrics")]
mod exported {
    use super::Count;

    /// Counter names, one per [`Count`]; the latency histogram is `mailroom_handler_duration_seconds`.
    pub(super) const NAMES: [(&str, Count); 7] = [
        ("mailroom_handler_received_total", Count::Received),
        ("mailroom_handler_handled_total", Count::Ok),
        ("mailroom_handler_failed_total", Count::Failed),
        ("mailroom_handler_retried_total", Count::Retried),
        ("mailroom_handler_dead_lettered_total", Count::DeadLettered),
        ("mailroom_handler_filtered_total", Count::Filtered),
        ("mailroom_handler_duplicates_total", Count::Duplicates),
    ];

    #[derive(Debug)]
    pub(super) struct Exported {
        counters: [metrics::Counter; 7],
        latency: metrics::Histogram,
    }

    impl Exported {
        pub(super) fn register(queue: &str, handler: &str) -> Exported {
            let labels = [("queue", queue.to_owned()), ("handler", handler.to_owned())];
            Exported {
                counters: NAMES.map(|(name, _)| metrics::counter!(name, &labels)),
                latency: metrics::histogram!("mailroom_handler_duration_seconds", &labels),
            }
        }
        pub(super) fn count(&self, c: Count) {
            self.counters[c as usize].increment(1);
        }
        pub(super) fn latency(&self, d: std::time::Duration) {
            self.latency.record(d.as_secs_f64());
        }
    }
}

/// A snapshot of a worker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Deliveries received.
    pub received: u64,
    /// Handled successfully.
    pub ok: u64,
    /// Handler invocations that failed.
    pub failed: u64,
    /// Retries scheduled (immediate and delayed).
    pub retried: u64,
    /// Sent to the DLQ.
    pub dead_lettered: u64,
    /// Dropped by the in-process filter.
    pub filtered: u64,
    /// Skipped as already processed (inbox).
    pub duplicates: u64,
    /// Total handling time in microseconds (divide by `received` for a mean).
    pub latency_us: u64,
}

impl Metrics {
    fn count(&self, c: Count) {
        let counter = match c {
            Count::Received => &self.received,
            Count::Ok => &self.ok,
            Count::Failed => &self.failed,
            Count::Retried => &self.retried,
            Count::DeadLettered => &self.dead_lettered,
            Count::Filtered => &self.filtered,
            Count::Duplicates => &self.duplicates,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(e) = &self.exported {
            e.count(c);
        }
    }
    fn handled_in(&self, d: std::time::Duration) {
        self.latency_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(e) = &self.exported {
            e.latency(d);
        }
    }
    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            received: r(&self.received),
            ok: r(&self.ok),
            failed: r(&self.failed),
            retried: r(&self.retried),
            dead_lettered: r(&self.dead_lettered),
            filtered: r(&self.filtered),
            duplicates: r(&self.duplicates),
            latency_us: r(&self.latency_us),
        }
    }
}

/// Builds a worker: a pool of competing consumers on one queue. Nothing happens until `.run()`.
#[must_use = "a worker does nothing until .handle(..).run() is awaited"]
pub struct WorkerBuilder {
    bus: Bus,
    queue: String,
    name: String,
    prefetch: u16,
    concurrency: usize,
    retry: RetryPolicy,
    inbox: Option<Arc<dyn InboxStore>>,
    filter: Option<Filter>,
    layers: Vec<Arc<dyn Middleware>>,
    bindings: Vec<String>,
    responder: bool,
    state: Option<crate::bus::State>,
    single_active: bool,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder").field("queue", &self.queue).finish()
    }
}

impl Bus {
    /// A point-to-point worker on `queue` (declared with its DLQ when it runs).
    pub fn worker(&self, queue: &str) -> WorkerBuilder {
        WorkerBuilder {
            bus: self.clone(),
            queue: queue.to_owned(),
            name: queue.to_owned(),
            prefetch: 32,
            concurrency: 8,
            retry: RetryPolicy::new(),
            inbox: None,
            filter: None,
            layers: Vec::new(),
            bindings: Vec::new(),
            responder: false,
            state: None,
            single_active: false,
        }
    }

    /// A subscription to events whose topic matches `pattern` (`orders.*`, `orders.#`); name it with
    /// [`Subscribe::group`]: the group's durable queue gets a copy of each event, and the group's
    /// workers compete for it. Without a group there is nothing to run (a compile-time error):
    ///
    /// ```compile_fail,E0599
    /// # async fn f(bus: mailroom::Bus) {
    /// // error[E0599]: no method named `handle` found for struct `Subscribe`
    /// bus.subscribe("orders.*").handle(|_e: mailroom::Envelope<String>, _ctx| async { Ok(()) });
    /// # }
    /// ```
    pub fn subscribe(&self, pattern: &str) -> Subscribe {
        Subscribe { bus: self.clone(), bindings: vec![pattern.to_owned()] }
    }

    /// An endpoint on `queue` handling several message types, each dispatched by the message's `type`
    /// property to the handler registered with [`WorkerBuilder::on`] for its [`Message::NAME`]
    /// (same as [`Bus::worker`]; the name says what it is for).
    ///
    /// [`Message::NAME`]: crate::Message::NAME
    pub fn endpoint(&self, queue: &str) -> WorkerBuilder {
        self.worker(queue)
    }

    /// A request handler on `queue`: what the handler returns is sent back as the reply; an error
    /// becomes a fault reply (no retries: the requester has a deadline).
    pub fn responder(&self, queue: &str) -> WorkerBuilder {
        let mut w = self.worker(queue);
        w.responder = true;
        w
    }
}

/// A subscription without a group yet: [`Subscribe::group`] names the group's queue and gives the
/// [`WorkerBuilder`] (typestate: an ungrouped subscription cannot be run).
#[must_use = "a subscription needs .group(name), then .handle(..).run()"]
#[derive(Debug)]
pub struct Subscribe {
    bus: Bus,
    bindings: Vec<String>,
}

impl Subscribe {
    /// Also subscribe to `pattern`.
    pub fn topic(mut self, pattern: &str) -> Self {
        self.bindings.push(pattern.to_owned());
        self
    }
    /// Names the subscriber group: its durable queue is called `name`; the group's workers compete.
    pub fn group(self, name: &str) -> WorkerBuilder {
        let mut w = self.bus.worker(name);
        w.bindings = self.bindings;
        w
    }
}

impl WorkerBuilder {
    /// Declares the queue with `x-single-active-consumer`: of all workers on it (in any process), one
    /// at a time receives its messages; when it goes, the next takes over where it stopped. With
    /// `concurrency(1)` that processes the queue strictly in order (see [`crate::partition`]).
    pub fn single_active_consumer(mut self) -> Self {
        self.single_active = true;
        self
    }
    /// Shared state for the handlers, read with [`Context::state`] (an `Arc`, no clone per closure).
    /// One value per type; a second call with the same type replaces it.
    pub fn state<S: Send + Sync + 'static>(self, state: S) -> Self {
        self.shared_state(Arc::new(state))
    }
    /// [`WorkerBuilder::state`] with an `Arc` the caller keeps too: `ctx.state::<S>()` hands out clones
    /// of this very `Arc`.
    pub fn shared_state<S: Send + Sync + 'static>(mut self, state: Arc<S>) -> Self {
        let mut map = self.state.take().map(|s| (*s).clone()).unwrap_or_default();
        map.insert(std::any::TypeId::of::<S>(), state);
        self.state = Some(Arc::new(map));
        self
    }
    /// Also subscribe to `pattern` (a group may follow several topics).
    pub fn topic(mut self, pattern: &str) -> Self {
        self.bindings.push(pattern.to_owned());
        self
    }
    /// Most unacked deliveries in flight to this worker.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }
    /// Most handlers running at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// The retry policy (default: none; the first failure dead-letters).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
    /// Skip messages this worker already processed.
    pub fn idempotent(mut self, store: Arc<dyn InboxStore>) -> Self {
        self.inbox = Some(store);
        self
    }
    /// Only handle messages passing `filter` (for subscriptions, header equalities become a
    /// headers-exchange binding; anything else is checked in process and counted).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(match self.filter.take() {
            Some(f) => f.and(filter),
            None => filter,
        });
        self
    }
    /// Adds a user layer (runs after idempotency, before decode), in the order added.
    pub fn layer(mut self, m: impl Middleware) -> Self {
        self.layers.push(Arc::new(m));
        self
    }

    /// Sets a typed handler; `run` starts it.
    pub fn handle<T, F, Fut>(self, handler: F) -> Worker
    where
        T: Payload,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        Worker { builder: self, terminal: typed_terminal(handler) }
    }

    /// The handler for messages of type `T` (their `type` property is [`Message::NAME`]); add more
    /// types with [`Endpoint::on`]. A message of a type with no handler goes to the DLQ with error kind
    /// `unknown-type` and a reason naming its type and the ones handled, never through a decoder.
    ///
    /// [`Message::NAME`]: crate::Message::NAME
    pub fn on<T, F, Fut>(self, handler: F) -> Endpoint
    where
        T: crate::Message,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        Endpoint { builder: self, handlers: Vec::new() }.on(handler)
    }

    /// Sets a request handler (use with [`Bus::responder`]): its value is the reply.
    pub fn handle_request<T, R, F, Fut>(mut self, handler: F) -> Worker
    where
        T: Payload,
        R: Payload,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.responder = true;
        let handler = Arc::new(handler);
        let terminal: Terminal = Arc::new(move |msg: Incoming| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let env = match Envelope::<T>::from_parts((*msg.meta).clone(), &msg.body) {
                    Ok(e) => e,
                    Err(e) => {
                        let err = HandlerError::permanent(e).with_kind("decode");
                        crate::request::reply_fault(&msg.ctx, &err).await;
                        return Outcome::DeadLetter(err);
                    }
                };
                let ctx = msg.ctx.clone();
                match handler(env, msg.ctx).await {
                    Ok(resp) => match crate::request::reply(&ctx, resp).await {
                        Ok(()) => Outcome::Ack,
                        Err(e) => Outcome::Retry(HandlerError::transient(e).with_kind("reply")),
                    },
                    Err(e) => {
                        crate::request::reply_fault(&ctx, &e).await;
                        // The fault reply is the answer: nothing to retry or dead-letter.
                        Outcome::Drop(format!("fault replied: {e}"))
                    }
                }
            })
        });
        Worker { builder: self, terminal }
    }
}

/// Decode, then call `handler`: the innermost slots of a typed worker.
fn typed_terminal<T, F, Fut>(handler: F) -> Terminal
where
    T: Payload,
    F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |msg: Incoming| {
        let handler = Arc::clone(&handler);
        Box::pin(async move {
            let env = match Envelope::<T>::from_parts((*msg.meta).clone(), &msg.body) {
                Ok(e) => e,
                Err(e) => return Outcome::DeadLetter(HandlerError::permanent(e).with_kind("decode")),
            };
            match handler(env, msg.ctx).await {
                Ok(()) => Outcome::Ack,
                Err(e) if e.permanent => Outcome::DeadLetter(e),
                Err(e) => Outcome::Retry(e),
            }
        })
    })
}

/// A worker handling several message types, dispatched by the `type` property.
#[must_use = "an endpoint does nothing until .run() is awaited"]
pub struct Endpoint {
    builder: WorkerBuilder,
    handlers: Vec<(&'static str, Terminal)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<&str> = self.handlers.iter().map(|(n, _)| *n).collect();
        f.debug_struct("Endpoint").field("queue", &self.builder.queue).field("types", &types).finish()
    }
}

impl Endpoint {
    /// Adds the handler for messages of type `T`.
    pub fn on<T, F, Fut>(mut self, handler: F) -> Endpoint
    where
        T: crate::Message,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers.push((T::NAME, typed_terminal(handler)));
        self
    }

    /// Checks the type names (non-empty, one handler each), then declares and starts the worker.
    pub async fn run(self) -> Result<WorkerHandle> {
        let mut map = std::collections::HashMap::new();
        for (name, terminal) in self.handlers {
            if name.is_empty() {
                return Err(crate::Error::Invalid("a message type name is empty".into()));
            }
            if map.insert(name, terminal).is_some() {
                return Err(crate::Error::Invalid(format!(
                    "two handlers for message type `{name}` on `{}`: type names must be unique",
                    self.builder.queue
                )));
            }
        }
        let mut known: Vec<&str> = map.keys().copied().collect();
        known.sort_unstable();
        let known = known.join(", ");
        let queue = self.builder.queue.clone();
        let map = Arc::new(map);
        let terminal: Terminal = Arc::new(move |msg: Incoming| match map.get(msg.meta.type_name.as_str()) {
            Some(handler) => handler(msg),
            None => {
                let reason =
                    format!("no handler for message type `{}` on `{queue}` (it handles: {known})", msg.meta.type_name);
                Box::pin(std::future::ready(Outcome::DeadLetter(
                    HandlerError::permanent(reason).with_kind("unknown-type"),
                )))
            }
        });
        Worker { builder: self.builder, terminal }.run().await
    }
}

/// A configured worker, ready to run.
#[must_use = "a worker does nothing until .run() is awaited"]
pub struct Worker {
    builder: WorkerBuilder,
    terminal: Terminal,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("queue", &self.builder.queue).finish()
    }
}

struct Core {
    bus: Bus,
    queue: Arc<str>,
    name: String,
    retry: RetryPolicy,
    inbox: Option<Arc<dyn InboxStore>>,
    filter: Option<Filter>,
    state: Option<crate::bus::State>,
    /// The delayed-message exchange delayed retries go through; `None`: TTL retry queues.
    delayed_via: Option<String>,
    next: Next,
    metrics: Arc<Metrics>,
    /// Per-message-id locks: two copies of one message handled concurrently by this worker must not
    /// both pass the inbox check before either records (a check-then-act race).
    inflight: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    metrics: Arc<Metrics>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    queue: String,
}

impl WorkerHandle {
    /// The worker's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }
    /// The queue it consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// Stops taking messages, lets running handlers finish, then cancels the consumer.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
    /// Kills the worker at once, as a crash would: running handlers are dropped mid-way and their
    /// unacked messages go back to the queue for redelivery.
    pub fn abort(self) {
        self.task.abort();
    }
}

fn retry_queue(queue: &str, round: u32) -> String {
    format!("{queue}.retry.{round}")
}

/// Declares where delayed retries wait. With a delayed-message exchange (Mailroom): the exchange,
/// and a binding from it to `queue` keyed by the queue's name; returns the exchange's name. Without
/// one (RabbitMQ without the plugin): one TTL queue per round, `<queue>.retry.<n>`, whose expired
/// messages dead-letter back to `queue`; returns `None`.
async fn declare_retry_topology(bus: &Bus, queue: &str, retry: &RetryPolicy) -> Result<Option<String>> {
    if retry.delayed == 0 {
        return Ok(None);
    }
    if bus.transport().has_delayed_exchange() {
        let exchange = bus.config().delayed_exchange.clone();
        bus.declare(Declaration::Exchange { name: exchange.clone(), kind: ExchangeKind::Delayed }).await?;
        bus.declare(Declaration::Bind {
            queue: queue.to_owned(),
            exchange: exchange.clone(),
            routing_key: queue.to_owned(),
            arguments: FieldTable::default(),
        })
        .await?;
        return Ok(Some(exchange));
    }
    for round in 0..retry.delayed {
        let mut args = FieldTable::default();
        let ttl = retry.ceiling(round).as_millis() as u32;
        args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongUInt(ttl));
        args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(LongString::from("")));
        args.insert(ShortString::from("x-dead-letter-routing-key"), AMQPValue::LongString(LongString::from(queue)));
        bus.quorum(&mut args);
        bus.declare(Declaration::Queue { name: retry_queue(queue, round), durable: true, arguments: args }).await?;
    }
    Ok(None)
}

/// The message for delayed retry round `round`: through the delayed exchange (`x-delay` header) or
/// into that round's TTL queue (per-message expiration = the jittered delay, capped by the queue TTL).
fn delayed_retry(core: &Core, copy: &Metadata, round: u32, delay: std::time::Duration, body: Bytes) -> Outbound {
    let mut props = copy.to_properties();
    match &core.delayed_via {
        Some(exchange) => {
            let mut table = props.headers().clone().unwrap_or_default();
            table.insert(ShortString::from(X_DELAY), AMQPValue::LongLongInt(delay.as_millis() as i64));
            props = props.with_headers(table);
            Outbound {
                exchange: exchange.clone(),
                routing_key: core.queue.to_string(),
                properties: props,
                body,
                mandatory: false,
            }
        }
        None => {
            props = props.with_expiration(delay.as_millis().to_string().as_str().into());
            Outbound {
                exchange: String::new(),
                routing_key: retry_queue(&core.queue, round),
                properties: props,
                body,
                mandatory: false,
            }
        }
    }
}

impl Worker {
    /// Declares the topology (queue, DLQ, retry queues, bindings) and starts consuming.
    pub async fn run(self) -> Result<WorkerHandle> {
        let b = self.builder;
        if b.queue.is_empty() {
            return Err(crate::Error::Invalid("a worker needs a queue name".into()));
        }
        let bus = b.bus.clone();
        bus.declare_worker_queue(&b.queue, b.single_active).await?;
        let delayed_via = declare_retry_topology(&bus, &b.queue, &b.retry).await?;
        if !b.bindings.is_empty() {
            bus.ensure_events_exchange().await?;
            let events = bus.config().events_exchange.clone();
            match b.filter.as_ref().and_then(Filter::binding_arguments) {
                Some(args) => {
                    // Topic first, then a per-group headers exchange: only matching events reach the queue.
                    let hx = format!("{}.filter", b.queue);
                    bus.declare(Declaration::Exchange { name: hx.clone(), kind: ExchangeKind::Headers }).await?;
                    for pattern in &b.bindings {
                        bus.declare(Declaration::BindExchange {
                            destination: hx.clone(),
                            source: events.clone(),
                            routing_key: pattern.clone(),
                        })
                        .await?;
                    }
                    bus.declare(Declaration::Bind {
                        queue: b.queue.clone(),
                        exchange: hx,
                        routing_key: String::new(),
                        arguments: args,
                    })
                    .await?;
                }
                None => {
                    for pattern in &b.bindings {
                        bus.declare(Declaration::Bind {
                            queue: b.queue.clone(),
                            exchange: events.clone(),
                            routing_key: pattern.clone(),
                            arguments: FieldTable::default(),
                        })
                        .await?;
                    }
                }
            }
        }
        let sub = bus.transport().consume(&b.queue, b.prefetch).await?;
        let metrics = Arc::new(Metrics {
            #[cfg(feature = "metrics")]
            exported: Some(exported::Exported::register(&b.queue, &b.name)),
            ..Metrics::default()
        });
        let mut retry = b.retry.clone();
        if b.responder {
            retry = RetryPolicy::new();
        }
        let core = Arc::new(Core {
            bus: bus.clone(),
            queue: Arc::from(b.queue.as_str()),
            name: b.name.clone(),
            retry,
            inbox: b.inbox.clone(),
            filter: b.filter.clone(),
            state: b.state.clone(),
            delayed_via,
            next: Next { layers: Arc::from(b.layers.clone()), index: 0, terminal: self.terminal },
            metrics: Arc::clone(&metrics),
            inflight: Default::default(),
        });
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(dispatch_loop(core, sub, b.concurrency, Arc::clone(&stop)));
        Ok(WorkerHandle { metrics, stop, task, queue: b.queue })
    }
}

async fn dispatch_loop(core: Arc<Core>, mut sub: Subscription, concurrency: usize, stop: Arc<Notify>) {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut running = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            Some(_) = running.join_next(), if !running.is_empty() => {}
            permit = Arc::clone(&permits).acquire_owned() => {
                let Ok(permit) = permit else { break };
                tokio::select! {
                    _ = stop.notified() => break,
                    inbound = sub.next() => {
                        let Some(inbound) = inbound else { break };
                        let core = Arc::clone(&core);
                        running.spawn(async move {
                            process(core, inbound).await;
                            drop(permit);
                        });
                    }
                }
            }
        }
    }
    // Graceful: finish what is running before the consumer (and its unacked messages) goes.
    while running.join_next().await.is_some() {}
    drop(sub);
}

async fn process(core: Arc<Core>, mut inbound: Inbound) {
    let started = Instant::now();
    let meta = Arc::new(Metadata::from_properties(&inbound.properties));
    // Tracing slot: continue the sender's trace, or start one for messages from other clients.
    let incoming = meta.header(TRACEPARENT).and_then(TraceContext::parse);
    #[cfg_attr(not(feature = "otel"), allow(unused_mut))]
    let mut trace = match incoming {
        Some(parent) => parent.child(),
        None => TraceContext::new_root(),
    };
    let span = tracing::info_span!(
        "process",
        messaging.destination = %core.queue,
        messaging.message.id = %meta.id,
        trace_id = %trace.trace_id_hex()
    );
    // With an OTel layer, the span's parent is the sender's span and the handler's context is this span.
    #[cfg(feature = "otel")]
    if let Some(linked) = crate::otel::process(&span, incoming.as_ref()) {
        trace = linked;
        span.record("trace_id", trace.trace_id_hex());
    }
    let ctx = Context {
        bus: core.bus.clone(),
        meta: Arc::clone(&meta),
        trace,
        queue: Arc::clone(&core.queue),
        redelivered: inbound.redelivered,
        unit: None,
        state: core.state.clone(),
    };
    let msg = Incoming { meta: Arc::clone(&meta), body: inbound.body.clone(), ctx };
    async {
        // Metrics slot.
        core.metrics.count(Count::Received);
        // Filter slot.
        if let Some(f) = &core.filter {
            if !f.matches(&meta) {
                core.metrics.count(Count::Filtered);
                settle_ack(&mut inbound).await;
                return;
            }
        }
        // Dead-letter slot around the retry slot.
        let outcome = retry_slot(&core, msg).await;
        match outcome {
            Outcome::Ack | Outcome::Drop(_) => settle_ack(&mut inbound).await,
            Outcome::Retry(e) => {
                let round: u32 = meta.header(headers::DELAYED_RETRIES).and_then(|r| r.parse().ok()).unwrap_or(0);
                if round < core.retry.delayed {
                    core.metrics.count(Count::Retried);
                    let delay = core.retry.delay(round);
                    let mut copy = failed_copy(&core, &meta, &e);
                    copy.headers.insert(headers::DELAYED_RETRIES.into(), (round + 1).to_string());
                    let out = delayed_retry(&core, &copy, round, delay, inbound.body.clone());
                    tracing::debug!(round, delay_ms = delay.as_millis() as u64, error = %e, "delayed retry");
                    publish_then_ack(&core, &mut inbound, core.bus.transport().publish(out).await.map(|_| ())).await;
                } else {
                    dead_letter(&core, &mut inbound, &meta, &e).await;
                }
            }
            Outcome::DeadLetter(e) => dead_letter(&core, &mut inbound, &meta, &e).await,
        }
    }
    .instrument(span)
    .await;
    core.metrics.handled_in(started.elapsed());
}

/// Immediate retries in process, around the inbox and everything inside it.
async fn retry_slot(core: &Arc<Core>, msg: Incoming) -> Outcome {
    let mut attempt = 0;
    loop {
        let outcome = inbox_slot(core, msg.clone()).await;
        match outcome {
            Outcome::Retry(e) => {
                core.metrics.count(Count::Failed);
                if !core.retry.retries(&e) {
                    return Outcome::DeadLetter(e);
                }
                if attempt < core.retry.immediate {
                    attempt += 1;
                    core.metrics.count(Count::Retried);
                    continue;
                }
                return Outcome::Retry(e);
            }
            Outcome::DeadLetter(e) => {
                core.metrics.count(Count::Failed);
                return Outcome::DeadLetter(e);
            }
            Outcome::Ack => {
                core.metrics.count(Count::Ok);
                return Outcome::Ack;
            }
            other => return other,
        }
    }
}

async fn inbox_slot(core: &Arc<Core>, msg: Incoming) -> Outcome {
    let Some(inbox) = &core.inbox else { return core.next.clone().run(msg).await };
    let id = msg.meta.id.clone();
    let lock = Arc::clone(core.inflight.lock().unwrap().entry(id.clone()).or_default());
    let _held = lock.lock().await;
    let outcome = inbox_checked(core, inbox, &id, msg).await;
    {
        let mut map = core.inflight.lock().unwrap();
        // Two strong refs = the map's and ours: nobody else waits, so the entry can go.
        if Arc::strong_count(&lock) <= 2 {
            map.remove(&id);
        }
    }
    outcome
}

async fn inbox_checked(core: &Arc<Core>, inbox: &Arc<dyn InboxStore>, id: &str, mut msg: Incoming) -> Outcome {
    if let Some(claim) = inbox.begin(&core.name, id) {
        // Transactional store: the inbox row and the handler's writes commit together, on success only.
        let unit = match claim.await {
            Ok(Claim::Claimed(unit)) => unit,
            Ok(Claim::Duplicate) => {
                core.metrics.count(Count::Duplicates);
                return Outcome::Drop("duplicate".into());
            }
            Err(e) => return Outcome::Retry(HandlerError::transient(e).with_kind("inbox")),
        };
        let slot: UnitSlot = Arc::new(std::sync::Mutex::new(Some(unit)));
        msg.ctx.unit = Some(Arc::clone(&slot));
        let outcome = core.next.clone().run(msg).await;
        let unit = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(unit) = unit else {
            return Outcome::Retry(HandlerError::transient("the inbox transaction vanished").with_kind("inbox"));
        };
        return match outcome {
            Outcome::Ack => match unit.commit().await {
                Ok(()) => Outcome::Ack,
                Err(e) => Outcome::Retry(HandlerError::transient(e).with_kind("inbox")),
            },
            other => {
                if let Err(e) = unit.rollback().await {
                    tracing::warn!(error = %e, "inbox rollback failed (the connection drops it anyway)");
                }
                other
            }
        };
    }
    match inbox.seen(&core.name, id).await {
        Ok(true) => {
            core.metrics.count(Count::Duplicates);
            return Outcome::Drop("duplicate".into());
        }
        Ok(false) => {}
        Err(e) => return Outcome::Retry(HandlerError::transient(e).with_kind("inbox")),
    }
    let outcome = core.next.clone().run(msg).await;
    if matches!(outcome, Outcome::Ack) {
        if let Err(e) = inbox.record(&core.name, id).await {
            tracing::warn!(error = %e, "inbox record failed; a redelivery may repeat the effect");
        }
    }
    outcome
}

/// Metadata for a copy sent on after a failure: failure headers set, first failure kept.
fn failed_copy(core: &Core, meta: &Metadata, e: &HandlerError) -> Metadata {
    let mut m = meta.clone();
    let now = millis(SystemTime::now()).to_string();
    let attempts = meta.attempt() + 1 + core.retry.immediate;
    m.headers.insert(headers::ATTEMPT.into(), attempts.to_string());
    m.headers.entry(headers::FIRST_FAILURE_MS.into()).or_insert_with(|| now.clone());
    m.headers.insert(headers::LAST_FAILURE_MS.into(), now);
    m.headers.insert(headers::ERROR_KIND.into(), e.kind.clone());
    m.headers.insert(headers::ERROR.into(), truncate(&e.message, MAX_ERROR_HEADER));
    m.headers.insert(headers::SOURCE_QUEUE.into(), core.queue.to_string());
    m.headers.insert(headers::HANDLER.into(), core.name.clone());
    // A released delayed message carries the negated delay; it must not ride along.
    m.headers.remove(X_DELAY);
    m
}

async fn dead_letter(core: &Arc<Core>, inbound: &mut Inbound, meta: &Metadata, e: &HandlerError) {
    core.metrics.count(Count::DeadLettered);
    let mut copy = failed_copy(core, meta, e);
    if e.kind == "decode" || !core.retry.retries(e) {
        // Not retried: the attempt count is just this one.
        copy.headers.insert(headers::ATTEMPT.into(), (meta.attempt() + 1).to_string());
    }
    tracing::warn!(error = %e, "dead-lettering");
    let r = core.bus.emit_raw(&format!("{}.dlq", core.queue), &copy, inbound.body.clone()).await;
    publish_then_ack(core, inbound, r).await;
}

async fn publish_then_ack(_core: &Arc<Core>, inbound: &mut Inbound, published: Result<(), crate::TransportError>) {
    match published {
        Ok(()) => settle_ack(inbound).await,
        Err(e) => {
            // Reject without requeue: the queue's dead-letter backstop keeps the message.
            tracing::warn!(error = %e, "could not publish retry/dead letter; rejecting to the DLQ backstop");
            if let Err(e) = inbound.reject().await {
                tracing::warn!(error = %e, "reject failed; the broker will redeliver");
            }
        }
    }
}

async fn settle_ack(inbound: &mut Inbound) {
    if let Err(e) = inbound.ack().await {
        tracing::warn!(error = %e, "ack failed; the broker will redeliver (the inbox absorbs it)");
    }
}

#[cfg(all(test, feature = "metrics"))]
mod exported_tests {
    /// The counter handles are indexed by `Count as usize`: the name table must follow that order.
    #[test]
    fn names_follow_the_count_order() {
        for (i, (_, c)) in super::exported::NAMES.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
