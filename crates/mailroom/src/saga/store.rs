//! Where saga state lives: the [`SagaStore`] trait and the untyped rows it stores.
//!
//! Two implementations: [`PgSagaStore`](super::postgres::PgSagaStore) (tables `saga_instances` and
//! `saga_history`, commands through the PostgreSQL [`outbox`](crate::outbox)) and
//! [`EmbeddedSagaStore`](super::embedded::EmbeddedSagaStore) (an fsynced append-only file, with its
//! own outbox and relay). Both give the same guarantee: [`SagaStore::apply`] writes the new state,
//! the version bump, the outgoing commands and a history line atomically, or nothing when the
//! version moved on.
//!
//! Rows are untyped (the saga data is JSON text) so operators' tools can list, show, retry and
//! abandon instances without knowing the saga's data type.

use super::{SagaError, Status};
use crate::envelope::Metadata;
use crate::transport::BoxFuture;
use std::time::Duration;

/// One stored saga instance, as operators and the orchestrator see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRow {
    /// The instance id (the correlation id of all its commands).
    pub id: String,
    /// The saga's name.
    pub name: String,
    /// The saga data, JSON text.
    pub data: String,
    /// The step being executed or compensated.
    pub step: i32,
    /// The status.
    pub status: Status,
    /// Bumped by every transition.
    pub version: i64,
    /// The id of the command whose reply is awaited.
    pub pending: Option<String>,
    /// Failed attempts of the current step or compensation.
    pub attempts: i32,
    /// The last error.
    pub error: Option<String>,
    /// When the current step times out (ms since the epoch), if it can.
    pub deadline_ms: Option<i64>,
    /// Whether the deadline has passed (by the store's clock).
    pub overdue: bool,
    /// When the instance started (ms since the epoch).
    pub created_ms: i64,
    /// When it last changed (ms since the epoch).
    pub updated_ms: i64,
}

/// A history entry.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// What happened.
    pub event: String,
}

/// A command leaving with a transition: published by the store's outbox relay after commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The destination queue (through the default exchange, mandatory).
    pub queue: String,
    /// Its metadata (the message id is fixed here, so a re-publish carries the same id).
    pub meta: Metadata,
    /// The encoded body (JSON).
    pub body: Vec<u8>,
}

/// A new instance with its first transition.
#[derive(Debug, Clone)]
pub struct NewSaga {
    /// The instance id.
    pub id: String,
    /// The saga's name.
    pub name: String,
    /// The initial data, JSON text.
    pub data: String,
    /// The first state (version 0).
    pub state: State,
}

/// The state a transition moves an instance to, what it sends and the history line it writes.
#[derive(Debug, Clone)]
pub struct State {
    /// New saga data (JSON text); `None` keeps the current data.
    pub data: Option<String>,
    /// The step.
    pub step: i32,
    /// The status.
    pub status: Status,
    /// The command whose reply is awaited.
    pub pending: Option<String>,
    /// Failed attempts so far.
    pub attempts: i32,
    /// Time from now until the deadline; `None`: no deadline.
    pub deadline: Option<Duration>,
    /// The last error.
    pub error: Option<String>,
    /// Commands to publish once this transition is committed.
    pub send: Vec<Outgoing>,
    /// The history line.
    pub event: String,
}

/// Which instances [`SagaStore::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this saga (by name).
    pub name: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// At most this many (oldest first); `None`: all.
    pub limit: Option<usize>,
}

/// Persistence of saga instances, their history and their outgoing commands.
pub trait SagaStore: Send + Sync + 'static {
    /// Creates what the store needs (tables), idempotently.
    fn prepare(&self) -> BoxFuture<'_, Result<(), SagaError>>;
    /// Inserts a new instance at version 0 with its first commands and history line, atomically.
    fn insert(&self, new: NewSaga) -> BoxFuture<'_, Result<(), SagaError>>;
    /// One instance.
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRow>, SagaError>>;
    /// The instance of saga `name` awaiting the reply to command `message_id`.
    fn waiting_for<'a>(
        &'a self,
        name: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, SagaError>>;
    /// Ids of `name`'s running or compensating instances past their deadline, most overdue first.
    fn due<'a>(&'a self, name: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<String>, SagaError>>;
    /// Moves instance `id` from `version` to `version + 1` with `state`, its commands and history
    /// line, atomically. `Ok(false)`: the instance is no longer at `version` (or is gone); nothing
    /// was written.
    fn apply<'a>(&'a self, id: &'a str, version: i64, state: State) -> BoxFuture<'a, Result<bool, SagaError>>;
    /// Instances matching `filter`, oldest first.
    fn list<'a>(&'a self, filter: &'a ListFilter) -> BoxFuture<'a, Result<Vec<SagaRow>, SagaError>>;
    /// An instance's history, oldest first.
    fn history<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<HistoryEntry>, SagaError>>;
}
