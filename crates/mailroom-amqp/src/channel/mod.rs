//! One channel's state and the rules that change it: consumers, delivery tags, unacked deliveries and their
//! settling (ack, nack, reject, recover), prefetch, and its mode (plain, confirm or transactional).

mod confirms;
mod content;
mod stats;
mod tx;

pub use confirms::{Confirm, Confirms};
pub use content::{PendingPublish, StartedMessage};
pub use stats::ChannelStats;
pub use tx::{Tx, TxOp};

use crate::error::{code, AmqpError};
use mailroom_broker::connections::ObjectMessageStats;
use mailroom_broker::{ChannelPrefetch, ConsumerId, MessageId, Queue};
use std::collections::{BTreeMap, HashMap};
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

/// Confirm mode and tx mode exclude each other, so a channel is in exactly one mode.
#[derive(Debug, Default)]
pub enum ChannelMode {
    /// Neither: publishes are fire-and-forget, settlements apply at once.
    #[default]
    Plain,
    /// Publisher confirms are on (`confirm.select`).
    Confirm(Confirms),
    /// Transactional (`tx.select`): publishes and settlements wait for commit.
    Tx(Tx),
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

/// What a closing channel gives back: its consumers to cancel and its deliveries to requeue.
#[derive(Debug, Default)]
pub struct Released {
    /// Consumers to cancel.
    pub consumers: Vec<ChannelConsumer>,
    /// Unsettled deliveries (including those settled in an uncommitted transaction) to requeue.
    pub unacked: Vec<UnackedDelivery>,
}

/// A channel's state.
#[derive(Debug)]
pub struct Channel {
    /// Open or closing.
    pub phase: ChannelPhase,
    /// Consumers by tag.
    pub consumers: HashMap<String, ChannelConsumer>,
    /// Unacked deliveries by delivery tag (ascending = oldest first).
    unacked: BTreeMap<u64, UnackedDelivery>,
    /// The next delivery tag to hand out.
    next_delivery_tag: u64,
    /// Per-consumer prefetch for consumers created from now on (`basic.qos`, global=false).
    pub consumer_prefetch: u32,
    /// Channel-wide prefetch shared by its consumers (`basic.qos`, global=true).
    pub channel_prefetch: Arc<ChannelPrefetch>,
    /// Plain, confirm or tx.
    pub mode: ChannelMode,
    /// Which opening of this channel number this is, so a late fsync report for a closed channel is not
    /// mistaken for one of a reopened channel with the same number.
    pub epoch: u64,
    /// A publish whose content is being received.
    pub pending: Option<PendingPublish>,
    /// The names and exchange of the last publish, reused by the next one (no allocation, no lookup).
    pub publish_cache: mailroom_broker::vhost::PublishCache,
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
    /// Message counts since it opened, in total, per exchange and per queue (the management API's channel
    /// `message_stats`, `publishes` and `deliveries`; confirms are counted by the confirm state).
    pub stats: ChannelStats,
}

impl Channel {
    /// A freshly opened channel; `epoch` tells this opening of its number from others.
    pub fn new(epoch: u64) -> Self {
        Self {
            phase: ChannelPhase::Open,
            consumers: HashMap::new(),
            unacked: BTreeMap::new(),
            next_delivery_tag: 1,
            consumer_prefetch: 0,
            channel_prefetch: Arc::new(ChannelPrefetch::default()),
            mode: ChannelMode::Plain,
            epoch,
            pending: None,
            publish_cache: Default::default(),
            last_queue: None,
            reply_queue: None,
            access: None,
            user_slot: None,
            stats: Default::default(),
        }
    }

    /// A freshly opened channel on a connection with this outbound credit: its consumers get no deliveries
    /// while the connection's credit is used up.
    pub fn with_outbound(epoch: u64, credit: Arc<mailroom_broker::client_memory::OutboundCredit>) -> Self {
        Self { channel_prefetch: Arc::new(ChannelPrefetch::with_outbound(credit)), ..Self::new(epoch) }
    }

    /// Counts a publish through `exchange` (routed, or else returned when `mandatory`, or dropped), and
    /// tells the confirm state which exchange the publish it numbers next went through.
    #[inline]
    pub fn record_publish(&mut self, exchange: &str, routed: bool, mandatory: bool) {
        let slot = self.stats.published(exchange, routed, mandatory);
        if let ChannelMode::Confirm(c) = &mut self.mode {
            c.set_exchange_slot(slot);
        }
    }

    /// The channel's counts for the management API: totals, per exchange, per queue.
    pub fn message_stats(
        &self,
    ) -> (mailroom_broker::ChannelMessageStats, Vec<ObjectMessageStats>, Vec<ObjectMessageStats>) {
        let confirms = match &self.mode {
            ChannelMode::Confirm(c) => Some(c),
            _ => None,
        };
        let totals = self.stats.totals(confirms.map_or(0, Confirms::confirmed));
        let publishes = self.stats.publishes(|slot| confirms.map_or(0, |c| c.confirmed_through(slot)));
        (totals, publishes, self.stats.deliveries())
    }

    /// `confirm.select`: refused on a transactional channel; selecting twice is harmless.
    pub fn select_confirm(&mut self) -> Result<(), AmqpError> {
        match self.mode {
            ChannelMode::Tx(_) => {
                Err(AmqpError::channel(code::PRECONDITION_FAILED, "cannot switch from tx to confirm mode"))
            }
            ChannelMode::Confirm(_) => Ok(()),
            ChannelMode::Plain => {
                self.mode = ChannelMode::Confirm(Confirms::default());
                Ok(())
            }
        }
    }

