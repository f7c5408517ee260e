//! A channel's message counts: its totals, and its share per exchange published to and per queue consumed
//! or got from (RabbitMQ's `publishes` and `deliveries` of a channel, and the Prometheus families
//! `channel_exchange_metrics` and `channel_queue_metrics`). The publish and deliver paths are hot: each
//! count is an index into a small per-channel `Vec`, found through a cached last-used slot (a string or
//! pointer compare), then a linear scan while the `Vec` is short, then a map; nothing is allocated and no
//! lock is taken except the first time a channel meets an exchange or a queue.

use mailroom_broker::connections::ObjectMessageStats;
use mailroom_broker::message::same_name;
use mailroom_broker::queue::MessageStats;
use mailroom_broker::Queue;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Up to this many exchanges (or queues) a lookup scans the `Vec`; beyond, it asks the map. A channel
/// usually publishes to one or a few exchanges and consumes from a few queues.
const LINEAR_SCAN_MAX: usize = 8;

/// The exchanges a channel published to, with their counts, in first-use order (slots never move, so the
/// confirm state can name a publish's exchange by slot).
#[derive(Debug, Default)]
struct ExchangeSlots {
    slots: Vec<(Box<str>, MessageStats)>,
    /// The slot of each name, kept once there are more than [`LINEAR_SCAN_MAX`].
    index: HashMap<Box<str>, usize>,
    /// The last slot used (a publisher usually sends to one exchange after another).
    last: usize,
}

impl ExchangeSlots {
    fn slot(&mut self, name: &str) -> usize {
        // `same_name`, not `==`: glibc's AVX-512 memcmp on two empty names (the default exchange) costs a
        // fault-suppression assist, 8.8% of broker CPU on a 16-byte publish load (BENCHMARKS.md).
        if self.slots.get(self.last).is_some_and(|(n, _)| same_name(n, name)) {
            return self.last;
        }
        let found = if self.slots.len() <= LINEAR_SCAN_MAX {
            self.slots.iter().position(|(n, _)| same_name(n, name))
        } else {
            self.index.get(name).copied()
        };
        let slot = found.unwrap_or_else(|| {
            let slot = self.slots.len();
            self.slots.push((name.into(), MessageStats::default()));
            if self.slots.len() > LINEAR_SCAN_MAX {
                if self.index.is_empty() {
                    self.index.extend(self.slots.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)));
                } else {
                    self.index.insert(name.into(), slot);
                }
            }
            slot
        });
        self.last = slot;
        slot
    }
}

/// The queues a channel consumed or got from, by identity (a queue deleted and declared again under its
/// name is another queue, as in RabbitMQ); a `Weak` so the counts do not keep a deleted queue's memory.
///
/// Slots of deleted queues are dropped as new queues come (a client that declares a reply queue per call
/// would otherwise grow them without bound): once the slots reach `prune_at`, the dead ones go and the next
/// pruning waits until the live ones have doubled, so the work stays constant per slot added.
#[derive(Debug, Default)]
struct QueueSlots {
    slots: Vec<(Weak<Queue>, MessageStats)>,
    /// The slot of each queue (by its address, stable while the `Weak` is held), once there are more
    /// than [`LINEAR_SCAN_MAX`].
    index: HashMap<usize, usize>,
    last: usize,
    /// Slots that trigger the next pruning (0: [`PRUNE_MIN`]).
    prune_at: usize,
}

/// Queue slots kept before the first pruning.
const PRUNE_MIN: usize = 16;

impl QueueSlots {
    /// Drops the slots of queues deleted since (their counts stay in the channel's totals) and rebuilds the
    /// index; queue slots are never named by position outside this struct.
    fn prune(&mut self) {
        self.slots.retain(|(w, _)| w.strong_count() > 0);
        self.index.clear();
        if self.slots.len() > LINEAR_SCAN_MAX {
            self.index.extend(self.slots.iter().enumerate().map(|(i, (w, _))| (w.as_ptr() as usize, i)));
        } else {
            self.index.shrink_to_fit();
        }
        self.slots.shrink_to(self.slots.len() * 2);
        self.last = 0;
        self.prune_at = (self.slots.len() * 2).max(PRUNE_MIN);
    }

