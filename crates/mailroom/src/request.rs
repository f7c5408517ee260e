//! Request-reply and scatter-gather over direct reply-to.
//!
//! One reply consumer per bus; a pending map keyed by request message id (replies carry it as their
//! causation id, and as correlation id when the request started the conversation, which is what plain
//! RPC clients copy). Entries leave the map on reply, timeout or drop; replies with no entry are late
//! and counted. Requests are published mandatory with `expiration` = timeout, so an unroutable request
//! fails fast and a stale one is not handled after the caller gave up. Not durable across restarts.

use crate::bus::{Bus, Context};
use crate::envelope::{headers, Envelope, Payload};
use crate::error::{Error, HandlerError, TransportError};
use crate::replies::{ReplyMsg, ReplyRouter};
use crate::transport::{BoxFuture, Outbound, Published};
use serde::{Deserialize, Serialize};
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A remote failure reported by a responder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// The error category.
    pub kind: String,
    /// The error message.
    pub message: String,
}

/// Why a request produced no response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No reply before the deadline.
    #[error("request timed out")]
    Timeout,
    /// The responder failed and said so.
    #[error("remote fault: {0:?}")]
    Remote(Fault),
    /// No queue took the request.
    #[error("no route to {0}")]
    NoRoute(String),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The reply could not be decoded, or the request encoded.
    #[error("codec: {0}")]
    Codec(String),
}

impl From<Error> for RequestError {
    fn from(e: Error) -> Self {
        match e {
            Error::Transport(t) => RequestError::Transport(t),
            Error::NoRoute(q) => RequestError::NoRoute(q),
            other => RequestError::Codec(other.to_string()),
        }
    }
}

impl Bus {
    async fn replies(&self) -> Result<Arc<ReplyRouter>, TransportError> {
        self.inner.replies.get_or_try_init(|| ReplyRouter::start(self.transport().as_ref())).await.cloned()
    }

    /// Replies that arrived after their request finished (timed out or already gathered).
    pub fn late_replies(&self) -> u64 {
        self.inner.replies.get().map(|r| r.late()).unwrap_or(0)
    }

    /// A request to `queue`; await it (after an optional `.timeout(..)`) for the typed response.
    pub fn request<R: Payload, T: Payload>(&self, queue: &str, body: T) -> Request<T, R> {
        Request {
            bus: self.clone(),
            queue: queue.to_owned(),
            env: Envelope::command(body),
            timeout: Duration::from_secs(30),
            _r: PhantomData,
        }
    }

    /// Scatter `body` to `target`; gather replies with a strategy before a deadline.
    pub fn scatter<R: Payload, T: Payload + Clone>(&self, target: Target, body: T) -> Scatter<T, R> {
        Scatter {
            bus: self.clone(),
            target,
            env: Envelope::command(body),
            strategy: Strategy::All,
            deadline: Duration::from_secs(5),
            _r: PhantomData,
        }
    }

    async fn publish_request<T: Payload>(
        &self,
        exchange: &str,
        key: &str,
        mut env: Envelope<T>,
        address: &str,
        timeout: Duration,
    ) -> Result<Published, Error> {
        env.meta.reply_to = Some(address.to_owned());
        if env.meta.correlation_id.is_none() {
            env.meta.correlation_id = Some(env.meta.id.clone());
        }
        // The request expires with its deadline: nobody handles it after the caller gave up.
        let (mut props, body) = {
            let e = &mut env;
            if e.header(crate::trace::TRACEPARENT).is_none() {
                e.meta
                    .headers
                    .insert(crate::trace::TRACEPARENT.into(), crate::trace::TraceContext::new_root().to_string());
            }
            e.to_wire().map_err(Error::Encode)?
        };
        props = props.with_expiration(timeout.as_millis().max(1).to_string().as_str().into());
        let out = Outbound {
            exchange: exchange.to_owned(),
            routing_key: key.to_owned(),
            properties: props,
            body,
            mandatory: exchange.is_empty(),
        };
        Ok(self.transport().publish(out).await?)
    }
}

/// A pending request; `.await` it.
#[must_use = "a request is sent only when awaited"]
pub struct Request<T, R> {
    bus: Bus,
    queue: String,
    env: Envelope<T>,
    timeout: Duration,
    _r: PhantomData<fn() -> R>,
}

impl<T, R> std::fmt::Debug for Request<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("queue", &self.queue).field("timeout", &self.timeout).finish()
    }
}

