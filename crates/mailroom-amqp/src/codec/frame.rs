//! Frame splitting and the frames that need no amq-protocol help (heartbeat, body).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{FRAME_END, FRAME_HEADER_LEN, FRAME_MIN_SIZE, FRAME_OVERHEAD};

const TYPE_METHOD: u8 = 1;
const TYPE_HEADER: u8 = 2;
const TYPE_BODY: u8 = 3;
const TYPE_HEARTBEAT: u8 = 8;

/// The four frame types of AMQP 0-9-1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A method frame (type 1).
    Method,
    /// A content header frame (type 2).
    Header,
    /// A content body frame (type 3).
    Body,
    /// A heartbeat frame (type 8); the caller checks it is on channel 0 with an empty payload.
    Heartbeat,
}

impl FrameKind {
    fn from_octet(t: u8) -> Option<Self> {
        match t {
            TYPE_METHOD => Some(Self::Method),
            TYPE_HEADER => Some(Self::Header),
            TYPE_BODY => Some(Self::Body),
            TYPE_HEARTBEAT => Some(Self::Heartbeat),
            _ => None,
        }
    }

    fn octet(self) -> u8 {
        match self {
            Self::Method => TYPE_METHOD,
            Self::Header => TYPE_HEADER,
            Self::Body => TYPE_BODY,
            Self::Heartbeat => TYPE_HEARTBEAT,
        }
    }
}

/// One frame split off the read buffer; `payload` is a zero-copy slice (BytesMut::split_to().freeze()).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Frame type.
    pub kind: FrameKind,
    /// Channel number from the frame header.
    pub channel: u16,
    /// Payload without header and frame-end octet.
    pub payload: Bytes,
}

/// Framing violations; all map to 501 FRAME_ERROR (connection close) by the caller.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Payload + 8 exceeds the negotiated frame_max; detected from the 7-byte header alone.
    #[error("frame of {size} payload bytes exceeds frame_max {max}")]
    TooLarge {
        /// Payload size announced in the header.
        size: u32,
        /// The frame_max it was checked against (whole frame, overhead included).
        max: u32,
    },
    /// The octet after the payload was not 0xCE.
    #[error("frame end octet is {0:#04x}, expected 0xce")]
    BadFrameEnd(u8),
    /// The type octet is not 1, 2, 3 or 8.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
}

/// A complete frame at the front of a read buffer, found by [`peek_frame`] and still in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Frame type.
    pub kind: FrameKind,
    /// Channel number from the frame header.
    pub channel: u16,
    /// Payload size from the frame header (the whole payload and the frame-end octet are in the buffer).
    pub size: u32,
}

impl FrameHead {
    /// The payload, read in place from the buffer [`peek_frame`] found it in (not split off).
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + self.size as usize]
    }
    /// The whole frame's length in the buffer: header, payload and frame-end octet.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.size as usize + 1
    }
}

/// Finds the complete frame at the front of `buf` without splitting it off; Ok(None) = need more bytes.
/// `frame_max` counts the whole frame incl. the 8 overhead bytes (a frame whose payload+8 > frame_max is
/// TooLarge).
///
/// `frame_max` is taken literally: a negotiated 0 ("no limit") must be resolved to the
/// server's own limit by the caller, or every frame is `TooLarge`. When only part of a
/// frame is present, `buf` is grown to fit it (the size is already known to be within
/// limits) so the socket read fills it without reallocating.
///
/// The caller then either reads the payload in place ([`FrameHead::payload`]) and advances `buf` by
/// [`FrameHead::frame_len`] (a method frame: its parser copies what it keeps, so no `Bytes` is cut), or
/// splits it off with [`take_frame`].
#[inline]
pub fn peek_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<FrameHead>, FrameError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = FrameKind::from_octet(buf[0]).ok_or(FrameError::UnknownType(buf[0]))?;
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    // u64: size + 8 overflows u32 for a hostile size field.
    if u64::from(size) + u64::from(FRAME_OVERHEAD) > u64::from(frame_max) {
        return Err(FrameError::TooLarge { size, max: frame_max });
    }
    let head = FrameHead { kind, channel, size };
    let total = head.frame_len();
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(FrameError::BadFrameEnd(end));
    }
    Ok(Some(head))
}

/// Splits the frame `head` (from [`peek_frame`] on this `buf`, not advanced since) off `buf`; its payload is a
/// zero-copy slice of the buffer.
#[inline]
pub fn take_frame(buf: &mut BytesMut, head: FrameHead) -> RawFrame {
    let mut frame = buf.split_to(head.frame_len());
    frame.advance(FRAME_HEADER_LEN);
    frame.truncate(head.size as usize);
    RawFrame { kind: head.kind, channel: head.channel, payload: frame.freeze() }
}

