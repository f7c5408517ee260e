//! The SQLite saga store (feature `sqlite`): tables `saga_instances` and `saga_history` in the same
//! database file as a [`SqliteOutbox`], whose relay publishes the commands a transition writes.
//! A transition is one SQLite transaction: `UPDATE .. WHERE version = ?`, its outbox rows and a
//! history row.

use super::store::{HistoryEntry, ListFilter, NewSaga, Outgoing, SagaRow, SagaStore, State};
use super::{SagaError, Status};
use crate::sqlite::{Dest, SqliteOutbox};
use crate::transport::BoxFuture;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

/// Saga state in SQLite. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteSagaStore {
    outbox: SqliteOutbox,
}

fn db(e: impl std::fmt::Display) -> SagaError {
    SagaError::Store(format!("sqlite: {e}"))
}

fn now_ms() -> i64 {
    crate::envelope::millis(std::time::SystemTime::now()) as i64
}

impl SqliteSagaStore {
    /// A store whose transitions send their commands through `outbox` (same database file; run its
    /// relay).
    pub fn new(outbox: SqliteOutbox) -> SqliteSagaStore {
        SqliteSagaStore { outbox }
    }

    async fn enqueue(&self, conn: &mut SqliteConnection, send: &[Outgoing]) -> Result<(), SagaError> {
        for out in send {
            self.outbox.enqueue_raw(conn, &Dest::Queue(out.queue.clone()), &out.meta, &out.body).await.map_err(db)?;
        }
        Ok(())
    }

    async fn history_line(&self, conn: &mut SqliteConnection, id: &str, event: &str) -> Result<(), SagaError> {
        sqlx::query("INSERT INTO saga_history (saga_id, at_ms, event) VALUES (?, ?, ?)")
            .bind(id)
            .bind(now_ms())
            .bind(event)
            .execute(conn)
            .await
            .map_err(db)?;
        Ok(())
    }
}

/// The columns [`row`] reads (`?1` is now, in ms).
const COLUMNS: &str = "id, name, data, step, status, version, pending_msg, attempts, error, deadline_ms,
    coalesce(deadline_ms <= ?1, 0) AS overdue, created_ms, updated_ms";

