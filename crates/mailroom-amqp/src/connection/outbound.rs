//! The outbound buffer: frames encoded for the client, gathered into one batch for the writer per turn.
//!
//! Small frames are encoded into one growing `BytesMut`; bodies of at least [`codec::SHARED_BODY_MIN`] bytes go
//! out as slices of the message's own `Bytes` ("sealed" chunks), so a large message is never copied.

use super::writer::Batch;
use crate::codec::{self, Method};
use bytes::{Bytes, BytesMut};

/// Outbound bytes gathered before handing a batch to the writer.
const BATCH_BYTES: usize = 256 * 1024;
/// A heartbeat frame (type 8, channel 0, no payload, frame end), sent as a static chunk when nothing else is
/// waiting, so a quiet connection's heartbeats need no buffer of their own.
static HEARTBEAT_FRAME: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];
/// [`HEARTBEAT_FRAME`] as a chunk, for a batch that starts with one (see [`Batch::heartbeat_first`]).
pub(super) static HEARTBEAT_CHUNK: Bytes = Bytes::from_static(&HEARTBEAT_FRAME);

/// Encoded frames not yet handed to the writer, in wire order: `sealed` first, then `buf`.
pub(super) struct Outbound {
    buf: BytesMut,
    /// Sealed outbound chunks (large bodies sent as slices of their own `Bytes`), written before `buf`.
    sealed: Vec<Bytes>,
    /// Bytes in `sealed`.
    sealed_bytes: usize,
    /// Outbound credit held by the deliveries encoded here (see [`Outbound::delivery_credit`]).
    credit: u64,
    /// A heartbeat comes first, before `sealed` and `buf` (a quiet connection's heartbeat: no `Vec`, no buffer).
    heartbeat_first: bool,
}

