//! Sagas, persisted in a [`SagaStore`]: PostgreSQL ([`PgSagaStore`], commands through the
//! PostgreSQL [`outbox`](crate::outbox)), SQLite (`SqliteSagaStore`, feature `sqlite`, commands
//! through the SQLite outbox) or the embedded store ([`EmbeddedSagaStore`], one fsynced log file in
//! a directory, with its own outbox relay). Two forms: event-driven state machines ([`machine`]) and,
//! below, orchestrated sagas with compensations.
//!
//! A saga is an ordered list of steps; each step is a command sent to a queue whose reply (from a
//! [`responder`](crate::Bus::responder)) is awaited, with an optional compensating command. The
//! store keeps one row per instance (`data`, `step`, `status`, `version`, the id of the command
//! awaiting its reply, a deadline) and an append-only history.
//!
//! - Every transition is atomic in the store: the new state with a version check (`UPDATE .. WHERE
//!   version = $v` in PostgreSQL, a check under the log's lock in the embedded store), the outgoing
//!   commands as outbox rows and a history row. A version conflict means another transition won
//!   (another reply, the deadline scanner, another orchestrator process, an operator): the instance
//!   is reloaded and the event re-evaluated.
//! - Messages for one instance are processed one at a time in a process (a keyed lock).
//! - The intent to compensate a step is recorded before it is sent: the row says "step k sent"
//!   before the command leaves, so a step that timed out is compensated too (it may have succeeded);
//!   compensation handlers must accept "nothing to undo". A step that answered with a fault did not
//!   take effect and is not compensated.
//! - Replies match the command through their causation id (the responder sets it to the command's
//!   id); a reply for a command the instance no longer waits for (late, duplicate) is ignored.
//!   [`Saga::on_reply`] folds a step's reply into the saga data in the same transition.
//! - Deadlines: a step not answered by its deadline is re-sent with the **same** message id (this is
//!   also how instances resume after the orchestrator crashed) up to `step_attempts` times, then the
//!   saga compensates. Compensations that fault or time out are retried with exponential backoff; a
//!   compensation failing `compensation_attempts` times leaves the saga `Stuck`: logged at error
//!   level, listed by [`SagaHandle::list`], retried or abandoned by an operator
//!   ([`SagaHandle::retry`], [`SagaHandle::abandon`], or [`ops`] on the store, as the `mailroom saga`
//!   command does; the orchestrator's deadline scan picks a retry up). Never silently dropped.
//!
//! Statuses: `Running`, `Compensating`, `Done` (all steps succeeded), `Failed` (compensated),
//! `Stuck`, `Abandoned`.

pub mod embedded;
pub mod machine;
pub mod ops;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod store;

pub use embedded::{EmbeddedRelay, EmbeddedRelayHandle, EmbeddedSagaStore};
pub use machine::{Finished, Instance, Machine, MachineHandle, StateMachine, Transition};
#[cfg(feature = "postgres")]
pub use postgres::{migrate, PgSagaStore};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteSagaStore;
pub use store::{HistoryEntry, ListFilter, SagaRow, SagaStore};

use crate::bus::Bus;
use crate::envelope::headers;
use crate::envelope::{Envelope, MessageKind, Metadata, Raw};
use crate::error::HandlerError;
#[cfg(feature = "postgres")]
use crate::outbox::{Outbox, OutboxError};
use crate::pipeline::WorkerHandle;
use crate::retry::RetryPolicy;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{NewSaga, Outgoing, State};

/// Header naming the saga a command belongs to.
pub const SAGA_HEADER: &str = "x-mailroom-saga";
/// Header naming the step (and `:compensate` for a compensation).
pub const STEP_HEADER: &str = "x-mailroom-saga-step";

/// Saga errors.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// PostgreSQL failed.
    #[cfg(feature = "postgres")]
    #[error("saga database: {0}")]
    Db(#[from] sqlx::Error),
    /// The outbox failed.
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The embedded store failed (I/O, a damaged log).
    #[error("saga store: {0}")]
    Store(String),
    /// A transition would send a command through a store opened without an outbox (operators' tools).
    #[error("this saga store has no outbox to send commands through")]
    NoOutbox,
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] crate::Error),
    /// Saga data could not be (de)serialized.
    #[error("saga data: {0}")]
    Data(String),
    /// No such saga instance.
    #[error("no saga {0}")]
    NotFound(String),
    /// The operation does not apply in the instance's status.
    #[error("saga {0} is {1}, not Stuck")]
    NotStuck(String, Status),
    /// A state machine's handler failed transiently (the event is retried).
    #[error("saga handler: {0}")]
    Handler(String),
    /// Too many version conflicts in a row.
    #[error("saga {0}: version conflicts kept happening")]
    Conflict(String),
}

