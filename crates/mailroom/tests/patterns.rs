//! Every pattern, on the embedded broker, a Mailroom server on port 0 and RabbitMQ.

mod common;

use common::{env, eventually, Target};
use mailroom::envelope::headers;
use mailroom::{
    Envelope, GatherError, HandlerError, Headers, MemoryInbox, MessageKind, Raw, RequestError, RetryPolicy, Strategy,
    Target as To,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    n: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Answer {
    n: u32,
}

on_all_targets!(
    point_to_point_competing_workers,
    envelope_metadata_survives_the_trip,
    pubsub_each_group_gets_a_copy,
    request_reply_outcomes,
    many_requests_in_flight,
    scatter_gather_strategies,
    retry_then_dead_letter_then_redrive,
    redrive_keeps_dead_letters_whose_target_is_gone,
    redrive_resets_attempts_server_side_on_mailroom,
    endpoint_dispatches_by_type_and_dead_letters_unknown_types,
    delayed_retry_waits_its_backoff,
    decode_errors_go_straight_to_dlq,
    header_filter_subscription,
    recipient_list_reports_per_recipient,
    idempotent_consumer_skips_duplicates,
    one_trace_id_across_the_flow,
    killed_handler_is_redelivered_without_double_effect,
);

async fn point_to_point_competing_workers(target: Target) {
    let env = env(target, "p2p").await;
    let q = env.q("jobs");
    let other = env.another_bus().await;
    let seen: Arc<Mutex<Vec<(u32, usize)>>> = Arc::default();
    let active = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for (i, bus) in [env.bus.clone(), other.clone()].into_iter().enumerate() {
        let (seen, active, peak) = (seen.clone(), active.clone(), peak.clone());
        let h = bus
            .worker(&q)
            .prefetch(4)
            .concurrency(2)
            .handle(move |m: Envelope<Job>, _ctx| {
                let (seen, active, peak) = (seen.clone(), active.clone(), peak.clone());
                async move {
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                    seen.lock().unwrap().push((m.body.n, i));
                    Ok(())
                }
            })
            .run()
            .await
            .unwrap();
        handles.push(h);
    }
    for n in 0..20 {
        env.bus.send(&q, Job { n }).await.unwrap();
    }
    assert!(eventually(WAIT, || seen.lock().unwrap().len() >= 20).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = seen.lock().unwrap().clone();
    let ns: HashSet<u32> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(seen.len(), 20, "each job handled once");
    assert_eq!(ns.len(), 20);
    assert!(peak.load(Ordering::SeqCst) <= 4, "two workers x concurrency 2");
    assert!(seen.iter().any(|(_, w)| *w == 0) && seen.iter().any(|(_, w)| *w == 1), "both workers competed");
    assert_eq!(handles[0].metrics().ok + handles[1].metrics().ok, 20);
    for h in handles {
        h.stop().await;
    }
    env.cleanup().await;
}

async fn envelope_metadata_survives_the_trip(target: Target) {
    let env = env(target, "envelope").await;
    let q = env.q("meta");
    let got: Arc<Mutex<Option<Envelope<Job>>>> = Arc::default();
    let g = got.clone();
    let h = env
        .bus
        .worker(&q)
        .handle(move |m: Envelope<Job>, _| {
            let g = g.clone();
            async move {
                *g.lock().unwrap() = Some(m);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let sent = Envelope::command(Job { n: 7 }).correlation("conv-1").with_header("region", "eu");
    let id = env.bus.send_envelope(&q, sent.clone()).await.unwrap();
    assert_eq!(id, sent.id);
    assert!(eventually(WAIT, || got.lock().unwrap().is_some()).await);
    let m = got.lock().unwrap().clone().unwrap();
    assert_eq!(m.id, sent.id);
    assert_eq!(m.kind, MessageKind::Command);
    assert_eq!(m.correlation_id.as_deref(), Some("conv-1"));
    assert_eq!(m.type_name, "Job");
    assert_eq!(m.header("region"), Some("eu"));
    assert!(m.header("traceparent").is_some());
    assert_eq!(mailroom::envelope::millis(m.sent_at), mailroom::envelope::millis(sent.sent_at));
    assert_eq!(m.body, Job { n: 7 });
    h.stop().await;
    env.cleanup().await;
}

async fn pubsub_each_group_gets_a_copy(target: Target) {
    let env = env(target, "pubsub").await;
    let topic = env.q("orders");
    let billing = env.q("billing");
    let shipping = env.q("shipping");
    let b_count = Arc::new(AtomicUsize::new(0));
    let s_count = Arc::new(AtomicUsize::new(0));
    let other = env.another_bus().await;
    let mut handles = Vec::new();
    // Billing: two competing workers on two connections.
    for bus in [env.bus.clone(), other.clone()] {
        let c = b_count.clone();
        handles.push(
            bus.subscribe(&format!("{topic}.*"))
                .group(&billing)
                .handle(move |_m: Envelope<Job>, _| {
                    let c = c.clone();
                    async move {
                        c.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                })
                .run()
                .await
                .unwrap(),
        );
    }
    let c = s_count.clone();
    let shipping_handler = move |_m: Envelope<Job>, _| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    };
    let s =
        env.bus.subscribe(&format!("{topic}.*")).group(&shipping).handle(shipping_handler.clone()).run().await.unwrap();
    for n in 0..3 {
        env.bus.publish(&format!("{topic}.placed"), Job { n }).await.unwrap();
    }
    env.bus.publish("unrelated.topic", Job { n: 99 }).await.unwrap();
    assert!(eventually(WAIT, || b_count.load(Ordering::SeqCst) == 3 && s_count.load(Ordering::SeqCst) == 3).await);
    // A group that goes offline keeps its durable queue and catches up.
    s.stop().await;
    env.bus.publish(&format!("{topic}.placed"), Job { n: 4 }).await.unwrap();
    let s = env.bus.subscribe(&format!("{topic}.*")).group(&shipping).handle(shipping_handler).run().await.unwrap();
    assert!(eventually(WAIT, || s_count.load(Ordering::SeqCst) == 4).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b_count.load(Ordering::SeqCst), 4);
    s.stop().await;
    for h in handles {
        h.stop().await;
    }
    env.cleanup().await;
}

async fn request_reply_outcomes(target: Target) {
    let env = env(target, "rpc").await;
    let q = env.q("double");
    let slow = env.q("slow");
    let server = env.another_bus().await;
    let h = server
        .responder(&q)
        .handle_request(|m: Envelope<Job>, _| async move {
            if m.body.n == 13 {
                return Err(HandlerError::permanent("unlucky").with_kind("validation"));
            }
            Ok(Answer { n: m.body.n * 2 })
        })
        .run()
        .await
        .unwrap();
    let s = server
        .responder(&slow)
        .handle_request(|m: Envelope<Job>, _| async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok(Answer { n: m.body.n })
        })
        .run()
        .await
        .unwrap();
    let r: Answer = env.bus.request(&q, Job { n: 21 }).timeout(Duration::from_secs(5)).await.unwrap();
    assert_eq!(r, Answer { n: 42 });
    match env.bus.request::<Answer, _>(&q, Job { n: 13 }).timeout(Duration::from_secs(5)).await {
        Err(RequestError::Remote(f)) => {
            assert_eq!(f.kind, "validation");
            assert_eq!(f.message, "unlucky");
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    let missing = env.q("nobody-home");
    match env.bus.request::<Answer, _>(&missing, Job { n: 1 }).timeout(Duration::from_secs(5)).await {
        Err(RequestError::NoRoute(q)) => assert_eq!(q, missing),
        other => panic!("expected no route, got {other:?}"),
    }
    let started = std::time::Instant::now();
    match env.bus.request::<Answer, _>(&slow, Job { n: 1 }).timeout(Duration::from_millis(150)).await {
        Err(RequestError::Timeout) => {}
        other => panic!("expected timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(400));
    assert!(eventually(WAIT, || env.bus.late_replies() == 1).await, "late reply counted");
    h.stop().await;
    s.stop().await;
    env.cleanup().await;
}

async fn many_requests_in_flight(target: Target) {
    let env = env(target, "inflight").await;
    let q = env.q("echo");
    let h = env
        .bus
        .responder(&q)
        .concurrency(16)
        .handle_request(|m: Envelope<Job>, _| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Answer { n: m.body.n })
        })
        .run()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..30 {
        let bus = env.bus.clone();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            bus.request::<Answer, _>(&q, Job { n }).timeout(Duration::from_secs(10)).await
        }));
    }
    for (n, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), Answer { n: n as u32 });
    }
    h.stop().await;
    env.cleanup().await;
}

async fn scatter_gather_strategies(target: Target) {
    let env = env(target, "scatter").await;
    let topic = env.q("search");
    let names = [env.q("a"), env.q("b"), env.q("slow")];
    let mut handles = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let delay = if i == 2 { 2_000 } else { 10 * i as u64 };
        handles.push(
            env.bus
                .responder(name)
                .topic(&topic)
                .handle_request(move |m: Envelope<Job>, _| async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    Ok(Answer { n: m.body.n + i as u32 })
                })
                .run()
                .await
                .unwrap(),
        );
    }
    let all = names.to_vec();
    let g = env
        .bus
        .scatter::<Answer, _>(To::Queues(all.clone()), Job { n: 1 })
        .deadline(Duration::from_millis(500))
        .await
        .unwrap();
    assert!(!g.complete);
    assert_eq!(g.replies.len(), 2);
    assert_eq!(g.missing, vec![names[2].clone()]);
    let g = env
        .bus
        .scatter::<Answer, _>(To::Queues(all.clone()), Job { n: 1 })
        .gather(Strategy::FirstN(1))
        .deadline(Duration::from_secs(2))
        .await
        .unwrap();
    assert!(g.complete);
    assert_eq!(g.replies.len(), 1);
    match env
        .bus
        .scatter::<Answer, _>(To::Queues(all.clone()), Job { n: 1 })
        .gather(Strategy::Quorum(3))
        .deadline(Duration::from_millis(300))
        .await
    {
        Err(GatherError::QuorumNotMet(partial)) => assert_eq!(partial.replies.len(), 2),
        other => panic!("expected quorum failure, got {other:?}"),
    }
    let g = env
        .bus
        .scatter::<Answer, _>(To::Queues(all[..2].to_vec()), Job { n: 1 })
        .gather(Strategy::Quorum(2))
        .deadline(Duration::from_secs(2))
        .await
        .unwrap();
    assert!(g.complete && g.missing.is_empty());
    // Topic target: unknown responders; each group queue answers.
    let g = env
        .bus
        .scatter::<Answer, _>(To::Topic(topic.clone()), Job { n: 10 })
        .gather(Strategy::UntilDeadline)
        .deadline(Duration::from_millis(500))
        .await
        .unwrap();
    let who: HashSet<String> = g.replies.iter().map(|(w, _)| w.clone()).collect();
    assert_eq!(who, names[..2].iter().cloned().collect());
    assert!(matches!(
        env.bus.scatter::<Answer, _>(To::Topic(topic.clone()), Job { n: 1 }).gather(Strategy::All).await,
        Err(GatherError::InvalidStrategy)
    ));
    for h in handles {
        h.stop().await;
    }
    env.cleanup().await;
}

