//! Hand-rolled encoding and scanning of the hot AMQP frames.
//!
//! The bench must never be the bottleneck, so the per-message paths avoid amq-protocol (which
//! allocates per method) entirely: a publish is encoded once into a template, a batch buffer holds
//! many copies of it and only the timestamp and sequence number are patched before each write,
//! and deliveries are found by walking frame headers straight out of the read buffer.

use super::BenchError;

/// Frame type octet of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type octet of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type octet of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type octet of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that must terminate every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes a frame adds around its payload: type, channel, size and the end octet.
pub const FRAME_OVERHEAD: usize = 8;
/// Class id of `basic`.
pub const CLASS_BASIC: u16 = 60;
/// Method id of `basic.publish`.
pub const METHOD_PUBLISH: u16 = 40;
/// Method id of `basic.deliver`.
pub const METHOD_DELIVER: u16 = 60;
/// Method id of `basic.ack`.
pub const METHOD_ACK: u16 = 80;
/// Method id of `basic.nack`.
pub const METHOD_NACK: u16 = 120;
/// Body bytes the bench writes itself: an 8-byte send timestamp and an 8-byte sequence number.
pub const BODY_STAMP_LEN: usize = 16;
/// Largest frame we negotiate; RabbitMQ's default, and it bounds the scanner's look-ahead.
pub const MAX_FRAME: u32 = 131_072;
/// Property flag bit of `delivery-mode` in the basic content header.
const FLAG_DELIVERY_MODE: u16 = 0x1000;

fn put_shortstr(out: &mut Vec<u8>, s: &str) {
    // Short strings are length-prefixed by one octet; longer names would corrupt the frame.
    assert!(s.len() <= 255, "short string longer than 255 bytes: {s:?}");
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Starts a frame and returns the offset of its size field, patched by [`end_frame`].
fn begin_frame(out: &mut Vec<u8>, kind: u8, channel: u16) -> usize {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

fn end_frame(out: &mut Vec<u8>, size_at: usize) {
    let size = (out.len() - size_at - 4) as u32;
    out[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
}

/// Appends the content header and body frames of one message; returns the body's offset.
fn put_content(out: &mut Vec<u8>, channel: u16, size: usize, persistent: bool, frame_max: u32) -> usize {
    let at = begin_frame(out, FRAME_HEADER, channel);
    out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes()); // weight, always 0
    out.extend_from_slice(&(size as u64).to_be_bytes());
    out.extend_from_slice(&FLAG_DELIVERY_MODE.to_be_bytes());
    out.push(if persistent { 2 } else { 1 });
    end_frame(out, at);
    // Bodies larger than the negotiated frame size must be split; the stamp is in the first frame.
    let chunk = effective_frame_max(frame_max) as usize - FRAME_OVERHEAD;
    let mut body_at = None;
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk);
        let at = begin_frame(out, FRAME_BODY, channel);
        body_at.get_or_insert(out.len());
        // Filler is a recognisable pattern rather than zeros so a broken parser shows up in tests.
        out.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        end_frame(out, at);
        left -= n;
    }
    body_at.unwrap_or(out.len())
}

/// The frame size actually used: 0 means "no limit" in tune, but we never exceed [`MAX_FRAME`].
pub fn effective_frame_max(frame_max: u32) -> u32 {
    if frame_max == 0 {
        MAX_FRAME
    } else {
        frame_max.min(MAX_FRAME)
    }
}

/// One message (method + header + body frames) encoded once, with the stamp's offset recorded.
#[derive(Debug, Clone)]
pub struct Template {
    /// The encoded frames of one message.
    pub bytes: Vec<u8>,
    /// Offset of the body's first byte (the timestamp) within `bytes`.
    pub stamp_at: usize,
    /// Offset of the delivery tag within `bytes` (deliveries only; 0 for publishes).
    pub tag_at: usize,
}

impl Template {
    /// Encodes `basic.publish` plus content; `size` must be at least [`BODY_STAMP_LEN`].
    pub fn publish(
        channel: u16,
        exchange: &str,
        routing_key: &str,
        size: usize,
        persistent: bool,
        frame_max: u32,
    ) -> Self {
        assert!(size >= BODY_STAMP_LEN);
        let mut out = Vec::with_capacity(size + 128);
        let at = begin_frame(&mut out, FRAME_METHOD, channel);
        out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        out.extend_from_slice(&METHOD_PUBLISH.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes()); // reserved-1 (ticket)
        put_shortstr(&mut out, exchange);
        put_shortstr(&mut out, routing_key);
        out.push(0); // mandatory = immediate = false
        end_frame(&mut out, at);
        let stamp_at = put_content(&mut out, channel, size, persistent, frame_max);
        Template { bytes: out, stamp_at, tag_at: 0 }
    }