/// Split one complete frame off `buf`: [`peek_frame`], then [`take_frame`]. Ok(None) = need more bytes.
pub fn split_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<RawFrame>, FrameError> {
    Ok(peek_frame(buf, frame_max)?.map(|head| take_frame(buf, head)))
}

/// Append the 7-byte header of a frame whose payload is `size` bytes.
pub(super) fn put_frame_header(out: &mut BytesMut, kind: FrameKind, channel: u16, size: u32) {
    out.put_u8(kind.octet());
    out.put_u16(channel);
    out.put_u32(size);
}

/// Append a heartbeat frame (channel 0, empty payload).
pub fn write_heartbeat(out: &mut BytesMut) {
    put_frame_header(out, FrameKind::Heartbeat, 0, 0);
    out.put_u8(FRAME_END);
}

/// Append body frames, each payload at most frame_max - 8 bytes; nothing for an empty body.
///
/// A `frame_max` below the spec minimum (4096, which every peer must accept) is raised to
/// it, so a bad value can never mean zero-sized chunks and an endless loop.
pub fn write_body(out: &mut BytesMut, channel: u16, body: &[u8], frame_max: u32) {
    if body.is_empty() {
        return;
    }
    let chunk = (frame_max.max(FRAME_MIN_SIZE) - FRAME_OVERHEAD) as usize;
    let frames = body.len().div_ceil(chunk);
    out.reserve(body.len() + frames * FRAME_OVERHEAD as usize);
    for part in body.chunks(chunk) {
        // part.len() <= chunk < u32::MAX
        put_frame_header(out, FrameKind::Body, channel, part.len() as u32);
        out.extend_from_slice(part);
        out.put_u8(FRAME_END);
    }
}

/// Bodies at least this large are sent as slices of the message's own `Bytes` instead of being copied
/// into the outbound buffer: below it, one copy is cheaper than an extra write.
pub const SHARED_BODY_MIN: usize = 64 * 1024;

