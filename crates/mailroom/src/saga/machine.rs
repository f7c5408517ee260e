//! Event-driven sagas: a typed state machine per correlation key, moved by events and replies,
//! persisted in any [`SagaStore`] (PostgreSQL, the embedded store).
//!
//! A [`StateMachine`] names its state and event types (serde types). Events sent to the saga's
//! queue (`saga.<name>.events`, [`MachineHandle::send`]) are keyed by [`StateMachine::key`]; the first
//! event for a key may start an instance ([`StateMachine::start`]). Each event runs
//! [`StateMachine::on_event`], which returns the next state and records on the [`Transition`] the
//! commands to send, requests whose replies come back as events, timers to schedule or cancel, and
//! whether the saga is over.
//!
//! - **Atomic transitions.** The new state, its commands and timers (outbox rows), the id of the
//!   message that caused it and a history line are written in one versioned store write (`UPDATE ..
//!   WHERE version = $v` in PostgreSQL, a check under the log's lock in the embedded store). A version
//!   conflict reloads the instance and runs the event again. Messages for one key are handled one at a
//!   time in a process.
//! - **Each message changes the state once.** The ids of the messages an instance has handled are
//!   stored with it (the most recent [`SEEN_IDS`]), so an event redelivered after a crash between
//!   commit and ack is acknowledged without a second transition.
//! - **Commands leave at least once** through the store's outbox relay with ids fixed at commit, so a
//!   re-publish after a crash carries the same id and the service's inbox absorbs it.
//! - **Replies become events.** [`Transition::request`] sends a command with the saga's queue as its
//!   `reply_to`; the reply's JSON body becomes the event variant named by
//!   [`Request::on_reply`] (the event type is an externally tagged serde enum, serde's default), a
//!   fault the variant named by [`Request::on_fault`]. A reply for a command the instance no longer
//!   awaits (duplicate, late) is ignored; a fault with no `on_fault` variant fails the saga.
//! - **Timers are delayed messages.** [`Transition::schedule`] publishes the event (through the
//!   outbox) to a TTL queue `saga.<name>.timer.<ms>` that dead-letters into the saga's queue when it
//!   expires, so they work on every broker. A timer is named; scheduling the name again or
//!   [`Transition::cancel`] supersedes it, and a superseded timer's message is ignored when it fires.
//! - **Completion without polling.** [`MachineHandle::wait`] returns when this orchestrator commits a
//!   final transition for the key (or at once if the instance is already over): the handle is woken
//!   by each commit, never by a timer. An instance finished by another process is seen by the next
//!   `wait` call.
//!
//! The instance's row (see [`SagaRow`]) keeps the machine's state and bookkeeping as JSON in `data`;
//! `step` counts transitions; `status` is `Running`, then `Done` or `Failed`; operators' tools
//! (`mailroom saga list|show|history`) read them like orchestrated sagas.

use super::store::{NewSaga, Outgoing, SagaRow, SagaStore, State};
use super::{SagaError, Status, SAGA_HEADER};
use crate::bus::{Bus, Context};
use crate::envelope::{headers, Envelope, MessageKind, Payload, Raw};
use crate::error::HandlerError;
use crate::pipeline::WorkerHandle;
use crate::retry::RetryPolicy;
use crate::transport::{BoxFuture, Declaration};
use crate::wire::{AMQPValue, FieldTable, LongString, ShortString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Header carrying a timer's name on its message.
pub const TIMER_HEADER: &str = "x-mailroom-saga-timer";
/// How many handled message ids an instance remembers to absorb redeliveries.
pub const SEEN_IDS: usize = 256;
/// How many version conflicts in a row one message tolerates.
const MAX_CONFLICTS: usize = 20;

/// A saga as a state machine: its state and event types, how events are keyed and what each does.
pub trait StateMachine: Send + Sync + 'static {
    /// The state kept per key (versioned in the store).
    type State: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// The events (and replies, and timers) that move it; an externally tagged serde enum when
    /// replies are mapped onto its variants.
    type Event: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The saga's name: stable, it names its queues and stored instances.
    fn name(&self) -> &str;

    /// The correlation key of an event sent from outside (replies and timers carry their instance's).
    fn key(&self, event: &Self::Event) -> String;

    /// The state a new instance starts in, if `event` starts one; `None`: the event is ignored when
    /// no instance exists for its key.
    fn start(&self, event: &Self::Event) -> Option<Self::State>;

    /// Handles one event: the next state (often `state` changed), with commands, timers and the end
    /// of the saga recorded on `t`. An error is retried (a permanent one dead-letters the event);
    /// nothing of the transition is written.
    fn on_event(
        &self,
        state: Self::State,
        event: Self::Event,
        t: &mut Transition<Self::Event>,
    ) -> Result<Self::State, HandlerError>;
}

