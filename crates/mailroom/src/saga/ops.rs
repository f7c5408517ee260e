//! Operators' actions on a [`SagaStore`], with or without a running orchestrator (the `mailroom saga`
//! command uses them directly on the store).
//!
//! Retry and abandon are ordinary versioned transitions: a retry moves a `Stuck` instance back to
//! `Compensating` with a fresh attempt budget and a deadline of "now", so the deadline scanner of
//! whichever orchestrator runs that saga re-sends the compensation on its next tick; an abandon
//! ends it `Abandoned` and nothing more is sent (a late reply finds no pending command).

use super::store::{ListFilter, SagaRow, SagaStore, State};
use super::{SagaError, Status};
use std::time::Duration;

/// How many version conflicts an operator action tolerates before giving up.
const MAX_CONFLICTS: usize = 20;

/// Instances matching `filter`, oldest first.
pub async fn list(store: &dyn SagaStore, filter: &ListFilter) -> Result<Vec<SagaRow>, SagaError> {
    store.list(filter).await
}

/// One instance, or [`SagaError::NotFound`].
pub async fn show(store: &dyn SagaStore, id: &str) -> Result<SagaRow, SagaError> {
    store.load(id).await?.ok_or_else(|| SagaError::NotFound(id.to_owned()))
}

/// Retries a stuck saga's compensation (picked up by its orchestrator's next deadline scan).
pub async fn retry(store: &dyn SagaStore, id: &str) -> Result<(), SagaError> {
    operate(store, id, Status::Compensating, "operator retry").await
}

/// Gives up on a stuck saga: it ends `Abandoned`.
pub async fn abandon(store: &dyn SagaStore, id: &str) -> Result<(), SagaError> {
    operate(store, id, Status::Abandoned, "operator abandoned").await
}

/// Moves a `Stuck` instance to `to` (`Compensating` or `Abandoned`), retrying version conflicts.
pub(crate) async fn operate(store: &dyn SagaStore, id: &str, to: Status, event: &str) -> Result<(), SagaError> {
    for _ in 0..MAX_CONFLICTS {
        let row = store.load(id).await?.ok_or_else(|| SagaError::NotFound(id.to_owned()))?;
        if row.status != Status::Stuck {
            return Err(SagaError::NotStuck(id.to_owned(), row.status));
        }
        let state = State {
            data: None,
            step: row.step,
            status: to,
            pending: None,
            attempts: 0,
            // "Due now": the deadline scanner sends the compensation again.
            deadline: (to == Status::Compensating).then_some(Duration::ZERO),
            error: row.error.clone(),
            send: vec![],
            event: event.to_owned(),
        };
        if store.apply(id, row.version, state).await? {
            return Ok(());
        }
    }
    Err(SagaError::Conflict(id.to_owned()))
}
