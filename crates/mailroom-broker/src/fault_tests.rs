//! Fault injection through the broker (issue 13, items 2 to 4): EIO, ENOSPC and EMFILE injected into the
//! store's file I/O ([`FaultIo`]) at publish, consume (read-back), expiry with dead-lettering, dead-letter
//! copies, delayed release and redrive. Each test checks that no confirmed message is lost, nothing panics,
//! and the broker serves again, without a restart, once the fault is gone.

use crate::broker::{Broker, BrokerConfig};
use crate::message::Message;
use crate::paging::PagingConfig;
use crate::queue::{ChannelPrefetch, ConsumeOptions, ConsumerEvent};
use crate::store::queue_store::test_dir;
use crate::store::queue_store::tests::{FaultIo, Faults, EIO, EMFILE, ENOSPC, SHORT_READ};
use crate::store::{ack_log, segment};
use crate::vhost::{ExchangeOptions, PublishResult, QueueOptions, RedriveOptions, RedriveTarget, VHost};
use amq_protocol::protocol::BasicProperties;
use amq_protocol_types::{AMQPValue, FieldTable, LongString};
use bytes::Bytes;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ENOMEM: i32 = 12;

fn open(dir: &Path, faults: &Arc<Faults>) -> (Broker, Arc<VHost>) {
    let broker = Broker::open(BrokerConfig {
        data_dir: Some(dir.to_path_buf()),
        store_io: Some(Arc::new(FaultIo(faults.clone()))),
        syncer: crate::store::SyncerConfig { retry_backoff: Duration::from_millis(10), ..Default::default() },
        paging: PagingConfig { queue_memory_bytes: 4096, read_ahead_messages: 8, read_ahead_bytes: 4096, dir: None },
        ..BrokerConfig::default()
    })
    .unwrap();
    let v = broker.vhost("/").unwrap();
    (broker, v)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn durable_queue(v: &VHost, name: &str, arguments: FieldTable) {
    v.declare_queue(name, &QueueOptions { durable: true, arguments, ..Default::default() }, 1).unwrap();
}

fn persistent(routing_key: &str, body: &str) -> Message {
    let props = BasicProperties::default().with_delivery_mode(2);
    Message::new("", routing_key, props, Bytes::from(body.to_owned()))
}

/// Whether the publish was confirmed (acked): taken and every store ticket fsynced.
async fn confirmed(r: PublishResult) -> bool {
    let mut ok = r.routed && !r.rejected;
    for t in r.durable {
        ok &= t.wait().await.is_ok();
    }
    ok
}

/// The directory the next declared durable queue gets: the one entry of `msgs` not in `before`.
fn new_queue_dir(dir: &Path, before: &HashSet<PathBuf>) -> PathBuf {
    let now: HashSet<PathBuf> = std::fs::read_dir(dir.join("msgs")).unwrap().map(|e| e.unwrap().path()).collect();
    let mut added: Vec<_> = now.difference(before).cloned().collect();
    assert_eq!(added.len(), 1, "one new queue directory");
    added.pop().unwrap()
}

fn queue_dirs(dir: &Path) -> HashSet<PathBuf> {
    std::fs::read_dir(dir.join("msgs")).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default()
}

fn only_under(faults: &Faults, dir: &Path) {
    *faults.only_under.lock().unwrap() = Some(dir.to_path_buf());
}

/// Bodies of every ready message, taken with `basic.get` and acked.
fn drain(v: &VHost, queue: &str) -> Vec<String> {
    let q = v.queue(queue, 1).unwrap();
    let mut out = Vec::new();
    while let Some(got) = q.get(false) {
        out.push(String::from_utf8_lossy(&got.message.body).into_owned());
        q.ack(&[got.id]);
    }
    out
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Message ids settled in the ack logs under `dir`.
fn settled_on_disk(dir: &Path) -> HashSet<u64> {
    let mut settled = HashSet::new();
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if f.path().extension().is_some_and(|e| e == segment::ACK_EXT) {
            settled.extend(ack_log::parse(&std::fs::read(f.path()).unwrap()).settled);
        }
    }
    settled
}

/// Item 4, publish step: while the store cannot write or fsync (EIO, ENOSPC, EMFILE), publishes are nacked
/// and the store alarm is raised (`connection.blocked` "store cannot write"); once the fault is gone the
/// alarm clears and publishes are confirmed again, without a restart; every confirmed message is there,
/// before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_nacked_while_the_store_fails_and_confirmed_once_it_recovers() {
    type Slot = fn(&Faults) -> &AtomicI32;
    let steps: [(&str, Slot); 2] = [("fsync", |f| &f.sync_errno), ("write", |f| &f.write_errno)];
    for (step, slot) in steps {
        for errno in [EIO, ENOSPC, EMFILE] {
            let dir = test_dir("fault-publish");
            let faults = Arc::new(Faults::default());
            let mut confirmed_bodies = Vec::new();
            {
                let (broker, v) = open(&dir, &faults);
                durable_queue(&v, "q", FieldTable::default());
                assert!(confirmed(v.publish("", persistent("q", "before")).unwrap()).await);
                confirmed_bodies.push("before".to_owned());
                only_under(&faults, &dir.join("msgs"));
                slot(&faults).store(errno, Ordering::SeqCst);
                assert!(!confirmed(v.publish("", persistent("q", "during")).unwrap()).await, "{step} {errno}");
                let mut alarms = broker.alarms();
                tokio::time::timeout(Duration::from_secs(5), alarms.wait_for(|a| a.store)).await.unwrap().unwrap();
                assert_eq!(broker.alarms().borrow().reason(), "store cannot write");
                assert!(!confirmed(v.publish("", persistent("q", "refused")).unwrap()).await, "{step} {errno}");

                faults.clear();
                tokio::time::timeout(Duration::from_secs(5), alarms.wait_for(|a| !a.store)).await.unwrap().unwrap();
                assert!(confirmed(v.publish("", persistent("q", "after")).unwrap()).await, "{step} {errno}");
                confirmed_bodies.push("after".to_owned());
                broker.flush_stores().await;
            }
            let (_broker, v) = open(&dir, &faults);
            let got = drain(&v, "q");
            for body in &confirmed_bodies {
                assert!(got.contains(body), "{step} {errno}: confirmed {body:?} lost after restart: {got:?}");
            }
        }
    }
}