/// What a transition sends, schedules and decides, recorded by [`StateMachine::on_event`].
#[derive(Debug)]
pub struct Transition<E> {
    saga: String,
    sends: Vec<Planned>,
    timers: Vec<(String, Option<(Duration, E)>)>,
    end: Option<(Status, Option<String>)>,
    error: Option<String>,
}

#[derive(Debug)]
struct Planned {
    queue: String,
    type_name: String,
    body: Result<bytes::Bytes, String>,
    expect: Option<Expect>,
}

/// What a request's reply or fault becomes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Expect {
    queue: String,
    reply: Option<String>,
    fault: Option<String>,
}

/// A request being recorded: name the event variants its reply and fault become.
#[derive(Debug)]
pub struct Request<'a> {
    expect: &'a mut Expect,
}

impl Request<'_> {
    /// The event variant the reply's body becomes (`{"<variant>": <reply body>}`).
    pub fn on_reply(self, variant: &str) -> Self {
        self.expect.reply = Some(variant.to_owned());
        self
    }
    /// The event variant a fault reply becomes (its body is a [`Fault`](crate::Fault)).
    pub fn on_fault(self, variant: &str) -> Self {
        self.expect.fault = Some(variant.to_owned());
        self
    }
}

impl<E: Serialize> Transition<E> {
    fn new(saga: &str) -> Self {
        Transition { saga: saga.to_owned(), sends: Vec::new(), timers: Vec::new(), end: None, error: None }
    }

    fn plan<C: Payload>(&mut self, queue: &str, cmd: C, expect: Option<Expect>) -> &mut Planned {
        let env = Envelope::command(cmd);
        self.sends.push(Planned {
            queue: queue.to_owned(),
            type_name: env.meta.type_name.clone(),
            body: env.body.encode(),
            expect,
        });
        self.sends.last_mut().expect("just pushed")
    }

    /// Sends a command to `queue` once the transition commits; no reply is awaited.
    pub fn send<C: Payload>(&mut self, queue: &str, cmd: C) {
        self.plan(queue, cmd, None);
    }

    /// Sends a command to a responder on `queue`; its reply comes back to this instance as the event
    /// named with [`Request::on_reply`].
    #[must_use = "name the event its reply becomes with .on_reply()"]
    pub fn request<C: Payload>(&mut self, queue: &str, cmd: C) -> Request<'_> {
        let expect = Expect { queue: queue.to_owned(), reply: None, fault: None };
        let planned = self.plan(queue, cmd, Some(expect));
        Request { expect: planned.expect.as_mut().expect("just set") }
    }

    /// Delivers `event` to this instance after `after` (a timer named `name`; scheduling a name
    /// again replaces its timer).
    pub fn schedule(&mut self, name: &str, after: Duration, event: E) {
        self.timers.push((name.to_owned(), Some((after, event))));
    }

    /// Cancels timer `name`: if it fires anyway, it is ignored.
    pub fn cancel(&mut self, name: &str) {
        self.timers.push((name.to_owned(), None));
    }

    /// Ends the saga successfully (`Done`); later events for the key are ignored.
    pub fn complete(&mut self) {
        self.end = Some((Status::Done, None));
    }

    /// Ends the saga as failed (`Failed`, with `reason`); later events for the key are ignored.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.end = Some((Status::Failed, Some(reason.into())));
    }

    /// Records an error on the instance without ending it (shown by operators' tools).
    pub fn note_error(&mut self, error: impl Into<String>) {
        self.error = Some(error.into());
    }

    /// The saga's name.
    pub fn saga(&self) -> &str {
        &self.saga
    }
}

