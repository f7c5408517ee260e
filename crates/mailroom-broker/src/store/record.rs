//! The on-disk record format and the scanner that reads segments back.
//!
//! A record is a 28-byte header followed by an opaque payload (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `0x4D52_5243` (bytes `C R R M`) |
//! | 4 | 1 | format version (1) |
//! | 5 | 3 | reserved, zero |
//! | 8 | 8 | message id |
//! | 16 | 4 | payload length |
//! | 20 | 4 | CRC32 of the payload |
//! | 24 | 4 | CRC32 of header bytes 0..24 |
//!
//! The header CRC is checked before the length is trusted, so a corrupt length cannot swallow the
//! rest of a segment: the scanner then resyncs on the next magic whose header CRC checks.

use bytes::Bytes;

/// Marks the start of every record; what the scanner searches for when it resyncs.
pub const MAGIC: u32 = 0x4D52_5243;
/// The record format version written by this code.
pub const VERSION: u8 = 1;
/// Size of the fixed record header.
pub const HEADER_LEN: usize = 28;
/// Largest payload accepted: far above any AMQP frame_max-bounded message, far below u32 offsets.
pub const MAX_PAYLOAD: usize = 512 * 1024 * 1024;

/// A parsed, CRC-checked record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message id.
    pub id: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC32 of the payload.
    pub payload_crc: u32,
}

impl Header {
    /// Total size of the record (header and payload).
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// Appends one record (header and payload) to `out`, letting `fill` write the payload in place
/// so the payload is never built in a temporary buffer first.
pub fn encode_with(out: &mut Vec<u8>, id: u64, fill: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    fill(out);
    let payload_len = out.len() - start - HEADER_LEN;
    let payload_crc = crc32fast::hash(&out[start + HEADER_LEN..]);
    let h = &mut out[start..start + HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = VERSION;
    h[5..8].fill(0);
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h[16..20].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h[20..24].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&header_crc.to_le_bytes());
    HEADER_LEN + payload_len
}

/// Parses and checks a header at the start of `buf`; `None` if it is short, has no magic, an
/// unknown version, a bad CRC or an impossible length.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    if u32::from_le_bytes(buf[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let header_crc = u32::from_le_bytes(buf[24..28].try_into().ok()?);
    if crc32fast::hash(&buf[0..24]) != header_crc || buf[4] != VERSION {
        return None;
    }
    let len = u32::from_le_bytes(buf[16..20].try_into().ok()?);
    if len as usize > MAX_PAYLOAD {
        return None;
    }
    Some(Header {
        id: u64::from_le_bytes(buf[8..16].try_into().ok()?),
        len,
        payload_crc: u32::from_le_bytes(buf[20..24].try_into().ok()?),
    })
}

/// Whether `payload` matches the CRC in `header`.
pub fn payload_ok(header: &Header, payload: &[u8]) -> bool {
    payload.len() == header.len as usize && crc32fast::hash(payload) == header.payload_crc
}

/// One intact record found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedRecord {
    /// Offset of the record's header in the segment.
    pub offset: usize,
    /// Its header.
    pub header: Header,
}

/// A stretch of a segment that held no intact record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DamagedRange {
    /// Where the damage starts.
    pub offset: usize,
    /// How many bytes were skipped.
    pub len: usize,
    /// Why.
    pub reason: &'static str,
}

/// What scanning one segment found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Intact records, in file order.
    pub records: Vec<ScannedRecord>,
    /// Damaged records skipped in the middle (followed by an intact record).
    pub damaged: Vec<DamagedRange>,
    /// End of the last intact record: anything after it is a torn or damaged tail to cut off.
    pub good_end: usize,
}

/// Scans a whole segment. Never panics: every length is checked against the buffer.
pub fn scan(buf: &[u8]) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0usize;
    while pos < buf.len() {
        match parse_header(&buf[pos..]) {
            Some(h) if pos + h.record_len() <= buf.len() => {
                let payload = &buf[pos + HEADER_LEN..pos + h.record_len()];
                if payload_ok(&h, payload) {
                    out.records.push(ScannedRecord { offset: pos, header: h });
                    pos += h.record_len();
                    out.good_end = pos;
                } else {
                    // The header checked, so its length is trustworthy: skip exactly this record.
                    // If nothing intact follows, it is the torn tail and good_end stays before it.
                    out.damaged.push(DamagedRange { offset: pos, len: h.record_len(), reason: "payload CRC mismatch" });
                    pos += h.record_len();
                }
            }
            // A header that checks but runs past the end: a torn write of the last record.
            Some(_) => break,
            None => match resync(buf, pos + 1) {
                Some(next) => {
                    out.damaged.push(DamagedRange { offset: pos, len: next - pos, reason: "bad record header" });
                    pos = next;
                }
                None => break,
            },
        }
    }
    // Damage after the last intact record is the tail that gets cut, not a skipped record.
    out.damaged.retain(|d| d.offset < out.good_end);
    out
}

