//! `mailroom bench`: an AMQP 0-9-1 load generator that is never the bottleneck.
//!
//! Setup (handshake, declares, qos, consume) goes through amq-protocol; the hot loops do not. A
//! producer pre-encodes one publish, fills a large buffer with copies of it and per batch patches
//! only the timestamp and sequence number before one `write`; a consumer scans frame headers
//! straight out of a 4 MiB read buffer, reads the timestamp from each body and acks in one write
//! per read. This is the lavinmqperf approach; lapin awaiting each publish manages ~30k msg/s here.
//! `--sink`/`--source` swap the broker for an in-process fake so the bench's own ceiling can be
//! measured. The run ends with one `RESULT key=value ...` line for scripts.

mod conn;
mod consumer;
mod cpu;
mod delayed;
mod fake;
mod fsyncs;
mod histogram;
mod pacer;
mod producer;
mod wire;

#[cfg(test)]
mod tests;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use amq_protocol::uri::AMQPUri;
use tokio::sync::watch;

use consumer::{Consumer, ConsumerStats};
use histogram::Histogram;
use producer::{Plan, Producer};

/// How long consumers may go without a message, after producers finish, before we stop waiting.
const DRAIN_IDLE: Duration = Duration::from_secs(3);

/// Options of `mailroom bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Broker to drive (ignored with --sink/--source).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2F")]
    pub uri: String,
    /// Publishing connections.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consuming connections (spread over the queues).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Body size in bytes (at least 16: an 8-byte timestamp and an 8-byte sequence number).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(16..=(128 << 20)))]
    pub size: u64,
    /// Publish with delivery-mode 2 to durable queues.
    #[arg(long)]
    pub persistent: bool,
    /// Publisher confirms with at most WINDOW unconfirmed messages per producer.
    #[arg(long, value_name = "WINDOW", value_parser = clap::value_parser!(u64).range(1..))]
    pub confirm: Option<u64>,
    /// basic.qos prefetch per consumer (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub prefetch: u16,
    /// Consume with no-ack (otherwise acks are sent).
    #[arg(long)]
    pub auto_ack: bool,
    /// Manual ack: one ack with multiple=true every N messages (clamped to the prefetch).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub multiple_ack_every: u64,
    /// Number of queues; producer i publishes to queue i mod K unless --fanout.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub queues: u64,
    /// Publish to a fanout exchange bound to every queue.
    #[arg(long)]
    pub fanout: bool,
    /// Total publish rate in msg/s for latency runs (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Step of the pacing grid in µs (kept by a timerfd): a rate-paced producer writes on these ticks from the
    /// start the messages due by then. At 100,000 msg/s the default makes one 100-message write each
    /// millisecond, 50 makes 5-message writes (and costs both sides far more CPU).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub tick_us: u64,
    /// Run for this many seconds (default 10 unless --count is given).
    #[arg(long, conflicts_with = "count")]
    pub duration: Option<f64>,
    /// Publish this many messages in total (or, consumers only, consume this many).
    #[arg(long)]
    pub count: Option<u64>,
    /// Broker process whose CPU seconds to report.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Use this queue name (or NAME-i with several queues), declared and kept after the run;
    /// without it fresh auto-delete queues are declared and deleted at the end.
    #[arg(long)]
    pub queue_name: Option<String>,
    /// No broker: an in-process fake peer that discards publishes (and confirms them).
    #[arg(long)]
    pub sink: bool,
    /// No broker: an in-process fake peer that streams deliveries to the consumers.
    #[arg(long)]
    pub source: bool,
    /// Runtime threads for the bench (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Target bytes per publish write.
    #[arg(long, default_value_t = 256 << 10)]
    pub batch_bytes: usize,
    /// Delay accuracy: publish through an `x-delayed-message` exchange with `x-delay` uniform in
    /// [--delay-min-ms, MAX_MS]; latency is then lateness past each message's due time.
    #[arg(long, value_name = "MAX_MS", conflicts_with_all = ["fanout", "sink", "source", "rate"])]
    pub delayed: Option<u64>,
    /// Smallest `x-delay` with --delayed, in ms.
    #[arg(long, default_value_t = 0, requires = "delayed")]
    pub delay_min_ms: u64,
    /// Read the broker's fsync count here before and after the run (fsyncs/s on the RESULT line):
    /// Mailroom's `http://HOST:15672/metrics`, or RabbitMQ's `http://USER:PASS@HOST:15672/api/nodes`.
    #[arg(long, value_name = "URL", conflicts_with = "fsyncs_cmd")]
    pub metrics_url: Option<String>,
    /// Instead of --metrics-url: a shell command printing the broker's cumulative fsync count (its output's
    /// last number), run before and after the run.
    #[arg(long, value_name = "CMD")]
    pub fsyncs_cmd: Option<String>,
}

