//! The transactional outbox and the idempotent inbox on SQLite (feature `sqlite`): one database
//! file, through sqlx, for applications with no PostgreSQL that still want effectively-once effects.
//!
//! - [`SqliteOutbox::enqueue`] inserts the message in the caller's transaction; it leaves only if
//!   that transaction commits. The relay ([`SqliteOutbox::relay`]) publishes unsent rows in `seq`
//!   order with publisher confirms and marks each row sent after *its* confirm. One relay per
//!   database file is active (an exclusive lock on `<file>.relay.lock`, released by the kernel when
//!   its process dies); others stand by. It polls (SQLite has no LISTEN/NOTIFY), and an enqueue
//!   through this handle wakes a relay of the same process at once.
//! - [`SqliteInbox`] records `(consumer, message_id)` in a transaction the handler joins
//!   ([`Context::sqlite_tx`]) and the pipeline commits only when the handler succeeded: the
//!   handler's writes, its outbox rows and the inbox row commit together or not at all.
//!
//! Crash windows, as with PostgreSQL: killed between commit and publish, the row waits on disk and
//! the next relay sends it; killed between publish and mark, the row is sent again with the same
//! message id and the consumer's inbox absorbs it.
//!
//! SQLite specifics: the database runs in WAL mode with `synchronous = FULL` (a committed row
//! survives a power cut); there is one writer at a time, so a handler's inbox transaction holds the
//! write lock while the handler runs (keep handlers short, or expect them to queue up); waits for the
//! lock are bounded by the busy timeout (10 s) and surface as retriable errors.

use crate::bus::{Bus, Context};
use crate::envelope::{millis, Envelope, MessageKind, Metadata, Payload};
use crate::error::HandlerError;
use crate::inbox::{Claim, InboxStore, UnitOfWork, UnitSlot};
use crate::relay::{RelayHandle, RelayShared};
use crate::trace::{TraceContext, TRACEPARENT};
use crate::transport::{BoxFuture, Outbound, Published};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Default relay polling interval.
pub const DEFAULT_POLL: Duration = Duration::from_millis(200);
/// Default rows per relay batch.
pub const DEFAULT_BATCH: i64 = 100;
/// Default retention of sent outbox rows and processed inbox ids.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a statement waits for SQLite's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// SQLite outbox and inbox errors.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Db(#[from] sqlx::Error),
    /// The body could not be encoded.
    #[error("outbox encode: {0}")]
    Encode(String),
    /// A table name that is not a plain identifier.
    #[error("invalid table name {0:?} (letters, digits and _ only)")]
    InvalidTable(String),
    /// The relay's lock file could not be opened.
    #[error("relay lock {0}: {1}")]
    Lock(PathBuf, std::io::Error),
}

/// Where an outboxed message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A queue, through the default exchange, published mandatory (an unroutable row is retried).
    Queue(String),
    /// A topic on the bus's events exchange.
    Topic(String),
}

impl From<&str> for Dest {
    /// A bare name is a queue.
    fn from(s: &str) -> Dest {
        Dest::Queue(s.to_owned())
    }
}

/// Opens (creating if needed) the database file at `path` with the settings the outbox and inbox
/// rely on: WAL, `synchronous = FULL`, a busy timeout. Use this pool for the application's own
/// tables too, so their writes share the outbox's transactions.
pub async fn open(path: impl AsRef<Path>) -> Result<SqlitePool, SqliteError> {
    let options = SqliteConnectOptions::new()
        .filename(path.as_ref())
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT);
    Ok(SqlitePoolOptions::new().max_connections(8).connect_with(options).await?)
}

fn now_ms() -> i64 {
    millis(SystemTime::now()) as i64
}

fn identifier(table: &str) -> Result<String, SqliteError> {
    let ok = !table.is_empty()
        && table.len() <= 40
        && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !table.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(table.to_ascii_lowercase())
    } else {
        Err(SqliteError::InvalidTable(table.to_owned()))
    }
}

/// An outbox table in a SQLite database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    table: Arc<str>,
    lock_path: PathBuf,
    wake: Arc<Notify>,
}