fn row(r: &SqliteRow) -> Result<SagaRow, sqlx::Error> {
    Ok(SagaRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        data: r.try_get("data")?,
        step: r.try_get("step")?,
        status: Status::parse(r.try_get::<&str, _>("status")?),
        version: r.try_get("version")?,
        pending: r.try_get("pending_msg")?,
        attempts: r.try_get("attempts")?,
        error: r.try_get("error")?,
        deadline_ms: r.try_get("deadline_ms")?,
        overdue: r.try_get("overdue")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

fn deadline(s: &State) -> Option<i64> {
    s.deadline.map(|d| now_ms() + d.as_millis() as i64)
}

impl SagaStore for SqliteSagaStore {
    fn prepare(&self) -> BoxFuture<'_, Result<(), SagaError>> {
        Box::pin(async move {
            self.outbox.migrate().await.map_err(db)?;
            let pool = self.outbox.pool();
            for ddl in [
                "CREATE TABLE IF NOT EXISTS saga_instances (
                    id TEXT PRIMARY KEY, name TEXT NOT NULL, data TEXT NOT NULL, step INTEGER NOT NULL,
                    status TEXT NOT NULL, version INTEGER NOT NULL, pending_msg TEXT,
                    attempts INTEGER NOT NULL DEFAULT 0, deadline_ms INTEGER, error TEXT,
                    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL)",
                "CREATE INDEX IF NOT EXISTS saga_instances_pending ON saga_instances (pending_msg)",
                "CREATE INDEX IF NOT EXISTS saga_instances_status ON saga_instances (name, status, deadline_ms)",
                "CREATE TABLE IF NOT EXISTS saga_history (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT, saga_id TEXT NOT NULL, at_ms INTEGER NOT NULL,
                    event TEXT NOT NULL)",
                "CREATE INDEX IF NOT EXISTS saga_history_id ON saga_history (saga_id, seq)",
            ] {
                sqlx::query(ddl).execute(pool).await.map_err(db)?;
            }
            Ok(())
        })
    }

    fn insert(&self, new: NewSaga) -> BoxFuture<'_, Result<(), SagaError>> {
        Box::pin(async move {
            let s = &new.state;
            let mut tx = self.outbox.pool().begin().await.map_err(db)?;
            let now = now_ms();
            sqlx::query(
                "INSERT INTO saga_instances (id, name, data, step, status, version, pending_msg, attempts,
                    deadline_ms, error, created_ms, updated_ms)
                 VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&new.id)
            .bind(&new.name)
            .bind(s.data.as_ref().unwrap_or(&new.data))
            .bind(s.step)
            .bind(s.status.as_str())
            .bind(&s.pending)
            .bind(s.attempts)
            .bind(deadline(s))
            .bind(&s.error)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            self.enqueue(&mut tx, &s.send).await?;
            self.history_line(&mut tx, &new.id, &s.event).await?;
            tx.commit().await.map_err(db)
        })
    }

    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRow>, SagaError>> {
        Box::pin(async move {
            let r = sqlx::query(&format!("SELECT {COLUMNS} FROM saga_instances WHERE id = ?2"))
                .bind(now_ms())
                .bind(id)
                .fetch_optional(self.outbox.pool())
                .await
                .map_err(db)?;
            r.as_ref().map(row).transpose().map_err(db)
        })
    }

    fn waiting_for<'a>(
        &'a self,
        name: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, SagaError>> {
        Box::pin(async move {
            sqlx::query_scalar("SELECT id FROM saga_instances WHERE pending_msg = ? AND name = ?")
                .bind(message_id)
                .bind(name)
                .fetch_optional(self.outbox.pool())
                .await
                .map_err(db)
        })
    }

    fn due<'a>(&'a self, name: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<String>, SagaError>> {
        Box::pin(async move {
            sqlx::query_scalar(
                "SELECT id FROM saga_instances WHERE name = ? AND status IN ('Running', 'Compensating')
                 AND deadline_ms <= ? ORDER BY deadline_ms LIMIT ?",
            )
            .bind(name)
            .bind(now_ms())
            .bind(limit as i64)
            .fetch_all(self.outbox.pool())
            .await
            .map_err(db)
        })
    }

    fn apply<'a>(&'a self, id: &'a str, version: i64, s: State) -> BoxFuture<'a, Result<bool, SagaError>> {
        Box::pin(async move {
            let mut tx = self.outbox.pool().begin().await.map_err(db)?;
            let updated = sqlx::query(
                "UPDATE saga_instances SET step = ?, status = ?, pending_msg = ?, attempts = ?, deadline_ms = ?,
                    error = ?, data = coalesce(?, data), version = version + 1, updated_ms = ?
                 WHERE id = ? AND version = ?",
            )
            .bind(s.step)
            .bind(s.status.as_str())
            .bind(&s.pending)
            .bind(s.attempts)
            .bind(deadline(&s))
            .bind(&s.error)
            .bind(&s.data)
            .bind(now_ms())
            .bind(id)
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
            if updated == 0 {
                tx.rollback().await.map_err(db)?;
                return Ok(false);
            }
            self.enqueue(&mut tx, &s.send).await?;
            self.history_line(&mut tx, id, &s.event).await?;
            tx.commit().await.map_err(db)?;
            Ok(true)
        })
    }

    fn list<'a>(&'a self, filter: &'a ListFilter) -> BoxFuture<'a, Result<Vec<SagaRow>, SagaError>> {
        Box::pin(async move {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM saga_instances
                 WHERE (?2 IS NULL OR name = ?2) AND (?3 IS NULL OR status = ?3)
                 ORDER BY created_ms, id LIMIT coalesce(?4, -1)"
            ))
            .bind(now_ms())
            .bind(&filter.name)
            .bind(filter.status.map(Status::as_str))
            .bind(filter.limit.map(|n| n as i64))
            .fetch_all(self.outbox.pool())
            .await
            .map_err(db)?;
            rows.iter().map(row).collect::<Result<_, _>>().map_err(db)
        })
    }

    fn history<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<HistoryEntry>, SagaError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT at_ms, event FROM saga_history WHERE saga_id = ? ORDER BY seq")
                .bind(id)
                .fetch_all(self.outbox.pool())
                .await
                .map_err(db)?;
            rows.into_iter()
                .map(|r| Ok(HistoryEntry { at_ms: r.try_get("at_ms")?, event: r.try_get("event")? }))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(db)
        })
    }
}
