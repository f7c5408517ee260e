//! The `confirm` class and publisher-confirm delivery: confirm.select, the confirms of persistent
//! publishes once fsynced ([`super::fsync`]), and sending the acks/nacks the channel's [`crate::channel::Confirms`] decides on.

use super::fsync::COMMIT_SEQ;
use super::Connection;
use crate::channel::{ChannelPhase, Confirm};
use crate::codec::{basic, confirm, ids, tx, Method};
use crate::error::{code, AmqpError};

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
        let Some(confirms) = self.channels.get_mut(&id).and_then(|c| c.confirms()) else { return };
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