async fn retry_then_dead_letter_then_redrive(target: Target) {
    let env = env(target, "retry").await;
    let q = env.q("flaky");
    let calls = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();
    let (c, hl, ids2) = (calls.clone(), healthy.clone(), ids.clone());
    let policy =
        RetryPolicy::new().immediate(1).delayed(2).backoff(Duration::from_millis(50), 2, Duration::from_millis(100));
    let h = env
        .bus
        .worker(&q)
        .retry(policy)
        .handle(move |m: Envelope<Job>, _| {
            let (c, hl, ids) = (c.clone(), hl.clone(), ids2.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                ids.lock().unwrap().push(m.id.clone());
                if hl.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(HandlerError::transient("database down"))
                }
            }
        })
        .run()
        .await
        .unwrap();
    let id = env.bus.send(&q, Job { n: 1 }).await.unwrap();
    let dlq = format!("{q}.dlq");
    let t = env.bus.transport().clone();
    let mut count = 0;
    for _ in 0..500 {
        count = t.message_count(&dlq).await.unwrap();
        if count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count, 1, "dead-lettered after retries");
    // Which mechanism delayed the retries: Mailroom's delayed-message exchange (no retry queues) or,
    // on RabbitMQ without the plugin, TTL retry queues.
    let mailroom = target != Target::Rabbit;
    assert_eq!(t.has_delayed_exchange(), mailroom);
    for round in 0..2 {
        let retry_queue = t.message_count(&format!("{q}.retry.{round}")).await;
        assert_eq!(retry_queue.is_ok(), !mailroom, "{q}.retry.{round} exists: {retry_queue:?}");
    }
    // (1 + 1 immediate) x (1 + 2 delayed rounds)
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert!(ids.lock().unwrap().iter().all(|i| *i == id), "id stable across retries");
    let m = h.metrics();
    assert_eq!(m.failed, 6);
    assert_eq!(m.dead_lettered, 1);
    assert_eq!(m.retried, 5);
    // Inspect the DLQ copy.
    let mut dead = t.get(&dlq).await.unwrap().unwrap();
    let meta = mailroom::Metadata::from_properties(&dead.properties);
    assert_eq!(meta.id, id);
    assert_eq!(meta.header(headers::ATTEMPT), Some("6"));
    assert_eq!(meta.header(headers::SOURCE_QUEUE), Some(q.as_str()));
    assert_eq!(meta.header(headers::ERROR), Some("database down"));
    assert_eq!(meta.header(headers::ERROR_KIND), Some("transient"));
    assert!(meta.header(headers::FIRST_FAILURE_MS).is_some());
    drop(dead.acker.take()); // leave it unsettled: back to the DLQ when the channel goes
    drop(dead);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Redrive once the dependency is back: same id, handled.
    healthy.store(true, Ordering::SeqCst);
    let before = calls.load(Ordering::SeqCst);
    let mut moved = 0;
    for _ in 0..50 {
        moved += env.bus.redrive(&dlq).await.unwrap();
        if moved == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(moved, 1);
    assert!(eventually(WAIT, || calls.load(Ordering::SeqCst) == before + 1).await);
    assert_eq!(ids.lock().unwrap().last().unwrap(), &id);
    assert!(eventually(WAIT, || h.metrics().ok == 1).await);
    h.stop().await;
    env.cleanup().await;
}