/// The stored form of an instance: the machine's state plus the bookkeeping that makes each message
/// count once (`data` of its [`SagaRow`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored<S> {
    key: String,
    state: S,
    /// Commands whose replies are awaited, by command id.
    #[serde(default)]
    awaiting: BTreeMap<String, Expect>,
    /// Live timers: name -> the id of the message that fires it.
    #[serde(default)]
    timers: BTreeMap<String, String>,
    /// Ids of the messages already handled (most recent last).
    #[serde(default)]
    seen: VecDeque<String>,
}

/// A finished instance, as [`MachineHandle::wait`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished<S> {
    /// `Done` or `Failed` (or `Abandoned` by an operator).
    pub status: Status,
    /// The final state.
    pub state: S,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// One instance as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance<S> {
    /// The correlation key.
    pub key: String,
    /// The state.
    pub state: S,
    /// `Running`, `Done` or `Failed`.
    pub status: Status,
    /// Bumped by every transition.
    pub version: i64,
    /// The last error.
    pub error: Option<String>,
    /// Ids of commands whose replies are awaited.
    pub awaiting: Vec<String>,
    /// Names of live timers.
    pub timers: Vec<String>,
}

/// A committed transition, as the [`Machine::on_transition`] hook sees it.
#[derive(Debug, Clone)]
pub struct Transitioned {
    /// The instance's key.
    pub key: String,
    /// Its version after the transition.
    pub version: i64,
    /// Its status after the transition.
    pub status: Status,
    /// The history line written.
    pub event: String,
}

/// Runs after a transition commits, before the message that caused it is acknowledged and before the
/// next message for the same key is handled in this process.
pub type TransitionHook = Arc<dyn Fn(Transitioned) -> BoxFuture<'static, ()> + Send + Sync>;

/// An event-driven saga ready to run on a bus and a store.
#[must_use = "a saga does nothing until .run_on() is awaited"]
pub struct Machine<M: StateMachine> {
    machine: M,
    concurrency: usize,
    hook: Option<TransitionHook>,
}

impl<M: StateMachine> std::fmt::Debug for Machine<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("name", &self.machine.name()).finish()
    }
}

/// The queue a machine named `name` consumes events, replies and timers from.
pub fn events_queue(name: &str) -> String {
    format!("saga.{name}.events")
}

fn timer_queue(name: &str, after: Duration) -> String {
    format!("saga.{name}.timer.{}", after.as_millis())
}

fn row_id(name: &str, key: &str) -> String {
    format!("{name}:{key}")
}

impl<M: StateMachine> Machine<M> {
    /// The saga defined by `machine`.
    pub fn new(machine: M) -> Machine<M> {
        Machine { machine, concurrency: 8, hook: None }
    }