/// A saga instance's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Executing steps.
    Running,
    /// Undoing completed steps in reverse order.
    Compensating,
    /// Every step succeeded.
    Done,
    /// A step failed and every completed step was compensated.
    Failed,
    /// A compensation kept failing: needs an operator.
    Stuck,
    /// An operator gave up on a stuck saga.
    Abandoned,
}

impl Status {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "Running",
            Status::Compensating => "Compensating",
            Status::Done => "Done",
            Status::Failed => "Failed",
            Status::Stuck => "Stuck",
            Status::Abandoned => "Abandoned",
        }
    }
    /// Parses the stored text (anything unknown reads as `Abandoned`: nothing more is done with it).
    pub fn parse(s: &str) -> Status {
        match s {
            "Running" => Status::Running,
            "Compensating" => Status::Compensating,
            "Done" => Status::Done,
            "Failed" => Status::Failed,
            "Stuck" => Status::Stuck,
            _ => Status::Abandoned,
        }
    }
    /// Whether the saga is over (nothing more will happen without an operator).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Abandoned)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command a step sends: a queue and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The queue of the service that carries it out (a responder).
    pub queue: String,
    /// The body.
    pub body: serde_json::Value,
    /// Why the body could not be serialised, if it could not: the saga then refuses to send the
    /// command (the transition fails with [`SagaError::Data`]) rather than send a `null` body.
    encode_error: Option<String>,
}

impl Command {
    /// A command for `queue`. A body that does not serialise is never sent as `null`: sending this
    /// command fails with [`SagaError::Data`] (use [`Command::try_new`] to see the error here).
    pub fn new(queue: impl Into<String>, body: impl Serialize) -> Command {
        match serde_json::to_value(body) {
            Ok(body) => Command { queue: queue.into(), body, encode_error: None },
            Err(e) => Command { queue: queue.into(), body: serde_json::Value::Null, encode_error: Some(e.to_string()) },
        }
    }

    /// A command for `queue`, or the serialisation error of its body.
    pub fn try_new(queue: impl Into<String>, body: impl Serialize) -> Result<Command, serde_json::Error> {
        Ok(Command { queue: queue.into(), body: serde_json::to_value(body)?, encode_error: None })
    }

    /// The body as it goes on the wire, or why it cannot.
    fn encoded(&self) -> Result<Vec<u8>, SagaError> {
        if let Some(e) = &self.encode_error {
            return Err(SagaError::Data(format!("command for {}: body does not serialise: {e}", self.queue)));
        }
        serde_json::to_vec(&self.body).map_err(|e| SagaError::Data(e.to_string()))
    }
}

/// Builds a step's command (or compensation) from the saga data.
pub type CommandFn<S> = fn(&S) -> Command;

/// Folds a step's reply into the saga data (e.g. keep the payment id its refund needs).
pub type ReplyFn<S> = fn(&mut S, serde_json::Value);

/// A step's command (or compensation) builder: a fn pointer or a closure (capturing queue names,
/// configuration). It must be deterministic: it runs again when a step is re-sent.
type BuildCommand<S> = Arc<dyn Fn(&S) -> Command + Send + Sync>;
/// Folds a reply into the data, or says why it cannot.
type FoldReply<S> = Arc<dyn Fn(&mut S, &[u8]) -> Result<(), String> + Send + Sync>;

struct Step<S> {
    name: String,
    command: BuildCommand<S>,
    compensation: Option<BuildCommand<S>>,
    on_reply: Option<FoldReply<S>>,
}

/// A saga definition.
#[must_use = "a saga definition does nothing until it runs"]
pub struct Saga<S> {
    name: String,
    steps: Vec<Step<S>>,
    step_timeout: Duration,
    step_attempts: i32,
    compensation_attempts: i32,
    backoff: (Duration, u32, Duration),
    tick: Duration,
    _s: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for Saga<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga").field("name", &self.name).field("steps", &self.steps.len()).finish()
    }
}

