//! The management API's `message_stats`: counts read from the broker when a request asks (each queue's
//! and exchange's own counters, the process-wide ones in `mailroom_broker::counters` for the overview),
//! and each count's `*_details.rate`, per second over the last sampling interval, from the snapshots a
//! background task takes every [`SAMPLE_INTERVAL`] (as RabbitMQ's stats collection, every 5 s by default).
//! Also each channel's counts (kept by its connection task, read through a snapshot) and each
//! connection's `recv_oct`/`send_oct` with their rates. Nothing here runs per message: the hot paths only
//! bump their counters.

use mailroom_broker::queue::QueueMessageStats;
use mailroom_broker::{
    counters, Broker, ChannelMessageStats, ChannelSnapshot, ConnectionHandle, ConnectionTraffic, Exchange, Queue, VHost,
};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the sampler snapshots every count (RabbitMQ's `collect_statistics_interval` default).
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Named counts of one object, in RabbitMQ's field names.
pub(crate) type Counts = Vec<(&'static str, u64)>;
/// Per-second rates of one object's counts, by field name.
type RateList = Vec<(&'static str, f64)>;

/// What a set of counts belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    /// The whole node (`/api/overview`).
    Overview,
    /// One vhost, by name.
    VHost(String),
    /// One queue: vhost, name.
    Queue(String, String),
    /// One exchange: vhost, name.
    Exchange(String, String),
    /// One channel, by name (`"peer -> local (N)"`).
    Channel(String),
    /// One connection's traffic, by name (`"peer -> local"`).
    Connection(String),
    /// One channel's publishes through one exchange: channel name, exchange name.
    ChannelExchange(String, String),
    /// One channel's deliveries from one queue: channel name, queue name.
    ChannelQueue(String, String),
}

/// `deliver_get`: every message handed out, by consume or get, with or without ack.
fn deliver_get(deliver: u64, deliver_no_ack: u64, get: u64, get_no_ack: u64) -> u64 {
    deliver + deliver_no_ack + get + get_no_ack
}

/// The node's counts, from the process-wide counters (the ones Prometheus reads).
pub(crate) fn overview_counts() -> Counts {
    use counters::*;
    let (deliver, deliver_no_ack) = (DELIVERED_CONSUME_MANUAL_ACK.get(), DELIVERED_CONSUME_AUTO_ACK.get());
    let (get, get_no_ack) = (DELIVERED_GET_MANUAL_ACK.get(), DELIVERED_GET_AUTO_ACK.get());
    vec![
        ("ack", MESSAGES_ACKNOWLEDGED.get()),
        ("confirm", MESSAGES_CONFIRMED.get()),
        ("deliver", deliver),
        ("deliver_get", deliver_get(deliver, deliver_no_ack, get, get_no_ack)),
        ("deliver_no_ack", deliver_no_ack),
        ("drop_unroutable", DROP_UNROUTABLE.get()),
        ("get", get),
        ("get_empty", GET_EMPTY.get()),
        ("get_no_ack", get_no_ack),
        ("publish", MESSAGES_RECEIVED.get()),
        ("redeliver", MESSAGES_REDELIVERED.get()),
        ("return_unroutable", RETURN_UNROUTABLE.get()),
    ]
}

/// A queue's counts since it was created.
pub(crate) fn queue_counts(q: &Queue) -> Counts {
    counts_of_queue(q.message_stats())
}

/// A queue's counts in RabbitMQ's names.
fn counts_of_queue(s: QueueMessageStats) -> Counts {
    vec![
        ("ack", s.ack),
        ("deliver", s.deliver),
        ("deliver_get", deliver_get(s.deliver, s.deliver_no_ack, s.get, s.get_no_ack)),
        ("deliver_no_ack", s.deliver_no_ack),
        ("get", s.get),
        ("get_empty", s.get_empty),
        ("get_no_ack", s.get_no_ack),
        ("publish", s.publish),
        ("redeliver", s.redeliver),
    ]
}

/// An exchange's counts since it was created: messages in, queue copies out.
pub(crate) fn exchange_counts(e: &Exchange) -> Counts {
    let (publish_in, publish_out) = e.publish_counts();
    vec![("publish_in", publish_in), ("publish_out", publish_out)]
}

/// A vhost's counts: `publish` sums its exchanges' `publish_in`, the rest sum its queues' counts (a
/// deleted queue's counts leave the sum; the rate then reads 0, never negative).
pub(crate) fn vhost_counts(v: &VHost) -> Counts {
    let mut sums = counts_of_queue(QueueMessageStats::default());
    for q in v.queues() {
        for (sum, (_, n)) in sums.iter_mut().zip(queue_counts(&q)) {
            sum.1 += n;
        }
    }
    let publish: u64 = v.exchanges().iter().map(|e| e.publish_counts().0).sum();
    for (name, n) in sums.iter_mut() {
        if *name == "publish" {
            *n = publish;
        }
    }
    sums
}

/// A channel's counts since it opened, in RabbitMQ's names (its channel `message_stats`).
pub(crate) fn channel_counts(s: &ChannelMessageStats) -> Counts {
    vec![
        ("ack", s.ack),
        ("confirm", s.confirm),
        ("deliver", s.deliver),
        ("deliver_get", deliver_get(s.deliver, s.deliver_no_ack, s.get, s.get_no_ack)),
        ("deliver_no_ack", s.deliver_no_ack),
        ("drop_unroutable", s.drop_unroutable),
        ("get", s.get),
        ("get_empty", s.get_empty),
        ("get_no_ack", s.get_no_ack),
        ("publish", s.publish),
        ("redeliver", s.redeliver),
        ("return_unroutable", s.return_unroutable),
    ]
}

/// A channel's counts for one exchange (an item of its `publishes`), in RabbitMQ's names.
pub(crate) fn channel_exchange_counts(s: &ChannelMessageStats) -> Counts {
    vec![
        ("confirm", s.confirm),
        ("drop_unroutable", s.drop_unroutable),
        ("publish", s.publish),
        ("return_unroutable", s.return_unroutable),
    ]
}

/// A channel's counts for one queue (an item of its `deliveries`), in RabbitMQ's names.
pub(crate) fn channel_queue_counts(s: &ChannelMessageStats) -> Counts {
    vec![
        ("ack", s.ack),
        ("deliver", s.deliver),
        ("deliver_get", s.deliver_get()),
        ("deliver_no_ack", s.deliver_no_ack),
        ("get", s.get),
        ("get_empty", s.get_empty),
        ("get_no_ack", s.get_no_ack),
        ("redeliver", s.redeliver),
    ]
}

/// The counts of `vhosts`, summed (the overview of a user who sees only those).
pub(crate) fn vhosts_counts(vhosts: &[std::sync::Arc<VHost>]) -> Counts {
    let mut sums = counts_of_queue(QueueMessageStats::default());
    for v in vhosts {
        for (sum, (_, n)) in sums.iter_mut().zip(vhost_counts(v)) {
            sum.1 += n;
        }
    }
    sums
}

/// A connection's byte counts (`recv_oct`, `send_oct`; their rates go in `*_details` beside them).
pub(crate) fn connection_counts(t: &ConnectionTraffic) -> Counts {
    let (recv_oct, _, send_oct, _) = t.read();
    vec![("recv_oct", recv_oct), ("send_oct", send_oct)]
}

/// The channel name RabbitMQ gives channel `number` of connection `connection`.
pub(crate) fn channel_name(connection: &str, number: u16) -> String {
    format!("{connection} ({number})")
}

/// One snapshot of an object's counts.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    counts: Counts,
}

/// Per-second rates between two snapshots of the same object: a count that went down (the object was
/// deleted and declared again, or a vhost lost a queue) reads 0.
fn rates_between(prev: &Sample, last: &Sample) -> RateList {
    let secs = last.at.saturating_duration_since(prev.at).as_secs_f64();
    last.counts
        .iter()
        .map(|&(name, now)| {
            let before = prev.counts.iter().find(|(n, _)| *n == name).map_or(now, |&(_, c)| c);
            let rate = if secs > 0.0 { now.saturating_sub(before) as f64 / secs } else { 0.0 };
            (name, rate)
        })
        .collect()
}

/// An object's latest snapshot and the rates it ended.
#[derive(Debug)]
struct Series {
    last: Sample,
    rates: RateList,
}

/// The rates of every object as of the last sample.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    state: Mutex<RatesState>,
}

