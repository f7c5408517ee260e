//! Store recovery fuzzing: segments and ack logs written from an arbitrary model (messages, settles,
//! delivery marks), then damaged (bit flips, overwrites, truncation, raw garbage files), then recovered
//! with `QueueStore::recover`, twice.
//!
//! Invariants: no panic and no error; every record returned has a header and payload whose CRCs check at
//! its position and decodes to what it returned; every record that is still byte-for-byte intact and was
//! not settled is returned (unless the damage forged a valid record header or ack batch elsewhere in
//! the same file, which CRCs cannot rule out); a second recovery returns the same records.
#![no_main]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mailroom_broker::store::{
    ack_log::{self, AckKind},
    record, segment, QueueStore, Recovered, StoreConfig, StoredMessage, Syncer, SyncerConfig,
};

#[derive(Arbitrary, Debug)]
struct Rec {
    exchange: String,
    routing_key: String,
    properties: Vec<u8>,
    body: Vec<u8>,
    expires_at_ms: Option<u64>,
    delivery_count: u32,
    /// Marked delivered this many times (mod 4) in the ack log.
    delivered: u8,
    settled: bool,
}

#[derive(Arbitrary, Debug)]
enum Damage {
    Flip { at: u32, mask: u8 },
    Overwrite { at: u32, bytes: Vec<u8> },
    Truncate { keep: u32 },
    Append(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Seg {
    /// Segment number (any u32, so the wrap at u32::MAX is reachable).
    seq: u32,
    records: Vec<Rec>,
    has_ack: bool,
    /// Settled ids that belong to no record of this segment.
    stray_settles: Vec<u64>,
    seg_damage: Vec<Damage>,
    ack_damage: Vec<Damage>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    segs: Vec<Seg>,
    /// Files of raw bytes: (seq, is an ack log, contents).
    raw: Vec<(u32, bool, Vec<u8>)>,
}

fn damage(file: &mut Vec<u8>, d: &Damage) {
    match d {
        Damage::Flip { at, mask } => {
            if !file.is_empty() {
                let i = *at as usize % file.len();
                file[i] ^= (*mask).max(1);
            }
        }
        Damage::Overwrite { at, bytes } => {
            if !file.is_empty() {
                let i = *at as usize % file.len();
                let n = bytes.len().min(file.len() - i);
                file[i..i + n].copy_from_slice(&bytes[..n]);
            }
        }
        Damage::Truncate { keep } => {
            let keep = *keep as usize % (file.len() + 1);
            file.truncate(keep);
        }
        Damage::Append(bytes) => file.extend_from_slice(bytes),
    }
}

/// Whether an intact ack batch starts at the start of `buf` (independent re-statement of the format:
/// magic u32 LE, kind 1|2, zero, count u16, CRC32 over bytes 0..8 and the ids, ids u64 LE).
fn ack_batch_at(buf: &[u8]) -> bool {
    if buf.len() < 12 || buf[0..4] != ack_magic()[..] || !(buf[4] == 1 || buf[4] == 2) || buf[5] != 0 {
        return false;
    }
    let count = u16::from_le_bytes([buf[6], buf[7]]) as usize;
    let Some(ids) = buf.get(12..12 + count * 8) else { return false };
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[0..8]);
    h.update(ids);
    h.finalize().to_le_bytes() == buf[8..12]
}

/// The ack-log magic, taken from an encoded empty batch.
fn ack_magic() -> [u8; 4] {
    static M: OnceLock<[u8; 4]> = OnceLock::new();
    *M.get_or_init(|| {
        let mut v = Vec::new();
        ack_log::encode(&mut v, AckKind::Settled, &[1]);
        v[0..4].try_into().unwrap()
    })
}

fn syncer() -> &'static Syncer {
    static S: OnceLock<Syncer> = OnceLock::new();
    S.get_or_init(|| Syncer::start(SyncerConfig::default()))
}

fn work_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    base.join(format!("mailroom-fuzz-store-{}", std::process::id()))
}

/// Recovers `dir`; None when it refused because segment numbers are exhausted (a file numbered u32::MAX).
fn recover(dir: &Path, exhausted: bool) -> Option<Vec<Recovered>> {
    let cfg = StoreConfig { segment_size: 4096, ..Default::default() };
    match QueueStore::recover(dir, cfg, syncer()) {
        Ok((store, recovered, _report)) => {
            assert!(!exhausted, "recovery wrapped the segment number past u32::MAX");
            drop(store);
            Some(recovered)
        }
        Err(e) if exhausted && e.to_string().contains("segment numbers exhausted") => None,
        Err(e) => panic!("recovery failed: {e}"),
    }
}

