//! The `exchange` class: declare, delete, bind and unbind, answered on the channel.

use super::Connection;
use crate::codec::{exchange, Method};
use crate::error::{code, AmqpError};

impl Connection {
    /// Handles an `exchange.*` method on an open channel.
    pub(super) fn handle_exchange(&mut self, id: u16, method: exchange::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        match method {
            exchange::AMQPMethod::Declare(d) => {
                let options = mailroom_broker::ExchangeOptions {
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                };
                vhost.declare_exchange(d.exchange.as_str(), d.kind.as_str(), &options)?;
                if !d.nowait {
                    self.send(id, Method::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})));
                }
            }
            exchange::AMQPMethod::Delete(d) => {
                vhost.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    self.send(id, Method::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})));
                }
            }
            exchange::AMQPMethod::Bind(b) => {
                vhost.bind_exchange(b.destination.as_str(), b.source.as_str(), b.routing_key.as_str(), &b.arguments)?;
                if !b.nowait {
                    self.send(id, Method::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})));
                }
            }
            exchange::AMQPMethod::Unbind(b) => {
                vhost.unbind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                if !b.nowait {
                    self.send(id, Method::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})));
                }
            }
            _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected exchange method")),
        }
        Ok(())
    }
}
