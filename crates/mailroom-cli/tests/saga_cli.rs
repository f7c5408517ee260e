//! `mailroom saga` (the built binary, a separate process) against a store an orchestrator in this
//! test is running on: list, show, history, retry and abandon, on the embedded store and on the
//! local PostgreSQL (`MAILROOM_PG_URL`). A retry written by the command is picked up by the running
//! orchestrator, which finishes the compensation.

use mailroom::outbox::{Outbox, RelayHandle};
use mailroom::saga::{Command, EmbeddedRelayHandle, EmbeddedSagaStore, Saga, SagaHandle, Status};
use mailroom::{Bus, Envelope, HandlerError, WorkerHandle};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

type Data = Value;

// Which services are reachable, and the one-line skip: shared with the SDK's tests.
#[path = "../../mailroom/tests/common/services.rs"]
mod services;
use services::{can_run, pg_url, Service};

fn reserve(d: &Data) -> Command {
    Command::new(format!("{}.reserve", d["prefix"].as_str().unwrap_or_default()), d)
}
fn release(d: &Data) -> Command {
    Command::new(format!("{}.release", d["prefix"].as_str().unwrap_or_default()), d)
}
fn charge(d: &Data) -> Command {
    Command::new(format!("{}.charge", d["prefix"].as_str().unwrap_or_default()), d)
}

/// The saga's store and its relay, embedded or PostgreSQL.
enum Backend {
    Embedded { dir: std::path::PathBuf, relay: EmbeddedRelayHandle },
    Postgres { outbox: Outbox, relay: RelayHandle },
}

impl Backend {
    /// The `mailroom saga` flags selecting this store.
    fn flags(&self) -> Vec<String> {
        match self {
            Backend::Embedded { dir, .. } => vec!["--store".into(), dir.display().to_string()],
            Backend::Postgres { .. } => vec!["--database-url".into(), pg_url()],
        }
    }
}

