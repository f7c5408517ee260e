//! The bus: sending, publishing and recipient lists, and the handler [`Context`].

use crate::envelope::{headers, Envelope, Metadata, Payload};
use crate::error::{Error, Result, TransportError};
use crate::inbox::UnitSlot;
use crate::trace::{TraceContext, TRACEPARENT};
use crate::transport::{Declaration, ExchangeKind, Outbound, Published, Transport};
use crate::wire::{AMQPValue, FieldTable, LongString, ShortString};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tracing::Instrument;

/// Bus settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// The topic exchange events are published to.
    pub events_exchange: String,
    /// Declare worker, group and DLQ queues as quorum queues (replicated on a cluster).
    pub quorum_queues: bool,
    /// The delayed-message exchange delayed retries go through, where the broker has one
    /// (Mailroom, embedded or server); elsewhere each queue gets TTL retry queues `<queue>.retry.<n>`.
    pub delayed_exchange: String,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            events_exchange: "mailroom.events".into(),
            quorum_queues: false,
            delayed_exchange: "mailroom.delayed".into(),
        }
    }
}

pub(crate) struct BusInner {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) config: BusConfig,
    declared: Mutex<HashSet<String>>,
    pub(crate) replies: tokio::sync::OnceCell<Arc<crate::replies::ReplyRouter>>,
}

/// The entry point: sends, publishes, requests, and builds workers. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("config", &self.inner.config).finish()
    }
}

impl Bus {
    /// A bus over `transport`.
    pub fn new(transport: impl Transport) -> Bus {
        Self::with_config(Arc::new(transport), BusConfig::default())
    }

    /// A bus over a shared transport with settings.
    pub fn with_config(transport: Arc<dyn Transport>, config: BusConfig) -> Bus {
        Bus {
            inner: Arc::new(BusInner {
                transport,
                config,
                declared: Mutex::new(HashSet::new()),
                replies: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// A bus on a fresh in-process broker: the default for tests and small apps.
    #[cfg(feature = "embedded")]
    pub fn embedded() -> Result<Bus> {
        Ok(Bus::new(crate::transport::Embedded::start()?))
    }

    /// The transport underneath (for admin operations and tests).
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The settings.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// Declares the events exchange once per bus.
    pub(crate) async fn ensure_events_exchange(&self) -> Result<()> {
        let name = self.inner.config.events_exchange.clone();
        if self.inner.declared.lock().unwrap().contains(&name) {
            return Ok(());
        }
        self.declare(Declaration::Exchange { name: name.clone(), kind: ExchangeKind::Topic }).await?;
        self.inner.declared.lock().unwrap().insert(name);
        Ok(())
    }

    /// Declares topology through the transport.
    pub async fn declare(&self, d: Declaration) -> Result<()> {
        Ok(self.inner.transport.declare(d).await?)
    }

    /// Arguments of a queue the SDK owns: dead-letter backstop to `<queue>.dlq` (a rejected message
    /// lands there rather than vanishing) and the queue type.
    pub(crate) fn queue_arguments(&self, queue: &str) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(LongString::from("")));
        t.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(LongString::from(format!("{queue}.dlq").as_str())),
        );
        self.quorum(&mut t);
        t
    }

    pub(crate) fn quorum(&self, t: &mut FieldTable) {
        if self.inner.config.quorum_queues {
            t.insert(ShortString::from("x-queue-type"), AMQPValue::LongString(LongString::from("quorum")));
        }
    }

    /// Declares a worker queue and its DLQ (idempotent).
    pub async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.declare_worker_queue(queue, false).await
    }

    /// Declares a worker queue and its DLQ; `single_active` adds `x-single-active-consumer` (one
    /// consumer at a time gets the queue's messages, the others stand by).
    pub(crate) async fn declare_worker_queue(&self, queue: &str, single_active: bool) -> Result<()> {
        let mut dlq_args = FieldTable::default();
        self.quorum(&mut dlq_args);
        self.declare(Declaration::Queue { name: format!("{queue}.dlq"), durable: true, arguments: dlq_args }).await?;
        let mut arguments = self.queue_arguments(queue);
        if single_active {
            arguments.insert(ShortString::from("x-single-active-consumer"), AMQPValue::Boolean(true));
        }
        self.declare(Declaration::Queue { name: queue.to_owned(), durable: true, arguments }).await
    }

