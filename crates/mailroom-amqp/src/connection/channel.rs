//! The `channel` class: open, close (crossing closes included) and flow.

use super::Connection;
use crate::channel::Channel;
use crate::codec::{channel as chan, Method};
use crate::error::{code, AmqpError};

impl Connection {
    pub(super) fn handle_channel_method(&mut self, id: u16, method: chan::AMQPMethod) -> Result<(), AmqpError> {
        match method {
            chan::AMQPMethod::Open(_) => {
                if self.channels.contains_key(&id) {
                    return Err(AmqpError::connection(code::CHANNEL_ERROR, "second 'channel.open' seen"));
                }
                // A client that reuses the number sent whatever close-ok it meant to send.
                self.crossed_closes.remove(&id);
                let vhost = self.vhost.as_deref().map_or("", |v| v.name());
                let (access, slot) = crate::authz::open_channel(&self.ctx.broker, &self.username, vhost)?;
                self.channel_epoch += 1;
                let mut channel = Channel::with_outbound(self.channel_epoch, std::sync::Arc::clone(&self.credit));
                (channel.access, channel.user_slot) = (access, Some(slot));
                self.channels.insert(id, Box::new(channel));
                self.send(id, Method::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})));
                Ok(())
            }
            // Crossing closes: the client's close-ok for our close, after its own close. Nothing to do.
            chan::AMQPMethod::CloseOk(_) if self.crossed_closes.remove(&id) => Ok(()),
            _ if !self.channels.contains_key(&id) => {
                Err(AmqpError::connection(code::CHANNEL_ERROR, "expected 'channel.open'"))
            }
            chan::AMQPMethod::Close(_) => {
                self.release_channel_resources(id);
                self.channels.remove(&id);
                self.send(id, Method::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})));
                Ok(())
            }
            chan::AMQPMethod::CloseOk(_) => {
                self.channels.remove(&id);
                Ok(())
            }
            chan::AMQPMethod::Flow(flow) => {
                if !flow.active {
                    return Err(AmqpError::connection(code::NOT_IMPLEMENTED, "active=false"));
                }
                self.send(id, Method::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk { active: true })));
                Ok(())
            }
            chan::AMQPMethod::FlowOk(_) => Ok(()),
            _ => Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected channel method")),
        }
    }
}
