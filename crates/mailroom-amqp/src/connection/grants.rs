//! Access checks before each vhost operation of a channel (RabbitMQ's access-control table, see
//! [`mailroom_broker::access::table`]) and the vhost's `max-queues` limit.

use super::Connection;
use crate::authz;
use crate::channel::Channel;
use crate::error::AmqpError;
use mailroom_broker::access::Operation;
use mailroom_broker::{BrokerError, VHost};

impl Connection {
    /// Checks `op` against channel `id`'s grants (403 closes the channel).
    pub(super) fn check_access(&mut self, id: u16, op: &Operation<'_>) -> Result<(), AmqpError> {
        let vhost = self.vhost.as_deref().map_or("", |v| v.name());
        let ch = self.channels.get_mut(&id).expect("channel checked by caller");
        authz::check(&mut ch.access, &self.username, vhost, op)
    }

    /// Checks a `basic.publish`: one atomic load and a cached grant on the usual path, nothing allocated.
    pub(super) fn check_publish(&mut self, id: u16, exchange: &str, routing_key: &str) -> Result<(), AmqpError> {
        let ch = self.channels.get_mut(&id).expect("channel checked by caller");
        check_publish_on(ch, self.vhost.as_deref(), &self.username, exchange, routing_key)
    }
}

/// [`Connection::check_publish`] on a channel already looked up (the publish fast path looks it up once).
pub(super) fn check_publish_on(
    ch: &mut Channel,
    vhost: Option<&VHost>,
    username: &str,
    exchange: &str,
    routing_key: &str,
) -> Result<(), AmqpError> {
    let Some(vhost) = vhost else { return Ok(()) };
    let exchange_is_topic = authz::publish_is_topic(&ch.access, vhost, exchange);
    let op = Operation::Publish { exchange, routing_key, exchange_is_topic };
    authz::check(&mut ch.access, username, vhost.name(), &op)
}

impl Connection {
    /// The vhost's `max-queues` limit, before a queue is created (406).
    pub(super) fn check_queue_limit(&self, vhost: &VHost, queue: &str) -> Result<(), AmqpError> {
        let limits = self.ctx.broker.access().vhost_limits(vhost.name());
        if limits.max_queues.is_none() {
            return Ok(());
        }
        let existing = vhost.queues().len() as u64;
        limits.check_queue(vhost.name(), queue, existing).map_err(|e| AmqpError::from(BrokerError::from(e)))
    }
}
