//! The ready index with runs, model-checked against a plain sorted list of messages under random pushes,
//! pops, requeues, expiries, removals, peeks, read-aheads and purges; recovery into runs; damaged runs.

use super::super::entry::RUN;
use super::super::index::{Body, Entry, Rank, ReadyIndex, REDELIVERED, RESIDENT, STORED};
use super::super::recovery::RecoveredIndex;
use super::RUN_MAX_MESSAGES;
use crate::message::Message;
use crate::paging::{Paging, PagingConfig};
use crate::store::segment::OsIo;
use crate::store::{QueueStore, StoreConfig, Syncer, SyncerConfig};
use bytes::Bytes;
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// A message as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct M {
    id: u64,
    rank: u8,
    size: u32,
    ttl: bool,
    redelivered: bool,
}

impl M {
    fn key(&self) -> Rank {
        (self.rank, self.id)
    }
}

struct Fixture {
    dir: PathBuf,
    store: QueueStore,
    index: ReadyIndex,
    paging: Arc<Paging>,
    next_id: u64,
    model: Vec<M>,
    /// Taken by pops and not settled: (entry, body).
    unacked: Vec<(Entry, Body)>,
    // Dropped last: the stores write through it.
    _syncer: Syncer,
}

fn fresh_dir(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join("mailroom-runs-tests").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn body_of(id: u64, size: u32) -> Bytes {
    // Content that names its message, so a body read from the wrong record shows.
    let mut b = format!("{id}:").into_bytes();
    b.resize(size.max(b.len() as u32) as usize, (id % 251) as u8);
    Bytes::from(b)
}

fn message_of(id: u64, size: u32) -> Message {
    Message::new("", "q", Default::default(), body_of(id, size))
}

fn open_store(dir: &std::path::Path, syncer: &Syncer, visit: impl FnMut(crate::store::Recovered)) -> QueueStore {
    let (store, _) =
        QueueStore::recover_with(&dir.join("q"), StoreConfig::default(), syncer.handle(), Arc::new(OsIo), visit)
            .unwrap();
    store
}

impl Fixture {
    fn new(name: &str, memory: u64) -> Fixture {
        let dir = fresh_dir(name);
        let syncer = Syncer::start(SyncerConfig::default());
        let store = open_store(&dir, &syncer, |_| {});
        let config = PagingConfig {
            queue_memory_bytes: memory,
            read_ahead_messages: 16,
            read_ahead_bytes: memory.max(1),
            dir: Some(dir.join("paging")),
        };
        let paging = Paging::new(config, None, None);
        Fixture {
            index: ReadyIndex::new(Some(store.clone())),
            store,
            dir,
            paging,
            next_id: 1,
            model: Vec::new(),
            unacked: Vec::new(),
            _syncer: syncer,
        }
    }

    fn push(&mut self, size: u32, rank: u8, ttl: bool, persistent: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let message = Arc::new(message_of(id, size));
        // The body is at least its id and a colon.
        let size = message.body.len() as u32;
        let expires_at = ttl.then(|| Instant::now() + std::time::Duration::from_secs(3600));
        let mut entry = Entry { id, pos: Default::default(), size, rank, flags: 0, delivery_count: 0 };
        if persistent {
            let (pos, _) = self.store.append(&crate::message::codec::to_stored(id, &message, expires_at)).unwrap();
            entry.pos = pos;
            entry.flags = STORED;
        }
        self.index.insert_new(&self.paging, "q", entry, Body { message, expires_at });
        let m = M { id, rank, size, ttl, redelivered: false };
        let at = self.model.partition_point(|x| x.key() < m.key());
        self.model.insert(at, m);
    }

    fn pop(&mut self) {
        let got = self.index.pop_front();
        if self.model.is_empty() {
            assert!(got.is_none());
            return;
        }
        let (entry, body) = got.expect("a message is ready");
        let m = self.model.remove(0);
        assert_eq!(entry.id, m.id, "delivery order");
        assert_eq!(entry.size, m.size);
        assert_eq!(entry.has(REDELIVERED), m.redelivered);
        let body = body.unwrap_or_else(|| self.index.load(&entry).expect("its body reads back"));
        assert_eq!(body.message.body, body_of(m.id, m.size));
        assert_eq!(body.expires_at.is_some(), m.ttl);
        self.unacked.push((entry, body));
    }

    fn requeue(&mut self, i: usize) {
        if self.unacked.is_empty() {
            return;
        }
        let (entry, body) = self.unacked.swap_remove(i % self.unacked.len());
        let entry = Entry { flags: entry.flags | REDELIVERED, delivery_count: entry.delivery_count + 1, ..entry };
        self.index.insert(entry, Some(body.clone()));
        let m =
            M { id: entry.id, rank: entry.rank, size: entry.size, ttl: body.expires_at.is_some(), redelivered: true };
        let at = self.model.partition_point(|x| x.key() < m.key());
        self.model.insert(at, m);
    }

    fn expire(&mut self, i: usize) {
        let with_ttl: Vec<usize> = (0..self.model.len()).filter(|&j| self.model[j].ttl).collect();
        if with_ttl.is_empty() {
            return;
        }
        let j = with_ttl[i % with_ttl.len()];
        let idx = self.index.find(self.model[j].key()).expect("a message with a TTL is a plain entry");
        let (entry, _) = self.index.remove_at(idx).unwrap();
        assert_eq!(entry.id, self.model.remove(j).id);
        self.index.settle_entry("q", &entry);
    }

    fn remove_id(&mut self, i: usize) {
        if self.model.is_empty() {
            assert!(self.index.remove_id(self.next_id).is_none());
            return;
        }
        let m = self.model.remove(i % self.model.len());
        let (entry, _) = self.index.remove_id(m.id).expect("a ready message is removed by id");
        assert_eq!((entry.id, entry.size), (m.id, m.size));
        self.index.settle_entry("q", &entry);
    }

    fn peek(&self, offset: usize, count: usize) {
        let got = self.index.peek(offset, count);
        let want: Vec<&M> = self.model.iter().skip(offset).take(count).collect();
        assert_eq!(got.len(), want.len());
        for ((entry, message), m) in got.iter().zip(want) {
            assert_eq!(entry.id, m.id);
            assert_eq!(message.as_ref().expect("peek reads the body").body, body_of(m.id, m.size));
        }
    }

    fn read_ahead(&mut self) {
        self.index.loading = true;
        for _ in 0..10_000 {
            let Some(plan) = self.index.plan_read_ahead(&self.paging) else { return };
            let loaded = plan.read().expect("the read-ahead reads");
            let failed = self.index.install(&plan, loaded);
            assert!(failed.is_empty(), "nothing is damaged: {failed:?}");
        }
        panic!("the read-ahead never ends");
    }

    fn purge(&mut self) {
        assert_eq!(self.index.len(), self.model.len());
        let (ready, bodies) = self.index.take_all();
        let ids: Vec<u64> = ready.iter().flat_map(|e| e.id..=e.last_id()).collect();
        assert_eq!(ids, self.model.iter().map(|m| m.id).collect::<Vec<_>>());
        assert!(ready.iter().all(|e| e.has(RESIDENT) == bodies.contains_key(&e.id) || e.is_run()));
        self.index.settle_entries("q", ready.iter());
        self.model.clear();
    }

    /// The index against the model: counts, bytes, order, and what runs may hold.
    fn check(&self) {
        let ix = &self.index;
        assert_eq!(ix.len(), self.model.len());
        assert_eq!(ix.ready_bytes, self.model.iter().map(|m| m.size as u64).sum::<u64>());
        assert_eq!(ix.paged + ix.bodies.len(), ix.len());
        let slots: Vec<Entry> = ix.slots_for_tests();
        let by_id: std::collections::HashMap<u64, M> = self.model.iter().map(|m| (m.id, *m)).collect();
        let mut resident_bytes = 0;
        let mut ids = Vec::new();
        for (i, e) in slots.iter().enumerate() {
            if let Some(next) = slots.get(i + 1) {
                assert!(e.key() < next.key(), "slots sorted");
                assert!(e.rank != next.rank || e.last_id() < next.id, "a run overlaps the next slot");
            }
            if e.is_run() {
                assert_eq!(e.flags, STORED | RUN);
                assert!(e.count() >= 2 && e.count() <= RUN_MAX_MESSAGES as usize);
            } else if e.has(RESIDENT) {
                resident_bytes += e.size as u64;
                assert!(ix.bodies.contains_key(&e.id));
            }
            let bytes: u64 = (e.id..=e.last_id())
                .map(|id| {
                    let m = by_id.get(&id).expect("every indexed message is ready");
                    assert_eq!(m.rank, e.rank);
                    if e.is_run() {
                        assert!(!m.ttl && !m.redelivered, "a run holds only plain stored messages: {m:?}");
                    }
                    m.size as u64
                })
                .sum();
            assert_eq!(bytes, e.size as u64, "a slot's bytes");
            ids.extend(e.id..=e.last_id());
        }
        assert_eq!(resident_bytes, ix.resident_bytes);
        assert_eq!(ids, self.model.iter().map(|m| m.id).collect::<Vec<_>>());
    }

    fn drain(&mut self) {
        while !self.model.is_empty() {
            self.pop();
        }
        assert!(self.index.pop_front().is_none());
        self.check();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push { size: u32, rank: u8, ttl: bool, persistent: bool },
    PushMany { n: usize, size: u32 },
    Pop,
    Requeue(usize),
    Expire(usize),
    RemoveId(usize),
    Peek(usize, usize),
    ReadAhead,
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u32..600, 254u8..=255, prop::bool::weighted(0.1), prop::bool::weighted(0.9))
            .prop_map(|(size, rank, ttl, persistent)| Op::Push { size, rank, ttl, persistent }),
        3 => (1usize..300, 0u32..300).prop_map(|(n, size)| Op::PushMany { n, size }),
        4 => Just(Op::Pop),
        2 => any::<usize>().prop_map(Op::Requeue),
        1 => any::<usize>().prop_map(Op::Expire),
        1 => any::<usize>().prop_map(Op::RemoveId),
        1 => (0usize..400, 0usize..40).prop_map(|(o, c)| Op::Peek(o, c)),
        2 => Just(Op::ReadAhead),
        1 => Just(Op::Purge),
    ]
}