/// Every object's latest snapshot and rates, and when the last round was taken.
#[derive(Debug, Default)]
struct RatesState {
    series: HashMap<Subject, Series>,
    last_round: Option<Instant>,
}

impl Rates {
    /// Takes in one round of snapshots taken `at`: each object's rates become those since its previous
    /// snapshot; an object new since the previous round counts from zero at that round's time (its counts
    /// started at zero when it was created), so a first burst shows; objects not in `round` are forgotten.
    fn record(&self, at: Instant, round: Vec<(Subject, Counts)>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::with_capacity(state.series.len());
        for (subject, counts) in round {
            if counts.iter().all(|&(_, count)| count == 0) {
                // Not kept: its rates are all 0 now, and next round an unknown object counts from zero at
                // this round's time, which is what keeping it would give. Idle channels then cost nothing.
                state.series.remove(&subject);
                continue;
            }
            let last = Sample { at, counts };
            let rates = match (state.series.remove(&subject), state.last_round) {
                (Some(old), _) => rates_between(&old.last, &last),
                (None, Some(prev_at)) => {
                    let zero = last.counts.iter().map(|&(name, _)| (name, 0)).collect();
                    rates_between(&Sample { at: prev_at, counts: zero }, &last)
                }
                (None, None) => last.counts.iter().map(|&(name, _)| (name, 0.0)).collect(),
            };
            next.insert(subject, Series { last, rates });
        }
        state.series = next;
        state.last_round = Some(at);
    }

