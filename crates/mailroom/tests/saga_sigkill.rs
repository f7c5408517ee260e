//! The orchestrator as a real separate process on the embedded saga store, killed with SIGKILL
//! between steps (and, in the second test, while compensating): the services and a Mailroom server
//! run in this test; the child process (this test binary again, running the ignored
//! `child_orchestrator`) opens the store, starts one saga and is killed while a step's reply is
//! held back. Then this process reopens the store (the kernel released the child's file locks) and
//! a new orchestrator finishes the saga from the log and the durable reply queue.

mod common;

use mailroom::saga::{Command, EmbeddedSagaStore, Saga, SagaHandle, SagaStore as _, Status};
use mailroom::{Amqp, AmqpConfig, Bus, Envelope, HandlerError, WorkerHandle};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

const WAIT: Duration = Duration::from_secs(20);
/// Tells the child process what to do: `<store dir>\t<amqp url>\t<queue prefix>\t<saga name>\t<cents>`.
const CHILD_ENV: &str = "MAILROOM_SAGA_SIGKILL_CHILD";

fn to(d: &Value, step: &str) -> Command {
    Command::new(format!("{}.{step}", d["prefix"].as_str().unwrap_or_default()), d)
}
fn reserve(d: &Value) -> Command {
    to(d, "reserve")
}
fn release(d: &Value) -> Command {
    to(d, "release")
}
fn charge(d: &Value) -> Command {
    to(d, "charge")
}
fn refund(d: &Value) -> Command {
    to(d, "refund")
}
fn ship(d: &Value) -> Command {
    to(d, "ship")
}

fn definition(name: &str) -> Saga<Value> {
    Saga::<Value>::named(name)
        .step("reserve", reserve, Some(release))
        .step("charge", charge, Some(refund))
        .step("ship", ship, None)
        .tick(Duration::from_millis(50))
        .step_timeout(Duration::from_secs(5))
}

/// The child: an orchestrator process that starts one saga, prints its id and runs until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: the child process of the SIGKILL tests below, started by them"]
async fn child_orchestrator() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        // Not a test on its own (e.g. `--run-ignored all`): only the SIGKILL tests give it work.
        eprintln!("child_orchestrator: not started by a SIGKILL test, nothing to do");
        return;
    };
    let [dir, url, prefix, name, cents]: [&str; 5] = spec.split('\t').collect::<Vec<_>>().try_into().unwrap();
    let bus = Bus::new(Amqp::connect(AmqpConfig::new(url)).await.unwrap());
    let store = EmbeddedSagaStore::open(dir).unwrap();
    let _relay = store.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let saga = definition(name).run_on(bus, store).await.unwrap();
    let id = saga.start(&json!({ "prefix": prefix, "cents": cents.parse::<i64>().unwrap() })).await.unwrap();
    println!("SAGA-ID {id}");
    std::future::pending::<()>().await;
}

/// The services, idempotent by message id (a command the killed relay published but had not marked
/// sent comes again with the same id). `hold` holds back this service's first reply until released.
struct Services {
    workers: Vec<WorkerHandle>,
    log: Arc<Mutex<Vec<String>>>,
}

async fn services(
    bus: &Bus,
    prefix: &str,
    hold: &'static str,
    called: mpsc::UnboundedSender<()>,
    release: watch::Receiver<bool>,
) -> Services {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for svc in ["reserve", "release", "charge", "refund", "ship"] {
        let (log, called, release) = (log.clone(), called.clone(), release.clone());
        let seen: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
        let w = bus
            .responder(&format!("{prefix}.{svc}"))
            .handle_request(move |cmd: Envelope<Value>, _| {
                let (log, called, mut release, seen) = (log.clone(), called.clone(), release.clone(), seen.clone());
                async move {
                    let ok = svc != "ship" || cmd.body["cents"].as_i64().unwrap_or(0) <= 100;
                    let first = seen.lock().unwrap().insert(cmd.meta.id.clone(), ok).is_none();
                    if first {
                        log.lock().unwrap().push(if ok { svc.to_owned() } else { format!("{svc}!") });
                    }
                    if svc == hold && first {
                        let _ = called.send(());
                        // The reply leaves only once the orchestrator process is dead.
                        let _ = release.wait_for(|r| *r).await;
                    }
                    if !ok {
                        return Err(HandlerError::permanent("no courier for that"));
                    }
                    Ok(json!({ "ok": svc }))
                }
            })
            .run()
            .await
            .unwrap();
        workers.push(w);
    }
    Services { workers, log }
}

async fn until_status(saga: &SagaHandle<Value>, id: &str, want: Status) -> Status {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let s = saga.get(id).await.unwrap().status;
        if s == want || tokio::time::Instant::now() > until {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the child with a saga for `cents`, SIGKILLs it when `hold` is first called, then finishes
/// the saga here (it must end `want`); returns the services' effects.
async fn kill_and_resume(test: &str, cents: i64, hold: &'static str, want: Status) -> Vec<String> {
    let (url, _server) = common::start_server().await;
    let bus = Bus::new(Amqp::connect(AmqpConfig::new(&url)).await.unwrap());
    let unique = mailroom::envelope::new_message_id().replace('-', "")[20..].to_owned();
    let prefix = format!("{test}.{unique}");
    let name = format!("{test}_{unique}");
    let dir = std::env::temp_dir().join(format!("mailroom-saga-sigkill-{unique}"));
    let (called_tx, mut called) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = watch::channel(false);
    let svcs = services(&bus, &prefix, hold, called_tx, release_rx).await;

    let spec = [dir.display().to_string(), url.clone(), prefix.clone(), name.clone(), cents.to_string()].join("\t");
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_orchestrator", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let id = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // libtest may print "test child_orchestrator ... " on the same line first.
            if let Some((_, id)) = line.split_once("SAGA-ID ") {
                return id.trim().to_owned();
            }
        }
        panic!("the child exited without starting a saga");
    })
    .await
    .expect("the child started a saga");
    tokio::time::timeout(WAIT, called.recv()).await.expect("the held step was called");
    child.kill().await.unwrap(); // SIGKILL: no destructor, no graceful stop
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "the child was killed: {status:?}");
    release_tx.send(true).unwrap();

    // "Restart": the store reopened in this process (the dead child's locks are gone).
    let store = EmbeddedSagaStore::open(&dir).expect("the store opens after the child was killed");
    let row = store.load(&id).await.unwrap().expect("the child's saga is in the log");
    assert!(!row.status.is_final(), "it was between steps when killed: {row:?}");
    let relay = store.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let saga = definition(&name).run_on(bus.clone(), store).await.unwrap();
    assert_eq!(until_status(&saga, &id, want).await, want);
    let log = svcs.log.lock().unwrap().clone();

    saga.stop().await;
    relay.stop().await;
    for w in svcs.workers {
        w.stop().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    log
}

/// Killed while reserve's reply is held back: the new orchestrator completes the saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_between_steps_then_completes() {
    let log = kill_and_resume("sigkill_done", 50, "reserve", Status::Done).await;
    assert_eq!(log, ["reserve", "charge", "ship"]);
}

/// Ship refuses, the child starts compensating and is killed while refund's reply is held back:
/// the new orchestrator finishes the compensation in reverse order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_compensating_then_compensates() {
    let log = kill_and_resume("sigkill_comp", 500, "refund", Status::Failed).await;
    assert_eq!(log, ["reserve", "charge", "ship!", "refund", "release"]);
}
