//! Ack batching: the `basic.ack`s of one read batch, grouped by queue, so each queue takes them in one call
//! (one store write) instead of one per ack.

use crate::channel::UnackedDelivery;
use mailroom_broker::{MessageId, Queue};
use std::sync::Arc;

/// Acks taken from their channels but not yet applied to their queues.
#[derive(Default)]
pub(super) struct AckBatch {
    /// Message ids by queue.
    by_queue: Vec<(Arc<Queue>, Vec<MessageId>)>,
    /// Channels with a channel-wide prefetch among those acks: their other queues get a dispatch after.
    channels: Vec<u16>,
}

impl AckBatch {
    /// Adds the deliveries one ack settled on `channel` (`channel_wide` when it has a channel-wide prefetch).
    pub(super) fn add(&mut self, channel: u16, channel_wide: bool, deliveries: Vec<(u64, UnackedDelivery)>) {
        if channel_wide && !self.channels.contains(&channel) {
            self.channels.push(channel);
        }
        for (_, d) in deliveries {
            match self.by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &d.queue)) {
                Some((_, ids)) => ids.push(d.id),
                None => self.by_queue.push((d.queue, vec![d.id])),
            }
        }
    }

    /// Nothing is pending.
    pub(super) fn is_empty(&self) -> bool {
        self.by_queue.is_empty()
    }

    /// Applies the acks, one `Queue::ack` per queue; returns the channels whose consumers want a dispatch.
    pub(super) fn apply(&mut self) -> Vec<u16> {
        for (queue, ids) in std::mem::take(&mut self.by_queue) {
            queue.ack(&ids);
        }
        std::mem::take(&mut self.channels)
    }
}