    /// Sends a command to a queue (declared if needed), waiting for the broker's confirm.
    /// Unroutable sends fail with [`Error::NoRoute`] instead of vanishing.
    pub async fn send<T: Payload>(&self, queue: &str, body: T) -> Result<String> {
        self.send_envelope(queue, Envelope::command(body)).await
    }

    /// Sends a prepared envelope to a queue; returns its message id.
    pub async fn send_envelope<T: Payload>(&self, queue: &str, env: Envelope<T>) -> Result<String> {
        let id = env.id.clone();
        match self.emit("", queue, env, true).await? {
            Published::Confirmed => Ok(id),
            Published::Unroutable => Err(Error::NoRoute(queue.to_owned())),
        }
    }

    /// Sends a command of a named [`Message`](crate::Message) type (its `type` property is
    /// `T::NAME`, what an [endpoint](Bus::endpoint) dispatches on).
    pub async fn send_message<T: crate::Message>(&self, queue: &str, body: T) -> Result<String> {
        self.send_envelope(queue, Envelope::message(crate::MessageKind::Command, body)).await
    }

    /// Publishes an event of a named [`Message`](crate::Message) type.
    pub async fn publish_message<T: crate::Message>(&self, topic: &str, body: T) -> Result<String> {
        self.publish_envelope(topic, Envelope::message(crate::MessageKind::Event, body)).await
    }

    /// Publishes an event to a topic (routing key on the events exchange). Nobody subscribed is fine.
    pub async fn publish<T: Payload>(&self, topic: &str, body: T) -> Result<String> {
        self.publish_envelope(topic, Envelope::event(body)).await
    }

    /// Publishes a prepared envelope to a topic.
    pub async fn publish_envelope<T: Payload>(&self, topic: &str, env: Envelope<T>) -> Result<String> {
        self.ensure_events_exchange().await?;
        let id = env.id.clone();
        let exchange = self.inner.config.events_exchange.clone();
        self.emit(&exchange, topic, env, false).await?;
        Ok(id)
    }

    /// Recipient list: the same message (same id) to every queue, one confirm each, a result per queue.
    pub async fn send_each<T: Payload + Clone>(
        &self,
        queues: &[impl AsRef<str>],
        body: T,
    ) -> Vec<(String, Result<()>)> {
        let env = Envelope::command(body);
        let mut results = Vec::with_capacity(queues.len());
        for q in queues {
            let q = q.as_ref();
            let r = self.send_envelope(q, env.clone()).await.map(|_| ());
            results.push((q.to_owned(), r));
        }
        results
    }

    /// Encodes and publishes one envelope with a `send <dest>` span; creates a `traceparent` if absent.
    pub(crate) async fn emit<T: Payload>(
        &self,
        exchange: &str,
        routing_key: &str,
        mut env: Envelope<T>,
        mandatory: bool,
    ) -> Result<Published> {
        let trace = match env.header(TRACEPARENT).and_then(TraceContext::parse) {
            Some(t) => t,
            None => {
                let t = TraceContext::new_root();
                env.meta.headers.insert(TRACEPARENT.into(), t.to_string());
                t
            }
        };
        let dest = if exchange.is_empty() { routing_key.to_owned() } else { format!("{exchange}/{routing_key}") };
        let span = tracing::info_span!(
            "send",
            messaging.destination = %dest,
            messaging.message.id = %env.id,
            trace_id = %trace.trace_id_hex()
        );
        // With an OTel layer, the traceparent names this send span, so the consumer's span links to it.
        #[cfg(feature = "otel")]
        if let Some(linked) = crate::otel::send(&span, &trace).filter(|t| *t != trace) {
            env.meta.headers.insert(TRACEPARENT.into(), linked.to_string());
            span.record("trace_id", linked.trace_id_hex());
        }
        let (properties, body) = env.to_wire().map_err(Error::Encode)?;
        let out = Outbound {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties,
            body,
            mandatory,
        };
        Ok(self.inner.transport.publish(out).instrument(span).await?)
    }

