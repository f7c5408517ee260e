//! Ordered processing per key: many keys, several workers, random crashes and restarts; no key ever
//! sees a later message before an earlier one, nor two of its messages handled at once.
//!
//! - `in_process_workers_crashing` (embedded, Mailroom server, RabbitMQ): workers on separate
//!   connections in this process, aborted at random (as a crash: handlers dropped mid-way, consumers
//!   gone, unacked messages requeued) and restarted.
//! - `worker_processes_sigkilled` (Mailroom server, RabbitMQ): worker *processes* (this test binary
//!   again, running the ignored `child_partition_worker`) SIGKILLed at random and restarted; they
//!   record what they handle in files, and this process checks the records.
//!
//! The rule a handler checks for its key: the message's sequence number is the last one handled
//! plus one (the next), or the last one again (a crash after handling, before the ack: at-least-once
//! redelivers it). Anything else is out of order. A second handler entering a key whose first has
//! not finished (and is not dead) is concurrent processing.
//!
//! On RabbitMQ these need `rabbitmq_consistent_hash_exchange`; without the plugin they are skipped.

mod common;

use common::{env, Target};
use mailroom::partition::partition_queue;
use mailroom::{Amqp, AmqpConfig, Bus, Envelope};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PARTITIONS: u16 = 4;
const KEYS: usize = 40;
const PER_KEY: i64 = 40;
const DEADLINE: Duration = Duration::from_secs(90);
const CHILD_ENV: &str = "MAILROOM_ORDERED_CHILD";
/// Crashes (in-process aborts, or SIGKILLs of worker processes) per run, spread by progress.
const CRASHES: u64 = 8;
/// How long a handler holds its key (so crashes land mid-handling too).
const WORK: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    key: String,
    seq: i64,
}

/// xorshift64*: random enough for crash timing, seeded per run (printed, to replay a failure).
struct Rng(u64);
impl Rng {
    fn seeded() -> Rng {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The order rule: `seq` may follow `last` if it is the next one or a redelivery of `last`.
fn judge(key: &str, last: i64, seq: i64) -> Result<(), String> {
    if seq == last + 1 || seq == last {
        Ok(())
    } else {
        Err(format!("key {key}: seq {seq} after {last}"))
    }
}

/// Whether the RabbitMQ at hand has the consistent-hash exchange (the plugin).
async fn has_consistent_hash(bus: &Bus, name: &str) -> bool {
    match bus.declare_partitions(name, 1).await {
        Ok(()) => {
            let _ = bus.transport().delete_queue(&partition_queue(name, 0)).await;
            let _ = bus.transport().delete_queue(&format!("{}.dlq", partition_queue(name, 0))).await;
            let _ = bus.transport().delete_exchange(name).await;
            true
        }
        Err(e) => {
            eprintln!("no x-consistent-hash exchange ({e}): skipped");
            false
        }
    }
}

async fn cleanup(bus: &Bus, name: &str) {
    let t = bus.transport();
    for i in 0..PARTITIONS {
        let q = partition_queue(name, i);
        let _ = t.delete_queue(&q).await;
        let _ = t.delete_queue(&format!("{q}.dlq")).await;
    }
    let _ = t.delete_exchange(name).await;
}

async fn publish_all(bus: Bus, name: String) {
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            let key = format!("key-{k}");
            bus.send_keyed(&name, &key, Step { key: key.clone(), seq }).await.unwrap();
        }
    }
}

/// In-process bookkeeping: per key the last sequence number handled and who is handling it now.
#[derive(Default)]
struct Book {
    keys: HashMap<String, (i64, Option<u64>)>,
    dead: HashSet<u64>,
    violations: Vec<String>,
    handled: u64,
    /// Handlers that started after their incarnation was marked dead (see the handler).
    leftovers: u64,
}

on_all_targets!(in_process_workers_crashing);