    /// Encodes `basic.deliver` plus content, as a broker would send it (used by `--source`).
    pub fn deliver(
        channel: u16,
        consumer_tag: &str,
        exchange: &str,
        routing_key: &str,
        size: usize,
        frame_max: u32,
    ) -> Self {
        assert!(size >= BODY_STAMP_LEN);
        let mut out = Vec::with_capacity(size + 128);
        let at = begin_frame(&mut out, FRAME_METHOD, channel);
        out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
        out.extend_from_slice(&METHOD_DELIVER.to_be_bytes());
        put_shortstr(&mut out, consumer_tag);
        let tag_at = out.len();
        out.extend_from_slice(&1u64.to_be_bytes());
        out.push(0); // redelivered = false
        put_shortstr(&mut out, exchange);
        put_shortstr(&mut out, routing_key);
        end_frame(&mut out, at);
        let stamp_at = put_content(&mut out, channel, size, false, frame_max);
        Template { bytes: out, stamp_at, tag_at }
    }
}

/// A write buffer pre-filled with copies of a [`Template`], so a batch costs only the patches.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    msg_len: usize,
    stamp_at: usize,
    tag_at: usize,
    capacity: usize,
}

impl Batch {
    /// Fills a buffer with `capacity` copies of `template` (done once per producer).
    pub fn new(template: &Template, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let mut buf = Vec::with_capacity(template.bytes.len() * capacity);
        for _ in 0..capacity {
            buf.extend_from_slice(&template.bytes);
        }
        Batch { buf, msg_len: template.bytes.len(), stamp_at: template.stamp_at, tag_at: template.tag_at, capacity }
    }

    /// How many messages fit in one batch.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Patches the first `n` messages (stamp `ts_ns`, sequence from `first_seq`) and returns them.
    ///
    /// One timestamp per batch: the batch leaves in one write, so per-message clock reads would
    /// cost time without adding accuracy.
    pub fn fill(&mut self, n: usize, ts_ns: u64, first_seq: u64) -> &[u8] {
        let n = n.min(self.capacity);
        let ts = ts_ns.to_be_bytes();
        for i in 0..n {
            let base = i * self.msg_len;
            let seq = first_seq + i as u64;
            let s = base + self.stamp_at;
            self.buf[s..s + 8].copy_from_slice(&ts);
            self.buf[s + 8..s + 16].copy_from_slice(&seq.to_be_bytes());
            if self.tag_at != 0 {
                // For deliveries the sequence doubles as the delivery tag (1-based).
                let t = base + self.tag_at;
                self.buf[t..t + 8].copy_from_slice(&(seq + 1).to_be_bytes());
            }
        }
        &self.buf[..n * self.msg_len]
    }
}

/// Appends a `basic.ack` method frame (consumer acks and the fake peer's confirms).
pub fn put_ack(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, multiple: bool) {
    let at = begin_frame(out, FRAME_METHOD, channel);
    out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    out.extend_from_slice(&METHOD_ACK.to_be_bytes());
    out.extend_from_slice(&delivery_tag.to_be_bytes());
    out.push(multiple as u8);
    end_frame(out, at);
}

/// What the scanner found in the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete `basic.deliver` message; `stamp` is the body's send timestamp if present.
    Delivery {
        /// Channel the delivery arrived on.
        channel: u16,
        /// The broker's delivery tag, needed to ack.
        tag: u64,
        /// Send timestamp (ns since the process epoch) from the first 8 body bytes.
        stamp: Option<u64>,
    },
    /// A `basic.ack` or `basic.nack` from the broker (publisher confirms), decoded by hand.
    Confirm {
        /// Highest delivery tag covered.
        tag: u64,
        /// Whether all tags up to `tag` are covered.
        multiple: bool,
        /// True for `basic.nack`.
        nack: bool,
    },
    /// Any other method frame: the raw payload (class id onwards) for amq-protocol to parse.
    Method {
        /// Channel of the method.
        channel: u16,
        /// Class id.
        class: u16,
        /// Method id.
        method: u16,
        /// The whole method payload, class id included.
        payload: &'a [u8],
    },
    /// A heartbeat frame.
    Heartbeat,
    /// A publish the fake sink counted (only reported when `count_publishes` is set).
    Published,
}

