//! The transactional outbox against the local PostgreSQL (`MAILROOM_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), on the embedded broker, a Mailroom server and RabbitMQ:
//! committed messages are delivered and rolled-back ones are not, a relay killed between commit and
//! publish or between publish and mark loses nothing (the duplicate carries the same id and the
//! idempotent consumer absorbs it), a late-committing lower `seq` is still sent, and of two relays on
//! one table only one publishes.
#![cfg(feature = "postgres")]

mod common;

use common::{can_run, env, eventually, pg_url, Env, Service, Target};
use mailroom::inbox::postgres::PgInbox;
use mailroom::outbox::{Dest, Outbox, RelayHandle};
use mailroom::{Envelope, InboxStore, MemoryInbox, WorkerHandle};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    n: u32,
}

async fn outbox(test: &str) -> (Outbox, PgPool) {
    let pool = PgPool::connect(&pg_url()).await.expect("the local PostgreSQL (set MAILROOM_PG_URL)");
    let table = format!("outbox_{test}_{}", &mailroom::envelope::new_message_id().replace('-', "")[24..]);
    let ob = Outbox::new(pool.clone(), &table).unwrap();
    ob.migrate().await.unwrap();
    (ob, pool)
}

async fn drop_table(ob: &Outbox) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", ob.table())).execute(ob.pool()).await.unwrap();
}

/// A consumer that records every id its handler ran for, behind an idempotent store.
struct Consumer {
    worker: WorkerHandle,
    handled: Arc<Mutex<Vec<String>>>,
}

async fn consumer(env: &Env, queue: &str, store: Arc<dyn InboxStore>) -> Consumer {
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = handled.clone();
    let worker = env
        .bus
        .worker(queue)
        .idempotent(store)
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
    Consumer { worker, handled }
}

impl Consumer {
    fn count(&self) -> usize {
        self.handled.lock().unwrap().len()
    }
    fn ids(&self) -> HashSet<String> {
        self.handled.lock().unwrap().iter().cloned().collect()
    }
}

async fn enqueue_committed(ob: &Outbox, pool: &PgPool, queue: &str, n: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut tx = pool.begin().await.unwrap();
        let e = Envelope::command(OrderPlaced { n: i });
        ob.enqueue(&mut tx, Dest::queue(queue), &e).await.unwrap();
        tx.commit().await.unwrap();
        ids.push(e.id.clone());
    }
    ids
}