/// Finds the next offset at or after `from` holding a header whose magic and CRC check.
pub fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    let mut i = from;
    while i + HEADER_LEN <= buf.len() {
        // memchr-like search for the first magic byte keeps resync linear and quick.
        let rel = buf[i..buf.len() - HEADER_LEN + 1].iter().position(|&b| b == magic[0])?;
        i += rel;
        if buf[i..i + 4] == magic && parse_header(&buf[i..]).is_some() {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// A message as the store keeps it: what a durable queue needs to rebuild and redeliver it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredMessage {
    /// Broker-assigned message id (stored in the record header, not the payload).
    pub id: u64,
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Raw AMQP content-header property bytes, kept verbatim so redelivery re-sends them unchanged.
    pub properties: Bytes,
    /// The body.
    pub body: Bytes,
    /// Absolute expiry time (ms since the Unix epoch), so TTLs keep running across restarts.
    pub expires_at_ms: Option<u64>,
    /// Times delivered and requeued before the record was written (quorum-style delivery limits).
    pub delivery_count: u32,
}

// Payload layout: flags u8 (bit 0: expires_at_ms present), delivery_count u32, [expires_at_ms u64],
// exchange (u32 len + bytes), routing key (u32 len + bytes; dead-letter and CC keys can exceed 255),
// properties (u32 len + bytes), body (the rest).
const FLAG_EXPIRES: u8 = 1;

impl StoredMessage {
    /// Size of the encoded payload, for reserving buffer space.
    pub fn payload_len(&self) -> usize {
        1 + 4
            + if self.expires_at_ms.is_some() { 8 } else { 0 }
            + 12
            + self.exchange.len()
            + self.routing_key.len()
            + self.properties.len()
            + self.body.len()
    }

    /// Size of the whole record this message becomes.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Appends the payload encoding to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        out.reserve(self.payload_len());
        out.push(if self.expires_at_ms.is_some() { FLAG_EXPIRES } else { 0 });
        out.extend_from_slice(&self.delivery_count.to_le_bytes());
        if let Some(t) = self.expires_at_ms {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for part in [self.exchange.as_bytes(), self.routing_key.as_bytes(), &self.properties[..]] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&self.body);
    }

    /// Appends a whole record (header and payload) for this message to `out`; returns its length.
    pub fn encode_record(&self, out: &mut Vec<u8>) -> usize {
        out.reserve(self.record_len());
        encode_with(out, self.id, |o| self.encode_payload(o))
    }

    /// Decodes a payload; `properties` and `body` are zero-copy slices of `payload`.
    pub fn decode(id: u64, payload: Bytes) -> Result<StoredMessage, &'static str> {
        let mut p = 0usize;
        let take = |p: &mut usize, n: usize| -> Result<std::ops::Range<usize>, &'static str> {
            let end = p.checked_add(n).filter(|&e| e <= payload.len()).ok_or("payload too short")?;
            let r = *p..end;
            *p = end;
            Ok(r)
        };
        let flags = payload[take(&mut p, 1)?][0];
        if flags & !FLAG_EXPIRES != 0 {
            return Err("unknown payload flags");
        }
        let delivery_count = u32::from_le_bytes(payload[take(&mut p, 4)?].try_into().map_err(|_| "short")?);
        let expires_at_ms = if flags & FLAG_EXPIRES != 0 {
            Some(u64::from_le_bytes(payload[take(&mut p, 8)?].try_into().map_err(|_| "short")?))
        } else {
            None
        };
        let field = |p: &mut usize| -> Result<std::ops::Range<usize>, &'static str> {
            let n = u32::from_le_bytes(payload[take(p, 4)?].try_into().map_err(|_| "short")?);
            take(p, n as usize)
        };
        let exchange = field(&mut p)?;
        let routing_key = field(&mut p)?;
        let properties = field(&mut p)?;
        let exchange = std::str::from_utf8(&payload[exchange]).map_err(|_| "exchange not UTF-8")?.to_owned();
        let routing_key = std::str::from_utf8(&payload[routing_key]).map_err(|_| "routing key not UTF-8")?.to_owned();
        Ok(StoredMessage {
            id,
            exchange,
            routing_key,
            properties: payload.slice(properties),
            body: payload.slice(p..),
            expires_at_ms,
            delivery_count,
        })
    }

    /// Decodes a whole record (header and payload) from `buf`, checking both CRCs.
    pub fn decode_record(buf: &[u8]) -> Result<StoredMessage, &'static str> {
        let h = parse_header(buf).ok_or("bad record header")?;
        let payload = buf.get(HEADER_LEN..h.record_len()).ok_or("record truncated")?;
        if !payload_ok(&h, payload) {
            return Err("payload CRC mismatch");
        }
        StoredMessage::decode(h.id, Bytes::copy_from_slice(payload))
    }
}

