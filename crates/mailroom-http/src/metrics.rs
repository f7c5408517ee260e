//! The broker's metrics in Prometheus's formats, with RabbitMQ's metric names (those of the
//! `rabbitmq_prometheus` plugin of RabbitMQ 3.10) so that its Grafana dashboards and alerts work unchanged,
//! plus Mailroom's own `mailroom_*` store metrics. Encoded by the `prometheus-client` library.
//!
//! Two scopes, as RabbitMQ's endpoints: [`Scope::Aggregated`] (`/metrics`) sums the per-queue gauges into
//! one unlabelled sample each; [`Scope::PerObject`] (`/metrics/per-object`) gives one sample per queue,
//! labelled `vhost` and `queue`. Everything is read from the broker when scraped (a
//! [`prometheus_client::collector::Collector`] over a snapshot), except the process-wide counters of
//! [`mailroom_broker::counters`], which the broker bumps as messages flow.
//!
//! Counters (`_total`) only grow while the broker runs; a rate such as fsyncs per second is
//! `rate(mailroom_fsyncs_total[1m])`, or two scrapes apart (what `mailroom bench --metrics-url` does).

use mailroom_broker::counters::{self, Counter};
use mailroom_broker::{Broker, Queue, VHost};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The `Content-Type` of the Prometheus text exposition format (version 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The `Content-Type` of the OpenMetrics text format, served to scrapers that ask for it.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `prometheus_plugin_version` reported in `rabbitmq_build_info` (Mailroom's own version: the
/// exporter is built in).
const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// RabbitMQ's label values for the one protocol and the one queue type Mailroom has.
const PROTOCOL: (&str, &str) = ("protocol", "amqp091");
const QUEUE_TYPE: (&str, &str) = ("queue_type", "rabbit_classic_queue");

/// Which samples a scrape returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Per-queue gauges summed into one sample each (RabbitMQ's `/metrics`).
    Aggregated,
    /// One sample per queue, labelled `vhost` and `queue` (RabbitMQ's `/metrics/per-object`).
    PerObject,
}

/// What `/metrics/detailed` is asked for (RabbitMQ 3.10's `rabbitmq_prometheus`): the metric families
/// named by `family=` query parameters (RabbitMQ's table names; none asked, none rendered), per object,
/// named `rabbitmq_detailed_*`, then `rabbitmq_build_info` and `rabbitmq_identity_info` as on every page;
/// `vhost=` parameters limit the queue families to those vhosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detailed {
    /// The families asked for (unknown ones are ignored, as RabbitMQ does).
    pub families: Vec<String>,
    /// The vhosts whose queues the queue families cover (empty: every vhost).
    pub vhosts: Vec<String>,
}

/// The families `/metrics/detailed` serves, by RabbitMQ's names: the queue families Mailroom has figures
/// for, and the connection and channel ones. RabbitMQ's others (`connection_churn_metrics`,
/// `node_*`, `channel_queue_exchange_metrics`, `ra_metrics`, `auth_attempt_*`, ...) render nothing here.
pub const DETAILED_FAMILIES: [&str; 8] = [
    "queue_coarse_metrics",
    "queue_consumer_count",
    "queue_metrics",
    "connection_coarse_metrics",
    "connection_metrics",
    "channel_metrics",
    "channel_exchange_metrics",
    "channel_queue_metrics",
];

impl Detailed {
    /// Reads `family` and `vhost` parameters from a query string (`family=a&family=b&vhost=%2F`).
    pub fn from_query(query: Option<&str>) -> Detailed {
        let mut d = Detailed::default();
        for p in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let v = crate::api::form_decode(v);
            match k {
                "family" => d.families.push(v),
                "vhost" => d.vhosts.push(v),
                _ => {}
            }
        }
        d
    }

    fn has(&self, family: &str) -> bool {
        self.families.iter().any(|f| f == family)
    }
}

/// Which text format a scrape is encoded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (what RabbitMQ serves).
    Text,
    /// OpenMetrics 1.0 text (for scrapers whose `Accept` asks for it).
    OpenMetrics,
}

