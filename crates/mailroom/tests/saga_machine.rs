//! Event-driven sagas (`mailroom::saga::machine`): the order saga as a state machine on the embedded
//! saga store, on the embedded broker, a Mailroom server and the RabbitMQ at `RABBITMQ_URL`.
//!
//! - Happy path and a declined card (compensated), with `wait` returning the final state.
//! - A payment that never answers: the scheduled timer (a delayed message) fires and the saga
//!   compensates; a cancelled timer that fires anyway is ignored.
//! - The orchestrator killed at every transition, right after the transition committed and before
//!   the message that caused it was acked: in-process on the embedded broker (every in-memory piece
//!   of the orchestrator, its relay and its connection dropped), and as a real child process killed
//!   with SIGABRT on a Mailroom server and RabbitMQ. Each incarnation commits exactly one transition
//!   and dies; the saga ends in the same state as an unkilled run, and every service's effect is
//!   applied once (the command a killed relay re-publishes is absorbed by the service's inbox).

mod common;

use common::{env, Env, Target};
use mailroom::relay::RelayHandle;
use mailroom::saga::machine::{events_queue, Machine, MachineHandle, StateMachine, Transition};
use mailroom::saga::{EmbeddedSagaStore, SagaStore as _, Status};
use mailroom::{Amqp, AmqpConfig, Bus, Envelope, Fault, HandlerError, MemoryInbox, WorkerHandle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
/// Tells the child process what to do: `<store dir>\t<amqp url>\t<queue prefix>\t<saga name>`.
const CHILD_ENV: &str = "MAILROOM_MACHINE_CHILD";

/// Where an order is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Phase {
    New,
    Reserving,
    Charging,
    Shipping,
    Releasing,
    Shipped,
    Cancelled,
}

/// The saga's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    order: u32,
    cents: i64,
    phase: Phase,
    payment: Option<String>,
    reason: Option<String>,
}

/// Events, replies and timers (replies are mapped onto variants by name).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum OrderEvent {
    Placed { order: u32, cents: i64 },
    Reserved(Value),
    Charged(Value),
    ChargeDeclined(Fault),
    PaymentTimedOut,
    Shipped(Value),
    Released(Value),
}

/// The order saga. Queues are `<prefix>.<service>`.
struct OrderSaga {
    name: String,
    prefix: String,
    payment_timeout: Duration,
}

impl StateMachine for OrderSaga {
    type State = Order;
    type Event = OrderEvent;

    fn name(&self) -> &str {
        &self.name
    }

    fn key(&self, event: &OrderEvent) -> String {
        match event {
            OrderEvent::Placed { order, .. } => order.to_string(),
            _ => String::new(),
        }
    }

    fn start(&self, event: &OrderEvent) -> Option<Order> {
        match event {
            OrderEvent::Placed { order, cents } => {
                Some(Order { order: *order, cents: *cents, phase: Phase::New, payment: None, reason: None })
            }
            _ => None,
        }
    }

    fn on_event(&self, mut s: Order, event: OrderEvent, t: &mut Transition<OrderEvent>) -> Result<Order, HandlerError> {
        let q = |svc: &str| format!("{}.{svc}", self.prefix);
        match (&s.phase, event) {
            (Phase::New, OrderEvent::Placed { .. }) => {
                s.phase = Phase::Reserving;
                t.request(&q("reserve"), json!({ "order": s.order })).on_reply("Reserved");
            }
            (Phase::Reserving, OrderEvent::Reserved(_)) => {
                s.phase = Phase::Charging;
                t.request(&q("charge"), json!({ "order": s.order, "cents": s.cents }))
                    .on_reply("Charged")
                    .on_fault("ChargeDeclined");
                t.schedule("payment", self.payment_timeout, OrderEvent::PaymentTimedOut);
            }
            (Phase::Charging, OrderEvent::Charged(reply)) => {
                s.phase = Phase::Shipping;
                s.payment = reply["payment"].as_str().map(str::to_owned);
                t.cancel("payment");
                t.request(&q("ship"), json!({ "order": s.order })).on_reply("Shipped");
            }
            (Phase::Charging, OrderEvent::ChargeDeclined(f)) => {
                s.phase = Phase::Releasing;
                s.reason = Some(f.message);
                t.cancel("payment");
                t.request(&q("release"), json!({ "order": s.order })).on_reply("Released");
            }
            (Phase::Charging, OrderEvent::PaymentTimedOut) => {
                s.phase = Phase::Releasing;
                s.reason = Some("payment timed out".into());
                t.request(&q("release"), json!({ "order": s.order })).on_reply("Released");
            }
            (Phase::Shipping, OrderEvent::Shipped(_)) => {
                s.phase = Phase::Shipped;
                t.send(&q("notify"), json!({ "order": s.order, "shipped": true }));
                t.complete();
            }
            (Phase::Releasing, OrderEvent::Released(_)) => {
                s.phase = Phase::Cancelled;
                t.send(&q("notify"), json!({ "order": s.order, "shipped": false }));
                t.fail(s.reason.clone().unwrap_or_default());
            }
            // Anything else (a second Placed, a late reply mapped to an event) changes nothing.
            _ => {}
        }
        Ok(s)
    }
}

