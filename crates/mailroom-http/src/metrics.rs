//! `GET /metrics`: the broker's counters in the Prometheus text exposition format (version 0.0.4),
//! written by hand: a handful of lines does not warrant a metrics library.
//!
//! Counters (`_total`) only grow while the broker runs; gauges are sampled when scraped. A rate such
//! as fsyncs per second is `rate(mailroom_fsyncs_total[1m])`, or two scrapes apart (what `mailroom
//! bench --metrics-url` does).

use mailroom_broker::Broker;
use std::fmt::Write;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every metric.
pub fn render(broker: &Broker) -> String {
    let sync = broker.sync_stats();
    let (mut queues, mut consumers, mut ready, mut unacked) = (0u64, 0u64, 0u64, 0u64);
    for v in broker.vhosts() {
        for q in v.queues() {
            queues += 1;
            consumers += q.consumer_count() as u64;
            ready += q.message_count() as u64;
            unacked += q.unacked_count() as u64;
        }
    }
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        // Writing to a String cannot fail.
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    };
    metric(
        "mailroom_fsyncs_total",
        "counter",
        "fdatasync/fsync calls of the message store (files and directories).",
        sync.fsyncs as f64,
    );
    metric(
        "mailroom_sync_rounds_total",
        "counter",
        "Group-commit rounds of the message store that synced something.",
        sync.rounds as f64,
    );
    metric(
        "mailroom_synced_records_total",
        "counter",
        "Message records made durable (their publishers' confirms released).",
        sync.records as f64,
    );
    metric(
        "mailroom_sync_failures_total",
        "counter",
        "Group-commit rounds in which a write or fsync failed.",
        sync.failures as f64,
    );
    metric("mailroom_fsync_seconds_total", "counter", "Time spent in fsync calls.", sync.fsync_micros as f64 / 1e6);
    metric(
        "mailroom_stores_failing",
        "gauge",
        "Durable stores that cannot write now (appends nacked, store alarm raised, retrying).",
        sync.failing_stores as f64,
    );
    metric(
        "mailroom_sync_aborted_rounds_total",
        "counter",
        "Group-commit rounds that broke off with a panic (their confirms were nacked).",
        sync.aborted_rounds as f64,
    );
    metric(
        "mailroom_quarantined_records_total",
        "counter",
        "Stored records that failed their checksum, copied to a quarantine file and removed (this process).",
        mailroom_broker::store::quarantined_records_total() as f64,
    );
    metric("mailroom_queues", "gauge", "Queues in every vhost.", queues as f64);
    metric("mailroom_consumers", "gauge", "Consumers in every vhost.", consumers as f64);
    metric("mailroom_queue_messages_ready", "gauge", "Messages ready for delivery, all queues.", ready as f64);
    metric(
        "mailroom_queue_messages_unacked",
        "gauge",
        "Messages delivered and not yet acknowledged, all queues.",
        unacked as f64,
    );
    metric(
        "mailroom_held_bytes",
        "gauge",
        "Message body bytes held by queues (what the memory alarm counts).",
        broker.held_bytes() as f64,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_counters_and_gauges_in_text_format() {
        let broker = Broker::open(mailroom_broker::BrokerConfig::default()).unwrap();
        let text = render(&broker);
        assert!(text.contains("# TYPE mailroom_fsyncs_total counter\nmailroom_fsyncs_total 0\n"), "{text}");
        assert!(text.contains("\nmailroom_queues 0\n"), "{text}");
        // Every sample line is `name value`, after its HELP and TYPE lines.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').unwrap();
            assert!(name.starts_with("mailroom_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }
}
