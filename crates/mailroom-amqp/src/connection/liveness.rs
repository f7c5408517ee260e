//! Timers and flow control of a connection: handshake and close deadlines, heartbeats, the consumer
//! acknowledgement timeout, and blocking a publishing connection while a resource alarm is raised.

use super::{short, Connection, Phase};
use crate::channel::ChannelPhase;
use crate::codec::{connection as conn, Method};
use crate::error::{code, AmqpError};
use tokio::time::Instant;

impl Connection {
    pub(super) fn on_tick(&mut self, handshake_deadline: Instant) {
        let now = Instant::now();
        match self.phase {
            Phase::AwaitStartOk | Phase::AwaitTuneOk | Phase::AwaitOpen if now >= handshake_deadline => {
                self.phase = Phase::Closed;
                return;
            }
            Phase::Closing | Phase::Draining if self.close_deadline.is_some_and(|d| now >= d) => {
                self.phase = Phase::Closed;
                return;
            }
            // Nothing is written while draining, heartbeats included, and the deadline bounds the wait.
            Phase::Draining => return,
            _ => {}
        }
        if !self.heartbeat.is_zero() {
            // A blocked connection is not read, so its silence is ours: heartbeat checks pause (as RabbitMQ).
            if self.blocked {
                self.last_inbound = now;
            }
            if now.duration_since(self.last_inbound) > self.heartbeat * 2 {
                tracing::info!(peer = %self.peer, "missed heartbeats from client, closing");
                self.phase = Phase::Closed;
                return;
            }
            if now.duration_since(self.last_outbound) >= self.heartbeat / 2 {
                self.out.heartbeat();
            }
        }
        if self.phase == Phase::Open {
            self.check_consumer_timeouts(now);
        }
    }

    /// Applies the resource alarms: a connection that has published stops being read while one is raised,
    /// and clients that advertised `connection.blocked` are told (and told again when it clears).
    pub(super) fn update_blocked(&mut self) {
        let alarm = *self.alarms.borrow_and_update();
        let should_block = self.phase == Phase::Open && self.has_published && alarm.any();
        if should_block == self.blocked {
            return;
        }
        self.blocked = should_block;
        if !self.capabilities.connection_blocked || self.phase != Phase::Open {
            // A closing connection is not told anything more.
            return;
        }
        let method = if should_block {
            conn::AMQPMethod::Blocked(conn::Blocked { reason: short(alarm.reason()) })
        } else {
            conn::AMQPMethod::Unblocked(conn::Unblocked {})
        };
        self.send(0, Method::Connection(method));
    }

    pub(super) fn check_consumer_timeouts(&mut self, now: Instant) {
        let limit = self.ctx.config.consumer_timeout;
        if limit.is_zero() {
            return;
        }
        let late: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, c)| {
                c.phase == ChannelPhase::Open && c.oldest_unacked().is_some_and(|t| now.duration_since(t) > limit)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let err = AmqpError::channel(
                code::PRECONDITION_FAILED,
                format!(
                    "delivery acknowledgement on channel {id} timed out. Timeout value used: {} ms. \
                     This timeout value can be configured, see consumers doc guide to learn more",
                    limit.as_millis()
                ),
            );
            self.close_channel_with(id, err);
        }
    }
}
