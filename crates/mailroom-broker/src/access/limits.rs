//! Per-vhost and per-user limits (RabbitMQ's `vhost-limits` and user limits) and the errors that enforce
//! them, worded as RabbitMQ 3.10 words them so a wire layer can send them unchanged.
//!
//! RabbitMQ's semantics: a limit is an integer; a negative one means "no limit" and 0 forbids the
//! resource altogether; a new connection, channel or queue is refused when the current count has reached
//! the limit. The reply codes below were observed on RabbitMQ 3.10.8 with pika: the connection limits
//! answer `connection.open` with 530 NOT_ALLOWED, a channel over the user's limit closes the connection
//! with 530, and a queue over `max-queues` closes the channel with 406 PRECONDITION_FAILED.

use crate::error::{BrokerError, ErrorKind};

/// A vhost's limits (`PUT /api/vhost-limits/{vhost}/max-connections|max-queues`). `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhostLimits {
    /// Client connections open to the vhost.
    pub max_connections: Option<u64>,
    /// Queues in the vhost.
    pub max_queues: Option<u64>,
}

/// A user's limits (`PUT /api/user-limits/{user}/max-connections|max-channels`). `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserLimits {
    /// Connections the user has open, over all vhosts.
    pub max_connections: Option<u64>,
    /// Channels the user has open, over all of its connections.
    pub max_channels: Option<u64>,
}

/// A limit that a new connection, channel or queue would exceed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The vhost's `max-connections` is reached (530 at `connection.open`).
    #[error("access to vhost '{vhost}' refused for user '{user}': connection limit ({limit}) is reached")]
    VhostConnections {
        /// The vhost.
        vhost: String,
        /// The user opening the connection.
        user: String,
        /// The limit.
        limit: u64,
    },
    /// The user's `max-connections` is reached (530 at `connection.open`).
    #[error("connection refused for user '{user}': user connection limit ({limit}) is reached")]
    UserConnections {
        /// The user.
        user: String,
        /// The limit.
        limit: u64,
    },
    /// The user's `max-channels` is reached (530, closes the connection).
    #[error("number of channels opened for user '{user}' has reached the maximum allowed user limit of ({limit})")]
    UserChannels {
        /// The user.
        user: String,
        /// The limit.
        limit: u64,
    },
    /// The vhost's `max-queues` is reached (406, closes the channel).
    #[error("cannot declare queue '{queue}': queue limit in vhost '{vhost}' ({limit}) is reached")]
    VhostQueues {
        /// The queue that was being declared.
        queue: String,
        /// The vhost.
        vhost: String,
        /// The limit.
        limit: u64,
    },
}

impl LimitError {
    /// The AMQP reply code.
    pub fn reply_code(&self) -> u16 {
        match self {
            Self::VhostQueues { .. } => 406,
            _ => 530,
        }
    }

    /// The AMQP reply text, e.g. `NOT_ALLOWED - connection refused for user 'u': ...`.
    pub fn reply_text(&self) -> String {
        let name = if self.reply_code() == 406 { "PRECONDITION_FAILED" } else { "NOT_ALLOWED" };
        format!("{name} - {self}")
    }

    /// Whether the error closes the connection (else only the channel).
    pub fn closes_connection(&self) -> bool {
        self.reply_code() == 530
    }
}

impl From<LimitError> for BrokerError {
    fn from(e: LimitError) -> Self {
        let kind = if e.closes_connection() { ErrorKind::NotAllowed } else { ErrorKind::PreconditionFailed };
        BrokerError::new(kind, e.to_string())
    }
}