/// A redrive on Mailroom (embedded, or a server through its HTTP API) is server-side; on RabbitMQ
/// client-side. Either way the redriven message starts its attempts afresh: the whole retry policy
/// runs again, the handler sees no failure headers, and the dead letter it ends as counts 4 attempts,
/// not 6 (a server-side copy keeps its headers; the worker resets them on the dead-letter mark).
async fn redrive_resets_attempts_server_side_on_mailroom(target: Target) {
    let env = env(target, "redrive_reset").await;
    let q = env.q("always_fails");
    let dlq = format!("{q}.dlq");
    let seen: Arc<Mutex<Vec<(u32, bool)>>> = Arc::default();
    let s = seen.clone();
    let policy =
        RetryPolicy::new().immediate(1).delayed(1).backoff(Duration::from_millis(20), 2, Duration::from_millis(40));
    let h = env
        .bus
        .worker(&q)
        .retry(policy)
        .handle(move |m: Envelope<Job>, _| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push((m.meta.attempt(), m.meta.header(headers::ERROR).is_some()));
                Err::<(), _>(HandlerError::transient("still down"))
            }
        })
        .run()
        .await
        .unwrap();
    let id = env.bus.send(&q, Job { n: 7 }).await.unwrap();
    let t = env.bus.transport().clone();
    assert!(
        eventually(WAIT, || h.metrics().dead_lettered == 1).await,
        "dead-lettered after the retries: {:?}",
        h.metrics()
    );
    assert!(eventually(WAIT, || seen.lock().unwrap().len() == 4).await);
    let first = seen.lock().unwrap().clone();
    assert_eq!(first.iter().map(|(a, _)| *a).collect::<Vec<_>>(), [0, 0, 2, 2]);
    assert_eq!(t.message_count(&dlq).await.unwrap(), 1);

    let report = env.bus.redrive_report(&dlq).await.unwrap();
    assert_eq!(report.moved, 1, "{report:?}");
    let server_side = if target == Target::Rabbit { 0 } else { 1 };
    assert_eq!(report.server_side, server_side, "{target:?}: {report:?}");
    assert!(report.unroutable.is_empty());

    assert!(eventually(WAIT, || h.metrics().dead_lettered == 2).await, "dead-lettered again: {:?}", h.metrics());
    assert!(eventually(WAIT, || seen.lock().unwrap().len() == 8).await);
    let again: Vec<(u32, bool)> = seen.lock().unwrap()[4..].to_vec();
    assert_eq!(again, [(0, false), (0, false), (2, true), (2, true)], "the retry policy ran again from the start");
    let mut dead = None;
    for _ in 0..200 {
        dead = t.get(&dlq).await.unwrap();
        if dead.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut dead = dead.expect("the dead letter of the second round");
    let meta = mailroom::Metadata::from_properties(&dead.properties);
    assert_eq!(meta.id, id, "same id through the redrive");
    assert_eq!(meta.header(headers::ATTEMPT), Some("4"));
    assert_eq!(meta.header(headers::DEAD_LETTERED), Some(q.as_str()));
    dead.ack().await.unwrap();
    h.stop().await;
    env.cleanup().await;
}

