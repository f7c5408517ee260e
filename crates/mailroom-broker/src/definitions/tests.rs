//! Definitions durability through the broker API: saves that fail, and delete/re-declare races.

use crate::broker::{Broker, BrokerConfig};
use crate::error::ErrorKind;
use crate::message::Message;
use crate::store::definitions_log::tests::{DefsFaultIo, DefsFaults};
use crate::store::queue_store::test_dir;
use crate::vhost::{ExchangeOptions, QueueOptions};
use amq_protocol::protocol::BasicProperties;
use amq_protocol_types::FieldTable;
use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn open(dir: &Path, faults: &Arc<DefsFaultIo>) -> Broker {
    Broker::open(BrokerConfig {
        data_dir: Some(dir.to_path_buf()),
        store_io: Some(Arc::new(DefsFaults(Arc::clone(faults)))),
        ..BrokerConfig::default()
    })
    .unwrap()
}

fn durable() -> QueueOptions {
    QueueOptions { durable: true, ..Default::default() }
}

async fn publish(broker: &Broker, queue: &str, body: &str) {
    let props = BasicProperties::default().with_delivery_mode(2);
    let v = broker.vhost("/").unwrap();
    let published = v.publish("", Message::new("", queue, props, Bytes::from(body.to_owned()))).unwrap();
    assert_eq!(published.durable.len(), 1, "{queue} stored {body}");
    for t in published.durable {
        t.wait().await.unwrap();
    }
}

/// A definitions save that fails (ENOSPC on the write, EIO on the fsync) fails the declare, bind and delete
/// with an internal error (541 on the wire) and raises the disk alarm; once the disk is back, the next save
/// writes everything memory holds, and nothing is lost across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_definitions_save_fails_the_declare_and_raises_the_disk_alarm() {
    let dir = test_dir("defs-save-fails");
    let faults = Arc::new(DefsFaultIo::default());
    let broker = open(&dir, &faults);
    let v = broker.vhost("/").unwrap();
    let alarms = broker.alarms();
    v.declare_queue("kept", &durable(), 1).unwrap();
    publish(&broker, "kept", "k1").await;

    faults.fail_writes.store(true, Ordering::SeqCst);
    let err = v.declare_queue("q", &durable(), 1).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InternalError);
    assert!(err.message.contains("definitions.log"), "{}", err.message);
    assert!(alarms.borrow().disk, "disk alarm raised");
    faults.fail_writes.store(false, Ordering::SeqCst);
    faults.fail_sync.store(true, Ordering::SeqCst);
    let ex = ExchangeOptions { durable: true, ..Default::default() };
    assert_eq!(v.declare_exchange("ev", "direct", &ex).unwrap_err().kind, ErrorKind::InternalError);
    assert_eq!(
        v.bind_queue("kept", "amq.direct", "k", &FieldTable::default(), 1).unwrap_err().kind,
        ErrorKind::InternalError
    );
    assert_eq!(v.delete_queue("q", false, false, 1).unwrap_err().kind, ErrorKind::InternalError);
    faults.fail_sync.store(false, Ordering::SeqCst);

    // The client retries once the disk is back: the declare succeeds and is on disk.
    v.declare_queue("q", &durable(), 1).unwrap();
    assert!(!alarms.borrow().disk, "disk alarm cleared");
    publish(&broker, "q", "q1").await;
    drop(v);
    drop(broker);

    let broker = open(&dir, &faults);
    let v = broker.vhost("/").unwrap();
    assert_eq!(v.queue("kept", 1).unwrap().message_count(), 1);
    assert_eq!(v.queue("q", 1).unwrap().message_count(), 1);
    assert!(v.exchange("ev").is_ok(), "the exchange declared while saving failed was saved later");
    let bound = v.exchange("amq.direct").unwrap().bindings();
    assert!(bound.iter().any(|b| b.routing_key == "k"));
}

