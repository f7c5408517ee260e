//! A channel's transaction: publishes and settlements held back until `tx.commit`.

use super::UnackedDelivery;
use mailroom_broker::Message;

/// A publish or settlement held back by a transaction until commit.
#[derive(Debug)]
pub enum TxOp {
    /// A publish: exchange, message (boxed: it is much larger than a settle), mandatory flag.
    Publish { exchange: String, message: Box<Message>, mandatory: bool },
    /// A settlement of deliveries (by delivery tag): ack, or reject with/without requeue.
    Settle { deliveries: Vec<(u64, UnackedDelivery)>, ack: bool, requeue: bool },
}

/// The operations of the open transaction, in arrival order.
#[derive(Debug, Default)]
pub struct Tx {
    ops: Vec<TxOp>,
}

impl Tx {
    /// Holds an operation back until commit.
    pub fn push(&mut self, op: TxOp) {
        self.ops.push(op);
    }
    /// Takes the operations, leaving the transaction empty (commit and rollback start a new one).
    pub fn take(&mut self) -> Vec<TxOp> {
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