    /// Publishes raw properties/body (dead-lettering, retries, redrive: the message id is kept).
    pub(crate) async fn emit_raw(
        &self,
        routing_key: &str,
        meta: &Metadata,
        body: bytes::Bytes,
    ) -> Result<(), TransportError> {
        let out = Outbound {
            exchange: String::new(),
            routing_key: routing_key.to_owned(),
            properties: meta.to_properties(),
            body,
            mandatory: false,
        };
        self.inner.transport.publish(out).await.map(|_| ())
    }

    /// Moves every message in `dlq` back to the queue it failed in (the `x-mailroom-source-queue`
    /// header, else the DLQ name without `.dlq`), keeping its id and resetting its attempt count.
    /// Returns how many were moved; see [`Bus::redrive_report`] for the ones that stayed.
    pub async fn redrive(&self, dlq: &str) -> Result<usize> {
        Ok(self.redrive_report(dlq).await?.moved)
    }

    /// [`Bus::redrive`], reporting the dead letters it could not move. No dead letter is lost, on any
    /// target:
    ///
    /// - **Server-side, where the broker has it** ([`Transport::redrive`]): on the embedded broker,
    ///   and on a Mailroom server reached over AMQP when [`AmqpConfig::management_url`] names its HTTP
    ///   API, the broker moves the dead letters of `<queue>.dlq` that `<queue>`'s worker wrote back to
    ///   `<queue>` itself, removing each from the DLQ only once its copy is enqueued (and, for a
    ///   durable queue, on disk). No message crosses the network; their headers stay as they were, and
    ///   the worker resets their attempt count when it receives them (they carry
    ///   [`headers::DEAD_LETTERED`]). Counted in [`Redriven::server_side`].
    /// - **Client-side for the rest** (RabbitMQ, a Mailroom server without a management URL, dead
    ///   letters the broker put there by itself, a DLQ not named `<queue>.dlq`): each is taken with
    ///   `basic.get`, its failure headers removed, published with `mandatory` and a confirm, and only
    ///   then acked. A copy the broker returns (its target queue was deleted, or no longer routes)
    ///   leaves its dead letter in `dlq`, untouched, listed in [`Redriven::unroutable`]. This pass
    ///   takes at most the messages `dlq` held when the redrive began, less those moved server-side (a
    ///   message that fails again and is back meanwhile is not moved twice), and stops early after
    ///   [`MAX_UNROUTABLE_PER_PASS`] unroutable ones (each is held unacked until the pass ends, so the
    ///   next `basic.get` moves on to the following message).
    ///
    /// [`AmqpConfig::management_url`]: crate::AmqpConfig::management_url
    pub async fn redrive_report(&self, dlq: &str) -> Result<Redriven> {
        let mut report = Redriven::default();
        // Only what the DLQ held when the redrive began: a redriven message that fails again and is back in
        // the DLQ before the client-side pass (a fast retry policy) must not be moved a second time.
        let held_at_start = self.inner.transport.message_count(dlq).await? as usize;
        if let Some(target) = dlq.strip_suffix(".dlq").filter(|t| !t.is_empty()) {
            if let Some(moved) = self.inner.transport.redrive(dlq, target).await? {
                report.server_side = moved as usize;
                report.moved = moved as usize;
            }
        }
        // What the server side skipped (no source to go back to) is at the head: the pass tries those.
        let limit = held_at_start.saturating_sub(report.server_side);
        // Unroutable dead letters, held unsettled until the pass ends, then released in order.
        let mut held = Vec::new();
        let outcome = self.redrive_pass(dlq, limit, &mut report, &mut held).await;
        for mut m in held {
            if let Err(e) = m.release().await {
                // The message is still unacked: the broker returns it to the DLQ when its channel goes.
                tracing::warn!(error = %e, dlq, "could not release a dead letter; the broker requeues it");
            }
        }
        outcome.map(|()| report)
    }