/// Item 2, consume step: a body that cannot be read back (EIO, ENOMEM, EMFILE, a short read) stays in the
/// queue, counted, and is delivered in order once the reads work again, through basic.get and through a
/// consumer's read-ahead. Before, such a message was logged and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_cannot_be_read_stays_and_is_delivered_later() {
    for errno in [EIO, ENOMEM, EMFILE, SHORT_READ] {
        let dir = test_dir("fault-read");
        let faults = Arc::new(Faults::default());
        {
            let (broker, v) = open(&dir, &faults);
            durable_queue(&v, "q", FieldTable::default());
            for i in 0..20 {
                assert!(confirmed(v.publish("", persistent("q", &format!("m{i}"))).unwrap()).await);
            }
            broker.flush_stores().await;
        }
        // After a restart every body is on disk.
        let (_broker, v) = open(&dir, &faults);
        let q = v.queue("q", 1).unwrap();
        only_under(&faults, &dir.join("msgs"));
        if errno == EMFILE {
            faults.open_errno.store(errno, Ordering::SeqCst);
        }
        faults.read_errno.store(errno, Ordering::SeqCst);
        assert!(q.get(false).is_none(), "errno {errno}: nothing readable now");
        assert_eq!(q.message_count(), 20, "errno {errno}: an unreadable body is not a reason to drop it");
        assert!(q.read_error_count() > 0);
        assert_eq!(q.quarantined_count(), 0, "an I/O error is not corruption");

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let options = ConsumeOptions {
            no_ack: false,
            exclusive: false,
            prefetch: 5,
            channel_prefetch: Arc::new(ChannelPrefetch::default()),
            priority: 0,
            arguments: Default::default(),
        };
        v.consume("q", 1, options, tx).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(rx.try_recv().is_err(), "errno {errno}: nothing delivered while the head cannot be read");
        assert_eq!(q.message_count(), 20);

        faults.clear();
        let mut got = Vec::new();
        while got.len() < 20 {
            let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
            let ConsumerEvent::Deliver(d) = ev else { panic!("cancelled") };
            got.push(String::from_utf8_lossy(&d.message.body).into_owned());
            d.queue.ack(&[d.id]);
        }
        let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        assert_eq!(got, want, "errno {errno}");
    }
}

