//! Ordered processing per key (SQS FIFO message groups, Azure Service Bus sessions): messages with the
//! same key are handled strictly one after another, in the order they were sent; different keys run
//! in parallel, across any number of worker processes.
//!
//! Topology, fixed at setup: a consistent-hash exchange named after the stream (`x-consistent-hash`:
//! built into Mailroom, RabbitMQ's `rabbitmq_consistent_hash_exchange` plugin) and `partitions` durable
//! queues `<name>.p<i>`, each bound with weight 1 and declared with `x-single-active-consumer`.
//! [`Bus::send_keyed`] publishes with the key as routing key, so one key always lands in one partition
//! (while the partition count stays), and FIFO queues keep its messages in order. Every worker process
//! consumes every partition; the broker lets one consumer per partition receive at a time (the others
//! stand by), and each worker handles a partition's messages one at a time (`concurrency(1)`), acking
//! each before the next. When the active consumer goes (crash, stop, lost connection), its unacked
//! message goes back to the head of the partition and the next consumer takes over from there: a key
//! never has two messages in flight at once, and never sees a later one before an earlier one.
//! At-least-once still holds: after a crash the message being handled comes again (use the inbox).
//!
//! Rules that keep the order:
//! - **No delayed retries** (a message waiting in a delay would let the next one of its key overtake
//!   it): [`Partitioned::run`] refuses a policy with delayed rounds. Immediate retries are fine; after
//!   them a message goes to `<name>.p<i>.dlq` and its key continues with the next message.
//! - **Changing the partition count moves keys** (jump hash: going from n to n+1 moves about 1/(n+1) of
//!   them). Drain, then rebind: stop publishing, let every partition empty, stop the workers, declare
//!   the new count (bind the new queues, or unbind and delete the removed ones, last first), restart.
//! - A handler must not outlive its worker's connection: if the connection drops while a handler
//!   still runs, the broker hands the partition to another worker at once.

use crate::bus::Bus;
use crate::envelope::{Envelope, Payload};
use crate::error::{Error, HandlerError, Result};
use crate::pipeline::{MetricsSnapshot, WorkerHandle};
use crate::retry::RetryPolicy;
use crate::transport::{Declaration, ExchangeKind, Published};
use crate::wire::FieldTable;
use crate::Context;
use std::future::Future;
use std::sync::Arc;

/// Header carrying the partition key on every keyed message (the routing key too; the header is for
/// people reading a queue).
pub const PARTITION_KEY_HEADER: &str = "x-mailroom-partition-key";

/// The queue of partition `index` of stream `name`.
pub fn partition_queue(name: &str, index: u16) -> String {
    format!("{name}.p{index}")
}

impl Bus {
    /// Declares a keyed stream: the consistent-hash exchange `name` and `partitions` single-active-
    /// consumer queues bound to it (idempotent; [`Partitioned::run`] calls it).
    pub async fn declare_partitions(&self, name: &str, partitions: u16) -> Result<()> {
        if partitions == 0 {
            return Err(Error::Invalid("a keyed stream needs at least one partition".into()));
        }
        self.declare(Declaration::Exchange { name: name.to_owned(), kind: ExchangeKind::ConsistentHash }).await?;
        for i in 0..partitions {
            let queue = partition_queue(name, i);
            self.declare_worker_queue(&queue, true).await?;
            // Weight 1 each: equal shares. Bucket order is binding order, so bind in index order.
            self.declare(Declaration::Bind {
                queue,
                exchange: name.to_owned(),
                routing_key: "1".into(),
                arguments: FieldTable::default(),
            })
            .await?;
        }
        Ok(())
    }

    /// Sends a command to the keyed stream `name`: handled after every earlier message with the same
    /// `key` and before every later one. Fails with [`Error::NoRoute`] if the stream has no partitions.
    pub async fn send_keyed<T: Payload>(&self, name: &str, key: &str, body: T) -> Result<String> {
        self.send_keyed_envelope(name, key, Envelope::command(body)).await
    }

