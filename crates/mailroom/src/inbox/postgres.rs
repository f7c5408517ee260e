//! The PostgreSQL inbox: exactly-once effects for handlers that write to the same database.
//!
//! Table `inbox(consumer, message_id)` (primary key) with a `processed_at` timestamp. For each
//! delivery the pipeline opens a transaction and inserts the (consumer, message id) row
//! (`ON CONFLICT DO NOTHING`): no row inserted means an earlier delivery committed it, so the message
//! is acked as a duplicate without running the handler. Otherwise the handler runs with the
//! transaction in its context ([`Context::tx`](crate::Context::tx)) and writes its own rows in it; the
//! pipeline commits only when the handler succeeded, then acks. A crash, a handler error or a failed
//! commit rolls the inbox row back with the handler's writes, and the redelivered message runs again
//! from a clean slate. A copy delivered concurrently to another process waits on the row lock of the
//! uncommitted insert and then sees the committed row.
//!
//! Rows older than the retention window are deleted by [`PgInbox::purge`] (or a task from
//! [`PgInbox::spawn_purger`]); keep the window longer than any redelivery horizon (delayed retries,
//! time spent in a DLQ before a redrive).
//!
//! ```no_run
//! use mailroom::inbox::postgres::PgInbox;
//! use mailroom::{Bus, Envelope, HandlerError};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let inbox = Arc::new(PgInbox::connect("postgres://postgres@127.0.0.1:5432/test").await?);
//! let _purger = inbox.spawn_purger(Duration::from_secs(3600));
//! let bus = Bus::embedded()?;
//! let payments = bus.worker("payments")
//!     .idempotent(inbox.clone())
//!     .handle(|p: Envelope<i64>, ctx| async move {
//!         let mut tx = ctx.tx()?;
//!         sqlx::query("INSERT INTO ledger (message_id, cents) VALUES ($1, $2)")
//!             .bind(&p.id).bind(p.body)
//!             .execute(&mut **tx).await.map_err(HandlerError::transient)?;
//!         Ok(()) // the pipeline commits the ledger row and the inbox row together
//!     })
//!     .run().await?;
//! # payments.stop().await;
//! # Ok(()) }
//! ```

/// The sqlx this store is built on: use it for the handler's queries so the versions match.
pub use sqlx;

use super::{Claim, InboxStore, UnitOfWork, DEFAULT_RETENTION};
use crate::inbox::UnitSlot;
use crate::transport::BoxFuture;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

/// Connections the pool opens by default: one per concurrently running handler is the most it needs.
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// Serialises concurrent `CREATE TABLE IF NOT EXISTS` (which can race in PostgreSQL) across processes.
const MIGRATE_LOCK_KEY: i64 = 0x6d61_696c_726f_6f6d; // "mailroom"

/// A processed-id store in PostgreSQL whose rows commit with the handler's own writes.
#[derive(Debug, Clone)]
pub struct PgInbox {
    pool: PgPool,
    retention: Duration,
}

/// The handler's PostgreSQL transaction, lent by [`Context::tx`](crate::Context::tx): use `&mut **tx`
/// as the executor of sqlx queries. Dropping it hands the transaction back to the pipeline, which
/// commits it if the handler succeeds; do not commit it yourself, and do not keep it past the handler
/// (a transaction not handed back by then is rolled back and the message retried).
pub struct PgTx {
    unit: Option<Box<PgUnit>>,
    slot: UnitSlot,
}

impl std::fmt::Debug for PgTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgTx")
    }
}

impl PgTx {
    /// Borrows the transaction out of `slot` (empty while another `PgTx` holds it).
    pub(crate) fn take(slot: &UnitSlot) -> Option<PgTx> {
        let unit = slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        match unit.into_any().downcast::<PgUnit>() {
            Ok(pg) => Some(PgTx { unit: Some(pg), slot: Arc::clone(slot) }),
            Err(_) => None, // another store's unit of work: not ours to lend (dropping it rolls it back)
        }
    }
}

impl std::ops::Deref for PgTx {
    type Target = Transaction<'static, Postgres>;
    fn deref(&self) -> &Self::Target {
        &self.unit.as_ref().expect("present until drop").tx
    }
}

impl std::ops::DerefMut for PgTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.unit.as_mut().expect("present until drop").tx
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if let Some(unit) = self.unit.take() {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(unit as Box<dyn UnitOfWork>);
        }
    }
}

/// The open transaction a handler joins (`ctx.tx()`).
pub(crate) struct PgUnit {
    pub(crate) tx: Transaction<'static, Postgres>,
}

fn text(e: sqlx::Error) -> String {
    e.to_string()
}

impl PgInbox {
    /// Connects a pool to `url` (`postgres://user@host:port/db`) and creates the table if needed.
    pub async fn connect(url: &str) -> Result<PgInbox, sqlx::Error> {
        let pool = PgPoolOptions::new().max_connections(DEFAULT_POOL_SIZE).connect(url).await?;
        let inbox = PgInbox::new(pool);
        inbox.migrate().await?;
        Ok(inbox)
    }

    /// An inbox on an existing pool (the application's own, so handlers write through the same
    /// database); call [`PgInbox::migrate`] once before use.
    pub fn new(pool: PgPool) -> PgInbox {
        PgInbox { pool, retention: DEFAULT_RETENTION }
    }

    /// How long processed ids are kept (default 7 days).
    pub fn retention(mut self, retention: Duration) -> PgInbox {
        self.retention = retention;
        self
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the `inbox` table and its `processed_at` index if they do not exist.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATE_LOCK_KEY).execute(&mut *tx).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS inbox (
                consumer text NOT NULL,
                message_id text NOT NULL,
                processed_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (consumer, message_id)
            )",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("CREATE INDEX IF NOT EXISTS inbox_processed_at ON inbox (processed_at)").execute(&mut *tx).await?;
        tx.commit().await
    }

    /// Deletes ids processed longer ago than the retention window; returns how many.
    pub async fn purge(&self) -> Result<u64, sqlx::Error> {
        let r = sqlx::query("DELETE FROM inbox WHERE processed_at < now() - make_interval(secs => $1)")
            .bind(self.retention.as_secs_f64())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Purges every `every` in a background task (stopped by aborting the handle).
    pub fn spawn_purger(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let inbox = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match inbox.purge().await {
                    Ok(n) if n > 0 => tracing::debug!(purged = n, "inbox retention purge"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "inbox retention purge failed"),
                }
            }
        })
    }
}

impl InboxStore for PgInbox {
    fn seen<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND message_id = $2)")
                .bind(consumer)
                .bind(message_id)
                .fetch_one(&self.pool)
                .await
                .map_err(text)
        })
    }

    fn record<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(consumer)
                .bind(message_id)
                .execute(&self.pool)
                .await
                .map(|_| ())
                .map_err(text)
        })
    }

    fn begin<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> Option<BoxFuture<'a, Result<Claim, String>>> {
        Some(Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(text)?;
            // Blocks while another transaction holds an uncommitted row for this id, then sees its outcome.
            let inserted =
                sqlx::query("INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(consumer)
                    .bind(message_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(text)?
                    .rows_affected();
            if inserted == 0 {
                tx.rollback().await.map_err(text)?;
                return Ok(Claim::Duplicate);
            }
            Ok(Claim::Claimed(Box::new(PgUnit { tx })))
        }))
    }
}

impl UnitOfWork for PgUnit {
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move { self.tx.commit().await.map_err(text) })
    }
    fn rollback(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move { self.tx.rollback().await.map_err(text) })
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