    /// `tx.select`: refused in confirm mode; selecting twice keeps the open transaction.
    pub fn select_tx(&mut self) -> Result<(), AmqpError> {
        match self.mode {
            ChannelMode::Confirm(_) => {
                Err(AmqpError::channel(code::PRECONDITION_FAILED, "cannot switch from confirm to tx mode"))
            }
            ChannelMode::Tx(_) => Ok(()),
            ChannelMode::Plain => {
                self.mode = ChannelMode::Tx(Tx::default());
                Ok(())
            }
        }
    }

    /// The confirm state, in confirm mode.
    pub fn confirms(&mut self) -> Option<&mut Confirms> {
        match &mut self.mode {
            ChannelMode::Confirm(c) => Some(c),
            _ => None,
        }
    }

    /// A coalesced publisher-confirm ack is waiting to be sent at the end of this turn.
    pub fn has_coalesced_confirm(&self) -> bool {
        matches!(&self.mode, ChannelMode::Confirm(c) if c.has_coalesced())
    }

    /// The open transaction, in tx mode.
    pub fn tx(&mut self) -> Option<&mut Tx> {
        match &mut self.mode {
            ChannelMode::Tx(t) => Some(t),
            _ => None,
        }
    }

    /// Takes the transaction's operations for `tx.commit` or `tx.rollback` (406 when not transactional).
    pub fn take_tx(&mut self) -> Result<Vec<TxOp>, AmqpError> {
        self.tx()
            .map(Tx::take)
            .ok_or_else(|| AmqpError::channel(code::PRECONDITION_FAILED, "channel is not transactional"))
    }

    /// Puts the deliveries of settlements that did not happen back as unacked, under their tags (a rollback,
    /// or a commit that failed before reaching them); publishes among `ops` are dropped.
    pub fn unsettle(&mut self, ops: impl IntoIterator<Item = TxOp>) {
        for op in ops {
            if let TxOp::Settle { deliveries, .. } = op {
                self.unacked.extend(deliveries);
            }
        }
    }

    /// `basic.qos`: a per-consumer limit for consumers created from now on, or (`global`) the channel-wide one.
    pub fn qos(&mut self, prefetch_count: u16, global: bool) {
        if global {
            self.channel_prefetch.set_limit(prefetch_count as u32);
        } else {
            self.consumer_prefetch = prefetch_count as u32;
        }
    }

    /// Hands out the next delivery tag; `unacked` is the delivery to track when the client must settle it.
    pub fn next_delivery(&mut self, unacked: Option<UnackedDelivery>) -> u64 {
        let tag = self.next_delivery_tag;
        self.next_delivery_tag += 1;
        if let Some(d) = unacked {
            self.unacked.insert(tag, d);
        }
        tag
    }

    /// `basic.ack`, `basic.nack` and `basic.reject`: takes the deliveries named (RabbitMQ's way: tag 0 with
    /// `multiple` means all; an unknown tag is 406). In tx mode they are held for commit and None is returned;
    /// otherwise the caller settles them with their queues.
    pub fn settle(
        &mut self,
        delivery_tag: u64,
        multiple: bool,
        ack: bool,
        requeue: bool,
    ) -> Result<Option<Vec<(u64, UnackedDelivery)>>, AmqpError> {
        let deliveries = self.take_unacked(delivery_tag, multiple)?;
        if let ChannelMode::Tx(tx) = &mut self.mode {
            tx.push(TxOp::Settle { deliveries, ack, requeue });
            return Ok(None);
        }
        Ok(Some(deliveries))
    }

    /// `basic.recover`: every unacked delivery, to requeue. Only `requeue=true` is implemented (as RabbitMQ).
    pub fn recover(&mut self, requeue: bool) -> Result<Vec<UnackedDelivery>, AmqpError> {
        if !requeue {
            return Err(AmqpError::connection(code::NOT_IMPLEMENTED, "requeue=false"));
        }
        Ok(std::mem::take(&mut self.unacked).into_values().collect())
    }

    /// Empties the channel for closing: its consumers, and its deliveries to requeue (settlements in an
    /// uncommitted transaction never happened, so theirs go back too). The transaction ends with it.
    pub fn release(&mut self) -> Released {
        let consumers = self.consumers.drain().map(|(_, c)| c).collect();
        let mut unacked: Vec<UnackedDelivery> = std::mem::take(&mut self.unacked).into_values().collect();
        if let ChannelMode::Tx(tx) = &mut self.mode {
            for op in tx.take() {
                if let TxOp::Settle { deliveries, .. } = op {
                    unacked.extend(deliveries.into_iter().map(|(_, d)| d));
                }
            }
            self.mode = ChannelMode::Plain;
        }
        self.pending = None;
        self.reply_queue = None;
        Released { consumers, unacked }
    }

    /// Deliveries waiting for the client's settlement.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// The send time of the oldest unacked delivery.
    pub fn oldest_unacked(&self) -> Option<Instant> {
        self.unacked.values().next().map(|d| d.sent_at)
    }

    fn take_unacked(&mut self, delivery_tag: u64, multiple: bool) -> Result<Vec<(u64, UnackedDelivery)>, AmqpError> {
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

#[cfg(test)]
mod tests;