impl Outbound {
    /// An empty buffer.
    pub(super) fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(1024),
            sealed: Vec::new(),
            sealed_bytes: 0,
            credit: 0,
            heartbeat_first: false,
        }
    }

    /// Nothing is waiting.
    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.sealed.is_empty() && !self.heartbeat_first
    }

    /// Enough is waiting to hand a batch to the writer before reading on.
    pub(super) fn is_full(&self) -> bool {
        self.buf.len() + self.sealed_bytes >= BATCH_BYTES
    }

    /// Takes everything waiting, in wire order, with the credit its deliveries hold.
    pub(super) fn take_batch(&mut self) -> Batch {
        let chunks = std::mem::take(&mut self.sealed);
        self.sealed_bytes = 0;
        let tail = if self.buf.is_empty() { bytes::Bytes::new() } else { self.buf.split().freeze() };
        let heartbeat_first = std::mem::take(&mut self.heartbeat_first);
        Batch { heartbeat_first, chunks, tail, credit: std::mem::take(&mut self.credit) }
    }

    /// A delivery holding `bytes` of the connection's outbound credit was encoded here: the credit goes back
    /// once the batch is written.
    pub(super) fn delivery_credit(&mut self, bytes: u64) {
        self.credit += bytes;
    }

    /// Where the next frame will start, to [`Outbound::truncate`] back to.
    pub(super) fn mark(&self) -> usize {
        self.buf.len()
    }

    /// Drops the frames appended since `mark` (none of them may have been a large body).
    pub(super) fn truncate(&mut self, mark: usize) {
        self.buf.truncate(mark);
    }

    /// The raw buffer, for the codec's hand-written per-message encoders.
    pub(super) fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends a method frame.
    pub(super) fn method(&mut self, channel: u16, method: &Method) {
        codec::write_method(&mut self.buf, channel, method);
    }

    /// Appends a heartbeat frame.
    pub(super) fn heartbeat(&mut self) {
        if self.is_empty() {
            // Nothing else waiting: the batch starts with the static heartbeat, nothing allocated.
            self.heartbeat_first = true;
        } else if self.buf.is_empty() {
            // Nothing in `buf` to keep the order with (sealed chunks go first).
            self.sealed.push(Bytes::from_static(&HEARTBEAT_FRAME));
            self.sealed_bytes += HEARTBEAT_FRAME.len();
        } else {
            codec::write_heartbeat(&mut self.buf);
        }
    }

    /// Gives the buffer's memory back while nothing is waiting: a quiet connection then holds none (its
    /// heartbeats are static chunks), and the next frame allocates what it needs.
    pub(super) fn park(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Appends our protocol header (the answer to a client speaking another protocol version).
    pub(super) fn protocol_header(&mut self) {
        self.buf.extend_from_slice(codec::PROTOCOL_HEADER);
    }

    /// Appends a content header and the body frames after it.
    pub(super) fn content(&mut self, channel: u16, raw_properties: &[u8], body: &Bytes, frame_max: u32) {
        codec::write_content_header(
            &mut self.buf,
            channel,
            codec::ids::class::BASIC,
            body.len() as u64,
            raw_properties,
        );
        self.body(channel, body, frame_max);
    }

    /// Appends body frames: large bodies go out as slices of the message's own buffer (no copy).
    fn body(&mut self, channel: u16, body: &Bytes, frame_max: u32) {
        if body.len() < codec::SHARED_BODY_MIN {
            codec::write_body(&mut self.buf, channel, body, frame_max);
            return;
        }
        let before = self.sealed.len();
        codec::write_body_shared(&mut self.buf, &mut self.sealed, channel, body, frame_max);
        self.sealed_bytes += self.sealed[before..].iter().map(Bytes::len).sum::<usize>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{basic, split_frame, FrameKind, FRAME_MIN_SIZE};

    #[test]
    fn batches_keep_wire_order_and_share_large_bodies() {
        let mut out = Outbound::new();
        assert!(out.is_empty());
        out.method(1, &Method::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
        let large = Bytes::from(vec![7u8; codec::SHARED_BODY_MIN + 10]);
        out.content(1, &[0, 0], &large, FRAME_MIN_SIZE);
        out.heartbeat();
        assert!(!out.is_empty() && !out.is_full());
        out.delivery_credit(5);
        let batch = out.take_batch();
        assert!(out.is_empty());
        assert_eq!(batch.credit, 5);
        assert_eq!(out.take_batch().credit, 0, "taken with its batch");
        let batch: Vec<Bytes> = batch.iter().cloned().collect();
        let mut wire = BytesMut::new();
        for chunk in &batch {
            wire.extend_from_slice(chunk);
        }
        let mut kinds = Vec::new();
        let mut body = Vec::new();
        while let Some(f) = split_frame(&mut wire, FRAME_MIN_SIZE).unwrap() {
            if f.kind == FrameKind::Body {
                body.extend_from_slice(&f.payload);
            }
            kinds.push(f.kind);
        }
        assert_eq!(kinds.first(), Some(&FrameKind::Method));
        assert_eq!(kinds[1], FrameKind::Header);
        assert_eq!(kinds.last(), Some(&FrameKind::Heartbeat));
        assert_eq!(body, large.to_vec());
        assert!(batch.iter().any(|c| large.as_ptr_range().contains(&c.as_ptr())), "the large body is not copied");
    }

    #[test]
    fn heartbeats_need_no_buffer_and_keep_their_place() {
        let mut expected = BytesMut::new();
        codec::write_heartbeat(&mut expected);
        assert_eq!(HEARTBEAT_FRAME[..], expected[..]);

        let mut out = Outbound::new();
        out.park();
        assert_eq!(out.buf.capacity(), 0);
        out.heartbeat();
        assert_eq!(out.buf.capacity(), 0, "a heartbeat alone allocates nothing");
        let lone = out.take_batch();
        assert!(lone.heartbeat_first && lone.chunks.capacity() == 0 && lone.tail.is_empty(), "not even a Vec");
        assert_eq!(lone.iter().map(|c| c.to_vec()).collect::<Vec<_>>(), [HEARTBEAT_FRAME.to_vec()]);
        out.heartbeat();
        out.method(1, &Method::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
        out.heartbeat();
        let mut wire = BytesMut::new();
        for chunk in out.take_batch().iter() {
            wire.extend_from_slice(chunk);
        }
        let mut kinds = Vec::new();
        while let Some(f) = split_frame(&mut wire, FRAME_MIN_SIZE).unwrap() {
            kinds.push(f.kind);
        }
        assert_eq!(kinds, [FrameKind::Heartbeat, FrameKind::Method, FrameKind::Heartbeat]);
    }

    #[test]
    fn truncate_drops_what_followed_the_mark() {
        let mut out = Outbound::new();
        out.heartbeat();
        let mark = out.mark();
        out.method(1, &Method::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
        out.truncate(mark);
        let batch = out.take_batch();
        assert_eq!(batch.iter().map(Bytes::len).sum::<usize>(), 8, "one heartbeat frame");
    }
}