/// Item 2: a record that fails its checksum is quarantined (copied with queue, place and reason, counted),
/// never silently dropped; the rest of the queue is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_quarantined_and_counted() {
    let dir = test_dir("fault-corrupt");
    let faults = Arc::new(Faults::default());
    let qdir;
    {
        let (broker, v) = open(&dir, &faults);
        let before = queue_dirs(&dir);
        durable_queue(&v, "q", FieldTable::default());
        qdir = new_queue_dir(&dir, &before);
        for i in 0..5 {
            assert!(confirmed(v.publish("", persistent("q", &format!("body-{i}"))).unwrap()).await);
        }
        broker.flush_stores().await;
    }
    let (_broker, v) = open(&dir, &faults);
    let q = v.queue("q", 1).unwrap();
    // Damage the body of "body-2" on disk now that the index is loaded and every body is on disk.
    let seg = std::fs::read_dir(&qdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == segment::SEGMENT_EXT))
        .find(|p| std::fs::read(p).unwrap().windows(6).any(|w| w == b"body-2"))
        .expect("segment holding body-2");
    let mut data = std::fs::read(&seg).unwrap();
    let at = data.windows(6).position(|w| w == b"body-2").unwrap();
    data[at + 5] = b'X';
    std::fs::write(&seg, &data).unwrap();
    let total_before = crate::store::quarantined_records_total();

    let got = drain(&v, "q");
    assert_eq!(got, vec!["body-0", "body-1", "body-3", "body-4"]);
    assert_eq!(q.quarantined_count(), 1);
    assert!(crate::store::quarantined_records_total() > total_before);
    let copy = std::fs::read(qdir.join(crate::store::queue_store::QUARANTINE_FILE)).unwrap();
    assert!(copy.starts_with(b"queue=\"q\" segment="), "{}", String::from_utf8_lossy(&copy));
    assert!(copy.windows(6).any(|w| w == b"body-X"), "the damaged record's bytes are kept");
}

/// Item 2, expiry step: a paged-out message that expires while its body cannot be read is not dropped: it
/// stays, and is dead-lettered (with its body) once the reads work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_message_whose_body_cannot_be_read_is_dead_lettered_later() {
    for errno in [EIO, EMFILE] {
        let dir = test_dir("fault-expire");
        let faults = Arc::new(Faults::default());
        let args = table(&[
            ("x-message-ttl", AMQPValue::LongUInt(400)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dlq")),
        ]);
        let (_broker, v) = open(&dir, &faults);
        durable_queue(&v, "dlq", FieldTable::default());
        durable_queue(&v, "ttl", args.clone());
        let ttl = v.queue("ttl", 1).unwrap();
        let dlq = v.queue("dlq", 1).unwrap();
        let body = "x".repeat(300);
        for i in 0..40 {
            assert!(confirmed(v.publish("", persistent("ttl", &format!("t{i:02}{body}"))).unwrap()).await);
        }
        let paged = ttl.paged_count();
        assert!(paged > 20, "most bodies are on disk only ({paged})");
        only_under(&faults, &dir.join("msgs"));
        faults.read_errno.store(errno, Ordering::SeqCst);
        faults.open_errno.store(errno, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(ttl.message_count(), paged, "errno {errno}: expired but unreadable messages must stay");
        faults.clear();
        eventually("the kept messages dead-lettered", || dlq.message_count() == 40).await;
        let mut got: Vec<String> = drain(&v, "dlq").into_iter().map(|b| b[..3].to_owned()).collect();
        got.sort();
        let want: Vec<String> = (0..40).map(|i| format!("t{i:02}")).collect();
        assert_eq!(got, want, "errno {errno}");
    }
}

/// Makes the store of queue `name` (directory `qdir`) fail: a publish whose write fails marks it failing,
/// so later appends are refused.
async fn make_failing(v: &VHost, faults: &Faults, qdir: &Path, name: &str) {
    only_under(faults, qdir);
    faults.write_errno.store(EIO, Ordering::SeqCst);
    assert!(!confirmed(v.publish("", persistent(name, "poison")).unwrap()).await);
    assert!(v.publish("", persistent(name, "probe")).unwrap().rejected, "the store refuses appends now");
}

/// Item 3, dead-letter step: a dead-lettered copy the target's store refuses does not settle the source:
/// the source record stays on disk and the copy is pushed again until the target takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_the_target_refuses_is_retried_and_the_source_kept() {
    let dir = test_dir("fault-dlx");
    let faults = Arc::new(Faults::default());
    let (_broker, v) = open(&dir, &faults);
    let before = queue_dirs(&dir);
    durable_queue(&v, "dlq", FieldTable::default());
    let dlq_dir = new_queue_dir(&dir, &before);
    let before = queue_dirs(&dir);
    let args = table(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq"))]);
    durable_queue(&v, "work", args);
    let work_dir = new_queue_dir(&dir, &before);
    assert!(confirmed(v.publish("", persistent("work", "keep me")).unwrap()).await);
    let work = v.queue("work", 1).unwrap();
    let got = work.get(false).unwrap();

    make_failing(&v, &faults, &dlq_dir, "dlq").await;
    work.reject(&[got.id], false);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!settled_on_disk(&work_dir).contains(&got.id), "source settled although its copy was refused");
    let dlq = v.queue("dlq", 1).unwrap();
    assert!(dlq.peek(0, 100).iter().all(|p| &p.message.body[..] != b"keep me"), "refused, so not in the DLQ yet");

    faults.clear();
    eventually("the copy in the DLQ", || dlq.peek(0, 100).iter().any(|p| &p.message.body[..] == b"keep me")).await;
    eventually("the source settled once the copy is durable", || settled_on_disk(&work_dir).contains(&got.id)).await;
}