    fn get(&mut self, queue: &Arc<Queue>) -> &mut MessageStats {
        let addr = Arc::as_ptr(queue);
        let same = |w: &Weak<Queue>| std::ptr::eq(w.as_ptr(), addr);
        let slot = if self.slots.get(self.last).is_some_and(|(w, _)| same(w)) {
            self.last
        } else {
            let found = if self.slots.len() <= LINEAR_SCAN_MAX {
                self.slots.iter().position(|(w, _)| same(w))
            } else {
                self.index.get(&(addr as usize)).copied()
            };
            let slot = found.unwrap_or_else(|| {
                if self.slots.len() >= self.prune_at.max(PRUNE_MIN) {
                    self.prune();
                }
                let slot = self.slots.len();
                self.slots.push((Arc::downgrade(queue), MessageStats::default()));
                if self.slots.len() > LINEAR_SCAN_MAX {
                    if self.index.is_empty() {
                        self.index.extend(self.slots.iter().enumerate().map(|(i, (w, _))| (w.as_ptr() as usize, i)));
                    } else {
                        self.index.insert(addr as usize, slot);
                    }
                }
                slot
            });
            self.last = slot;
            slot
        };
        &mut self.slots[slot].1
    }
}

/// A channel's counts since it opened.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Every count of the channel (`confirm` is counted by the confirm state and added at snapshot).
    totals: MessageStats,
    exchanges: ExchangeSlots,
    queues: QueueSlots,
}

impl ChannelStats {
    /// A publish through `exchange`: routed, or else returned (`mandatory`) or dropped. Returns the
    /// exchange's slot (for the confirm state to count the publish's confirm against it).
    #[inline]
    pub fn published(&mut self, exchange: &str, routed: bool, mandatory: bool) -> usize {
        self.totals.record_publish(routed, mandatory);
        let slot = self.exchanges.slot(exchange);
        self.exchanges.slots[slot].1.record_publish(routed, mandatory);
        slot
    }

    /// A delivery from `queue` to a consumer.
    #[inline]
    pub fn delivered(&mut self, queue: &Arc<Queue>, no_ack: bool, redelivered: bool) {
        self.totals.record_delivery(no_ack, redelivered);
        self.queues.get(queue).record_delivery(no_ack, redelivered);
    }

    /// A message fetched from `queue` with `basic.get`.
    pub fn got(&mut self, queue: &Arc<Queue>, no_ack: bool, redelivered: bool) {
        self.totals.record_get(no_ack, redelivered);
        self.queues.get(queue).record_get(no_ack, redelivered);
    }

    /// A `basic.get` that found `queue` empty.
    pub fn got_empty(&mut self, queue: &Arc<Queue>) {
        self.totals.get_empty += 1;
        self.queues.get(queue).get_empty += 1;
    }