fn run_ops(memory: u64, ops: &[Op]) {
    let mut f = Fixture::new("model", memory);
    for op in ops {
        match *op {
            Op::Push { size, rank, ttl, persistent } => f.push(size, rank, ttl, persistent),
            Op::PushMany { n, size } => (0..n).for_each(|i| f.push(size + (i as u32 % 7), 255, false, true)),
            Op::Pop => f.pop(),
            Op::Requeue(i) => f.requeue(i),
            Op::Expire(i) => f.expire(i),
            Op::RemoveId(i) => f.remove_id(i),
            Op::Peek(o, c) => f.peek(o, c),
            Op::ReadAhead => f.read_ahead(),
            Op::Purge => f.purge(),
        }
        f.check();
    }
    f.drain();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_index_with_runs_behaves_as_a_sorted_list(ops in prop::collection::vec(op(), 0..60), memory in prop_oneof![Just(0u64), Just(4096u64), Just(64 << 10)]) {
        run_ops(memory, &ops);
    }
}

#[test]
fn a_deep_cold_queue_costs_a_slot_per_run() {
    let mut f = Fixture::new("deep", 0);
    for i in 0..20_000u32 {
        f.push(100 + i % 50, 255, false, true);
    }
    f.check();
    let slots = f.index.slots();
    assert!(slots <= 20_000 / RUN_MAX_MESSAGES as usize + 2, "{slots} slots for 20,000 messages");
    f.read_ahead();
    f.check();
    f.peek(10_000, 30);
    f.remove_id(12_345);
    f.check();
    f.drain();
}

