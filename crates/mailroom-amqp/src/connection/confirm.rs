//! The `confirm` class and publisher-confirm delivery: confirm.select, the fsync waiter for persistent
//! publishes, and sending the acks/nacks the channel's [`crate::channel::Confirms`] decides on.

use super::Connection;
use crate::channel::{Channel, ChannelPhase, Confirm};
use crate::codec::{basic, confirm, ids, tx, Method};
use crate::error::{code, AmqpError};
use mailroom_broker::store::SyncTicket;
use tokio::sync::mpsc;

/// A persistent publish's confirm once its fsync returned: (channel, channel epoch, sequence number, stored ok).
pub(super) type DurableConfirm = (u16, u64, u64, bool);
/// A persistent publish waiting for its fsyncs: (channel, channel epoch, sequence number, the store tickets).
pub(super) type DurableWait = (u16, u64, u64, Vec<SyncTicket>);
/// The fsync waiter's marker for a transaction commit (publish sequence numbers start at 1).
pub(super) const COMMIT_SEQ: u64 = 0;

impl Connection {
    /// `confirm.select`.
    pub(super) fn handle_confirm(&mut self, id: u16, method: confirm::AMQPMethod) -> Result<(), AmqpError> {
        match method {
            confirm::AMQPMethod::Select(s) => {
                self.channel(id).select_confirm()?;
                if !s.nowait {
                    self.send(id, Method::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})));
                }
                Ok(())
            }
            _ => Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected method")),
        }
    }

    /// The connection's fsync waiter, started on its first persistent publish: one task awaits every
    /// publish's tickets in order (fsync rounds complete in append order) instead of a task per message.
    pub(super) fn durable_waiter(&mut self) -> &mpsc::UnboundedSender<DurableWait> {
        let done = self.durable_confirms_tx.clone();
        self.durable_waiter.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<DurableWait>();
            tokio::spawn(async move {
                while let Some((channel, epoch, seq, tickets)) = rx.recv().await {
                    let mut ok = true;
                    for ticket in tickets {
                        ok &= ticket.wait().await.is_ok();
                    }
                    if done.send((channel, epoch, seq, ok)).is_err() {
                        return;
                    }
                }
            });
            tx
        })
    }

    /// Sends what a confirm decision asks for: nothing yet (coalesced or awaiting fsync), or the coalesced ack
    /// and then this one alone (no `multiple`): ack, or nack for a message the broker could not take.
    pub(super) fn send_confirm(&mut self, id: u16, confirm: Confirm) {
        let Confirm::Alone { seq, ok } = confirm else { return };
        self.flush_channel_confirms(id);
        let method = if ok {
            basic::AMQPMethod::Ack(basic::Ack { delivery_tag: seq, multiple: false })
        } else {
            basic::AMQPMethod::Nack(basic::Nack { delivery_tag: seq, multiple: false, requeue: false })
        };
        self.send(id, Method::Basic(method));
    }

    /// A persistent publish's fsync returned (or failed): confirm it if its channel is still open.
    pub(super) fn durable_confirmed(&mut self, id: u16, epoch: u64, seq: u64, ok: bool) {
        let Some(ch) = self.channels.get_mut(&id).filter(|c| c.phase == ChannelPhase::Open && c.epoch == epoch) else {
            return;
        };
        if seq == COMMIT_SEQ {
            if ok {
                self.send(id, Method::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
            } else {
                let err = AmqpError::channel(code::INTERNAL_ERROR, "could not store the transaction's messages")
                    .at(ids::TX_COMMIT);
                self.close_channel_with(id, err);
            }
            return;
        }
        let Some(confirms) = ch.confirms() else { return };
        let confirm = confirms.fsynced(seq, ok);
        self.send_confirm(id, confirm);
    }

    /// Sends the coalesced confirm ack of one channel (`multiple` covers every earlier sequence number).
    pub(super) fn flush_channel_confirms(&mut self, id: u16) {
        let Some(confirms) = self.channels.get_mut(&id).and_then(Channel::confirms) else { return };
        let Some((seq, multiple)) = confirms.take_coalesced() else { return };
        self.send(id, Method::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: seq, multiple })));
    }

    pub(super) fn flush_confirms(&mut self) {
        let ids: Vec<u16> = self.channels.iter().filter(|(_, c)| c.has_coalesced_confirm()).map(|(i, _)| *i).collect();
        for id in ids {
            self.flush_channel_confirms(id);
        }
    }
}
