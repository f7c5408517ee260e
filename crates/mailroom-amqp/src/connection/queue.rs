//! The `queue` class: declare (the direct reply-to pseudo-queue included), bind, unbind, purge and delete.

use super::{short, Connection};
use crate::authz;
use crate::codec::{queue, Method, ShortString};
use crate::error::{code, AmqpError};
use mailroom_broker::access::Operation;
use mailroom_broker::vhost::DIRECT_REPLY_TO;

impl Connection {
    /// Handles a `queue.*` method on an open channel.
    pub(super) fn handle_queue(&mut self, id: u16, method: queue::AMQPMethod) -> Result<(), AmqpError> {
        let vhost = self.vhost();
        let owner = self.id;
        match method {
            queue::AMQPMethod::Declare(d) => {
                let server_named = !d.passive && d.queue.as_str().is_empty();
                if !d.passive {
                    let name = d.queue.as_str();
                    let exists = !server_named && vhost.queue(name, owner).is_ok();
                    if !server_named {
                        let op = Operation::QueueDeclare {
                            queue: name,
                            server_named,
                            passive: false,
                            exists,
                            dead_letter_exchange: authz::str_arg(&d.arguments, "x-dead-letter-exchange"),
                        };
                        self.check_access(id, &op)?;
                    }
                    if !exists {
                        self.check_queue_limit(&vhost, name)?;
                    }
                }
                let dead_letter_exchange = authz::str_arg(&d.arguments, "x-dead-letter-exchange").map(str::to_owned);
                let options = mailroom_broker::QueueOptions {
                    passive: d.passive,
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: d.arguments,
                };
                if d.passive && d.queue.as_str() == DIRECT_REPLY_TO {
                    // RabbitMQ answers this pseudo-queue's passive declare as if one consumer were on it.
                    if !d.nowait {
                        self.send(
                            id,
                            Method::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                                queue: d.queue,
                                message_count: 0,
                                consumer_count: 1,
                            })),
                        );
                    }
                    return Ok(());
                }
                let name = if d.passive && d.queue.as_str().is_empty() {
                    self.queue_name(id, &d.queue)?
                } else {
                    d.queue.as_str().to_owned()
                };
                let ok = vhost.declare_queue(&name, &options, owner)?;
                if server_named {
                    // The generated name is known only now; a refused one is deleted again (new and empty).
                    let op = Operation::QueueDeclare {
                        queue: &ok.name,
                        server_named,
                        passive: false,
                        exists: false,
                        dead_letter_exchange: dead_letter_exchange.as_deref(),
                    };
                    if let Err(e) = self.check_access(id, &op) {
                        let _ = vhost.delete_queue(&ok.name, false, false, owner);
                        return Err(e);
                    }
                }
                self.channel(id).last_queue = Some(ok.name.clone());
                if !d.nowait {
                    self.send(
                        id,
                        Method::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: short(&ok.name),
                            message_count: ok.message_count,
                            consumer_count: ok.consumer_count,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Bind(b) => {
                let name = self.queue_name(id, &b.queue)?;
                let op = Operation::QueueBind {
                    queue: &name,
                    exchange: b.exchange.as_str(),
                    routing_key: b.routing_key.as_str(),
                    exchange_is_topic: authz::is_topic(&vhost, b.exchange.as_str()),
                };
                self.check_access(id, &op)?;
                vhost.bind_queue(&name, b.exchange.as_str(), b.routing_key.as_str(), &b.arguments, owner)?;
                if !b.nowait {
                    self.send(id, Method::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})));
                }
            }
            queue::AMQPMethod::Unbind(b) => {
                let name = self.queue_name(id, &b.queue)?;
                let op = Operation::QueueUnbind {
                    queue: &name,
                    exchange: b.exchange.as_str(),
                    routing_key: b.routing_key.as_str(),
                    exchange_is_topic: authz::is_topic(&vhost, b.exchange.as_str()),
                };
                self.check_access(id, &op)?;
                vhost.unbind_queue(&name, b.exchange.as_str(), b.routing_key.as_str(), &b.arguments, owner)?;
                self.send(id, Method::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})));
            }
            queue::AMQPMethod::Purge(p) => {
                let name = self.queue_name(id, &p.queue)?;
                self.check_access(id, &Operation::Purge { queue: &name })?;
                let n = vhost.purge_queue(&name, owner)?;
                if !p.nowait {
                    self.send(id, Method::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk { message_count: n })));
                }
            }
            queue::AMQPMethod::Delete(d) => {
                let name = self.queue_name(id, &d.queue)?;
                self.check_access(id, &Operation::QueueDelete { queue: &name })?;
                let n = vhost.delete_queue(&name, d.if_unused, d.if_empty, owner)?;
                // The broker queued our own consumers' cancellations synchronously: they go out before
                // delete-ok, so a client that closes on delete-ok still hears them (RabbitMQ usually sends
                // them first too, but each of its channels writes on its own, so not always).
                self.handle_queued_events();
                if !d.nowait {
                    self.send(id, Method::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk { message_count: n })));
                }
            }
            _ => return Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected queue method")),
        }
        Ok(())
    }

    /// Resolves the empty queue name to the channel's last declared queue, as the spec allows.
    pub(super) fn queue_name(&mut self, id: u16, name: &ShortString) -> Result<String, AmqpError> {
        if !name.as_str().is_empty() {
            return Ok(name.as_str().to_owned());
        }
        self.channel(id)
            .last_queue
            .clone()
            .ok_or_else(|| AmqpError::channel(code::NOT_FOUND, "no previously declared queue"))
    }
}
