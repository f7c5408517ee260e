//! The AMQP server's settings and the context every connection task shares (kept apart from the listener so
//! connections depend on it, not on the listener that spawns them).

use mailroom_broker::Broker;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::watch;

/// Largest frame we accept or send (RabbitMQ's default `frame_max`).
pub const DEFAULT_FRAME_MAX: u32 = 131_072;
/// Most channels per connection (RabbitMQ's default `channel_max`).
pub const DEFAULT_CHANNEL_MAX: u16 = 2047;
/// Suggested heartbeat interval in seconds (RabbitMQ's default).
pub const DEFAULT_HEARTBEAT_SECS: u16 = 60;
/// Largest message body we accept (RabbitMQ's `max_message_size` default, 128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: u32 = 128 * 1024 * 1024;
/// Body bytes of deliveries a connection may have between its queues and its socket (handed to it, not yet
/// written): a consumer without a prefetch limit on a deep queue gets no more than this ahead of what its
/// socket takes.
pub const DEFAULT_OUTBOUND_BOUND: u64 = 4 * 1024 * 1024;
/// How long a socket write may make no progress before the connection is closed (NATS's `write_deadline`
/// default): a client that stops reading is cut off and its unacked messages return to their queues, while a
/// slow reader, which makes some progress every few seconds, is kept.
pub const DEFAULT_WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// How long an unacked delivery may stay unacked (RabbitMQ's `consumer_timeout` default, 30 minutes).
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// AMQP server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to listen on (port 0 picks a free port).
    pub listen: Vec<SocketAddr>,
    /// `product` in `server_properties`. Clients such as kombu/celery pick RabbitMQ's `basic.qos` semantics
    /// only when this is "RabbitMQ"; Mailroom implements exactly those semantics, so that is the default.
    pub product: String,
    /// `version` in `server_properties` (kombu compares it with 3.3).
    pub product_version: String,
    /// `information` in `server_properties`.
    pub information: String,
    /// `cluster_name` in `server_properties`.
    pub cluster_name: String,
    /// Largest frame, offered in `connection.tune`.
    pub frame_max: u32,
    /// Most channels, offered in `connection.tune`.
    pub channel_max: u16,
    /// Heartbeat interval offered in `connection.tune` (seconds, 0 = off).
    pub heartbeat: u16,
    /// Largest message body accepted.
    pub max_message_size: u32,
    /// Unacked deliveries older than this close their channel with 406 (zero = never).
    pub consumer_timeout: Duration,
    /// Body bytes of deliveries a connection may hold not yet written to its socket (0 = unbounded).
    pub outbound_bound: u64,
    /// A socket write making no progress for this long closes the connection (zero = never).
    pub write_deadline: Duration,
    /// File descriptors kept back for the stores: a connection that would leave fewer is refused
    /// (None = an eighth of the limit, see [`crate::fds::reserve_for`]).
    pub fd_reserve: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec!["0.0.0.0:5672".parse().expect("valid literal"), "[::]:5672".parse().expect("valid literal")],
            product: "RabbitMQ".into(),
            product_version: "3.10.8".into(),
            information: format!(
                "Mailroom {}, a RabbitMQ-compatible broker. It reports product RabbitMQ so clients pick RabbitMQ's \
                 basic.qos semantics, which it implements.",
                env!("CARGO_PKG_VERSION")
            ),
            cluster_name: "mailroom".into(),
            frame_max: DEFAULT_FRAME_MAX,
            channel_max: DEFAULT_CHANNEL_MAX,
            heartbeat: DEFAULT_HEARTBEAT_SECS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            outbound_bound: DEFAULT_OUTBOUND_BOUND,
            write_deadline: DEFAULT_WRITE_DEADLINE,
            fd_reserve: None,
        }
    }
}

/// What every connection task shares.
pub(crate) struct ServerContext {
    pub(crate) broker: Broker,
    pub(crate) config: ServerConfig,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Every connection's bell, rung on shutdown and when the resource alarms change.
    pub(crate) bells: crate::bells::Bells,
}