async fn in_process_workers_crashing(target: Target) {
    let env = env(target, "ordered").await;
    let name = env.q("orders");
    if target == Target::Rabbit && !has_consistent_hash(&env.bus, &name).await {
        return;
    }
    env.bus.declare_partitions(&name, PARTITIONS).await.unwrap();
    let book: Arc<Mutex<Book>> = Arc::default();
    let mut buses = Vec::new();
    for _ in 0..3 {
        buses.push(env.another_bus().await);
    }
    let start = |bus: &Bus, incarnation: u64| {
        let book = Arc::clone(&book);
        bus.partitioned(&name, PARTITIONS).prefetch(4).handle(move |m: Envelope<Step>, _ctx| {
            let book = Arc::clone(&book);
            async move {
                let Step { key, seq } = m.body;
                {
                    let mut b = book.lock().unwrap();
                    let Book { keys, dead, violations, leftovers, .. } = &mut *b;
                    let (last, active) = keys.entry(key.clone()).or_insert((-1, None));
                    if dead.contains(&incarnation) {
                        // A crashed incarnation's leftover: its handler was in a poll when the abort came
                        // (an abort takes effect at the next yield), and its message may already be with
                        // the worker that took over. Not a worker handling the key: neither judged nor
                        // marked active (whoever took over is); counted, to catch dead workers that go on.
                        *leftovers += 1;
                    } else {
                        if let Some(other) = *active {
                            if !dead.contains(&other) {
                                violations.push(format!("key {key}: seq {seq} while incarnation {other} handles it"));
                            }
                        }
                        if let Err(v) = judge(&key, *last, seq) {
                            violations.push(v);
                        }
                        *active = Some(incarnation);
                    }
                }
                tokio::time::sleep(WORK).await;
                let mut b = book.lock().unwrap();
                let entry = b.keys.get_mut(&key).unwrap();
                entry.0 = entry.0.max(seq);
                // Only its own mark: one a crashed incarnation finishes may belong to the worker that took over.
                if entry.1 == Some(incarnation) {
                    entry.1 = None;
                }
                b.handled += 1;
                Ok(())
            }
        })
    };
    let mut running = Vec::new();
    for (i, bus) in buses.iter().enumerate() {
        running.push(Some((i as u64, start(bus, i as u64).run().await.unwrap())));
    }
    let publisher = tokio::spawn(publish_all(env.bus.clone(), name.clone()));
    let mut rng = Rng::seeded();
    let mut next_incarnation = running.len() as u64;
    let mut crashes = 0;
    let mut mid_run = 0;
    let total = KEYS as u64 * PER_KEY as u64;
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (done, handled) = {
            let b = book.lock().unwrap();
            (b.keys.len() == KEYS && b.keys.values().all(|(last, _)| *last == PER_KEY - 1), b.handled)
        };
        if (done && crashes == CRASHES) || tokio::time::Instant::now() > until {
            break;
        }
        // Crash points spread over the run by progress (not time, which depends on the machine).
        if crashes < CRASHES && handled >= total * (crashes + 1) / (CRASHES + 2) {
            if !done {
                mid_run += 1;
            }
            // Crash one worker (its handlers are dropped mid-way) and start a new one on its connection.
            let slot = rng.below(running.len() as u64) as usize;
            let (incarnation, handle) = running[slot].take().unwrap();
            // Dead first: the abort requeues its messages at once, and another worker may take one
            // before this task runs again (an aborted task at most finishes its current poll, which
            // may even be the start of a handler: see the handler's leftovers). Under the book's lock,
            // so no handler of it sees itself dead before the abort is requested.
            {
                let mut b = book.lock().unwrap();
                b.dead.insert(incarnation);
                handle.abort();
            }
            crashes += 1;
            running[slot] = Some((next_incarnation, start(&buses[slot], next_incarnation).run().await.unwrap()));
            next_incarnation += 1;
        }
        tokio::time::sleep(Duration::from_micros(200 + rng.below(1000))).await;
    }
    publisher.await.unwrap();
    for (_, h) in running.into_iter().flatten() {
        h.stop().await;
    }
    cleanup(&env.bus, &name).await;
    env.cleanup().await;
    let b = book.lock().unwrap();
    assert!(b.violations.is_empty(), "{:#?}", b.violations);
    // A crash leaves per partition worker at most the handler that was running or about to start (one
    // at a time), and one its dispatch loop started in the poll it was in; more would be a crashed
    // worker still taking messages.
    let most = 2 * CRASHES * PARTITIONS as u64;
    assert!(b.leftovers <= most, "{} handlers started in crashed workers (at most {most})", b.leftovers);
    let incomplete: Vec<_> = b.keys.iter().filter(|(_, (last, _))| *last != PER_KEY - 1).collect();
    assert_eq!(b.keys.len(), KEYS);
    assert!(incomplete.is_empty(), "not every message handled: {incomplete:?}");
    assert_eq!(crashes, CRASHES, "the workers crashed {crashes} times");
    assert!(mid_run >= CRASHES / 2, "only {mid_run} crashes before the last message was handled");
    assert!(b.handled >= (KEYS as u64) * PER_KEY as u64);
}

