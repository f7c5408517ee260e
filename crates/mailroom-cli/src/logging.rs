//! The server's log: to stderr, as text (ANSI colours only when stderr is a terminal and `NO_COLOR` is
//! unset) or as one JSON object per line (`--log-format json`), and the resource alarms' set and cleared
//! lines in RabbitMQ's words.

use mailroom_broker::{AlarmState, Broker};
use std::io::IsTerminal;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, message and fields), for log shippers.
    Json,
}

/// Installs the global subscriber writing to stderr with `filter` (error, warn, info, ... or a directive).
pub fn init(filter: &str, format: LogFormat) -> Result<(), Box<dyn std::error::Error>> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(ansi).try_init()
        }
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    }
    .map_err(|e| format!("cannot install the logger: {e}").into())
}

/// Logs each resource alarm as it is set and cleared, until the broker is dropped: set as a warning,
/// cleared at info (RabbitMQ's levels and words: "memory resource limit alarm set on node ...").
pub async fn log_alarms(broker: Broker, node: String) {
    let mut alarms = broker.alarms();
    drop(broker);
    let mut before = AlarmState::default();
    loop {
        let now = *alarms.borrow_and_update();
        for (name, was, is) in
            [("memory", before.memory, now.memory), ("disk", before.disk, now.disk), ("store", before.store, now.store)]
        {
            match (was, is) {
                (false, true) => tracing::warn!(
                    alarm = name,
                    %node,
                    "{name} resource limit alarm set on node {node}; publishers will be blocked until it clears"
                ),
                (true, false) => {
                    tracing::info!(alarm = name, %node, "{name} resource limit alarm cleared on node {node}")
                }
                _ => {}
            }
        }
        before = now;
        if alarms.changed().await.is_err() {
            return;
        }
    }
}
