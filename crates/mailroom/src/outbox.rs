//! The transactional outbox: messages enqueued in the application's own PostgreSQL transaction,
//! published by a relay after commit.
//!
//! [`Outbox::enqueue`] inserts a row (the encoded envelope, its destination) into the outbox table in
//! the caller's transaction and notifies the relay; a rolled-back transaction takes the row with it,
//! so a message leaves exactly when the business change it describes is committed.
//!
//! The relay ([`Outbox::relay`]) publishes rows in `seq` order with publisher confirms and marks each
//! row sent only after *its* confirm (`sent_at IS NULL` rows are read, not `seq > high-water mark`,
//! so a row with a lower `seq` whose transaction committed late is still sent). One relay per table
//! is active at a time: each holds a session advisory lock on a dedicated connection, the others
//! stand by and take over when it goes away. It wakes on `LISTEN/NOTIFY` and polls as a fallback,
//! and purges sent rows older than the retention window.
//!
//! Crash windows: killed between commit and publish, nothing is lost (the row stays unsent and the
//! next relay sends it); killed between publish and mark, the row is published again by the next
//! relay with the same message id, which an idempotent consumer ([`MemoryInbox`](crate::MemoryInbox),
//! [`PgInbox`](crate::PgInbox)) absorbs.
//!
//! Ordering: a failed publish (broker down, no route for a queue) stops the batch, and the relay
//! retries from the same row after the poll interval, so later rows never overtake it.
//!
//! ```no_run
//! use mailroom::outbox::{Dest, Outbox};
//! use mailroom::{Bus, Envelope};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let outbox = Outbox::new(pool.clone(), "outbox")?;
//! outbox.migrate().await?;
//! let bus = Bus::embedded()?;
//! let relay = outbox.relay(bus.clone()).run().await?;
//!
//! let mut tx = pool.begin().await?;
//! // sqlx::query("INSERT INTO orders ...").execute(&mut *tx).await?;
//! outbox.enqueue(&mut tx, Dest::topic("orders.placed"), &Envelope::event("order-1".to_string())).await?;
//! tx.commit().await?; // the relay publishes it now
//! # relay.stop().await;
//! # Ok(()) }
//! ```

use crate::bus::Bus;
use crate::envelope::{millis, Envelope, MessageKind, Metadata, Payload};
pub use crate::relay::RelayHandle;
use crate::relay::RelayShared;
use crate::trace::{TraceContext, TRACEPARENT};
use crate::transport::{BoxFuture, Outbound, Published};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{PgConnection, Postgres, Row, Transaction};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tracing::Instrument;

/// The first key of the relay's two-key advisory lock ("mr" + "ob"); the second is `hashtext(table)`.
const RELAY_LOCK_CLASS: i32 = 0x6d72_6f62;

/// Default rows per batch.
pub const DEFAULT_BATCH: i64 = 100;
/// Default polling interval (the fallback when a notification is missed).
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// Default retention of sent rows before they are purged.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Outbox errors.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// PostgreSQL failed.
    #[error("outbox database: {0}")]
    Db(#[from] sqlx::Error),
    /// The body could not be encoded.
    #[error("outbox encode: {0}")]
    Encode(String),
    /// A table name that is not a plain identifier.
    #[error("invalid outbox table name {0:?} (letters, digits and _ only)")]
    InvalidTable(String),
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A queue, through the default exchange, published mandatory (an unroutable row is not marked
    /// sent; the relay retries it).
    Queue(String),
    /// A topic on the bus's events exchange.
    Topic(String),
}

impl Dest {
    /// A queue destination (a command).
    pub fn queue(name: impl Into<String>) -> Dest {
        Dest::Queue(name.into())
    }
    /// A topic destination (an event).
    pub fn topic(name: impl Into<String>) -> Dest {
        Dest::Topic(name.into())
    }
}

impl From<&str> for Dest {
    /// A bare name is a queue.
    fn from(s: &str) -> Dest {
        Dest::Queue(s.to_owned())
    }
}

/// An outbox table on a pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    pool: PgPool,
    table: Arc<str>,
}

