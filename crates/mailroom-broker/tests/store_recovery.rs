//! Recovery, group-commit and crash tests of the durable store, through its public API only.
//!
//! Benchmarks are `#[ignore]`d: `cargo test --release -p mailroom-broker --test store_recovery -- --ignored --nocapture bench`

use bytes::Bytes;
use mailroom_broker::store::{
    MsgRef, QueueStore, Recovered, RecoveryReport, SegmentPos, StoreConfig, StoredMessage, Syncer, SyncerConfig,
};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join("mailroom-store-it").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn msg(id: u64, size: usize) -> StoredMessage {
    StoredMessage {
        id,
        exchange: "amq.direct".into(),
        routing_key: format!("key.{id}"),
        properties: Bytes::from_static(b"\x90\x00\x10application/json\x02"),
        body: Bytes::from((0..size).map(|i| (i as u64 ^ id) as u8).collect::<Vec<u8>>()),
        expires_at_ms: id.is_multiple_of(3).then_some(1_800_000_000_000 + id),
        delivery_count: (id % 5) as u32,
    }
}

fn cfg(segment_size: u64) -> StoreConfig {
    StoreConfig { segment_size, ..Default::default() }
}

fn recover(dir: &Path, seg: u64, syncer: &Syncer) -> (QueueStore, Vec<Recovered>, RecoveryReport) {
    QueueStore::recover(dir, cfg(seg), syncer).unwrap()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Appends `sizes.len()` messages with ids 0.., waits for all tickets, returns their positions.
async fn fill(store: &QueueStore, sizes: &[usize]) -> Vec<SegmentPos> {
    let mut tickets = Vec::new();
    let mut pos = Vec::new();
    for (id, &size) in sizes.iter().enumerate() {
        let (p, t) = store.append(&msg(id as u64, size)).unwrap();
        pos.push(p);
        tickets.push(t);
    }
    for t in tickets {
        t.wait().await.unwrap();
    }
    pos
}

#[tokio::test]
async fn round_trip_across_rolls_with_settles_and_deliveries() {
    let dir = test_dir("roundtrip");
    let syncer = Syncer::start(SyncerConfig::default());
    let seg = 64 * 1024;
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut sizes: Vec<usize> = (0..1500).map(|_| rng.below(3000) as usize).collect();
    sizes[700] = 200 * 1024; // larger than a segment: gets one of its own
    let (store, rec, _) = recover(&dir, seg, &syncer);
    assert!(rec.is_empty());
    let pos = fill(&store, &sizes).await;
    assert!(pos.last().unwrap().segment >= 20, "several rolls");
    let big = pos[700];
    assert_eq!(big.offset, 0);
    assert_ne!(pos[701].segment, big.segment);

    let mut settled = HashSet::new();
    let mut delivered = HashSet::new();
    let refs: Vec<MsgRef> = pos.iter().enumerate().map(|(i, p)| MsgRef { id: i as u64, pos: *p }).collect();
    for chunk in refs.chunks(37) {
        let d: Vec<MsgRef> = chunk.iter().copied().filter(|_| rng.below(3) == 0).collect();
        store.mark_delivered(&d).unwrap();
        delivered.extend(d.iter().map(|r| r.id));
        let s: Vec<MsgRef> = chunk.iter().copied().filter(|_| rng.below(5) < 2).collect();
        store.settle(&s).unwrap();
        settled.extend(s.iter().map(|r| r.id));
    }
    // Settle whole segments too, so some get deleted.
    let whole: Vec<MsgRef> = refs.iter().copied().filter(|r| r.pos.segment <= 3 && !settled.contains(&r.id)).collect();
    store.settle(&whole).unwrap();
    settled.extend(whole.iter().map(|r| r.id));
    store.sync().wait().await.unwrap();
    let before = store.segment_count();
    drop(store);

    let (store, rec, report) = recover(&dir, seg, &syncer);
    assert!(report.damaged.is_empty() && report.truncated.is_empty(), "{report:?}");
    let expect: Vec<u64> = (0..sizes.len() as u64).filter(|id| !settled.contains(id)).collect();
    let got: Vec<u64> = rec.iter().map(|r| r.msg.id).collect();
    assert_eq!(got, expect, "exactly the unsettled messages, in append order");
    for r in &rec {
        assert_eq!(r.msg, msg(r.msg.id, sizes[r.msg.id as usize]));
        assert_eq!(r.redelivered, delivered.contains(&r.msg.id), "redelivered flag of {}", r.msg.id);
        assert_eq!(r.pos, pos[r.msg.id as usize]);
        assert_eq!(store.read(r.pos).unwrap(), r.msg, "paged back in");
    }
    assert!(!dir.join("0000000001.seg").exists(), "fully settled segments deleted");
    assert!(store.segment_count() <= before + 1);

    // Settle the rest after recovery: every old segment goes away.
    let rest: Vec<MsgRef> = rec.iter().map(|r| MsgRef { id: r.msg.id, pos: r.pos }).collect();
    store.settle(&rest).unwrap();
    assert_eq!(store.segment_count(), 1);
    assert_eq!(segment_files(&dir).len(), 1);
}

#[tokio::test]
async fn torn_tail_at_every_offset_is_cut_and_appends_resume() {
    let base = test_dir("torn-base");
    let syncer = Syncer::start(SyncerConfig::default());
    let (store, _, _) = recover(&base, 1 << 20, &syncer);
    let sizes = [50, 120, 7, 300, 90];
    let pos = fill(&store, &sizes).await;
    drop(store);
    let seg_path = base.join(format!("{:010}.seg", pos[0].segment));
    let full = std::fs::read(&seg_path).unwrap();
    let last_start = pos[4].offset as usize;
    let work = test_dir("torn-work");
    for cut in last_start..full.len() {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join(seg_path.file_name().unwrap()), &full[..cut]).unwrap();
        let (store, rec, report) = recover(&work, 1 << 20, &syncer);
        assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![0, 1, 2, 3], "cut at {cut}");
        assert!(report.damaged.is_empty(), "cut {cut}: {report:?}");
        if cut > last_start {
            assert_eq!(report.truncated.len(), 1, "cut {cut}");
            assert_eq!(report.truncated[0].offset as usize, last_start);
        }
        assert_eq!(std::fs::metadata(work.join(seg_path.file_name().unwrap())).unwrap().len() as usize, last_start);
        // Later appends work and survive another recovery.
        store.append(&msg(10, 33)).unwrap().1.wait().await.unwrap();
        drop(store);
        let (_, rec, report) = recover(&work, 1 << 20, &syncer);
        assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![0, 1, 2, 3, 10]);
        assert!(report.truncated.is_empty() && report.damaged.is_empty());
    }
}

