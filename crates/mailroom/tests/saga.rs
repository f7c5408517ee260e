//! Orchestrated sagas against the local PostgreSQL (`MAILROOM_PG_URL`), on the embedded broker, a
//! Mailroom server and the RabbitMQ at `RABBITMQ_URL`: happy path, a failing step compensated in
//! reverse order, a compensation failing twice then succeeding, a compensation that keeps failing
//! (Stuck, then an operator retry), the orchestrator killed between steps, a timed-out step re-sent
//! with the same id, and duplicate replies racing across two orchestrators.
#![cfg(feature = "postgres")]

mod common;

use common::order_saga::{charge, refund, release, reserve, ship, Failures, Order};
use common::{env, pg_url, Env, Target};
use mailroom::outbox::{Outbox, RelayHandle};
use mailroom::saga::{Saga, SagaHandle, Status};
use mailroom::{Envelope, HandlerError, WorkerHandle};
use sqlx::PgPool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

struct World {
    env: Env,
    pool: PgPool,
    outbox: Outbox,
    relay: RelayHandle,
    services: Vec<WorkerHandle>,
    /// Calls in arrival order: "reserve", "charge!" for a failed call, ...
    log: Arc<Mutex<Vec<String>>>,
    name: String,
}

async fn world(target: Target, test: &str, failures: Failures) -> World {
    world_with(target, test, failures, false).await
}

