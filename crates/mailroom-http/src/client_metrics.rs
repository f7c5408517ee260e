//! Prometheus series of connections and channels, with `rabbitmq_prometheus`'s names (RabbitMQ 3.10):
//! `rabbitmq_connection_*` and `rabbitmq_channel_*`. On `/metrics/per-object` one sample per connection
//! or channel, labelled `channel` as RabbitMQ labels both (it puts the Erlang process id there; Mailroom
//! puts the connection's or channel's name, `"peer -> local"` and `"peer -> local (N)"`); the message
//! counts one sample per channel and exchange (RabbitMQ's `channel_exchange_metrics`, labelled `channel`,
//! `vhost`, `exchange`) or per channel and queue (`channel_queue_metrics`: `channel`, `vhost`, `queue`).
//! On `/metrics` one unlabelled sum each. Read from the snapshot a scrape takes (see [`crate::metrics`]).

use crate::message_stats::channel_name;
use mailroom_broker::{ChannelMessageStats, ChannelSnapshot, ConnectionHandle};
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::fmt;

/// The connections of one scrape, each with its channels (None: it did not answer in time).
pub(crate) type Clients = [(ConnectionHandle, Option<Vec<ChannelSnapshot>>)];

/// A connection series: name (counters without `_total`, which the encoder appends), help, type, value.
type ConnectionSeries = (&'static str, &'static str, MetricType, fn(&ConnectionHandle, usize) -> u64);
/// A channel series: name, help, type, value.
type ChannelSeries = (&'static str, &'static str, MetricType, fn(&ChannelSnapshot) -> u64);

const CONNECTION_SERIES: &[ConnectionSeries] = &[
    (
        "rabbitmq_connection_incoming_bytes",
        "Total number of bytes received on a connection",
        MetricType::Counter,
        |c, _| c.info().traffic.read().0,
    ),
    (
        "rabbitmq_connection_outgoing_bytes",
        "Total number of bytes sent on a connection",
        MetricType::Counter,
        |c, _| c.info().traffic.read().2,
    ),
    (
        "rabbitmq_connection_incoming_packets",
        "Total number of packets received on a connection",
        MetricType::Counter,
        |c, _| c.info().traffic.read().1,
    ),
    (
        "rabbitmq_connection_outgoing_packets",
        "Total number of packets sent on a connection",
        MetricType::Counter,
        |c, _| c.info().traffic.read().3,
    ),
    (
        "rabbitmq_connection_pending_packets",
        "Number of packets waiting to be sent on a connection",
        MetricType::Gauge,
        // RabbitMQ's `send_pend` (bytes, despite the name); Mailroom's: bytes queued for the writer.
        |c, _| c.info().traffic.send_pend(),
    ),
    ("rabbitmq_connection_channels", "Channels on a connection", MetricType::Gauge, |_, channels| channels as u64),
];

/// A channel count series: name (without `_total`), help, the count.
type ChannelCounter = (&'static str, &'static str, fn(&ChannelMessageStats) -> u64);

const CHANNEL_GAUGES: &[ChannelSeries] = &[
    ("rabbitmq_channel_consumers", "Consumers on a channel", MetricType::Gauge, |c| c.consumers.len() as u64),
    ("rabbitmq_channel_messages_unacked", "Delivered but not yet acknowledged messages", MetricType::Gauge, |c| {
        c.unacknowledged
    }),
    ("rabbitmq_channel_messages_unconfirmed", "Published but not yet confirmed messages", MetricType::Gauge, |c| {
        c.unconfirmed
    }),
    (
        "rabbitmq_channel_messages_uncommitted",
        "Messages received in a transaction but not yet committed",
        MetricType::Gauge,
        |c| c.uncommitted_publishes,
    ),
    (
        "rabbitmq_channel_acks_uncommitted",
        "Message acknowledgements in a transaction not yet committed",
        MetricType::Gauge,
        |c| c.uncommitted_acks,
    ),
    (
        "rabbitmq_channel_prefetch",
        "Total limit of unacknowledged messages for all consumers on a channel",
        MetricType::Gauge,
        |c| c.global_prefetch_count as u64,
    ),
];

/// `channel_exchange_metrics`: per channel and exchange.
const EXCHANGE_COUNTERS: &[ChannelCounter] = &[
    ("rabbitmq_channel_messages_published", "Total number of messages published into an exchange on a channel", |s| {
        s.publish
    }),
    (
        "rabbitmq_channel_messages_confirmed",
        "Total number of messages published into an exchange and confirmed on the channel",
        |s| s.confirm,
    ),
    (
        "rabbitmq_channel_messages_unroutable_returned",
        "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
        |s| s.return_unroutable,
    ),
    (
        "rabbitmq_channel_messages_unroutable_dropped",
        "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
        |s| s.drop_unroutable,
    ),
];

/// `channel_queue_metrics`: per channel and queue.
const QUEUE_COUNTERS: &[ChannelCounter] = &[
    (
        "rabbitmq_channel_get_ack",
        "Total number of messages fetched with basic.get in manual acknowledgement mode",
        |s| s.get,
    ),
    (
        "rabbitmq_channel_get",
        "Total number of messages fetched with basic.get in automatic acknowledgement mode",
        |s| s.get_no_ack,
    ),
    (
        "rabbitmq_channel_messages_delivered_ack",
        "Total number of messages delivered to consumers in manual acknowledgement mode",
        |s| s.deliver,
    ),
    (
        "rabbitmq_channel_messages_delivered",
        "Total number of messages delivered to consumers in automatic acknowledgement mode",
        |s| s.deliver_no_ack,
    ),
    ("rabbitmq_channel_messages_redelivered", "Total number of messages redelivered to consumers", |s| s.redeliver),
    ("rabbitmq_channel_messages_acked", "Total number of messages acknowledged by consumers", |s| s.ack),
    ("rabbitmq_channel_get_empty", "Total number of times basic.get operations fetched no message", |s| s.get_empty),
];

