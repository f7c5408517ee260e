//! Scale-out: point-to-point, pub/sub and request-reply on quorum queues of a 3-node RabbitMQ cluster
//! while the node leading the queue is killed (`kill -9`) and restarted. The transport fails over to a
//! surviving node; every publish the broker confirmed is delivered (duplicates allowed: at-least-once).
//!
//! Skipped unless `MAILROOM_CLUSTER_URLS` names the nodes (comma-separated). `tests/run-cluster-tests.sh`
//! brings the cluster up with `../shared/tools/rmq-cluster.sh`, runs these and brings it down; the
//! script path can be overridden with `MAILROOM_CLUSTER_CTL`. The tests kill nodes, so they run one at
//! a time (a shared lock), each bounded by [`TEST_BUDGET`].

use mailroom::{Amqp, AmqpConfig, Bus, BusConfig, Envelope};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Longest one test may run (a node restart alone takes 10-30 s).
const TEST_BUDGET: Duration = Duration::from_secs(300);
/// How long confirmed messages may take to show up after the node is back.
const DRAIN: Duration = Duration::from_secs(60);

static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    n: u32,
}

fn cluster_urls() -> Option<Vec<String>> {
    let urls: Vec<String> = std::env::var("MAILROOM_CLUSTER_URLS")
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    (!urls.is_empty()).then_some(urls)
}

fn ctl_script() -> String {
    std::env::var("MAILROOM_CLUSTER_CTL")
        .unwrap_or_else(|_| format!("{}/../../../shared/tools/rmq-cluster.sh", env!("CARGO_MANIFEST_DIR")))
}