    /// How many messages are handled at once (default 8). One key's messages are always handled one
    /// at a time, but with more than one at once not necessarily in queue order: use 1 when a key's
    /// events must be applied in the order they were sent.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// A hook run after each committed transition, before the message that caused it is acked and
    /// before the key's next message (for audit logs, and for tests that crash the orchestrator
    /// exactly there).
    pub fn on_transition<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Transitioned) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.hook = Some(Arc::new(move |t| Box::pin(hook(t))));
        self
    }

    /// Prepares the store and starts consuming `saga.<name>.events`. Commands and timers go through
    /// the store's outbox: run its relay too.
    pub async fn run_on(self, bus: Bus, store: impl SagaStore) -> Result<MachineHandle<M>, SagaError> {
        store.prepare().await?;
        let name = self.machine.name().to_owned();
        let (changed, _) = tokio::sync::watch::channel(0u64);
        let core = Arc::new(Core {
            machine: self.machine,
            name: name.clone(),
            store: Arc::new(store),
            bus: bus.clone(),
            locks: Mutex::default(),
            hook: self.hook,
            changed,
        });
        let c = Arc::clone(&core);
        let worker = bus
            .worker(&events_queue(&name))
            .concurrency(self.concurrency)
            .retry(RetryPolicy::new().immediate(5))
            .handle(move |msg: Envelope<Raw>, ctx: Context| {
                let c = Arc::clone(&c);
                async move {
                    c.handle(msg, &ctx).await.map_err(|e| match e {
                        SagaError::Data(_) => HandlerError::permanent(e).with_kind("saga-data"),
                        e => HandlerError::transient(e),
                    })
                }
            })
            .run()
            .await?;
        Ok(MachineHandle { core, worker: Some(worker) })
    }
}

struct Core<M: StateMachine> {
    machine: M,
    name: String,
    store: Arc<dyn SagaStore>,
    bus: Bus,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    hook: Option<TransitionHook>,
    /// Bumped after every committed final transition: wakes [`MachineHandle::wait`].
    changed: tokio::sync::watch::Sender<u64>,
}

/// What an incoming message is, once classified.
enum Input<E> {
    /// An event (from outside, or a timer) to run through the machine.
    Event(E),
    /// A reply or fault to command `0`, whose body is `1`.
    Reply(String, serde_json::Value, bool),
}

fn data_err(e: impl std::fmt::Display) -> SagaError {
    SagaError::Data(e.to_string())
}

impl<M: StateMachine> Core<M> {
    /// Classifies `msg`, then runs it through the instance it belongs to, one at a time per key.
    async fn handle(&self, msg: Envelope<Raw>, ctx: &Context) -> Result<(), SagaError> {
        let meta = &msg.meta;
        let (id, input) = if meta.header(headers::RESPONDER).is_some() {
            // A reply: its correlation id is the instance's row id, its causation id the command's.
            let (Some(row), Some(cmd)) = (meta.correlation_id.clone(), meta.causation_id.clone()) else {
                tracing::warn!(saga = %self.name, id = %meta.id, "saga reply without correlation or causation id, ignored");
                return Ok(());
            };
            let body = serde_json::from_slice(&msg.body.0).unwrap_or(serde_json::Value::Null);
            (row, Input::Reply(cmd, body, meta.header(headers::FAULT).is_some()))
        } else if meta.header(TIMER_HEADER).is_some() {
            let Some(row) = meta.correlation_id.clone() else { return Ok(()) };
            (row, Input::Event(serde_json::from_slice(&msg.body.0).map_err(data_err)?))
        } else {
            let event: M::Event = serde_json::from_slice(&msg.body.0).map_err(data_err)?;
            (row_id(&self.name, &self.machine.key(&event)), Input::Event(event))
        };
        let lock = Arc::clone(self.locks.lock().unwrap().entry(id.clone()).or_default());
        let result = {
            let _one = lock.lock().await;
            let result = self.transition(&id, input, ctx).await;
            // Under the key's lock: nothing else happens to the instance in this process until it returns.
            if let (Ok(Some(t)), Some(hook)) = (&result, &self.hook) {
                hook(t.clone()).await;
            }
            result
        };
        {
            // Drop the per-key lock once nobody holds it (the map would grow with every key).
            let mut locks = self.locks.lock().unwrap();
            if Arc::strong_count(&lock) == 2 {
                locks.remove(&id);
            }
        }
        result.map(|_| ())
    }

