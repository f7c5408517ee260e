//! A channel's transaction: publishes and settlements held back until `tx.commit`.

use super::UnackedDelivery;
use mailroom_broker::client_memory::CLIENT_MEMORY;
use mailroom_broker::Message;
use std::sync::Arc;

/// A publish or settlement held back by a transaction until commit.
#[derive(Debug)]
pub enum TxOp {
    /// A publish: exchange, message (in the `Arc` the broker takes at commit; it is much larger than a
    /// settle), mandatory flag.
    Publish { exchange: String, message: Arc<Message>, mandatory: bool },
    /// A settlement of deliveries (by delivery tag): ack, or reject with/without requeue.
    Settle { deliveries: Vec<(u64, UnackedDelivery)>, ack: bool, requeue: bool },
}

/// The operations of the open transaction, in arrival order. The body bytes of its publishes count in the
/// process's client memory ([`CLIENT_MEMORY`]`.tx`) while it holds them.
#[derive(Debug, Default)]
pub struct Tx {
    ops: Vec<TxOp>,
    /// Body bytes of the publishes in `ops`.
    held: u64,
}

impl Tx {
    /// Holds an operation back until commit.
    pub fn push(&mut self, op: TxOp) {
        if let TxOp::Publish { message, .. } = &op {
            let bytes = message.body.len() as u64;
            self.held += bytes;
            CLIENT_MEMORY.tx.add(bytes);
        }
        self.ops.push(op);
    }
    /// Takes the operations, leaving the transaction empty (commit and rollback start a new one).
    pub fn take(&mut self) -> Vec<TxOp> {
        CLIENT_MEMORY.tx.sub(std::mem::take(&mut self.held));
        std::mem::take(&mut self.ops)
    }
    /// Publishes waiting for commit.
    pub fn publishes(&self) -> usize {
        self.ops.iter().filter(|op| matches!(op, TxOp::Publish { .. })).count()
    }
    /// Settlements waiting for commit.
    pub fn settlements(&self) -> usize {
        self.ops.iter().filter(|op| matches!(op, TxOp::Settle { .. })).count()
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        // A channel closed with an open transaction drops its publishes.
        CLIENT_MEMORY.tx.sub(self.held);
    }
}
