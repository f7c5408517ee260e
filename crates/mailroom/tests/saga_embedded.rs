//! Orchestrated sagas on the embedded store (a log file in a temporary directory, no database), on
//! the embedded broker, a Mailroom server and the RabbitMQ at `RABBITMQ_URL`: happy path, a failing
//! step compensated in reverse order, a compensation failing twice then succeeding, a stuck saga
//! retried and abandoned by an operator through a second handle on the store (as the `mailroom saga`
//! command does from another process), the orchestrator killed between steps and while
//! compensating (a new orchestrator on the reopened store finishes), a step command still in the
//! store's outbox when everything died, a timed-out step re-sent with the same id, and duplicate
//! replies racing across two orchestrators on two handles of one store.

mod common;

use common::order_saga::{charge, refund, release, reserve, ship, Failures, Order};
use common::{env, Env, Target};
use mailroom::saga::{ops, EmbeddedRelayHandle, EmbeddedSagaStore, ListFilter, Saga, SagaHandle, Status};
use mailroom::{Envelope, HandlerError, WorkerHandle};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// Options of a test world.
#[derive(Default)]
struct Options {
    failures: Failures,
    /// Every service answers twice (an extra copy of its reply goes first).
    duplicate_replies: bool,
    /// This service ignores its first call (no reply at all), then answers.
    silent_first: Option<&'static str>,
    /// Services absorb a second copy of a command (same message id), as an idempotent consumer
    /// would: it gets the first copy's answer and has no second effect. For the tests that kill the
    /// relay, which may have published a command without marking it sent (at-least-once).
    idempotent: bool,
}

struct World {
    env: Env,
    dir: PathBuf,
    store: EmbeddedSagaStore,
    relay: EmbeddedRelayHandle,
    services: Vec<WorkerHandle>,
    /// Calls in arrival order: "reserve", "charge!" for a failed call, ...
    log: Arc<Mutex<Vec<String>>>,
    /// Message ids received per service.
    ids: Arc<Mutex<HashMap<&'static str, Vec<String>>>>,
    name: String,
}

async fn world(target: Target, test: &str, failures: Failures) -> World {
    world_with(target, test, Options { failures, ..Options::default() }).await
}

