use super::*;
use crate::store::queue_store::test_dir;
use crate::store::segment::OsIo;
use amq_protocol_types::{AMQPValue, FieldTable};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The real file system, with faults injectable on the definitions files only (`definitions.*`).
#[derive(Debug, Default)]
pub(crate) struct DefsFaultIo {
    /// Writes fail with ENOSPC after writing half the bytes.
    pub fail_writes: AtomicBool,
    /// fsyncs fail with EIO.
    pub fail_sync: AtomicBool,
    /// Renames fail with ENOSPC.
    pub fail_rename: AtomicBool,
    /// fsyncs of definitions files performed.
    pub syncs: AtomicUsize,
    /// While set, fsyncs of definitions files wait (a slow disk), then fail if `fail_sync` is set by then.
    pub hold_sync: std::sync::Mutex<bool>,
    /// Signalled when `hold_sync` is cleared.
    pub released: std::sync::Condvar,
}

impl DefsFaultIo {
    /// Holds (true) or releases (false) fsyncs of definitions files.
    pub fn hold(&self, on: bool) {
        *self.hold_sync.lock().unwrap() = on;
        self.released.notify_all();
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn StoreFile>,
    io: Arc<DefsFaultIo>,
}

impl StoreFile for FaultyFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.io.fail_writes.load(Ordering::SeqCst) {
            self.inner.write_all_at(&buf[..buf.len() / 2], offset)?;
            return Err(io::Error::from_raw_os_error(28));
        }
        self.inner.write_all_at(buf, offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut held = self.io.hold_sync.lock().unwrap();
        while *held {
            held = self.io.released.wait(held).unwrap();
        }
        drop(held);
        if self.io.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.io.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn file_len(&self) -> io::Result<u64> {
        self.inner.file_len()
    }
}

/// A [`StoreIo`] handle over shared [`DefsFaultIo`] switches.
#[derive(Debug, Clone)]
pub(crate) struct DefsFaults(pub Arc<DefsFaultIo>);

fn is_defs(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("definitions."))
}

impl StoreIo for DefsFaults {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StoreFile>> {
        let inner = OsIo.open(path, create)?;
        if !is_defs(path) {
            return Ok(inner);
        }
        Ok(Arc::new(FaultyFile { inner, io: Arc::clone(&self.0) }))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        OsIo.sync_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if is_defs(to) && self.0.fail_rename.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28));
        }
        std::fs::rename(from, to)
    }
}

fn queue(name: &str, generation: u64) -> QueueDef {
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(1000));
    QueueDef { vhost: "/".into(), name: name.into(), auto_delete: false, arguments, generation }
}

fn exchange(name: &str) -> ExchangeDef {
    ExchangeDef { vhost: "/".into(), name: name.into(), kind: "topic".into(), generation: 7, ..Default::default() }
}

fn binding(source: &str, queue: &str, key: &str) -> BindingDef {
    BindingDef {
        vhost: "/".into(),
        source: source.into(),
        destination: queue.into(),
        destination_kind: DestinationKind::Queue,
        routing_key: key.into(),
        arguments: FieldTable::default(),
    }
}

fn open(dir: &Path) -> (DefinitionsLog, Option<Definitions>) {
    DefinitionsLog::open(dir, Arc::new(OsIo)).unwrap()
}