    /// Snapshots every object of `broker` now, with the `clients` (connections and their channels) just
    /// read from it.
    pub(crate) fn sample(&self, broker: &Broker, clients: &[(ConnectionHandle, Option<Vec<ChannelSnapshot>>)]) {
        let mut round = vec![(Subject::Overview, overview_counts())];
        for (c, channels) in clients {
            let name = c.info().name();
            for ch in channels.iter().flatten() {
                let channel = channel_name(&name, ch.number);
                for p in &ch.publishes {
                    let subject = Subject::ChannelExchange(channel.clone(), p.name.clone());
                    round.push((subject, channel_exchange_counts(&p.stats)));
                }
                for d in &ch.deliveries {
                    round
                        .push((Subject::ChannelQueue(channel.clone(), d.name.clone()), channel_queue_counts(&d.stats)));
                }
                round.push((Subject::Channel(channel), channel_counts(&ch.message_stats)));
            }
            round.push((Subject::Connection(name), connection_counts(&c.info().traffic)));
        }
        for v in broker.vhosts() {
            let vhost = v.name().to_owned();
            for q in v.queues() {
                round.push((Subject::Queue(vhost.clone(), q.name().to_owned()), queue_counts(&q)));
            }
            for e in v.exchanges() {
                round.push((Subject::Exchange(vhost.clone(), e.name().to_owned()), exchange_counts(&e)));
            }
            round.push((Subject::VHost(vhost), vhost_counts(&v)));
        }
        self.record(Instant::now(), round);
    }

    /// `message_stats` for `subject`: each count and its `*_details: {"rate": ...}` (0 until two samples).
    pub(crate) fn render(&self, subject: &Subject, counts: &Counts) -> Value {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rates = state.series.get(subject).map(|s| s.rates.as_slice()).unwrap_or(&[]);
        let mut out = Map::new();
        for &(name, count) in counts {
            let rate = rates.iter().find(|(n, _)| *n == name).map_or(0.0, |&(_, r)| r);
            out.insert(name.to_owned(), json!(count));
            out.insert(format!("{name}_details"), json!({ "rate": rate }));
        }
        Value::Object(out)
    }

    /// `message_stats` for the sum of `subjects`: each count and the sum of their rates (RabbitMQ's
    /// overview of a user who sees only some vhosts sums those vhosts' samples).
    pub(crate) fn render_sum(&self, subjects: &[Subject], counts: &Counts) -> Value {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Map::new();
        for &(name, count) in counts {
            let rate: f64 = subjects
                .iter()
                .filter_map(|s| state.series.get(s))
                .filter_map(|s| s.rates.iter().find(|(n, _)| *n == name))
                .map(|&(_, r)| r)
                .sum();
            out.insert(name.to_owned(), json!(count));
            out.insert(format!("{name}_details"), json!({ "rate": rate }));
        }
        Value::Object(out)
    }
}

/// The background task that samples every [`SAMPLE_INTERVAL`]; it stops when this handle drops.
pub(crate) struct Sampler(tokio::task::JoinHandle<()>);

