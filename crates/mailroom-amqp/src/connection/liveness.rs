//! Timers and flow control of a connection: handshake and close deadlines, heartbeats, the consumer
//! acknowledgement timeout, and blocking a publishing connection while a resource alarm is raised.
//!
//! One timer per connection, armed for the earliest deadline and re-armed only when it fires or an earlier
//! deadline appears: activity (frames read or written) moves the heartbeat deadlines later without touching
//! the timer, which then fires early once and re-arms. An idle connection with heartbeat 60 s wakes every
//! 30 s to send its heartbeat, and one without heartbeats not at all, instead of a tick every 500 ms.

use super::{short, Connection, Phase};
use crate::channel::ChannelPhase;
use crate::codec::{connection as conn, Method};
use crate::error::{code, AmqpError};
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Added to the consumer-timeout deadline so that the check it triggers finds the delivery late.
const CONSUMER_CHECK_SLACK: Duration = Duration::from_millis(1);

/// The run loop's one timer and the deadlines it serves that are not fields of the connection.
pub(super) struct Timer {
    sleep: Pin<Box<Sleep>>,
    /// When `sleep` fires; none once it fired and nothing re-armed it.
    armed: Option<Instant>,
    /// The handshake must be done by then.
    handshake_deadline: Instant,
    /// When to look for consumer acknowledgement timeouts next (while open with a timeout configured).
    consumer_check: Option<Instant>,
}

impl Timer {
    /// A timer armed for the handshake deadline.
    pub(super) fn new(handshake_deadline: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(handshake_deadline)),
            armed: Some(handshake_deadline),
            handshake_deadline,
            consumer_check: None,
        }
    }

    /// Completes when the timer fires; never while it is not armed (cancel-safe: for the run loop's `select!`).
    pub(super) async fn fired(&mut self) {
        match self.armed {
            Some(_) => self.sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }

    /// Arms the timer for `due` unless it already fires no later (a later deadline is picked up when it fires).
    fn arm(&mut self, due: Instant) {
        if self.armed.is_some_and(|at| at <= due) {
            return;
        }
        self.sleep.as_mut().reset(due);
        self.armed = Some(due);
    }
}

impl Connection {
    /// Arms the timer for the earliest deadline due now; called before the run loop waits.
    pub(super) fn arm_timer(&self, timer: &mut Timer) {
        match self.phase {
            Phase::AwaitStartOk | Phase::AwaitTuneOk | Phase::AwaitOpen => timer.arm(timer.handshake_deadline),
            Phase::Closing | Phase::Draining => {
                if let Some(deadline) = self.close_deadline {
                    timer.arm(deadline);
                }
            }
            Phase::Open | Phase::Closed => {}
        }
        // Nothing is written while draining, heartbeats included.
        if !self.heartbeat.is_zero() && !matches!(self.phase, Phase::Draining | Phase::Closed) {
            timer.arm(self.last_outbound + self.heartbeat / 2);
            timer.arm(self.last_inbound + self.heartbeat * 2);
        }
        let limit = self.ctx.config.consumer_timeout;
        if self.phase == Phase::Open && !limit.is_zero() {
            // First turn after opening: a delivery made from now on is late at now + limit at the earliest.
            let check = *timer.consumer_check.get_or_insert_with(|| Instant::now() + limit);
            timer.arm(check);
        }
    }

    /// The timer fired: ends a connection whose handshake, close or client heartbeats are overdue, sends a
    /// heartbeat when one is due and closes channels whose consumers overstayed the acknowledgement timeout.
    pub(super) fn on_tick(&mut self, timer: &mut Timer) {
        timer.armed = None;
        let now = Instant::now();
        match self.phase {
            Phase::AwaitStartOk | Phase::AwaitTuneOk | Phase::AwaitOpen if now >= timer.handshake_deadline => {
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
            if now.duration_since(self.last_inbound) >= self.heartbeat * 2 {
                tracing::info!(peer = %self.peer, "missed heartbeats from client, closing");
                self.phase = Phase::Closed;
                return;
            }
            if now.duration_since(self.last_outbound) >= self.heartbeat / 2 {
                self.out.heartbeat();
            }
        }
        if self.phase == Phase::Open {
            timer.consumer_check = self.check_consumer_timeouts(now);
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

    /// Closes the channels holding a delivery unacked for longer than the consumer timeout; returns when to
    /// look again (none without a timeout).
    pub(super) fn check_consumer_timeouts(&mut self, now: Instant) -> Option<Instant> {
        let limit = self.ctx.config.consumer_timeout;
        if limit.is_zero() {
            return None;
        }
        // With nothing unacked, a delivery made from now on is late at now + limit at the earliest.
        let mut next = now + limit;
        let mut late = Vec::new();
        for (&id, c) in &self.channels {
            if c.phase != ChannelPhase::Open {
                continue;
            }
            match c.oldest_unacked() {
                Some(t) if now.duration_since(t) > limit => late.push(id),
                Some(t) => next = next.min(t + limit + CONSUMER_CHECK_SLACK),
                None => {}
            }
        }
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
        Some(next)
    }
}
