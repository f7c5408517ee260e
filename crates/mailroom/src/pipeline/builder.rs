//! Configuring a worker: [`WorkerBuilder`] and its switches (prefetch, concurrency, retry, inbox,
//! filter, layers, state), the [`Bus`] constructors (`worker`, `subscribe`, `endpoint`, `responder`)
//! and the group typestate of subscriptions ([`Subscribe`]).

use super::middleware::Middleware;
use crate::bus::Bus;
use crate::filter::Filter;
use crate::inbox::InboxStore;
use crate::retry::RetryPolicy;
use std::sync::Arc;

/// Builds a worker: a pool of competing consumers on one queue. Nothing happens until `.run()`.
#[must_use = "a worker does nothing until .handle(..).run() is awaited"]
pub struct WorkerBuilder {
    pub(super) bus: Bus,
    pub(super) queue: String,
    pub(super) name: String,
    pub(super) prefetch: u16,
    pub(super) concurrency: usize,
    pub(super) retry: RetryPolicy,
    pub(super) inbox: Option<Arc<dyn InboxStore>>,
    pub(super) filter: Option<Filter>,
    pub(super) layers: Vec<Arc<dyn Middleware>>,
    pub(super) bindings: Vec<String>,
    pub(super) responder: bool,
    pub(super) state: Option<crate::bus::State>,
    pub(super) single_active: bool,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder").field("queue", &self.queue).finish()
    }
}

impl Bus {
    /// A point-to-point worker on `queue` (declared with its DLQ when it runs).
    pub fn worker(&self, queue: &str) -> WorkerBuilder {
        WorkerBuilder {
            bus: self.clone(),
            queue: queue.to_owned(),
            name: queue.to_owned(),
            prefetch: 32,
            concurrency: 8,
            retry: RetryPolicy::new(),
            inbox: None,
            filter: None,
            layers: Vec::new(),
            bindings: Vec::new(),
            responder: false,
            state: None,
            single_active: false,
        }
    }

    /// A subscription to events whose topic matches `pattern` (`orders.*`, `orders.#`); name it with
    /// [`Subscribe::group`]: the group's durable queue gets a copy of each event, and the group's
    /// workers compete for it. Without a group there is nothing to run (a compile-time error):
    ///
    /// ```compile_fail,E0599
    /// # async fn f(bus: mailroom::Bus) {
    /// // error[E0599]: no method named `handle` found for struct `Subscribe`
    /// bus.subscribe("orders.*").handle(|_e: mailroom::Envelope<String>, _ctx| async { Ok(()) });
    /// # }
    /// ```
    pub fn subscribe(&self, pattern: &str) -> Subscribe {
        Subscribe { bus: self.clone(), bindings: vec![pattern.to_owned()] }
    }

    /// An endpoint on `queue` handling several message types, each dispatched by the message's `type`
    /// property to the handler registered with [`WorkerBuilder::on`] for its [`Message::NAME`]
    /// (same as [`Bus::worker`]; the name says what it is for).
    ///
    /// [`Message::NAME`]: crate::Message::NAME
    pub fn endpoint(&self, queue: &str) -> WorkerBuilder {
        self.worker(queue)
    }

    /// A request handler on `queue`: what the handler returns is sent back as the reply; an error
    /// becomes a fault reply (no retries: the requester has a deadline).
    pub fn responder(&self, queue: &str) -> WorkerBuilder {
        let mut w = self.worker(queue);
        w.responder = true;
        w
    }
}

/// A subscription without a group yet: [`Subscribe::group`] names the group's queue and gives the
/// [`WorkerBuilder`] (typestate: an ungrouped subscription cannot be run).
#[must_use = "a subscription needs .group(name), then .handle(..).run()"]
#[derive(Debug)]
pub struct Subscribe {
    bus: Bus,
    bindings: Vec<String>,
}

impl Subscribe {
    /// Also subscribe to `pattern`.
    pub fn topic(mut self, pattern: &str) -> Self {
        self.bindings.push(pattern.to_owned());
        self
    }
    /// Names the subscriber group: its durable queue is called `name`; the group's workers compete.
    pub fn group(self, name: &str) -> WorkerBuilder {
        let mut w = self.bus.worker(name);
        w.bindings = self.bindings;
        w
    }
}

impl WorkerBuilder {
    /// Declares the queue with `x-single-active-consumer`: of all workers on it (in any process), one
    /// at a time receives its messages; when it goes, the next takes over where it stopped. With
    /// `concurrency(1)` that processes the queue strictly in order (see [`crate::partition`]).
    pub fn single_active_consumer(mut self) -> Self {
        self.single_active = true;
        self
    }
    /// Shared state for the handlers, read with [`Context::state`](crate::Context::state) (an `Arc`, no clone per closure).
    /// One value per type; a second call with the same type replaces it.
    pub fn state<S: Send + Sync + 'static>(self, state: S) -> Self {
        self.shared_state(Arc::new(state))
    }
    /// [`WorkerBuilder::state`] with an `Arc` the caller keeps too: `ctx.state::<S>()` hands out clones
    /// of this very `Arc`.
    pub fn shared_state<S: Send + Sync + 'static>(mut self, state: Arc<S>) -> Self {
        let mut map = self.state.take().map(|s| (*s).clone()).unwrap_or_default();
        map.insert(std::any::TypeId::of::<S>(), state);
        self.state = Some(Arc::new(map));
        self
    }
    /// Also subscribe to `pattern` (a group may follow several topics).
    pub fn topic(mut self, pattern: &str) -> Self {
        self.bindings.push(pattern.to_owned());
        self
    }
    /// Most unacked deliveries in flight to this worker.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }
    /// Most handlers running at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// The retry policy (default: none; the first failure dead-letters).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
    /// Skip messages this worker already processed.
    pub fn idempotent(mut self, store: Arc<dyn InboxStore>) -> Self {
        self.inbox = Some(store);
        self
    }
    /// Only handle messages passing `filter` (for subscriptions, header equalities become a
    /// headers-exchange binding; anything else is checked in process and counted).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(match self.filter.take() {
            Some(f) => f.and(filter),
            None => filter,
        });
        self
    }
    /// Adds a user layer (runs after idempotency, before decode), in the order added.
    pub fn layer(mut self, m: impl Middleware) -> Self {
        self.layers.push(Arc::new(m));
        self
    }
}
