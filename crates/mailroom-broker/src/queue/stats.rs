//! Message counts for the management API's `message_stats`: one struct of plain integers shared by a
//! queue (kept inside its state, bumped under the lock each operation already holds) and a channel (its
//! totals and its share per exchange and per queue, kept by the connection task that owns it). No
//! atomics, no new lock.

/// What a queue or a channel has counted since it was created (RabbitMQ's `message_stats` counts). A
/// queue leaves `confirm`, `return_unroutable` and `drop_unroutable` at zero: they are a publisher's
/// (channel's) counts; a channel's per-exchange share holds only those and `publish`, its per-queue
/// share only the delivery counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageStats {
    /// Messages published (a channel: through an exchange; a queue: enqueued, published or dead-lettered).
    pub publish: u64,
    /// Publishes confirmed (publisher confirms).
    pub confirm: u64,
    /// Mandatory publishes returned as unroutable.
    pub return_unroutable: u64,
    /// Non-mandatory publishes dropped as unroutable.
    pub drop_unroutable: u64,
    /// Deliveries to consumers that must ack.
    pub deliver: u64,
    /// Deliveries to no-ack consumers.
    pub deliver_no_ack: u64,
    /// Messages fetched with `basic.get` in manual ack mode.
    pub get: u64,
    /// Messages fetched with `basic.get` in no-ack mode.
    pub get_no_ack: u64,
    /// `basic.get`s that found the queue empty.
    pub get_empty: u64,
    /// Deliveries and gets with the redelivered flag set.
    pub redeliver: u64,
    /// Acknowledgements.
    pub ack: u64,
}

/// A queue's counts (the queue leaves the publisher-side counts at zero).
pub type QueueMessageStats = MessageStats;

impl MessageStats {
    /// Counts a delivery to a consumer.
    #[inline]
    pub fn record_delivery(&mut self, no_ack: bool, redelivered: bool) {
        if no_ack {
            self.deliver_no_ack += 1;
        } else {
            self.deliver += 1;
        }
        self.redeliver += redelivered as u64;
    }

    /// Counts a message fetched with `basic.get`.
    #[inline]
    pub fn record_get(&mut self, no_ack: bool, redelivered: bool) {
        if no_ack {
            self.get_no_ack += 1;
        } else {
            self.get += 1;
        }
        self.redeliver += redelivered as u64;
    }

    /// Counts a publish through an exchange: `routed`, or else returned (`mandatory`) or dropped.
    #[inline]
    pub fn record_publish(&mut self, routed: bool, mandatory: bool) {
        self.publish += 1;
        if !routed {
            *if mandatory { &mut self.return_unroutable } else { &mut self.drop_unroutable } += 1;
        }
    }

    /// RabbitMQ's `deliver_get`: every message handed out, by consume or get, with or without ack.
    pub fn deliver_get(&self) -> u64 {
        self.deliver + self.deliver_no_ack + self.get + self.get_no_ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_and_gets_count_by_ack_mode_and_redelivery() {
        let mut s = MessageStats::default();
        s.record_delivery(false, false);
        s.record_delivery(true, true);
        s.record_get(false, true);
        s.record_get(true, false);
        s.record_get(true, false);
        assert_eq!(
            s,
            MessageStats { deliver: 1, deliver_no_ack: 1, get: 1, get_no_ack: 2, redeliver: 2, ..Default::default() }
        );
        assert_eq!(s.deliver_get(), 5);
    }

    #[test]
    fn publishes_count_unroutable_ones_by_mandatory() {
        let mut s = MessageStats::default();
        s.record_publish(true, true);
        s.record_publish(false, true);
        s.record_publish(false, false);
        s.record_publish(false, false);
        assert_eq!(s, MessageStats { publish: 4, return_unroutable: 1, drop_unroutable: 2, ..Default::default() });
    }
}