/// What can go wrong in a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Socket or /proc I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something we cannot make sense of.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The broker closed a channel or the connection.
    #[error("broker closed the {}: {code} {text}", if *channel { "channel" } else { "connection" })]
    Closed {
        /// AMQP reply code.
        code: u16,
        /// Reply text.
        text: String,
        /// Channel (true) or connection (false).
        channel: bool,
    },
    /// Bad command-line options.
    #[error("usage: {0}")]
    Usage(String),
}

/// Counters shared by every task of a run.
#[derive(Debug)]
pub struct Shared {
    /// Set to true to stop every loop.
    pub stop: watch::Sender<bool>,
    /// Messages consumed so far (all consumers).
    pub consumed: AtomicU64,
    /// Messages published so far (confirmed ones, with confirms).
    pub published: AtomicU64,
    /// Consumers stop once `consumed` reaches this.
    pub target: AtomicU64,
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since a process-wide epoch: the timestamp written into bodies.
///
/// Producer, consumer and fake peer share the process, so a monotonic clock is enough and
/// immune to wall-clock steps.
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The outcome of a run, as printed on the RESULT line.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Messages published (confirmed, with confirms).
    pub published: u64,
    /// Messages consumed (all queues).
    pub consumed: u64,
    /// Messages nacked by the broker.
    pub nacked: u64,
    /// Measured window: start to last publish or last delivery, whichever is later.
    pub seconds: f64,
    /// published / publishing time.
    pub publish_rate: f64,
    /// consumed / time until the last delivery.
    pub consume_rate: f64,
    /// Latency percentiles in ms.
    pub p50_ms: f64,
    /// 99th percentile latency in ms.
    pub p99_ms: f64,
    /// 99.9th percentile latency in ms.
    pub p999_ms: f64,
    /// Largest latency in ms.
    pub max_ms: f64,
    /// CPU seconds of the bench (the fake peer excluded).
    pub bench_cpu_s: f64,
    /// CPU seconds of the broker (or of the fake peer), if known.
    pub broker_cpu_s: Option<f64>,
    /// Publish-to-confirm latency, 99th percentile in ms (with confirms).
    pub confirm_p99_ms: Option<f64>,
    /// Broker fsyncs during the run (with --metrics-url or --fsyncs-cmd).
    pub fsyncs: Option<u64>,
}

impl Report {
    /// Messages the broker handled per CPU-second it spent (issue 17's efficiency figure): deliveries
    /// (all consumers; a fanout counts each queue's copy) when anything was consumed, publishes otherwise.
    /// None without the broker's CPU time, or when it spent too little to measure (under 10 ms).
    pub fn msgs_per_broker_cpu_s(&self) -> Option<f64> {
        let messages = if self.consumed > 0 { self.consumed } else { self.published };
        self.broker_cpu_s.filter(|&cpu| cpu >= 0.01).map(|cpu| messages as f64 / cpu)
    }