async fn committed_delivered_rolled_back_not(target: Target) {
    let env = env(target, "obcommit").await;
    let q = env.q("orders");
    let (ob, pool) = outbox("commit").await;
    let c = consumer(&env, &q, Arc::new(MemoryInbox::default())).await;
    let relay = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();

    let mut committed = HashSet::new();
    for i in 0..10u32 {
        let mut tx = pool.begin().await.unwrap();
        let e = Envelope::command(OrderPlaced { n: i });
        ob.enqueue(&mut tx, Dest::queue(&q), &e).await.unwrap();
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
    assert_eq!(c.count(), 5);
    assert_eq!(ob.pending().await.unwrap(), 0);
    assert!(eventually(WAIT, || relay.published() == 5).await);
    relay.stop().await;
    c.worker.stop().await;
    drop_table(&ob).await;
    env.cleanup().await;
}

/// Topic destinations go to the events exchange; a subscriber group gets them.
async fn topic_destination(target: Target) {
    let env = env(target, "obtopic").await;
    let group = env.q("billing");
    let (ob, pool) = outbox("topic").await;
    let got = Arc::new(AtomicUsize::new(0));
    let g = got.clone();
    let topic = format!("{group}.placed");
    let sub = env
        .bus
        .subscribe(&format!("{group}.*"))
        .group(&group)
        .handle(move |_e: Envelope<OrderPlaced>, _ctx| {
            let g = g.clone();
            async move {
                g.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let relay = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    ob.enqueue(&mut tx, Dest::topic(&topic), &Envelope::event(OrderPlaced { n: 1 })).await.unwrap();
    tx.commit().await.unwrap();
    assert!(eventually(WAIT, || got.load(Ordering::SeqCst) == 1).await);
    relay.stop().await;
    sub.stop().await;
    drop_table(&ob).await;
    env.cleanup().await;
}

/// A relay whose hook hangs after the `stop_at`-th confirm (published, not yet marked), so the test
/// can kill it in that window.
async fn relay_that_hangs_after(ob: &Outbox, env: &Env, stop_at: usize) -> (RelayHandle, Arc<tokio::sync::Notify>) {
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

/// Rows committed while no relay runs (the relay died between commit and publish) are sent by the
/// next relay; a relay killed between a confirm and its mark leaves one row to be published again,
/// with the same id, and the idempotent consumer runs the handler once per id.
async fn crash_windows_lose_nothing(target: Target, store: Arc<dyn InboxStore>) {
    let env = env(target, "obcrash").await;
    let q = env.q("orders");
    let (ob, pool) = outbox("crash").await;
    let c = consumer(&env, &q, store).await;

    // 1. Committed before any relay runs: the window between commit and publish.
    let mut ids = enqueue_committed(&ob, &pool, &q, 10).await;
    // 2. The relay publishes 5 rows, then is killed after the 5th confirm and before its mark.
    let (relay, hung) = relay_that_hangs_after(&ob, &env, 5).await;
    tokio::time::timeout(WAIT, hung.notified()).await.expect("the relay reached the 5th publish");
    relay.abort();
    assert_eq!(ob.pending().await.unwrap(), 6, "rows 5..10 unmarked (row 5 published, not marked)");
    // More commits while no relay runs.
    ids.extend(enqueue_committed(&ob, &pool, &q, 10).await);

    // 3. A new relay sends everything unmarked; row 5 goes out a second time with the same id.
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
    drop_table(&ob).await;
    // The PostgreSQL inbox's rows (the memory inbox has none, and its table may not exist yet).
    let _ = sqlx::query("DELETE FROM inbox WHERE consumer = $1").bind(&q).execute(&pool).await;
    env.cleanup().await;
}

async fn crash_windows_memory_inbox(target: Target) {
    crash_windows_lose_nothing(target, Arc::new(MemoryInbox::default())).await
}

async fn crash_windows_pg_inbox(target: Target) {
    let inbox = PgInbox::connect(&pg_url()).await.unwrap();
    crash_windows_lose_nothing(target, Arc::new(inbox)).await
}

/// A row whose transaction took a lower `seq` but committed after a higher one was published is
/// still sent (rows are marked one by one, not by a high-water mark).
async fn late_commit_still_sent(target: Target) {
    let env = env(target, "oblate").await;
    let q = env.q("orders");
    let (ob, pool) = outbox("late").await;
    let c = consumer(&env, &q, Arc::new(MemoryInbox::default())).await;
    let relay = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();

    let mut slow = pool.begin().await.unwrap();
    let early = Envelope::command(OrderPlaced { n: 1 });
    let early_seq = ob.enqueue(&mut slow, Dest::queue(&q), &early).await.unwrap();
    let mut fast = pool.begin().await.unwrap();
    let later = Envelope::command(OrderPlaced { n: 2 });
    let later_seq = ob.enqueue(&mut fast, Dest::queue(&q), &later).await.unwrap();
    assert!(early_seq < later_seq);
    fast.commit().await.unwrap();
    assert!(eventually(WAIT, || c.count() == 1).await);
    slow.commit().await.unwrap();
    assert!(eventually(WAIT, || c.count() == 2).await, "the late commit was sent");
    assert_eq!(c.ids(), [early.id.clone(), later.id.clone()].into_iter().collect());
    relay.stop().await;
    c.worker.stop().await;
    drop_table(&ob).await;
    env.cleanup().await;
}

/// Two relays on one table: one holds the lock and publishes everything, the other stands by; when
/// the active one is killed the standby takes over.
async fn two_relays_one_publishes(target: Target) {
    let env = env(target, "obtwo").await;
    let q = env.q("orders");
    let (ob, pool) = outbox("two").await;
    let c = consumer(&env, &q, Arc::new(MemoryInbox::default())).await;
    let other_bus = env.another_bus().await;
    let a = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    let b = ob.relay(other_bus).poll_interval(POLL).run().await.unwrap();
    assert!(eventually(WAIT, || a.is_active() || b.is_active()).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.is_active() != b.is_active(), "exactly one active relay");

    enqueue_committed(&ob, &pool, &q, 30).await;
    assert!(eventually(WAIT, || c.count() == 30).await);
    let (active, standby) = if a.is_active() { (a, b) } else { (b, a) };
    assert!(eventually(WAIT, || active.published() == 30).await, "the active relay marked all 30");
    assert_eq!(standby.published(), 0, "the standby published nothing");
    assert_eq!(c.worker.metrics().duplicates, 0);

    active.abort();
    assert!(eventually(WAIT, || standby.is_active()).await, "the standby took over");
    enqueue_committed(&ob, &pool, &q, 5).await;
    assert!(eventually(WAIT, || c.count() == 35).await);
    assert!(eventually(WAIT, || standby.published() == 5).await);
    standby.stop().await;
    c.worker.stop().await;
    drop_table(&ob).await;
    env.cleanup().await;
}

/// Inbox in, outbox out: a handler with a [`PgInbox`] enqueues its follow-up message in `ctx.tx()`.
/// Its first attempt fails after enqueueing (the outbox row rolls back with the inbox row), the retry
/// commits both, and a duplicate of the incoming message enqueues nothing: one follow-up in the end.
async fn inbox_and_outbox_in_one_transaction(target: Target) {
    let env = env(target, "obinout").await;
    let (orders, invoices) = (env.q("orders"), env.q("invoices"));
    let (ob, pool) = outbox("inout").await;
    let inbox = Arc::new(PgInbox::connect(&pg_url()).await.unwrap());
    let c = consumer(&env, &invoices, Arc::new(MemoryInbox::default())).await;
    let relay = ob.relay(env.bus.clone()).poll_interval(POLL).run().await.unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let (a, o, inv) = (attempts.clone(), ob.clone(), invoices.clone());
    let worker = env
        .bus
        .worker(&orders)
        .idempotent(inbox.clone())
        .retry(mailroom::RetryPolicy::new().immediate(2))
        .handle(move |e: Envelope<OrderPlaced>, ctx| {
            let (a, o, inv) = (a.clone(), o.clone(), inv.clone());
            async move {
                let mut tx = ctx.tx()?;
                let follow_up = ctx.derive(Envelope::command(OrderPlaced { n: e.body.n + 100 }));
                o.enqueue(&mut tx, Dest::queue(&inv), &follow_up).await.map_err(mailroom::HandlerError::transient)?;
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(mailroom::HandlerError::transient("crashed after enqueueing"));
                }
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let order = Envelope::command(OrderPlaced { n: 1 });
    env.bus.send_envelope(&orders, order.clone()).await.unwrap();
    assert!(eventually(WAIT, || worker.metrics().ok == 1).await);
    env.bus.send_envelope(&orders, order.clone()).await.unwrap();
    assert!(eventually(WAIT, || worker.metrics().duplicates == 1).await);
    assert!(eventually(WAIT, || c.count() == 1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.count(), 1, "one follow-up");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", ob.table())).fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 1, "the failed attempt's outbox row rolled back");
    relay.stop().await;
    worker.stop().await;
    c.worker.stop().await;
    drop_table(&ob).await;
    sqlx::query("DELETE FROM inbox WHERE consumer = $1").bind(&orders).execute(&pool).await.unwrap();
    env.cleanup().await;
}

/// Relay throughput (one confirm round trip per row): `cargo test --test outbox throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn throughput() {
    if !can_run(&[Service::Postgres], "outbox::throughput") {
        return;
    }
    for target in [Target::Embedded, Target::Server] {
        let env = env(target, "obrate").await;
        let q = env.q("orders");
        let (ob, pool) = outbox("rate").await;
        env.bus.declare_queue(&q).await.unwrap();
        let n = 2000u32;
        let mut tx = pool.begin().await.unwrap();
        for i in 0..n {
            ob.enqueue(&mut tx, Dest::queue(&q), &Envelope::command(OrderPlaced { n: i })).await.unwrap();
        }
        tx.commit().await.unwrap();
        let t0 = std::time::Instant::now();
        let relay = ob.relay(env.bus.clone()).poll_interval(POLL).batch(500).run().await.unwrap();
        assert!(eventually(Duration::from_secs(120), || relay.published() == n as u64).await);
        let secs = t0.elapsed().as_secs_f64();
        println!("{target:?}: {n} rows in {secs:.2} s = {:.0} rows/s", n as f64 / secs);
        relay.stop().await;
        drop_table(&ob).await;
        env.cleanup().await;
    }
}

/// Published rows older than the retention are purged by the active relay; unsent ones never are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purges_sent_rows_after_retention() {
    if !can_run(&[Service::Postgres], "outbox::purges_sent_rows_after_retention") {
        return;
    }
    let env = env(Target::Embedded, "obpurge").await;
    let q = env.q("orders");
    let (ob, pool) = outbox("purge").await;
    let c = consumer(&env, &q, Arc::new(MemoryInbox::default())).await;
    enqueue_committed(&ob, &pool, &q, 3).await;
    let relay = ob
        .relay(env.bus.clone())
        .poll_interval(POLL)
        .retention(Duration::from_millis(200))
        .purge_every(Duration::from_millis(100))
        .run()
        .await
        .unwrap();
    assert!(eventually(WAIT, || c.count() == 3).await);
    let rows = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {}", ob.table())).fetch_one(&pool).await.unwrap()
    };
    let mut left = rows().await;
    let until = tokio::time::Instant::now() + WAIT;
    while left > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = rows().await;
    }
    assert_eq!(left, 0, "sent rows purged");
    // An unroutable queue row is kept (and retried), never marked or purged.
    let mut tx = pool.begin().await.unwrap();
    ob.enqueue(&mut tx, Dest::queue(env.q("nowhere")), &Envelope::command(OrderPlaced { n: 9 })).await.unwrap();
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ob.pending().await.unwrap(), 1);
    assert_eq!(rows().await, 1);
    relay.stop().await;
    c.worker.stop().await;
    drop_table(&ob).await;
    env.cleanup().await;
}

#[tokio::test]
async fn table_names_are_identifiers() {
    let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy(&pg_url()).unwrap();
    assert!(Outbox::new(pool.clone(), "outbox; DROP TABLE x").is_err());
    assert!(Outbox::new(pool.clone(), "1outbox").is_err());
    assert!(Outbox::new(pool, "orders_outbox").is_ok());
}

crate::on_all_targets!(
    needs [Postgres];
    committed_delivered_rolled_back_not,
    topic_destination,
    crash_windows_memory_inbox,
    crash_windows_pg_inbox,
    late_commit_still_sent,
    two_relays_one_publishes,
    inbox_and_outbox_in_one_transaction,
);