fn key(r: &Recovered) -> (u32, u32, u64) {
    (r.pos.segment, r.pos.offset, r.msg.id)
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let dir = work_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // seq -> (segment bytes, ack bytes)
    let mut files: BTreeMap<u32, (Option<Vec<u8>>, Option<Vec<u8>>)> = BTreeMap::new();
    // What was written: seq -> [(offset, encoded record, message, settled, delivered marks)]
    let mut written: HashMap<u32, Vec<(usize, Vec<u8>, StoredMessage, bool, u32)>> = HashMap::new();
    // Start offsets of the batches written to each ack log, and whether it was damaged.
    let mut ack_batches: HashMap<u32, HashSet<usize>> = HashMap::new();
    let mut ack_damaged: HashSet<u32> = HashSet::new();
    let mut next_id = 1u64;
    for s in &input.segs {
        if files.contains_key(&s.seq) {
            continue;
        }
        let mut seg = Vec::new();
        let mut ack = Vec::new();
        let mut batches = HashSet::new();
        let mut recs = Vec::new();
        for r in &s.records {
            let msg = StoredMessage {
                id: next_id,
                exchange: r.exchange.clone(),
                routing_key: r.routing_key.clone(),
                properties: Bytes::from(r.properties.clone()),
                body: Bytes::from(r.body.clone()),
                expires_at_ms: r.expires_at_ms,
                delivery_count: r.delivery_count,
            };
            next_id += 1;
            let offset = seg.len();
            msg.encode_record(&mut seg);
            let delivered = u32::from(r.delivered % 4);
            for _ in 0..delivered {
                batches.insert(ack.len());
                ack_log::encode(&mut ack, AckKind::Delivered, &[msg.id]);
            }
            if r.settled {
                batches.insert(ack.len());
                ack_log::encode(&mut ack, AckKind::Settled, &[msg.id]);
            }
            recs.push((offset, seg[offset..].to_vec(), msg, r.settled, delivered));
        }
        if !s.stray_settles.is_empty() {
            let stray: Vec<u64> = s.stray_settles.iter().map(|&i| i | 1 << 63).collect();
            batches.insert(ack.len());
            ack_log::encode(&mut ack, AckKind::Settled, &stray);
        }
        for d in &s.seg_damage {
            damage(&mut seg, d);
        }
        if s.has_ack {
            for d in &s.ack_damage {
                damage(&mut ack, d);
                ack_damaged.insert(s.seq);
            }
        }
        let settled_any = s.records.iter().any(|r| r.settled || r.delivered % 4 != 0) || !s.stray_settles.is_empty();
        if !s.has_ack && settled_any {
            // Without its ack log every record of the segment is unsettled.
            for r in recs.iter_mut() {
                r.3 = false;
                r.4 = 0;
            }
        }
        files.insert(s.seq, (Some(seg), s.has_ack.then_some(ack)));
        written.insert(s.seq, recs);
        ack_batches.insert(s.seq, batches);
    }
    for (seq, is_ack, bytes) in &input.raw {
        let e = files.entry(*seq).or_default();
        let slot = if *is_ack { &mut e.1 } else { &mut e.0 };
        if slot.is_none() {
            *slot = Some(bytes.clone());
            if *is_ack {
                ack_damaged.insert(*seq);
            }
        }
    }
    for (&seq, (seg, ack)) in &files {
        if let Some(b) = seg {
            std::fs::write(segment::segment_path(&dir, seq), b).unwrap();
        }
        if let Some(b) = ack {
            std::fs::write(segment::ack_path(&dir, seq), b).unwrap();
        }
    }

    let exhausted = files.keys().next_back() == Some(&u32::MAX);
    let before: Vec<_> = files
        .keys()
        .map(|&s| (std::fs::read(segment::segment_path(&dir, s)).ok(), std::fs::read(segment::ack_path(&dir, s)).ok()))
        .collect();
    let Some(first) = recover(&dir, exhausted) else {
        // Refused: nothing may have been touched.
        let after: Vec<_> = files
            .keys()
            .map(|&s| {
                (std::fs::read(segment::segment_path(&dir, s)).ok(), std::fs::read(segment::ack_path(&dir, s)).ok())
            })
            .collect();
        assert!(before == after, "a refused recovery modified files");
        return;
    };

    // Every record returned checks out against the bytes it was recovered from.
    let mut returned = HashSet::new();
    for r in &first {
        let seg = files.get(&r.pos.segment).and_then(|f| f.0.as_ref()).expect("record from a segment never written");
        let at = &seg[r.pos.offset as usize..];
        let h = record::parse_header(at).expect("returned record has no valid header");
        assert_eq!(h.id, r.msg.id);
        let payload = &at[record::HEADER_LEN..h.record_len()];
        assert!(record::payload_ok(&h, payload), "returned record fails its payload CRC");
        let decoded =
            StoredMessage::decode(h.id, Bytes::copy_from_slice(payload)).expect("returned record undecodable");
        assert_eq!(decoded, r.msg);
        assert!(returned.insert(key(r)), "record returned twice");
    }

    // Every intact, unsettled record is returned.
    for (seq, recs) in &written {
        let (Some(seg), ack) = files.get(seq).expect("written") else { continue };
        let forged_header = (0..seg.len()).any(|p| {
            record::parse_header(&seg[p..]).is_some()
                && !recs.iter().any(|r| r.0 == p && seg[p..].starts_with(&r.1[..record::HEADER_LEN]))
        });
        let forged_batch =
            ack.as_ref().is_some_and(|a| (0..a.len()).any(|p| ack_batch_at(&a[p..]) && !ack_batches[seq].contains(&p)));
        if forged_header || forged_batch {
            continue;
        }
        for (offset, bytes, msg, settled, delivered) in recs {
            if *settled || !seg.get(*offset..).is_some_and(|s| s.starts_with(bytes)) {
                continue;
            }
            let got = first
                .iter()
                .find(|r| r.pos.segment == *seq && r.pos.offset as usize == *offset)
                .unwrap_or_else(|| panic!("intact unsettled record {} at {seq}:{offset} was not recovered", msg.id));
            assert_eq!(&got.msg, msg);
            if !ack_damaged.contains(seq) && ack.is_some() {
                assert_eq!(got.delivered_count, *delivered, "delivery marks of {} lost", msg.id);
                assert_eq!(got.redelivered, *delivered > 0);
            }
        }
    }

    // Recovery is repeatable: what it kept is found again.
    // The first recovery created segment max+1, which may itself be u32::MAX.
    let now_exhausted = segment::segment_path(&dir, u32::MAX).exists();
    let Some(second) = recover(&dir, now_exhausted) else { return };
    let again: HashSet<_> = second.iter().map(key).collect();
    assert_eq!(again, returned, "a second recovery disagrees with the first");
});