impl SqliteOutbox {
    /// An outbox in `table` of `pool`'s database, whose file is `path` (the relay's lock file sits
    /// next to it); call [`SqliteOutbox::migrate`] once before use.
    pub fn new(pool: SqlitePool, path: impl AsRef<Path>, table: &str) -> Result<SqliteOutbox, SqliteError> {
        let table = identifier(table)?;
        let mut lock = path.as_ref().as_os_str().to_owned();
        lock.push(format!(".{table}.relay.lock"));
        Ok(SqliteOutbox { pool, table: table.into(), lock_path: PathBuf::from(lock), wake: Arc::default() })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Creates the table and its index of unsent rows if they do not exist.
    pub async fn migrate(&self) -> Result<(), SqliteError> {
        let t = &self.table;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id TEXT NOT NULL,
                dest_kind TEXT NOT NULL,
                dest TEXT NOT NULL,
                kind TEXT NOT NULL,
                type_name TEXT NOT NULL,
                correlation_id TEXT,
                causation_id TEXT,
                reply_to TEXT,
                content_type TEXT,
                headers TEXT NOT NULL,
                sent_at_ms INTEGER NOT NULL,
                body BLOB NOT NULL,
                created_ms INTEGER NOT NULL,
                published_ms INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT
            )"
        ))
        .execute(&self.pool)
        .await?;
        sqlx::query(&format!("CREATE INDEX IF NOT EXISTS {t}_unsent ON {t} (seq) WHERE published_ms IS NULL"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Enqueues `env` for `dest` in the caller's transaction (published only if it commits); returns
    /// the row's `seq`. The envelope's id is kept, so every publish of this row carries it.
    pub async fn enqueue<T: Payload>(
        &self,
        tx: &mut SqliteConnection,
        dest: impl Into<Dest>,
        env: &Envelope<T>,
    ) -> Result<i64, SqliteError> {
        let (mut meta, body) = (env.meta.clone(), env.body.encode().map_err(SqliteError::Encode)?);
        meta.content_type = Some(env.body.content_type().to_owned());
        if !meta.headers.contains_key(TRACEPARENT) {
            meta.headers.insert(TRACEPARENT.into(), TraceContext::new_root().to_string());
        }
        self.enqueue_raw(tx, &dest.into(), &meta, &body).await
    }

    /// Enqueues encoded metadata and body (the saga store's path); wakes this process's relay.
    pub(crate) async fn enqueue_raw(
        &self,
        tx: &mut SqliteConnection,
        dest: &Dest,
        meta: &Metadata,
        body: &[u8],
    ) -> Result<i64, SqliteError> {
        let (dest_kind, dest) = match dest {
            Dest::Queue(q) => ("queue", q),
            Dest::Topic(t) => ("topic", t),
        };
        let headers = serde_json::to_string(&meta.headers).map_err(|e| SqliteError::Encode(e.to_string()))?;
        let seq: i64 = sqlx::query_scalar(&format!(
            "INSERT INTO {} (message_id, dest_kind, dest, kind, type_name, correlation_id, causation_id, reply_to,
                content_type, headers, sent_at_ms, body, created_ms)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
            self.table
        ))
        .bind(&meta.id)
        .bind(dest_kind)
        .bind(dest)
        .bind(meta.kind.as_str())
        .bind(&meta.type_name)
        .bind(&meta.correlation_id)
        .bind(&meta.causation_id)
        .bind(&meta.reply_to)
        .bind(&meta.content_type)
        .bind(headers)
        .bind(millis(meta.sent_at) as i64)
        .bind(body)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        // Wakes this process's relay; it finds the row once the transaction commits (or polls).
        self.wake.notify_one();
        Ok(seq)
    }

    /// Rows not yet published.
    pub async fn pending(&self) -> Result<i64, SqliteError> {
        let q = format!("SELECT count(*) FROM {} WHERE published_ms IS NULL", self.table);
        Ok(sqlx::query_scalar(&q).fetch_one(&self.pool).await?)
    }

    /// Deletes published rows older than `retention`; returns how many.
    pub async fn purge(&self, retention: Duration) -> Result<u64, SqliteError> {
        let q = format!("DELETE FROM {} WHERE published_ms IS NOT NULL AND published_ms < ?", self.table);
        let r = sqlx::query(&q).bind(now_ms() - retention.as_millis() as i64).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }

    /// A relay publishing this outbox through `bus`.
    pub fn relay(&self, bus: Bus) -> SqliteRelay {
        SqliteRelay {
            outbox: self.clone(),
            bus,
            batch: DEFAULT_BATCH,
            poll: DEFAULT_POLL,
            retention: DEFAULT_RETENTION,
            after_publish: None,
        }
    }
}

/// Called after a row's confirm, before it is marked sent (crash-window tests, metrics).
pub type AfterPublish = Arc<dyn Fn(i64, &str) -> BoxFuture<'static, ()> + Send + Sync>;

/// A relay builder; [`SqliteRelay::run`] starts it.
#[must_use = "a relay does nothing until .run() is awaited"]
pub struct SqliteRelay {
    outbox: SqliteOutbox,
    bus: Bus,
    batch: i64,
    poll: Duration,
    retention: Duration,
    after_publish: Option<AfterPublish>,
}

impl std::fmt::Debug for SqliteRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteRelay").field("table", &self.outbox.table).finish()
    }
}