/// A durable queue deleted and re-declared under the same name, concurrently and in quick succession:
/// the deletion never removes the new queue's files, so what was confirmed to the new queue survives a
/// restart (the files of both used to live in one directory named after the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_redeclare_never_loses_the_new_queues_messages() {
    let dir = test_dir("defs-redeclare");
    let faults = Arc::new(DefsFaultIo::default());
    let broker = open(&dir, &faults);
    let v = broker.vhost("/").unwrap();
    for round in 0..30 {
        v.declare_queue("q", &durable(), 1).unwrap();
        publish(&broker, "q", &format!("old {round}")).await;
        // Delete and re-declare at the same time, from two threads.
        let (va, vb) = (Arc::clone(&v), Arc::clone(&v));
        let deleting = tokio::task::spawn_blocking(move || va.delete_queue("q", false, false, 1).unwrap());
        let declaring = tokio::task::spawn_blocking(move || vb.declare_queue("q", &durable(), 2).map(|_| ()));
        deleting.await.unwrap();
        declaring.await.unwrap().unwrap();
        // Whichever order they ran in, a declare now gives the queue that survives.
        v.declare_queue("q", &durable(), 1).unwrap();
        v.purge_queue("q", 1).unwrap();
        publish(&broker, "q", &format!("new {round}")).await;
        assert_eq!(v.queue("q", 1).unwrap().message_count(), 1);
    }
    // Quick succession on one thread as well.
    v.delete_queue("q", false, false, 1).unwrap();
    v.declare_queue("q", &durable(), 1).unwrap();
    publish(&broker, "q", "last").await;
    drop(v);
    drop(broker);

    let broker = open(&dir, &faults);
    let q = broker.vhost("/").unwrap().queue("q", 1).unwrap();
    assert_eq!(q.message_count(), 1, "the re-declared queue's message survived the restart");
    let got = q.get(true).unwrap();
    assert_eq!(&got.message.body[..], b"last");
    // One directory per live queue: deleted generations left nothing behind.
    let dirs = std::fs::read_dir(dir.join("msgs")).unwrap().count();
    assert_eq!(dirs, 1);
}