    /// [`Bus::send_keyed`] with a prepared envelope.
    pub async fn send_keyed_envelope<T: Payload>(&self, name: &str, key: &str, env: Envelope<T>) -> Result<String> {
        let env = env.with_header(PARTITION_KEY_HEADER, key);
        let id = env.id.clone();
        match self.emit(name, key, env, true).await? {
            Published::Confirmed => Ok(id),
            Published::Unroutable => Err(Error::NoRoute(format!("{name} (no partitions bound)"))),
        }
    }

    /// A worker pool for the keyed stream `name` with a fixed number of partitions.
    pub fn partitioned(&self, name: &str, partitions: u16) -> PartitionedBuilder {
        PartitionedBuilder {
            bus: self.clone(),
            name: name.to_owned(),
            partitions,
            prefetch: 16,
            retry: RetryPolicy::new(),
        }
    }
}

/// Builds a keyed worker pool; nothing happens until `.handle(..).run()`.
#[must_use = "a partitioned worker does nothing until .handle(..).run() is awaited"]
#[derive(Debug)]
pub struct PartitionedBuilder {
    bus: Bus,
    name: String,
    partitions: u16,
    prefetch: u16,
    retry: RetryPolicy,
}

impl PartitionedBuilder {
    /// Deliveries buffered per partition (handled one at a time whatever this is).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// The retry policy: immediate retries only (delayed ones would reorder a key).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
    /// The handler, shared by every partition.
    pub fn handle<T, F, Fut>(self, handler: F) -> Partitioned
    where
        T: Payload,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let start: StartFn = Arc::new(move |bus: &Bus, queue: &str, prefetch: u16, retry: RetryPolicy| {
            let handler = Arc::clone(&handler);
            bus.worker(queue)
                .single_active_consumer()
                .concurrency(1)
                .prefetch(prefetch)
                .retry(retry)
                .handle(move |env: Envelope<T>, ctx| handler(env, ctx))
        });
        Partitioned { builder: self, start }
    }
}

type StartFn = Arc<dyn Fn(&Bus, &str, u16, RetryPolicy) -> crate::pipeline::Worker + Send + Sync>;

/// A configured keyed worker pool.
#[must_use = "a partitioned worker does nothing until .run() is awaited"]
pub struct Partitioned {
    builder: PartitionedBuilder,
    start: StartFn,
}

impl std::fmt::Debug for Partitioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitioned").field("name", &self.builder.name).finish()
    }
}

impl Partitioned {
    /// Declares the stream and consumes every partition (one single-active consumer each).
    pub async fn run(self) -> Result<PartitionedHandle> {
        let b = self.builder;
        if b.retry.delayed > 0 {
            return Err(Error::Invalid(
                "a keyed stream cannot use delayed retries: a delayed message would be overtaken by the next one of its key"
                    .into(),
            ));
        }
        b.bus.declare_partitions(&b.name, b.partitions).await?;
        let mut workers = Vec::with_capacity(b.partitions as usize);
        for i in 0..b.partitions {
            let worker = (self.start)(&b.bus, &partition_queue(&b.name, i), b.prefetch, b.retry.clone());
            match worker.run().await {
                Ok(w) => workers.push(w),
                Err(e) => {
                    for w in workers {
                        w.stop().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(PartitionedHandle { workers })
    }
}

/// A running keyed worker pool: one worker per partition.
#[derive(Debug)]
pub struct PartitionedHandle {
    workers: Vec<WorkerHandle>,
}

impl PartitionedHandle {
    /// The counters summed over the partitions.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut sum = MetricsSnapshot::default();
        for w in &self.workers {
            let m = w.metrics();
            sum.received += m.received;
            sum.ok += m.ok;
            sum.failed += m.failed;
            sum.retried += m.retried;
            sum.dead_lettered += m.dead_lettered;
            sum.filtered += m.filtered;
            sum.duplicates += m.duplicates;
            sum.latency_us += m.latency_us;
        }
        sum
    }
    /// Stops every partition's worker gracefully (running handlers finish; standbys take over).
    pub async fn stop(self) {
        for w in self.workers {
            w.stop().await;
        }
    }
    /// Kills them at once, as a crash would.
    pub fn abort(self) {
        for w in self.workers {
            w.abort();
        }
    }
}