    /// The single line scripts parse.
    pub fn line(&self) -> String {
        let broker = self.broker_cpu_s.map_or("na".to_string(), |c| format!("{c:.2}"));
        let per_cpu = self.msgs_per_broker_cpu_s().map_or("na".to_string(), |m| format!("{m:.0}"));
        let confirm_p99 = self.confirm_p99_ms.map_or("na".to_string(), |v| format!("{v:.3}"));
        let fsyncs = self.fsyncs.map_or("na".to_string(), |n| n.to_string());
        let fsyncs_per_s =
            self.fsyncs.map_or("na".to_string(), |n| format!("{:.0}", n as f64 / self.seconds.max(1e-9)));
        // Confirmed messages per fsync: how many publishes one group commit covered on average.
        let msgs_per_fsync = match self.fsyncs {
            Some(n) if n > 0 => format!("{:.1}", self.published as f64 / n as f64),
            _ => "na".to_string(),
        };
        format!(
            "RESULT published={} consumed={} nacked={} seconds={:.3} publish_rate={:.0} consume_rate={:.0} \
             p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} bench_cpu_s={:.2} broker_cpu_s={} \
             msgs_per_broker_cpu_s={} confirm_p99_ms={} fsyncs={} fsyncs_per_s={} msgs_per_fsync={}",
            self.published,
            self.consumed,
            self.nacked,
            self.seconds,
            self.publish_rate,
            self.consume_rate,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.bench_cpu_s,
            broker,
            per_cpu,
            confirm_p99,
            fsyncs,
            fsyncs_per_s,
            msgs_per_fsync
        )
    }
}

/// Runs the bench and prints progress to stderr and the RESULT line to stdout.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let report = run_report(args).await?;
    println!("{}", report.line());
    Ok(())
}

/// Runs the bench on its own runtime (so `--threads` holds whatever runtime the caller has).
pub async fn run_report(args: BenchArgs) -> Result<Report, BenchError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("bench".into()).spawn(move || {
        let rt = if args.threads <= 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build()
        };
        let r = match rt {
            Ok(rt) => rt.block_on(bench(args)),
            Err(e) => Err(e.into()),
        };
        let _ = tx.send(r);
    })?;
    rx.await.map_err(|_| BenchError::Protocol("bench thread died".into()))?
}

fn queue_names(args: &BenchArgs) -> (Vec<String>, bool) {
    let k = args.queues as usize;
    match &args.queue_name {
        Some(n) if k == 1 => (vec![n.clone()], false),
        Some(n) => ((0..k).map(|i| format!("{n}-{i}")).collect(), false),
        None => {
            // pid + clock: unique per run, so a crashed run's leftovers never collide.
            let id = format!("mailroom-bench-{}-{}", std::process::id(), now_ns() % 1_000_000_000);
            ((0..k).map(|i| format!("{id}-{i}")).collect(), true)
        }
    }
}