// ---- worker processes ----

/// Files in the shared directory: `<key>.last` (last seq handled), `<key>.active` (pid handling it),
/// `violations` (one line each).
fn child_handle(dir: &Path, step: &Step) {
    let me = std::process::id();
    let active = dir.join(format!("{}.active", step.key));
    let last_file = dir.join(format!("{}.last", step.key));
    let mut violations = Vec::new();
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&active) {
        Ok(mut f) => std::io::Write::write_all(&mut f, me.to_string().as_bytes()).unwrap(),
        Err(_) => {
            let holder: u32 = std::fs::read_to_string(&active).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            // A killed process leaves its marker: stale, take over.
            if holder != 0 && handling(dir, holder) {
                violations
                    .push(format!("key {}: seq {} in pid {me} while pid {holder} handles it", step.key, step.seq));
            }
            std::fs::write(&active, me.to_string()).unwrap();
        }
    }
    let last: i64 = std::fs::read_to_string(&last_file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(-1);
    if let Err(v) = judge(&step.key, last, step.seq) {
        violations.push(v);
    }
    std::thread::sleep(WORK);
    let tmp = dir.join(format!("{}.last.{me}", step.key));
    std::fs::write(&tmp, last.max(step.seq).to_string()).unwrap();
    std::fs::rename(&tmp, &last_file).unwrap();
    std::fs::remove_file(&active).unwrap();
    if !violations.is_empty() {
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(dir.join("violations")).unwrap();
        for v in violations {
            std::io::Write::write_all(&mut f, format!("{v}\n").as_bytes()).unwrap();
        }
    }
}

