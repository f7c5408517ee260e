//! The SQLite outbox and inbox (feature `sqlite`) on a real database file, on the embedded broker, a
//! Mailroom server and RabbitMQ: committed messages are delivered and rolled-back ones are not; the
//! relay killed between commit and publish and between publish and mark (task aborted, pool and
//! every in-memory piece dropped, the file reopened) loses nothing and the duplicate is absorbed by
//! the consumer's SQLite inbox; a handler's writes, its outbox row and its inbox row commit together.
#![cfg(feature = "sqlite")]

mod common;

use common::{env, eventually, Env, Target};
use mailroom::relay::RelayHandle;
use mailroom::sqlite::{self, Dest, SqliteInbox, SqliteOutbox};
use mailroom::{Envelope, HandlerError, WorkerHandle};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    n: u32,
}

fn db_path(env: &Env, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mailroom-sqlite-{}-{name}.db", env.prefix))
}

async fn open(path: &PathBuf) -> (SqlitePool, SqliteOutbox) {
    let pool = sqlite::open(path).await.unwrap();
    let ob = SqliteOutbox::new(pool.clone(), path, "outbox").unwrap();
    ob.migrate().await.unwrap();
    (pool, ob)
}

fn remove(path: &Path) {
    for suffix in ["", "-wal", "-shm", ".outbox.relay.lock"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// A consumer behind a SQLite inbox (its own database file) that records the ids its handler ran for.
struct Consumer {
    worker: WorkerHandle,
    handled: Arc<Mutex<Vec<String>>>,
    path: PathBuf,
}

async fn consumer(env: &Env, queue: &str) -> Consumer {
    let path = db_path(env, "inbox");
    let inbox = SqliteInbox::new(sqlite::open(&path).await.unwrap());
    inbox.migrate().await.unwrap();
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = handled.clone();
    let worker = env
        .bus
        .worker(queue)
        .idempotent(Arc::new(inbox))
        .handle(move |e: Envelope<OrderPlaced>, _ctx| {
            let h = h.clone();
            async move {
                h.lock().unwrap().push(e.id.clone());
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    Consumer { worker, handled, path }
}

impl Consumer {
    fn count(&self) -> usize {
        self.handled.lock().unwrap().len()
    }
    fn ids(&self) -> HashSet<String> {
        self.handled.lock().unwrap().iter().cloned().collect()
    }
}

async fn enqueue_committed(ob: &SqliteOutbox, pool: &SqlitePool, queue: &str, n: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut tx = pool.begin().await.unwrap();
        let e = Envelope::command(OrderPlaced { n: i });
        ob.enqueue(&mut tx, Dest::Queue(queue.to_owned()), &e).await.unwrap();
        tx.commit().await.unwrap();
        ids.push(e.id.clone());
    }
    ids
}

async fn committed_delivered_rolled_back_not(target: Target) {
    let env = env(target, "sqcommit").await;
    let q = env.q("orders");
    let path = db_path(&env, "outbox");
    let (pool, ob) = open(&path).await;
    let c = consumer(&env, &q).await;
    let relay = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    let mut committed = HashSet::new();
    for i in 0..10u32 {
        let mut tx = pool.begin().await.unwrap();
        let e = Envelope::command(OrderPlaced { n: i });
        ob.enqueue(&mut tx, q.as_str(), &e).await.unwrap();
        if i % 2 == 0 {
            tx.commit().await.unwrap();
            committed.insert(e.id.clone());
        } else {
            tx.rollback().await.unwrap();
        }
    }
    assert!(eventually(WAIT, || c.count() == 5).await, "5 committed messages delivered, got {}", c.count());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.ids(), committed, "exactly the committed ones");
    assert_eq!(ob.pending().await.unwrap(), 0);
    assert!(eventually(WAIT, || relay.published() == 5).await);
    relay.stop().await;
    c.worker.stop().await;
    remove(&path);
    remove(&c.path);
    env.cleanup().await;
}

/// A relay whose hook hangs after the `stop_at`-th confirm (published, not yet marked).
async fn relay_that_hangs_after(
    ob: &SqliteOutbox,
    env: &Env,
    stop_at: usize,
) -> (RelayHandle, Arc<tokio::sync::Notify>) {
    let hung = Arc::new(tokio::sync::Notify::new());
    let (h, count) = (hung.clone(), Arc::new(AtomicUsize::new(0)));
    let relay = ob
        .relay(env.bus.clone())
        .poll_interval(POLL)
        .batch(7)
        .after_publish(move |_seq, _id| {
            let (h, count) = (h.clone(), count.clone());
            Box::pin(async move {
                if count.fetch_add(1, Ordering::SeqCst) + 1 == stop_at {
                    h.notify_one();
                    std::future::pending::<()>().await;
                }
            })
        })
        .run()
        .await
        .unwrap();
    (relay, hung)
}

/// Rows committed while no relay runs are sent by the next one (commit-then-crash window); a relay
/// killed between a confirm and its mark leaves its row to be published again with the same id,
/// which the consumer's SQLite inbox absorbs. Each "crash" drops the relay, the pool and the outbox
/// handle, and the next "process" reopens the database file.
async fn crash_windows_lose_nothing(target: Target) {
    let env = env(target, "sqcrash").await;
    let q = env.q("orders");
    let path = db_path(&env, "outbox");
    let c = consumer(&env, &q).await;

    // 1. Committed while no relay runs, then the process dies: the window between commit and publish.
    let (pool, ob) = open(&path).await;
    let mut ids = enqueue_committed(&ob, &pool, &q, 10).await;
    pool.close().await;
    drop((pool, ob));

    // 2. A new process: its relay publishes 5 rows and dies after the 5th confirm, before its mark.
    let (pool, ob) = open(&path).await;
    let (relay, hung) = relay_that_hangs_after(&ob, &env, 5).await;
    tokio::time::timeout(WAIT, hung.notified()).await.expect("the relay reached the 5th publish");
    relay.abort();
    assert_eq!(ob.pending().await.unwrap(), 6, "rows 5..10 unmarked (row 5 published, not marked)");
    ids.extend(enqueue_committed(&ob, &pool, &q, 10).await);
    drop(relay);
    pool.close().await;
    drop((pool, ob));

    // 3. Another process: everything unmarked goes out; row 5 a second time, same id, absorbed.
    let (pool, ob) = open(&path).await;
    let relay = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    assert!(eventually(WAIT, || c.count() == 20).await, "all 20 handled, got {}", c.count());
    assert!(eventually(WAIT, || c.worker.metrics().duplicates >= 1).await, "the re-published row was absorbed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.count(), 20, "one effect per message");
    assert_eq!(c.ids(), ids.into_iter().collect::<HashSet<_>>(), "none lost");
    assert_eq!(c.worker.metrics().duplicates, 1);
    assert_eq!(ob.pending().await.unwrap(), 0);
    assert!(eventually(WAIT, || relay.published() == 16).await, "row 5 again, then 6..20");
    relay.stop().await;
    c.worker.stop().await;
    pool.close().await;
    remove(&path);
    remove(&c.path);
    env.cleanup().await;
}

/// A handler writes a row and enqueues an outbox message in the inbox's transaction: the first
/// attempt fails after writing (everything rolls back), the retry commits all three; a redelivered
/// copy is a duplicate and writes nothing.
async fn inbox_and_outbox_in_one_transaction(target: Target) {
    let env = env(target, "sqtx").await;
    let (input, output) = (env.q("in"), env.q("out"));
    let path = db_path(&env, "app");
    let (pool, ob) = open(&path).await;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (n INTEGER NOT NULL)").execute(&pool).await.unwrap();
    let inbox = SqliteInbox::new(pool.clone());
    inbox.migrate().await.unwrap();
    let relay = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    let out_seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let o = out_seen.clone();
    let out_worker = env
        .bus
        .worker(&output)
        .handle(move |e: Envelope<OrderPlaced>, _| {
            let o = o.clone();
            async move {
                o.lock().unwrap().push(e.body.n);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let (a, ob2, out_q) = (attempts.clone(), ob.clone(), output.clone());
    let worker = env
        .bus
        .worker(&input)
        .retry(mailroom::RetryPolicy::new().immediate(3))
        .idempotent(Arc::new(inbox))
        .handle(move |e: Envelope<OrderPlaced>, ctx: mailroom::Context| {
            let (a, ob, out_q) = (a.clone(), ob2.clone(), out_q.clone());
            async move {
                let mut tx = ctx.sqlite_tx()?;
                sqlx::query("INSERT INTO orders (n) VALUES (?)").bind(e.body.n).execute(&mut **tx).await?;
                ob.enqueue(&mut tx, out_q.as_str(), &ctx.derive(Envelope::event(e.body.clone()))).await?;
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(HandlerError::transient("first attempt fails after writing"));
                }
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let e = Envelope::command(OrderPlaced { n: 9 });
    env.bus.send_envelope(&input, e.clone()).await.unwrap();
    assert!(eventually(WAIT, || out_seen.lock().unwrap().len() == 1).await, "the outbox row left once committed");
    // The same message again (a redelivery): the inbox says duplicate, nothing is written.
    env.bus.send_envelope(&input, e).await.unwrap();
    assert!(eventually(WAIT, || worker.metrics().duplicates == 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 1, "the failed attempt's row rolled back, the duplicate wrote none");
    assert_eq!(*out_seen.lock().unwrap(), vec![9]);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    worker.stop().await;
    out_worker.stop().await;
    relay.stop().await;
    pool.close().await;
    remove(&path);
    env.cleanup().await;
}

/// Of two relays on one database file, one publishes; the other takes over when it dies.
async fn two_relays_one_publishes(target: Target) {
    let env = env(target, "sqtwo").await;
    let q = env.q("orders");
    let path = db_path(&env, "outbox");
    let (pool, ob) = open(&path).await;
    let c = consumer(&env, &q).await;
    let first = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    assert!(eventually(WAIT, || first.is_active()).await);
    let second = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_active(), "the lock file keeps the second on standby");
    let ids = enqueue_committed(&ob, &pool, &q, 5).await;
    assert!(eventually(WAIT, || c.count() == 5).await);
    assert_eq!(second.published(), 0);
    first.stop().await;
    assert!(eventually(WAIT, || second.is_active()).await, "the standby takes over");
    let more = enqueue_committed(&ob, &pool, &q, 5).await;
    assert!(eventually(WAIT, || c.count() == 10).await);
    assert_eq!(c.ids(), ids.into_iter().chain(more).collect::<HashSet<_>>());
    second.stop().await;
    c.worker.stop().await;
    pool.close().await;
    remove(&path);
    remove(&c.path);
    env.cleanup().await;
}

on_all_targets!(
    committed_delivered_rolled_back_not,
    crash_windows_lose_nothing,
    inbox_and_outbox_in_one_transaction,
    two_relays_one_publishes,
);