/// Item 3, delayed release step: a released delayed message that its target queue's store refuses is held
/// again (its record kept) and released once the store takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_release_the_target_refuses_is_retried() {
    let dir = test_dir("fault-delayed");
    let faults = Arc::new(Faults::default());
    let (_broker, v) = open(&dir, &faults);
    let options = ExchangeOptions {
        durable: true,
        arguments: table(&[("x-delayed-type", text("direct"))]),
        ..Default::default()
    };
    v.declare_exchange("dx", "x-delayed-message", &options).unwrap();
    let before = queue_dirs(&dir);
    durable_queue(&v, "q", FieldTable::default());
    let q_dir = new_queue_dir(&dir, &before);
    v.bind_queue("q", "dx", "q", &FieldTable::default(), 1).unwrap();
    make_failing(&v, &faults, &q_dir, "q").await;

    let props =
        BasicProperties::default().with_delivery_mode(2).with_headers(table(&[("x-delay", AMQPValue::LongInt(100))]));
    let delayed = Message::new("dx", "q", props, Bytes::from_static(b"later"));
    assert!(confirmed(v.publish("dx", delayed).unwrap()).await, "held in the delayed store, which works");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let q = v.queue("q", 1).unwrap();
    assert!(q.peek(0, 100).iter().all(|p| &p.message.body[..] != b"later"), "refused at release");
    assert!(!v.exchange("dx").unwrap().flavor().delayed().unwrap().is_empty(), "held again, not lost");

    faults.clear();
    eventually("released into q", || q.peek(0, 100).iter().any(|p| &p.message.body[..] == b"later")).await;
}

/// Item 3, redrive step: a redrive whose target store fails (here after an fsync error, which used to poison
/// the store for good) leaves the messages in the DLQ; a redrive after the fault is gone moves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_the_target_refuses_leaves_the_dead_letters_and_works_later() {
    let dir = test_dir("fault-redrive");
    let faults = Arc::new(Faults::default());
    let (_broker, v) = open(&dir, &faults);
    durable_queue(&v, "dlq", FieldTable::default());
    let before = queue_dirs(&dir);
    let args = table(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq"))]);
    durable_queue(&v, "work", args);
    let work_dir = new_queue_dir(&dir, &before);
    assert!(confirmed(v.publish("", persistent("work", "redrive me")).unwrap()).await);
    let work = v.queue("work", 1).unwrap();
    let got = work.get(false).unwrap();
    work.reject(&[got.id], false);
    let dlq = v.queue("dlq", 1).unwrap();
    eventually("dead-lettered", || dlq.message_count() == 1).await;

    only_under(&faults, &work_dir);
    faults.sync_errno.store(EIO, Ordering::SeqCst);
    let options =
        RedriveOptions { count: None, header_filter: None, target: Some(RedriveTarget::Queue("work".into())) };
    let outcome = v.redrive("dlq", &options).await.unwrap();
    assert_eq!((outcome.moved, outcome.skipped), (0, 1));
    assert_eq!(dlq.message_count(), 1, "the source stays while its copy is not durable");

    faults.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outcome = v.redrive("dlq", &options).await.unwrap();
        if outcome.moved == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "redrive never worked again: the target store stayed broken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dlq.message_count(), 0);
    assert!(drain(&v, "work").contains(&"redrive me".to_owned()));
}