#[test]
fn changes_survive_a_reopen_and_deletes_take_their_bindings() {
    let dir = test_dir("deflog-roundtrip");
    let (log, loaded) = open(&dir);
    assert_eq!(loaded, None, "first start");
    log.apply_and_commit(Change::PutVhost(VhostDef { name: "/".into() })).unwrap();
    log.apply_and_commit(Change::PutExchange(exchange("ev"))).unwrap();
    for q in ["a", "b"] {
        log.apply_and_commit(Change::PutQueue(queue(q, 1))).unwrap();
        log.apply_and_commit(Change::PutBinding(binding("ev", q, "k"))).unwrap();
        log.apply_and_commit(Change::PutBinding(binding("amq.topic", q, "k"))).unwrap();
    }
    log.apply_and_commit(Change::DeleteQueue { vhost: "/".into(), name: "a".into() }).unwrap();
    // Re-declared under a new generation: the old bindings are not its bindings.
    log.apply_and_commit(Change::PutQueue(queue("a", 2))).unwrap();
    log.apply_and_commit(Change::DeleteBinding(binding("amq.topic", "b", "k"))).unwrap();
    // An identical put changes nothing and logs nothing.
    let before = log.file_stats();
    log.apply_and_commit(Change::PutQueue(queue("b", 1))).unwrap();
    assert_eq!(log.file_stats(), before);
    drop(log);

    let (log, loaded) = open(&dir);
    let d = loaded.unwrap();
    assert_eq!(d.vhosts, vec![VhostDef { name: "/".into() }]);
    assert_eq!(d.exchanges, vec![exchange("ev")]);
    assert_eq!(d.queues, vec![queue("a", 2), queue("b", 1)]);
    assert_eq!(d.bindings, vec![binding("ev", "b", "k")]);
    assert_eq!(log.queue_generation("/", "a"), Some(2));
    assert!(log.new_generation() > 7, "fresh generations are above every saved one");
    // Deleting the exchange takes its bindings.
    log.apply_and_commit(Change::DeleteExchange { vhost: "/".into(), name: "ev".into() }).unwrap();
    drop(log);
    assert!(open(&dir).1.unwrap().bindings.is_empty());
}

#[test]
fn a_torn_tail_is_ignored_and_the_file_rewritten() {
    let dir = test_dir("deflog-torn");
    let (log, _) = open(&dir);
    for i in 0..10 {
        log.apply_and_commit(Change::PutQueue(queue(&format!("q{i}"), i + 1))).unwrap();
    }
    drop(log);
    let path = dir.join(LOG_NAME);
    let good = std::fs::read(&path).unwrap();
    // A record being appended when the process died: its header and half its payload.
    let mut record = Vec::new();
    encode_record(&Change::PutQueue(queue("torn", 99)), &mut record);
    for cut in [3, HEADER, record.len() / 2, record.len() - 1] {
        let mut data = good.clone();
        data.extend_from_slice(&record[..cut]);
        std::fs::write(&path, &data).unwrap();
        let (log, loaded) = open(&dir);
        let names: Vec<_> = loaded.unwrap().queues.into_iter().map(|q| q.name).collect();
        assert_eq!(names.len(), 10, "cut {cut}: {names:?}");
        assert!(!names.contains(&"torn".to_owned()));
        assert_eq!(std::fs::read(&path).unwrap().len(), good.len(), "rewritten without the torn bytes");
        // Appends after the rewrite are read back.
        log.apply_and_commit(Change::PutQueue(queue("after", 50))).unwrap();
        drop(log);
        assert!(open(&dir).1.unwrap().queues.iter().any(|q| q.name == "after"));
        log_delete(&dir, "after");
    }
    // A complete record with a flipped payload byte fails its CRC: also a torn tail.
    let mut data = good.clone();
    let mut bad = record.clone();
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    data.extend_from_slice(&bad);
    std::fs::write(&path, &data).unwrap();
    assert_eq!(open(&dir).1.unwrap().queues.len(), 10);
}

fn log_delete(dir: &Path, name: &str) {
    let (log, _) = open(dir);
    log.apply_and_commit(Change::DeleteQueue { vhost: "/".into(), name: name.into() }).unwrap();
}

#[test]
fn the_previous_snapshot_format_is_upgraded() {
    let dir = test_dir("deflog-legacy");
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("dlx".into()));
    let legacy = Definitions {
        vhosts: vec![VhostDef { name: "/".into() }],
        users: Vec::new(),
        exchanges: vec![ExchangeDef {
            vhost: "/".into(),
            name: "ev".into(),
            kind: "direct".into(),
            ..Default::default()
        }],
        queues: vec![QueueDef {
            vhost: "/".into(),
            name: "orders".into(),
            auto_delete: false,
            arguments: args,
            generation: 0,
        }],
        bindings: vec![binding("ev", "orders", "o")],
        policies: vec![PolicyDef {
            vhost: "/".into(),
            name: "p".into(),
            pattern: "^o".into(),
            apply_to: "queues".into(),
            priority: 2,
            definition: FieldTable::default(),
        }],
    };
    legacy.save(&dir).unwrap();
    let (log, loaded) = open(&dir);
    assert_eq!(loaded.as_ref(), Some(&legacy));
    assert_eq!(log.queue_generation("/", "orders"), Some(0), "old data keeps its directory");
    assert!(!Definitions::path(&dir).exists(), "the old file is gone once the log holds it");
    drop(log);
    assert_eq!(open(&dir).1, Some(legacy));
}

