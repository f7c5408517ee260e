//! A measurement, not run by default: N three-step sagas started at once on the embedded broker,
//! with the embedded store and with PostgreSQL (`MAILROOM_PG_URL`); prints sagas/s and
//! transitions/s. Every transition is an fsync (embedded) or a commit (PostgreSQL).
//!
//! `cargo nextest run -p mailroom --test saga_throughput --run-ignored only --no-capture`
//! (`SAGA_THROUGHPUT_N` sagas, default 200).

#[cfg(feature = "postgres")]
#[path = "common/services.rs"]
mod services;

use mailroom::saga::{Command, EmbeddedSagaStore, Saga, SagaHandle, Status};
use mailroom::{Bus, Envelope};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn to(d: &Value, step: &str) -> Command {
    Command::new(format!("{}.{step}", d["prefix"].as_str().unwrap_or_default()), d)
}
fn reserve(d: &Value) -> Command {
    to(d, "reserve")
}
fn charge(d: &Value) -> Command {
    to(d, "charge")
}
fn ship(d: &Value) -> Command {
    to(d, "ship")
}

fn n() -> usize {
    std::env::var("SAGA_THROUGHPUT_N").ok().and_then(|s| s.parse().ok()).unwrap_or(200)
}

async fn measure(label: &str, saga: &SagaHandle<Value>, prefix: &str) {
    let n = n();
    let started = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(saga.start(&json!({ "prefix": prefix, "order": i })).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    for id in &ids {
        loop {
            let s = saga.get(id).await.unwrap().status;
            if s == Status::Done {
                break;
            }
            assert!(Instant::now() < deadline && !s.is_final(), "{id} ended {s}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // 4 transitions per saga (start, 3 replies) and 3 commands relayed (each marked sent).
    println!(
        "{label}: {n} sagas in {secs:.2} s = {:.0} sagas/s, {:.0} transitions/s",
        n as f64 / secs,
        4.0 * n as f64 / secs
    );
}

async fn services(bus: &Bus, prefix: &str) -> Vec<mailroom::WorkerHandle> {
    let mut out = Vec::new();
    for svc in ["reserve", "charge", "ship"] {
        out.push(
            bus.responder(&format!("{prefix}.{svc}"))
                .handle_request(|_: Envelope<Value>, _| async { Ok(json!({ "ok": true })) })
                .run()
                .await
                .unwrap(),
        );
    }
    out
}

fn definition(name: &str) -> Saga<Value> {
    Saga::<Value>::named(name)
        .step("reserve", reserve, None)
        .step("charge", charge, None)
        .step("ship", ship, None)
        .tick(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --run-ignored only --no-capture"]
async fn throughput_embedded_store() {
    let bus = Bus::embedded().unwrap();
    let unique = mailroom::envelope::new_message_id().replace('-', "")[20..].to_owned();
    let prefix = format!("tput.{unique}");
    let workers = services(&bus, &prefix).await;
    let dir = std::env::temp_dir().join(format!("mailroom-saga-tput-{unique}"));
    let store = EmbeddedSagaStore::open(&dir).unwrap();
    let relay = store.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let saga = definition(&format!("tput_{unique}")).run_on(bus.clone(), store).await.unwrap();
    measure("embedded store", &saga, &prefix).await;
    saga.stop().await;
    relay.stop().await;
    for w in workers {
        w.stop().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --run-ignored only --no-capture"]
async fn throughput_postgres() {
    use mailroom::outbox::Outbox;
    if !services::can_run(&[services::Service::Postgres], "saga_throughput::throughput_postgres") {
        return;
    }
    let url = services::pg_url();
    let bus = Bus::embedded().unwrap();
    let unique = mailroom::envelope::new_message_id().replace('-', "")[20..].to_owned();
    let prefix = format!("tput.{unique}");
    let name = format!("tput_{unique}");
    let workers = services(&bus, &prefix).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let outbox = Outbox::new(pool.clone(), &format!("outbox_{name}")).unwrap();
    outbox.migrate().await.unwrap();
    let relay = outbox.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let saga = definition(&name).run(bus.clone(), outbox.clone()).await.unwrap();
    measure("postgres store", &saga, &prefix).await;
    saga.stop().await;
    relay.stop().await;
    for w in workers {
        w.stop().await;
    }
    sqlx::query(&format!("DROP TABLE {}", outbox.table())).execute(&pool).await.unwrap();
    sqlx::query("DELETE FROM saga_history WHERE saga_id IN (SELECT id FROM saga_instances WHERE name = $1)")
        .bind(&name)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM saga_instances WHERE name = $1").bind(&name).execute(&pool).await.unwrap();
}