    /// Runs `input` against instance `id` (creating it if the event starts one), retrying version
    /// conflicts. `Some` when a transition committed.
    async fn transition(
        &self,
        id: &str,
        input: Input<M::Event>,
        ctx: &Context,
    ) -> Result<Option<Transitioned>, SagaError> {
        let msg_id = ctx.meta().id.clone();
        let mut input = Some(input);
        for _ in 0..MAX_CONFLICTS {
            let row = self.store.load(id).await?;
            let (mut stored, version, status) = match &row {
                Some(r) => (self.stored(r)?, r.version, r.status),
                None => {
                    let Some(Input::Event(event)) = &input else {
                        tracing::debug!(saga = %self.name, instance = id, "reply for no instance, ignored");
                        return Ok(None);
                    };
                    let Some(state) = self.machine.start(event) else {
                        tracing::debug!(saga = %self.name, instance = id, "event starts no instance, ignored");
                        return Ok(None);
                    };
                    let key = id.strip_prefix(&format!("{}:", self.name)).unwrap_or(id).to_owned();
                    let stored = Stored {
                        key,
                        state,
                        awaiting: BTreeMap::new(),
                        timers: BTreeMap::new(),
                        seen: VecDeque::new(),
                    };
                    (stored, -1, Status::Running)
                }
            };
            if stored.seen.contains(&msg_id) {
                tracing::debug!(saga = %self.name, instance = id, message = %msg_id, "message already handled, ignored");
                return Ok(None);
            }
            if status.is_final() || status == Status::Stuck {
                tracing::debug!(saga = %self.name, instance = id, %status, "instance is over, message ignored");
                return Ok(None);
            }
            // What the message means for this instance.
            let current = input.take().expect("put back after every conflict");
            let (event, label, end_by_fault) = match &current {
                Input::Event(e) => {
                    // Each attempt needs its own copy: the machine consumes the event.
                    let value = serde_json::to_value(e).map_err(data_err)?;
                    let label = variant(&value);
                    if let Some(name) = ctx.meta().header(TIMER_HEADER) {
                        if stored.timers.get(name) != Some(&msg_id) {
                            tracing::debug!(saga = %self.name, instance = id, timer = name, "superseded timer, ignored");
                            return Ok(None);
                        }
                        stored.timers.remove(name);
                    }
                    (Some(serde_json::from_value(value).map_err(data_err)?), label, None)
                }
                Input::Reply(cmd, body, fault) => {
                    let Some(expect) = stored.awaiting.remove(cmd) else {
                        tracing::debug!(saga = %self.name, instance = id, command = %cmd, "reply for a command no longer awaited, ignored");
                        return Ok(None);
                    };
                    match (if *fault { &expect.fault } else { &expect.reply }, fault) {
                        (Some(variant), _) => {
                            let value = serde_json::json!({ variant.as_str(): body });
                            (Some(serde_json::from_value(value).map_err(data_err)?), variant.clone(), None)
                        }
                        (None, true) => (None, "fault".to_owned(), Some(format!("{} faulted: {body}", expect.queue))),
                        (None, false) => (None, format!("reply from {}", expect.queue), None),
                    }
                }
            };
            let mut t = Transition::new(&self.name);
            if let Some(event) = event {
                stored.state = self.machine.on_event(stored.state, event, &mut t).map_err(|e| {
                    if e.permanent {
                        SagaError::Data(format!("{label}: {e}"))
                    } else {
                        SagaError::Handler(format!("{label}: {e}"))
                    }
                })?;
            }
            if let Some(why) = end_by_fault {
                t.fail(why);
            }
            stored.seen.push_back(msg_id.clone());
            while stored.seen.len() > SEEN_IDS {
                stored.seen.pop_front();
            }
            let (state, line) = self.state(id, &mut stored, t, &label, version + 1, ctx).await?;
            let status = state.status;
            let committed = if version < 0 {
                let new = NewSaga { id: id.to_owned(), name: self.name.clone(), data: String::new(), state };
                match self.store.insert(new).await {
                    Ok(()) => true,
                    // Another orchestrator created it meanwhile: run the message against theirs.
                    Err(e) if self.store.load(id).await?.is_some() => {
                        tracing::debug!(saga = %self.name, instance = id, error = %e, "instance created concurrently, retrying");
                        false
                    }
                    Err(e) => return Err(e),
                }
            } else {
                self.store.apply(id, version, state).await?
            };
            if !committed {
                input = Some(current);
                continue;
            }
            if status.is_final() {
                self.changed.send_modify(|n| *n += 1);
            }
            return Ok(Some(Transitioned { key: stored.key, version: version + 1, status, event: line }));
        }
        Err(SagaError::Conflict(id.to_owned()))
    }

