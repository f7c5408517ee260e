//! The `tx` class: select, commit (commit-ok waits for the transaction's fsyncs) and rollback.

use super::fsync::COMMIT_SEQ;
use super::Connection;
use crate::channel::{settle, TxOp};
use crate::codec::{tx, Method};
use crate::error::{code, AmqpError};

impl Connection {
    pub(super) fn handle_tx(&mut self, id: u16, method: tx::AMQPMethod) -> Result<(), AmqpError> {
        match method {
            tx::AMQPMethod::Select(_) => {
                self.channel(id).select_tx()?;
                self.send(id, Method::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
            }
            tx::AMQPMethod::Commit(_) => {
                let mut ops = self.channel(id).take_tx()?.into_iter();
                let mut tickets = Vec::new();
                while let Some(op) = ops.next() {
                    match op {
                        TxOp::Publish { exchange, message, mandatory } => {
                            match self.route_publish(id, &exchange, message, mandatory) {
                                Ok(stored) => tickets.extend(stored),
                                Err(e) => {
                                    // The commit fails: settlements not applied yet stay unacked, so the
                                    // channel's close requeues them instead of losing them.
                                    self.channel(id).unsettle(ops);
                                    return Err(e);
                                }
                            }
                        }
                        TxOp::Settle { deliveries, ack, requeue } => {
                            if ack {
                                self.channel(id).stats.acked(deliveries.iter().map(|(_, d)| &d.queue));
                            }
                            settle(deliveries.into_iter().map(|(_, d)| d), ack, requeue)
                        }
                    }
                }
                self.poke_channel_consumers(id);
                if tickets.is_empty() {
                    self.send(id, Method::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                } else {
                    // commit-ok only once the transaction's persistent messages are on disk.
                    let epoch = self.channel(id).epoch;
                    self.fsyncs.wait(id, epoch, COMMIT_SEQ, tickets);
                }
            }
            tx::AMQPMethod::Rollback(_) => {
                // Rolled-back acks leave their deliveries unacked, under their tags, as RabbitMQ.
                let ch = self.channel(id);
                let ops = ch.take_tx()?;
                ch.unsettle(ops);
                self.send(id, Method::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})));
            }
            _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected tx method")),
        }
        Ok(())
    }
}
