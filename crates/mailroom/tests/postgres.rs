//! The PostgreSQL inbox against the local PostgreSQL (`MAILROOM_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`): the inbox row commits with the handler's own writes,
//! so duplicates, retries, failures and a worker killed mid-handle leave exactly one effect.
#![cfg(feature = "postgres")]

mod common;

use common::{can_run, env, eventually, pg_url, Service, Target};
use mailroom::inbox::postgres::PgInbox;
use mailroom::{Envelope, HandlerError, InboxStore, RetryPolicy};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payment {
    cents: i64,
}

/// An inbox plus a per-test `ledger` table standing in for the handler's business data.
async fn setup(test: &str) -> (Arc<PgInbox>, PgPool, String) {
    let inbox = PgInbox::connect(&pg_url()).await.expect("the local PostgreSQL (set MAILROOM_PG_URL)");
    let pool = inbox.pool().clone();
    let ledger = format!("ledger_{test}_{}", &mailroom::envelope::new_message_id().replace('-', "")[20..]);
    sqlx::query(&format!("CREATE TABLE {ledger} (message_id text NOT NULL, cents bigint NOT NULL)"))
        .execute(&pool)
        .await
        .unwrap();
    (Arc::new(inbox), pool, ledger)
}

async fn teardown(pool: &PgPool, ledger: &str, consumer: &str) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {ledger}")).execute(pool).await.unwrap();
    sqlx::query("DELETE FROM inbox WHERE consumer = $1").bind(consumer).execute(pool).await.unwrap();
}

async fn count(pool: &PgPool, sql: &str, consumer: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).bind(consumer).fetch_one(pool).await.unwrap()
}

async fn ledger_rows(pool: &PgPool, ledger: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {ledger}")).fetch_one(pool).await.unwrap()
}

async fn inbox_rows(pool: &PgPool, consumer: &str) -> i64 {
    count(pool, "SELECT count(*) FROM inbox WHERE consumer = $1", consumer).await
}