    /// The stored form of a transition: commands and timers become outbox messages with fixed ids.
    async fn state(
        &self,
        id: &str,
        stored: &mut Stored<M::State>,
        t: Transition<M::Event>,
        label: &str,
        step: i64,
        ctx: &Context,
    ) -> Result<(State, String), SagaError> {
        let mut send = Vec::new();
        let mut line = vec![label.to_owned()];
        for p in t.sends {
            let body = p.body.map_err(|e| SagaError::Data(format!("command for {}: {e}", p.queue)))?;
            let mut env = ctx.derive(Envelope::new(MessageKind::Command, Raw(body)));
            env.meta.type_name = p.type_name;
            env.meta.correlation_id = Some(id.to_owned());
            env.meta.content_type = Some("application/json".into());
            env.meta.headers.insert(SAGA_HEADER.into(), self.name.clone());
            if let Some(expect) = p.expect {
                env.meta.reply_to = Some(events_queue(&self.name));
                stored.awaiting.insert(env.meta.id.clone(), expect);
                line.push(format!("requested {}", p.queue));
            } else {
                line.push(format!("sent {}", p.queue));
            }
            send.push(Outgoing { queue: p.queue, meta: env.meta, body: env.body.0.to_vec() });
        }
        for (name, timer) in t.timers {
            stored.timers.remove(&name);
            let Some((after, event)) = timer else {
                line.push(format!("cancelled timer {name}"));
                continue;
            };
            let queue = timer_queue(&self.name, after);
            self.declare_timer_queue(&queue).await?;
            let body = serde_json::to_vec(&event).map_err(data_err)?;
            let mut env = ctx.derive(Envelope::new(MessageKind::Event, Raw(body.into())));
            env.meta.type_name = variant(&serde_json::to_value(&event).map_err(data_err)?);
            env.meta.correlation_id = Some(id.to_owned());
            env.meta.content_type = Some("application/json".into());
            env.meta.headers.insert(SAGA_HEADER.into(), self.name.clone());
            env.meta.headers.insert(TIMER_HEADER.into(), name.clone());
            stored.timers.insert(name.clone(), env.meta.id.clone());
            line.push(format!("timer {name} in {after:?}"));
            send.push(Outgoing { queue, meta: env.meta, body: env.body.0.to_vec() });
        }
        let (status, error) = match t.end {
            Some((status, error)) => {
                line.push(status.as_str().to_lowercase());
                (status, error)
            }
            None => (Status::Running, t.error),
        };
        let data = serde_json::to_string(stored).map_err(data_err)?;
        let line = line.join("; ");
        let state = State {
            data: Some(data),
            step: step.min(i32::MAX as i64) as i32,
            status,
            pending: None,
            attempts: 0,
            deadline: None,
            error,
            send,
            event: line.clone(),
        };
        Ok((state, line))
    }

