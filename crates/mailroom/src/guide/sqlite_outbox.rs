//! # Outbox and inbox on SQLite (feature `sqlite`)
//!
//! For an application without PostgreSQL: [`mailroom::sqlite`](crate::sqlite) keeps the outbox and
//! the inbox in a SQLite database file (`Cargo.toml`: `mailroom = { version = "…", features =
//! ["sqlite"] }`). A message enqueued with [`SqliteOutbox::enqueue`](crate::sqlite::SqliteOutbox::enqueue)
//! in your transaction leaves only if it commits; the relay publishes it with confirms and marks it
//! sent after its confirm. A consumer with [`SqliteInbox`](crate::sqlite::SqliteInbox) writes through
//! [`Context::sqlite_tx`](crate::Context::sqlite_tx): its rows, its own outbox rows and the inbox row
//! commit together, only when the handler succeeds.
//!
//! Pitfalls:
//! - **Duplicates still arrive**: a relay killed between a confirm and its mark re-publishes the row
//!   with the same id. Consumers need the inbox (or another idempotent store) for exactly-once effects.
//! - **One writer at a time**: SQLite serialises write transactions, and an inbox claim holds the write
//!   lock while the handler runs. Keep handlers short; use few concurrent handlers per database; a wait
//!   longer than the busy timeout (10 s) fails the attempt, which is retried.
//! - **Open the database with [`sqlite::open`](crate::sqlite::open)** (WAL, `synchronous = FULL`, the
//!   busy timeout) and use that pool for your own tables too, or your writes and the outbox row are not
//!   in one transaction.
//! - **The database is local**: one relay per file is active (a lock file next to it); processes on
//!   other machines cannot share it. That is what PostgreSQL is for.
//!
//! ```
//! use mailroom::sqlite::{self, Dest, SqliteInbox, SqliteOutbox};
//! use mailroom::{Bus, Envelope};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("mailroom-guide-sqlite-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let bus = Bus::embedded()?;
//! let file = dir.join("app.db");
//! let db = sqlite::open(&file).await?;
//! sqlx::query("CREATE TABLE IF NOT EXISTS payments (order_id INTEGER)").execute(&db).await?;
//! let outbox = SqliteOutbox::new(db.clone(), &file, "outbox")?;
//! outbox.migrate().await?;
//! let inbox = SqliteInbox::new(db.clone());
//! inbox.migrate().await?;
//! let relay = outbox.relay(bus.clone()).run().await?;
//!
//! // The consumer: its payment row and the inbox row commit together.
//! let payments = bus.worker("payments").idempotent(Arc::new(inbox))
//!     .handle(|e: Envelope<i64>, ctx| async move {
//!         let mut tx = ctx.sqlite_tx()?;
//!         sqlx::query("INSERT INTO payments (order_id) VALUES (?)").bind(e.body).execute(&mut **tx).await?;
//!         Ok(())
//!     })
//!     .run().await?;
//!
//! // The producer: the command leaves only because the transaction commits.
//! let mut tx = db.begin().await?;
//! let cmd = Envelope::command(42_i64);
//! outbox.enqueue(&mut tx, Dest::Queue("payments".into()), &cmd).await?;
//! tx.commit().await?;
//! bus.send_envelope("payments", cmd).await?; // a duplicate (same id): absorbed by the inbox
//!
//! let count = || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM payments").fetch_one(&db).await };
//! while count().await? < 1 { tokio::time::sleep(Duration::from_millis(10)).await; }
//! tokio::time::sleep(Duration::from_millis(200)).await;
//! assert_eq!(count().await?, 1);
//! # payments.stop().await; relay.stop().await;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