impl<T: Payload, R: Payload> Request<T, R> {
    /// The wall-clock deadline, covering connect, publish and wait.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Sends a prepared envelope instead (e.g. one derived from a handler context).
    pub fn envelope(mut self, env: Envelope<T>) -> Self {
        self.env = env;
        self
    }

    async fn run(self) -> Result<R, RequestError> {
        let deadline = self.timeout;
        let work = async {
            let router = self.bus.replies().await?;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let _guard = router.register(&self.env.id, &self.queue, tx);
            match self.bus.publish_request("", &self.queue, self.env, router.address(), deadline).await? {
                Published::Unroutable => return Err(RequestError::NoRoute(self.queue.clone())),
                Published::Confirmed => {}
            }
            let reply = rx.recv().await.ok_or(RequestError::Timeout)?;
            decode_reply::<R>(reply).map_err(|e| e.either())
        };
        tokio::time::timeout(deadline, work).await.map_err(|_| RequestError::Timeout)?
    }
}

enum ReplyError {
    Fault(Fault),
    Codec(String),
}

impl ReplyError {
    fn either(self) -> RequestError {
        match self {
            ReplyError::Fault(f) => RequestError::Remote(f),
            ReplyError::Codec(c) => RequestError::Codec(c),
        }
    }
}

fn decode_reply<R: Payload>(reply: ReplyMsg) -> Result<R, ReplyError> {
    if reply.meta.header(headers::FAULT).is_some() {
        let fault = serde_json::from_slice::<Fault>(&reply.body)
            .unwrap_or_else(|e| Fault { kind: "unreadable".into(), message: e.to_string() });
        return Err(ReplyError::Fault(fault));
    }
    Envelope::<R>::from_parts(reply.meta, &reply.body).map(|e| e.body).map_err(ReplyError::Codec)
}

impl<T: Payload, R: Payload> IntoFuture for Request<T, R> {
    type Output = Result<R, RequestError>;
    type IntoFuture = BoxFuture<'static, Self::Output>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// Sends `resp` back to the requester of the message in `ctx`.
pub(crate) async fn reply<R: Payload>(ctx: &Context, resp: R) -> Result<(), Error> {
    let Some(to) = ctx.meta().reply_to.clone() else { return Ok(()) };
    let mut env = ctx.derive(Envelope::document(resp));
    env.meta.headers.insert(headers::RESPONDER.into(), ctx.queue().to_owned());
    // The requester may be gone (timed out, restarted): an unroutable reply is not our failure.
    ctx.bus().emit("", &to, env, false).await.map(|_| ())
}

/// Sends a fault reply (best effort: the requester may be gone).
pub(crate) async fn reply_fault(ctx: &Context, e: &HandlerError) {
    let fault = Fault { kind: e.kind.clone(), message: e.message.clone() };
    let Some(to) = ctx.meta().reply_to.clone() else { return };
    let mut env = ctx.derive(Envelope::document(fault));
    env.meta.headers.insert(headers::RESPONDER.into(), ctx.queue().to_owned());
    env.meta.headers.insert(headers::FAULT.into(), "true".into());
    if let Err(err) = ctx.bus().emit("", &to, env, false).await {
        tracing::warn!(error = %err, "fault reply failed");
    }
}

/// Who a scatter goes to.
#[derive(Debug, Clone)]
pub enum Target {
    /// Known recipients: one request per queue; `missing` names those that did not answer.
    Queues(Vec<String>),
    /// Everyone subscribed to a topic (unknown responders: only FirstN and UntilDeadline make sense).
    Topic(String),
}

/// When to stop gathering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every recipient answered (replies or faults).
    All,
    /// The first `n` successful replies.
    FirstN(usize),
    /// `k` successful replies; fewer by the deadline is an error carrying what arrived.
    Quorum(usize),
    /// Whatever arrives before the deadline.
    UntilDeadline,
}

/// What a scatter gathered.
#[derive(Debug, Clone, PartialEq)]
pub struct Gathered<R> {
    /// Successful replies, by responder.
    pub replies: Vec<(String, R)>,
    /// Fault replies (and unroutable recipients), by responder.
    pub faults: Vec<(String, Fault)>,
    /// Known recipients that did not answer (always empty for topic targets).
    pub missing: Vec<String>,
    /// Whether the strategy was satisfied before the deadline.
    pub complete: bool,
}