/// Content state carried between frames, because a message spans several frames and reads.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    channel: u16,
    tag: u64,
    /// Body bytes still expected; `None` until the content header arrived.
    remaining: Option<u64>,
    stamp: Option<u64>,
    seen_body: bool,
    /// True for a `basic.publish` (seen by the fake sink), false for a `basic.deliver`.
    publish: bool,
}

/// Walks complete frames in a byte buffer, tracking message content across calls.
///
/// It only ever consumes whole frames: a partial frame at the end of the buffer is left for the
/// caller to keep and extend with the next read, which is why it can run straight on the socket's
/// read buffer without copying frames out.
#[derive(Debug, Default)]
pub struct Scanner {
    pending: Option<Pending>,
    max_frame: usize,
}

impl Scanner {
    /// A scanner that rejects frames with payloads larger than `frame_max`.
    pub fn new(frame_max: u32) -> Self {
        Scanner { pending: None, max_frame: effective_frame_max(frame_max) as usize }
    }

    /// Scans whole frames of `buf`, calling `on` for each event; returns the bytes consumed.
    ///
    /// `basic.publish` content is skipped (the fake sink counts publishes via [`Frame::Published`]).
    pub fn scan<F>(&mut self, buf: &[u8], mut on: F) -> Result<usize, BenchError>
    where
        F: FnMut(Frame<'_>) -> Result<(), BenchError>,
    {
        let mut pos = 0;
        while buf.len() - pos >= 7 {
            let kind = buf[pos];
            let channel = u16::from_be_bytes([buf[pos + 1], buf[pos + 2]]);
            let size = u32::from_be_bytes([buf[pos + 3], buf[pos + 4], buf[pos + 5], buf[pos + 6]]) as usize;
            // Checked before waiting for the rest, so garbage cannot make us buffer forever.
            if size > self.max_frame {
                return Err(BenchError::Protocol(format!("frame of {size} bytes exceeds frame_max")));
            }
            let end = pos + 7 + size;
            if end >= buf.len() {
                break; // incomplete: wait for more bytes
            }
            if buf[end] != FRAME_END {
                return Err(BenchError::Protocol(format!("bad frame end octet {:#x}", buf[end])));
            }
            let payload = &buf[pos + 7..end];
            pos = end + 1;
            match kind {
                FRAME_METHOD => self.method(channel, payload, &mut on)?,
                FRAME_HEADER => {
                    if payload.len() < 12 {
                        return Err(BenchError::Protocol("short content header".into()));
                    }
                    let size = u64::from_be_bytes(payload[4..12].try_into().unwrap());
                    match self.pending.as_mut() {
                        Some(p) => {
                            p.remaining = Some(size);
                            if size == 0 {
                                self.complete(&mut on)?;
                            }
                        }
                        None => return Err(BenchError::Protocol("header without method".into())),
                    }
                }
                FRAME_BODY => {
                    let Some(p) = self.pending.as_mut() else {
                        return Err(BenchError::Protocol("body without method".into()));
                    };
                    let Some(rem) = p.remaining else {
                        return Err(BenchError::Protocol("body before header".into()));
                    };
                    if !p.seen_body {
                        p.seen_body = true;
                        if payload.len() >= 8 {
                            p.stamp = Some(u64::from_be_bytes(payload[..8].try_into().unwrap()));
                        }
                    }
                    let rem = rem.saturating_sub(payload.len() as u64);
                    p.remaining = Some(rem);
                    if rem == 0 {
                        self.complete(&mut on)?;
                    }
                }
                FRAME_HEARTBEAT => on(Frame::Heartbeat)?,
                other => return Err(BenchError::Protocol(format!("unknown frame type {other}"))),
            }
        }
        Ok(pos)
    }

    fn complete<F>(&mut self, on: &mut F) -> Result<(), BenchError>
    where
        F: FnMut(Frame<'_>) -> Result<(), BenchError>,
    {
        let p = self.pending.take().expect("pending content");
        if p.publish {
            // A publish: the fake sink only wants to count it.
            on(Frame::Published)
        } else {
            on(Frame::Delivery { channel: p.channel, tag: p.tag, stamp: p.stamp })
        }
    }

    fn method<F>(&mut self, channel: u16, payload: &[u8], on: &mut F) -> Result<(), BenchError>
    where
        F: FnMut(Frame<'_>) -> Result<(), BenchError>,
    {
        if payload.len() < 4 {
            return Err(BenchError::Protocol("short method frame".into()));
        }
        let class = u16::from_be_bytes([payload[0], payload[1]]);
        let method = u16::from_be_bytes([payload[2], payload[3]]);
        if self.pending.is_some() {
            return Err(BenchError::Protocol("method frame inside content".into()));
        }
        match (class, method) {
            (CLASS_BASIC, METHOD_DELIVER) => {
                // consumer-tag shortstr, then the delivery tag.
                let ct = *payload.get(4).ok_or_else(short)? as usize;
                let t = 5 + ct;
                let tag = u64::from_be_bytes(payload.get(t..t + 8).ok_or_else(short)?.try_into().unwrap());
                self.pending = Some(Pending { channel, tag, ..Pending::default() });
                Ok(())
            }
            (CLASS_BASIC, METHOD_PUBLISH) => {
                self.pending = Some(Pending { channel, publish: true, ..Pending::default() });
                Ok(())
            }
            (CLASS_BASIC, METHOD_ACK) | (CLASS_BASIC, METHOD_NACK) => {
                let tag = u64::from_be_bytes(payload.get(4..12).ok_or_else(short)?.try_into().unwrap());
                let bits = *payload.get(12).ok_or_else(short)?;
                on(Frame::Confirm { tag, multiple: bits & 1 == 1, nack: method == METHOD_NACK })
            }
            _ => on(Frame::Method { channel, class, method, payload }),
        }
    }
}

fn short() -> BenchError {
    BenchError::Protocol("truncated method frame".into())
}

/// A socket read buffer that keeps a partial trailing frame for the next read.
#[derive(Debug)]
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// A buffer of `cap` bytes; must exceed the largest frame.
    pub fn new(cap: usize) -> Self {
        ReadBuf { buf: vec![0; cap], start: 0, end: 0 }
    }

    /// Bytes read but not yet consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks `n` bytes of [`Self::data`] as consumed.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space to read into; moves a kept partial frame to the front only when needed.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < MAX_FRAME as usize + FRAME_OVERHEAD && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`Self::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{parse_frame, AMQPFrame};
    use amq_protocol::protocol::{basic, AMQPClass};

    /// Parses every frame of `bytes` with amq-protocol, the independent reference.
    fn parse_all(mut bytes: &[u8]) -> Vec<AMQPFrame> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (rest, f) = parse_frame(bytes).expect("amq-protocol parses our frame");
            out.push(f);
            bytes = rest;
        }
        out
    }