/// One stored instance.
#[derive(Debug, Clone)]
pub struct SagaRecord<S> {
    /// The instance id (the correlation id of all its commands).
    pub id: String,
    /// The saga's name.
    pub name: String,
    /// Its data.
    pub data: S,
    /// The step being executed or compensated.
    pub step: i32,
    /// The status.
    pub status: Status,
    /// Bumped by every transition.
    pub version: i64,
    /// Failed attempts of the current step or compensation.
    pub attempts: i32,
    /// The last error.
    pub error: Option<String>,
}

/// A transition: the new row values, commands to send, a history line.
struct Change {
    /// New saga data (serialized), when a reply changed it.
    data: Option<String>,
    step: i32,
    status: Status,
    pending: Option<String>,
    attempts: i32,
    deadline: Option<Duration>,
    error: Option<String>,
    send: Vec<(Command, String, String)>, // command, message id, step label
    event: String,
}

impl<S: Serialize + DeserializeOwned + Send + Sync + 'static> Saga<S> {
    /// A saga named `name` (also its reply queue's name: `saga.<name>.replies`).
    pub fn named(name: &str) -> Saga<S> {
        Saga {
            name: name.to_owned(),
            steps: Vec::new(),
            step_timeout: Duration::from_secs(30),
            step_attempts: 3,
            compensation_attempts: 5,
            backoff: (Duration::from_millis(200), 2, Duration::from_secs(60)),
            tick: Duration::from_millis(500),
            _s: PhantomData,
        }
    }

    /// Adds a step: `command` is sent and its reply awaited; `compensation` undoes it.
    pub fn step(mut self, name: &str, command: CommandFn<S>, compensation: Option<CommandFn<S>>) -> Self {
        let compensation = compensation.map(|c| Arc::new(c) as BuildCommand<S>);
        self.steps.push(Step { name: name.to_owned(), command: Arc::new(command), compensation, on_reply: None });
        self
    }

    /// Adds a step whose command comes from a closure (it may capture queue names or settings); give
    /// it a compensation with [`Saga::compensate_with`].
    pub fn step_with(mut self, name: &str, command: impl Fn(&S) -> Command + Send + Sync + 'static) -> Self {
        self.steps.push(Step { name: name.to_owned(), command: Arc::new(command), compensation: None, on_reply: None });
        self
    }

    /// The compensation of the last added step, from a closure.
    pub fn compensate_with(mut self, compensation: impl Fn(&S) -> Command + Send + Sync + 'static) -> Self {
        if let Some(step) = self.steps.last_mut() {
            step.compensation = Some(Arc::new(compensation));
        }
        self
    }

    /// Folds the last added step's reply, decoded as `R`, into the data (in the same transaction
    /// that moves to the next step). A reply that does not decode as `R` is an error: the reply is
    /// dead-lettered and the step, unanswered, is re-sent at its deadline.
    pub fn on_reply_as<R: DeserializeOwned>(mut self, apply: impl Fn(&mut S, R) + Send + Sync + 'static) -> Self {
        if let Some(step) = self.steps.last_mut() {
            step.on_reply = Some(Arc::new(move |data: &mut S, body: &[u8]| {
                let reply: R = serde_json::from_slice(body)
                    .map_err(|e| format!("reply of {}: {e}", std::any::type_name::<R>()))?;
                apply(data, reply);
                Ok(())
            }));
        }
        self
    }

    /// Folds the last added step's (JSON) reply into the data, in the same transaction that moves
    /// to the next step, so later steps and compensations see it.
    pub fn on_reply(mut self, apply: ReplyFn<S>) -> Self {
        if let Some(step) = self.steps.last_mut() {
            step.on_reply = Some(Arc::new(move |data: &mut S, body: &[u8]| {
                apply(data, serde_json::from_slice(body).unwrap_or(serde_json::Value::Null));
                Ok(())
            }));
        }
        self
    }

    /// How long a step's (or compensation's) reply is awaited before it is re-sent (default 30 s).
    pub fn step_timeout(mut self, d: Duration) -> Self {
        self.step_timeout = d;
        self
    }

    /// How many times a step is sent (same id) before the saga compensates (default 3).
    pub fn step_attempts(mut self, n: i32) -> Self {
        self.step_attempts = n.max(1);
        self
    }

    /// Compensation retries: at most `attempts` failures, then `Stuck`; backoff `base * factor^n`
    /// capped at `cap` (defaults: 5, 200 ms, x2, 60 s).
    pub fn compensation_retry(mut self, attempts: i32, base: Duration, factor: u32, cap: Duration) -> Self {
        self.compensation_attempts = attempts.max(1);
        self.backoff = (base, factor.max(1), cap);
        self
    }

    /// How often deadlines are checked (default 500 ms).
    pub fn tick(mut self, d: Duration) -> Self {
        self.tick = d;
        self
    }

    /// The reply queue.
    pub fn reply_queue(&self) -> String {
        format!("saga.{}.replies", self.name)
    }

    /// On PostgreSQL: creates the saga tables, starts the reply consumer and the deadline scanner.
    /// Commands go through `outbox`: run its relay too.
    #[cfg(feature = "postgres")]
    pub async fn run(self, bus: Bus, outbox: Outbox) -> Result<SagaHandle<S>, SagaError> {
        self.run_on(bus, PgSagaStore::new(outbox)).await
    }

    /// On any store ([`EmbeddedSagaStore`], [`PgSagaStore`]): prepares it, starts the reply consumer
    /// and the deadline scanner. Commands go through the store's outbox: run its relay too.
    pub async fn run_on(self, bus: Bus, store: impl SagaStore) -> Result<SagaHandle<S>, SagaError> {
        store.prepare().await?;
        let orch = Arc::new(Orchestrator { saga: self, store: Arc::new(store), locks: Mutex::default() });
        let o = Arc::clone(&orch);
        let worker = bus
            .worker(&orch.saga.reply_queue())
            .retry(RetryPolicy::new().immediate(5))
            .handle(move |reply: Envelope<Raw>, _ctx| {
                let o = Arc::clone(&o);
                async move {
                    let Some(cmd_id) = reply.meta.causation_id.clone() else { return Ok(()) };
                    let fault = reply
                        .meta
                        .header(headers::FAULT)
                        .is_some()
                        .then(|| String::from_utf8_lossy(&reply.body.0).into_owned());
                    o.on_reply(&cmd_id, fault, &reply.body.0).await.map_err(HandlerError::transient)
                }
            })
            .run()
            .await?;
        let o = Arc::clone(&orch);
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(o.saga.tick);
            loop {
                every.tick().await;
                if let Err(e) = o.on_tick().await {
                    tracing::warn!(saga = %o.saga.name, error = %e, "saga deadline scan failed");
                }
            }
        });
        Ok(SagaHandle { orch, worker: Some(worker), ticker })
    }
}

