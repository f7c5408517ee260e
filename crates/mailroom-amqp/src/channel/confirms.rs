//! Publisher-confirm sequencing of one channel: numbers publishes, coalesces acks, and holds persistent
//! publishes back until their fsync so a multiple-ack never covers one still on its way to disk.

use std::collections::BTreeMap;

/// What to send for a publish (or an fsync report) in confirm mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Folded into the channel's coalesced ack, sent at the end of this turn.
    Coalesced,
    /// Send the coalesced ack first, then this one alone: `ok` is an ack, otherwise a nack.
    Alone {
        /// The publish sequence number.
        seq: u64,
        /// Ack (stored) or nack (refused).
        ok: bool,
    },
    /// Wait for the fsync of this sequence number, then report it with [`Confirms::fsynced`].
    AwaitFsync(u64),
    /// Nothing to send (an fsync report for a sequence number no longer pending).
    Nothing,
}

/// A channel's confirm state.
#[derive(Debug)]
pub struct Confirms {
    /// The next publish sequence number.
    next_seq: u64,
    /// Highest sequence number whose ack is still to be sent (coalesced into one multiple-ack).
    pending_ack: Option<u64>,
    /// The first sequence number of that run: an ack covering only it goes out without `multiple`, as
    /// RabbitMQ sends it (listeners such as the Java client's see `multiple=false` then).
    pending_first: u64,
    /// Sequence numbers of persistent publishes waiting for their fsync, each with its exchange's slot in
    /// the channel's stats; while any is pending, other confirms go out one by one (a multiple-ack would
    /// cover them).
    durable_pending: BTreeMap<u64, usize>,
    /// Publishes confirmed (acked) so far.
    confirmed: u64,
    /// The exchange slot (in the channel's stats) of the publish about to be numbered.
    exchange_slot: usize,
    /// Publishes confirmed so far per exchange slot (RabbitMQ's per-exchange `confirm` of a channel).
    confirmed_per_exchange: Vec<u64>,
}

impl Default for Confirms {
    fn default() -> Self {
        Self {
            next_seq: 1,
            pending_ack: None,
            pending_first: 0,
            durable_pending: BTreeMap::new(),
            confirmed: 0,
            exchange_slot: 0,
            confirmed_per_exchange: Vec::new(),
        }
    }
}

impl Confirms {
    /// The next publish went through the exchange in this slot of the channel's stats.
    #[inline]
    pub fn set_exchange_slot(&mut self, slot: usize) {
        self.exchange_slot = slot;
    }

    /// Numbers a publish and says how to confirm it: `rejected` when the broker refused it, `durable` when
    /// some queue's copy still has to reach the disk.
    pub fn published(&mut self, rejected: bool, durable: bool) -> Confirm {
        let seq = self.next_seq;
        self.next_seq += 1;
        if rejected {
            Confirm::Alone { seq, ok: false }
        } else if durable {
            self.durable_pending.insert(seq, self.exchange_slot);
            Confirm::AwaitFsync(seq)
        } else if self.durable_pending.is_empty() {
            self.coalesce(seq, self.exchange_slot);
            Confirm::Coalesced
        } else {
            self.count_confirm(self.exchange_slot);
            Confirm::Alone { seq, ok: true }
        }
    }

    /// A persistent publish's fsync returned (`ok`) or failed: how to confirm it now.
    pub fn fsynced(&mut self, seq: u64, ok: bool) -> Confirm {
        let Some(slot) = self.durable_pending.remove(&seq) else {
            return Confirm::Nothing;
        };
        if ok && self.durable_pending.first_key_value().is_none_or(|(&first, _)| first > seq) {
            // Every earlier publish is settled: one multiple-ack (sent at the end of this turn) covers this one
            // and any others completing in the same turn.
            self.coalesce(seq, slot);
            return Confirm::Coalesced;
        }
        if ok {
            self.count_confirm(slot);
        }
        Confirm::Alone { seq, ok }
    }

    /// Takes the coalesced ack to send: (delivery tag, multiple). `multiple` only when the run holds more
    /// than one sequence number (acks are coalesced only over runs that started right after the last one sent).
    pub fn take_coalesced(&mut self) -> Option<(u64, bool)> {
        let seq = self.pending_ack.take()?;
        Some((seq, seq > self.pending_first))
    }

    /// A coalesced ack is waiting to be sent.
    pub fn has_coalesced(&self) -> bool {
        self.pending_ack.is_some()
    }

