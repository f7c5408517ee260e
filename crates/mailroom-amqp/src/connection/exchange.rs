//! The `exchange` class: declare, delete, bind and unbind, answered on the channel.

use super::Connection;
use crate::authz;
use crate::codec::{exchange, Method};
use crate::error::{code, AmqpError};
use mailroom_broker::access::Operation;

impl Connection {
    /// Handles an `exchange.*` method on an open channel.
    pub(super) fn handle_exchange(&mut self, id: u16, method: exchange::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        match method {
            exchange::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                let exists = vhost.exchange(name).is_ok();
                let alternate_exchange = authz::str_arg(&d.arguments, "alternate-exchange");
                let op = Operation::ExchangeDeclare { exchange: name, passive: d.passive, exists, alternate_exchange };
                self.check_access(id, &op)?;
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
                self.check_access(id, &Operation::ExchangeDelete { exchange: d.exchange.as_str() })?;
                vhost.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                if !d.nowait {
                    self.send(id, Method::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})));
                }
            }
            exchange::AMQPMethod::Bind(b) => {
                let op = Operation::ExchangeBind {
                    destination: b.destination.as_str(),
                    source: b.source.as_str(),
                    routing_key: b.routing_key.as_str(),
                    source_is_topic: authz::is_topic(&vhost, b.source.as_str()),
                };
                self.check_access(id, &op)?;
                vhost.bind_exchange(b.destination.as_str(), b.source.as_str(), b.routing_key.as_str(), &b.arguments)?;
                if !b.nowait {
                    self.send(id, Method::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})));
                }
            }
            exchange::AMQPMethod::Unbind(b) => {
                let op = Operation::ExchangeUnbind {
                    destination: b.destination.as_str(),
                    source: b.source.as_str(),
                    routing_key: b.routing_key.as_str(),
                    source_is_topic: authz::is_topic(&vhost, b.source.as_str()),
                };
                self.check_access(id, &op)?;
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