#[test]
fn the_log_is_compacted_and_cost_per_change_stays_flat() {
    let dir = test_dir("deflog-compact");
    let (log, _) = open(&dir);
    log.apply_and_commit(Change::PutQueue(queue("kept", 1))).unwrap();
    for i in 0..600u64 {
        log.apply_and_commit(Change::PutQueue(queue("churn", i + 2))).unwrap();
        log.apply_and_commit(Change::DeleteQueue { vhost: "/".into(), name: "churn".into() }).unwrap();
    }
    let (bytes, records) = log.file_stats();
    assert!(records <= COMPACT_MIN_RECORDS + 1, "{records} records on file");
    assert!(bytes < 100_000, "{bytes} bytes");
    drop(log);
    let d = open(&dir).1.unwrap();
    assert_eq!(d.queues, vec![queue("kept", 1)]);
}

#[test]
fn failed_writes_fsyncs_and_renames_fail_the_commit_then_recover() {
    let dir = test_dir("deflog-faults");
    let faults = Arc::new(DefsFaultIo::default());
    let (log, _) = DefinitionsLog::open(&dir, Arc::new(DefsFaults(Arc::clone(&faults)))).unwrap();
    log.apply_and_commit(Change::PutQueue(queue("before", 1))).unwrap();
    for (i, switch) in [&faults.fail_writes, &faults.fail_sync].into_iter().enumerate() {
        switch.store(true, Ordering::SeqCst);
        let err = log.apply_and_commit(Change::PutQueue(queue(&format!("failed{i}"), 2))).unwrap_err();
        assert!(err.to_string().contains("definitions.log"), "{err}");
        assert!(log.is_failing());
        // An identical retry does not succeed silently while the file is unsound.
        assert!(log.apply_and_commit(Change::PutQueue(queue(&format!("failed{i}"), 2))).is_err());
        switch.store(false, Ordering::SeqCst);
    }
    // The rewrite after a failure goes through a rename: that can fail too.
    faults.fail_rename.store(true, Ordering::SeqCst);
    assert!(log.apply_and_commit(Change::PutQueue(queue("renamed", 3))).is_err());
    faults.fail_rename.store(false, Ordering::SeqCst);
    // Space is back: the next save rewrites the live set, failed changes included.
    log.apply_and_commit(Change::PutQueue(queue("after", 4))).unwrap();
    assert!(!log.is_failing());
    drop(log);
    let names: Vec<_> = open(&dir).1.unwrap().queues.into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["after", "before", "failed0", "failed1", "renamed"]);
}

#[test]
fn concurrent_changes_share_fsyncs() {
    let dir = test_dir("deflog-group");
    let faults = Arc::new(DefsFaultIo::default());
    let (log, _) = DefinitionsLog::open(&dir, Arc::new(DefsFaults(Arc::clone(&faults)))).unwrap();
    let log = Arc::new(log);
    let before = faults.syncs.load(Ordering::SeqCst);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..50 {
                    log.apply_and_commit(Change::PutQueue(queue(&format!("t{t}-{i}"), 1))).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let syncs = faults.syncs.load(Ordering::SeqCst) - before;
    assert!(syncs < 400, "{syncs} fsyncs for 400 changes");
    drop(log);
    assert_eq!(open(&dir).1.unwrap().queues.len(), 400);
}

#[test]
fn garbage_records_never_panic() {
    let mut record = Vec::new();
    encode_record(&Change::PutBinding(binding("ev", "q", "k")), &mut record);
    let payload = &record[HEADER..];
    for cut in 0..payload.len() {
        assert!(decode_change(&payload[..cut]).is_err());
    }
    let mut seed = 11u64;
    for _ in 0..2000 {
        let mut p = payload.to_vec();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let i = (seed >> 33) as usize % p.len();
        p[i] = (seed >> 13) as u8;
        let _ = decode_change(&p);
    }
}