impl Format {
    /// OpenMetrics if the `Accept` header lists it, else the 0.0.4 text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// The server's resource limits, which the broker core does not report: set once by the server at start.
#[derive(Debug, Clone, Default)]
pub struct NodeLimits {
    /// The memory high watermark in bytes (`rabbitmq_resident_memory_limit_bytes`), if any.
    pub memory_high_watermark: Option<u64>,
    /// The data directory, whose filesystem's free space is `rabbitmq_disk_space_available_bytes`.
    pub data_dir: Option<PathBuf>,
    /// The free disk limit in bytes (`rabbitmq_disk_space_available_limit_bytes`), if any.
    pub disk_free_limit: Option<u64>,
}

/// Set once by [`set_node_limits`]; process-wide, like the file descriptor limit.
static NODE_LIMITS: OnceLock<NodeLimits> = OnceLock::new();

/// Records the server's resource limits for the metrics (the first call wins; later ones are ignored).
pub fn set_node_limits(limits: NodeLimits) {
    let _ = NODE_LIMITS.set(limits);
}

/// This node's name, `mailroom@<host>` (as RabbitMQ's `rabbit@<host>`): `rabbitmq_identity_info`'s and the logs'.
pub fn node_name() -> String {
    format!("mailroom@{}", crate::host_name())
}

/// Renders every metric, aggregated, in the 0.0.4 text format: the admin port's `GET /metrics`.
pub async fn render(broker: &Broker) -> String {
    render_scope(broker, Scope::Aggregated, Format::Text).await
}

/// Renders every metric of `scope` in `format`.
pub async fn render_scope(broker: &Broker, scope: Scope, format: Format) -> String {
    let snapshot = Snapshot::take(broker, scope).await;
    encode_snapshot(snapshot, format)
}

/// Renders the families `detailed` asks for in `format` (`/metrics/detailed`).
pub async fn render_detailed(broker: &Broker, detailed: Detailed, format: Format) -> String {
    let mut snapshot = Snapshot::take(broker, Scope::PerObject).await;
    if !detailed.vhosts.is_empty() {
        let vhosts = &snapshot.vhosts;
        snapshot.rows.retain(|r| detailed.vhosts.iter().any(|v| v == vhosts[r.vhost].name()));
    }
    snapshot.detailed = Some(detailed);
    encode_snapshot(snapshot, format)
}

/// Encodes a snapshot (separate from [`render_scope`] so that the encoding cost can be measured alone).
fn encode_snapshot(snapshot: Snapshot, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    // Writing to a String cannot fail, and every collector below only returns the writer's errors.
    let _ = match format {
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    out
}

/// One queue's numbers, read once per scrape.
#[derive(Debug)]
struct QueueRow {
    /// Index into [`Snapshot::vhosts`].
    vhost: usize,
    queue: Arc<Queue>,
    ready: u64,
    unacked: u64,
    consumers: u64,
    bytes: u64,
    ready_bytes: u64,
    ram_bytes: u64,
    paged_out: u64,
}

/// Everything one scrape reports, read before encoding (the encoder is synchronous; channel counts are
/// asked of each connection task).
#[derive(Debug)]
struct Snapshot {
    scope: Scope,
    vhosts: Vec<Arc<VHost>>,
    /// One row per queue (per-object scope); in the aggregated scope, one row of sums.
    rows: Vec<QueueRow>,
    totals: Totals,
    connections: u64,
    channels: u64,
    alarms: mailroom_broker::AlarmState,
    sync: mailroom_broker::store::SyncStats,
    quarantined: u64,
    held_bytes: u64,
    process: ProcessStats,
    node_name: String,
    /// Connections and their channels (see [`crate::client_metrics`]).
    clients: Vec<(mailroom_broker::ConnectionHandle, Option<Vec<mailroom_broker::ChannelSnapshot>>)>,
    /// Set for `/metrics/detailed`: only those families are rendered.
    detailed: Option<Detailed>,
}

/// Sums over every queue.
#[derive(Debug, Default)]
struct Totals {
    queues: u64,
    ready: u64,
    unacked: u64,
    consumers: u64,
    bytes: u64,
    ready_bytes: u64,
    ram_bytes: u64,
    paged_out: u64,
}

impl Snapshot {
    async fn take(broker: &Broker, scope: Scope) -> Snapshot {
        let vhosts = broker.vhosts();
        let mut rows = Vec::new();
        let mut totals = Totals::default();
        for (i, v) in vhosts.iter().enumerate() {
            for q in v.queues() {
                let row = QueueRow {
                    vhost: i,
                    ready: q.message_count() as u64,
                    unacked: q.unacked_count() as u64,
                    consumers: q.consumer_count() as u64,
                    bytes: q.message_bytes(),
                    ready_bytes: q.ready_bytes(),
                    ram_bytes: q.held_bytes(),
                    paged_out: q.paged_count() as u64,
                    queue: q,
                };
                totals.queues += 1;
                totals.ready += row.ready;
                totals.unacked += row.unacked;
                totals.consumers += row.consumers;
                totals.bytes += row.bytes;
                totals.ready_bytes += row.ready_bytes;
                totals.ram_bytes += row.ram_bytes;
                totals.paged_out += row.paged_out;
                if scope == Scope::PerObject {
                    rows.push(row);
                }
            }
        }
        let connections = crate::snapshots::with_channels(broker.connections().list()).await;
        let channels = connections.iter().map(|(_, chs)| chs.as_ref().map_or(0, |c| c.len() as u64)).sum();
        Snapshot {
            scope,
            vhosts,
            rows,
            totals,
            connections: connections.len() as u64,
            channels,
            alarms: *broker.alarms().borrow(),
            sync: broker.sync_stats(),
            quarantined: mailroom_broker::store::quarantined_records_total(),
            held_bytes: broker.held_bytes(),
            process: ProcessStats::read(),
            node_name: node_name(),
            clients: connections,
            detailed: None,
        }
    }
}

/// This process's resource use, from /proc (Linux); None where it cannot be read.
#[derive(Debug, Default)]
struct ProcessStats {
    open_fds: Option<u64>,
    max_fds: Option<u64>,
    resident_bytes: Option<u64>,
    disk_free: Option<u64>,
    /// Tasks alive on the runtime that renders the page (the soak test compares them with a baseline).
    alive_tasks: Option<u64>,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count().saturating_sub(1) as u64);
        // "Max open files            65536                65536                files"
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        });
        // "VmRSS:	   12345 kB"
        let resident_bytes = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
        });
        let disk_free = NODE_LIMITS
            .get()
            .and_then(|l| l.data_dir.as_deref())
            .and_then(|dir| mailroom_broker::alarm::free_disk_bytes(dir).ok());
        let alive_tasks = tokio::runtime::Handle::try_current().ok().map(|h| h.metrics().num_alive_tasks() as u64);
        ProcessStats { open_fds, max_fds, resident_bytes, disk_free, alive_tasks }
    }
}

