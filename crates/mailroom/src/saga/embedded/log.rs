//! The embedded store's file format: a magic header, then records `[len: u32 LE][crc32: u32 LE][payload]`.
//!
//! A record is written with one `write` and fsynced before the transition counts as done. A crash can
//! leave only the last record torn (short, or whole length with a bad checksum); such a tail is
//! reported as [`Tail::Torn`] and cut off by the next writer. A bad record with more data after it is
//! not a torn write but damage: [`Tail::Corrupt`], and the store refuses to guess.

/// The first bytes of a saga log.
pub const MAGIC: &[u8; 8] = b"MRSAGA01";

/// Bytes before each payload: length and CRC-32.
const HEADER_LEN: usize = 8;

/// Largest payload accepted: a transition is a saga row, a history line and a few commands; a
/// larger length field is damage, not data.
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

/// Frames one payload.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// How the bytes after the last good record look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Nothing after it.
    Clean,
    /// A partial last record (a write cut by a crash): safe to cut off.
    Torn,
    /// A bad record followed by more data.
    Corrupt,
}

/// Splits `buf` into payloads; returns them, how many bytes they span, and what follows.
pub fn decode(buf: &[u8]) -> (Vec<&[u8]>, usize, Tail) {
    let mut records = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.is_empty() {
            return (records, at, Tail::Clean);
        }
        if rest.len() < HEADER_LEN {
            return (records, at, Tail::Torn);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_RECORD {
            return (records, at, Tail::Corrupt);
        }
        let end = HEADER_LEN + len;
        if rest.len() < end {
            return (records, at, Tail::Torn);
        }
        let payload = &rest[HEADER_LEN..end];
        if crc32fast::hash(payload) != crc {
            // The last record of the file with a bad checksum is a torn write; anything else is damage.
            let tail = if rest.len() == end { Tail::Torn } else { Tail::Corrupt };
            return (records, at, tail);
        }
        records.push(payload);
        at += end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_tail() {
        let mut buf = encode(b"one");
        buf.extend(encode(b"two"));
        let whole = buf.len();
        let (recs, used, tail) = decode(&buf);
        assert_eq!(recs, [b"one".as_slice(), b"two".as_slice()]);
        assert_eq!((used, tail), (whole, Tail::Clean));

        // Cut in the middle of the third record: the first two survive, the tail is torn.
        buf.extend(&encode(b"three")[..6]);
        let (recs, used, tail) = decode(&buf);
        assert_eq!(recs.len(), 2);
        assert_eq!((used, tail), (whole, Tail::Torn));
    }

    #[test]
    fn bad_checksum_last_is_torn_middle_is_corrupt() {
        let mut last = encode(b"one");
        let n = last.len();
        last[n - 1] ^= 0xff;
        assert_eq!(decode(&last).2, Tail::Torn);

        let mut middle = last.clone();
        middle.extend(encode(b"two"));
        let (recs, used, tail) = decode(&middle);
        assert!(recs.is_empty());
        assert_eq!((used, tail), (0, Tail::Corrupt));
    }
}