/// Item 2 with the paging store: transient messages paged out of a transient queue whose bodies cannot be
/// read back (EIO, EMFILE) stay and are delivered in order once the reads work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_transient_bodies_that_cannot_be_read_stay_and_are_delivered_later() {
    for errno in [EIO, EMFILE, SHORT_READ] {
        let dir = test_dir("fault-paging");
        let faults = Arc::new(Faults::default());
        let (_broker, v) = open(&dir, &faults);
        v.declare_queue("tq", &QueueOptions::default(), 1).unwrap();
        let q = v.queue("tq", 1).unwrap();
        let pad = "p".repeat(300);
        for i in 0..40 {
            let m = Message::new("", "tq", BasicProperties::default(), Bytes::from(format!("{i:02}{pad}")));
            assert!(confirmed(v.publish("", m).unwrap()).await);
        }
        assert!(q.paged_count() > 20, "bodies went to the paging store");
        // Let the paging store's writer put them on file (until then they are read from its buffer).
        tokio::time::sleep(Duration::from_millis(200)).await;
        only_under(&faults, &dir.join("paging"));
        faults.read_errno.store(errno, Ordering::SeqCst);
        faults.open_errno.store(errno, Ordering::SeqCst);
        let mut got = Vec::new();
        while let Some(m) = q.get(true) {
            got.push(m.message.body[..2].to_vec());
        }
        assert!(got.len() < 40, "errno {errno}: paged bodies cannot be read now");
        assert_eq!(q.message_count() as usize, 40 - got.len(), "errno {errno}: none dropped");
        assert!(q.read_error_count() > 0 && q.quarantined_count() == 0);
        faults.clear();
        while let Some(m) = q.get(true) {
            got.push(m.message.body[..2].to_vec());
        }
        let want: Vec<Vec<u8>> = (0..40).map(|i| format!("{i:02}").into_bytes()).collect();
        assert_eq!(got, want, "errno {errno}: every message, in order");
    }
}

/// Dedup store step: while the deduplication cache's store fails (EIO, ENOSPC, EMFILE on fsync), publishes
/// through the exchange are nacked; once the fault is gone they are confirmed again, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dedup_store_nacks_and_recovers() {
    for errno in [EIO, ENOSPC, EMFILE] {
        let dir = test_dir("fault-dedup");
        let faults = Arc::new(Faults::default());
        let (_broker, v) = open(&dir, &faults);
        let arguments = table(&[("x-cache-size", AMQPValue::LongInt(100)), ("x-cache-persistence", text("disk"))]);
        let options = ExchangeOptions { durable: true, arguments, ..Default::default() };
        v.declare_exchange("dd", "x-message-deduplication", &options).unwrap();
        durable_queue(&v, "dq", FieldTable::default());
        v.bind_queue("dq", "dd", "", &FieldTable::default(), 1).unwrap();
        let msg = |id: &str| {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(table(&[("x-deduplication-header", text(id))]));
            Message::new("dd", "", props, Bytes::from(id.to_owned()))
        };
        assert!(confirmed(v.publish("dd", msg("a")).unwrap()).await);
        only_under(&faults, &dir.join("dedup"));
        faults.sync_errno.store(errno, Ordering::SeqCst);
        assert!(!confirmed(v.publish("dd", msg("b")).unwrap()).await, "errno {errno}");
        faults.clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !confirmed(v.publish("dd", msg("c")).unwrap()).await {
            assert!(Instant::now() < deadline, "errno {errno}: the dedup store never recovered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = drain(&v, "dq");
        assert!(got.contains(&"a".to_owned()) && got.contains(&"c".to_owned()), "{got:?}");
    }
}

/// Ack step: acks whose ack-log write or open fails (EIO, ENOSPC, EMFILE) do not panic or lose anything;
/// an ack that did not reach the log may bring its message back after a restart (a duplicate), and every
/// unacked confirmed message is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_under_store_faults_lose_nothing() {
    for errno in [EIO, ENOSPC, EMFILE] {
        let dir = test_dir("fault-ack");
        let faults = Arc::new(Faults::default());
        {
            let (broker, v) = open(&dir, &faults);
            durable_queue(&v, "aq", FieldTable::default());
            for i in 0..6 {
                assert!(confirmed(v.publish("", persistent("aq", &format!("a{i}"))).unwrap()).await);
            }
            let q = v.queue("aq", 1).unwrap();
            only_under(&faults, &dir.join("msgs"));
            faults.write_errno.store(errno, Ordering::SeqCst);
            faults.open_errno.store(errno, Ordering::SeqCst);
            for _ in 0..3 {
                let got = q.get(false).unwrap();
                q.ack(&[got.id]);
            }
            faults.clear();
            broker.flush_stores().await;
        }
        let (_broker, v) = open(&dir, &faults);
        let got = drain(&v, "aq");
        for i in 3..6 {
            assert!(got.contains(&format!("a{i}")), "errno {errno}: unacked a{i} lost: {got:?}");
        }
    }
}