/// A type the segment log stores as records: its id goes in the record header, the rest is the payload it
/// encodes and decodes. Messages ([`StoredMessage`]) and deduplication keys
/// ([`super::key_record::KeyRecord`]) are the two.
pub trait Record: Sized {
    /// The id written in the record header.
    fn id(&self) -> u64;
    /// Size of the encoded payload.
    fn payload_len(&self) -> usize;
    /// Appends the payload encoding to `out`.
    fn encode_payload(&self, out: &mut Vec<u8>);
    /// Decodes a payload (CRC already checked) of the record with header id `id`.
    fn decode(id: u64, payload: Bytes) -> Result<Self, &'static str>;

    /// Size of the whole record.
    fn record_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }
    /// Appends a whole record (header and payload) to `out`; returns its length.
    fn encode_record(&self, out: &mut Vec<u8>) -> usize {
        out.reserve(self.record_len());
        encode_with(out, self.id(), |o| self.encode_payload(o))
    }
    /// Decodes a whole record (header and payload) from `buf`, checking both CRCs.
    fn decode_record(buf: &[u8]) -> Result<Self, &'static str> {
        let h = parse_header(buf).ok_or("bad record header")?;
        let payload = buf.get(HEADER_LEN..h.record_len()).ok_or("record truncated")?;
        if !payload_ok(&h, payload) {
            return Err("payload CRC mismatch");
        }
        Self::decode(h.id, Bytes::copy_from_slice(payload))
    }
}

impl Record for StoredMessage {
    fn id(&self) -> u64 {
        self.id
    }
    fn payload_len(&self) -> usize {
        StoredMessage::payload_len(self)
    }
    fn encode_payload(&self, out: &mut Vec<u8>) {
        StoredMessage::encode_payload(self, out)
    }
    fn decode(id: u64, payload: Bytes) -> Result<Self, &'static str> {
        StoredMessage::decode(id, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64, body: &[u8]) -> StoredMessage {
        StoredMessage {
            id,
            exchange: "amq.direct".into(),
            routing_key: "k".repeat(300),
            properties: Bytes::from_static(&[0x80, 0x00, 2]),
            body: Bytes::copy_from_slice(body),
            expires_at_ms: if id.is_multiple_of(2) { Some(1_700_000_000_000 + id) } else { None },
            delivery_count: id as u32,
        }
    }

    #[test]
    fn message_round_trips_through_a_record() {
        for (id, body) in [(0u64, &b""[..]), (1, b"hello"), (2, &[0u8; 5000][..])] {
            let m = msg(id, body);
            let mut buf = Vec::new();
            let n = m.encode_record(&mut buf);
            assert_eq!(n, buf.len());
            assert_eq!(n, m.record_len());
            assert_eq!(StoredMessage::decode_record(&buf).unwrap(), m);
        }
    }

    #[test]
    fn header_checks_reject_every_single_byte_flip() {
        let mut buf = Vec::new();
        msg(7, b"body").encode_record(&mut buf);
        for i in 0..HEADER_LEN {
            let mut b = buf.clone();
            b[i] ^= 0x5a;
            assert!(parse_header(&b).is_none(), "flip at {i} accepted");
        }
        let mut b = buf.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        assert_eq!(StoredMessage::decode_record(&b), Err("payload CRC mismatch"));
    }

    #[test]
    fn scan_skips_damage_and_stops_at_torn_tail() {
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        for id in 0..5 {
            offsets.push(buf.len());
            msg(id, &vec![id as u8; 100 + id as usize]).encode_record(&mut buf);
        }
        let full = buf.len();
        // Corrupt record 1's length field (header) and record 3's body.
        buf[offsets[1] + 17] ^= 0xff;
        buf[offsets[3] + HEADER_LEN + 40] ^= 0xff;
        // Tear the last record.
        buf.truncate(full - 3);
        let s = scan(&buf);
        let ids: Vec<u64> = s.records.iter().map(|r| r.header.id).collect();
        assert_eq!(ids, vec![0, 2]);
        assert_eq!(s.good_end, offsets[3]);
        assert_eq!(s.damaged.len(), 1);
        assert_eq!(s.damaged[0].offset, offsets[1]);
        assert_eq!(s.damaged[0].len, offsets[2] - offsets[1]);
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let mut seed = 0x1234_5678_u64;
        for n in 0..2000usize {
            let len = n % 97;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = StoredMessage::decode(1, Bytes::from(data.clone()));
            let _ = scan(&data);
        }
    }
}