/// What the services did: effects (once per command id) and every delivery (copies included).
#[derive(Default)]
struct Effects {
    effects: Vec<String>,
    deliveries: HashMap<String, usize>,
    /// Commands charge declined: a refusal is not recorded by the inbox (only successes are), so a
    /// re-published copy is refused again; it is logged once per command id.
    declined: std::collections::HashSet<String>,
}

/// The services, idempotent through a [`MemoryInbox`] each: a second copy of a command (a killed
/// relay's re-publish, same id) is absorbed before the handler. `declined`: charge refuses;
/// `silent_charge`: charge never answers.
async fn services(
    bus: &Bus,
    prefix: &str,
    declined: bool,
    silent_charge: bool,
) -> (Vec<WorkerHandle>, Arc<Mutex<Effects>>) {
    let effects: Arc<Mutex<Effects>> = Arc::default();
    let mut workers = Vec::new();
    for svc in ["reserve", "charge", "ship", "release"] {
        let e = effects.clone();
        let b =
            bus.responder(&format!("{prefix}.{svc}")).idempotent(Arc::new(MemoryInbox::new(Duration::from_secs(600))));
        let w = b
            .handle_request(move |cmd: Envelope<Value>, _ctx| {
                let e = e.clone();
                async move {
                    let silent = {
                        let mut e = e.lock().unwrap();
                        *e.deliveries.entry(svc.to_owned()).or_default() += 1;
                        if svc == "charge" && silent_charge {
                            e.effects.push("charge?".into());
                            true
                        } else if svc == "charge" && declined {
                            if e.declined.insert(cmd.meta.id.clone()) {
                                e.effects.push("charge!".into());
                            }
                            return Err(HandlerError::permanent("card declined"));
                        } else {
                            e.effects.push(svc.to_owned());
                            false
                        }
                    };
                    if silent {
                        std::future::pending::<()>().await;
                    }
                    let order = cmd.body["order"].as_u64().unwrap_or_default();
                    Ok(json!({ "ok": svc, "payment": format!("pay-{order}") }))
                }
            })
            .run()
            .await
            .unwrap();
        workers.push(w);
    }
    let e = effects.clone();
    let w = bus
        .worker(&format!("{prefix}.notify"))
        .idempotent(Arc::new(MemoryInbox::new(Duration::from_secs(600))))
        .handle(move |n: Envelope<Value>, _ctx| {
            let e = e.clone();
            async move {
                let mut e = e.lock().unwrap();
                *e.deliveries.entry("notify".into()).or_default() += 1;
                e.effects.push(format!("notify:{}", n.body["shipped"]));
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    workers.push(w);
    (workers, effects)
}

fn saga(name: &str, prefix: &str) -> OrderSaga {
    OrderSaga { name: name.to_owned(), prefix: prefix.to_owned(), payment_timeout: Duration::from_secs(30) }
}

fn store_dir(env: &Env, run: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mailroom-machine-{}-{run}", env.prefix))
}

/// Which saga store the orchestrator runs on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    /// The embedded store (a directory with one log file).
    Embedded,
    /// A SQLite database file, commands through the SQLite outbox.
    #[cfg(feature = "sqlite")]
    Sqlite,
    /// The local PostgreSQL, commands through its outbox.
    #[cfg(feature = "postgres")]
    Postgres,
}

/// An orchestrator: the store (re)opened, its relay, the machine.
struct Orchestrator {
    relay: RelayHandle,
    handle: MachineHandle<OrderSaga>,
}

async fn orchestrator(bus: &Bus, dir: &PathBuf, machine: Machine<OrderSaga>) -> Orchestrator {
    orchestrator_on(Backend::Embedded, bus, dir, machine).await
}

async fn orchestrator_on(backend: Backend, bus: &Bus, dir: &PathBuf, machine: Machine<OrderSaga>) -> Orchestrator {
    match backend {
        Backend::Embedded => {
            let store = EmbeddedSagaStore::open(dir).unwrap();
            let relay = store.relay(bus.clone()).poll_interval(Duration::from_millis(20)).run().await.unwrap();
            let handle = machine.run_on(bus.clone(), store).await.unwrap();
            Orchestrator { relay, handle }
        }
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            std::fs::create_dir_all(dir).unwrap();
            let file = dir.join("saga.db");
            let pool = mailroom::sqlite::open(&file).await.unwrap();
            let outbox = mailroom::sqlite::SqliteOutbox::new(pool, &file, "outbox").unwrap();
            let handle =
                machine.run_on(bus.clone(), mailroom::saga::SqliteSagaStore::new(outbox.clone())).await.unwrap();
            let relay = outbox.relay(bus.clone()).poll_interval(Duration::from_millis(20)).run().await.unwrap();
            Orchestrator { relay, handle }
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&common::pg_url()).await.expect("the local PostgreSQL");
            // One outbox table per run (every incarnation of a run reopens the same one).
            let table = format!("outbox_m{:016x}", {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                dir.hash(&mut h);
                h.finish()
            });
            let outbox = mailroom::outbox::Outbox::new(pool, &table).unwrap();
            outbox.migrate().await.unwrap();
            let handle = machine.run_on(bus.clone(), mailroom::saga::PgSagaStore::new(outbox.clone())).await.unwrap();
            let relay = outbox.relay(bus.clone()).poll_interval(Duration::from_millis(20)).run().await.unwrap();
            Orchestrator { relay, handle }
        }
    }
}

