//! A queue's message counts for the management API's `message_stats`: plain integers kept inside the
//! queue's state and bumped under the lock each operation already holds (no atomics, no new lock).

/// What a queue has counted since it was created (RabbitMQ's per-queue `message_stats` counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueMessageStats {
    /// Messages enqueued (published or dead-lettered into the queue).
    pub publish: u64,
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

impl QueueMessageStats {
    /// Counts a delivery to a consumer.
    #[inline]
    pub(super) fn record_delivery(&mut self, no_ack: bool, redelivered: bool) {
        if no_ack {
            self.deliver_no_ack += 1;
        } else {
            self.deliver += 1;
        }
        self.redeliver += redelivered as u64;
    }

    /// Counts a message fetched with `basic.get`.
    #[inline]
    pub(super) fn record_get(&mut self, no_ack: bool, redelivered: bool) {
        if no_ack {
            self.get_no_ack += 1;
        } else {
            self.get += 1;
        }
        self.redeliver += redelivered as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_and_gets_count_by_ack_mode_and_redelivery() {
        let mut s = QueueMessageStats::default();
        s.record_delivery(false, false);
        s.record_delivery(true, true);
        s.record_get(false, true);
        s.record_get(true, false);
        s.record_get(true, false);
        assert_eq!(
            s,
            QueueMessageStats {
                deliver: 1,
                deliver_no_ack: 1,
                get: 1,
                get_no_ack: 2,
                redeliver: 2,
                ..Default::default()
            }
        );
    }
}
