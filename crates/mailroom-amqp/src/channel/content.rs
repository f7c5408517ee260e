//! A `basic.publish` being assembled from its content header and body frames.

use crate::codec::ContentHeader;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// A `basic.publish` whose content is still arriving.
#[derive(Debug)]
pub struct PendingPublish {
    /// Target exchange.
    pub exchange: Arc<str>,
    /// Routing key.
    pub routing_key: Arc<str>,
    /// Return the message if it cannot be routed.
    pub mandatory: bool,
    /// The content header, once received.
    pub header: Option<ContentHeader>,
    /// Body frames so far (one frame: no copy at all).
    pub body: BodyBuffer,
}

impl PendingPublish {
    /// A publish whose content header and body are still to come.
    pub fn new(exchange: &str, routing_key: &str, mandatory: bool) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory,
            header: None,
            body: BodyBuffer::Empty,
        }
    }
}

/// Body frames of one message, concatenated only when there is more than one.
#[derive(Debug, Default)]
pub enum BodyBuffer {
    /// Nothing yet.
    #[default]
    Empty,
    /// Exactly one frame: kept as-is, zero-copy.
    One(Bytes),
    /// Several frames, concatenated.
    Many(BytesMut),
}

impl BodyBuffer {
    /// Appends a body frame's payload. `expected_total` is the size the content header announced: it
    /// only caps the buffer, which grows with what arrives (a header announcing 16 MiB followed by two
    /// 1-byte frames must not reserve 16 MiB: the client has not sent it and may never send it).
    pub fn push(&mut self, chunk: Bytes, expected_total: usize) {
        *self = match std::mem::take(self) {
            BodyBuffer::Empty => BodyBuffer::One(chunk),
            BodyBuffer::One(first) => {
                // Room for as much again as has arrived: appends then grow it geometrically.
                let arrived = first.len() + chunk.len();
                let mut buf = BytesMut::with_capacity(expected_total.min(2 * arrived));
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&chunk);
                BodyBuffer::Many(buf)
            }
            BodyBuffer::Many(mut buf) => {
                buf.extend_from_slice(&chunk);
                BodyBuffer::Many(buf)
            }
        };
    }
    /// Bytes received so far.
    pub fn len(&self) -> usize {
        match self {
            BodyBuffer::Empty => 0,
            BodyBuffer::One(b) => b.len(),
            BodyBuffer::Many(b) => b.len(),
        }
    }
    /// The whole body.
    pub fn finish(self) -> Bytes {
        match self {
            BodyBuffer::Empty => Bytes::new(),
            BodyBuffer::One(b) => b,
            BodyBuffer::Many(b) => b.freeze(),
        }
    }
}