/// Item 3, dead-letter step with a failed fsync: the copy was taken but its fsync failed (ticket nacked).
/// The source stays unsettled while the target's store fails, and is settled, without a restart, once a
/// later fsync of that store covers the (rewritten) copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_whose_fsync_failed_settles_the_source_once_durable() {
    for errno in [EIO, ENOSPC, EMFILE] {
        let dir = test_dir("fault-dlx-fsync");
        let faults = Arc::new(Faults::default());
        let (_broker, v) = open(&dir, &faults);
        let before = queue_dirs(&dir);
        durable_queue(&v, "dlq", FieldTable::default());
        let dlq_dir = new_queue_dir(&dir, &before);
        let before = queue_dirs(&dir);
        let args = table(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq"))]);
        durable_queue(&v, "work", args);
        let work_dir = new_queue_dir(&dir, &before);
        assert!(confirmed(v.publish("", persistent("work", "keep me")).unwrap()).await);
        let work = v.queue("work", 1).unwrap();
        let got = work.get(false).unwrap();

        only_under(&faults, &dlq_dir);
        faults.sync_errno.store(errno, Ordering::SeqCst);
        work.reject(&[got.id], false);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!settled_on_disk(&work_dir).contains(&got.id), "errno {errno}: settled before the copy was durable");

        faults.clear();
        eventually("the source settled without a restart", || settled_on_disk(&work_dir).contains(&got.id)).await;
        let dlq = v.queue("dlq", 1).unwrap();
        assert!(dlq.peek(0, 10).iter().any(|p| &p.message.body[..] == b"keep me"));
    }
}

/// Item 3, delayed release with a failed fsync at the target: the released message's record stays in the
/// delayed store while the copy is not durable, and is settled, without a restart, once the target's store
/// has fsynced the (rewritten) copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_release_whose_copy_fsync_failed_settles_once_durable() {
    let dir = test_dir("fault-delayed-fsync");
    let faults = Arc::new(Faults::default());
    let (_broker, v) = open(&dir, &faults);
    let options = ExchangeOptions {
        durable: true,
        arguments: table(&[("x-delayed-type", text("direct"))]),
        ..Default::default()
    };
    v.declare_exchange("dx", "x-delayed-message", &options).unwrap();
    let before = queue_dirs(&dir);
    durable_queue(&v, "q", FieldTable::default());
    let q_dir = new_queue_dir(&dir, &before);
    v.bind_queue("q", "dx", "q", &FieldTable::default(), 1).unwrap();
    let delayed_dir = std::fs::read_dir(dir.join("delayed")).unwrap().next().unwrap().unwrap().path();

    let props =
        BasicProperties::default().with_delivery_mode(2).with_headers(table(&[("x-delay", AMQPValue::LongInt(100))]));
    assert!(confirmed(v.publish("dx", Message::new("dx", "q", props, Bytes::from_static(b"later"))).unwrap()).await);
    only_under(&faults, &q_dir);
    faults.sync_errno.store(EIO, Ordering::SeqCst);
    let q = v.queue("q", 1).unwrap();
    eventually("released into q", || q.message_count() == 1).await;
    // Settles are buffered for up to a second: wait past that with the copy still not durable.
    tokio::time::sleep(crate::exchange::flavor::delayed::SETTLE_FLUSH + Duration::from_millis(300)).await;
    assert!(settled_on_disk(&delayed_dir).is_empty(), "record settled although its copy was not durable");

    faults.clear();
    eventually("the record settled without a restart", || !settled_on_disk(&delayed_dir).is_empty()).await;
}