/// Redrive publishes with `mandatory`: a dead letter whose source queue was deleted is returned by the
/// broker and stays in the DLQ (it was confirmed, acked and lost before), while the others move on.
async fn redrive_keeps_dead_letters_whose_target_is_gone(target: Target) {
    let env = env(target, "redrive_gone").await;
    let gone = env.q("gone");
    let alive = env.q("alive");
    let dlq = format!("{alive}.dlq");
    env.bus.declare_queue(&gone).await.unwrap();
    env.bus.declare_queue(&alive).await.unwrap();
    // Dead letters as the pipeline writes them: the first from `gone`, the second from `alive`.
    let lost = Envelope::command(Job { n: 1 }).with_header(headers::SOURCE_QUEUE, gone.as_str());
    let kept_id = lost.id.clone();
    env.bus.send_envelope(&dlq, lost).await.unwrap();
    let ok = Envelope::command(Job { n: 2 }).with_header(headers::SOURCE_QUEUE, alive.as_str());
    let moved_id = ok.id.clone();
    env.bus.send_envelope(&dlq, ok).await.unwrap();
    env.bus.transport().delete_queue(&gone).await.unwrap();

    let report = env.bus.redrive_report(&dlq).await.unwrap();
    assert_eq!(report.moved, 1, "{report:?}");
    assert_eq!(report.unroutable, vec![mailroom::Unroutable { message_id: kept_id.clone(), target: gone.clone() }]);
    let t = env.bus.transport().clone();
    let mut in_dlq = 0;
    for _ in 0..200 {
        in_dlq = t.message_count(&dlq).await.unwrap();
        if in_dlq == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(in_dlq, 1, "the unroutable dead letter is still in the DLQ");
    let mut kept = t.get(&dlq).await.unwrap().expect("kept dead letter");
    let meta = mailroom::Metadata::from_properties(&kept.properties);
    assert_eq!(meta.id, kept_id);
    assert_eq!(meta.header(headers::SOURCE_QUEUE), Some(gone.as_str()), "left untouched");
    kept.release().await.unwrap();
    let mut back = t.get(&alive).await.unwrap().expect("redriven copy");
    assert_eq!(mailroom::Metadata::from_properties(&back.properties).id, moved_id);
    back.ack().await.unwrap();

    // Once the target exists again, the same dead letter moves.
    env.bus.declare_queue(&gone).await.unwrap();
    assert_eq!(env.bus.redrive(&dlq).await.unwrap(), 1);
    let mut again = t.get(&gone).await.unwrap().expect("redriven after the queue came back");
    assert_eq!(mailroom::Metadata::from_properties(&again.properties).id, kept_id);
    again.ack().await.unwrap();
    assert_eq!(t.message_count(&dlq).await.unwrap(), 0);
    env.cleanup().await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlaceOrder {
    sku: String,
}
impl mailroom::Message for PlaceOrder {
    const NAME: &'static str = "test.place-order.v1";
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CancelOrder {
    order: u32,
}
impl mailroom::Message for CancelOrder {
    const NAME: &'static str = "test.cancel-order.v1";
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Refund {
    cents: u32,
}
impl mailroom::Message for Refund {
    const NAME: &'static str = "test.refund.v1";
}

/// Shared state a handler reads through `ctx.state()`.
#[derive(Default)]
struct Ledger {
    lines: Mutex<Vec<String>>,
}

/// One endpoint, two message types, each to its handler by the `type` property; a type nobody
/// handles goes to the DLQ with a reason (no decode attempt); `?` on any error and `.permanent()`
/// work in handlers; shared state comes from `ctx.state()`.
async fn endpoint_dispatches_by_type_and_dead_letters_unknown_types(target: Target) {
    use mailroom::ResultExt;
    let env = env(target, "endpoint").await;
    let q = env.q("orders");
    let ledger = Arc::new(Ledger::default());
    let h = env
        .bus
        .endpoint(&q)
        .shared_state(Arc::clone(&ledger))
        .on(|m: Envelope<PlaceOrder>, ctx| async move {
            // `?` on a foreign error type, marked permanent: a bad SKU is never retried.
            let n: u32 = m.body.sku.parse().permanent()?;
            ctx.state::<Ledger>()?.lines.lock().unwrap().push(format!("place {n}"));
            Ok(())
        })
        .on(|m: Envelope<CancelOrder>, ctx| async move {
            ctx.state::<Ledger>()?.lines.lock().unwrap().push(format!("cancel {}", m.body.order));
            Ok(())
        })
        .run()
        .await
        .unwrap();
    let bus = &env.bus;
    bus.send_message(&q, PlaceOrder { sku: "7".into() }).await.unwrap();
    bus.send_message(&q, CancelOrder { order: 7 }).await.unwrap();
    let refund = bus.send_message(&q, Refund { cents: 5 }).await.unwrap();
    let bad_sku = bus.send_message(&q, PlaceOrder { sku: "seven".into() }).await.unwrap();
    let dlq = format!("{q}.dlq");
    let t = bus.transport().clone();
    let mut dead = 0;
    for _ in 0..500 {
        dead = t.message_count(&dlq).await.unwrap();
        if dead == 2 && h.metrics().ok == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dead, 2, "the unknown type and the bad SKU are dead letters");
    assert_eq!(h.metrics().ok, 2);
    let mut lines = ledger.lines.lock().unwrap().clone();
    lines.sort();
    assert_eq!(lines, ["cancel 7", "place 7"], "each type reached its own handler");
    let mut reasons = std::collections::HashMap::new();
    for _ in 0..2 {
        let mut m = t.get(&dlq).await.unwrap().unwrap();
        let meta = mailroom::Metadata::from_properties(&m.properties);
        reasons.insert(
            meta.id.clone(),
            (meta.header(headers::ERROR_KIND).map(str::to_owned), meta.header(headers::ERROR).map(str::to_owned)),
        );
        assert_eq!(meta.header(headers::ATTEMPT), Some("1"), "permanent: not retried");
        m.ack().await.unwrap();
    }
    let (kind, reason) = &reasons[&refund];
    assert_eq!(kind.as_deref(), Some("unknown-type"));
    let reason = reason.as_deref().unwrap();
    assert!(reason.contains("`test.refund.v1`"), "{reason}");
    assert!(reason.contains("test.cancel-order.v1, test.place-order.v1"), "{reason}");
    let (kind, reason) = &reasons[&bad_sku];
    assert_eq!(kind.as_deref(), Some("permanent"));
    assert!(reason.as_deref().unwrap().contains("invalid digit"), "{reason:?}");
    h.stop().await;
    env.cleanup().await;
}

/// A delayed retry really waits (delayed exchange on Mailroom, TTL queue on RabbitMQ), and the
/// delay header does not leak into what the handler or the DLQ sees.
async fn delayed_retry_waits_its_backoff(target: Target) {
    let env = env(target, "delay").await;
    let q = env.q("slow");
    type Calls = Vec<(std::time::Instant, Option<String>)>;
    let calls: Arc<Mutex<Calls>> = Arc::default();
    let c = calls.clone();
    let backoff = Duration::from_millis(400);
    let policy = RetryPolicy::new().delayed(1).backoff(backoff, 2, backoff).jitter(mailroom::Jitter::None);
    let h = env
        .bus
        .worker(&q)
        .retry(policy)
        .handle(move |m: Envelope<Job>, _| {
            c.lock().unwrap().push((std::time::Instant::now(), m.header("x-delay").map(str::to_owned)));
            async { Err::<(), _>(HandlerError::transient("later")) }
        })
        .run()
        .await
        .unwrap();
    env.bus.send(&q, Job { n: 1 }).await.unwrap();
    assert!(eventually(WAIT, || h.metrics().dead_lettered == 1).await);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let waited = calls[1].0 - calls[0].0;
    assert!(waited >= backoff - Duration::from_millis(20), "retried after {waited:?}");
    assert!(waited < backoff * 5, "retried after {waited:?}");
    // The counter moves before the DLQ publish: wait for the copy itself.
    let mut dead = None;
    for _ in 0..200 {
        dead = env.bus.transport().get(&format!("{q}.dlq")).await.unwrap();
        if dead.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut dead = dead.expect("the DLQ copy");
    let meta = mailroom::Metadata::from_properties(&dead.properties);
    assert_eq!(meta.header("x-delay"), None, "x-delay stripped from the DLQ copy");
    dead.ack().await.unwrap();
    h.stop().await;
    env.cleanup().await;
}

async fn decode_errors_go_straight_to_dlq(target: Target) {
    let env = env(target, "decode").await;
    let q = env.q("typed");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let h = env
        .bus
        .worker(&q)
        .retry(RetryPolicy::new().immediate(3).delayed(2).backoff(Duration::from_millis(50), 2, Duration::from_secs(1)))
        .handle(move |_m: Envelope<Job>, _| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    env.bus.send(&q, Raw(bytes::Bytes::from_static(b"not json"))).await.unwrap();
    // A permanent handler error also skips retries.
    let t = env.bus.transport().clone();
    let dlq = format!("{q}.dlq");
    let mut n = 0;
    for _ in 0..300 {
        n = t.message_count(&dlq).await.unwrap();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(n, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let m = h.metrics();
    assert_eq!((m.failed, m.retried, m.dead_lettered), (1, 0, 1));
    let dead = t.get(&dlq).await.unwrap().unwrap();
    let meta = mailroom::Metadata::from_properties(&dead.properties);
    assert_eq!(meta.header(headers::ERROR_KIND), Some("decode"));
    assert_eq!(meta.header(headers::ATTEMPT), Some("1"));
    drop(dead);
    h.stop().await;
    env.cleanup().await;
}

async fn header_filter_subscription(target: Target) {
    let env = env(target, "filter").await;
    let topic = env.q("orders");
    let eu = env.q("eu-billing");
    let got: Arc<Mutex<Vec<u32>>> = Arc::default();
    let g = got.clone();
    let h = env
        .bus
        .subscribe(&format!("{topic}.#"))
        .group(&eu)
        .filter(Headers::eq("region", "eu"))
        .handle(move |m: Envelope<Job>, _| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(m.body.n);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    for (n, region) in [(1, "eu"), (2, "us"), (3, "eu")] {
        env.bus
            .publish_envelope(&format!("{topic}.placed"), Envelope::event(Job { n }).with_header("region", region))
            .await
            .unwrap();
    }
    assert!(eventually(WAIT, || got.lock().unwrap().len() == 2).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut got = got.lock().unwrap().clone();
    got.sort(); // concurrency 8: handling order is not publish order
    assert_eq!(got, vec![1, 3]);
    // The us event never reached the queue: the binding filtered it, not the process.
    assert_eq!(h.metrics().filtered, 0);
    assert_eq!(h.metrics().received, 2);
    h.stop().await;
    // In-process predicate on a point-to-point queue: filtered messages are acked and counted.
    let q = env.q("pred");
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let h = env
        .bus
        .worker(&q)
        .filter(mailroom::Filter::predicate(|m| m.header("vip") == Some("yes")))
        .handle(move |_m: Envelope<Job>, _| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    env.bus.send_envelope(&q, Envelope::command(Job { n: 1 }).with_header("vip", "yes")).await.unwrap();
    env.bus.send(&q, Job { n: 2 }).await.unwrap();
    assert!(eventually(WAIT, || h.metrics().received == 2).await);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert_eq!(h.metrics().filtered, 1);
    assert_eq!(env.bus.transport().message_count(&q).await.unwrap(), 0);
    h.stop().await;
    env.cleanup().await;
}

async fn recipient_list_reports_per_recipient(target: Target) {
    let env = env(target, "rlist").await;
    let a = env.q("a");
    let b = env.q("b");
    let nowhere = env.q("nowhere");
    env.bus.declare_queue(&a).await.unwrap();
    env.bus.declare_queue(&b).await.unwrap();
    let results = env.bus.send_each(&[a.clone(), b.clone(), nowhere.clone()], Job { n: 5 }).await;
    assert_eq!(results.len(), 3);
    assert!(results[0].1.is_ok() && results[1].1.is_ok());
    assert!(matches!(&results[2].1, Err(mailroom::Error::NoRoute(q)) if *q == nowhere));
    let t = env.bus.transport().clone();
    let ma = t.get(&a).await.unwrap().unwrap();
    let mb = t.get(&b).await.unwrap().unwrap();
    assert_eq!(ma.properties.message_id(), mb.properties.message_id(), "same id to every recipient");
    drop((ma, mb));
    env.cleanup().await;
}

async fn idempotent_consumer_skips_duplicates(target: Target) {
    let env = env(target, "inbox").await;
    let q = env.q("pay");
    let effects = Arc::new(AtomicUsize::new(0));
    let e = effects.clone();
    let inbox = Arc::new(MemoryInbox::default());
    let h = env
        .bus
        .worker(&q)
        .idempotent(inbox.clone())
        .handle(move |_m: Envelope<Job>, _| {
            let e = e.clone();
            async move {
                e.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let msg = Envelope::command(Job { n: 1 });
    env.bus.send_envelope(&q, msg.clone()).await.unwrap();
    env.bus.send_envelope(&q, msg.clone()).await.unwrap();
    assert!(eventually(WAIT, || h.metrics().received == 2).await);
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(h.metrics().duplicates, 1);
    assert_eq!(inbox.len(), 1);
    h.stop().await;
    env.cleanup().await;
}

async fn one_trace_id_across_the_flow(target: Target) {
    let env = env(target, "trace").await;
    let q = env.q("place");
    let topic = env.q("placed");
    let group = env.q("audit");
    type Seen = Vec<(String, String, Option<String>)>;
    let traces: Arc<Mutex<Seen>> = Arc::default();
    let t1 = traces.clone();
    let topic2 = topic.clone();
    let a = env
        .bus
        .worker(&q)
        .handle(move |m: Envelope<Job>, ctx| {
            let (t1, topic2) = (t1.clone(), topic2.clone());
            async move {
                t1.lock().unwrap().push((ctx.trace().trace_id_hex(), m.id.clone(), m.causation_id.clone()));
                ctx.publish(&topic2, Job { n: m.body.n }).await?;
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let t2 = traces.clone();
    let b = env
        .bus
        .subscribe(&topic)
        .group(&group)
        .handle(move |m: Envelope<Job>, ctx| {
            let t2 = t2.clone();
            async move {
                t2.lock().unwrap().push((ctx.trace().trace_id_hex(), m.id.clone(), m.causation_id.clone()));
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let root = mailroom::trace::TraceContext::new_root();
    let sent = Envelope::command(Job { n: 1 }).with_header("traceparent", root.to_string());
    let first_id = env.bus.send_envelope(&q, sent).await.unwrap();
    assert!(eventually(WAIT, || traces.lock().unwrap().len() == 2).await);
    let t = traces.lock().unwrap().clone();
    assert_eq!(t[0].0, root.trace_id_hex());
    assert_eq!(t[1].0, root.trace_id_hex(), "one trace id across send -> handle -> publish -> handle");
    assert_eq!(t[1].2.as_deref(), Some(first_id.as_str()), "causation = the handled message");
    a.stop().await;
    b.stop().await;
    env.cleanup().await;
}

async fn killed_handler_is_redelivered_without_double_effect(target: Target) {
    let env = env(target, "crash").await;
    let q = env.q("work");
    let inbox: Arc<MemoryInbox> = Arc::new(MemoryInbox::default());
    let effects = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let (e, s) = (effects.clone(), started.clone());
    // First worker hangs before finishing: it is killed mid-handle.
    let w1 = env
        .bus
        .worker(&q)
        .idempotent(inbox.clone())
        .handle(move |_m: Envelope<Job>, _| {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    env.bus.send(&q, Job { n: 1 }).await.unwrap();
    tokio::time::timeout(WAIT, started.notified()).await.unwrap();
    w1.abort();
    let other = env.another_bus().await;
    let redelivered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = redelivered.clone();
    let w2 = other
        .worker(&q)
        .idempotent(inbox.clone())
        .handle(move |_m: Envelope<Job>, ctx| {
            let (e, r) = (e.clone(), r.clone());
            async move {
                r.store(ctx.redelivered(), Ordering::SeqCst);
                e.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    assert!(eventually(WAIT, || effects.load(Ordering::SeqCst) == 1).await);
    assert!(redelivered.load(Ordering::SeqCst));
    // A duplicate of the same message (e.g. a producer resend) has no second effect.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    w2.stop().await;
    env.cleanup().await;
}
