//! Running a worker: [`Worker::run`] declares its topology and starts the dispatcher;
//! [`WorkerHandle`] reads its counters and stops or aborts it.

use super::builder::WorkerBuilder;
use super::dispatch::{dispatch_loop, Core};
use super::metrics::{Metrics, MetricsSnapshot};
use super::middleware::{Next, Terminal};
use super::topology::{declare_retry_topology, declare_subscription};
use crate::error::Result;
use crate::retry::RetryPolicy;
use std::sync::Arc;
use tokio::sync::Notify;

/// A configured worker, ready to run.
#[must_use = "a worker does nothing until .run() is awaited"]
pub struct Worker {
    pub(super) builder: WorkerBuilder,
    pub(super) terminal: Terminal,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("queue", &self.builder.queue).finish()
    }
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    metrics: Arc<Metrics>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    queue: String,
}

impl WorkerHandle {
    /// The worker's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }
    /// The queue it consumes.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// Stops taking messages, lets running handlers finish, then cancels the consumer.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
    /// Kills the worker at once, as a crash would: running handlers are dropped mid-way and their
    /// unacked messages go back to the queue for redelivery.
    pub fn abort(self) {
        self.task.abort();
    }
}

impl Worker {
    /// Declares the topology (queue, DLQ, retry queues, bindings) and starts consuming.
    pub async fn run(self) -> Result<WorkerHandle> {
        let b = self.builder;
        if b.queue.is_empty() {
            return Err(crate::Error::Invalid("a worker needs a queue name".into()));
        }
        let bus = b.bus.clone();
        bus.declare_worker_queue(&b.queue, b.single_active).await?;
        let delayed_via = declare_retry_topology(&bus, &b.queue, &b.retry).await?;
        declare_subscription(&bus, &b.queue, &b.bindings, b.filter.as_ref()).await?;
        let sub = bus.transport().consume(&b.queue, b.prefetch).await?;
        let metrics = Arc::new(Metrics::for_worker(&b.queue, &b.name));
        let mut retry = b.retry.clone();
        if b.responder {
            retry = RetryPolicy::new();
        }
        let core = Arc::new(Core {
            bus: bus.clone(),
            queue: Arc::from(b.queue.as_str()),
            name: b.name.clone(),
            retry,
            inbox: b.inbox.clone(),
            filter: b.filter.clone(),
            state: b.state.clone(),
            delayed_via,
            next: Next { layers: Arc::from(b.layers.clone()), index: 0, terminal: self.terminal },
            metrics: Arc::clone(&metrics),
            inflight: Default::default(),
        });
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(dispatch_loop(core, sub, b.concurrency, Arc::clone(&stop)));
        Ok(WorkerHandle { metrics, stop, task, queue: b.queue })
    }
}