/// Paging store writes failing (EIO, ENOSPC, EMFILE): bodies that cannot be paged out stay in RAM; nothing
/// is lost, and paging works again once the fault is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_store_write_faults_lose_nothing() {
    for errno in [EIO, ENOSPC, EMFILE] {
        let dir = test_dir("fault-paging-write");
        let faults = Arc::new(Faults::default());
        let (_broker, v) = open(&dir, &faults);
        v.declare_queue("pq", &QueueOptions::default(), 1).unwrap();
        let q = v.queue("pq", 1).unwrap();
        only_under(&faults, &dir.join("paging"));
        faults.write_errno.store(errno, Ordering::SeqCst);
        faults.open_errno.store(errno, Ordering::SeqCst);
        let pad = "w".repeat(300);
        for i in 0..30 {
            let m = Message::new("", "pq", BasicProperties::default(), Bytes::from(format!("{i:02}{pad}")));
            assert!(confirmed(v.publish("", m).unwrap()).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        faults.clear();
        for i in 30..60 {
            let m = Message::new("", "pq", BasicProperties::default(), Bytes::from(format!("{i:02}{pad}")));
            assert!(confirmed(v.publish("", m).unwrap()).await);
        }
        let mut got = Vec::new();
        while let Some(m) = q.get(true) {
            got.push(String::from_utf8_lossy(&m.message.body[..2]).into_owned());
        }
        let want: Vec<String> = (0..60).map(|i| format!("{i:02}")).collect();
        assert_eq!(got, want, "errno {errno}");
    }
}

/// Delayed store faults at hold time (fsync EIO, ENOSPC, EMFILE): the publish is nacked; the store recovers
/// without a restart and later delayed publishes are confirmed and released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_store_faults_nack_the_publish_and_recover() {
    for errno in [EIO, ENOSPC, EMFILE] {
        let dir = test_dir("fault-delayed-hold");
        let faults = Arc::new(Faults::default());
        let (_broker, v) = open(&dir, &faults);
        let options = ExchangeOptions {
            durable: true,
            arguments: table(&[("x-delayed-type", text("direct"))]),
            ..Default::default()
        };
        v.declare_exchange("dx", "x-delayed-message", &options).unwrap();
        durable_queue(&v, "q", FieldTable::default());
        v.bind_queue("q", "dx", "q", &FieldTable::default(), 1).unwrap();
        let delayed = |body: &'static str| {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(table(&[("x-delay", AMQPValue::LongInt(50))]));
            Message::new("dx", "q", props, Bytes::from_static(body.as_bytes()))
        };
        only_under(&faults, &dir.join("delayed"));
        faults.sync_errno.store(errno, Ordering::SeqCst);
        assert!(!confirmed(v.publish("dx", delayed("nacked")).unwrap()).await, "errno {errno}");
        faults.clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !confirmed(v.publish("dx", delayed("confirmed")).unwrap()).await {
            assert!(Instant::now() < deadline, "errno {errno}: the delayed store never recovered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let q = v.queue("q", 1).unwrap();
        eventually("released", || q.peek(0, 10).iter().any(|p| &p.message.body[..] == b"confirmed")).await;
    }
}

/// Open step at startup (EMFILE while recovering): the queue must come back once the fault is gone, with its
/// confirmed message. (It did not when `Broker::open` rewrote the definitions from what it had recovered; the
/// definitions log keeps the queue's record until the queue is deleted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_open_error_at_startup_loses_no_queue() {
    let dir = test_dir("fault-startup-open");
    let faults = Arc::new(Faults::default());
    {
        let (broker, v) = open(&dir, &faults);
        durable_queue(&v, "q", FieldTable::default());
        assert!(confirmed(v.publish("", persistent("q", "precious")).unwrap()).await);
        broker.flush_stores().await;
    }
    only_under(&faults, &dir.join("msgs"));
    faults.open_errno.store(EMFILE, Ordering::SeqCst);
    drop(open(&dir, &faults));
    faults.clear();
    let (_broker, v) = open(&dir, &faults);
    assert!(v.queue("q", 1).is_ok(), "the queue was dropped from the definitions by a transient EMFILE");
    assert_eq!(drain(&v, "q"), vec!["precious"]);
}