/// Runs `mailroom saga <flags> <args>`; returns (success, stdout, stderr).
async fn cli(backend: &Backend, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .arg("saga")
        .args(backend.flags())
        .args(args)
        .env_remove("MAILROOM_SAGA_STORE")
        .env_remove("MAILROOM_SAGA_DATABASE_URL")
        .output()
        .await
        .expect("run the mailroom binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn cli_json(backend: &Backend, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (ok, out, err) = cli(backend, &all).await;
    assert!(ok, "mailroom saga {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

async fn until_status(saga: &SagaHandle<Data>, id: &str, want: Status) -> Status {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let s = saga.get(id).await.unwrap().status;
        if s == want || tokio::time::Instant::now() > until {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Services: reserve always works, charge refuses orders over 100 cents, release fails until
/// `healthy` is set.
async fn services(bus: &Bus, prefix: &str, healthy: Arc<AtomicBool>) -> Vec<WorkerHandle> {
    let mut out = Vec::new();
    let reserve = bus
        .responder(&format!("{prefix}.reserve"))
        .handle_request(|_: Envelope<Value>, _| async { Ok(json!({ "reserved": true })) })
        .run()
        .await
        .unwrap();
    let charge = bus
        .responder(&format!("{prefix}.charge"))
        .handle_request(|cmd: Envelope<Value>, _| async move {
            if cmd.body["cents"].as_i64().unwrap_or(0) > 100 {
                return Err(HandlerError::permanent("card declined"));
            }
            Ok(json!({ "charged": true }))
        })
        .run()
        .await
        .unwrap();
    let release = bus
        .responder(&format!("{prefix}.release"))
        .handle_request(move |_: Envelope<Value>, _| {
            let healthy = healthy.clone();
            async move {
                if !healthy.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("inventory service down"));
                }
                Ok(json!({ "released": true }))
            }
        })
        .run()
        .await
        .unwrap();
    out.extend([reserve, charge, release]);
    out
}

async fn operate_with_the_cli(postgres: bool) {
    let unique = mailroom::envelope::new_message_id().replace('-', "")[20..].to_owned();
    let prefix = format!("cli{unique}");
    let name = format!("cli_saga_{unique}");
    let bus = Bus::embedded().unwrap();
    let healthy = Arc::new(AtomicBool::new(false));
    let workers = services(&bus, &prefix, healthy.clone()).await;
    let definition = Saga::<Data>::named(&name)
        .step("reserve", reserve, Some(release))
        .step("charge", charge, None)
        .tick(Duration::from_millis(50))
        .compensation_retry(2, Duration::from_millis(10), 2, Duration::from_millis(50));
    let (backend, saga) = if postgres {
        let pool = sqlx_pool().await;
        let outbox = Outbox::new(pool, &format!("outbox_{name}")).unwrap();
        outbox.migrate().await.unwrap();
        let relay = outbox.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
        let saga = definition.run(bus.clone(), outbox.clone()).await.unwrap();
        (Backend::Postgres { outbox, relay }, saga)
    } else {
        let dir = std::env::temp_dir().join(format!("mailroom-saga-cli-{unique}"));
        let store = EmbeddedSagaStore::open(&dir).unwrap();
        let relay = store.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
        let saga = definition.run_on(bus.clone(), store).await.unwrap();
        (Backend::Embedded { dir, relay }, saga)
    };

    // One order goes through; two are declined and their release keeps failing: Stuck.
    let done = saga.start(&json!({ "prefix": prefix, "cents": 50 })).await.unwrap();
    let stuck_a = saga.start(&json!({ "prefix": prefix, "cents": 500 })).await.unwrap();
    let stuck_b = saga.start(&json!({ "prefix": prefix, "cents": 700 })).await.unwrap();
    assert_eq!(until_status(&saga, &done, Status::Done).await, Status::Done);
    assert_eq!(until_status(&saga, &stuck_a, Status::Stuck).await, Status::Stuck);
    assert_eq!(until_status(&saga, &stuck_b, Status::Stuck).await, Status::Stuck);

    // list: a table of all three; JSON filtered by status, oldest first.
    let (ok, table, err) = cli(&backend, &["list", "--name", &name]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATUS") && lines[0].contains("VERSION"), "{table}");
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[1].starts_with(&done) && lines[1].contains("Done"), "{table}");
    assert!(lines[2].starts_with(&stuck_a) && lines[2].contains("Stuck"), "{table}");
    let stuck = cli_json(&backend, &["list", "--name", &name, "--status", "stuck"]).await;
    let ids: Vec<&str> = stuck.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [stuck_a.as_str(), stuck_b.as_str()]);
    assert_eq!(stuck[0]["error"].as_str().map(|e| e.contains("inventory service down")), Some(true), "{stuck}");

    // show and history.
    let shown = cli_json(&backend, &["show", &stuck_a]).await;
    assert_eq!(shown["status"], "Stuck");
    assert_eq!(shown["data"]["cents"], 500);
    assert!(shown["version"].as_i64().is_some(), "{shown}");
    let (ok, text, _) = cli(&backend, &["show", &stuck_a]).await;
    assert!(ok && text.contains("status:   Stuck"), "{text}");
    let history = cli_json(&backend, &["history", &stuck_a]).await;
    let events: Vec<&str> = history.as_array().unwrap().iter().map(|h| h["event"].as_str().unwrap()).collect();
    assert_eq!(events.first(), Some(&"started; sent reserve"));
    assert!(events.last().unwrap().ends_with(": stuck"), "{events:?}");
    let (ok, text, _) = cli(&backend, &["history", &stuck_a]).await;
    assert!(ok && text.starts_with("TIME") && text.contains("compensating reserve"), "{text}");

    // retry: the service is healthy again; the running orchestrator picks the retry up. The version is read
    // again here: the orchestrator may still have been writing the stuck saga's last event when `show` ran.
    let version = cli_json(&backend, &["show", &stuck_a]).await["version"].as_i64().unwrap();
    healthy.store(true, Ordering::SeqCst);
    let retried = cli_json(&backend, &["retry", &stuck_a]).await;
    assert_eq!(retried["status"], "Compensating");
    assert_eq!(retried["version"].as_i64(), Some(version + 1), "the retry bumped the version");
    assert_eq!(until_status(&saga, &stuck_a, Status::Failed).await, Status::Failed, "the orchestrator saw it");
    let events: Vec<String> = saga.history(&stuck_a).await.unwrap().into_iter().map(|h| h.event).collect();
    assert!(events.iter().any(|e| e == "operator retry"), "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("reserve compensated; compensated"), "{events:?}");

    // abandon: the other stuck one ends Abandoned and stays so.
    let (ok, text, err) = cli(&backend, &["abandon", &stuck_b]).await;
    assert!(ok, "{err}");
    assert!(text.contains("Abandoned"), "{text}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(saga.get(&stuck_b).await.unwrap().status, Status::Abandoned);

    // Refusals: a saga that is not stuck, an unknown id.
    let (ok, _, err) = cli(&backend, &["retry", &done]).await;
    assert!(!ok && err.contains("is Done, not Stuck"), "{err}");
    let (ok, _, err) = cli(&backend, &["abandon", "no-such-saga"]).await;
    assert!(!ok && err.contains("no saga no-such-saga"), "{err}");
    let (ok, _, err) = cli(&backend, &["history", "no-such-saga"]).await;
    assert!(!ok && err.contains("no saga no-such-saga"), "{err}");

    saga.stop().await;
    for w in workers {
        w.stop().await;
    }
    match backend {
        Backend::Embedded { dir, relay } => {
            relay.stop().await;
            let _ = std::fs::remove_dir_all(dir);
        }
        Backend::Postgres { outbox, relay } => {
            relay.stop().await;
            let pool = outbox.pool();
            sqlx_exec(pool, &format!("DROP TABLE IF EXISTS {}", outbox.table())).await;
            sqlx_exec(
                pool,
                &format!(
                    "DELETE FROM saga_history WHERE saga_id IN (SELECT id FROM saga_instances WHERE name = '{name}')"
                ),
            )
            .await;
            sqlx_exec(pool, &format!("DELETE FROM saga_instances WHERE name = '{name}'")).await;
        }
    }
}

async fn sqlx_pool() -> sqlx::PgPool {
    sqlx::PgPool::connect(&pg_url()).await.expect("the local PostgreSQL")
}

async fn sqlx_exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operate_the_embedded_store() {
    operate_with_the_cli(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operate_postgres() {
    if !can_run(&[Service::Postgres], "saga_cli::operate_postgres") {
        return;
    }
    operate_with_the_cli(true).await
}