/// Why a gather failed.
#[derive(Debug, thiserror::Error)]
pub enum GatherError<R: std::fmt::Debug> {
    /// Fewer successful replies than the quorum by the deadline; carries the partial result.
    #[error("quorum not met: {} replies", .0.replies.len())]
    QuorumNotMet(Gathered<R>),
    /// The strategy needs a known recipient count but the target is a topic.
    #[error("strategy needs known recipients")]
    InvalidStrategy,
    /// Sending failed.
    #[error(transparent)]
    Send(#[from] Error),
}

/// A scatter in progress; `.await` it.
#[must_use = "a scatter is sent only when awaited"]
pub struct Scatter<T, R> {
    bus: Bus,
    target: Target,
    env: Envelope<T>,
    strategy: Strategy,
    deadline: Duration,
    _r: PhantomData<fn() -> R>,
}

impl<T, R> std::fmt::Debug for Scatter<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scatter").field("target", &self.target).field("strategy", &self.strategy).finish()
    }
}

impl<T: Payload + Clone, R: Payload + std::fmt::Debug> Scatter<T, R> {
    /// The gather strategy (default: all).
    pub fn gather(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }
    /// How long to wait for replies (default 5 s).
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    async fn run(self) -> Result<Gathered<R>, GatherError<R>> {
        let until = Instant::now() + self.deadline;
        let router = self.bus.replies().await.map_err(Error::from)?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut guards = Vec::new();
        let mut out = Gathered { replies: Vec::new(), faults: Vec::new(), missing: Vec::new(), complete: false };
        let mut expected: Vec<String> = Vec::new();
        match &self.target {
            Target::Queues(queues) => {
                for q in queues {
                    // One message per recipient, each with its own id so replies name their sender.
                    let mut env = self.env.clone();
                    env.meta.id = crate::envelope::new_message_id();
                    env.meta.correlation_id =
                        Some(self.env.correlation_id.clone().unwrap_or_else(|| self.env.id.clone()));
                    guards.push(router.register(&env.id, q, tx.clone()));
                    match self.bus.publish_request("", q, env, router.address(), self.deadline).await? {
                        Published::Confirmed => expected.push(q.clone()),
                        Published::Unroutable => out
                            .faults
                            .push((q.clone(), Fault { kind: "no-route".into(), message: format!("no route to {q}") })),
                    }
                }
            }
            Target::Topic(topic) => {
                if matches!(self.strategy, Strategy::All | Strategy::Quorum(_)) {
                    return Err(GatherError::InvalidStrategy);
                }
                self.bus.ensure_events_exchange().await?;
                guards.push(router.register(&self.env.id, topic, tx.clone()));
                let exchange = self.bus.config().events_exchange.clone();
                self.bus.publish_request(&exchange, topic, self.env.clone(), router.address(), self.deadline).await?;
            }
        }
        drop(tx);
        let mut answered: Vec<String> = Vec::new();
        let satisfied = |o: &Gathered<R>, answered: &Vec<String>| match self.strategy {
            Strategy::All => expected.iter().all(|e| answered.contains(e)),
            Strategy::FirstN(n) | Strategy::Quorum(n) => o.replies.len() >= n,
            Strategy::UntilDeadline => false,
        };
        if !matches!(self.strategy, Strategy::UntilDeadline) && satisfied(&out, &answered) {
            out.complete = true;
        }
        while !out.complete {
            let Ok(Some(reply)) = tokio::time::timeout_at(until, rx.recv()).await else { break };
            let who = reply.recipient.clone();
            answered.push(who.clone());
            match decode_reply::<R>(reply) {
                Ok(r) => out.replies.push((who, r)),
                Err(ReplyError::Fault(f)) => out.faults.push((who, f)),
                Err(ReplyError::Codec(c)) => out.faults.push((who, Fault { kind: "decode".into(), message: c })),
            }
            if satisfied(&out, &answered) {
                out.complete = true;
            }
        }
        if matches!(self.strategy, Strategy::UntilDeadline) {
            out.complete = true;
        }
        out.missing = expected.into_iter().filter(|e| !answered.contains(e)).collect();
        if let Strategy::Quorum(k) = self.strategy {
            if out.replies.len() < k {
                return Err(GatherError::QuorumNotMet(out));
            }
        }
        Ok(out)
    }
}

impl<T: Payload + Clone, R: Payload + std::fmt::Debug> IntoFuture for Scatter<T, R> {
    type Output = Result<Gathered<R>, GatherError<R>>;
    type IntoFuture = BoxFuture<'static, Self::Output>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