/// Writes one unlabelled gauge.
fn gauge(enc: &mut DescriptorEncoder, name: &'static str, help: &str, v: impl EncodeGaugeValue) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&v)
}

/// Writes one unlabelled counter; `name` is without `_total`, which the encoder appends.
fn counter(enc: &mut DescriptorEncoder, name: &'static str, help: &str, v: impl EncodeCounterValue) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?.encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// Writes one counter with a constant label set (RabbitMQ's `rabbitmq_global_*` carry `protocol` and the like).
fn labelled_counter<const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    labels: [(&str, &str); N],
    c: &Counter,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&c.get(), None)
}

/// Writes an untyped 0/1 sample, as RabbitMQ's alarm metrics.
fn flag(enc: &mut DescriptorEncoder, name: &'static str, help: &str, on: bool) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Unknown)?.encode_gauge(&(on as u64))
}

impl Snapshot {
    /// A per-queue gauge: one sample per queue with `vhost` and `queue` labels, or the unlabelled sum.
    fn queue_gauge(
        &self,
        enc: &mut DescriptorEncoder,
        name: &'static str,
        help: &str,
        value: fn(&QueueRow) -> u64,
        total: u64,
    ) -> fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        if self.scope == Scope::Aggregated {
            return m.encode_gauge(&total);
        }
        for row in &self.rows {
            let labels = [("vhost", self.vhosts[row.vhost].name()), ("queue", row.queue.name())];
            m.encode_family(&labels)?.encode_gauge(&value(row))?;
        }
        Ok(())
    }

    fn encode_rabbitmq(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let t = &self.totals;
        // Object totals (RabbitMQ's TOTALS).
        gauge(enc, "rabbitmq_connections", "Connections currently open", self.connections)?;
        gauge(enc, "rabbitmq_channels", "Channels currently open", self.channels)?;
        gauge(enc, "rabbitmq_consumers", "Consumers currently connected", t.consumers)?;
        gauge(enc, "rabbitmq_queues", "Queues available", t.queues)?;
        // Queues (RabbitMQ's queue_coarse_metrics and queue_metrics).
        self.queue_gauge(
            enc,
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            |r| r.ready,
            t.ready,
        )?;
        self.queue_gauge(
            enc,
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            |r| r.unacked,
            t.unacked,
        )?;
        self.queue_gauge(
            enc,
            "rabbitmq_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            |r| r.ready + r.unacked,
            t.ready + t.unacked,
        )?;
        self.queue_gauge(enc, "rabbitmq_queue_consumers", "Consumers on a queue", |r| r.consumers, t.consumers)?;
        self.queue_gauge(
            enc,
            "rabbitmq_queue_messages_bytes",
            "Size in bytes of ready and unacknowledged messages",
            |r| r.bytes,
            t.bytes,
        )?;
        self.queue_gauge(
            enc,
            "rabbitmq_queue_messages_ready_bytes",
            "Size in bytes of ready messages",
            |r| r.ready_bytes,
            t.ready_bytes,
        )?;
        self.queue_gauge(
            enc,
            "rabbitmq_queue_messages_ram_bytes",
            "Size of ready and unacknowledged messages stored in memory",
            |r| r.ram_bytes,
            t.ram_bytes,
        )?;
        self.queue_gauge(
            enc,
            "rabbitmq_queue_messages_paged_out",
            "Messages paged out to disk",
            |r| r.paged_out,
            t.paged_out,
        )?;
        self.encode_global(enc)?;
        self.encode_resources(enc)?;
        self.encode_identity(enc)
    }

    /// RabbitMQ's `rabbitmq_global_*` counters (its `rabbit_global_counters`), with its labels.
    fn encode_global(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use counters::*;
        labelled_counter(
            enc,
            "rabbitmq_global_messages_received",
            "Total number of messages received from publishers",
            [PROTOCOL],
            &MESSAGES_RECEIVED,
        )?;
        labelled_counter(
            enc,
            "rabbitmq_global_messages_confirmed",
            "Total number of messages confirmed to publishers",
            [PROTOCOL],
            &MESSAGES_CONFIRMED,
        )?;
        let mut m =
            enc.encode_descriptor("rabbitmq_global_consumers", "Current number of consumers", None, MetricType::Gauge)?;
        m.encode_family(&[PROTOCOL])?.encode_gauge(&self.totals.consumers)?;
        let delivered = [
            &DELIVERED_CONSUME_MANUAL_ACK,
            &DELIVERED_CONSUME_AUTO_ACK,
            &DELIVERED_GET_MANUAL_ACK,
            &DELIVERED_GET_AUTO_ACK,
        ];
        let mut m = enc.encode_descriptor(
            "rabbitmq_global_messages_delivered",
            "Total number of messages delivered to consumers",
            None,
            MetricType::Counter,
        )?;
        let all: u64 = delivered.iter().map(|c| c.get()).sum();
        m.encode_family(&[PROTOCOL, QUEUE_TYPE])?.encode_counter::<NoLabelSet, _, u64>(&all, None)?;
        let by_kind: [(&'static str, &str, &Counter); 6] = [
            (
                "rabbitmq_global_messages_delivered_consume_manual_ack",
                "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
                delivered[0],
            ),
            (
                "rabbitmq_global_messages_delivered_consume_auto_ack",
                "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
                delivered[1],
            ),
            (
                "rabbitmq_global_messages_delivered_get_manual_ack",
                "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
                delivered[2],
            ),
            (
                "rabbitmq_global_messages_delivered_get_auto_ack",
                "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
                delivered[3],
            ),
            (
                "rabbitmq_global_messages_redelivered",
                "Total number of messages redelivered to consumers",
                &MESSAGES_REDELIVERED,
            ),
            (
                "rabbitmq_global_messages_acknowledged",
                "Total number of messages acknowledged by consumers",
                &MESSAGES_ACKNOWLEDGED,
            ),
        ];
        for (name, help, c) in by_kind {
            labelled_counter(enc, name, help, [PROTOCOL, QUEUE_TYPE], c)?;
        }
        // Mailroom dead-letters as RabbitMQ's classic queues do (at most once: no confirms from the target).
        let strategy = ("dead_letter_strategy", "at_most_once");
        let dead: [(&'static str, &str, mailroom_broker::queue::DeadLetterReason); 4] = {
            use mailroom_broker::queue::DeadLetterReason::*;
            [
                (
                    "rabbitmq_global_messages_dead_lettered_expired",
                    "Total number of messages dead-lettered due to message TTL exceeded",
                    Expired,
                ),
                (
                    "rabbitmq_global_messages_dead_lettered_rejected",
                    "Total number of messages dead-lettered due to basic.reject or basic.nack",
                    Rejected,
                ),
                (
                    "rabbitmq_global_messages_dead_lettered_maxlen",
                    "Total number of messages dead-lettered due to overflow drop-head or reject-publish-dlx",
                    MaxLen,
                ),
                (
                    "rabbitmq_global_messages_dead_lettered_delivery_limit",
                    "Total number of messages dead-lettered due to delivery-limit exceeded",
                    DeliveryLimit,
                ),
            ]
        };
        for (name, help, reason) in dead {
            let c = &DEAD_LETTERED[reason.counter_index()];
            labelled_counter(enc, name, help, [QUEUE_TYPE, strategy], c)?;
        }
        Ok(())
    }

    /// Alarms and resource use (RabbitMQ's alarm collector and node metrics).
    fn encode_resources(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        flag(
            enc,
            "rabbitmq_alarms_file_descriptor_limit",
            "is 1 if file descriptor limit alarm is in effect (Mailroom has none: connections past its file \
             descriptor reserve are refused instead, so this is always 0)",
            false,
        )?;
        flag(
            enc,
            "rabbitmq_alarms_free_disk_space_watermark",
            "is 1 if free disk space watermark alarm is in effect",
            self.alarms.disk,
        )?;
        flag(
            enc,
            "rabbitmq_alarms_memory_used_watermark",
            "is 1 if VM memory watermark alarm is in effect",
            self.alarms.memory,
        )?;
        let p = &self.process;
        if let Some(v) = p.open_fds {
            gauge(enc, "rabbitmq_process_open_fds", "Open file descriptors", v)?;
        }
        if let Some(v) = p.max_fds {
            gauge(enc, "rabbitmq_process_max_fds", "Open file descriptors limit", v)?;
        }
        if let Some(v) = p.resident_bytes {
            gauge(enc, "rabbitmq_process_resident_memory_bytes", "Memory used in bytes", v)?;
        }
        if let Some(v) = p.alive_tasks {
            gauge(enc, "mailroom_runtime_alive_tasks", "Tasks alive on the server's Tokio runtime.", v)?;
        }
        if let Some(v) = p.disk_free {
            gauge(enc, "rabbitmq_disk_space_available_bytes", "Disk space available in bytes", v)?;
        }
        let limits = NODE_LIMITS.get();
        if let Some(v) = limits.and_then(|l| l.memory_high_watermark) {
            gauge(enc, "rabbitmq_resident_memory_limit_bytes", "Memory high watermark in bytes", v)?;
        }
        if let Some(v) = limits.and_then(|l| l.disk_free_limit) {
            gauge(enc, "rabbitmq_disk_space_available_limit_bytes", "Free disk space low watermark in bytes", v)?;
        }
        Ok(())
    }

    /// `rabbitmq_build_info` and `rabbitmq_identity_info`, which RabbitMQ's dashboards join every panel on.
    fn encode_identity(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let mut m =
            enc.encode_descriptor("rabbitmq_build", "RabbitMQ & Erlang/OTP version info", None, MetricType::Info)?;
        m.encode_info(&[
            ("product_name", "Mailroom"),
            ("product_version", env!("CARGO_PKG_VERSION")),
            ("rabbitmq_version", crate::node::RABBITMQ_COMPAT_VERSION),
            ("prometheus_plugin_version", PLUGIN_VERSION),
            ("prometheus_client_version", "prometheus-client (Rust)"),
            ("erlang_version", "none"),
        ])?;
        let mut m = enc.encode_descriptor(
            "rabbitmq_identity",
            "RabbitMQ node & cluster identity info",
            None,
            MetricType::Info,
        )?;
        // A single node is its own cluster; its permanent id is its name (there is no cluster to outlive it).
        m.encode_info(&[
            ("rabbitmq_node", self.node_name.as_str()),
            ("rabbitmq_cluster", self.node_name.as_str()),
            ("rabbitmq_cluster_permanent_id", self.node_name.as_str()),
        ])
    }

    /// Mailroom's own metrics: the message store's group commit, and the totals it served before the
    /// RabbitMQ names existed.
    fn encode_mailroom(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let s = &self.sync;
        counter(
            enc,
            "mailroom_fsyncs",
            "fdatasync/fsync calls of the message store (files and directories).",
            s.fsyncs,
        )?;
        counter(
            enc,
            "mailroom_sync_rounds",
            "Group-commit rounds of the message store that synced something.",
            s.rounds,
        )?;
        counter(
            enc,
            "mailroom_synced_records",
            "Message records made durable (their publishers' confirms released).",
            s.records,
        )?;
        counter(enc, "mailroom_sync_failures", "Group-commit rounds in which a write or fsync failed.", s.failures)?;
        counter(enc, "mailroom_fsync_seconds", "Time spent in fsync calls.", s.fsync_micros as f64 / 1e6)?;
        gauge(
            enc,
            "mailroom_stores_failing",
            "Durable stores that cannot write now (appends nacked, store alarm raised, retrying).",
            s.failing_stores,
        )?;
        counter(
            enc,
            "mailroom_sync_aborted_rounds",
            "Group-commit rounds that broke off with a panic (their confirms were nacked).",
            s.aborted_rounds,
        )?;
        counter(
            enc,
            "mailroom_quarantined_records",
            "Stored records that failed their checksum, copied to a quarantine file and removed (this process).",
            self.quarantined,
        )?;
        let h = counters::FSYNC_ROUND_SECONDS.snapshot();
        enc.encode_descriptor(
            "mailroom_fsync_round_seconds",
            "Time each group-commit round of the message store waited for its fsyncs (run in parallel).",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        let t = &self.totals;
        gauge(enc, "mailroom_queues", "Queues in every vhost.", t.queues)?;
        gauge(enc, "mailroom_consumers", "Consumers in every vhost.", t.consumers)?;
        gauge(enc, "mailroom_queue_messages_ready", "Messages ready for delivery, all queues.", t.ready)?;
        gauge(
            enc,
            "mailroom_queue_messages_unacked",
            "Messages delivered and not yet acknowledged, all queues.",
            t.unacked,
        )?;
        gauge(
            enc,
            "mailroom_held_bytes",
            "Message body bytes held by queues (what the memory alarm counts).",
            self.held_bytes,
        )
    }
}

impl Snapshot {
    /// `/metrics/detailed`: the queue families asked for, one sample per queue, then the client ones.
    fn encode_detailed(&self, enc: &mut DescriptorEncoder, d: &Detailed) -> fmt::Result {
        type Series = (&'static str, &'static str, fn(&QueueRow) -> u64);
        const COARSE: [Series; 3] = [
            ("rabbitmq_detailed_queue_messages_ready", "Messages ready to be delivered to consumers", |r| r.ready),
            (
                "rabbitmq_detailed_queue_messages_unacked",
                "Messages delivered to consumers but not yet acknowledged",
                |r| r.unacked,
            ),
            ("rabbitmq_detailed_queue_messages", "Sum of ready and unacknowledged messages - total queue depth", |r| {
                r.ready + r.unacked
            }),
        ];
        const CONSUMERS: Series = ("rabbitmq_detailed_queue_consumers", "Consumers on a queue", |r| r.consumers);
        const QUEUE: [Series; 4] = [
            (
                "rabbitmq_detailed_queue_messages_ram_bytes",
                "Size of ready and unacknowledged messages stored in memory",
                |r| r.ram_bytes,
            ),
            ("rabbitmq_detailed_queue_messages_bytes", "Size in bytes of ready and unacknowledged messages", |r| {
                r.bytes
            }),
            ("rabbitmq_detailed_queue_messages_ready_bytes", "Size in bytes of ready messages", |r| r.ready_bytes),
            ("rabbitmq_detailed_queue_messages_paged_out", "Messages paged out to disk", |r| r.paged_out),
        ];
        let mut series: Vec<Series> = Vec::new();
        if d.has("queue_coarse_metrics") {
            series.extend(COARSE);
        }
        // RabbitMQ: queue_consumer_count is a subset of queue_metrics, rendered once.
        if d.has("queue_metrics") || d.has("queue_consumer_count") {
            series.push(CONSUMERS);
        }
        if d.has("queue_metrics") {
            series.extend(QUEUE);
        }
        for (name, help, value) in series {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for row in &self.rows {
                let labels = [("vhost", self.vhosts[row.vhost].name()), ("queue", row.queue.name())];
                m.encode_family(&labels)?.encode_gauge(&value(row))?;
            }
        }
        let page = crate::client_metrics::Page::Detailed { families: &d.families };
        crate::client_metrics::encode(enc, page, &self.clients)?;
        // RabbitMQ 3.10.8 ends every page with these two, the detailed one too (asked for a family or not).
        self.encode_identity(enc)
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        if let Some(d) = &self.detailed {
            return self.encode_detailed(&mut enc, d);
        }
        self.encode_rabbitmq(&mut enc)?;
        let page = crate::client_metrics::Page::All { per_object: self.scope == Scope::PerObject };
        crate::client_metrics::encode(&mut enc, page, &self.clients)?;
        self.encode_mailroom(&mut enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_counters_and_gauges_in_text_format() {
        let broker = Broker::open(mailroom_broker::BrokerConfig::default()).unwrap();
        let text = render(&broker).await;
        assert!(text.contains("# TYPE mailroom_fsyncs_total counter\nmailroom_fsyncs_total 0\n"), "{text}");
        assert!(text.contains("\nmailroom_queues 0\n"), "{text}");
        // Every sample line is `name value` or `name{labels} value`, after its HELP and TYPE lines; the
        // aggregated scope labels only the global counters and the info metrics, never by queue.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("mailroom_") || name.starts_with("rabbitmq_"), "{line}");
            assert!(!name.contains("queue=\""), "{line}");
            value.parse::<f64>().unwrap();
        }
    }

    #[tokio::test]
    async fn per_object_labels_each_queue_and_openmetrics_ends_with_eof() {
        let broker = Broker::open(mailroom_broker::BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("a \"quoted\" name", &Default::default(), 0).unwrap();
        let text = render_scope(&broker, Scope::PerObject, Format::Text).await;
        assert!(
            text.contains("rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"a \\\"quoted\\\" name\"} 0\n"),
            "{text}"
        );
        let om = render_scope(&broker, Scope::Aggregated, Format::OpenMetrics).await;
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE rabbitmq_identity info\n"), "{om}");
    }
}