    /// Deliveries acknowledged, each counted against its queue.
    #[inline]
    pub fn acked<'a>(&mut self, queues: impl IntoIterator<Item = &'a Arc<Queue>>) {
        for queue in queues {
            self.totals.ack += 1;
            self.queues.get(queue).ack += 1;
        }
    }

    /// The totals, with `confirmed` publishes.
    pub fn totals(&self, confirmed: u64) -> MessageStats {
        MessageStats { confirm: confirmed, ..self.totals }
    }

    /// The counts per exchange, `confirmed(slot)` giving each one's confirms.
    pub fn publishes(&self, confirmed: impl Fn(usize) -> u64) -> Vec<ObjectMessageStats> {
        let slots = self.exchanges.slots.iter().enumerate();
        slots
            .map(|(i, (name, s))| ObjectMessageStats {
                name: name.to_string(),
                stats: MessageStats { confirm: confirmed(i), ..*s },
            })
            .collect()
    }

    /// The counts per queue, leaving out queues deleted since.
    pub fn deliveries(&self) -> Vec<ObjectMessageStats> {
        let live = self.queues.slots.iter().filter_map(|(w, s)| Some((w.upgrade()?, s)));
        live.map(|(q, s)| ObjectMessageStats { name: q.name().to_owned(), stats: *s }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_slots_stay_put_past_the_linear_scan_and_count_each_exchange() {
        let mut s = ChannelStats::default();
        let names: Vec<String> = (0..20).map(|i| format!("x{i}")).collect();
        let slots: Vec<usize> = names.iter().map(|n| s.published(n, true, false)).collect();
        assert_eq!(slots, (0..20).collect::<Vec<_>>());
        // Again, out of order, past the map threshold: the same slots.
        for (i, n) in names.iter().enumerate().rev() {
            assert_eq!(s.published(n, i % 2 == 0, i % 3 == 0), i);
        }
        assert_eq!(s.published("x3", true, false), 3, "the cached slot");
        let per = s.publishes(|slot| slot as u64 * 10);
        assert_eq!(per.len(), 20);
        assert_eq!(per[3].name, "x3");
        assert_eq!(per[3].stats, MessageStats { publish: 3, confirm: 30, return_unroutable: 1, ..Default::default() });
        assert_eq!(per[4].stats, MessageStats { publish: 2, confirm: 40, ..Default::default() });
        assert_eq!(per[5].stats, MessageStats { publish: 2, confirm: 50, drop_unroutable: 1, ..Default::default() });
        let totals = s.totals(7);
        assert_eq!(totals.publish, 41);
        assert_eq!(totals.confirm, 7);
        assert_eq!(totals.publish, per.iter().map(|p| p.stats.publish).sum::<u64>());
        assert_eq!(
            totals.return_unroutable + totals.drop_unroutable,
            per.iter().map(|p| p.stats.return_unroutable + p.stats.drop_unroutable).sum::<u64>()
        );
    }

    #[tokio::test]
    async fn queue_slots_of_deleted_queues_are_dropped_as_new_ones_come() {
        use mailroom_broker::{Broker, BrokerConfig, QueueOptions};
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let vhost = broker.vhost("/").unwrap();
        vhost.declare_queue("kept", &QueueOptions::default(), 1).unwrap();
        let kept = vhost.queue("kept", 1).unwrap();
        let mut s = ChannelStats::default();
        // An RPC client: a reply queue per call, consumed once, then deleted; one queue lives throughout.
        for i in 0..1000 {
            let name = format!("reply{i}");
            vhost.declare_queue(&name, &QueueOptions::default(), 1).unwrap();
            let q = vhost.queue(&name, 1).unwrap();
            s.delivered(&q, true, false);
            s.delivered(&kept, false, false);
            drop(q);
            vhost.delete_queue(&name, false, false, 1).unwrap();
            assert!(s.queues.slots.len() <= PRUNE_MIN + 1, "call {i}: {} slots", s.queues.slots.len());
        }
        let per = s.deliveries();
        assert_eq!(per.len(), 1);
        assert_eq!(per[0].name, "kept");
        assert_eq!(per[0].stats, MessageStats { deliver: 1000, ..Default::default() });
        let totals = s.totals(0);
        assert_eq!((totals.deliver, totals.deliver_no_ack), (1000, 1000), "the totals keep the deleted queues' counts");

        // Many live queues past the map threshold: nothing live is dropped, each keeps its counts.
        let live: Vec<Arc<Queue>> = (0..40)
            .map(|i| {
                let name = format!("live{i}");
                vhost.declare_queue(&name, &QueueOptions::default(), 1).unwrap();
                vhost.queue(&name, 1).unwrap()
            })
            .collect();
        for _ in 0..3 {
            for q in &live {
                s.delivered(q, false, false);
            }
        }
        let per = s.deliveries();
        assert_eq!(per.len(), 41);
        assert!(per.iter().filter(|d| d.name.starts_with("live")).all(|d| d.stats.deliver == 3));
    }

    #[tokio::test]
    async fn queue_slots_count_each_queue_by_identity_and_leave_deleted_ones_out() {
        use mailroom_broker::{Broker, BrokerConfig, QueueOptions};
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let vhost = broker.vhost("/").unwrap();
        let queues: Vec<Arc<Queue>> = (0..12)
            .map(|i| {
                let name = format!("q{i}");
                vhost.declare_queue(&name, &QueueOptions::default(), 1).unwrap();
                vhost.queue(&name, 1).unwrap()
            })
            .collect();
        let mut s = ChannelStats::default();
        // Round-robin over more queues than the linear scan covers, twice.
        for _ in 0..2 {
            for (i, q) in queues.iter().enumerate() {
                s.delivered(q, i % 2 == 0, i == 3);
            }
        }
        s.got(&queues[5], false, false);
        s.got_empty(&queues[5]);
        s.acked([&queues[1], &queues[1], &queues[11]]);
        let per = s.deliveries();
        assert_eq!(per.len(), 12);
        assert_eq!(per[0].name, "q0");
        assert_eq!(per[0].stats, MessageStats { deliver_no_ack: 2, ..Default::default() });
        assert_eq!(per[1].stats, MessageStats { deliver: 2, ack: 2, ..Default::default() });
        assert_eq!(per[3].stats, MessageStats { deliver: 2, redeliver: 2, ..Default::default() });
        assert_eq!(per[5].stats, MessageStats { deliver: 2, get: 1, get_empty: 1, ..Default::default() });
        assert_eq!(per[11].stats.ack, 1);
        let totals = s.totals(0);
        assert_eq!((totals.deliver + totals.deliver_no_ack, totals.ack, totals.get_empty), (24, 3, 1));
        // Deleted: gone from the breakdown (the totals keep it); declared again, it is another queue.
        drop(queues);
        vhost.delete_queue("q3", false, false, 1).unwrap();
        let per = s.deliveries();
        assert_eq!(per.len(), 11);
        assert!(per.iter().all(|d| d.name != "q3"));
        vhost.declare_queue("q3", &QueueOptions::default(), 1).unwrap();
        s.delivered(&vhost.queue("q3", 1).unwrap(), false, false);
        let again: Vec<_> = s.deliveries().into_iter().filter(|d| d.name == "q3").collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].stats, MessageStats { deliver: 1, ..Default::default() });
    }
}
