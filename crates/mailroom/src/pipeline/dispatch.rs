//! The dispatcher: takes deliveries up to the worker's concurrency, runs the fixed slots (tracing,
//! metrics, filter, dead-letter, retry, inbox) around the user layers and the handler, and settles
//! each delivery: ack, or publish (delayed retry / DLQ) with a confirm and then ack.

use super::metrics::{Count, Metrics};
use super::middleware::{Incoming, Next, Outcome};
use super::topology::retry_queue;
use crate::bus::{clear_failure_headers, Bus, Context};
use crate::envelope::{headers, millis, truncate, Metadata, MAX_ERROR_HEADER};
use crate::error::HandlerError;
use crate::filter::Filter;
use crate::inbox::UnitSlot;
use crate::inbox::{Claim, InboxStore};
use crate::retry::RetryPolicy;
use crate::trace::{TraceContext, TRACEPARENT};
use crate::transport::{Inbound, Outbound, Subscription, X_DELAY};
use crate::wire::{AMQPValue, ShortString};
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

/// What a running worker's handlers share: its settings, the pipeline, its counters.
pub(super) struct Core {
    pub(super) bus: Bus,
    pub(super) queue: Arc<str>,
    pub(super) name: String,
    pub(super) retry: RetryPolicy,
    pub(super) inbox: Option<Arc<dyn InboxStore>>,
    pub(super) filter: Option<Filter>,
    pub(super) state: Option<crate::bus::State>,
    /// The delayed-message exchange delayed retries go through; `None`: TTL retry queues.
    pub(super) delayed_via: Option<String>,
    pub(super) next: Next,
    pub(super) metrics: Arc<Metrics>,
    /// Per-message-id locks: two copies of one message handled concurrently by this worker must not
    /// both pass the inbox check before either records (a check-then-act race).
    pub(super) inflight: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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

/// Takes deliveries while permits last, each on its own task; on stop, finishes the running ones.
pub(super) async fn dispatch_loop(core: Arc<Core>, mut sub: Subscription, concurrency: usize, stop: Arc<Notify>) {
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
    let mut meta = Metadata::from_properties(&inbound.properties);
    // A dead letter moved back by the broker (server-side redrive keeps headers): start afresh.
    if meta.headers.contains_key(headers::DEAD_LETTERED) {
        clear_failure_headers(&mut meta);
    }
    let meta = Arc::new(meta);
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
    // Marks it as this queue's dead letter: what a server-side redrive moves back, and what tells the
    // worker receiving it again to reset its attempts.
    copy.headers.insert(headers::DEAD_LETTERED.into(), core.queue.to_string());
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
