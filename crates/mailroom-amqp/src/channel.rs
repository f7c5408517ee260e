//! Per-channel state: consumers, unacked deliveries, confirm/tx mode, and a publish being assembled.

use crate::codec::ContentHeader;
use crate::error::{code, AmqpError};
use bytes::{Bytes, BytesMut};
use mailroom_broker::{ChannelPrefetch, ConsumerId, Message, MessageId, Queue};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::time::Instant;

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelPhase {
    /// Accepting methods.
    Open,
    /// The server sent `channel.close`: everything but close/close-ok is ignored until close-ok.
    Closing,
}

/// A consumer on this channel.
#[derive(Debug)]
pub struct ChannelConsumer {
    /// The broker's id for it.
    pub id: ConsumerId,
    /// The queue it consumes from.
    pub queue: Arc<Queue>,
}

/// A delivery the client has not settled yet.
#[derive(Debug)]
pub struct UnackedDelivery {
    /// The queue it came from.
    pub queue: Arc<Queue>,
    /// Its id there.
    pub id: MessageId,
    /// When it was sent (for the consumer acknowledgement timeout).
    pub sent_at: Instant,
}

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

/// A publish or ack held back by a transaction until commit.
#[derive(Debug)]
pub enum TxOp {
    /// A publish: exchange, message (boxed: it is much larger than a settle), mandatory flag.
    Publish { exchange: String, message: Box<Message>, mandatory: bool },
    /// A settlement of deliveries (by delivery tag): ack, or reject with/without requeue.
    Settle { deliveries: Vec<(u64, UnackedDelivery)>, ack: bool, requeue: bool },
}

/// A channel's state.
#[derive(Debug)]
pub struct Channel {
    /// Open or closing.
    pub phase: ChannelPhase,
    /// Consumers by tag.
    pub consumers: HashMap<String, ChannelConsumer>,
    /// Unacked deliveries by delivery tag (ascending = oldest first).
    pub unacked: BTreeMap<u64, UnackedDelivery>,
    /// The next delivery tag to hand out.
    pub next_delivery_tag: u64,
    /// Per-consumer prefetch for consumers created from now on (`basic.qos`, global=false).
    pub consumer_prefetch: u32,
    /// Channel-wide prefetch shared by its consumers (`basic.qos`, global=true).
    pub channel_prefetch: Arc<ChannelPrefetch>,
    /// Publisher confirms are on.
    pub confirm: bool,
    /// The next publish sequence number (confirm mode).
    pub next_publish_seq: u64,
    /// Highest sequence number whose ack is still to be sent (coalesced into one multiple-ack).
    pub pending_confirm_ack: Option<u64>,
    /// The first sequence number of that run: an ack covering only it goes out without `multiple`, as
    /// RabbitMQ sends it (listeners such as the Java client's see `multiple=false` then).
    pub pending_confirm_first: u64,
    /// Sequence numbers of persistent publishes waiting for their fsync; while any is pending, other
    /// confirms go out one by one (a multiple-ack would cover them).
    pub durable_pending: BTreeSet<u64>,
    /// Which opening of this channel number this is, so a late fsync report for a closed channel is not
    /// mistaken for one of a reopened channel with the same number.
    pub epoch: u64,
    /// Transaction buffer, when in tx mode.
    pub tx: Option<Vec<TxOp>>,
    /// A publish whose content is being received.
    pub pending: Option<PendingPublish>,
    /// The last queue declared on this channel (an empty queue name means it).
    pub last_queue: Option<String>,
    /// The direct reply-to queue this channel consumes, if any (`amq.rabbitmq.reply-to.<token>`).
    pub reply_queue: Option<String>,
    /// The user's grants in the vhost, checked before each operation (None: the user has lost every
    /// permission in the vhost since `connection.open`; every check is refused).
    pub access: Option<mailroom_broker::access::ChannelAccess>,
    /// This channel's place in its user's `max-channels` count, held for its `Drop` (which gives it back).
    #[allow(dead_code)]
    pub user_slot: Option<mailroom_broker::access::ChannelSlot>,
}

impl Channel {
    /// A freshly opened channel.
    pub fn new() -> Self {
        Self {
            phase: ChannelPhase::Open,
            consumers: HashMap::new(),
            unacked: BTreeMap::new(),
            next_delivery_tag: 1,
            consumer_prefetch: 0,
            channel_prefetch: Arc::new(ChannelPrefetch::default()),
            confirm: false,
            next_publish_seq: 1,
            pending_confirm_ack: None,
            pending_confirm_first: 0,
            durable_pending: BTreeSet::new(),
            epoch: 0,
            tx: None,
            pending: None,
            last_queue: None,
            reply_queue: None,
            access: None,
            user_slot: None,
        }
    }

    /// Takes the deliveries an ack/nack/reject names, RabbitMQ's way: tag 0 with `multiple` means all;
    /// an unknown tag is 406 PRECONDITION_FAILED.
    pub fn take_unacked(
        &mut self,
        delivery_tag: u64,
        multiple: bool,
    ) -> Result<Vec<(u64, UnackedDelivery)>, AmqpError> {
        if multiple && delivery_tag == 0 {
            return Ok(std::mem::take(&mut self.unacked).into_iter().collect());
        }
        if !self.unacked.contains_key(&delivery_tag) {
            return Err(AmqpError::channel(code::PRECONDITION_FAILED, format!("unknown delivery tag {delivery_tag}")));
        }
        if multiple {
            let rest = self.unacked.split_off(&(delivery_tag + 1));
            Ok(std::mem::replace(&mut self.unacked, rest).into_iter().collect())
        } else {
            Ok(self.unacked.remove(&delivery_tag).map(|d| (delivery_tag, d)).into_iter().collect())
        }
    }

    /// Adds `seq` to the run of confirms to ack at the end of this turn (one ack, `multiple` only when the
    /// run holds more than one sequence number).
    pub fn queue_confirm_ack(&mut self, seq: u64) {
        match self.pending_confirm_ack {
            Some(pending) => self.pending_confirm_ack = Some(pending.max(seq)),
            None => {
                self.pending_confirm_first = seq;
                self.pending_confirm_ack = Some(seq);
            }
        }
    }

    /// The send time of the oldest unacked delivery.
    pub fn oldest_unacked(&self) -> Option<Instant> {
        self.unacked.values().next().map(|d| d.sent_at)
    }
}

impl Default for Channel {
    fn default() -> Self {
        Self::new()
    }
}

/// Settles deliveries with their queues, one call per queue: ack, requeue or reject.
pub fn settle(deliveries: impl IntoIterator<Item = UnackedDelivery>, ack: bool, requeue: bool) {
    let mut groups: Vec<(Arc<Queue>, Vec<MessageId>)> = Vec::new();
    for d in deliveries {
        match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &d.queue)) {
            Some((_, ids)) => ids.push(d.id),
            None => groups.push((d.queue, vec![d.id])),
        }
    }
    for (queue, ids) in groups {
        if ack {
            queue.ack(&ids);
        } else {
            queue.reject(&ids, requeue);
        }
    }
}