/// Reads a RabbitMQ limit value: negative means unlimited.
pub fn limit_from_rabbitmq(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

/// Whether `current` already uses up `limit`.
fn reached(limit: Option<u64>, current: u64) -> Option<u64> {
    limit.filter(|&l| current >= l)
}

impl VhostLimits {
    /// No limits.
    pub fn is_empty(&self) -> bool {
        self.max_connections.is_none() && self.max_queues.is_none()
    }

    /// May `user` open one more connection to `vhost`, which has `open` connections now?
    pub fn check_connection(&self, vhost: &str, user: &str, open: u64) -> Result<(), LimitError> {
        match reached(self.max_connections, open) {
            Some(limit) => Err(LimitError::VhostConnections { vhost: vhost.into(), user: user.into(), limit }),
            None => Ok(()),
        }
    }

    /// May `queue` be created in `vhost`, which has `existing` queues now? (Redeclaring an existing queue
    /// is not checked, as in RabbitMQ.)
    pub fn check_queue(&self, vhost: &str, queue: &str, existing: u64) -> Result<(), LimitError> {
        match reached(self.max_queues, existing) {
            Some(limit) => Err(LimitError::VhostQueues { queue: queue.into(), vhost: vhost.into(), limit }),
            None => Ok(()),
        }
    }
}

impl UserLimits {
    /// No limits.
    pub fn is_empty(&self) -> bool {
        self.max_connections.is_none() && self.max_channels.is_none()
    }

    /// May `user`, who has `open` connections now, open one more?
    pub fn check_connection(&self, user: &str, open: u64) -> Result<(), LimitError> {
        match reached(self.max_connections, open) {
            Some(limit) => Err(LimitError::UserConnections { user: user.into(), limit }),
            None => Ok(()),
        }
    }

    /// May `user`, who has `open` channels now (over all connections), open one more?
    pub fn check_channel(&self, user: &str, open: u64) -> Result<(), LimitError> {
        match reached(self.max_channels, open) {
            Some(limit) => Err(LimitError::UserChannels { user: user.into(), limit }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reply codes and texts as RabbitMQ 3.10.8 sent them to pika (probed on the local node).
    #[test]
    fn errors_read_as_rabbitmq_sends_them() {
        let v = VhostLimits { max_connections: Some(1), max_queues: Some(1) };
        v.check_connection("v", "u", 0).unwrap();
        let e = v.check_connection("sectest-vh", "sectest", 1).unwrap_err();
        assert_eq!(e.reply_code(), 530);
        assert!(e.closes_connection());
        assert_eq!(
            e.reply_text(),
            "NOT_ALLOWED - access to vhost 'sectest-vh' refused for user 'sectest': connection limit (1) is reached"
        );
        v.check_queue("v", "q", 0).unwrap();
        let e = v.check_queue("sectest-vh", "sectest-l1", 1).unwrap_err();
        assert_eq!(e.reply_code(), 406);
        assert!(!e.closes_connection());
        assert_eq!(
            e.reply_text(),
            "PRECONDITION_FAILED - cannot declare queue 'sectest-l1': queue limit in vhost 'sectest-vh' (1) is reached"
        );

        let u = UserLimits { max_connections: Some(1), max_channels: Some(2) };
        u.check_connection("sectest", 0).unwrap();
        let e = u.check_connection("sectest", 1).unwrap_err();
        assert_eq!(
            e.reply_text(),
            "NOT_ALLOWED - connection refused for user 'sectest': user connection limit (1) is reached"
        );
        u.check_channel("sectest", 1).unwrap();
        let e = u.check_channel("sectest", 2).unwrap_err();
        assert_eq!(e.reply_code(), 530);
        assert_eq!(
            e.reply_text(),
            "NOT_ALLOWED - number of channels opened for user 'sectest' has reached the maximum allowed user limit of (2)"
        );
    }

    #[test]
    fn zero_forbids_negative_and_absent_allow() {
        let zero = VhostLimits { max_connections: Some(0), max_queues: Some(0) };
        assert_eq!(
            zero.check_connection("v", "u", 0).unwrap_err().to_string(),
            "access to vhost 'v' refused for user 'u': connection limit (0) is reached"
        );
        assert!(zero.check_queue("v", "q", 0).is_err());
        let none = VhostLimits { max_connections: limit_from_rabbitmq(-1), max_queues: None };
        assert!(none.is_empty());
        none.check_connection("v", "u", u64::MAX).unwrap();
        none.check_queue("v", "q", u64::MAX).unwrap();
        assert_eq!(limit_from_rabbitmq(0), Some(0));
        assert_eq!(limit_from_rabbitmq(7), Some(7));
    }

    #[test]
    fn maps_to_broker_errors() {
        let e: BrokerError = LimitError::UserChannels { user: "u".into(), limit: 1 }.into();
        assert_eq!(e.kind, ErrorKind::NotAllowed);
        let e: BrokerError = LimitError::VhostQueues { queue: "q".into(), vhost: "v".into(), limit: 1 }.into();
        assert_eq!(e.kind, ErrorKind::PreconditionFailed);
        assert_eq!(e.message, "cannot declare queue 'q': queue limit in vhost 'v' (1) is reached");
    }
}