/// Appends body frames like [`write_body`], but without copying the body: each frame's 7-byte header goes
/// into `out`, then `out` is sealed onto `sealed` followed by a zero-copy slice of `body`, and the frame-end
/// octet starts the next part of `out`. Writing `sealed` in order, then `out`, gives the same bytes.
pub fn write_body_shared(out: &mut BytesMut, sealed: &mut Vec<Bytes>, channel: u16, body: &Bytes, frame_max: u32) {
    let chunk = (frame_max.max(FRAME_MIN_SIZE) - FRAME_OVERHEAD) as usize;
    let mut start = 0;
    while start < body.len() {
        let end = (start + chunk).min(body.len());
        put_frame_header(out, FrameKind::Body, channel, (end - start) as u32);
        sealed.push(out.split().freeze());
        sealed.push(body.slice(start..end));
        out.put_u8(FRAME_END);
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_body_frames_equal_copied_ones() {
        for len in [0usize, 1, 4088, 4089, 10_000, 300_000] {
            let body = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>());
            let mut copied = BytesMut::new();
            copied.extend_from_slice(b"pre");
            write_body(&mut copied, 3, &body, 4096);
            let mut out = BytesMut::new();
            out.extend_from_slice(b"pre");
            let mut sealed = Vec::new();
            write_body_shared(&mut out, &mut sealed, 3, &body, 4096);
            let mut joined: Vec<u8> = sealed.iter().flat_map(|b| b.iter().copied()).collect();
            joined.extend_from_slice(&out);
            assert_eq!(joined, copied.to_vec(), "len {len}");
        }
    }

    fn frame_bytes(t: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&channel.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(FRAME_END);
        v
    }

    #[test]
    fn complete_frame() {
        let mut buf = BytesMut::from(&frame_bytes(1, 7, b"hello")[..]);
        let f = split_frame(&mut buf, FRAME_MIN_SIZE).unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Method);
        assert_eq!(f.channel, 7);
        assert_eq!(&f.payload[..], b"hello");
        assert!(buf.is_empty());
        assert_eq!(split_frame(&mut buf, FRAME_MIN_SIZE).unwrap(), None);
    }

    #[test]
    fn partial_frame_at_every_split_point() {
        let bytes = frame_bytes(3, 1, b"some body bytes");
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(split_frame(&mut buf, FRAME_MIN_SIZE).unwrap(), None, "cut at {cut}");
            // Nothing consumed: the caller keeps reading into the same buffer.
            assert_eq!(&buf[..], &bytes[..cut]);
            buf.extend_from_slice(&bytes[cut..]);
            let f = split_frame(&mut buf, FRAME_MIN_SIZE).unwrap().unwrap();
            assert_eq!((f.kind, f.channel, &f.payload[..]), (FrameKind::Body, 1, &b"some body bytes"[..]));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn multiple_frames_in_one_buffer() {
        let mut bytes = frame_bytes(1, 1, b"m");
        bytes.extend(frame_bytes(2, 1, b"hh"));
        bytes.extend(frame_bytes(3, 1, b"bbb"));
        bytes.extend(frame_bytes(8, 0, b""));
        bytes.extend(&frame_bytes(1, 2, b"next")[..5]);
        let mut buf = BytesMut::from(&bytes[..]);
        let kinds: Vec<_> = std::iter::from_fn(|| split_frame(&mut buf, FRAME_MIN_SIZE).unwrap())
            .map(|f| (f.kind, f.payload.len()))
            .collect();
        assert_eq!(
            kinds,
            [(FrameKind::Method, 1), (FrameKind::Header, 2), (FrameKind::Body, 3), (FrameKind::Heartbeat, 0)]
        );
        assert_eq!(buf.len(), 5);
    }

    #[test]
    fn too_large_from_header_alone() {
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 0, 0x10, 0x00][..]); // 4096-byte payload
        assert_eq!(split_frame(&mut buf, FRAME_MIN_SIZE), Err(FrameError::TooLarge { size: 4096, max: 4096 }));
        // The boundary: payload + 8 == frame_max fits.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0, 0x0f, 0xf8][..]);
        assert_eq!(split_frame(&mut buf, FRAME_MIN_SIZE), Ok(None));
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0, 0x0f, 0xf9][..]);
        assert!(matches!(split_frame(&mut buf, FRAME_MIN_SIZE), Err(FrameError::TooLarge { size: 4089, .. })));
        // A hostile size does not overflow.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(split_frame(&mut buf, u32::MAX), Err(FrameError::TooLarge { size: u32::MAX, max: u32::MAX })));
    }

    #[test]
    fn bad_frame_end() {
        let mut bytes = frame_bytes(1, 1, b"abc");
        *bytes.last_mut().unwrap() = 0x00;
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(split_frame(&mut buf, FRAME_MIN_SIZE), Err(FrameError::BadFrameEnd(0)));
    }

    #[test]
    fn unknown_type() {
        let mut buf = BytesMut::from(&frame_bytes(4, 1, b"abc")[..]);
        assert_eq!(split_frame(&mut buf, FRAME_MIN_SIZE), Err(FrameError::UnknownType(4)));
        // A second protocol header mid-stream reads as frame type 'A'.
        let mut buf = BytesMut::from(&crate::codec::PROTOCOL_HEADER[..]);
        assert_eq!(split_frame(&mut buf, FRAME_MIN_SIZE), Err(FrameError::UnknownType(b'A')));
    }

    #[test]
    fn heartbeat() {
        let mut out = BytesMut::new();
        write_heartbeat(&mut out);
        assert_eq!(&out[..], &[8, 0, 0, 0, 0, 0, 0, 0xCE]);
        let f = split_frame(&mut out, FRAME_MIN_SIZE).unwrap().unwrap();
        assert_eq!((f.kind, f.channel, f.payload.len()), (FrameKind::Heartbeat, 0, 0));
    }

    #[test]
    fn payload_is_zero_copy() {
        let mut buf = BytesMut::from(&frame_bytes(3, 1, b"body")[..]);
        let base = buf.as_ptr() as usize;
        let f = split_frame(&mut buf, FRAME_MIN_SIZE).unwrap().unwrap();
        assert_eq!(f.payload.as_ptr() as usize, base + FRAME_HEADER_LEN);
    }

    fn split_all(mut out: BytesMut, frame_max: u32) -> Vec<RawFrame> {
        let v: Vec<_> = std::iter::from_fn(|| split_frame(&mut out, frame_max).unwrap()).collect();
        assert!(out.is_empty());
        v
    }

    #[test]
    fn write_body_splits_at_frame_max() {
        let max = FRAME_MIN_SIZE;
        let chunk = (max - FRAME_OVERHEAD) as usize;
        let mut out = BytesMut::new();
        write_body(&mut out, 1, b"", max);
        assert!(out.is_empty());

        for (len, expected) in
            [(1, vec![1]), (chunk, vec![chunk]), (chunk + 1, vec![chunk, 1]), (3 * chunk, vec![chunk; 3])]
        {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = BytesMut::new();
            write_body(&mut out, 9, &body, max);
            assert_eq!(out.len(), len + expected.len() * 8);
            let frames = split_all(out, max);
            assert_eq!(frames.iter().map(|f| f.payload.len()).collect::<Vec<_>>(), expected);
            assert!(frames.iter().all(|f| f.kind == FrameKind::Body && f.channel == 9));
            let joined: Vec<u8> = frames.iter().flat_map(|f| f.payload.iter().copied()).collect();
            assert_eq!(joined, body);
        }
    }

    #[test]
    fn write_body_clamps_tiny_frame_max() {
        let mut out = BytesMut::new();
        write_body(&mut out, 1, &[0u8; 5000], 0);
        let frames = split_all(out, FRAME_MIN_SIZE);
        assert_eq!(frames.len(), 2);
    }
}