async fn wait_effects(effects: &Arc<Mutex<Effects>>, n: usize) -> Vec<String> {
    common::eventually(WAIT, || effects.lock().unwrap().effects.len() >= n).await;
    // A moment for a wrong extra effect to show up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    effects.lock().unwrap().effects.clone()
}

/// Happy path and a declined card: `wait` returns the final state; the history shows each step.
async fn happy_and_declined(target: Target) {
    let env = env(target, "machine").await;
    for (order, declined) in [(1u32, false), (2, true)] {
        let prefix = env.q(&format!("o{order}"));
        let name = prefix.replace('.', "_");
        let (workers, effects) = services(&env.bus, &prefix, declined, false).await;
        let o = orchestrator(&env.bus, &store_dir(&env, &name), Machine::new(saga(&name, &prefix))).await;
        o.handle.send(OrderEvent::Placed { order, cents: 500 }).await.unwrap();
        // A second Placed for the same key, once the instance exists, changes nothing (the machine
        // ignores it). Sent at once, it could be handled first: messages of one key are handled one
        // at a time, not in queue order, when the saga runs with concurrency > 1.
        let key = order.to_string();
        let until = tokio::time::Instant::now() + WAIT;
        while o.handle.get(&key).await.unwrap().is_none() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        o.handle.send(OrderEvent::Placed { order, cents: 999 }).await.unwrap();
        let done = tokio::time::timeout(WAIT, o.handle.wait(&order.to_string())).await.expect("finished").unwrap();
        if declined {
            assert_eq!(done.status, Status::Failed);
            assert_eq!(done.state.phase, Phase::Cancelled);
            assert_eq!(done.error.as_deref(), Some("card declined"));
            assert_eq!(wait_effects(&effects, 4).await, ["reserve", "charge!", "release", "notify:false"]);
        } else {
            assert_eq!(done.status, Status::Done);
            assert_eq!(
                done.state,
                Order { order, cents: 500, phase: Phase::Shipped, payment: Some(format!("pay-{order}")), reason: None }
            );
            assert_eq!(wait_effects(&effects, 4).await, ["reserve", "charge", "ship", "notify:true"]);
        }
        let inst = o.handle.get(&order.to_string()).await.unwrap().unwrap();
        assert!(inst.awaiting.is_empty() && inst.timers.is_empty(), "{inst:?}");
        let history = o.handle.store().history(&format!("{name}:{order}")).await.unwrap();
        assert!(history[0].event.starts_with("Placed; requested"), "{history:?}");
        o.handle.stop().await;
        o.relay.stop().await;
        for w in workers {
            w.stop().await;
        }
        for q in [events_queue(&name), format!("saga.{name}.timer.30000")] {
            let _ = env.bus.transport().delete_queue(&q).await;
        }
    }
    env.cleanup().await;
}