    async fn redrive_pass(
        &self,
        dlq: &str,
        limit: usize,
        report: &mut Redriven,
        held: &mut Vec<crate::transport::Inbound>,
    ) -> Result<()> {
        for _ in 0..limit {
            if held.len() >= MAX_UNROUTABLE_PER_PASS {
                break;
            }
            let Some(mut m) = self.inner.transport.get(dlq).await? else { break };
            let mut meta = Metadata::from_properties(&m.properties);
            let target = meta
                .header(headers::SOURCE_QUEUE)
                .map(str::to_owned)
                .unwrap_or_else(|| dlq.trim_end_matches(".dlq").to_owned());
            clear_failure_headers(&mut meta);
            let out = Outbound {
                exchange: String::new(),
                routing_key: target.clone(),
                properties: meta.to_properties(),
                body: m.body.clone(),
                mandatory: true,
            };
            match self.inner.transport.publish(out).await {
                Ok(Published::Confirmed) => {
                    m.ack().await?;
                    report.moved += 1;
                }
                Ok(Published::Unroutable) => {
                    tracing::warn!(dlq, target, message_id = %meta.id, "redrive target does not route; the dead letter stays");
                    report.unroutable.push(Unroutable { message_id: meta.id.clone(), target });
                    held.push(m);
                }
                // `m` is dropped unsettled: the broker keeps it in the DLQ.
                Err(e) => {
                    held.push(m);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}

/// Removes what earlier failures wrote on a message (attempt count, errors, delayed-retry round, the
/// dead-letter mark), so its next handling starts afresh: a redrive moving it client-side, or a worker
/// receiving a dead letter the broker moved back.
pub(crate) fn clear_failure_headers(meta: &mut Metadata) {
    for h in headers::FAILURE_HEADERS {
        meta.headers.remove(*h);
    }
    meta.headers.remove(headers::DELAYED_RETRIES);
    meta.headers.remove(crate::transport::X_DELAY);
}

/// Most unroutable dead letters one redrive pass holds (each is an unacked `basic.get`, on AMQP a
/// channel of its own) before it stops; run the redrive again once their targets exist.
pub const MAX_UNROUTABLE_PER_PASS: usize = 256;

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redriven {
    /// Dead letters moved back: by the broker, plus those republished (confirmed) and acked.
    pub moved: usize,
    /// Of `moved`, how many the broker moved itself (server-side redrive, see [`Bus::redrive_report`]).
    pub server_side: usize,
    /// Dead letters whose target did not route: still in the DLQ.
    pub unroutable: Vec<Unroutable>,
}

/// A dead letter a redrive left in its DLQ because its target did not route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unroutable {
    /// Its message id.
    pub message_id: String,
    /// The queue it was to go back to.
    pub target: String,
}

/// What a handler gets besides the message: where it came from, and a way to send more messages
/// that carry the flow's correlation id, causation and trace.
#[derive(Clone)]
pub struct Context {
    pub(crate) bus: Bus,
    pub(crate) meta: Arc<Metadata>,
    pub(crate) trace: TraceContext,
    pub(crate) queue: Arc<str>,
    pub(crate) redelivered: bool,
    /// The transactional inbox's open unit of work, when the worker has one.
    pub(crate) unit: Option<UnitSlot>,
    /// The worker's shared state ([`WorkerBuilder::state`](crate::pipeline::WorkerBuilder::state)).
    pub(crate) state: Option<State>,
}

/// A worker's shared state values, by type.
pub(crate) type State = Arc<std::collections::HashMap<std::any::TypeId, Arc<dyn std::any::Any + Send + Sync>>>;

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("queue", &self.queue).field("message_id", &self.meta.id).finish()
    }
}

impl Context {
    /// The incoming message's metadata.
    pub fn meta(&self) -> &Metadata {
        &self.meta
    }
    /// The queue being consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// Whether the broker delivered this message before.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }
    /// The trace context of this handling (its trace id is the flow's).
    pub fn trace(&self) -> TraceContext {
        self.trace
    }
    /// The bus (for requests and anything else).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The worker's shared state of type `S` (set with
    /// [`WorkerBuilder::state`](crate::pipeline::WorkerBuilder::state)), or a permanent `config`
    /// error naming the type, so `let db = ctx.state::<Db>()?;` reads naturally.
    pub fn state<S: Send + Sync + 'static>(&self) -> std::result::Result<Arc<S>, crate::HandlerError> {
        self.state
            .as_ref()
            .and_then(|m| m.get(&std::any::TypeId::of::<S>()))
            .and_then(|s| Arc::clone(s).downcast::<S>().ok())
            .ok_or_else(|| {
                crate::HandlerError::permanent(format!(
                    "ctx.state::<{}>(): the worker has no such state (.state(value) on its builder)",
                    std::any::type_name::<S>()
                ))
                .with_kind("config")
            })
    }