    /// Publishes still waiting for their fsync (the management API's "unconfirmed").
    pub fn unconfirmed(&self) -> usize {
        self.durable_pending.len()
    }

    /// Publishes confirmed so far (the channel's `message_stats.confirm`).
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Publishes through the exchange in `slot` confirmed so far.
    pub fn confirmed_through(&self, slot: usize) -> u64 {
        self.confirmed_per_exchange.get(slot).copied().unwrap_or(0)
    }

    /// One publish through the exchange in `slot` confirmed (acked): the node's and this channel's counts.
    fn count_confirm(&mut self, slot: usize) {
        mailroom_broker::counters::MESSAGES_CONFIRMED.inc();
        self.confirmed += 1;
        if slot >= self.confirmed_per_exchange.len() {
            // Once per exchange the channel publishes to, not per message.
            self.confirmed_per_exchange.resize(slot + 1, 0);
        }
        self.confirmed_per_exchange[slot] += 1;
    }

    fn coalesce(&mut self, seq: u64, slot: usize) {
        self.count_confirm(slot);
        match self.pending_ack {
            Some(pending) => self.pending_ack = Some(pending.max(seq)),
            None => {
                self.pending_first = seq;
                self.pending_ack = Some(seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_publishes_coalesce_into_one_ack() {
        let mut c = Confirms::default();
        assert_eq!(c.take_coalesced(), None);
        assert_eq!(c.published(false, false), Confirm::Coalesced);
        assert_eq!(c.take_coalesced(), Some((1, false)), "a run of one is not multiple");
        for _ in 0..3 {
            assert_eq!(c.published(false, false), Confirm::Coalesced);
        }
        assert!(c.has_coalesced());
        assert_eq!(c.take_coalesced(), Some((4, true)));
        assert!(!c.has_coalesced());
    }

    #[test]
    fn a_refused_publish_is_nacked_alone() {
        let mut c = Confirms::default();
        assert_eq!(c.published(false, false), Confirm::Coalesced);
        assert_eq!(c.published(true, false), Confirm::Alone { seq: 2, ok: false });
        assert_eq!(c.take_coalesced(), Some((1, false)));
    }

    #[test]
    fn fsync_pending_publishes_are_never_covered_by_a_multiple_ack() {
        let mut c = Confirms::default();
        assert_eq!(c.published(false, true), Confirm::AwaitFsync(1));
        assert_eq!(c.published(false, true), Confirm::AwaitFsync(2));
        // A transient publish behind pending ones goes out alone.
        assert_eq!(c.published(false, false), Confirm::Alone { seq: 3, ok: true });
        assert_eq!(c.unconfirmed(), 2);
        // 2 completes before 1: alone, 1 still pending.
        assert_eq!(c.fsynced(2, true), Confirm::Alone { seq: 2, ok: true });
        assert_eq!(c.fsynced(1, true), Confirm::Coalesced);
        assert_eq!(c.take_coalesced(), Some((1, false)));
        assert_eq!(c.fsynced(1, true), Confirm::Nothing, "reported twice");
        assert_eq!(c.published(false, true), Confirm::AwaitFsync(4));
        assert_eq!(c.fsynced(4, false), Confirm::Alone { seq: 4, ok: false });
        assert_eq!(c.unconfirmed(), 0);
    }

    #[test]
    fn confirms_count_against_the_exchange_each_publish_went_through() {
        let mut c = Confirms::default();
        c.set_exchange_slot(0);
        assert_eq!(c.published(false, false), Confirm::Coalesced);
        c.set_exchange_slot(2);
        assert_eq!(c.published(false, true), Confirm::AwaitFsync(2));
        assert_eq!(c.published(true, false), Confirm::Alone { seq: 3, ok: false });
        c.set_exchange_slot(0);
        assert_eq!(c.published(false, false), Confirm::Alone { seq: 4, ok: true });
        assert_eq!((c.confirmed_through(0), c.confirmed_through(2)), (2, 0));
        // The fsync report counts against slot 2, whatever slot the channel is at now.
        assert_eq!(c.fsynced(2, true), Confirm::Coalesced);
        assert_eq!((c.confirmed_through(0), c.confirmed_through(1), c.confirmed_through(2)), (2, 0, 1));
        assert_eq!(c.confirmed(), 3, "a nack is not a confirm");
    }
}
