//! The record a deduplicating exchange's cache stores: a remembered key and when it expires.
//!
//! On disk it is laid out as a message record ([`StoredMessage`]) whose routing-key slot holds the key and
//! whose other fields are empty: caches written before this type existed stored their keys as such
//! messages, and they read back unchanged (and what is written now reads back as one of those).

use super::record::{Record, StoredMessage};
use bytes::Bytes;

/// One remembered deduplication key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Admission number (the record header's id).
    pub id: u64,
    /// The canonical key ([`crate::message::headers::dedup_key`]).
    pub key: String,
    /// When it is forgotten (ms since the Unix epoch), if it expires.
    pub expires_at_ms: Option<u64>,
}

impl KeyRecord {
    /// The message-record form of this key (the layout on disk).
    fn as_message(&self) -> StoredMessage {
        StoredMessage {
            id: self.id,
            exchange: String::new(),
            routing_key: self.key.clone(),
            properties: Bytes::new(),
            body: Bytes::new(),
            expires_at_ms: self.expires_at_ms,
            delivery_count: 0,
        }
    }
}

impl Record for KeyRecord {
    fn id(&self) -> u64 {
        self.id
    }
    fn payload_len(&self) -> usize {
        // Flags, delivery count, the expiry if any, three length prefixes, the key.
        1 + 4 + if self.expires_at_ms.is_some() { 8 } else { 0 } + 12 + self.key.len()
    }
    fn encode_payload(&self, out: &mut Vec<u8>) {
        // Keys are admitted once per new value, off the plain publish path: the copy is not on a hot path.
        self.as_message().encode_payload(out)
    }
    fn decode(id: u64, payload: Bytes) -> Result<Self, &'static str> {
        let m = StoredMessage::decode(id, payload)?;
        Ok(KeyRecord { id, key: m.routing_key, expires_at_ms: m.expires_at_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key record is byte for byte the message record older caches wrote, both ways.
    #[test]
    fn a_key_record_is_laid_out_as_the_message_record_older_caches_wrote() {
        for expires_at_ms in [None, Some(1_700_000_000_123)] {
            let key = KeyRecord { id: 7, key: "s:order-42".into(), expires_at_ms };
            let old = StoredMessage { id: 7, routing_key: "s:order-42".into(), expires_at_ms, ..Default::default() };
            let (mut new_bytes, mut old_bytes) = (Vec::new(), Vec::new());
            key.encode_record(&mut new_bytes);
            old.encode_record(&mut old_bytes);
            assert_eq!(new_bytes, old_bytes);
            assert_eq!(key.record_len(), old.record_len());
            assert_eq!(KeyRecord::decode_record(&old_bytes).unwrap(), key);
        }
    }
}
