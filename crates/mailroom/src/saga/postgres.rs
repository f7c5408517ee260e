//! The PostgreSQL saga store: tables `saga_instances` and `saga_history`, commands written as rows of
//! the PostgreSQL [`Outbox`] in the transition's transaction (its relay publishes them).

use super::store::{HistoryEntry, ListFilter, NewSaga, Outgoing, SagaRow, SagaStore, State};
use super::{SagaError, Status};
use crate::outbox::{Dest, Outbox};
use crate::transport::BoxFuture;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{PgConnection, Row};

/// Saga state in PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PgSagaStore {
    pool: PgPool,
    /// Where commands go; `None` for operators' tools, which send nothing themselves.
    outbox: Option<Outbox>,
}

impl PgSagaStore {
    /// A store whose transitions send their commands through `outbox` (same database).
    pub fn new(outbox: Outbox) -> PgSagaStore {
        PgSagaStore { pool: outbox.pool().clone(), outbox: Some(outbox) }
    }

    /// A store for operators' tools (list, history, retry, abandon): a transition that would send a
    /// command fails with [`SagaError::NoOutbox`].
    pub fn operator(pool: PgPool) -> PgSagaStore {
        PgSagaStore { pool, outbox: None }
    }

    /// An operators' store on the database at `url` (`postgres://...`), as [`PgSagaStore::operator`].
    pub async fn connect(url: &str) -> Result<PgSagaStore, SagaError> {
        Ok(PgSagaStore::operator(PgPool::connect(url).await?))
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn enqueue(&self, conn: &mut PgConnection, send: &[Outgoing]) -> Result<(), SagaError> {
        if send.is_empty() {
            return Ok(());
        }
        let outbox = self.outbox.as_ref().ok_or(SagaError::NoOutbox)?;
        for out in send {
            outbox.enqueue_raw(conn, &Dest::Queue(out.queue.clone()), &out.meta, &out.body).await?;
        }
        Ok(())
    }
}

/// Creates `saga_instances` and `saga_history` if they do not exist.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(0x6d61_696c_726f_6f6d_i64).execute(&mut *tx).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS saga_instances (
            id text PRIMARY KEY,
            name text NOT NULL,
            data text NOT NULL,
            step integer NOT NULL,
            status text NOT NULL,
            version bigint NOT NULL,
            pending_msg text,
            attempts integer NOT NULL DEFAULT 0,
            deadline timestamptz,
            error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("CREATE INDEX IF NOT EXISTS saga_instances_pending ON saga_instances (pending_msg)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE INDEX IF NOT EXISTS saga_instances_status ON saga_instances (name, status, deadline)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS saga_history (
            seq bigserial PRIMARY KEY,
            saga_id text NOT NULL,
            at timestamptz NOT NULL DEFAULT now(),
            event text NOT NULL
        )",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("CREATE INDEX IF NOT EXISTS saga_history_id ON saga_history (saga_id, seq)").execute(&mut *tx).await?;
    tx.commit().await
}

/// The columns [`row`] reads.
const COLUMNS: &str = "id, name, data, step, status, version, pending_msg, attempts, error,
    coalesce(deadline <= now(), false) AS overdue,
    (extract(epoch from deadline) * 1000)::bigint AS deadline_ms,
    (extract(epoch from created_at) * 1000)::bigint AS created_ms,
    (extract(epoch from updated_at) * 1000)::bigint AS updated_ms";

fn row(r: &PgRow) -> Result<SagaRow, sqlx::Error> {
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

impl SagaStore for PgSagaStore {
    fn prepare(&self) -> BoxFuture<'_, Result<(), SagaError>> {
        Box::pin(async move { Ok(migrate(&self.pool).await?) })
    }

    fn insert(&self, new: NewSaga) -> BoxFuture<'_, Result<(), SagaError>> {
        Box::pin(async move {
            let s = &new.state;
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO saga_instances (id, name, data, step, status, version, pending_msg, attempts, deadline, error)
                 VALUES ($1, $2, $3, $4, $5, 0, $6, $7,
                    CASE WHEN $8::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $8::float8) END, $9)",
            )
            .bind(&new.id)
            .bind(&new.name)
            .bind(s.data.as_ref().unwrap_or(&new.data))
            .bind(s.step)
            .bind(s.status.as_str())
            .bind(&s.pending)
            .bind(s.attempts)
            .bind(s.deadline.map(|d| d.as_secs_f64()))
            .bind(&s.error)
            .execute(&mut *tx)
            .await?;
            self.enqueue(&mut tx, &s.send).await?;
            sqlx::query("INSERT INTO saga_history (saga_id, event) VALUES ($1, $2)")
                .bind(&new.id)
                .bind(&s.event)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRow>, SagaError>> {
        Box::pin(async move {
            let r = sqlx::query(&format!("SELECT {COLUMNS} FROM saga_instances WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
            Ok(r.as_ref().map(row).transpose()?)
        })
    }

    fn waiting_for<'a>(
        &'a self,
        name: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, SagaError>> {
        Box::pin(async move {
            Ok(sqlx::query_scalar("SELECT id FROM saga_instances WHERE pending_msg = $1 AND name = $2")
                .bind(message_id)
                .bind(name)
                .fetch_optional(&self.pool)
                .await?)
        })
    }

    fn due<'a>(&'a self, name: &'a str, limit: usize) -> BoxFuture<'a, Result<Vec<String>, SagaError>> {
        Box::pin(async move {
            Ok(sqlx::query_scalar(
                "SELECT id FROM saga_instances WHERE name = $1 AND status IN ('Running', 'Compensating')
                 AND deadline <= now() ORDER BY deadline LIMIT $2",
            )
            .bind(name)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?)
        })
    }

    fn apply<'a>(&'a self, id: &'a str, version: i64, s: State) -> BoxFuture<'a, Result<bool, SagaError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE saga_instances SET step = $3, status = $4, pending_msg = $5, attempts = $6,
                    deadline = CASE WHEN $7::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $7::float8) END,
                    error = $8, data = coalesce($9, data), version = version + 1, updated_at = now()
                 WHERE id = $1 AND version = $2",
            )
            .bind(id)
            .bind(version)
            .bind(s.step)
            .bind(s.status.as_str())
            .bind(&s.pending)
            .bind(s.attempts)
            .bind(s.deadline.map(|d| d.as_secs_f64()))
            .bind(&s.error)
            .bind(&s.data)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            self.enqueue(&mut tx, &s.send).await?;
            sqlx::query("INSERT INTO saga_history (saga_id, event) VALUES ($1, $2)")
                .bind(id)
                .bind(&s.event)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn list<'a>(&'a self, filter: &'a ListFilter) -> BoxFuture<'a, Result<Vec<SagaRow>, SagaError>> {
        Box::pin(async move {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM saga_instances
                 WHERE ($1::text IS NULL OR name = $1) AND ($2::text IS NULL OR status = $2)
                 ORDER BY created_at, id LIMIT $3"
            ))
            .bind(&filter.name)
            .bind(filter.status.map(Status::as_str))
            .bind(filter.limit.map(|n| n as i64))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.iter().map(row).collect::<Result<_, _>>()?)
        })
    }

    fn history<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<HistoryEntry>, SagaError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT (extract(epoch from at) * 1000)::bigint AS ms, event FROM saga_history WHERE saga_id = $1
                 ORDER BY seq",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter()
                .map(|r| Ok(HistoryEntry { at_ms: r.try_get("ms")?, event: r.try_get("event")? }))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(SagaError::from)
        })
    }
}