    /// The handler's PostgreSQL transaction: a worker with a [`PgInbox`](crate::inbox::postgres::PgInbox)
    /// opens it and records the message id in it before the handler runs, and commits it after the
    /// handler succeeded (rolls it back otherwise), so the handler's writes and the inbox row commit
    /// together: exactly-once effect. Run queries with `&mut **tx` as the executor; dropping the
    /// [`PgTx`](crate::inbox::postgres::PgTx) hands it back (take it again for more work), do not
    /// commit it yourself. Fails (permanently) on a worker without a PostgreSQL inbox, or while the
    /// transaction is already taken.
    #[cfg(feature = "postgres")]
    pub fn tx(&self) -> std::result::Result<crate::inbox::postgres::PgTx, crate::HandlerError> {
        self.unit.as_ref().and_then(crate::inbox::postgres::PgTx::take).ok_or_else(|| {
            crate::HandlerError::permanent(
                "ctx.tx(): no PostgreSQL transaction (the worker needs .idempotent(PgInbox); take it once at a time)",
            )
            .with_kind("config")
        })
    }

    /// Stamps an outgoing envelope: causation = incoming id, correlation and trace continued.
    /// Nothing else is copied (retry counts must not leak outbound, MassTransit #4676).
    pub fn derive<T>(&self, mut env: Envelope<T>) -> Envelope<T> {
        env.meta.causation_id = Some(self.meta.id.clone());
        env.meta.correlation_id = Some(self.meta.correlation_id.clone().unwrap_or_else(|| self.meta.id.clone()));
        env.meta.headers.insert(TRACEPARENT.into(), self.trace.child().to_string());
        env
    }

    /// Sends a command as part of this flow.
    pub async fn send<T: Payload>(&self, queue: &str, body: T) -> Result<String> {
        self.bus.send_envelope(queue, self.derive(Envelope::command(body))).await
    }

    /// Publishes an event as part of this flow.
    pub async fn publish<T: Payload>(&self, topic: &str, body: T) -> Result<String> {
        self.bus.publish_envelope(topic, self.derive(Envelope::event(body))).await
    }

    /// Sends a command of a named [`Message`](crate::Message) type as part of this flow.
    pub async fn send_message<T: crate::Message>(&self, queue: &str, body: T) -> Result<String> {
        self.bus.send_envelope(queue, self.derive(Envelope::message(crate::MessageKind::Command, body))).await
    }

    /// Publishes an event of a named [`Message`](crate::Message) type as part of this flow.
    pub async fn publish_message<T: crate::Message>(&self, topic: &str, body: T) -> Result<String> {
        self.bus.publish_envelope(topic, self.derive(Envelope::message(crate::MessageKind::Event, body))).await
    }
}