#[test]
fn recovery_collapses_runs_and_keeps_expiring_and_redelivered_messages_apart() {
    let mut f = Fixture::new("recover", 0);
    for i in 0..3_000u32 {
        // Every 500th message has a TTL: it stays a plain entry and splits the run it falls in.
        f.push(50 + i % 13, 255, i % 500 == 499, true);
    }
    // Two delivered and not settled: they come back redelivered.
    let delivered: Vec<_> = f.model[..2].iter().map(|m| m.id).collect();
    f.pop();
    f.pop();
    let refs: Vec<_> = f.unacked.iter().map(|(e, _)| e.msg_ref()).collect();
    f.store.mark_delivered(&refs).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(f.store.sync().wait()).unwrap();
    let models: Vec<M> = f
        .unacked
        .iter()
        .map(|(e, b)| M { id: e.id, rank: 255, size: e.size, ttl: b.expires_at.is_some(), redelivered: true })
        .chain(f.model.iter().copied())
        .collect();
    let mut recovered = RecoveredIndex::new(&Default::default());
    let store = open_store(&f.dir, &f._syncer, |r| recovered.add(r));
    let mut index = ReadyIndex::new(Some(store.clone()));
    index.restore(recovered.into_slots());
    f.store = store;
    f.index = index;
    f.model = models;
    f.unacked.clear();
    f.check();
    assert!(f.index.slots() < 20, "{} slots", f.index.slots());
    assert!(delivered.iter().all(|id| f.model.iter().any(|m| m.id == *id && m.redelivered)));
    f.drain();
}