impl SqliteRelay {
    /// Rows read per batch (default 100).
    pub fn batch(mut self, n: i64) -> Self {
        self.batch = n.max(1);
        self
    }
    /// Polling interval, also the standby's lock retry interval (default 200 ms).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll = d;
        self
    }
    /// How long published rows are kept (default 7 days; purged hourly by the active relay).
    pub fn retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }
    /// A hook awaited after each confirm and before the row is marked sent, with its `seq` and
    /// message id (for tests of the publish-then-crash window, and instrumentation).
    pub fn after_publish(mut self, f: impl Fn(i64, &str) -> BoxFuture<'static, ()> + Send + Sync + 'static) -> Self {
        self.after_publish = Some(Arc::new(f));
        self
    }

    /// Starts the relay task; it stands by until it holds the database's relay lock.
    pub async fn run(self) -> Result<RelayHandle, SqliteError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.outbox.lock_path)
            .map_err(|e| SqliteError::Lock(self.outbox.lock_path.clone(), e))?;
        let shared = Arc::new(RelayShared::default());
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // The lock is held as long as the task (and so `file`) lives; the kernel drops it with the process.
            while !matches!(file.try_lock(), Ok(())) {
                tokio::time::sleep(self.poll).await;
            }
            s.leader.store(true, Ordering::SeqCst);
            let mut last_purge = tokio::time::Instant::now();
            loop {
                if let Err(e) = self.drain(&s).await {
                    tracing::warn!(error = %e, table = %self.outbox.table, "sqlite outbox relay: retrying");
                }
                if last_purge.elapsed() >= Duration::from_secs(3600) {
                    if let Err(e) = self.outbox.purge(self.retention).await {
                        tracing::warn!(error = %e, "sqlite outbox purge failed");
                    }
                    last_purge = tokio::time::Instant::now();
                }
                let _ = tokio::time::timeout(self.poll, self.outbox.wake.notified()).await;
            }
        });
        Ok(RelayHandle::new(task, shared))
    }

    /// Publishes unsent rows in `seq` order until none is left or a publish fails.
    async fn drain(&self, shared: &RelayShared) -> Result<(), SqliteError> {
        let t = &self.outbox.table;
        loop {
            let rows = sqlx::query(&format!(
                "SELECT seq, message_id, dest_kind, dest, kind, type_name, correlation_id, causation_id, reply_to,
                    content_type, headers, sent_at_ms, body
                 FROM {t} WHERE published_ms IS NULL ORDER BY seq LIMIT ?"
            ))
            .bind(self.batch)
            .fetch_all(&self.outbox.pool)
            .await?;
            let n = rows.len() as i64;
            for row in rows {
                let seq: i64 = row.try_get("seq")?;
                let meta = Metadata {
                    id: row.try_get("message_id")?,
                    kind: match row.try_get::<&str, _>("kind")? {
                        "command" => MessageKind::Command,
                        "event" => MessageKind::Event,
                        _ => MessageKind::Document,
                    },
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
                let dest: String = row.try_get("dest")?;
                let topic = row.try_get::<&str, _>("dest_kind")? == "topic";
                if let Err(e) = self.publish(topic, &dest, &meta, body).await {
                    tracing::warn!(seq, error = %e, "sqlite outbox relay: publish failed, retrying after the poll interval");
                    let q = format!("UPDATE {t} SET attempts = attempts + 1, last_error = ? WHERE seq = ?");
                    let _ = sqlx::query(&q)
                        .bind(crate::envelope::truncate(&e, 1024))
                        .bind(seq)
                        .execute(&self.outbox.pool)
                        .await;
                    return Ok(()); // keep the order: retry from this row
                }
                if let Some(hook) = &self.after_publish {
                    hook(seq, &meta.id).await;
                }
                sqlx::query(&format!("UPDATE {t} SET published_ms = ?, attempts = attempts + 1 WHERE seq = ?"))
                    .bind(now_ms())
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

    async fn publish(&self, topic: bool, dest: &str, meta: &Metadata, body: Vec<u8>) -> Result<(), String> {
        let (exchange, mandatory) = if topic {
            self.bus.ensure_events_exchange().await.map_err(|e| e.to_string())?;
            (self.bus.config().events_exchange.clone(), false)
        } else {
            (String::new(), true)
        };
        let out = Outbound {
            exchange,
            routing_key: dest.to_owned(),
            properties: meta.to_properties(),
            body: body.into(),
            mandatory,
        };
        match self.bus.transport().publish(out).await {
            Ok(Published::Confirmed) => Ok(()),
            Ok(Published::Unroutable) => Err(format!("no route to {dest}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A processed-id store in SQLite whose rows commit with the handler's own writes.
#[derive(Debug, Clone)]
pub struct SqliteInbox {
    pool: SqlitePool,
    retention: Duration,
}

/// The handler's SQLite transaction, lent by [`Context::sqlite_tx`]: use `&mut **tx` as the executor
/// of sqlx queries (and of [`SqliteOutbox::enqueue`]). Dropping it hands it back to the pipeline,
/// which commits it if the handler succeeds; do not commit it yourself.
pub struct SqliteTx {
    unit: Option<Box<SqliteUnit>>,
    slot: UnitSlot,
}

impl std::fmt::Debug for SqliteTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteTx")
    }
}

impl std::ops::Deref for SqliteTx {
    type Target = Transaction<'static, Sqlite>;
    fn deref(&self) -> &Self::Target {
        &self.unit.as_ref().expect("present until drop").tx
    }
}

impl std::ops::DerefMut for SqliteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.unit.as_mut().expect("present until drop").tx
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if let Some(unit) = self.unit.take() {
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(unit as Box<dyn UnitOfWork>);
        }
    }
}

struct SqliteUnit {
    tx: Transaction<'static, Sqlite>,
}

impl Context {
    /// The SQLite transaction of this delivery's [`SqliteInbox`] claim: the handler's writes (and its
    /// outbox rows) commit with the inbox row, only if the handler succeeds.
    pub fn sqlite_tx(&self) -> Result<SqliteTx, HandlerError> {
        let taken = self.unit.as_ref().and_then(|slot| {
            let unit = slot.lock().unwrap_or_else(|e| e.into_inner()).take()?;
            match unit.into_any().downcast::<SqliteUnit>() {
                Ok(u) => Some(SqliteTx { unit: Some(u), slot: Arc::clone(slot) }),
                Err(_) => None, // another store's unit of work: not ours to lend
            }
        });
        taken.ok_or_else(|| {
            HandlerError::permanent(
                "no SQLite transaction: the worker needs .idempotent(SqliteInbox), and one SqliteTx at a time",
            )
            .with_kind("config")
        })
    }
}

fn text(e: sqlx::Error) -> String {
    e.to_string()
}

impl SqliteInbox {
    /// An inbox on `pool` (the application's own, so handlers write through the same database); call
    /// [`SqliteInbox::migrate`] once before use.
    pub fn new(pool: SqlitePool) -> SqliteInbox {
        SqliteInbox { pool, retention: DEFAULT_RETENTION }
    }

    /// How long processed ids are kept (default 7 days).
    pub fn retention(mut self, retention: Duration) -> SqliteInbox {
        self.retention = retention;
        self
    }

    /// Creates the `inbox` table if it does not exist.
    pub async fn migrate(&self) -> Result<(), SqliteError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS inbox (
                consumer TEXT NOT NULL,
                message_id TEXT NOT NULL,
                processed_ms INTEGER NOT NULL,
                PRIMARY KEY (consumer, message_id)
            )",
        )
        .execute(&self.pool)
        .await?;
        sqlx::query("CREATE INDEX IF NOT EXISTS inbox_processed ON inbox (processed_ms)").execute(&self.pool).await?;
        Ok(())
    }

    /// Deletes ids processed longer ago than the retention window; returns how many.
    pub async fn purge(&self) -> Result<u64, SqliteError> {
        let r = sqlx::query("DELETE FROM inbox WHERE processed_ms < ?")
            .bind(now_ms() - self.retention.as_millis() as i64)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

const RECORD: &str = "INSERT INTO inbox (consumer, message_id, processed_ms) VALUES (?, ?, ?) ON CONFLICT DO NOTHING";

impl InboxStore for SqliteInbox {
    fn seen<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = ? AND message_id = ?)")
                .bind(consumer)
                .bind(message_id)
                .fetch_one(&self.pool)
                .await
                .map_err(text)
        })
    }

    fn record<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            sqlx::query(RECORD)
                .bind(consumer)
                .bind(message_id)
                .bind(now_ms())
                .execute(&self.pool)
                .await
                .map(|_| ())
                .map_err(text)
        })
    }

    fn begin<'a>(&'a self, consumer: &'a str, message_id: &'a str) -> Option<BoxFuture<'a, Result<Claim, String>>> {
        Some(Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(text)?;
            // The first statement writes, so the transaction takes SQLite's write lock here (waiting up
            // to the busy timeout) and sees every committed claim: a duplicate inserts nothing.
            let inserted = sqlx::query(RECORD)
                .bind(consumer)
                .bind(message_id)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(text)?
                .rows_affected();
            if inserted == 0 {
                tx.rollback().await.map_err(text)?;
                return Ok(Claim::Duplicate);
            }
            Ok(Claim::Claimed(Box::new(SqliteUnit { tx })))
        }))
    }
}

impl UnitOfWork for SqliteUnit {
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