/// `duplicate_replies`: every service answers twice (an extra copy of its reply goes first).
async fn world_with(target: Target, test: &str, failures: Failures, duplicate_replies: bool) -> World {
    let env = env(target, test).await;
    let pool = PgPool::connect(&pg_url()).await.expect("the local PostgreSQL");
    let outbox = Outbox::new(pool.clone(), &format!("outbox_{}", env.prefix.replace('.', "_"))).unwrap();
    outbox.migrate().await.unwrap();
    let relay = outbox.relay(env.bus.clone()).poll_interval(Duration::from_millis(50)).run().await.unwrap();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let failures = Arc::new(failures);
    let mut services = Vec::new();
    for svc in ["reserve", "release", "charge", "refund", "ship"] {
        let q = env.q(svc);
        let (log, failures) = (log.clone(), failures.clone());
        let calls = Arc::new(Mutex::new(0u32));
        let w = env
            .bus
            .responder(&q)
            .handle_request(move |_cmd: Envelope<serde_json::Value>, ctx: mailroom::Context| {
                let (log, failures, calls) = (log.clone(), failures.clone(), calls.clone());
                async move {
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
                        return Err(HandlerError::permanent(format!("{svc} refused")));
                    }
                    log.lock().unwrap().push(svc.to_owned());
                    Ok(serde_json::json!({ "ok": svc }))
                }
            })
            .run()
            .await
            .unwrap();
        services.push(w);
    }
    let name = env.prefix.replace('.', "_");
    World { env, pool, outbox, relay, services, log, name }
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
    fn order(&self, n: u32) -> Order {
        Order { prefix: self.env.prefix.clone(), order: n, cents: 4200, payment: None }
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    async fn teardown(self, saga: SagaHandle<Order>) {
        saga.stop().await;
        self.relay.stop().await;
        for s in self.services {
            s.stop().await;
        }
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", self.outbox.table())).execute(&self.pool).await.unwrap();
        sqlx::query("DELETE FROM saga_history WHERE saga_id IN (SELECT id FROM saga_instances WHERE name = $1)")
            .bind(&self.name)
            .execute(&self.pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM saga_instances WHERE name = $1").bind(&self.name).execute(&self.pool).await.unwrap();
        let _ = self.env.bus.transport().delete_queue(&format!("saga.{}.replies", self.name)).await;
        let _ = self.env.bus.transport().delete_queue(&format!("saga.{}.replies.dlq", self.name)).await;
        self.env.cleanup().await;
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

async fn happy_path(target: Target) {
    let w = world(target, "sghappy", Failures::new()).await;
    let saga = w.saga().run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    let id = saga.start(&w.order(1)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    assert_eq!(w.log(), ["reserve", "charge", "ship"]);
    let rec = saga.get(&id).await.unwrap();
    assert_eq!(rec.data, Order { payment: Some("pay-charge".into()), ..w.order(1) }, "the charge reply was folded in");
    assert!(rec.version >= 3, "one version per transition");
    let history: Vec<String> = saga.history(&id).await.unwrap().into_iter().map(|h| h.event).collect();
    assert_eq!(history.len(), 4, "{history:?}");
    assert!(saga.list(Status::Done).await.unwrap().contains(&id));
    w.teardown(saga).await;
}

/// Charge refuses: reserve is compensated (release), charge itself is not (it took no effect).
async fn failure_at_step_two_compensates_step_one(target: Target) {
    let w = world(target, "sgfail", Failures::from([("charge", u32::MAX)])).await;
    let saga = w.saga().run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    let id = saga.start(&w.order(2)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge!", "release"]);
    assert!(saga.get(&id).await.unwrap().error.unwrap().contains("charge refused"));
    w.teardown(saga).await;
}

/// Ship refuses: compensations run in reverse order (refund, then release).
async fn failure_at_step_three_compensates_in_reverse(target: Target) {
    let w = world(target, "sgrev", Failures::from([("ship", u32::MAX)])).await;
    let saga = w.saga().run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    let id = saga.start(&w.order(3)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge", "ship!", "refund", "release"]);
    assert_eq!(
        saga.get(&id).await.unwrap().data.payment.as_deref(),
        Some("pay-charge"),
        "the refund had the payment id"
    );
    w.teardown(saga).await;
}

/// Release fails twice, then succeeds: retried with backoff, the saga ends compensated.
async fn compensation_fails_twice_then_succeeds(target: Target) {
    let w = world(target, "sgcomp", Failures::from([("charge", u32::MAX), ("release", 2)])).await;
    let saga = w.saga().run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    let id = saga.start(&w.order(4)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge!", "release!", "release!", "release"]);
    let history: Vec<String> = saga.history(&id).await.unwrap().into_iter().map(|h| h.event).collect();
    assert_eq!(history.iter().filter(|e| e.contains("retry in")).count(), 2, "{history:?}");
    w.teardown(saga).await;
}

/// Release always fails: after the attempt budget the saga is Stuck and listed; an operator retry
/// (once the service is healthy again) finishes the compensation.
async fn compensation_keeps_failing_is_stuck(target: Target) {
    let w = world(target, "sgstuck", Failures::from([("charge", u32::MAX), ("release", 3)])).await;
    let saga = w
        .saga()
        .compensation_retry(3, Duration::from_millis(20), 2, Duration::from_millis(100))
        .run(w.env.bus.clone(), w.outbox.clone())
        .await
        .unwrap();
    let id = saga.start(&w.order(5)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Stuck).await, Status::Stuck);
    assert_eq!(saga.list(Status::Stuck).await.unwrap(), vec![id.clone()]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(saga.get(&id).await.unwrap().status, Status::Stuck, "stays stuck, nothing dropped");
    saga.retry(&id).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Failed).await, Status::Failed);
    assert_eq!(w.log(), ["reserve", "charge!", "release!", "release!", "release!", "release"]);
    assert!(saga.abandon(&id).await.is_err(), "only a stuck saga can be abandoned");
    w.teardown(saga).await;
}

/// The orchestrator is killed while a step's reply is on its way; a new orchestrator takes the
/// reply from the durable reply queue and finishes the saga.
async fn orchestrator_killed_between_steps(target: Target) {
    let w = world(target, "sgkill", Failures::new()).await;
    let saga = w.saga().run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    let id = saga.start(&w.order(6)).await.unwrap();
    saga.abort();
    let until = tokio::time::Instant::now() + WAIT;
    while !w.log().contains(&"reserve".to_string()) && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let saga = w.saga().run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    assert_eq!(w.log(), ["reserve", "charge", "ship"]);
    w.teardown(saga).await;
}

/// A step whose reply never comes in time (the reply queue is not consumed: no orchestrator) is
/// re-sent with the same message id after its deadline.
async fn timed_out_step_resent_with_same_id(target: Target) {
    let w = world(target, "sgtime", Failures::new()).await;
    let saga =
        w.saga().step_timeout(Duration::from_millis(300)).run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    let id = saga.start(&w.order(7)).await.unwrap();
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    // Expire a fake pending step by hand: set the instance back to "reserve sent" with an old deadline.
    let pending = "0190-test-same-id".to_string();
    sqlx::query(
        "UPDATE saga_instances SET status = 'Running', step = 0, pending_msg = $2, deadline = now() - interval '1 second',
         version = version + 1 WHERE id = $1",
    )
    .bind(&id)
    .bind(&pending)
    .execute(&w.pool)
    .await
    .unwrap();
    let outbox_ids = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {} WHERE message_id = $1", w.outbox.table()))
            .bind(&pending)
            .fetch_one(&w.pool)
            .await
            .unwrap()
    };
    let until = tokio::time::Instant::now() + WAIT;
    while outbox_ids().await == 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(outbox_ids().await >= 1, "the step was re-sent with the same id");
    // The re-sent reserve is answered; the reply matches the same id and the saga carries on.
    assert_eq!(until_status(&saga, &id, Status::Done).await, Status::Done);
    w.teardown(saga).await;
}

/// Every reply arrives twice, and two orchestrators (two connections, as two processes) compete
/// for the reply queue: the copies race, the version check (and the pending-command check) lets one
/// transition through, so every command is sent exactly once.
async fn racing_duplicate_replies(target: Target) {
    let w = world_with(target, "sgrace", Failures::new(), true).await;
    let a = w.saga().run(w.env.bus.clone(), w.outbox.clone()).await.unwrap();
    let b = w.saga().run(w.env.another_bus().await, w.outbox.clone()).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(a.start(&w.order(n)).await.unwrap());
    }
    for id in &ids {
        assert_eq!(until_status(&a, id, Status::Done).await, Status::Done);
        let history: Vec<String> = a.history(id).await.unwrap().into_iter().map(|h| h.event).collect();
        assert_eq!(history.len(), 4, "one transition per step: {history:?}");
    }
    let log = w.log();
    for svc in ["reserve", "charge", "ship"] {
        assert_eq!(log.iter().filter(|l| *l == svc).count(), 10, "{svc} sent once per saga: {log:?}");
    }
    b.stop().await;
    w.teardown(a).await;
}

crate::on_all_targets!(
    needs [Postgres];
    happy_path,
    failure_at_step_two_compensates_step_one,
    failure_at_step_three_compensates_in_reverse,
    compensation_fails_twice_then_succeeds,
    compensation_keeps_failing_is_stuck,
    orchestrator_killed_between_steps,
    timed_out_step_resent_with_same_id,
    racing_duplicate_replies,
);