/// Runs the cluster script (`kill N`, `start N`, `ctl N ...`) off the async threads.
async fn cluster(args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let script = ctl_script();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(&script).args(&args).output().map_err(|e| format!("{script}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{script} {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    })
    .await
    .unwrap()
}

/// The node number (1-3) leading quorum queue `queue`, asked of any running node.
async fn leader_of(queue: &str) -> u32 {
    for node in ["1", "2", "3"] {
        let Ok(out) = cluster(&["ctl", node, "list_queues", "name", "type", "leader", "--formatter", "json"]).await
        else {
            continue;
        };
        let Ok(rows) = serde_json::from_str::<Vec<HashMap<String, serde_json::Value>>>(&out) else { continue };
        for row in rows {
            if row.get("name").and_then(|v| v.as_str()) == Some(queue) {
                assert_eq!(row.get("type").and_then(|v| v.as_str()), Some("quorum"), "{queue} is a quorum queue");
                let leader = row.get("leader").and_then(|v| v.as_str()).unwrap_or_default();
                // "c2@host" -> 2
                return leader[1..].split('@').next().and_then(|n| n.parse().ok()).expect("leader node name");
            }
        }
    }
    panic!("no running node knows the leader of {queue}");
}

/// A bus on the cluster with quorum queues; `first` rotates the URL list so buses start on different nodes.
async fn cluster_bus(urls: &[String], first: usize) -> (Bus, Amqp) {
    let mut order = urls.to_vec();
    order.rotate_left(first % urls.len());
    let mut config = AmqpConfig::cluster(order);
    config.publish_timeout = Duration::from_secs(20);
    config.reconnect_max = Duration::from_secs(1);
    if std::env::var_os("MAILROOM_CLUSTER_NO_NACK_RETRY").is_none() {
        config.nack_retry = Duration::from_secs(15);
    }
    let amqp = Amqp::connect(config).await.expect("connect to the cluster");
    let bus = Bus::with_config(Arc::new(amqp.clone()), BusConfig { quorum_queues: true, ..Default::default() });
    (bus, amqp)
}

fn unique(name: &str) -> String {
    format!("t.cluster.{name}.{}", &mailroom::envelope::new_message_id().replace('-', "")[20..])
}

/// Kills the leader of `queue` shortly after the test's traffic started, restarts it, and returns
/// once the node is running and clustered again.
async fn kill_and_restart_leader(queue: &str) -> u32 {
    let t0 = Instant::now();
    let leader = leader_of(queue).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    eprintln!("+{:.1?} killing c{leader}, leader of {queue}", t0.elapsed());
    cluster(&["kill", &leader.to_string()]).await.expect("kill the leader");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let new_leader = leader_of(queue).await;
    assert_ne!(new_leader, leader, "a new leader was elected");
    eprintln!("+{:.1?} new leader c{new_leader}; restarting c{leader}", t0.elapsed());
    cluster(&["start", &leader.to_string()]).await.expect("restart the killed node");
    eprintln!("+{:.1?} c{leader} is back", t0.elapsed());
    leader
}

/// Skips (with a message) when no cluster is configured; otherwise runs `test` under the lock and budget.
async fn with_cluster<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(urls) = cluster_urls() else {
        eprintln!("skipping {name}: set MAILROOM_CLUSTER_URLS (or run crates/mailroom/tests/run-cluster-tests.sh)");
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let _one_at_a_time = CLUSTER.lock().await;
    tokio::time::timeout(TEST_BUDGET, test(urls)).await.unwrap_or_else(|_| panic!("{name} exceeded {TEST_BUDGET:?}"));
}

/// Publishes with `send` every 10 ms until `stop`, returning the numbers the broker confirmed.
async fn produce<F, Fut>(stop: Arc<AtomicBool>, send: F) -> (HashSet<u32>, u32)
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = mailroom::Result<String>>,
{
    let (mut confirmed, mut failed) = (HashSet::new(), 0);
    let mut n = 0;
    let started = Instant::now();
    let mut last_ok = true;
    while !stop.load(Ordering::SeqCst) {
        let r = send(n).await;
        if r.is_ok() != last_ok {
            eprintln!("{:?}: send {n}: {r:?}", started.elapsed());
            last_ok = r.is_ok();
        }
        match r {
            Ok(_) => {
                confirmed.insert(n);
            }
            Err(_) => failed += 1,
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (confirmed, failed)
}

async fn wait_for_all(confirmed: &HashSet<u32>, seen: &Mutex<HashMap<u32, u32>>) -> Vec<u32> {
    let until = Instant::now() + DRAIN;
    loop {
        let missing: Vec<u32> = {
            let seen = seen.lock().unwrap();
            let mut m: Vec<u32> = confirmed.iter().filter(|n| !seen.contains_key(n)).copied().collect();
            m.sort_unstable();
            m
        };
        if missing.is_empty() || Instant::now() >= until {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How often each number was delivered.
type Seen = Arc<Mutex<HashMap<u32, u32>>>;

fn record(seen: &Seen, n: u32) {
    *seen.lock().unwrap().entry(n).or_default() += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn point_to_point_survives_leader_failure() {
    with_cluster("point_to_point_survives_leader_failure", |urls| async move {
        let (producer, _) = cluster_bus(&urls, 0).await;
        let (consumer, consumer_link) = cluster_bus(&urls, 0).await;
        let q = unique("jobs");
        let seen: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
        let s = seen.clone();
        let worker = consumer
            .worker(&q)
            .prefetch(16)
            .concurrency(4)
            .handle(move |m: Envelope<Job>, _| {
                record(&s, m.body.n);
                async { Ok(()) }
            })
            .run()
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st, qq) = (producer.clone(), stop.clone(), q.clone());
        let sender = tokio::spawn(async move { produce(st, |n| p.send(&qq, Job { n })).await });
        let killed = kill_and_restart_leader(&q).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::SeqCst);
        let (confirmed, failed) = sender.await.unwrap();
        let missing = wait_for_all(&confirmed, &seen).await;
        let dups = seen.lock().unwrap().values().filter(|c| **c > 1).count();
        eprintln!(
            "p2p: killed c{killed}; {} confirmed, {failed} unconfirmed, {} received, {dups} duplicated, missing {missing:?}; \
             consumer reconnected {} times, now on {:?}",
            confirmed.len(),
            seen.lock().unwrap().len(),
            consumer_link.generation() - 1,
            consumer_link.connected_url()
        );
        assert!(confirmed.len() > 50, "traffic flowed");
        assert!(missing.is_empty(), "confirmed but never delivered: {missing:?}");
        worker.stop().await;
        for name in [q.clone(), format!("{q}.dlq")] {
            let _ = producer.transport().delete_queue(&name).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_survives_leader_failure() {
    with_cluster("pubsub_survives_leader_failure", |urls| async move {
        let (publisher, _) = cluster_bus(&urls, 0).await;
        let (sub_a, _) = cluster_bus(&urls, 0).await;
        let (sub_b, _) = cluster_bus(&urls, 1).await;
        let topic = unique("orders");
        let (group_a, group_b) = (unique("billing"), unique("shipping"));
        let (seen_a, seen_b): (Seen, Seen) = Default::default();
        let mut workers = Vec::new();
        for (bus, group, seen) in [(&sub_a, &group_a, &seen_a), (&sub_b, &group_b, &seen_b)] {
            let s = seen.clone();
            workers.push(
                bus.subscribe(&format!("{topic}.*"))
                    .group(group)
                    .handle(move |m: Envelope<Job>, _| {
                        record(&s, m.body.n);
                        async { Ok(()) }
                    })
                    .run()
                    .await
                    .unwrap(),
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (p, st, key) = (publisher.clone(), stop.clone(), format!("{topic}.placed"));
        let sender = tokio::spawn(async move { produce(st, |n| p.publish(&key, Job { n })).await });
        let killed = kill_and_restart_leader(&group_a).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::SeqCst);
        let (confirmed, failed) = sender.await.unwrap();
        let missing_a = wait_for_all(&confirmed, &seen_a).await;
        let missing_b = wait_for_all(&confirmed, &seen_b).await;
        eprintln!(
            "pubsub: killed c{killed}; {} confirmed, {failed} unconfirmed; group a got {}, missing {missing_a:?}; \
             group b got {}, missing {missing_b:?}",
            confirmed.len(),
            seen_a.lock().unwrap().len(),
            seen_b.lock().unwrap().len()
        );
        assert!(confirmed.len() > 50, "traffic flowed");
        assert!(missing_a.is_empty() && missing_b.is_empty(), "every group gets every confirmed event");
        for w in workers {
            w.stop().await;
        }
        for g in [&group_a, &group_b] {
            for name in [g.clone(), format!("{g}.dlq")] {
                let _ = publisher.transport().delete_queue(&name).await;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_reply_survives_leader_failure() {
    with_cluster("request_reply_survives_leader_failure", |urls| async move {
        let (requester, requester_link) = cluster_bus(&urls, 0).await;
        let (service, _) = cluster_bus(&urls, 0).await;
        let q = unique("reports");
        let responder = service
            .responder(&q)
            .handle_request(|m: Envelope<Job>, _| async move { Ok(Job { n: m.body.n * 2 }) })
            .run()
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st, qq) = (requester.clone(), stop.clone(), q.clone());
        // Each request is retried (a new request) until answered: a reply lost with its node is the
        // caller's to retry, as SDK.md says (request-reply is not durable across failures).
        let client = tokio::spawn(async move {
            let (mut answered, mut retries, mut n) = (0u32, 0u32, 0u32);
            let mut worst = Duration::ZERO;
            while !st.load(Ordering::SeqCst) {
                let started = Instant::now();
                loop {
                    match r.request::<Job, _>(&qq, Job { n }).timeout(Duration::from_secs(3)).await {
                        Ok(reply) => {
                            assert_eq!(reply.n, n * 2);
                            answered += 1;
                            break;
                        }
                        Err(e) => {
                            retries += 1;
                            eprintln!("request {n}: {e}; retrying");
                            assert!(started.elapsed() < Duration::from_secs(60), "request {n} unanswered for 60 s");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                worst = worst.max(started.elapsed());
                n += 1;
            }
            (answered, retries, worst)
        });
        let killed = kill_and_restart_leader(&q).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::SeqCst);
        let (answered, retries, worst) = client.await.unwrap();
        eprintln!(
            "request-reply: killed c{killed}; {answered} answered, {retries} retried, slowest {worst:?}, \
             requester reconnected {} times, late replies {}",
            requester_link.generation() - 1,
            requester.late_replies()
        );
        assert!(answered > 20, "requests flowed");
        responder.stop().await;
        for name in [q.clone(), format!("{q}.dlq")] {
            let _ = requester.transport().delete_queue(&name).await;
        }
    })
    .await;
}