/// Declares 10,000 durable queues with one binding each through the broker API and prints the total time
/// and the time of the first and last 1,000 (flat when a declare's cost does not grow with the count).
/// `MAILROOM_BENCH_WORKERS` declarers run at once (default 1: one client waiting for each declare-ok).
/// `cargo test --release -p mailroom-broker --lib bench_declare_10k -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_declare_10k_durable_queues_with_a_binding() {
    const QUEUES: usize = 10_000;
    let workers: usize = std::env::var("MAILROOM_BENCH_WORKERS").ok().and_then(|w| w.parse().ok()).unwrap_or(1);
    let dir = test_dir("defs-bench");
    let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
    let v = broker.vhost("/").unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done_at = Arc::new(std::sync::Mutex::new(vec![std::time::Duration::ZERO; QUEUES]));
    let start = std::time::Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (v, next, done_at) = (Arc::clone(&v), Arc::clone(&next), Arc::clone(&done_at));
            tokio::task::spawn_blocking(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= QUEUES {
                    return;
                }
                let name = format!("bench-{i:05}");
                v.declare_queue(&name, &durable(), 1).unwrap();
                v.bind_queue(&name, "amq.direct", &name, &FieldTable::default(), 1).unwrap();
                done_at.lock().unwrap()[i] = start.elapsed();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let total = start.elapsed();
    let mut at = done_at.lock().unwrap().clone();
    at.sort();
    let first = at[999];
    let last = at[QUEUES - 1] - at[QUEUES - 1001];
    println!(
        "{QUEUES} durable queues + bindings, {workers} declarer(s): total {:.2} s, first 1000 {:.2} s, last 1000 {:.2} s",
        total.as_secs_f64(),
        first.as_secs_f64(),
        last.as_secs_f64()
    );
    drop(v);
    drop(broker);
    let reopen = std::time::Instant::now();
    let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
    assert_eq!(broker.vhost("/").unwrap().queues().len(), QUEUES);
    println!("reopen with {QUEUES} queues: {:.2} s", reopen.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A data directory written by the previous version (definitions snapshot `definitions.bin`, queue
/// segments in a directory named by the hash alone) opens with its queues, bindings and messages, and is
/// upgraded to the log: later changes and restarts keep them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_the_previous_version_is_upgraded() {
    use crate::store::{BindingDef, Definitions, DestinationKind, QueueDef, VhostDef};
    let dir = test_dir("defs-upgrade");
    let faults = Arc::new(DefsFaultIo::default());
    // Messages written by this version, then moved where the previous one kept them.
    let broker = open(&dir, &faults);
    broker.vhost("/").unwrap().declare_queue("old", &durable(), 1).unwrap();
    publish(&broker, "old", "m1").await;
    publish(&broker, "old", "m2").await;
    drop(broker);
    let msgs = dir.join("msgs");
    let current = std::fs::read_dir(&msgs).unwrap().next().unwrap().unwrap().path();
    let name = current.file_name().unwrap().to_str().unwrap().to_owned();
    let legacy_name = name.split('-').next().unwrap();
    std::fs::rename(&current, msgs.join(legacy_name)).unwrap();
    std::fs::remove_file(dir.join(crate::store::definitions_log::LOG_NAME)).unwrap();
    Definitions {
        vhosts: vec![VhostDef { name: "/".into() }],
        queues: vec![QueueDef { vhost: "/".into(), name: "old".into(), generation: 0, ..Default::default() }],
        bindings: vec![BindingDef {
            vhost: "/".into(),
            source: "amq.direct".into(),
            destination: "old".into(),
            destination_kind: DestinationKind::Queue,
            routing_key: "k".into(),
            arguments: FieldTable::default(),
        }],
        ..Default::default()
    }
    .save(&dir)
    .unwrap();

    for _ in 0..2 {
        let broker = open(&dir, &faults);
        let v = broker.vhost("/").unwrap();
        assert_eq!(v.queue("old", 1).unwrap().message_count(), 2);
        assert!(v.exchange("amq.direct").unwrap().bindings().iter().any(|b| b.routing_key == "k"));
        assert!(!Definitions::path(&dir).exists(), "upgraded to the log");
        v.declare_queue("new", &durable(), 1).unwrap();
    }
}

/// A message published to a new durable queue whose definition is still being saved is confirmed only
/// once the definition is on disk too (else a crash right after the confirm would lose the queue and the
/// message); if the save fails, the publish fails instead of being confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_confirm_before_the_queue_definition_is_on_disk() {
    let dir = test_dir("defs-confirm-waits");
    let faults = Arc::new(DefsFaultIo::default());
    let broker = open(&dir, &faults);
    let v = broker.vhost("/").unwrap();
    for fail in [false, true] {
        let name = format!("q-{fail}");
        faults.hold(true);
        let (vd, n) = (Arc::clone(&v), name.clone());
        let declaring = tokio::task::spawn_blocking(move || vd.declare_queue(&n, &durable(), 1).map(|_| ()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while v.queue(&name, 1).is_err() {
            assert!(std::time::Instant::now() < deadline, "the declare runs");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let props = BasicProperties::default().with_delivery_mode(2);
        let published = v.publish("", Message::new("", &name, props, Bytes::from_static(b"m"))).unwrap();
        let confirm = async {
            for t in published.durable {
                t.wait().await?;
            }
            Ok::<(), crate::store::StoreError>(())
        };
        tokio::pin!(confirm);
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut confirm).await;
        assert!(early.is_err(), "confirmed before the queue's definition was on disk");
        faults.fail_sync.store(fail, Ordering::SeqCst);
        faults.hold(false);
        let declared = declaring.await.unwrap();
        let confirmed = confirm.await;
        assert_eq!(declared.is_err(), fail);
        assert_eq!(confirmed.is_err(), fail, "{confirmed:?}");
        faults.fail_sync.store(false, Ordering::SeqCst);
    }
}