/// Charge never answers: the payment timer (a delayed message) fires, the saga releases the stock
/// and fails. The earlier run's cancelled timer firing late is ignored (the happy path above cancels).
async fn timer_fires(target: Target) {
    let env = env(target, "machinet").await;
    let prefix = env.q("o");
    let name = prefix.replace('.', "_");
    let (workers, effects) = services(&env.bus, &prefix, false, true).await;
    let mut def = saga(&name, &prefix);
    def.payment_timeout = Duration::from_millis(300);
    let o = orchestrator(&env.bus, &store_dir(&env, &name), Machine::new(def)).await;
    o.handle.send(OrderEvent::Placed { order: 7, cents: 100 }).await.unwrap();
    let done = tokio::time::timeout(WAIT, o.handle.wait("7")).await.expect("finished").unwrap();
    assert_eq!(done.status, Status::Failed);
    assert_eq!(done.state.reason.as_deref(), Some("payment timed out"));
    assert_eq!(wait_effects(&effects, 4).await, ["reserve", "charge?", "release", "notify:false"]);
    o.handle.stop().await;
    o.relay.stop().await;
    for w in workers {
        w.abort();
    }
    for q in [events_queue(&name), format!("saga.{name}.timer.300")] {
        let _ = env.bus.transport().delete_queue(&q).await;
    }
    env.cleanup().await;
}

