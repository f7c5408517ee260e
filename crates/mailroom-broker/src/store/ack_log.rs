//! The per-segment ack log: settled and delivered message ids, appended in CRC-checked batches.
//!
//! Batch layout (little-endian): magic `0x4B43_414D` (u32), kind (u8: 1 settled, 2 delivered),
//! reserved (u8, zero), count (u16), CRC32 (u32) over the first 8 bytes and the ids, then `count`
//! ids of 8 bytes each. One batch per `settle`/`mark_delivered` call and segment, so a torn write
//! spoils at most that call's batch and is detected by its CRC. A damaged batch in the middle is
//! skipped by searching for the next magic whose CRC checks, like the segment scanner.

use std::collections::{HashMap, HashSet};

/// Marks the start of every ack batch.
pub const ACK_MAGIC: u32 = 0x4B43_414D;
/// Size of a batch header.
pub const BATCH_HEADER_LEN: usize = 12;
/// Most ids in one batch (the count is a u16).
pub const MAX_BATCH: usize = u16::MAX as usize;

/// What an ack-log entry says about its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Acked, expired, dead-lettered or otherwise removed from the queue for good.
    Settled = 1,
    /// Handed to a consumer: after a restart the message is redelivered with `redelivered = true`.
    Delivered = 2,
}

/// Appends batches for `ids` to `out` (split at [`MAX_BATCH`]).
pub fn encode(out: &mut Vec<u8>, kind: AckKind, ids: &[u64]) {
    for chunk in ids.chunks(MAX_BATCH) {
        let start = out.len();
        out.extend_from_slice(&ACK_MAGIC.to_le_bytes());
        out.push(kind as u8);
        out.push(0);
        out.extend_from_slice(&(chunk.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for id in chunk {
            out.extend_from_slice(&id.to_le_bytes());
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&out[start..start + 8]);
        h.update(&out[start + BATCH_HEADER_LEN..]);
        let crc = h.finalize();
        out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The ids an ack log holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AckState {
    /// Settled ids.
    pub settled: HashSet<u64>,
    /// Delivered ids with how many times each was marked delivered (settled ones may be here too). After
    /// a restart every one of those deliveries ended without an ack: that count is its delivery count.
    pub delivered: HashMap<u64, u32>,
    /// End of the last intact batch: a torn tail after it is cut off.
    pub good_end: usize,
    /// Offsets of damaged batches skipped in the middle.
    pub damaged: Vec<usize>,
}

/// Parses one batch at the start of `buf`: kind, ids and length, if intact.
fn parse_batch(buf: &[u8]) -> Option<(AckKind, &[u8], usize)> {
    if buf.len() < BATCH_HEADER_LEN || u32::from_le_bytes(buf[0..4].try_into().ok()?) != ACK_MAGIC {
        return None;
    }
    let kind = match buf[4] {
        1 => AckKind::Settled,
        2 => AckKind::Delivered,
        _ => return None,
    };
    let count = u16::from_le_bytes(buf[6..8].try_into().ok()?) as usize;
    let len = BATCH_HEADER_LEN + count * 8;
    let ids = buf.get(BATCH_HEADER_LEN..len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[0..8]);
    h.update(ids);
    if h.finalize() != u32::from_le_bytes(buf[8..12].try_into().ok()?) || buf[5] != 0 {
        return None;
    }
    Some((kind, ids, len))
}

/// Parses a whole ack log. Never panics.
pub fn parse(buf: &[u8]) -> AckState {
    let mut st = AckState::default();
    let mut pos = 0;
    while pos < buf.len() {
        if let Some((kind, ids, len)) = parse_batch(&buf[pos..]) {
            let ids = ids.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
            match kind {
                AckKind::Settled => st.settled.extend(ids),
                AckKind::Delivered => {
                    for id in ids {
                        *st.delivered.entry(id).or_insert(0) += 1;
                    }
                }
            }
            pos += len;
            st.good_end = pos;
            continue;
        }
        // Resync: the next offset where an intact batch starts.
        match (pos + 1..buf.len()).find(|&i| parse_batch(&buf[i..]).is_some()) {
            Some(next) => {
                st.damaged.push(pos);
                pos = next;
            }
            None => break,
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let mut buf = Vec::new();
        encode(&mut buf, AckKind::Delivered, &[1, 2, 3]);
        encode(&mut buf, AckKind::Settled, &[2]);
        let st = parse(&buf);
        assert_eq!(st.good_end, buf.len());
        assert_eq!(st.delivered, HashMap::from([(1, 1), (2, 1), (3, 1)]));
        assert_eq!(st.settled, HashSet::from([2]));
    }

    #[test]
    fn large_batches_split() {
        let ids: Vec<u64> = (0..(MAX_BATCH as u64 + 10)).collect();
        let mut buf = Vec::new();
        encode(&mut buf, AckKind::Settled, &ids);
        assert_eq!(buf.len(), 2 * BATCH_HEADER_LEN + ids.len() * 8);
        assert_eq!(parse(&buf).settled.len(), ids.len());
    }

    #[test]
    fn torn_tail_is_detected_at_every_cut() {
        let mut buf = Vec::new();
        encode(&mut buf, AckKind::Settled, &[10, 11]);
        let first = buf.len();
        encode(&mut buf, AckKind::Settled, &[12, 13, 14]);
        for cut in first..buf.len() {
            let st = parse(&buf[..cut]);
            assert_eq!(st.good_end, first, "cut {cut}");
            assert_eq!(st.settled, HashSet::from([10, 11]));
        }
    }

    #[test]
    fn damaged_middle_batch_is_skipped() {
        let mut buf = Vec::new();
        encode(&mut buf, AckKind::Settled, &[1]);
        let second = buf.len();
        encode(&mut buf, AckKind::Settled, &[2]);
        encode(&mut buf, AckKind::Settled, &[3]);
        buf[second + BATCH_HEADER_LEN] ^= 0xff;
        let st = parse(&buf);
        assert_eq!(st.settled, HashSet::from([1, 3]));
        assert_eq!(st.damaged, vec![second]);
        assert_eq!(st.good_end, buf.len());
    }
}