async fn world_with(target: Target, test: &str, options: Options) -> World {
    let env = env(target, test).await;
    let dir = std::env::temp_dir().join(format!("mailroom-saga-{}", env.prefix));
    let store = EmbeddedSagaStore::open(&dir).unwrap();
    let relay = store.relay(env.bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let ids: Arc<Mutex<HashMap<&'static str, Vec<String>>>> = Arc::default();
    let failures = Arc::new(options.failures);
    let (duplicate_replies, idempotent) = (options.duplicate_replies, options.idempotent);
    let mut services = Vec::new();
    for svc in ["reserve", "release", "charge", "refund", "ship"] {
        let q = env.q(svc);
        let (log, ids, failures) = (log.clone(), ids.clone(), failures.clone());
        let calls = Arc::new(Mutex::new(0u32));
        let outcomes: Arc<Mutex<HashMap<String, Result<(), String>>>> = Arc::default();
        if options.silent_first == Some(svc) {
            // A plain worker: the first call gets no reply at all (lost), later ones are answered.
            let w = env
                .bus
                .worker(&q)
                .handle(move |cmd: Envelope<serde_json::Value>, ctx: mailroom::Context| {
                    let (log, ids, calls) = (log.clone(), ids.clone(), calls.clone());
                    async move {
                        ids.lock().unwrap().entry(svc).or_default().push(cmd.meta.id.clone());
                        let n = {
                            let mut c = calls.lock().unwrap();
                            *c += 1;
                            *c
                        };
                        if n == 1 {
                            log.lock().unwrap().push(format!("{svc}?"));
                            return Ok(());
                        }
                        log.lock().unwrap().push(svc.to_owned());
                        let to = ctx.meta().reply_to.clone().expect("saga commands carry reply_to");
                        ctx.bus()
                            .send_envelope(&to, ctx.derive(Envelope::document(serde_json::json!({ "ok": svc }))))
                            .await?;
                        Ok(())
                    }
                })
                .run()
                .await
                .unwrap();
            services.push(w);
            continue;
        }
        let w = env
            .bus
            .responder(&q)
            .handle_request(move |cmd: Envelope<serde_json::Value>, ctx: mailroom::Context| {
                let (log, ids, failures, calls) = (log.clone(), ids.clone(), failures.clone(), calls.clone());
                let outcomes = outcomes.clone();
                async move {
                    ids.lock().unwrap().entry(svc).or_default().push(cmd.meta.id.clone());
                    if idempotent {
                        if let Some(first) = outcomes.lock().unwrap().get(&cmd.meta.id).cloned() {
                            return first.map(|()| serde_json::json!({ "ok": svc })).map_err(HandlerError::permanent);
                        }
                    }
                    if duplicate_replies {
                        let to = ctx.meta().reply_to.clone().expect("saga commands carry reply_to");
                        ctx.bus()
                            .send_envelope(&to, ctx.derive(Envelope::document(serde_json::json!({ "ok": svc }))))
                            .await?;
                    }
                    let n = {
                        let mut c = calls.lock().unwrap();
                        *c += 1;
                        *c
                    };
                    if n <= failures.get(svc).copied().unwrap_or(0) {
                        log.lock().unwrap().push(format!("{svc}!"));
                        outcomes.lock().unwrap().insert(cmd.meta.id.clone(), Err(format!("{svc} refused")));
                        return Err(HandlerError::permanent(format!("{svc} refused")));
                    }
                    log.lock().unwrap().push(svc.to_owned());
                    outcomes.lock().unwrap().insert(cmd.meta.id.clone(), Ok(()));
                    Ok(serde_json::json!({ "ok": svc }))
                }
            })
            .run()
            .await
            .unwrap();
        services.push(w);
    }
    let name = env.prefix.replace('.', "_");
    World { env, dir, store, relay, services, log, ids, name }
}

impl World {
    fn saga(&self) -> Saga<Order> {
        Saga::<Order>::named(&self.name)
            .step("reserve", reserve, Some(release))
            .step("charge", charge, Some(refund))
            .on_reply(|o, reply| o.payment = reply["ok"].as_str().map(|p| format!("pay-{p}")))
            .step("ship", ship, None)
            .tick(Duration::from_millis(50))
            .compensation_retry(5, Duration::from_millis(20), 2, Duration::from_millis(200))
    }
    async fn run(&self, saga: Saga<Order>) -> SagaHandle<Order> {
        saga.run_on(self.env.bus.clone(), self.store.clone()).await.unwrap()
    }
    fn order(&self, n: u32) -> Order {
        Order { prefix: self.env.prefix.clone(), order: n, cents: 4200, payment: None }
    }
    /// How many different message ids `svc` received (copies of one command share one id).
    fn distinct_ids(&self, svc: &str) -> usize {
        let ids = self.ids.lock().unwrap();
        ids.get(svc).map(|v| v.iter().collect::<std::collections::HashSet<_>>().len()).unwrap_or(0)
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    async fn wait_log(&self, entry: &str) {
        let until = tokio::time::Instant::now() + WAIT;
        while !self.log().iter().any(|l| l == entry) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    async fn teardown(self, saga: SagaHandle<Order>) {
        saga.stop().await;
        self.relay.stop().await;
        for s in self.services {
            s.stop().await;
        }
        let _ = self.env.bus.transport().delete_queue(&format!("saga.{}.replies", self.name)).await;
        let _ = self.env.bus.transport().delete_queue(&format!("saga.{}.replies.dlq", self.name)).await;
        self.env.cleanup().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn until_status(saga: &SagaHandle<Order>, id: &str, want: Status) -> Status {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let s = saga.get(id).await.unwrap().status;
        if s == want || tokio::time::Instant::now() > until {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn events(saga: &SagaHandle<Order>, id: &str) -> Vec<String> {
    saga.history(id).await.unwrap().into_iter().map(|h| h.event).collect()
}

async fn happy_path(target: Target) {
    let w = world(target, "sehappy", Failures::new()).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(1)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    assert_eq!(w.log(), ["reserve", "charge", "ship"]);
    let rec = saga.get(&id).await.unwrap();
    assert_eq!(rec.data, Order { payment: Some("pay-charge".into()), ..w.order(1) }, "the charge reply was folded in");
    assert_eq!(rec.version, 3, "one version per transition");
    assert_eq!(events(&saga, &id).await.len(), 4);
    assert!(saga.list(Status::Done).await.unwrap().contains(&id));
    assert_eq!(w.store.pending().await.unwrap(), 0, "every command was relayed and marked sent");
    w.teardown(saga).await;
}

/// The same saga from closures (capturing the queue prefix, with typed command bodies) and a typed
/// reply: ship refuses, so the closures' compensations run in reverse, the refund carrying the
/// payment the typed reply folded in.
async fn closures_and_typed_replies(target: Target) {
    #[derive(serde::Deserialize)]
    struct Charged {
        ok: String,
    }
    #[derive(serde::Serialize)]
    struct Refund {
        order: u32,
        payment: Option<String>,
    }
    let w = world(target, "seclos", Failures::from([("ship", u32::MAX)])).await;
    let q = |svc: &str| format!("{}.{svc}", w.env.prefix);
    let (reserve_q, release_q, charge_q, refund_q, ship_q) =
        (q("reserve"), q("release"), q("charge"), q("refund"), q("ship"));
    let saga = Saga::<Order>::named(&w.name)
        .step_with("reserve", move |o| {
            mailroom::saga::Command::new(&reserve_q, serde_json::json!({ "order": o.order }))
        })
        .compensate_with(move |o| mailroom::saga::Command::new(&release_q, serde_json::json!({ "order": o.order })))
        .step_with("charge", move |o| mailroom::saga::Command::new(&charge_q, serde_json::json!({ "cents": o.cents })))
        .compensate_with(move |o| {
            mailroom::saga::Command::new(&refund_q, Refund { order: o.order, payment: o.payment.clone() })
        })
        .on_reply_as(|o: &mut Order, r: Charged| o.payment = Some(format!("typed-{}", r.ok)))
        .step_with("ship", move |o| mailroom::saga::Command::new(&ship_q, serde_json::json!({ "order": o.order })))
        .tick(Duration::from_millis(50));
    let saga = w.run(saga).await;
    let id = saga.start(&w.order(3)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge", "ship!", "refund", "release"]);
    assert_eq!(
        saga.get(&id).await.unwrap().data.payment.as_deref(),
        Some("typed-charge"),
        "the typed reply was folded in"
    );
    w.teardown(saga).await;
}

/// Charge refuses: reserve is compensated (release), charge itself is not (it took no effect).
async fn failure_at_step_two_compensates_step_one(target: Target) {
    let w = world(target, "sefail", Failures::from([("charge", u32::MAX)])).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(2)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge!", "release"]);
    assert!(saga.get(&id).await.unwrap().error.unwrap().contains("charge refused"));
    w.teardown(saga).await;
}

/// Ship refuses: compensations run in reverse order (refund, then release).
async fn failure_at_step_three_compensates_in_reverse(target: Target) {
    let w = world(target, "serev", Failures::from([("ship", u32::MAX)])).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(3)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge", "ship!", "refund", "release"]);
    assert_eq!(saga.get(&id).await.unwrap().data.payment.as_deref(), Some("pay-charge"));
    w.teardown(saga).await;
}

/// The first step refuses: nothing to compensate, the saga ends Failed at once.
async fn failure_at_step_one_compensates_nothing(target: Target) {
    let w = world(target, "sefirst", Failures::from([("reserve", u32::MAX)])).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(8)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve!"]);
    w.teardown(saga).await;
}

/// Release fails twice, then succeeds: retried with backoff, the saga ends compensated.
async fn compensation_fails_twice_then_succeeds(target: Target) {
    let w = world(target, "secomp", Failures::from([("charge", u32::MAX), ("release", 2)])).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(4)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge!", "release!", "release!", "release"]);
    let history = events(&saga, &id).await;
    assert_eq!(history.iter().filter(|e| e.contains("retry in")).count(), 2, "{history:?}");
    w.teardown(saga).await;
}

/// Release keeps failing: Stuck. An operator working on a second handle of the store (another
/// process, as far as the log can tell) retries it; the running orchestrator's deadline scan picks
/// the retry up and finishes the compensation.
async fn stuck_then_operator_retry(target: Target) {
    let w = world(target, "sestuck", Failures::from([("charge", u32::MAX), ("release", 3)])).await;
    let saga = w.run(w.saga().compensation_retry(3, Duration::from_millis(20), 2, Duration::from_millis(100))).await;
    let id = saga.start(&w.order(5)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Stuck).await, Status::Stuck);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(saga.get(&id).await.unwrap().status, Status::Stuck, "stays stuck, nothing dropped");

    let operator = EmbeddedSagaStore::open(&w.dir).unwrap();
    let stuck =
        ops::list(&operator, &ListFilter { status: Some(Status::Stuck), ..ListFilter::default() }).await.unwrap();
    assert_eq!(stuck.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    let version = stuck[0].version;
    assert!(matches!(ops::abandon(&operator, "no-such-saga").await, Err(mailroom::saga::SagaError::NotFound(_))));
    ops::retry(&operator, &id).await.unwrap();
    assert_eq!(ops::show(&operator, &id).await.unwrap().version, version + 1, "the retry bumped the version");
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed, "the orchestrator saw the retry");
    assert_eq!(w.log(), ["reserve", "charge!", "release!", "release!", "release!", "release"]);
    assert!(events(&saga, &id).await.iter().any(|e| e == "operator retry"));
    assert!(matches!(ops::abandon(&operator, &id).await, Err(mailroom::saga::SagaError::NotStuck(_, Status::Failed))));

    w.teardown(saga).await;
}

/// Abandon: an always-failing compensation, stuck, abandoned by the operator; nothing more is sent.
async fn stuck_then_abandoned(target: Target) {
    let w = world(target, "seaband", Failures::from([("charge", u32::MAX), ("release", u32::MAX)])).await;
    let saga = w.run(w.saga().compensation_retry(2, Duration::from_millis(20), 2, Duration::from_millis(100))).await;
    let id = saga.start(&w.order(9)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Stuck).await, Status::Stuck);
    let operator = EmbeddedSagaStore::open(&w.dir).unwrap();
    ops::abandon(&operator, &id).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Abandoned).await, Status::Abandoned);
    let calls = w.log().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.log().len(), calls, "nothing is sent for an abandoned saga");
    assert_eq!(saga.list(Status::Abandoned).await.unwrap(), vec![id.clone()]);
    assert_eq!(events(&saga, &id).await.last().map(String::as_str), Some("operator abandoned"));
    w.teardown(saga).await;
}

/// The orchestrator and the relay are killed while a step's reply is on its way and the store is
/// dropped; a new orchestrator on the reopened store takes the reply from the durable reply queue
/// and finishes the saga. A command the killed relay published but had not marked sent goes out
/// again with the same id (at-least-once); the idempotent services absorb it.
async fn orchestrator_killed_between_steps(target: Target) {
    let mut w = world_with(target, "sekill", Options { idempotent: true, ..Options::default() }).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(6)).await.unwrap();
    w.wait_log("reserve").await;
    saga.abort();
    w.relay.abort();
    // A new process: the store reopened from its directory, a new relay and orchestrator.
    w.store = EmbeddedSagaStore::open(&w.dir).unwrap();
    w.relay = w.store.relay(w.env.bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let saga = w.run(w.saga()).await;
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    assert_eq!(w.log(), ["reserve", "charge", "ship"]);
    for svc in ["reserve", "charge", "ship"] {
        assert_eq!(w.distinct_ids(svc), 1, "{svc}: one command, however many copies");
    }
    w.teardown(saga).await;
}

/// Killed before the relay published the first command: the command waits in the store's outbox
/// on disk, and the next process's relay sends it.
async fn killed_before_the_command_left(target: Target) {
    let mut w = world_with(target, "seunsent", Options { idempotent: true, ..Options::default() }).await;
    w.relay.abort();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(7)).await.unwrap();
    assert_eq!(w.store.pending().await.unwrap(), 1, "the first command is in the outbox, not sent");
    saga.abort();
    w.store = EmbeddedSagaStore::open(&w.dir).unwrap();
    assert_eq!(w.store.pending().await.unwrap(), 1, "still there after reopening");
    w.relay = w.store.relay(w.env.bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let saga = w.run(w.saga()).await;
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    assert_eq!(w.log(), ["reserve", "charge", "ship"]);
    w.teardown(saga).await;
}

/// Killed while compensating: the new orchestrator finishes the compensation in reverse order.
async fn orchestrator_killed_while_compensating(target: Target) {
    let options = Options { failures: Failures::from([("ship", u32::MAX)]), idempotent: true, ..Options::default() };
    let mut w = world_with(target, "sekillc", options).await;
    let saga = w.run(w.saga()).await;
    let id = saga.start(&w.order(10)).await.unwrap();
    w.wait_log("refund").await;
    saga.abort();
    w.relay.abort();
    w.store = EmbeddedSagaStore::open(&w.dir).unwrap();
    w.relay = w.store.relay(w.env.bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let saga = w.run(w.saga()).await;
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge", "ship!", "refund", "release"]);
    for svc in ["refund", "release"] {
        assert_eq!(w.distinct_ids(svc), 1, "{svc}: one command, however many copies");
    }
    w.teardown(saga).await;
}

/// Reserve's first call is lost (no reply): after the step timeout it is re-sent with the same
/// message id, answered, and the saga carries on.
async fn timed_out_step_resent_with_same_id(target: Target) {
    let w = world_with(target, "setime", Options { silent_first: Some("reserve"), ..Options::default() }).await;
    let saga = w.run(w.saga().step_timeout(Duration::from_millis(300))).await;
    let id = saga.start(&w.order(11)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    assert_eq!(w.log(), ["reserve?", "reserve", "charge", "ship"]);
    let ids = w.ids.lock().unwrap().get("reserve").cloned().unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1], "the re-sent step has the same message id");
    assert!(events(&saga, &id).await.iter().any(|e| e.contains("timed out, re-sent")));
    w.teardown(saga).await;
}

/// Every reply arrives twice, and two orchestrators on two handles of the store (two processes, as
/// far as the log and its lock can tell) compete for the reply queue: the version check lets one
/// transition through, so every command is sent exactly once.
async fn racing_duplicate_replies(target: Target) {
    let w = world_with(target, "serace", Options { duplicate_replies: true, ..Options::default() }).await;
    let a = w.run(w.saga()).await;
    let other = EmbeddedSagaStore::open(&w.dir).unwrap();
    let b = w.saga().run_on(w.env.another_bus().await, other).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(a.start(&w.order(n)).await.unwrap());
    }
    for id in &ids {
        assert_eq!(until_status(&a, id, Status::Done).await, Status::Done);
        let history = events(&a, id).await;
        assert_eq!(history.len(), 4, "one transition per step: {history:?}");
        assert_eq!(a.get(id).await.unwrap().version, 3);
    }
    let log = w.log();
    for svc in ["reserve", "charge", "ship"] {
        assert_eq!(log.iter().filter(|l| *l == svc).count(), 10, "{svc} sent once per saga: {log:?}");
    }
    b.stop().await;
    w.teardown(a).await;
}

crate::on_all_targets!(
    happy_path,
    failure_at_step_one_compensates_nothing,
    failure_at_step_two_compensates_step_one,
    failure_at_step_three_compensates_in_reverse,
    compensation_fails_twice_then_succeeds,
    stuck_then_operator_retry,
    stuck_then_abandoned,
    closures_and_typed_replies,
    orchestrator_killed_between_steps,
    killed_before_the_command_left,
    orchestrator_killed_while_compensating,
    timed_out_step_resent_with_same_id,
    racing_duplicate_replies,
);