fn kind_text(k: MessageKind) -> &'static str {
    k.as_str()
}

fn parse_kind(s: &str) -> MessageKind {
    match s {
        "command" => MessageKind::Command,
        "event" => MessageKind::Event,
        _ => MessageKind::Document,
    }
}

impl Outbox {
    /// An outbox stored in `table` (a plain identifier) of `pool`'s database; call
    /// [`Outbox::migrate`] once before use.
    pub fn new(pool: PgPool, table: &str) -> Result<Outbox, OutboxError> {
        let ok = !table.is_empty()
            && table.len() <= 40
            && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !table.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(OutboxError::InvalidTable(table.to_owned()));
        }
        Ok(Outbox { pool, table: table.to_ascii_lowercase().into() })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The NOTIFY channel the relay listens on.
    pub fn channel(&self) -> String {
        format!("mailroom_outbox_{}", self.table)
    }

    /// Creates the table and its index of unsent rows if they do not exist.
    pub async fn migrate(&self) -> Result<(), OutboxError> {
        let t = &self.table;
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(0x6d61_696c_726f_6f6d_i64).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                seq bigserial PRIMARY KEY,
                message_id text NOT NULL,
                dest_kind text NOT NULL,
                dest text NOT NULL,
                kind text NOT NULL,
                type_name text NOT NULL,
                correlation_id text,
                causation_id text,
                reply_to text,
                content_type text,
                headers text NOT NULL,
                sent_at_ms bigint NOT NULL,
                body bytea NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                published_at timestamptz,
                attempts integer NOT NULL DEFAULT 0,
                last_error text
            )"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("CREATE INDEX IF NOT EXISTS {t}_unsent ON {t} (seq) WHERE published_at IS NULL"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {t}_published ON {t} (published_at) WHERE published_at IS NOT NULL"
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Enqueues `env` for `dest` in the caller's transaction (nothing is published unless it
    /// commits); returns the row's `seq`. The envelope's id is kept, so every publish of this row
    /// carries the same message id. A `traceparent` is added if the envelope has none.
    pub async fn enqueue<T: Payload>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        dest: impl Into<Dest>,
        env: &Envelope<T>,
    ) -> Result<i64, OutboxError> {
        let (mut meta, body) = (env.meta.clone(), env.body.encode().map_err(OutboxError::Encode)?);
        meta.content_type = Some(env.body.content_type().to_owned());
        if !meta.headers.contains_key(TRACEPARENT) {
            meta.headers.insert(TRACEPARENT.into(), TraceContext::new_root().to_string());
        }
        self.enqueue_raw(tx, &dest.into(), &meta, &body).await
    }

    /// Enqueues encoded metadata and body (the saga orchestrator's path).
    pub(crate) async fn enqueue_raw(
        &self,
        conn: &mut PgConnection,
        dest: &Dest,
        meta: &Metadata,
        body: &[u8],
    ) -> Result<i64, OutboxError> {
        let (dest_kind, dest_name) = match dest {
            Dest::Queue(q) => ("queue", q.as_str()),
            Dest::Topic(t) => ("topic", t.as_str()),
        };
        let headers = serde_json::to_string(&meta.headers).map_err(|e| OutboxError::Encode(e.to_string()))?;
        let seq: i64 = sqlx::query_scalar(&format!(
            "INSERT INTO {} (message_id, dest_kind, dest, kind, type_name, correlation_id, causation_id, reply_to,
                content_type, headers, sent_at_ms, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING seq",
            self.table
        ))
        .bind(&meta.id)
        .bind(dest_kind)
        .bind(dest_name)
        .bind(kind_text(meta.kind))
        .bind(&meta.type_name)
        .bind(&meta.correlation_id)
        .bind(&meta.causation_id)
        .bind(&meta.reply_to)
        .bind(&meta.content_type)
        .bind(headers)
        .bind(millis(meta.sent_at) as i64)
        .bind(body)
        .fetch_one(&mut *conn)
        .await?;
        // Delivered to listeners only when (and if) the transaction commits; collapsed per transaction.
        sqlx::query("SELECT pg_notify($1, '')").bind(self.channel()).execute(&mut *conn).await?;
        Ok(seq)
    }

    /// Rows not yet published.
    pub async fn pending(&self) -> Result<i64, OutboxError> {
        let n = sqlx::query_scalar(&format!("SELECT count(*) FROM {} WHERE published_at IS NULL", self.table))
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// Deletes published rows older than `retention`; returns how many.
    pub async fn purge(&self, retention: Duration) -> Result<u64, OutboxError> {
        let r = sqlx::query(&format!(
            "DELETE FROM {} WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)",
            self.table
        ))
        .bind(retention.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// A relay publishing this outbox through `bus`.
    pub fn relay(&self, bus: Bus) -> Relay {
        Relay {
            outbox: self.clone(),
            bus,
            batch: DEFAULT_BATCH,
            poll: DEFAULT_POLL,
            retention: DEFAULT_RETENTION,
            purge_every: Duration::from_secs(3600),
            after_publish: None,
        }
    }
}

/// Called after a row's confirm, before it is marked sent (crash-window tests, metrics).
pub type AfterPublish = Arc<dyn Fn(i64, &str) -> BoxFuture<'static, ()> + Send + Sync>;

/// A relay builder; [`Relay::run`] starts it.
#[must_use = "a relay does nothing until .run() is awaited"]
pub struct Relay {
    outbox: Outbox,
    bus: Bus,
    batch: i64,
    poll: Duration,
    retention: Duration,
    purge_every: Duration,
    after_publish: Option<AfterPublish>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("table", &self.outbox.table).field("batch", &self.batch).finish()
    }
}

impl Relay {
    /// Rows read per batch (default 100).
    pub fn batch(mut self, n: i64) -> Self {
        self.batch = n.max(1);
        self
    }
    /// Polling interval, also the standby's lock retry interval (default 1 s).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll = d;
        self
    }
    /// How long published rows are kept (default 7 days).
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }
    /// How often the active relay purges (default hourly).
    pub fn purge_every(mut self, d: Duration) -> Self {
        self.purge_every = d;
        self
    }
    /// A hook awaited after each confirm and before the row is marked sent, with the row's `seq` and
    /// message id. For tests of the publish-then-crash window and for instrumentation.
    pub fn after_publish(mut self, f: impl Fn(i64, &str) -> BoxFuture<'static, ()> + Send + Sync + 'static) -> Self {
        self.after_publish = Some(Arc::new(f));
        self
    }

    /// Starts the relay task. It stands by until it holds the table's advisory lock.
    pub async fn run(self) -> Result<RelayHandle, OutboxError> {
        let shared = Arc::new(RelayShared::default());
        let s = Arc::clone(&shared);
        let table = self.outbox.table.clone();
        let task = tokio::spawn(
            async move {
                loop {
                    if let Err(e) = self.cycle(&s).await {
                        tracing::warn!(error = %e, "outbox relay: restarting");
                    }
                    s.leader.store(false, Ordering::SeqCst);
                    tokio::time::sleep(self.poll).await;
                }
            }
            .instrument(tracing::info_span!("outbox relay", table = %table)),
        );
        Ok(RelayHandle::new(task, shared))
    }

    /// Acquires the lock (standing by meanwhile), then relays until an error.
    async fn cycle(&self, shared: &RelayShared) -> Result<(), OutboxError> {
        // A dedicated connection: the session lock dies with it (a pooled connection would return
        // to the pool still holding the lock when the task is aborted).
        let mut lock_conn = self.outbox.pool.acquire().await?.detach();
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(RELAY_LOCK_CLASS)
                .bind(&*self.outbox.table)
                .fetch_one(&mut lock_conn)
                .await?;
            if got {
                break;
            }
            tokio::time::sleep(self.poll).await;
        }
        shared.leader.store(true, Ordering::SeqCst);
        tracing::debug!("outbox relay: active");
        let mut listener = PgListener::connect_with(&self.outbox.pool).await?;
        listener.listen(&self.outbox.channel()).await?;
        let mut last_purge = tokio::time::Instant::now();
        loop {
            // Still holding the lock? (a dead lock connection means another relay may take over)
            sqlx::query("SELECT 1").execute(&mut lock_conn).await?;
            self.drain(shared).await?;
            if last_purge.elapsed() >= self.purge_every {
                let n = self.outbox.purge(self.retention).await?;
                if n > 0 {
                    tracing::debug!(purged = n, "outbox retention purge");
                }
                last_purge = tokio::time::Instant::now();
            }
            match tokio::time::timeout(self.poll, listener.recv()).await {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Publishes unsent rows in `seq` order until none is left or a publish fails.
    async fn drain(&self, shared: &RelayShared) -> Result<(), OutboxError> {
        let t = &self.outbox.table;
        loop {
            let rows = sqlx::query(&format!(
                "SELECT seq, message_id, dest_kind, dest, kind, type_name, correlation_id, causation_id, reply_to,
                    content_type, headers, sent_at_ms, body
                 FROM {t} WHERE published_at IS NULL ORDER BY seq LIMIT $1"
            ))
            .bind(self.batch)
            .fetch_all(&self.outbox.pool)
            .await?;
            let n = rows.len() as i64;
            for row in rows {
                let seq: i64 = row.try_get("seq")?;
                let meta = Metadata {
                    id: row.try_get("message_id")?,
                    kind: parse_kind(row.try_get::<&str, _>("kind")?),
                    correlation_id: row.try_get("correlation_id")?,
                    causation_id: row.try_get("causation_id")?,
                    sent_at: UNIX_EPOCH + Duration::from_millis(row.try_get::<i64, _>("sent_at_ms")? as u64),
                    type_name: row.try_get("type_name")?,
                    reply_to: row.try_get("reply_to")?,
                    headers: serde_json::from_str::<BTreeMap<String, String>>(row.try_get("headers")?)
                        .unwrap_or_default(),
                    content_type: row.try_get("content_type")?,
                };
                let body: Vec<u8> = row.try_get("body")?;
                let dest_kind: String = row.try_get("dest_kind")?;
                let dest: String = row.try_get("dest")?;
                let (exchange, mandatory) = if dest_kind == "topic" {
                    if let Err(e) = self.bus.ensure_events_exchange().await {
                        self.failed(seq, &e.to_string()).await;
                        return Ok(());
                    }
                    (self.bus.config().events_exchange.clone(), false)
                } else {
                    (String::new(), true)
                };
                let out = Outbound {
                    exchange,
                    routing_key: dest.clone(),
                    properties: meta.to_properties(),
                    body: body.into(),
                    mandatory,
                };
                let span = tracing::info_span!("send", messaging.destination = %dest, messaging.message.id = %meta.id, outbox.seq = seq);
                match self.bus.transport().publish(out).instrument(span).await {
                    Ok(Published::Confirmed) => {}
                    Ok(Published::Unroutable) => {
                        self.failed(seq, &format!("no route to {dest}")).await;
                        return Ok(()); // keep the order: retry from this row after the poll interval
                    }
                    Err(e) => {
                        self.failed(seq, &e.to_string()).await;
                        return Ok(());
                    }
                }
                if let Some(hook) = &self.after_publish {
                    hook(seq, &meta.id).await;
                }
                sqlx::query(&format!("UPDATE {t} SET published_at = now(), attempts = attempts + 1 WHERE seq = $1"))
                    .bind(seq)
                    .execute(&self.outbox.pool)
                    .await?;
                shared.published.fetch_add(1, Ordering::Relaxed);
            }
            if n < self.batch {
                return Ok(());
            }
        }
    }

    async fn failed(&self, seq: i64, error: &str) {
        tracing::warn!(seq, error, "outbox relay: publish failed, retrying after the poll interval");
        let _ = sqlx::query(&format!(
            "UPDATE {} SET attempts = attempts + 1, last_error = $2 WHERE seq = $1",
            self.outbox.table
        ))
        .bind(seq)
        .bind(crate::envelope::truncate(error, 1024))
        .execute(&self.outbox.pool)
        .await;
    }
}
