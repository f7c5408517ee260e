//! Hooks of the broker's connection registry: what the management API lists about this connection and
//! its requests (snapshot, close).

use super::{Connection, Phase};
use crate::channel::ChannelMode;
use crate::error::{code, AmqpError};
use mailroom_broker::{
    ChannelSnapshot, ConnectionControl, ConnectionInfo, ConsumerSnapshot, ControlReceiver, FieldTable, Registration,
};
use std::net::SocketAddr;
use std::task::{Context, Poll};

impl Connection {
    /// Lists the connection once it is open (`connection.open-ok`), within its vhost's and user's connection
    /// limits (530 NOT_ALLOWED when one is reached).
    pub(super) fn register(&mut self, vhost: &str) -> Result<(), AmqpError> {
        let info = ConnectionInfo {
            id: self.id,
            peer: self.peer,
            local: self.registry.local,
            user: self.username.clone(),
            vhost: vhost.to_owned(),
            protocol: "AMQP 0-9-1",
            client_properties: std::mem::take(&mut self.registry.client_properties),
            frame_max: self.frame_max,
            channel_max: self.channel_max,
            heartbeat: self.heartbeat.as_secs() as u16,
            connected_at: std::time::SystemTime::now(),
            traffic: std::sync::Arc::clone(&self.traffic),
        };
        let (registration, control) = crate::authz::register(&self.ctx.broker, info)?;
        self.registry.registration = Some(registration);
        self.registry.control = Some(control);
        Ok(())
    }

    /// Answers a management API request.
    pub(super) fn on_control(&mut self, request: ConnectionControl) {
        match request {
            ConnectionControl::Snapshot(reply) => {
                let _ = reply.send(self.channel_snapshots());
            }
            ConnectionControl::Close { reason } => {
                if self.phase == Phase::Open {
                    tracing::info!(peer = %self.peer, %reason, "closing connection on the management API's request");
                    self.close_connection(AmqpError::connection(code::CONNECTION_FORCED, reason));
                }
            }
        }
    }

    /// The open channels with their consumers, as the management API shows them.
    pub(super) fn channel_snapshots(&self) -> Vec<ChannelSnapshot> {
        let mut out: Vec<ChannelSnapshot> = self
            .channels
            .iter()
            .map(|(&number, ch)| {
                let (message_stats, publishes, deliveries) = ch.message_stats();
                (number, ch, message_stats, publishes, deliveries)
            })
            .map(|(number, ch, message_stats, publishes, deliveries)| ChannelSnapshot {
                number,
                prefetch_count: ch.consumer_prefetch,
                global_prefetch_count: ch.channel_prefetch.limit(),
                confirm: matches!(ch.mode, ChannelMode::Confirm(_)),
                transactional: matches!(ch.mode, ChannelMode::Tx(_)),
                unacknowledged: ch.unacked_count() as u64,
                unconfirmed: match &ch.mode {
                    ChannelMode::Confirm(c) => c.unconfirmed() as u64,
                    _ => 0,
                },
                uncommitted_publishes: match &ch.mode {
                    ChannelMode::Tx(tx) => tx.publishes() as u64,
                    _ => 0,
                },
                uncommitted_acks: match &ch.mode {
                    ChannelMode::Tx(tx) => tx.settlements() as u64,
                    _ => 0,
                },
                consumers: ch
                    .consumers
                    .iter()
                    .map(|(tag, c)| ConsumerSnapshot {
                        tag: tag.clone(),
                        id: c.id,
                        queue: c.queue.name().to_owned(),
                        ack_required: !self.consumer_channels.get(&c.id).is_some_and(|r| r.no_ack),
                    })
                    .collect(),
                message_stats,
                publishes,
                deliveries,
            })
            .collect();
        out.sort_by_key(|c| c.number);
        out
    }
}

/// This connection's entry in the broker's registry, and the management API's requests to it.
pub(super) struct Registry {
    /// `client_properties` of `connection.start-ok`, kept until the connection is listed.
    pub(super) client_properties: FieldTable,
    /// Our address the client connected to (the registry's connection name).
    local: SocketAddr,
    /// Keeps this connection listed while it is open; dropping it deregisters.
    registration: Option<Registration>,
    /// The management API's requests (snapshot, close), once listed.
    control: Option<ControlReceiver>,
}

impl Registry {
    /// Not listed yet.
    pub(super) fn new(local: SocketAddr) -> Self {
        Self { client_properties: FieldTable::default(), local, registration: None, control: None }
    }

    /// Leaves the registry (the connection is closing).
    pub(super) fn leave(&mut self) {
        self.registration = None;
        self.control = None;
    }

    /// The next management API request, or `Pending` with `cx`'s task woken by the next one; never one while
    /// the connection is not listed.
    pub(super) fn poll_request(&mut self, cx: &mut Context<'_>) -> Poll<ConnectionControl> {
        match &mut self.control {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Pending,
        }
    }
}