    #[test]
    fn publish_template_parses_back() {
        for (size, persistent, frame_max) in [(16, false, 131_072), (1024, true, 131_072), (300_000, false, 4096)] {
            let t = Template::publish(1, "ex", "rk", size, persistent, frame_max);
            let frames = parse_all(&t.bytes);
            match &frames[0] {
                AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p))) => {
                    assert_eq!(p.exchange.as_str(), "ex");
                    assert_eq!(p.routing_key.as_str(), "rk");
                    assert!(!p.mandatory && !p.immediate);
                }
                other => panic!("not a publish: {other:?}"),
            }
            match &frames[1] {
                AMQPFrame::Header(1, h) => {
                    assert_eq!(h.class_id, 60);
                    assert_eq!(h.body_size, size as u64);
                    assert_eq!(h.properties.delivery_mode(), &Some(if persistent { 2 } else { 1 }));
                }
                other => panic!("not a header: {other:?}"),
            }
            let body: usize = frames[2..]
                .iter()
                .map(|f| match f {
                    AMQPFrame::Body(1, b) => {
                        assert!(b.len() + FRAME_OVERHEAD <= frame_max as usize);
                        b.len()
                    }
                    other => panic!("not a body: {other:?}"),
                })
                .sum();
            assert_eq!(body, size);
            assert_eq!(frames.len(), 2 + size.div_ceil(frame_max as usize - FRAME_OVERHEAD));
        }
    }

    #[test]
    fn batch_patches_stamp_and_sequence() {
        let t = Template::publish(1, "", "q", 32, false, MAX_FRAME);
        let mut b = Batch::new(&t, 4);
        let bytes = b.fill(3, 0x1122_3344_5566_7788, 10).to_vec();
        assert_eq!(bytes.len(), 3 * t.bytes.len());
        let frames = parse_all(&bytes);
        for (i, f) in frames.iter().filter(|f| matches!(f, AMQPFrame::Body(..))).enumerate() {
            let AMQPFrame::Body(_, body) = f else { unreachable!() };
            assert_eq!(&body[..8], &0x1122_3344_5566_7788u64.to_be_bytes());
            assert_eq!(&body[8..16], &(10 + i as u64).to_be_bytes());
        }
    }

    #[test]
    fn deliver_template_and_ack_parse_back() {
        let t = Template::deliver(1, "ctag", "ex", "rk", 64, MAX_FRAME);
        let mut b = Batch::new(&t, 1);
        let frames = parse_all(b.fill(1, 5, 41));
        match &frames[0] {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                assert_eq!(d.consumer_tag.as_str(), "ctag");
                assert_eq!(d.delivery_tag, 42);
                assert_eq!(d.routing_key.as_str(), "rk");
            }
            other => panic!("not a deliver: {other:?}"),
        }
        let mut ack = Vec::new();
        put_ack(&mut ack, 1, 77, true);
        match &parse_all(&ack)[0] {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
                assert_eq!((a.delivery_tag, a.multiple), (77, true));
            }
            other => panic!("not an ack: {other:?}"),
        }
    }

    /// Owned form of the scanner's events, for comparing runs.
    fn events(scanner: &mut Scanner, chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for c in chunks {
            pending.extend_from_slice(c);
            let used = scanner
                .scan(&pending, |f| {
                    out.push(format!("{f:?}"));
                    Ok(())
                })
                .unwrap();
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "left {} bytes", pending.len());
        out
    }

    fn stream() -> Vec<u8> {
        // Two single-frame messages, one split over three body frames, a confirm and a method.
        let mut s = Vec::new();
        let small = Template::deliver(1, "c", "", "q", 16, MAX_FRAME);
        s.extend_from_slice(Batch::new(&small, 2).fill(2, 1000, 0));
        let big = Template::deliver(1, "c", "", "q", 100, 48);
        s.extend_from_slice(Batch::new(&big, 1).fill(1, 2000, 6));
        put_ack(&mut s, 1, 9, false);
        s.extend_from_slice(&super::super::conn::method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        ));
        s
    }

    #[test]
    fn scanner_finds_deliveries() {
        let s = stream();
        let got = events(&mut Scanner::new(MAX_FRAME), &[&s]);
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], format!("{:?}", Frame::Delivery { channel: 1, tag: 1, stamp: Some(1000) }));
        assert_eq!(got[1], format!("{:?}", Frame::Delivery { channel: 1, tag: 2, stamp: Some(1000) }));
        assert_eq!(got[2], format!("{:?}", Frame::Delivery { channel: 1, tag: 7, stamp: Some(2000) }));
        assert_eq!(got[3], format!("{:?}", Frame::Confirm { tag: 9, multiple: false, nack: false }));
        assert!(got[4].starts_with("Method { channel: 1, class: 60, method: 11"));
    }

    #[test]
    fn scanner_handles_a_split_at_every_byte() {
        let s = stream();
        let whole = events(&mut Scanner::new(MAX_FRAME), &[&s]);
        for cut in 0..=s.len() {
            let got = events(&mut Scanner::new(MAX_FRAME), &[&s[..cut], &s[cut..]]);
            assert_eq!(got, whole, "split at {cut}");
        }
        // And one byte at a time.
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(events(&mut Scanner::new(MAX_FRAME), &bytes), whole);
    }

    #[test]
    fn scanner_counts_publishes_and_rejects_garbage() {
        let t = Template::publish(1, "", "q", 16, false, MAX_FRAME);
        let b = Batch::new(&t, 3).fill(3, 0, 0).to_vec();
        let mut n = 0;
        let used = Scanner::new(MAX_FRAME)
            .scan(&b, |f| {
                assert_eq!(f, Frame::Published);
                n += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!((used, n), (b.len(), 3));
        let mut bad = b.clone();
        let end = t.bytes.iter().position(|&x| x == FRAME_END).unwrap();
        bad[end] = 0;
        assert!(Scanner::new(MAX_FRAME).scan(&bad, |_| Ok(())).is_err());
        let huge = [FRAME_BODY, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(Scanner::new(MAX_FRAME).scan(&huge, |_| Ok(())).is_err());
    }
}