struct Orchestrator<S> {
    saga: Saga<S>,
    store: Arc<dyn SagaStore>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

const MAX_CONFLICTS: usize = 20;

impl<S: Serialize + DeserializeOwned + Send + Sync + 'static> Orchestrator<S> {
    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(self.locks.lock().unwrap().entry(id.to_owned()).or_default())
    }

    fn backoff(&self, attempts: i32) -> Duration {
        let (base, factor, cap) = self.saga.backoff;
        let mut d = base;
        for _ in 1..attempts.max(1) {
            d = d.saturating_mul(factor);
        }
        d.min(cap)
    }

    fn data(&self, row: &SagaRow) -> Result<S, SagaError> {
        serde_json::from_str(&row.data).map_err(|e| SagaError::Data(e.to_string()))
    }

    /// Runs `f` holding instance `id`'s in-process lock, then forgets the lock if nobody waits.
    async fn one_at_a_time<T>(&self, id: &str, f: impl std::future::Future<Output = T>) -> T {
        let lock = self.lock_for(id);
        let result = {
            let _one_at_a_time = lock.lock().await;
            f.await
        };
        drop(lock);
        // Forget the instance's lock when nobody else holds or waits for it (the map stays small).
        let mut locks = self.locks.lock().unwrap();
        if locks.get(id).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(id);
        }
        result
    }

    /// Re-evaluates `decide` against the current row until its update wins the version check.
    async fn transition(
        &self,
        id: &str,
        decide: impl Fn(&Self, &SagaRow) -> Result<Option<Change>, SagaError>,
    ) -> Result<(), SagaError> {
        self.one_at_a_time(id, self.transition_locked(id, decide)).await
    }

    async fn transition_locked(
        &self,
        id: &str,
        decide: impl Fn(&Self, &SagaRow) -> Result<Option<Change>, SagaError>,
    ) -> Result<(), SagaError> {
        for _ in 0..MAX_CONFLICTS {
            let Some(row) = self.store.load(id).await? else { return Ok(()) };
            let Some(change) = decide(self, &row)? else { return Ok(()) };
            let stuck = change.status == Status::Stuck;
            let error = change.error.clone();
            if !self.store.apply(id, row.version, self.state(id, change)?).await? {
                tracing::debug!(saga = id, "saga version conflict, retrying");
                continue;
            }
            if stuck {
                tracing::error!(saga = id, name = %self.saga.name, error = ?error, "saga stuck: a compensation keeps failing; retry or abandon it");
            }
            return Ok(());
        }
        Err(SagaError::Conflict(id.to_owned()))
    }

    /// The stored form of a change: its commands become outbox messages with their ids fixed.
    fn state(&self, saga_id: &str, change: Change) -> Result<State, SagaError> {
        let send = change
            .send
            .iter()
            .map(|(cmd, msg_id, label)| self.outgoing(saga_id, cmd, msg_id, label))
            .collect::<Result<_, _>>()?;
        Ok(State {
            data: change.data,
            step: change.step,
            status: change.status,
            pending: change.pending,
            attempts: change.attempts,
            deadline: change.deadline,
            error: change.error,
            send,
            event: change.event,
        })
    }

    fn outgoing(&self, saga_id: &str, cmd: &Command, msg_id: &str, label: &str) -> Result<Outgoing, SagaError> {
        let mut meta = Metadata::new(MessageKind::Command, label);
        meta.id = msg_id.to_owned();
        meta.correlation_id = Some(saga_id.to_owned());
        meta.reply_to = Some(self.saga.reply_queue());
        meta.content_type = Some("application/json".into());
        meta.headers.insert(SAGA_HEADER.into(), self.saga.name.clone());
        meta.headers.insert(STEP_HEADER.into(), label.to_owned());
        meta.headers.insert(crate::trace::TRACEPARENT.into(), crate::trace::TraceContext::new_root().to_string());
        let body = cmd.encoded()?;
        Ok(Outgoing { queue: cmd.queue.clone(), meta, body })
    }

    /// Sends step `k` (a fresh id) or finishes.
    fn run_step(&self, data: &S, k: i32, event: String) -> Change {
        if k as usize >= self.saga.steps.len() {
            return Change {
                data: None,
                step: k,
                status: Status::Done,
                pending: None,
                attempts: 0,
                deadline: None,
                error: None,
                send: vec![],
                event,
            };
        }
        let step = &self.saga.steps[k as usize];
        let id = crate::envelope::new_message_id();
        Change {
            data: None,
            step: k,
            status: Status::Running,
            pending: Some(id.clone()),
            attempts: 0,
            deadline: Some(self.saga.step_timeout),
            error: None,
            send: vec![((step.command)(data), id, step.name.clone())],
            event: format!("{event}; sent {}", step.name),
        }
    }

    /// Compensates the highest step `<= from` that has a compensation, or ends `Failed`.
    fn compensate_from(&self, data: &S, from: i32, error: Option<String>, event: String) -> Change {
        let mut k = from;
        while k >= 0 && self.saga.steps[k as usize].compensation.is_none() {
            k -= 1;
        }
        if k < 0 {
            return Change {
                data: None,
                step: 0,
                status: Status::Failed,
                pending: None,
                attempts: 0,
                deadline: None,
                error,
                send: vec![],
                event: format!("{event}; compensated"),
            };
        }
        let step = &self.saga.steps[k as usize];
        let id = crate::envelope::new_message_id();
        let comp = step.compensation.as_ref().expect("checked");
        Change {
            data: None,
            step: k,
            status: Status::Compensating,
            pending: Some(id.clone()),
            attempts: 0,
            deadline: Some(self.saga.step_timeout),
            error,
            send: vec![(comp(data), id, format!("{}:compensate", step.name))],
            event: format!("{event}; compensating {}", step.name),
        }
    }

    /// A compensation failed (fault or timeout): retry after backoff, or `Stuck`.
    fn compensation_failed(&self, row: &SagaRow, why: String) -> Change {
        let attempts = row.attempts + 1;
        let name = &self.saga.steps[row.step as usize].name;
        if attempts >= self.saga.compensation_attempts {
            return Change {
                data: None,
                step: row.step,
                status: Status::Stuck,
                pending: None,
                attempts,
                deadline: None,
                error: Some(why.clone()),
                send: vec![],
                event: format!("compensation {name} failed {attempts} times ({why}): stuck"),
            };
        }
        let delay = self.backoff(attempts);
        Change {
            data: None,
            step: row.step,
            status: Status::Compensating,
            pending: None,
            attempts,
            deadline: Some(delay),
            error: Some(why.clone()),
            send: vec![],
            event: format!("compensation {name} failed ({why}), retry in {delay:?}"),
        }
    }

    async fn start(&self, data: &S) -> Result<String, SagaError> {
        let id = crate::envelope::new_message_id();
        let text = serde_json::to_string(data).map_err(|e| SagaError::Data(e.to_string()))?;
        let change = self.run_step(data, 0, "started".into());
        let state = self.state(&id, change)?;
        self.store.insert(NewSaga { id: id.clone(), name: self.saga.name.clone(), data: text, state }).await?;
        Ok(id)
    }

    async fn on_reply(&self, cmd_id: &str, fault: Option<String>, body: &[u8]) -> Result<(), SagaError> {
        let Some(saga_id) = self.store.waiting_for(&self.saga.name, cmd_id).await? else {
            tracing::debug!(command = cmd_id, "saga: reply for no pending command (late or duplicate), ignored");
            return Ok(());
        };
        self.transition(&saga_id, |o, row| {
            if row.pending.as_deref() != Some(cmd_id) {
                return Ok(None); // another transition consumed it meanwhile
            }
            let data = o.data(row)?;
            let name = &o.saga.steps[row.step as usize].name;
            Ok(Some(match (row.status, &fault) {
                (Status::Running, None) => match &o.saga.steps[row.step as usize].on_reply {
                    None => o.run_step(&data, row.step + 1, format!("{name} ok")),
                    Some(apply) => {
                        let mut data = data;
                        apply(&mut data, body).map_err(SagaError::Data)?;
                        let mut change = o.run_step(&data, row.step + 1, format!("{name} ok"));
                        change.data = Some(serde_json::to_string(&data).map_err(|e| SagaError::Data(e.to_string()))?);
                        change
                    }
                },
                (Status::Running, Some(f)) => {
                    // The step refused: it took no effect, so compensation starts below it.
                    o.compensate_from(&data, row.step - 1, Some(f.clone()), format!("{name} failed: {f}"))
                }
                (Status::Compensating, None) => {
                    o.compensate_from(&data, row.step - 1, row.error.clone(), format!("{name} compensated"))
                }
                (Status::Compensating, Some(f)) => o.compensation_failed(row, f.clone()),
                _ => return Ok(None),
            }))
        })
        .await
    }

    async fn on_tick(&self) -> Result<(), SagaError> {
        let due = self.store.due(&self.saga.name, 100).await?;
        for id in due {
            self.transition(&id, |o, row| {
                if !row.overdue || row.status.is_final() || row.status == Status::Stuck {
                    return Ok(None);
                }
                let data = o.data(row)?;
                let step = &o.saga.steps[row.step as usize];
                Ok(Some(match (row.status, &row.pending) {
                    (Status::Running, Some(pending)) => {
                        let attempts = row.attempts + 1;
                        if attempts < o.saga.step_attempts {
                            // Re-send with the same id: the service's inbox absorbs it if the first
                            // copy got through (also how instances resume after a crash).
                            Change {
                                data: None,
                                step: row.step,
                                status: Status::Running,
                                pending: Some(pending.clone()),
                                attempts,
                                deadline: Some(o.saga.step_timeout),
                                error: None,
                                send: vec![((step.command)(&data), pending.clone(), step.name.clone())],
                                event: format!("{} timed out, re-sent (attempt {})", step.name, attempts + 1),
                            }
                        } else {
                            // It may have succeeded: its compensation intent stands.
                            let why = format!("{} timed out {attempts} times", step.name);
                            o.compensate_from(&data, row.step, Some(why.clone()), why)
                        }
                    }
                    (Status::Compensating, Some(_)) => {
                        o.compensation_failed(row, format!("{} compensation timed out", step.name))
                    }
                    (Status::Compensating, None) => {
                        let comp = step.compensation.as_ref().expect("a compensating step has a compensation");
                        let id = crate::envelope::new_message_id();
                        Change {
                            data: None,
                            step: row.step,
                            status: Status::Compensating,
                            pending: Some(id.clone()),
                            attempts: row.attempts,
                            deadline: Some(o.saga.step_timeout),
                            error: row.error.clone(),
                            send: vec![(comp(&data), id, format!("{}:compensate", step.name))],
                            event: format!("retrying compensation {} (attempt {})", step.name, row.attempts + 1),
                        }
                    }
                    _ => return Ok(None),
                }))
            })
            .await?;
        }
        Ok(())
    }
}