/// Found by the `store_recovery` fuzz target: a segment numbered u32::MAX made recovery wrap the number of
/// its fresh segment to 1 and truncate an existing segment 1, so its messages were lost at the next start.
#[test]
fn segment_number_u32_max_is_refused_not_wrapped_onto_segment_1() {
    let dir = test_dir("seq-wrap");
    let syncer = Syncer::start(SyncerConfig::default());
    let mut seg1 = Vec::new();
    msg(7, 40).encode_record(&mut seg1);
    std::fs::write(dir.join(format!("{:010}.seg", 1)), &seg1).unwrap();
    std::fs::write(dir.join(format!("{:010}.seg", u32::MAX)), b"").unwrap();
    let err = QueueStore::recover(&dir, cfg(1 << 20), &syncer).expect_err("recovery must refuse");
    assert!(err.to_string().contains("segment numbers exhausted"), "{err}");
    assert_eq!(std::fs::read(dir.join(format!("{:010}.seg", 1))).unwrap(), seg1, "segment 1 was modified");
}

#[tokio::test]
async fn corrupt_header_or_body_is_reported_and_skipped() {
    let syncer = Syncer::start(SyncerConfig::default());
    let base = test_dir("corrupt-base");
    let (store, _, _) = recover(&base, 1 << 20, &syncer);
    let sizes = [400; 6];
    let pos = fill(&store, &sizes).await;
    drop(store);
    let name = format!("{:010}.seg", pos[0].segment);
    let full = std::fs::read(base.join(&name)).unwrap();
    let victim = pos[2].offset as usize;
    // Header bytes: magic, version, id, length, payload CRC, header CRC; then body bytes.
    for at in [0usize, 4, 9, 17, 18, 21, 26, 28, 200, 427] {
        let work = test_dir("corrupt-work");
        let mut data = full.clone();
        data[victim + at] ^= 0xa5;
        std::fs::write(work.join(&name), &data).unwrap();
        let (_, rec, report) = recover(&work, 1 << 20, &syncer);
        assert_eq!(rec.iter().map(|r| r.msg.id).collect::<Vec<_>>(), vec![0, 1, 3, 4, 5], "flip at +{at}");
        assert_eq!(report.damaged.len(), 1, "flip at +{at}: {report:?}");
        assert_eq!(report.damaged[0].path, work.join(&name));
        assert_eq!(report.damaged[0].offset as usize, victim);
        assert_eq!(report.damaged[0].len as usize, pos[3].offset as usize - victim);
        assert!(report.truncated.is_empty());
    }
    // Garbage of every kind never panics recovery.
    let mut rng = Rng(42);
    for round in 0..200 {
        let work = test_dir("corrupt-fuzz");
        let mut data = full.clone();
        for _ in 0..1 + round % 8 {
            let i = rng.below(data.len() as u64) as usize;
            data[i] = rng.next() as u8;
        }
        if round % 3 == 0 {
            data.truncate(rng.below(data.len() as u64) as usize);
        }
        std::fs::write(work.join(&name), &data).unwrap();
        std::fs::write(work.join(format!("{:010}.ack", pos[0].segment)), &data[..data.len().min(100)]).unwrap();
        let (_, rec, _) = recover(&work, 1 << 20, &syncer);
        assert!(rec.len() <= 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_fsyncs() {
    let dir = test_dir("group");
    let syncer = Syncer::start(SyncerConfig::default());
    let (store, _, _) = recover(&dir, 1 << 20, &syncer);
    let store = Arc::new(store);
    let writers = 8u64;
    let per = 300u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..per {
                let (_, t) = store.append(&msg(w << 32 | n, 1024)).unwrap();
                t.wait().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = syncer.stats();
    let appends = writers * per;
    assert_eq!(stats.records, appends);
    assert!(stats.fsyncs < appends / 4, "{stats:?} for {appends} appends");
    drop(store);
    let (_, rec, _) = recover(&dir, 1 << 20, &syncer);
    assert_eq!(rec.len() as u64, appends);
    // Per writer, append order is kept.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for r in rec {
        let (w, n) = (r.msg.id >> 32, r.msg.id & 0xffff_ffff);
        assert!(last.insert(w, n).is_none_or(|prev| prev < n));
    }
}

const CHILD_ENV: &str = "MAILROOM_STORE_CRASH_CHILD";

/// The child side of `sigkill_at_random_moments_loses_no_confirmed_message`: appends from 4 tasks,
/// prints `C <id>` once a ticket completed, `P <id>` before a settle and `S <id>` once it returned. Does nothing unless
/// started by that test.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var("MAILROOM_STORE_CRASH_ROUND").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let syncer = Syncer::start(SyncerConfig::default());
        let (store, rec, _) = QueueStore::recover(Path::new(&dir), cfg(256 * 1024), &syncer).unwrap();
        let store = Arc::new(store);
        // Settle a third of what came back, as a consumer would.
        let old: Vec<MsgRef> =
            rec.iter().filter(|r| r.msg.id % 3 == 0).map(|r| MsgRef { id: r.msg.id, pos: r.pos }).collect();
        // Announced first: a kill between settle and the S lines leaves them "maybe settled".
        for r in &old {
            println!("P {}", r.id);
        }
        store.settle(&old).unwrap();
        for r in &old {
            println!("S {}", r.id);
        }
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let id = round << 40 | w << 32 | n;
                    let m = msg(id, 200 + (n as usize * 131) % 3000);
                    let (pos, t) = store.append(&m).unwrap();
                    t.wait().await.unwrap();
                    println!("C {id}");
                    if n % 5 == 4 {
                        println!("P {id}");
                        store.settle(&[MsgRef { id, pos }]).unwrap();
                        println!("S {id}");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn sigkill_at_random_moments_loses_no_confirmed_message() {
    let dir = test_dir("sigkill");
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(0xdead_beef);
    let mut confirmed: Vec<u64> = Vec::new();
    let mut settled: HashSet<u64> = HashSet::new();
    let mut maybe_settled: HashSet<u64> = HashSet::new();
    let started = Instant::now();
    let rounds = 8;
    for round in 1..=rounds {
        let mut child = std::process::Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .env("MAILROOM_STORE_CRASH_ROUND", round.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((kind, id)) = line.split_once(' ') {
                    if let (Some(k @ ('C' | 'S' | 'P')), Ok(id)) = (kind.chars().next(), id.parse::<u64>()) {
                        lines.push((k, id));
                    }
                }
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(150 + rng.below(500)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for (k, id) in reader.join().unwrap() {
            match k {
                'C' => confirmed.push(id),
                'P' => {
                    maybe_settled.insert(id);
                }
                _ => {
                    settled.insert(id);
                }
            }
        }
        let syncer = Syncer::start(SyncerConfig::default());
        let (_, rec, report) = QueueStore::recover(&dir, cfg(256 * 1024), &syncer).unwrap();
        assert!(report.damaged.is_empty(), "round {round}: {report:?}");
        let present: HashSet<u64> = rec.iter().map(|r| r.msg.id).collect();
        for id in &confirmed {
            if !settled.contains(id) && !maybe_settled.contains(id) {
                assert!(present.contains(id), "round {round}: confirmed message {id:#x} lost");
            }
        }
        for id in &settled {
            assert!(!present.contains(id), "round {round}: settled message {id:#x} came back after kill -9");
        }
        // Append order per writer is kept.
        let mut last: BTreeMap<u64, u64> = BTreeMap::new();
        for r in &rec {
            let (w, n) = (r.msg.id >> 32, r.msg.id & 0xffff_ffff);
            assert!(last.insert(w, n).is_none_or(|prev| prev < n), "round {round}: order broken at {:#x}", r.msg.id);
            assert_eq!(r.msg, msg(r.msg.id, r.msg.body.len()));
        }
        eprintln!(
            "round {round}: {} confirmed so far, {} settled, {} present, {} cut tails",
            confirmed.len(),
            settled.len(),
            rec.len(),
            report.truncated.len()
        );
    }
    assert!(confirmed.len() > 100, "the child made progress");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Appends/s and fsyncs/s for 1 KiB records from 8 writers; run with --release --ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_group_commit_throughput() {
    // MAILROOM_BENCH_MAX_WAIT_US / MAILROOM_BENCH_IDLE_US override the syncer's gathering.
    let env_us = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok()).map(Duration::from_micros);
    let mut sc = SyncerConfig::default();
    sc.max_wait = env_us("MAILROOM_BENCH_MAX_WAIT_US").unwrap_or(sc.max_wait);
    sc.gather_idle = env_us("MAILROOM_BENCH_IDLE_US").unwrap_or(sc.gather_idle);
    println!("syncer: {sc:?}");
    for window in [1usize, 8, 64] {
        let dir = test_dir(&format!("bench-append-{window}"));
        let syncer = Syncer::start(sc.clone());
        let (store, _, _) = recover(&dir, 8 << 20, &syncer);
        let store = Arc::new(store);
        let secs = 3.0;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                let mut pending = std::collections::VecDeque::new();
                let body = msg(0, 1024);
                while start.elapsed().as_secs_f64() < secs {
                    let m = StoredMessage { id: w << 32 | n, ..body.clone() };
                    pending.push_back(store.append(&m).unwrap().1);
                    n += 1;
                    if pending.len() >= window {
                        pending.pop_front().unwrap().wait().await.unwrap();
                    }
                }
                for t in pending {
                    t.wait().await.unwrap();
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let el = start.elapsed().as_secs_f64();
        let s = syncer.stats();
        println!(
            "8 writers, {window} ticket(s) in flight each, 1 KiB: {:.0} appends/s, {:.0} fsyncs/s, {:.1} records/fsync, {:.0} us/fsync",
            total as f64 / el,
            s.fsyncs as f64 / el,
            s.records as f64 / s.fsyncs.max(1) as f64,
            s.fsync_micros as f64 / s.fsyncs.max(1) as f64
        );
    }
}

/// Recovery time for ~200 MB of segments; run with --release --ignored.
#[tokio::test]
#[ignore]
async fn bench_recovery_200mb() {
    let dir = test_dir("bench-recover");
    let syncer = Syncer::start(SyncerConfig::default());
    let (store, _, _) = recover(&dir, 8 << 20, &syncer);
    let n = 200_000u64;
    let body = msg(0, 1024);
    let mut last = None;
    for id in 0..n {
        last = Some(store.append(&StoredMessage { id, ..body.clone() }).unwrap().1);
        if id % 10_000 == 0 {
            last.take().unwrap().wait().await.unwrap();
        }
    }
    last.unwrap().wait().await.unwrap();
    drop(store);
    let bytes: u64 = segment_files(&dir).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    // Drop the page cache if allowed (root), so the figure includes reading from disk.
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let start = Instant::now();
    let mut count = 0u64;
    let (_, report) = QueueStore::recover_with(
        &dir,
        cfg(8 << 20),
        syncer.handle(),
        Arc::new(mailroom_broker::store::segment::OsIo),
        |_| count += 1,
    )
    .unwrap();
    let el = start.elapsed();
    assert_eq!(count, n);
    println!(
        "recovered {count} records, {:.0} MB in {} segments, in {:.3} s ({:.0} MB/s, page cache {})",
        bytes as f64 / 1e6,
        report.segments,
        el.as_secs_f64(),
        bytes as f64 / 1e6 / el.as_secs_f64(),
        if cold { "dropped" } else { "warm" }
    );
}