async fn bench(mut args: BenchArgs) -> Result<Report, BenchError> {
    now_ns(); // pin the epoch before any stamp
    if args.sink && !args.source {
        args.consumers = 0;
    }
    if args.source && !args.sink {
        args.producers = 0;
    }
    if args.consumers > 0 && args.consumers < args.queues as usize {
        return Err(BenchError::Usage("need at least one consumer per queue".into()));
    }
    if args.producers == 0 && args.consumers == 0 {
        return Err(BenchError::Usage("nothing to do: no producers and no consumers".into()));
    }
    let duration = match (args.duration, args.count) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, None) => Some(Duration::from_secs(10)),
        (None, Some(_)) => None,
    };
    let fake = if args.sink || args.source {
        Some(fake::FakePeer::start(args.source.then_some(args.size as usize))?)
    } else {
        None
    };
    let uri_s = match &fake {
        Some(f) => format!("amqp://guest:guest@{}/%2F", f.addr),
        None => args.uri.clone(),
    };
    let uri = AMQPUri::from_str(&uri_s).map_err(|e| BenchError::Usage(format!("--uri: {e}")))?;
    let fsync_source = match (&args.metrics_url, &args.fsyncs_cmd) {
        (Some(url), _) => Some(fsyncs::FsyncSource::from_url(url)?),
        (None, Some(cmd)) => Some(fsyncs::FsyncSource::Command(cmd.clone())),
        (None, None) => None,
    };
    let fsyncs_before = match &fsync_source {
        Some(s) => Some(s.read().await?),
        None => None,
    };
    let broker_before = args.broker_pid.map(cpu::process_ticks).transpose()?;
    let self_before = cpu::self_ticks()?;

    // Topology, on a connection of its own that also cleans up at the end.
    let (queues, fresh) = queue_names(&args);
    let exchange = if args.fanout { format!("{}-fanout", queues[0]) } else { String::new() };
    let mut setup = conn::Conn::open(&uri).await?;
    for q in &queues {
        setup.declare_queue(q, args.persistent, fresh).await?;
    }
    if args.fanout {
        setup.declare_fanout(&exchange, args.persistent, &queues).await?;
    }
    let delayed_exchange = format!("{}-delayed", queues[0]);
    if let Some(max) = args.delayed {
        if queues.len() != 1 || args.delay_min_ms > max || args.count.is_none() {
            return Err(BenchError::Usage("--delayed needs --count, one queue and --delay-min-ms <= MAX_MS".into()));
        }
        delayed::declare(&mut setup, &delayed_exchange, args.persistent, &queues[0]).await?;
    }

    let (stop_tx, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        stop: stop_tx,
        consumed: AtomicU64::new(0),
        published: AtomicU64::new(0),
        target: AtomicU64::new(match (args.producers, args.count) {
            (0, Some(c)) => c,
            _ => u64::MAX,
        }),
    });

    // Connect everyone before the clock starts, consumers first so no message waits for them.
    let mut consumers = Vec::new();
    for i in 0..args.consumers {
        let q = &queues[i % queues.len()];
        consumers.push(Consumer::setup(&uri, q, args.prefetch, args.auto_ack, args.multiple_ack_every).await?);
    }
    let mut producers = Vec::new();
    let mut delayed_producers = Vec::new();
    for i in 0..args.producers {
        let share = |total: u64| total / args.producers as u64 + u64::from((i as u64) < total % args.producers as u64);
        if let Some(max) = args.delayed {
            let plan = delayed::DelayedPlan {
                exchange: delayed_exchange.clone(),
                routing_key: queues[0].clone(),
                size: args.size as usize,
                persistent: args.persistent,
                quota: args.count.map_or(u64::MAX, share),
                confirm: args.confirm,
                delay_ms: (args.delay_min_ms, max),
                seed: 0x9E37_79B9_7F4A_7C15 ^ i as u64,
            };
            let mut c = conn::Conn::open(&uri).await?;
            if args.confirm.is_some() {
                c.confirm_select().await?;
            }
            delayed_producers.push((c, plan));
            continue;
        }
        let plan = Plan {
            exchange: exchange.clone(),
            routing_key: if args.fanout { String::new() } else { queues[i % queues.len()].clone() },
            size: args.size as usize,
            persistent: args.persistent,
            confirm: args.confirm,
            quota: args.count.map(share),
            rate: args.rate as f64 / args.producers as f64,
            tick: Duration::from_micros(args.tick_us),
            batch_bytes: args.batch_bytes,
        };
        producers.push(Producer::setup(&uri, plan).await?);
    }

    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let consumer_tasks: Vec<_> = consumers.into_iter().map(|c| tokio::spawn(c.run(shared.clone()))).collect();
    let producer_tasks: Vec<_> = producers
        .into_iter()
        .map(|p| tokio::spawn(p.run(shared.clone(), start, deadline)))
        .chain(delayed_producers.into_iter().map(|(c, plan)| tokio::spawn(delayed::produce(c, plan, shared.clone()))))
        .collect();

    let mut first_err = None;
    let mut published = 0;
    let mut nacked = 0;
    let mut publish_end = start;
    let mut confirm_latency = Histogram::default();
    for t in producer_tasks {
        match t.await {
            Ok(Ok(s)) => {
                published += s.published;
                nacked += s.nacked;
                confirm_latency.merge(&s.confirm_latency);
                publish_end = publish_end.max(s.end.unwrap_or(start));
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(BenchError::Protocol(format!("producer panicked: {e}")));
            }
        }
    }
    if first_err.is_some() {
        let _ = shared.stop.send(true);
    }
    if !consumer_tasks.is_empty() {
        wait_for_consumers(&args, &shared, published, deadline).await;
    }
    let _ = shared.stop.send(true);
    let mut latency = Histogram::default();
    let mut consumed = 0;
    let mut consume_end = start;
    for t in consumer_tasks {
        match t.await {
            Ok(Ok(ConsumerStats { consumed: c, latency: h, last })) => {
                consumed += c;
                latency.merge(&h);
                consume_end = consume_end.max(last.unwrap_or(start));
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(BenchError::Protocol(format!("consumer panicked: {e}")));
            }
        }
    }

    if fresh {
        if args.fanout {
            setup.delete_exchange(&exchange).await?;
        }
        if args.delayed.is_some() {
            setup.delete_exchange(&delayed_exchange).await?;
        }
        for q in &queues {
            setup.delete_queue(q).await?;
        }
    }
    setup.close().await?;
    let fake_cpu = fake.map(fake::FakePeer::shutdown);
    if let Some(e) = first_err {
        return Err(e);
    }

    let self_cpu = cpu::secs(cpu::self_ticks()? - self_before);
    let broker_cpu = match (args.broker_pid, broker_before) {
        (Some(pid), Some(before)) => Some(cpu::secs(cpu::process_ticks(pid)? - before)),
        _ => fake_cpu,
    };
    // Read after the broker's CPU time: a command such as rabbitmqctl eval costs the broker CPU too.
    let fsyncs = match (&fsync_source, fsyncs_before) {
        (Some(s), Some(before)) => Some(s.read().await?.saturating_sub(before)),
        _ => None,
    };
    let secs = |end: Instant| (end - start).as_secs_f64().max(1e-9);
    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(Report {
        published,
        consumed,
        nacked,
        seconds: secs(publish_end.max(consume_end)),
        publish_rate: if published > 0 { published as f64 / secs(publish_end) } else { 0.0 },
        consume_rate: if consumed > 0 { consumed as f64 / secs(consume_end) } else { 0.0 },
        p50_ms: ms(latency.quantile(0.5)),
        p99_ms: ms(latency.quantile(0.99)),
        p999_ms: ms(latency.quantile(0.999)),
        max_ms: ms(latency.max()),
        bench_cpu_s: (self_cpu - fake_cpu.unwrap_or(0.0)).max(0.0),
        broker_cpu_s: broker_cpu,
        confirm_p99_ms: (confirm_latency.len() > 0).then(|| ms(confirm_latency.quantile(0.99))),
        fsyncs,
    })
}

/// After the producers are done: wait until every published message arrived, or progress stops.
async fn wait_for_consumers(args: &BenchArgs, shared: &Shared, published: u64, deadline: Option<Instant>) {
    if args.producers == 0 {
        // Consumers only: run to the count (consumers stop themselves) or the deadline.
        let mut stop = shared.stop.subscribe();
        match deadline {
            Some(d) => {
                let _ = tokio::time::timeout_at(d.into(), stop.wait_for(|s| *s)).await;
            }
            None => {
                let _ = stop.wait_for(|s| *s).await;
            }
        }
        return;
    }
    let expected = published * if args.fanout { args.queues } else { 1 };
    shared.target.store(expected, Ordering::Relaxed);
    let mut last = shared.consumed.load(Ordering::Relaxed);
    let mut idle_since = Instant::now();
    while shared.consumed.load(Ordering::Relaxed) < expected && !*shared.stop.borrow() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = shared.consumed.load(Ordering::Relaxed);
        if now != last {
            last = now;
            idle_since = Instant::now();
        } else if idle_since.elapsed() > DRAIN_IDLE + Duration::from_millis(args.delayed.unwrap_or(0)) {
            eprintln!("bench: gave up waiting: consumed {now} of {expected}");
            break;
        }
    }
}