/// A running orchestrator: starts instances, answers operators.
pub struct SagaHandle<S> {
    orch: Arc<Orchestrator<S>>,
    worker: Option<WorkerHandle>,
    ticker: tokio::task::JoinHandle<()>,
}

impl<S> std::fmt::Debug for SagaHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaHandle").field("saga", &self.orch.saga.name).finish()
    }
}

impl<S: Serialize + DeserializeOwned + Send + Sync + 'static> SagaHandle<S> {
    /// Starts an instance with `data`: the row and the first command commit together. Returns its id.
    pub async fn start(&self, data: &S) -> Result<String, SagaError> {
        self.orch.start(data).await
    }

    /// One instance.
    pub async fn get(&self, id: &str) -> Result<SagaRecord<S>, SagaError> {
        let row = ops::show(&*self.orch.store, id).await?;
        Ok(SagaRecord {
            data: self.orch.data(&row)?,
            id: row.id,
            name: row.name,
            step: row.step,
            status: row.status,
            version: row.version,
            attempts: row.attempts,
            error: row.error,
        })
    }

    /// Ids of this saga's instances in `status`, oldest first.
    pub async fn list(&self, status: Status) -> Result<Vec<String>, SagaError> {
        let filter = ListFilter { name: Some(self.orch.saga.name.clone()), status: Some(status), limit: None };
        Ok(self.orch.store.list(&filter).await?.into_iter().map(|r| r.id).collect())
    }

    /// An instance's history, oldest first.
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEntry>, SagaError> {
        self.orch.store.history(id).await
    }

    /// The store this orchestrator runs on (for operators' [`ops`]).
    pub fn store(&self) -> &dyn SagaStore {
        &*self.orch.store
    }

    /// Operator: retries a stuck saga's compensation now, with a fresh attempt budget.
    pub async fn retry(&self, id: &str) -> Result<(), SagaError> {
        self.orch.one_at_a_time(id, ops::retry(&*self.orch.store, id)).await
    }

    /// Operator: gives up on a stuck saga (it ends `Abandoned`; nothing more is sent).
    pub async fn abandon(&self, id: &str) -> Result<(), SagaError> {
        self.orch.one_at_a_time(id, ops::abandon(&*self.orch.store, id)).await
    }

    /// Stops the reply consumer and the deadline scanner (instances resume in the next orchestrator).
    pub async fn stop(mut self) {
        self.ticker.abort();
        if let Some(w) = self.worker.take() {
            w.stop().await;
        }
    }

    /// Kills the orchestrator as a crash would (no graceful stop).
    pub fn abort(mut self) {
        self.ticker.abort();
        if let Some(w) = self.worker.take() {
            w.abort();
        }
    }
}

#[cfg(test)]
mod command_tests {
    use super::Command;
    use std::collections::BTreeMap;

    /// A map with non-string keys does not serialise to JSON: the command must not carry `null`.
    #[test]
    fn an_unserialisable_body_is_an_error_not_null() {
        let bad: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
        assert!(Command::try_new("q", &bad).is_err());
        let cmd = Command::new("q", &bad);
        let err = cmd.encoded().unwrap_err().to_string();
        assert!(err.contains("does not serialise"), "{err}");
        let good = Command::new("q", serde_json::json!({"a": 1}));
        assert_eq!(good.encoded().unwrap(), br#"{"a":1}"#);
    }
}