#[test]
fn a_damaged_run_keeps_its_count_and_marks_what_it_lost() {
    let mut f = Fixture::new("damaged", 0);
    for _ in 0..200 {
        f.push(300, 255, false, true);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(f.store.sync().wait()).unwrap();
    // Damage message 50's header (the walk resyncs after it) and message 120's body (its CRC fails).
    let seg = std::fs::read_dir(f.dir.join("q"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg") && std::fs::metadata(p).unwrap().len() > 0)
        .unwrap();
    let mut data = std::fs::read(&seg).unwrap();
    let at = |id: u64| {
        data.windows(crate::store::record::HEADER_LEN)
            .position(|w| crate::store::record::parse_header(w).is_some_and(|h| h.id == id))
    };
    let (h50, h120) = (at(50).unwrap(), at(120).unwrap());
    data[h50 + 1] ^= 0xff;
    data[h120 + 200] ^= 0xff;
    std::fs::write(&seg, &data).unwrap();
    let n = f.index.len();
    let mut bad = Vec::new();
    while let Some((entry, body)) = f.index.pop_front() {
        assert!(body.is_none());
        match f.index.load(&entry) {
            Ok(body) => assert_eq!(body.message.body, body_of(entry.id, 300)),
            Err(e) => {
                assert!(e.is_corrupt(), "{e}");
                bad.push(entry.id);
            }
        }
    }
    assert_eq!(bad, vec![50, 120]);
    assert_eq!(f.index.ready_bytes, 0);
    assert_eq!(n, 200);
}

/// A broker whose queues keep a few messages' bodies in RAM: everything else is in runs.
fn small_broker(dir: &std::path::Path) -> crate::Broker {
    crate::Broker::open(crate::BrokerConfig {
        data_dir: Some(dir.to_path_buf()),
        paging: PagingConfig { queue_memory_bytes: 4096, read_ahead_messages: 8, read_ahead_bytes: 4096, dir: None },
        ..Default::default()
    })
    .unwrap()
}

fn persistent(queue: &str, i: usize) -> Message {
    let properties = crate::BasicProperties::default().with_delivery_mode(2);
    Message::new("", queue, properties, Bytes::from(format!("m{i}-{}", "x".repeat(i % 50))))
}

async fn fill(v: &crate::VHost, queue: &str, n: std::ops::Range<usize>) {
    let mut tickets = Vec::new();
    for i in n {
        let r = v.publish("", persistent(queue, i)).unwrap();
        assert!(r.routed && !r.rejected);
        tickets.extend(r.durable);
    }
    for t in tickets {
        t.wait().await.unwrap();
    }
}

fn durable(v: &crate::VHost, name: &str, arguments: amq_protocol_types::FieldTable) -> Arc<crate::Queue> {
    let options = crate::QueueOptions { durable: true, arguments, ..Default::default() };
    v.declare_queue(name, &options, 1).unwrap();
    v.queue(name, 1).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_drop_head_and_removal_by_id_settle_messages_of_runs_for_good() {
    let dir = fresh_dir("broker");
    {
        let broker = small_broker(&dir);
        let v = broker.vhost("/").unwrap();
        // Purged: none comes back after a restart.
        let p = durable(&v, "p", Default::default());
        fill(&v, "p", 0..3000).await;
        assert_eq!(p.purge(), 3000);
        fill(&v, "p", 3000..3010).await;
        // Drop-head at a run, with nothing consuming: the oldest go, the newest 1000 stay.
        let mut arguments = amq_protocol_types::FieldTable::default();
        arguments.insert("x-max-length".into(), amq_protocol_types::AMQPValue::LongLongInt(1000));
        let m = durable(&v, "m", arguments);
        fill(&v, "m", 0..3000).await;
        assert_eq!(m.message_count(), 1000);
        // A redrive's removal by id, in the middle of a run.
        let r = durable(&v, "r", Default::default());
        fill(&v, "r", 0..3000).await;
        let peeked = r.peek(1500, 3);
        assert_eq!(peeked.len(), 3);
        assert_eq!(&peeked[1].message.body[..], persistent("r", 1501).body.as_ref());
        assert!(r.remove_ready(peeked[1].id));
        assert!(!r.remove_ready(peeked[1].id), "removed once");
        assert_eq!(r.message_count(), 2999);
        assert_eq!(
            r.ready_bytes(),
            (0..3000).filter(|&i| i != 1501).map(|i| persistent("r", i).body.len() as u64).sum::<u64>()
        );
        broker.flush_stores().await;
    }
    let broker = small_broker(&dir);
    let v = broker.vhost("/").unwrap();
    let drain = |q: &Arc<crate::Queue>| {
        let mut got = Vec::new();
        while let Some(g) = q.get(true) {
            got.push(String::from_utf8_lossy(&g.message.body).into_owned());
        }
        got
    };
    let want = |range: std::ops::Range<usize>, skip: Option<usize>| -> Vec<String> {
        range
            .filter(|i| Some(*i) != skip)
            .map(|i| String::from_utf8_lossy(&persistent("", i).body).into_owned())
            .collect()
    };
    assert_eq!(drain(&v.queue("p", 1).unwrap()), want(3000..3010, None));
    assert_eq!(drain(&v.queue("m", 1).unwrap()), want(2000..3000, None));
    assert_eq!(drain(&v.queue("r", 1).unwrap()), want(0..3000, Some(1501)));
}