/// The handler writes a ledger row in `ctx.tx()`, then fails on its first attempt *after* writing:
/// the rollback takes the write with it, the retry writes it again, and a duplicate send is skipped.
/// One ledger row and one inbox row in the end, on every transport.
async fn exactly_once_effect(target: Target) {
    let env = env(target, "pginbox").await;
    let q = env.q("payments");
    let (inbox, pool, ledger) = setup("once").await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let (a, table) = (attempts.clone(), ledger.clone());
    let worker = env
        .bus
        .worker(&q)
        .idempotent(inbox.clone())
        .retry(RetryPolicy::new().immediate(2))
        .handle(move |p: Envelope<Payment>, ctx| {
            let (a, table) = (a.clone(), table.clone());
            async move {
                let mut tx = ctx.tx()?;
                sqlx::query(&format!("INSERT INTO {table} (message_id, cents) VALUES ($1, $2)"))
                    .bind(&p.id)
                    .bind(p.body.cents)
                    .execute(&mut **tx)
                    .await
                    .map_err(HandlerError::transient)?;
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(HandlerError::transient("crashed after writing"));
                }
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let payment = Envelope::command(Payment { cents: 4200 });
    env.bus.send_envelope(&q, payment.clone()).await.unwrap();
    assert!(eventually(WAIT, || worker.metrics().ok == 1).await);
    env.bus.send_envelope(&q, payment.clone()).await.unwrap(); // a duplicate (same id)
    assert!(eventually(WAIT, || worker.metrics().duplicates == 1).await);
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "one failed attempt, one that committed");
    assert_eq!(ledger_rows(&pool, &ledger).await, 1, "exactly one effect");
    assert_eq!(inbox_rows(&pool, &q).await, 1);
    assert!(inbox.seen(&q, &payment.id).await.unwrap());
    worker.stop().await;
    teardown(&pool, &ledger, &q).await;
    env.cleanup().await;
}

/// A failing handler leaves nothing behind (no inbox row, no ledger row); after a redrive the message
/// is processed once.
async fn failure_rolls_back_then_redrive_applies_once(target: Target) {
    let env = env(target, "pgfail").await;
    let q = env.q("payments");
    let (inbox, pool, ledger) = setup("fail").await;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (h, table) = (healthy.clone(), ledger.clone());
    let worker = env
        .bus
        .worker(&q)
        .idempotent(inbox.clone())
        .handle(move |p: Envelope<Payment>, ctx| {
            let (h, table) = (h.clone(), table.clone());
            async move {
                let mut tx = ctx.tx()?;
                sqlx::query(&format!("INSERT INTO {table} (message_id, cents) VALUES ($1, $2)"))
                    .bind(&p.id)
                    .bind(p.body.cents)
                    .execute(&mut **tx)
                    .await
                    .map_err(HandlerError::transient)?;
                if !h.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("card declined"));
                }
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    env.bus.send(&q, Payment { cents: 100 }).await.unwrap();
    assert!(eventually(WAIT, || worker.metrics().dead_lettered == 1).await);
    assert_eq!(ledger_rows(&pool, &ledger).await, 0);
    assert_eq!(inbox_rows(&pool, &q).await, 0);
    healthy.store(true, Ordering::SeqCst);
    let mut moved = 0;
    for _ in 0..50 {
        moved += env.bus.redrive(&format!("{q}.dlq")).await.unwrap();
        if moved == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(moved, 1);
    assert!(eventually(WAIT, || worker.metrics().ok == 1).await);
    assert_eq!(ledger_rows(&pool, &ledger).await, 1);
    assert_eq!(inbox_rows(&pool, &q).await, 1);
    worker.stop().await;
    teardown(&pool, &ledger, &q).await;
    env.cleanup().await;
}

/// A worker killed mid-handle, after writing in its transaction: the transaction dies with it, the
/// message is redelivered to the next worker, and the effect happens once.
async fn killed_mid_handle_applies_once(target: Target) {
    let env = env(target, "pgkill").await;
    let q = env.q("payments");
    let (inbox, pool, ledger) = setup("kill").await;
    let entered = Arc::new(AtomicUsize::new(0));
    let worker = |block: bool| {
        let (e, table) = (entered.clone(), ledger.clone());
        env.bus.worker(&q).idempotent(inbox.clone()).handle(move |p: Envelope<Payment>, ctx| {
            let (e, table) = (e.clone(), table.clone());
            async move {
                let mut tx = ctx.tx()?;
                sqlx::query(&format!("INSERT INTO {table} (message_id, cents) VALUES ($1, $2)"))
                    .bind(&p.id)
                    .bind(p.body.cents)
                    .execute(&mut **tx)
                    .await
                    .map_err(HandlerError::transient)?;
                drop(tx);
                e.fetch_add(1, Ordering::SeqCst);
                if block {
                    std::future::pending::<()>().await; // "crashes" here: killed by abort
                }
                Ok(())
            }
        })
    };
    let first = worker(true).run().await.unwrap();
    env.bus.send(&q, Payment { cents: 7 }).await.unwrap();
    assert!(eventually(WAIT, || entered.load(Ordering::SeqCst) == 1).await);
    first.abort();
    let second = worker(false).run().await.unwrap();
    assert!(eventually(WAIT, || second.metrics().ok == 1).await, "redelivered to the next worker");
    assert_eq!(entered.load(Ordering::SeqCst), 2);
    assert_eq!(ledger_rows(&pool, &ledger).await, 1, "the killed worker's write was rolled back");
    assert_eq!(inbox_rows(&pool, &q).await, 1);
    second.stop().await;
    teardown(&pool, &ledger, &q).await;
    env.cleanup().await;
}

on_all_targets!(needs [Postgres]; exactly_once_effect, failure_rolls_back_then_redrive_applies_once, killed_mid_handle_applies_once);

/// Ids older than the retention window are purged; younger ones stay.
#[tokio::test]
async fn retention_purge() {
    if !can_run(&[Service::Postgres], "postgres::retention_purge") {
        return;
    }
    let inbox = PgInbox::connect(&pg_url()).await.unwrap().retention(Duration::from_secs(3600));
    let pool = inbox.pool().clone();
    let consumer = format!("purge-{}", mailroom::envelope::new_message_id());
    inbox.record(&consumer, "fresh").await.unwrap();
    inbox.record(&consumer, "fresh").await.unwrap(); // recording twice is fine
    sqlx::query(
        "INSERT INTO inbox (consumer, message_id, processed_at) VALUES ($1, 'old', now() - interval '2 hours')",
    )
    .bind(&consumer)
    .execute(&pool)
    .await
    .unwrap();
    assert!(inbox.seen(&consumer, "old").await.unwrap());
    assert!(inbox.purge().await.unwrap() >= 1);
    assert!(!inbox.seen(&consumer, "old").await.unwrap());
    assert!(inbox.seen(&consumer, "fresh").await.unwrap());
    let purger = inbox.spawn_purger(Duration::from_millis(20));
    purger.abort();
    sqlx::query("DELETE FROM inbox WHERE consumer = $1").bind(&consumer).execute(&pool).await.unwrap();
}

/// `ctx.tx()` on a worker without a PostgreSQL inbox is a permanent error (the message dead-letters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_without_pg_inbox_is_an_error() {
    let env = env(Target::Embedded, "notx").await;
    let q = env.q("plain");
    let worker = env
        .bus
        .worker(&q)
        .idempotent(Arc::new(mailroom::MemoryInbox::default()))
        .handle(|_: Envelope<Payment>, ctx| async move {
            let _tx = ctx.tx()?;
            Ok(())
        })
        .run()
        .await
        .unwrap();
    env.bus.send(&q, Payment { cents: 1 }).await.unwrap();
    assert!(eventually(WAIT, || worker.metrics().dead_lettered == 1).await);
    // Counted when the worker decides, before its copy reaches the DLQ (seen under load): wait for it there.
    let dlq = format!("{q}.dlq");
    let until = tokio::time::Instant::now() + WAIT;
    while env.bus.transport().message_count(&dlq).await.unwrap() == 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut dead = env.bus.transport().get(&dlq).await.unwrap().unwrap();
    let meta = mailroom::Metadata::from_properties(&dead.properties);
    assert_eq!(meta.header(mailroom::envelope::headers::ERROR_KIND), Some("config"));
    dead.ack().await.unwrap();
    worker.stop().await;
    env.cleanup().await;
}

/// Two copies of one message handled at the same time by two processes (two connections, two
/// workers): the second waits on the first's uncommitted inbox row, then sees it committed and skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_copies_in_two_processes_apply_once() {
    if !can_run(&[Service::Postgres], "postgres::concurrent_copies_in_two_processes_apply_once") {
        return;
    }
    let env = env(Target::Embedded, "pgrace").await;
    let q = env.q("payments");
    let (inbox, pool, ledger) = setup("race").await;
    let other = env.another_bus().await;
    let handled = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for bus in [&env.bus, &other] {
        let (h, table) = (handled.clone(), ledger.clone());
        workers.push(
            bus.worker(&q)
                .prefetch(1)
                .concurrency(1)
                .idempotent(inbox.clone())
                .handle(move |p: Envelope<Payment>, ctx| {
                    let (h, table) = (h.clone(), table.clone());
                    async move {
                        let mut tx = ctx.tx()?;
                        sqlx::query(&format!("INSERT INTO {table} (message_id, cents) VALUES ($1, $2)"))
                            .bind(&p.id)
                            .bind(p.body.cents)
                            .execute(&mut **tx)
                            .await
                            .map_err(HandlerError::transient)?;
                        tokio::time::sleep(Duration::from_millis(300)).await; // hold the row lock a while
                        h.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                })
                .run()
                .await
                .unwrap(),
        );
    }
    let payment = Envelope::command(Payment { cents: 99 });
    env.bus.send_envelope(&q, payment.clone()).await.unwrap();
    env.bus.send_envelope(&q, payment).await.unwrap();
    let total = |f: fn(&mailroom::MetricsSnapshot) -> u64| workers.iter().map(|w| f(&w.metrics())).sum::<u64>();
    assert!(eventually(WAIT, || total(|m| m.ok) + total(|m| m.duplicates) == 2).await);
    assert_eq!(total(|m| m.ok), 1);
    assert_eq!(total(|m| m.duplicates), 1);
    assert_eq!(workers[0].metrics().received, 1, "each process got one copy");
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert_eq!(ledger_rows(&pool, &ledger).await, 1);
    for w in workers {
        w.stop().await;
    }
    teardown(&pool, &ledger, &q).await;
    env.cleanup().await;
}