    /// A TTL queue whose expired messages dead-letter into the saga's queue (declared before the
    /// transition that needs it commits, so the relay's mandatory publish always routes).
    async fn declare_timer_queue(&self, queue: &str) -> Result<(), SagaError> {
        let ms = queue.rsplit('.').next().and_then(|m| m.parse::<u32>().ok()).unwrap_or(0);
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongUInt(ms));
        args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(LongString::from("")));
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(LongString::from(events_queue(&self.name).as_str())),
        );
        self.bus.declare(Declaration::Queue { name: queue.to_owned(), durable: true, arguments: args }).await?;
        Ok(())
    }

    fn stored(&self, row: &SagaRow) -> Result<Stored<M::State>, SagaError> {
        serde_json::from_str(&row.data).map_err(data_err)
    }

    fn instance(&self, row: &SagaRow) -> Result<Instance<M::State>, SagaError> {
        let s = self.stored(row)?;
        Ok(Instance {
            key: s.key,
            state: s.state,
            status: row.status,
            version: row.version,
            error: row.error.clone(),
            awaiting: s.awaiting.into_keys().collect(),
            timers: s.timers.into_keys().collect(),
        })
    }
}

/// The variant name of an externally tagged enum value (`{"Paid": ..}` or `"Paid"`), for history lines.
fn variant(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(m) if m.len() == 1 => m.keys().next().cloned().unwrap_or_default(),
        _ => "event".to_owned(),
    }
}

/// A running event-driven saga: sends it events, reads instances, awaits their end.
pub struct MachineHandle<M: StateMachine> {
    core: Arc<Core<M>>,
    worker: Option<WorkerHandle>,
}

impl<M: StateMachine> std::fmt::Debug for MachineHandle<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineHandle").field("saga", &self.core.name).finish()
    }
}

impl<M: StateMachine> MachineHandle<M> {
    /// Sends `event` to the saga's queue (any process may; this is [`Bus::send`] to [`events_queue`]).
    pub async fn send(&self, event: M::Event) -> Result<String, SagaError> {
        Ok(self.core.bus.send(&events_queue(&self.core.name), event).await?)
    }

    /// The instance for `key`, if there is one.
    pub async fn get(&self, key: &str) -> Result<Option<Instance<M::State>>, SagaError> {
        match self.core.store.load(&row_id(&self.core.name, key)).await? {
            Some(row) => Ok(Some(self.core.instance(&row)?)),
            None => Ok(None),
        }
    }

    /// Waits until the instance for `key` is over (`Done`, `Failed`, `Abandoned`). Woken by this
    /// orchestrator's commits, not by polling; bound it with `tokio::time::timeout`.
    pub async fn wait(&self, key: &str) -> Result<Finished<M::State>, SagaError> {
        let id = row_id(&self.core.name, key);
        let mut changed = self.core.changed.subscribe();
        loop {
            // Marked seen before the load: a commit after it wakes the `changed()` below.
            changed.borrow_and_update();
            if let Some(row) = self.core.store.load(&id).await? {
                if row.status.is_final() {
                    let stored = self.core.stored(&row)?;
                    return Ok(Finished { status: row.status, state: stored.state, error: row.error });
                }
            }
            if changed.changed().await.is_err() {
                return Err(SagaError::Store("the orchestrator stopped".into()));
            }
        }
    }

    /// The store this saga runs on (for operators' [`ops`](super::ops)).
    pub fn store(&self) -> &dyn SagaStore {
        &*self.core.store
    }

    /// Stops consuming (messages in flight finish first; instances resume in the next orchestrator).
    pub async fn stop(mut self) {
        if let Some(w) = self.worker.take() {
            w.stop().await;
        }
    }

    /// Kills the orchestrator as a crash would: messages in flight are dropped unacknowledged.
    pub fn abort(mut self) {
        if let Some(w) = self.worker.take() {
            w.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::variant;
    use serde_json::json;

    #[test]
    fn variant_names_of_externally_tagged_values() {
        assert_eq!(variant(&json!({"Paid": {"id": 1}})), "Paid");
        assert_eq!(variant(&json!("TimedOut")), "TimedOut");
        assert_eq!(variant(&json!([1, 2])), "event");
    }
}