/// Whether process `pid` may still be handling a message: it was not killed by the test and is neither
/// gone nor a zombie. A SIGKILLed child is dead (its sockets closed, so the broker hands its partition
/// on) before its parent reaps it, and until then `/proc/<pid>` still exists: checking only that
/// reported a dead child's stale marker as concurrent handling (the flake seen in CI on RabbitMQ). So
/// the parent lists a child's pid in `killed` before it kills it, and zombies count as dead too.
fn handling(dir: &Path, pid: u32) -> bool {
    let killed = std::fs::read_to_string(dir.join("killed")).unwrap_or_default();
    if killed.lines().any(|l| l.trim() == pid.to_string()) {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) S ...`: the state follows the last ')' (comm may contain spaces and parentheses).
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X' | 'x') | None)
}

/// The child: a worker process on every partition, recording into the shared directory until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: the child process of worker_processes_sigkilled, started by it"]
async fn child_partition_worker() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        eprintln!("child_partition_worker: not started by worker_processes_sigkilled, nothing to do");
        return;
    };
    let [url, name, dir]: [&str; 3] = spec.split('\t').collect::<Vec<_>>().try_into().unwrap();
    let dir = PathBuf::from(dir);
    let bus = Bus::new(Amqp::connect(AmqpConfig::new(url)).await.unwrap());
    let _workers = bus
        .partitioned(name, PARTITIONS)
        .prefetch(4)
        .handle(move |m: Envelope<Step>, _ctx| {
            let dir = dir.clone();
            async move {
                child_handle(&dir, &m.body);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    println!("READY");
    std::future::pending::<()>().await;
}

async fn spawn_child(spec: &str) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_partition_worker", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, spec)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("READY") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "the child worker started");
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Messages handled so far (the sum of every key's last sequence number + 1).
fn progress(dir: &Path) -> u64 {
    (0..KEYS)
        .map(|k| {
            std::fs::read_to_string(dir.join(format!("key-{k}.last")))
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .map_or(0, |l| (l + 1) as u64)
        })
        .sum()
}

fn all_done(dir: &Path) -> bool {
    (0..KEYS).all(|k| {
        std::fs::read_to_string(dir.join(format!("key-{k}.last"))).ok().and_then(|s| s.trim().parse::<i64>().ok())
            == Some(PER_KEY - 1)
    })
}

async fn worker_processes_sigkilled(target: Target) {
    let env = env(target, "ordered_procs").await;
    let name = env.q("orders");
    if target == Target::Rabbit && !has_consistent_hash(&env.bus, &name).await {
        return;
    }
    env.bus.declare_partitions(&name, PARTITIONS).await.unwrap();
    let dir = std::env::temp_dir().join(format!("mailroom-ordered-{}", name.replace('.', "-")));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = [env.url.clone().unwrap(), name.clone(), dir.display().to_string()].join("\t");
    let mut children = Vec::new();
    for _ in 0..3 {
        children.push(spawn_child(&spec).await);
    }
    let publisher = tokio::spawn(publish_all(env.bus.clone(), name.clone()));
    let mut rng = Rng::seeded();
    let mut kills = 0;
    let total = KEYS as u64 * PER_KEY as u64;
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut mid_run = 0;
    loop {
        let done = all_done(&dir);
        if (done && kills == CRASHES) || tokio::time::Instant::now() > until {
            break;
        }
        if kills < CRASHES && progress(&dir) >= total * (kills + 1) / (CRASHES + 2) {
            if !done {
                mid_run += 1;
            }
            let slot = rng.below(children.len() as u64) as usize;
            // Listed as killed first: its markers are stale from the moment it dies, before it is reaped.
            if let Some(pid) = children[slot].id() {
                let mut f = std::fs::OpenOptions::new().append(true).create(true).open(dir.join("killed")).unwrap();
                std::io::Write::write_all(&mut f, format!("{pid}\n").as_bytes()).unwrap();
            }
            children[slot].kill().await.unwrap(); // SIGKILL, then reaped
            kills += 1;
            children[slot] = spawn_child(&spec).await;
        }
        tokio::time::sleep(Duration::from_millis(1 + rng.below(3))).await;
    }
    publisher.await.unwrap();
    for mut c in children {
        let _ = c.kill().await;
    }
    let violations = std::fs::read_to_string(dir.join("violations")).unwrap_or_default();
    let done = all_done(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    cleanup(&env.bus, &name).await;
    env.cleanup().await;
    assert!(violations.is_empty(), "{violations}");
    assert!(done, "every key's messages were all handled");
    assert_eq!(kills, CRASHES, "{kills} SIGKILLs");
    assert!(mid_run >= CRASHES / 2, "only {mid_run} SIGKILLs before the last message was handled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_processes_sigkilled_server() {
    worker_processes_sigkilled(Target::Server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_processes_sigkilled_rabbit() {
    worker_processes_sigkilled(Target::Rabbit).await
}

/// Delayed retries would let a key's next message overtake the one waiting: refused at run.
#[tokio::test]
async fn delayed_retries_are_refused() {
    let env = env(Target::Embedded, "ordered_delayed").await;
    let name = env.q("orders");
    let r = env
        .bus
        .partitioned(&name, 2)
        .retry(mailroom::RetryPolicy::new().immediate(2).delayed(1))
        .handle(|_m: Envelope<Step>, _ctx| async { Ok(()) })
        .run()
        .await;
    assert!(matches!(r, Err(mailroom::Error::Invalid(ref m)) if m.contains("delayed")), "{r:?}");
    // Immediate retries are fine; an unbound stream is NoRoute, not a silent drop.
    let h = env
        .bus
        .partitioned(&name, 2)
        .retry(mailroom::RetryPolicy::new().immediate(2))
        .handle(|_m: Envelope<Step>, _ctx| async { Ok(()) })
        .run()
        .await
        .unwrap();
    h.stop().await;
    let empty = env.q("empty");
    env.bus
        .declare(mailroom::transport::Declaration::Exchange {
            name: empty.clone(),
            kind: mailroom::transport::ExchangeKind::ConsistentHash,
        })
        .await
        .unwrap();
    let r = env.bus.send_keyed(&empty, "k", Step { key: "k".into(), seq: 0 }).await;
    assert!(matches!(r, Err(mailroom::Error::NoRoute(_))), "{r:?}");
}