/// Writes one sample of a gauge or counter family, labelled when `labels` is given.
fn sample<S: prometheus_client::encoding::EncodeLabelSet>(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: Option<&S>,
    kind: MetricType,
    value: u64,
) -> fmt::Result {
    fn write(m: &mut prometheus_client::encoding::MetricEncoder<'_>, kind: MetricType, value: u64) -> fmt::Result {
        match kind {
            MetricType::Counter => m.encode_counter::<NoLabelSet, _, u64>(&value, None),
            _ => m.encode_gauge(&value),
        }
    }
    match labels {
        Some(l) => write(&mut m.encode_family(l)?, kind, value),
        None => write(m, kind, value),
    }
}

/// Which series a page holds: every one (`/metrics`, `/metrics/per-object`), or the `families` of
/// `/metrics/detailed`, per object, named `rabbitmq_detailed_*`.
#[derive(Clone, Copy)]
pub(crate) enum Page<'a> {
    /// `/metrics` (false: sums) or `/metrics/per-object` (true).
    All { per_object: bool },
    /// `/metrics/detailed?family=...`.
    Detailed { families: &'a [String] },
}

impl Page<'_> {
    fn per_object(&self) -> bool {
        matches!(self, Page::Detailed { .. } | Page::All { per_object: true })
    }

    fn wants(&self, family: &str) -> bool {
        match self {
            Page::All { .. } => true,
            Page::Detailed { families } => families.iter().any(|f| f == family),
        }
    }

    /// The series' name on this page (`rabbitmq_detailed_*` on the detailed page, as RabbitMQ names it).
    fn name(&self, name: &'static str) -> std::borrow::Cow<'static, str> {
        match self {
            Page::All { .. } => name.into(),
            Page::Detailed { .. } => format!("rabbitmq_detailed_{}", name.trim_start_matches("rabbitmq_")).into(),
        }
    }
}

/// Writes the connection and channel series of `clients` that `page` holds.
pub(crate) fn encode(enc: &mut DescriptorEncoder, page: Page<'_>, clients: &Clients) -> fmt::Result {
    let per_object = page.per_object();
    for (i, &(name, help, kind, value)) in CONNECTION_SERIES.iter().enumerate() {
        // The first two are RabbitMQ's connection_coarse_metrics, the rest its connection_metrics.
        if !page.wants(if i < 2 { "connection_coarse_metrics" } else { "connection_metrics" }) {
            continue;
        }
        let name = page.name(name);
        let mut m = enc.encode_descriptor(&name, help, None, kind)?;
        let rows = clients.iter().map(|(c, chs)| (c, value(c, chs.as_ref().map_or(0, Vec::len))));
        if per_object {
            for (c, v) in rows {
                sample(&mut m, Some(&[("channel", c.info().name())]), kind, v)?;
            }
        } else {
            sample::<NoLabelSet>(&mut m, None, kind, rows.map(|(_, v)| v).sum())?;
        }
    }
    let channels = || {
        clients.iter().flat_map(|(c, chs)| {
            let vhost = c.info().vhost.as_str();
            chs.iter().flatten().map(move |ch| (channel_name(&c.info().name(), ch.number), vhost, ch))
        })
    };
    if page.wants("channel_metrics") {
        for &(name, help, kind, value) in CHANNEL_GAUGES {
            let rows = channels().map(|(n, _, ch)| (n, value(ch)));
            channel_family(enc, per_object, &page.name(name), help, kind, rows)?;
        }
    }
    for (counters, family) in
        [(EXCHANGE_COUNTERS, "channel_exchange_metrics"), (QUEUE_COUNTERS, "channel_queue_metrics")]
    {
        if !page.wants(family) {
            continue;
        }
        for &(name, help, value) in counters {
            let name = page.name(name);
            let mut m = enc.encode_descriptor(&name, help, None, MetricType::Counter)?;
            if !per_object {
                let sum = channels().map(|(_, _, ch)| value(&ch.message_stats)).sum();
                sample::<NoLabelSet>(&mut m, None, MetricType::Counter, sum)?;
                continue;
            }
            for (channel, vhost, ch) in channels() {
                let by_exchange = family == "channel_exchange_metrics";
                let (objects, label) =
                    if by_exchange { (&ch.publishes, "exchange") } else { (&ch.deliveries, "queue") };
                for o in objects {
                    let labels = [("channel", channel.as_str()), ("vhost", vhost), (label, o.name.as_str())];
                    sample(&mut m, Some(&labels), MetricType::Counter, value(&o.stats))?;
                }
            }
        }
    }
    Ok(())
}

/// One channel family: a sample per channel, or their sum.
fn channel_family(
    enc: &mut DescriptorEncoder,
    per_object: bool,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl Iterator<Item = (String, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    if per_object {
        for (channel, v) in rows {
            sample(&mut m, Some(&[("channel", channel.as_str())]), kind, v)?;
        }
        Ok(())
    } else {
        sample::<NoLabelSet>(&mut m, None, kind, rows.map(|(_, v)| v).sum())
    }
}