impl Sampler {
    /// Starts sampling `broker` into `info.rates`.
    pub(crate) fn start(broker: Broker, info: std::sync::Arc<crate::ServerInfo>) -> Sampler {
        Sampler(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut snapshots = crate::snapshots::SnapshotCache::default();
            loop {
                tick.tick().await;
                let clients = snapshots.refresh(broker.connections().list()).await;
                info.rates.sample(&broker, &clients);
            }
        }))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(publish: u64, ack: u64) -> Counts {
        vec![("publish", publish), ("ack", ack)]
    }

    fn rate_of(v: &Value, name: &str) -> f64 {
        v[format!("{name}_details")]["rate"].as_f64().unwrap_or(f64::NAN)
    }

    #[test]
    fn rate_is_the_increase_per_second_since_the_previous_sample() {
        let t0 = Instant::now();
        let prev = Sample { at: t0, counts: counts(100, 10) };
        let last = Sample { at: t0 + Duration::from_secs(4), counts: counts(300, 10) };
        assert_eq!(rates_between(&prev, &last), vec![("publish", 50.0), ("ack", 0.0)]);
    }

    #[test]
    fn a_count_that_went_down_or_no_elapsed_time_reads_zero() {
        let t0 = Instant::now();
        let prev = Sample { at: t0, counts: counts(100, 10) };
        let reset = Sample { at: t0 + Duration::from_secs(5), counts: counts(3, 10) };
        assert_eq!(rates_between(&prev, &reset), vec![("publish", 0.0), ("ack", 0.0)]);
        let same_instant = Sample { at: t0, counts: counts(200, 20) };
        assert_eq!(rates_between(&prev, &same_instant), vec![("publish", 0.0), ("ack", 0.0)]);
    }

    #[test]
    fn rates_rise_with_traffic_then_fall_back_and_forget_deleted_objects() {
        let rates = Rates::default();
        let q = Subject::Queue("/".into(), "q".into());
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        rates.record(at(0), vec![(q.clone(), counts(0, 0))]);
        let first = rates.render(&q, &counts(0, 0));
        assert_eq!((first["publish"].as_u64(), rate_of(&first, "publish")), (Some(0), 0.0));
        rates.record(at(5), vec![(q.clone(), counts(50, 25))]);
        let busy = rates.render(&q, &counts(50, 25));
        assert_eq!((rate_of(&busy, "publish"), rate_of(&busy, "ack")), (10.0, 5.0));
        assert_eq!(busy["publish"], json!(50));
        rates.record(at(10), vec![(q.clone(), counts(50, 25))]);
        let idle = rates.render(&q, &counts(50, 25));
        assert_eq!((rate_of(&idle, "publish"), rate_of(&idle, "ack")), (0.0, 0.0));
        // Deleted: gone from the round, so a queue declared again under the name counts from zero at the
        // previous round.
        rates.record(at(15), vec![]);
        rates.record(at(20), vec![(q.clone(), counts(7, 0))]);
        assert_eq!(rate_of(&rates.render(&q, &counts(7, 0)), "publish"), 1.4);
    }

    #[test]
    fn objects_with_nothing_counted_keep_no_series() {
        let rates = Rates::default();
        let idle = Subject::Channel("127.0.0.1:1 -> 127.0.0.1:5672 (1)".into());
        rates.record(Instant::now(), vec![(idle.clone(), counts(0, 0)), (Subject::Overview, counts(1, 0))]);
        let state = rates.state.lock().unwrap();
        assert!(!state.series.contains_key(&idle), "an idle channel costs no memory");
        assert!(state.series.contains_key(&Subject::Overview));
    }

    #[test]
    fn an_object_created_between_samples_shows_its_first_burst() {
        let rates = Rates::default();
        let q = Subject::Queue("/".into(), "new".into());
        let t0 = Instant::now();
        rates.record(t0, vec![(Subject::Overview, counts(0, 0))]);
        rates.record(t0 + Duration::from_secs(5), vec![(Subject::Overview, counts(20, 0)), (q.clone(), counts(20, 0))]);
        assert_eq!(rate_of(&rates.render(&q, &counts(20, 0)), "publish"), 4.0);
        assert_eq!(rate_of(&rates.render(&Subject::Overview, &counts(20, 0)), "publish"), 4.0);
    }

    #[test]
    fn an_object_never_sampled_renders_its_counts_with_zero_rates() {
        let v = Rates::default().render(&Subject::Overview, &counts(3, 1));
        assert_eq!(v, json!({"publish": 3, "publish_details": {"rate": 0.0}, "ack": 1, "ack_details": {"rate": 0.0}}));
    }

    #[test]
    fn a_sum_of_subjects_sums_their_rates() {
        let rates = Rates::default();
        let (a, b) = (Subject::VHost("a".into()), Subject::VHost("b".into()));
        let t0 = Instant::now();
        rates.record(t0, vec![(a.clone(), counts(0, 0)), (b.clone(), counts(0, 0))]);
        let later = t0 + Duration::from_secs(5);
        rates.record(
            later,
            vec![(a.clone(), counts(10, 5)), (b.clone(), counts(40, 0)), (Subject::Overview, counts(0, 0))],
        );
        let both = rates.render_sum(&[a.clone(), b], &counts(50, 5));
        assert_eq!((both["publish"].as_u64(), rate_of(&both, "publish"), rate_of(&both, "ack")), (Some(50), 10.0, 1.0));
        let one = rates.render_sum(&[a], &counts(10, 5));
        assert_eq!(rate_of(&one, "publish"), 2.0);
        assert_eq!(rate_of(&rates.render_sum(&[], &counts(0, 0)), "publish"), 0.0);
    }

    #[test]
    fn deliver_get_sums_consumes_and_gets_in_both_ack_modes() {
        assert_eq!(deliver_get(1, 2, 3, 4), 10);
    }
}