/// One run of the order saga: without kills, or with the orchestrator killed right after each of
/// its transitions commits. Returns the final state, the effects, and how many times it was killed.
async fn run_order(
    env: &Env,
    backend: Backend,
    run: &str,
    declined: bool,
    kill: bool,
) -> (mailroom::saga::Finished<Order>, Vec<String>, usize) {
    let prefix = env.q(run);
    let name = prefix.replace('.', "_");
    let dir = store_dir(env, &name);
    let (workers, effects) = services(&env.bus, &prefix, declined, false).await;
    env.bus.declare_queue(&events_queue(&name)).await.unwrap();
    env.bus.send(&events_queue(&name), OrderEvent::Placed { order: 42, cents: 500 }).await.unwrap();
    let mut kills = 0;
    if kill {
        loop {
            let status = match env.target {
                Target::Embedded => incarnation_in_process(env, backend, &dir, &name, &prefix).await,
                _ if backend != Backend::Embedded => unreachable!("child processes run on the embedded store"),
                _ => incarnation_process(env, &dir, &name, &prefix).await,
            };
            kills += 1;
            assert!(kills <= 10, "too many incarnations");
            if status.is_final() {
                break;
            }
        }
    }
    // A last orchestrator that is not killed: flushes the last transition's commands and answers `wait`.
    let o = orchestrator_on(backend, &env.bus, &dir, Machine::new(saga(&name, &prefix))).await;
    let done = tokio::time::timeout(WAIT, o.handle.wait("42")).await.expect("finished").unwrap();
    let effects = wait_effects(&effects, 4).await;
    o.handle.stop().await;
    o.relay.stop().await;
    for w in workers {
        w.stop().await;
    }
    for q in [events_queue(&name), format!("saga.{name}.timer.30000")] {
        let _ = env.bus.transport().delete_queue(&q).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    (done, effects, kills)
}

/// An orchestrator in this process on its own connection that "crashes" right after its first
/// committed transition: the hook never returns, then everything it had in memory is dropped (the
/// worker with the unacked message, the relay, the store handle, the connection).
async fn incarnation_in_process(env: &Env, backend: Backend, dir: &PathBuf, name: &str, prefix: &str) -> Status {
    let bus = env.another_bus().await;
    let (crashed, mut crash) = tokio::sync::mpsc::unbounded_channel();
    let machine = Machine::new(saga(name, prefix)).on_transition(move |t| {
        let crashed = crashed.clone();
        async move {
            let _ = crashed.send(t.status);
            std::future::pending::<()>().await;
        }
    });
    let o = orchestrator_on(backend, &bus, dir, machine).await;
    let status = tokio::time::timeout(WAIT, crash.recv()).await.expect("a transition").expect("hook");
    let Orchestrator { relay, handle } = o;
    handle.abort();
    relay.abort();
    drop(relay);
    drop(bus);
    status
}

/// The orchestrator as a child process (this test binary running `child_orchestrator`), which aborts
/// right after its first committed transition. Returns the instance's status after it died.
async fn incarnation_process(env: &Env, dir: &PathBuf, name: &str, prefix: &str) -> Status {
    let url = env.url.clone().expect("an AMQP target");
    let spec = [dir.display().to_string(), url, prefix.to_owned(), name.to_owned()].join("\t");
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_orchestrator", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let exit = tokio::time::timeout(WAIT, child.wait()).await.expect("the child crashed at a transition").unwrap();
    assert!(!exit.success(), "the child died at its transition: {exit:?}");
    let store = EmbeddedSagaStore::open(dir).unwrap();
    store.load(&format!("{name}:42")).await.unwrap().expect("the instance exists").status
}

/// The child: an orchestrator process that aborts (no destructor, no ack, no relay flush) right
/// after its first committed transition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: the child process of the kill tests, started by them"]
async fn child_orchestrator() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        eprintln!("child_orchestrator: not started by a kill test, nothing to do");
        return;
    };
    let [dir, url, prefix, name]: [&str; 4] = spec.split('\t').collect::<Vec<_>>().try_into().unwrap();
    let bus = Bus::new(Amqp::connect(AmqpConfig::new(url)).await.unwrap());
    let machine = Machine::new(saga(name, prefix)).on_transition(|_| async {
        // A real kill: SIGKILL to ourselves (abort if `kill` is missing). No destructor, ack or flush runs.
        let _ = std::process::Command::new("kill").args(["-KILL", &std::process::id().to_string()]).status();
        std::process::abort()
    });
    let _o = orchestrator(&bus, &PathBuf::from(dir), machine).await;
    std::future::pending::<()>().await;
}

/// Killed at every transition: same final state and the same effects, each once, as without kills.
async fn killed_at_every_transition_on(target: Target, backend: Backend) {
    let env = env(target, "machinek").await;
    for declined in [false, true] {
        let (calm, calm_effects, _) = run_order(&env, backend, &format!("calm{declined}"), declined, false).await;
        let (killed, killed_effects, kills) =
            run_order(&env, backend, &format!("kill{declined}"), declined, true).await;
        assert_eq!(killed, calm, "same final state with and without kills");
        assert_eq!(killed_effects, calm_effects, "each effect once, in the same order");
        // Placed, Reserved, Charged/ChargeDeclined, Shipped/Released: one kill after each.
        assert_eq!(kills, 4, "one incarnation per transition");
    }
    env.cleanup().await;
}

async fn killed_at_every_transition(target: Target) {
    killed_at_every_transition_on(target, Backend::Embedded).await
}

on_all_targets!(happy_and_declined, timer_fires, killed_at_every_transition);

/// The same kills with the state versioned in a SQLite database file (embedded broker, in-process crashes).
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_at_every_transition_sqlite_store() {
    killed_at_every_transition_on(Target::Embedded, Backend::Sqlite).await
}

/// The same kills with the state versioned in PostgreSQL (embedded broker, in-process crashes).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_at_every_transition_postgres_store() {
    if common::can_run(&[common::Service::Postgres], "killed_at_every_transition_postgres_store") {
        killed_at_every_transition_on(Target::Embedded, Backend::Postgres).await
    }
}
