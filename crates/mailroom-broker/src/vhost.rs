//! A virtual host: its exchanges, queues and bindings, and the publish path through them.

use crate::args::{self, QueueArguments, QueueType};
use crate::dead_letter;
use crate::error::{BrokerError, ErrorKind, Result};
use crate::exchange::flavor::delayed::{run_release, DelayedMessages, Routed};
use crate::exchange::flavor::{Admit, ExchangeFlavor};
use crate::exchange::{Destination, Exchange, ExchangeKind, ExchangeSpec};
use crate::message::{header_routing_keys, Message};
use crate::paging::Paging;
use crate::policy::{self as policies, Policy};
use crate::queue::{
    ConnectionId, ConsumeOptions, ConsumerId, ConsumerSink, DeadLetterReason, PushOutcome, Queue, QueueHooks,
    QueueSpec, RecoveredIndex,
};
use crate::storage::Durability;
use crate::store::syncer::BatchState;
use crate::store::{BindingDef, Change, DestinationKind, ExchangeDef, PolicyDef, QueueDef, SyncTicket};
use amq_protocol_types::FieldTable;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use tokio::sync::watch;

/// Options of `exchange.declare`.
#[derive(Debug, Clone, Default)]
pub struct ExchangeOptions {
    /// Only check that it exists.
    pub passive: bool,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Not publishable by clients.
    pub internal: bool,
    /// Declared arguments (`alternate-exchange`).
    pub arguments: FieldTable,
}

/// Options of `queue.declare`.
#[derive(Debug, Clone, Default)]
pub struct QueueOptions {
    /// Only check that it exists.
    pub passive: bool,
    /// Survives a restart.
    pub durable: bool,
    /// Owned by the declaring connection.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declared arguments.
    pub arguments: FieldTable,
}

/// What `queue.declare` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclared {
    /// The queue name (server-generated when the request had none).
    pub name: String,
    /// Ready messages.
    pub message_count: u32,
    /// Consumers.
    pub consumer_count: u32,
}

/// The result of publishing one message.
#[derive(Debug, Clone, Default)]
pub struct PublishResult {
    /// At least one queue took the message.
    pub routed: bool,
    /// A queue refused it (`reject-publish` overflow, or its store failed): confirms nack it.
    pub rejected: bool,
    /// A store refused it (backpressure, disk full, store failing), not a length limit: a move (delayed
    /// release) keeps its source and retries.
    pub refused: bool,
    /// One ticket per durable queue that stored it: a confirm waits until all are on disk.
    pub durable: Vec<SyncTicket>,
    /// The queues whose stores took it (a move whose ticket failed waits for a later fsync of these).
    pub stored_in: Vec<Arc<Queue>>,
}

/// Where a redrive sends messages instead of their first death's exchange and routing keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveTarget {
    /// Through an exchange with a routing key.
    Exchange {
        /// The exchange name ("" is the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// Straight to a queue (through the default exchange).
    Queue(String),
}

/// What a redrive moves.
#[derive(Debug, Clone, Default)]
pub struct RedriveOptions {
    /// Most messages to move (None = all).
    pub count: Option<usize>,
    /// Only messages whose header `name` has this string value.
    pub header_filter: Option<(String, String)>,
    /// Where to send them (None = back to their first death's exchange and routing keys).
    pub target: Option<RedriveTarget>,
}

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedriveOutcome {
    /// Messages enqueued at their target and removed from the dead-letter queue.
    pub moved: u64,
    /// Messages left in place: filtered out, without death history, unroutable or refused by the target.
    pub skipped: u64,
}

/// Messages a redrive copies before waiting for their store tickets: one group-commit covers a batch
/// instead of one fsync wait per message.
const REDRIVE_BATCH: usize = 256;

/// Waits until the pending copies are durable at their targets, then removes their originals from the DLQ
/// (a copy whose store write failed leaves its original in place, counted as skipped).
async fn settle_redriven(
    dlq: &Arc<Queue>,
    pending: &mut Vec<(crate::queue::MessageId, Vec<SyncTicket>)>,
    outcome: &mut RedriveOutcome,
) {
    for (id, tickets) in pending.drain(..) {
        let mut stored = true;
        for ticket in tickets {
            if ticket.wait().await.is_err() {
                stored = false;
            }
        }
        if stored {
            // Consumed or expired meanwhile: the copy at the target is then a duplicate, still counted as moved.
            dlq.remove_ready(id);
            outcome.moved += 1;
        } else {
            outcome.skipped += 1;
        }
    }
}

/// The exchange and routing keys of a message's first death: the oldest `x-death` entry, else
/// `x-first-death-exchange` with the message's routing key.
pub fn first_death(message: &Message) -> Option<(String, Vec<String>)> {
    use amq_protocol_types::AMQPValue;
    let headers = message.headers()?;
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") {
        if let Some(AMQPValue::FieldTable(t)) = deaths.as_slice().last() {
            let exchange = t.inner().get("exchange").and_then(args::string_value);
            let keys: Vec<String> = match t.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(items)) => items.as_slice().iter().filter_map(args::string_value).collect(),
                _ => Vec::new(),
            };
            if let Some(exchange) = exchange {
                let keys = if keys.is_empty() { vec![message.routing_key.to_string()] } else { keys };
                return Some((exchange, keys));
            }
        }
    }
    let exchange = headers.inner().get("x-first-death-exchange").and_then(args::string_value)?;
    Some((exchange, vec![message.routing_key.to_string()]))
}

/// A virtual host.
#[derive(Debug)]
pub struct VHost {
    name: String,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    ids: Arc<AtomicU64>,
    myself: Weak<VHost>,
    /// The data directory's store, when the broker is durable.
    durability: Option<Arc<Durability>>,
    /// Policies, applied to existing and future queues.
    policies: RwLock<Vec<Policy>>,
    /// Where queues page message bodies out to, and their memory budget.
    paging: Arc<Paging>,
    /// Dead letters produced while the broker recovers definitions (a policy's length limit applied at
    /// re-declare, say): routed by [`VHost::finish_recovery`] once every binding is back, never before.
    deferred_dead_letters: std::sync::Mutex<Vec<DeferredDeadLetters>>,
    /// Orders durable bind/unbind with the record each appends to the definitions log, so the log's order
    /// of changes to one binding is memory's.
    binding_log: Mutex<()>,
    /// New durable queues whose definition is not on disk yet, with what its save will report: a publish
    /// confirm for a message stored in one also waits for that, or a crash right after the confirm would
    /// lose the queue and the message with it. Usually empty, so publishing checks only `unsaved_count`.
    unsaved: Mutex<Vec<(Arc<Queue>, watch::Receiver<BatchState>)>>,
    unsaved_count: AtomicUsize,
}

/// One batch of dead letters held back until recovery ends, with the source records it must settle.
type DeferredDeadLetters = (Vec<(DeadLetterReason, Vec<Arc<Message>>)>, dead_letter::SourceRecords);

/// The pseudo-queue a requester consumes for direct reply-to, as in RabbitMQ.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Predeclared exchanges, as in RabbitMQ.
const STANDARD_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl VHost {
    /// Creates a vhost with RabbitMQ's standard exchanges; `ids` hands out consumer ids. With
    /// `durability`, durable queues keep persistent messages on disk and definitions are saved.
    pub fn new(
        name: &str,
        ids: Arc<AtomicU64>,
        durability: Option<Arc<Durability>>,
        paging: Arc<Paging>,
    ) -> Arc<VHost> {
        let vhost = Arc::new_cyclic(|myself| VHost {
            name: name.to_owned(),
            exchanges: RwLock::new(HashMap::new()),
            queues: RwLock::new(HashMap::new()),
            ids,
            myself: myself.clone(),
            durability,
            policies: RwLock::new(Vec::new()),
            paging,
            deferred_dead_letters: std::sync::Mutex::new(Vec::new()),
            binding_log: Mutex::new(()),
            unsaved: Mutex::new(Vec::new()),
            unsaved_count: AtomicUsize::new(0),
        });
        if let Some(d) = &vhost.durability {
            d.register(vhost.name());
        }
        for (name, kind) in STANDARD_EXCHANGES {
            let spec = ExchangeSpec {
                name: (*name).to_owned(),
                kind: *kind,
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::default(),
                alternate_exchange: None,
                flavor: ExchangeFlavor::Plain,
            };
            write(&vhost.exchanges).insert((*name).to_owned(), Arc::new(Exchange::new(spec)));
        }
        vhost
    }

    /// The vhost name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn not_found_exchange(&self, name: &str) -> BrokerError {
        BrokerError::not_found(format!("no exchange '{name}' in vhost '{}'", self.name))
    }
    fn not_found_queue(&self, name: &str) -> BrokerError {
        BrokerError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
    }

    /// Looks up an exchange (404 if missing).
    pub fn exchange(&self, name: &str) -> Result<Arc<Exchange>> {
        read(&self.exchanges).get(name).cloned().ok_or_else(|| self.not_found_exchange(name))
    }

    /// Looks up a queue for `owner` (404 if missing, 405 if another connection's exclusive queue).
    pub fn queue(&self, name: &str, owner: ConnectionId) -> Result<Arc<Queue>> {
        let q = read(&self.queues).get(name).cloned().ok_or_else(|| self.not_found_queue(name))?;
        q.check_owner(owner)?;
        Ok(q)
    }

    /// Every queue, for listing and statistics.
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        read(&self.queues).values().cloned().collect()
    }
    /// Every exchange.
    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        read(&self.exchanges).values().cloned().collect()
    }

    /// `exchange.declare`.
    pub fn declare_exchange(&self, name: &str, kind: &str, options: &ExchangeOptions) -> Result<()> {
        if options.passive {
            return self.exchange(name).map(|_| ());
        }
        let type_name = kind;
        let (kind, flavor) = ExchangeFlavor::parse(type_name, &options.arguments)?;
        let reserved =
            || BrokerError::access_refused(format!("exchange name '{name}' contains reserved prefix 'amq.*'"));
        if name.is_empty() {
            return Err(reserved());
        }
        let alternate_exchange = match options.arguments.inner().get("alternate-exchange") {
            None => None,
            Some(v) => Some(args::string_value(v).ok_or_else(|| {
                BrokerError::precondition(format!(
                    "invalid arg 'alternate-exchange' for exchange '{name}' in vhost '{}': {{unacceptable_type,{}}}",
                    self.name,
                    args::type_name(v)
                ))
            })?),
        };
        let mut exchanges = write(&self.exchanges);
        if let Some(existing) = exchanges.get(name) {
            let s = existing.spec();
            let mismatch = |field: &str, received: String, current: String| {
                Err(BrokerError::precondition(format!(
                    "inequivalent arg '{field}' for exchange '{name}' in vhost '{}': received '{received}' but current is '{current}'",
                    self.name
                )))
            };
            if s.type_name() != type_name || s.kind != kind {
                return mismatch("type", type_name.into(), s.type_name().into());
            }
            if s.durable != options.durable {
                return mismatch("durable", options.durable.to_string(), s.durable.to_string());
            }
            if s.auto_delete != options.auto_delete {
                return mismatch("auto_delete", options.auto_delete.to_string(), s.auto_delete.to_string());
            }
            if s.internal != options.internal {
                return mismatch("internal", options.internal.to_string(), s.internal.to_string());
            }
            if s.alternate_exchange != alternate_exchange {
                return mismatch(
                    "alternate-exchange",
                    alternate_exchange.unwrap_or_default(),
                    s.alternate_exchange.clone().unwrap_or_default(),
                );
            }
            return Ok(());
        }
        // Existing `amq.*` exchanges may be redeclared equivalently; new ones may not be created.
        if name.starts_with("amq.") {
            return Err(reserved());
        }
        let spec = ExchangeSpec {
            name: name.to_owned(),
            kind,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            arguments: options.arguments.clone(),
            alternate_exchange,
            flavor,
        };
        let exchange = Arc::new(Exchange::new(spec));
        let durable = exchange.spec().durable;
        let mut saved = None;
        if let Some(d) = self.durability.as_ref().filter(|_| durable) {
            // A saved exchange not in memory is being recovered: it keeps its generation (store directory).
            let generation = match d.saved_exchange_generation(&self.name, name) {
                Some(g) => (g, false),
                None => (d.new_generation(), true),
            };
            exchange.flavor().attach(d, &self.name, exchange.spec(), generation).map_err(|e| {
                BrokerError::new(
                    ErrorKind::ResourceError,
                    format!("cannot open the store of exchange '{name}' in vhost '{}': {e}", self.name),
                )
            })?;
            saved = Some((d, generation.0));
        }
        if let Some(delayed) = exchange.flavor().delayed() {
            tokio::spawn(run_delayed_release(
                self.myself.clone(),
                Arc::downgrade(&exchange),
                Arc::clone(delayed),
                self.durability.as_ref().map(|d| d.recovering()),
            ));
        }
        let change = saved.map(|(d, generation)| {
            let s = exchange.spec();
            let def = ExchangeDef {
                vhost: self.name.clone(),
                name: s.name.clone(),
                kind: s.type_name().to_owned(),
                auto_delete: s.auto_delete,
                internal: s.internal,
                arguments: s.arguments.clone(),
                generation,
            };
            // Under the map lock: the log orders this declare and a deletion of the name as memory does.
            (d, d.record(Change::PutExchange(def)))
        });
        exchanges.insert(name.to_owned(), exchange);
        drop(exchanges);
        // declare-ok only once the exchange is on disk.
        match change {
            Some((d, seq)) => d.commit(seq),
            None => Ok(()),
        }
    }

    /// Whether the broker is still re-declaring saved definitions (nothing may be routed meanwhile).
    fn is_recovering(&self) -> bool {
        self.durability.as_ref().is_some_and(|d| d.is_recovering())
    }

    /// Ends this vhost's part of recovery, once the broker has re-declared every definition: routes the
    /// dead letters held back meanwhile, then dead-letters recovered messages already past their
    /// delivery limit. Queue timers start by themselves when the broker's recovery flag clears.
    pub(crate) fn finish_recovery(&self) {
        let deferred = std::mem::take(&mut *self.deferred_dead_letters.lock().unwrap_or_else(|p| p.into_inner()));
        for (dead, records) in deferred {
            let queue = Arc::clone(records.queue());
            self.dead_letter(&queue, dead, records);
        }
        for q in self.queues() {
            q.dead_letter_over_delivery_limit();
        }
    }

    /// `exchange.delete`. A missing exchange is fine (RabbitMQ answers delete-ok).
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(BrokerError::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let Some(exchange) = read(&self.exchanges).get(name).cloned() else { return Ok(()) };
        if if_unused && exchange.has_bindings() {
            return Err(BrokerError::precondition(format!("exchange '{name}' in vhost '{}' in use", self.name)));
        }
        self.remove_exchange(&exchange)
    }

    /// Removes an exchange with its bindings (and auto-delete exchanges left without any); returns once the
    /// deletion is on disk.
    fn remove_exchange(&self, exchange: &Arc<Exchange>) -> Result<()> {
        let mut seq = None;
        {
            let mut exchanges = write(&self.exchanges);
            match exchanges.get(exchange.name()) {
                Some(e) if Arc::ptr_eq(e, exchange) => {
                    exchanges.remove(exchange.name());
                    // Under the map lock, so a re-declare of the name is logged after this deletion.
                    if let Some(d) = self.durability.as_ref().filter(|_| exchange.spec().durable) {
                        seq = Some((
                            d,
                            d.record(Change::DeleteExchange {
                                vhost: self.name.clone(),
                                name: exchange.name().to_owned(),
                            }),
                        ));
                    }
                }
                _ => return Ok(()),
            }
        }
        exchange.mark_deleted();
        let cascade = self.unbind_everywhere(&Destination::Exchange(Arc::clone(exchange)));
        if let Some((d, seq)) = seq {
            d.commit(seq)?;
        }
        cascade
    }

    /// Removes every binding leading to `destination`, then auto-deletes exchanges left without bindings.
    fn unbind_everywhere(&self, destination: &Destination) -> Result<()> {
        let mut emptied = Vec::new();
        for ex in self.exchanges() {
            if ex.unbind_destination(destination) > 0 && ex.spec().auto_delete && !ex.has_bindings() {
                emptied.push(ex);
            }
        }
        let mut result = Ok(());
        for ex in emptied {
            result = result.and(self.remove_exchange(&ex));
        }
        result
    }

    fn check_bindable_source(&self, source: &str) -> Result<Arc<Exchange>> {
        if source.is_empty() {
            return Err(BrokerError::access_refused("operation not permitted on the default exchange"));
        }
        self.exchange(source)
    }

    /// `queue.bind`.
    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        owner: ConnectionId,
    ) -> Result<()> {
        let q = self.queue(queue, owner)?;
        let ex = self.check_bindable_source(exchange)?;
        self.add_binding(&ex, Destination::Queue(q), routing_key, arguments)
    }

    /// `queue.unbind` (a missing binding is fine).
    pub fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        owner: ConnectionId,
    ) -> Result<()> {
        // Unbinding from or to something missing succeeds, as RabbitMQ.
        let q = match self.queue(queue, owner) {
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        let ex = match self.check_bindable_source(exchange) {
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        self.remove_binding(&ex, &Destination::Queue(q), routing_key, arguments)
    }

    /// `exchange.bind`: messages from `source` also go to `destination`.
    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let dest = self.check_bindable_source(destination)?;
        let src = self.check_bindable_source(source)?;
        self.add_binding(&src, Destination::Exchange(dest), routing_key, arguments)
    }

    /// `exchange.unbind`.
    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let (dest, src) = match (self.check_bindable_source(destination), self.check_bindable_source(source)) {
            (Ok(d), Ok(s)) => (d, s),
            (Err(e), _) | (_, Err(e)) if e.kind == ErrorKind::NotFound => return Ok(()),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        self.remove_binding(&src, &Destination::Exchange(dest), routing_key, arguments)
    }

    /// Adds a binding; saves the definitions when both ends are durable.
    fn add_binding(
        &self,
        source: &Arc<Exchange>,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let Some(d) = self.durability.as_ref().filter(|_| source.spec().durable && dest.is_durable()) else {
            return source.bind(dest, routing_key, arguments);
        };
        let def = self.binding_def(source, &dest, routing_key, arguments);
        let seq = {
            let _order = self.binding_log.lock().unwrap_or_else(|p| p.into_inner());
            source.bind(dest, routing_key, arguments)?;
            d.record(Change::PutBinding(def))
        };
        // bind-ok only once the binding is on disk.
        d.commit(seq)
    }

    fn binding_def(
        &self,
        source: &Arc<Exchange>,
        dest: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> BindingDef {
        let (destination, destination_kind) = match dest {
            Destination::Queue(q) => (q.name().to_owned(), DestinationKind::Queue),
            Destination::Exchange(e) => (e.name().to_owned(), DestinationKind::Exchange),
        };
        BindingDef {
            vhost: self.name.clone(),
            source: source.name().to_owned(),
            destination,
            destination_kind,
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        }
    }

    /// Removes a binding if it exists: an auto-delete source left without bindings goes too, and the
    /// definitions are saved when both ends are durable.
    fn remove_binding(
        &self,
        source: &Arc<Exchange>,
        dest: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let durable = self.durability.as_ref().filter(|_| source.spec().durable && dest.is_durable());
        let seq = {
            let _order = self.binding_log.lock().unwrap_or_else(|p| p.into_inner());
            if !source.unbind(dest, routing_key, arguments) {
                return Ok(());
            }
            durable
                .map(|d| (d, d.record(Change::DeleteBinding(self.binding_def(source, dest, routing_key, arguments)))))
        };
        if source.spec().auto_delete && !source.has_bindings() {
            self.remove_exchange(source)?;
        }
        // unbind-ok only once the removal is on disk.
        match seq {
            Some((d, seq)) => d.commit(seq),
            None => Ok(()),
        }
    }

    /// `queue.declare` on behalf of connection `owner`.
    pub fn declare_queue(&self, name: &str, options: &QueueOptions, owner: ConnectionId) -> Result<QueueDeclared> {
        if options.passive {
            let q = self.queue(name, owner)?;
            q.touch();
            return Ok(QueueDeclared {
                name: name.to_owned(),
                message_count: q.message_count(),
                consumer_count: q.consumer_count(),
            });
        }
        if name.starts_with("amq.") {
            return Err(BrokerError::access_refused(format!("queue name '{name}' contains reserved prefix 'amq.*'")));
        }
        let name = if name.is_empty() { generate_queue_name() } else { name.to_owned() };
        let args = QueueArguments::parse(&options.arguments, &name, &self.name)?;
        if args.queue_type == QueueType::Quorum {
            let bad = if options.exclusive {
                Some("exclusive")
            } else if !options.durable {
                Some("non-durable")
            } else if options.auto_delete {
                Some("auto-delete")
            } else {
                None
            };
            if let Some(prop) = bad {
                return Err(BrokerError::precondition(format!(
                    "invalid property '{prop}' for queue '{name}' in vhost '{}'",
                    self.name
                )));
            }
        }
        let store_error = |e: crate::store::StoreError| {
            BrokerError::new(
                ErrorKind::ResourceError,
                format!("cannot open the store of queue '{name}' in vhost '{}': {e}", self.name),
            )
        };
        // Durable, non-exclusive queues keep persistent messages in a store. A new one's store is created
        // before taking the map lock (its fsyncs would otherwise serialise every declare of the vhost); its
        // fresh generation makes the directory its own. A saved queue being recovered opens its store under
        // the lock instead.
        let stored = self.durability.as_ref().filter(|_| options.durable && !options.exclusive);
        let mut fresh = None;
        let mut queues = loop {
            let queues = write(&self.queues);
            let Some(d) = stored else { break queues };
            if fresh.is_some() || queues.contains_key(&name) || d.saved_queue_generation(&self.name, &name).is_some() {
                break queues;
            }
            drop(queues);
            fresh = Some(d.create_queue_store(&self.name, &name).map_err(store_error)?);
        };
        if let Some(existing) = queues.get(&name).cloned() {
            drop(queues);
            if let Some((store, _)) = fresh {
                // Another declare of the name won the race: this store was never used.
                let _ = store.destroy();
            }
            existing.check_owner(owner)?;
            let s = existing.spec();
            if options.exclusive && s.exclusive_owner.is_none() {
                return Err(BrokerError::locked(format!(
                    "cannot obtain exclusive access to locked queue '{name}' in vhost '{}'. It could be originally \
                     declared on another connection or the exclusive property value does not match that of the original declaration.",
                    self.name
                )));
            }
            let mismatch = |field: &str, received: bool, current: bool| {
                Err(BrokerError::precondition(format!(
                    "inequivalent arg '{field}' for queue '{name}' in vhost '{}': received '{received}' but current is '{current}'",
                    self.name
                )))
            };
            if s.durable != options.durable {
                return mismatch("durable", options.durable, s.durable);
            }
            if s.auto_delete != options.auto_delete {
                return mismatch("auto_delete", options.auto_delete, s.auto_delete);
            }
            args::assert_equivalent(&s.arguments, &options.arguments, &name, &self.name)?;
            existing.touch();
            return Ok(QueueDeclared {
                name,
                message_count: existing.message_count(),
                consumer_count: existing.consumer_count(),
            });
        }
        let spec = QueueSpec {
            name: name.clone(),
            durable: options.durable,
            exclusive_owner: options.exclusive.then_some(owner),
            auto_delete: options.auto_delete,
            arguments: options.arguments.clone(),
            args,
        };
        let hooks: Weak<dyn QueueHooks> = self.myself.clone();
        let mut recovered = RecoveredIndex::new(&spec.args);
        let fresh_store = fresh.is_some();
        let store = match (stored, fresh) {
            (Some(d), Some((store, generation))) => Some((store, d, generation)),
            (Some(d), None) => {
                let (store, generation) =
                    d.open_queue_store(&self.name, &name, |r| recovered.add(r)).map_err(store_error)?;
                Some((store, d, generation))
            }
            (None, _) => None,
        };
        let saved = store.as_ref().map(|(_, d, generation)| {
            let def = QueueDef {
                vhost: self.name.clone(),
                name: name.clone(),
                auto_delete: spec.auto_delete,
                arguments: spec.arguments.clone(),
                generation: *generation,
            };
            // Under the map lock: the log orders this declare and a deletion of the name as memory does.
            (*d, d.record(Change::PutQueue(def)))
        });
        let recovering = !recovered.is_empty();
        let is_new = fresh_store;
        let store = store.map(|(store, _, _)| store);
        let queue = Queue::create(spec, hooks, store, recovered, Arc::clone(&self.paging));
        // Registered before the queue is visible, so no publish can miss it.
        let unsaved = (is_new && saved.is_some()).then(|| self.add_unsaved(&queue));
        queues.insert(name.clone(), Arc::clone(&queue));
        drop(queues);
        // After the insert: a policy set meanwhile either is seen here or its reapply sees this queue.
        self.apply_policy_to(&queue);
        // Recovered messages already past their delivery limit go to the dead-letter exchange, once the
        // broker's recovery has declared what they route to (it calls this itself at the end).
        if recovering && !self.is_recovering() {
            queue.dead_letter_over_delivery_limit();
        }
        let declared = QueueDeclared { name, message_count: queue.message_count(), consumer_count: 0 };
        // declare-ok only once the queue is on disk. If saving fails the queue stays declared in memory
        // (and is saved by the next save that succeeds); the client's connection is closed with 541.
        if let Some((d, seq)) = saved {
            let result = d.commit(seq);
            if let Some(tx) = unsaved {
                self.remove_unsaved(&queue, tx, &result);
            }
            result?;
        }
        Ok(declared)
    }

    fn add_unsaved(&self, queue: &Arc<Queue>) -> watch::Sender<BatchState> {
        let (tx, rx) = watch::channel(None);
        self.unsaved.lock().unwrap_or_else(|p| p.into_inner()).push((Arc::clone(queue), rx));
        self.unsaved_count.fetch_add(1, Ordering::SeqCst);
        tx
    }

    fn remove_unsaved(&self, queue: &Arc<Queue>, tx: watch::Sender<BatchState>, result: &Result<()>) {
        let outcome = result.as_ref().map(|_| ()).map_err(|e| {
            crate::store::StoreError::DefinitionNotSaved(
                format!("the queue's definition was not saved: {}", e.message).into(),
            )
        });
        tx.send_replace(Some(outcome));
        self.unsaved.lock().unwrap_or_else(|p| p.into_inner()).retain(|(q, _)| !Arc::ptr_eq(q, queue));
        self.unsaved_count.fetch_sub(1, Ordering::SeqCst);
    }

    /// Makes the confirm of a message stored in a queue whose definition is not on disk yet wait for it.
    fn wait_for_unsaved(&self, queues: &[Arc<Queue>], result: &mut PublishResult) {
        if self.unsaved_count.load(Ordering::SeqCst) == 0 || result.durable.is_empty() {
            return;
        }
        let unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
        for (q, rx) in unsaved.iter() {
            if queues.iter().any(|t| Arc::ptr_eq(t, q)) {
                result.durable.push(SyncTicket::for_batch(rx.clone()));
            }
        }
    }

    /// Creates the queue behind a direct reply-to consumer (`amq.rabbitmq.reply-to`): exclusive to `owner`,
    /// deleted with its consumer, named `amq.rabbitmq.reply-to.<token>` so replies reach it through the
    /// default exchange. Returns its name.
    pub fn declare_reply_queue(&self, owner: ConnectionId) -> String {
        let token = &generate_queue_name()["amq.gen-".len()..];
        let name = format!("{DIRECT_REPLY_TO}.{token}");
        let spec = QueueSpec {
            name: name.clone(),
            durable: false,
            exclusive_owner: Some(owner),
            auto_delete: true,
            arguments: FieldTable::default(),
            args: QueueArguments::default(),
        };
        let hooks: Weak<dyn QueueHooks> = self.myself.clone();
        let queue = Queue::create(spec, hooks, None, RecoveredIndex::default(), Arc::clone(&self.paging));
        write(&self.queues).insert(name.clone(), queue);
        name
    }

    /// `queue.purge`: returns the number of ready messages dropped.
    pub fn purge_queue(&self, name: &str, owner: ConnectionId) -> Result<u32> {
        Ok(self.queue(name, owner)?.purge())
    }

    /// `queue.delete`: returns the number of ready messages it held. A missing queue is fine.
    pub fn delete_queue(&self, name: &str, if_unused: bool, if_empty: bool, owner: ConnectionId) -> Result<u32> {
        let q = match self.queue(name, owner) {
            Ok(q) => q,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        if if_unused && q.consumer_count() > 0 {
            return Err(BrokerError::precondition(format!("queue '{name}' in vhost '{}' in use", self.name)));
        }
        if if_empty && q.message_count() > 0 {
            return Err(BrokerError::precondition(format!("queue '{name}' in vhost '{}' is not empty", self.name)));
        }
        self.remove_queue_saved(&q)
    }

    /// Removes a queue, its bindings and consumers; returns its ready count. A failure to save the
    /// deletion is logged (and raises the disk alarm); the next save that succeeds writes it.
    pub fn remove_queue(&self, queue: &Arc<Queue>) -> u32 {
        match self.remove_queue_saved(queue) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(queue = queue.name(), error = %e, "cannot save the deletion of a queue");
                0
            }
        }
    }

    /// [`VHost::remove_queue`], returning once the deletion is on disk.
    fn remove_queue_saved(&self, queue: &Arc<Queue>) -> Result<u32> {
        let mut seq = None;
        {
            let mut queues = write(&self.queues);
            match queues.get(queue.name()) {
                Some(q) if Arc::ptr_eq(q, queue) => {
                    queues.remove(queue.name());
                    // Under the map lock, so a re-declare of the name is logged after this deletion (and the
                    // re-declared queue gets a new generation: this queue's files are never its files).
                    if let Some(d) = self
                        .durability
                        .as_ref()
                        .filter(|_| queue.spec().durable && queue.spec().exclusive_owner.is_none())
                    {
                        seq = Some((
                            d,
                            d.record(Change::DeleteQueue { vhost: self.name.clone(), name: queue.name().to_owned() }),
                        ));
                    }
                }
                _ => return Ok(0),
            }
        }
        let count = queue.mark_deleted();
        let cascade = self.unbind_everywhere(&Destination::Queue(Arc::clone(queue)));
        if let Some((d, seq)) = seq {
            d.commit(seq)?;
            // The queue's directory is gone: make that durable too.
            d.sync_parent(&d.queue_dir(&self.name, queue.name(), 0))
                .map_err(|e| BrokerError::internal(format!("could not save the queue deletion: {e}")))?;
        }
        cascade.map(|()| count)
    }

    /// Deletes the exclusive queues of a closed connection.
    pub fn connection_closed(&self, owner: ConnectionId) {
        let owned: Vec<_> = self.queues().into_iter().filter(|q| q.spec().exclusive_owner == Some(owner)).collect();
        for q in owned {
            self.remove_queue(&q);
        }
    }

    /// `basic.consume`: registers a consumer and returns its id.
    pub fn consume(
        &self,
        queue: &str,
        owner: ConnectionId,
        options: ConsumeOptions,
        sink: ConsumerSink,
    ) -> Result<(Arc<Queue>, ConsumerId)> {
        let q = self.queue(queue, owner)?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        q.add_consumer(id, options, sink)?;
        Ok((q, id))
    }

    /// `basic.cancel` (or a closing channel): removes the consumer, auto-deleting its queue if that was the last.
    pub fn cancel(&self, queue: &Arc<Queue>, consumer: ConsumerId) {
        if queue.remove_consumer(consumer) && queue.should_auto_delete() {
            self.remove_queue(queue);
        }
    }

    /// Publishes a message to `exchange`: routes it (CC/BCC included) and enqueues it. A delayed exchange
    /// holds a message with a positive `x-delay` (counted as routed: the plugin ignores `mandatory`); a
    /// deduplicating exchange drops a recent duplicate (unroutable, but still confirmed).
    pub fn publish(&self, exchange: &str, message: Message) -> Result<PublishResult> {
        let ex = self.publishable_exchange(exchange)?;
        Ok(match ex.admit(message, |message| self.route_and_enqueue(&ex, message)) {
            Admit::Routed(mut result, ticket) => {
                result.durable.extend(ticket);
                result
            }
            Admit::Held(ticket) => {
                PublishResult { routed: true, durable: ticket.into_iter().collect(), ..Default::default() }
            }
            Admit::Dropped(ticket) => {
                PublishResult { durable: ticket.into_iter().collect(), ..PublishResult::default() }
            }
            Admit::Refused { held: true } => {
                PublishResult { routed: true, rejected: true, refused: true, ..Default::default() }
            }
            Admit::Refused { held: false } => PublishResult { rejected: true, ..PublishResult::default() },
        })
    }

    /// Moves ready messages of `queue` (a dead-letter queue) back to where they first died (the exchange and
    /// routing keys of the oldest `x-death` entry, else `x-first-death-exchange` with their routing key) or
    /// to `options.target`. Bodies and properties (with the `x-death` history) are kept. Each message is
    /// removed from `queue` only after its copy is enqueued at the target and, for durable targets, on disk:
    /// a crash mid-redrive leaves every message in the DLQ or the target (possibly both).
    pub async fn redrive(&self, queue: &str, options: &RedriveOptions) -> Result<RedriveOutcome> {
        const NO_OWNER: ConnectionId = 0;
        let dlq = self.queue(queue, NO_OWNER)?;
        if let Some(RedriveTarget::Queue(name)) = &options.target {
            self.queue(name, NO_OWNER)?;
        }
        if let Some(RedriveTarget::Exchange { exchange, .. }) = &options.target {
            self.exchange(exchange)?;
        }
        let limit = options.count.unwrap_or(usize::MAX);
        // A snapshot: messages the redrive itself routes back into this queue are not moved twice.
        let snapshot = dlq.peek(0, usize::MAX);
        let mut outcome = RedriveOutcome::default();
        // Copies enqueued at their target whose originals are still in the DLQ, with their store tickets.
        let mut pending: Vec<(crate::queue::MessageId, Vec<SyncTicket>)> = Vec::new();
        for peeked in snapshot {
            if outcome.moved as usize + pending.len() >= limit {
                break;
            }
            let message = &peeked.message;
            if let Some((name, value)) = &options.header_filter {
                let matches = message
                    .headers()
                    .and_then(|h| h.inner().get(name.as_str()))
                    .and_then(args::string_value)
                    .is_some_and(|v| &v == value);
                if !matches {
                    outcome.skipped += 1;
                    continue;
                }
            }
            let (exchange, keys) = match &options.target {
                Some(RedriveTarget::Queue(name)) => (String::new(), vec![name.clone()]),
                Some(RedriveTarget::Exchange { exchange, routing_key }) => {
                    (exchange.clone(), vec![routing_key.clone()])
                }
                None => match first_death(message) {
                    Some(found) => found,
                    None => {
                        outcome.skipped += 1;
                        continue;
                    }
                },
            };
            let Ok(ex) = self.exchange(&exchange) else {
                outcome.skipped += 1;
                continue;
            };
            let mut copy = (**message).clone();
            copy.exchange = exchange.as_str().into();
            copy.routing_key = keys.first().map(String::as_str).unwrap_or("").into();
            let result = self.route_and_enqueue_keys(&ex, copy, &keys);
            if !result.routed || result.rejected {
                outcome.skipped += 1;
                continue;
            }
            pending.push((peeked.id, result.durable));
            if pending.len() >= REDRIVE_BATCH {
                settle_redriven(&dlq, &mut pending, &mut outcome).await;
            }
        }
        settle_redriven(&dlq, &mut pending, &mut outcome).await;
        Ok(outcome)
    }

    /// Routes `message` from `ex` by `keys` (no CC/BCC processing) and pushes it onto every target queue.
    fn route_and_enqueue_keys(&self, ex: &Arc<Exchange>, message: Message, keys: &[String]) -> PublishResult {
        let queues = self.route(ex, keys, message.headers());
        enqueue_all(&queues, message)
    }

    /// The policies, sorted by name.
    pub fn policies(&self) -> Vec<Policy> {
        let mut all = read(&self.policies).clone();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<Policy> {
        read(&self.policies).iter().find(|p| p.name == name).cloned()
    }

    /// Creates or replaces a policy and applies it to the matching existing queues (saved with the definitions).
    /// A failure to save it is logged (and raises the disk alarm); the next save that succeeds writes it.
    pub fn set_policy(&self, policy: Policy) {
        let seq = {
            let mut all = write(&self.policies);
            all.retain(|p| p.name != policy.name);
            let def = PolicyDef {
                vhost: self.name.clone(),
                name: policy.name.clone(),
                pattern: policy.pattern.clone(),
                apply_to: policy.apply_to.as_str().to_owned(),
                priority: policy.priority,
                definition: policy.definition.clone(),
            };
            all.push(policy);
            self.durability.as_ref().map(|d| (d, d.record(Change::PutPolicy(def))))
        };
        self.reapply_policies();
        if let Some(Err(e)) = seq.map(|(d, seq)| d.commit(seq)) {
            tracing::error!(vhost = %self.name, error = %e, "cannot save a policy");
        }
    }

    /// Deletes a policy (404 if missing); queues it applied to fall back to the next matching one or none.
    pub fn delete_policy(&self, name: &str) -> Result<()> {
        let seq = {
            let mut all = write(&self.policies);
            let before = all.len();
            all.retain(|p| p.name != name);
            if all.len() == before {
                return Err(BrokerError::not_found(format!("no policy '{name}' in vhost '{}'", self.name)));
            }
            self.durability
                .as_ref()
                .map(|d| (d, d.record(Change::DeletePolicy { vhost: self.name.clone(), name: name.to_owned() })))
        };
        self.reapply_policies();
        match seq {
            Some((d, seq)) => d.commit(seq),
            None => Ok(()),
        }
    }

    fn reapply_policies(&self) {
        for q in self.queues() {
            self.apply_policy_to(&q);
        }
    }

    fn apply_policy_to(&self, queue: &Arc<Queue>) {
        // The read guard is held while applying, so a concurrent set/delete cannot be overwritten by a
        // stale choice (its write waits, then its reapply runs after this one).
        let all = read(&self.policies);
        queue.apply_policy(policies::select(&all, queue.name()));
    }

    /// The exchange a client may publish to: it exists (404) and is not internal (403).
    pub fn publishable_exchange(&self, exchange: &str) -> Result<Arc<Exchange>> {
        let ex = self.exchange(exchange)?;
        if ex.spec().internal {
            return Err(BrokerError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                self.name
            )));
        }
        Ok(ex)
    }

    /// Routes a message from `ex` (with its CC/BCC keys, BCC then stripped) and pushes it onto every target queue.
    fn route_and_enqueue(&self, ex: &Arc<Exchange>, mut message: Message) -> PublishResult {
        let mut keys = vec![message.routing_key.to_string()];
        let headers = message.headers();
        let has_bcc = headers.is_some_and(|h| h.contains_key("BCC"));
        if headers.is_some_and(|h| h.contains_key("CC")) || has_bcc {
            keys.extend(header_routing_keys(headers, "CC"));
            keys.extend(header_routing_keys(headers, "BCC"));
        }
        let queues = self.route(ex, &keys, message.headers());
        if has_bcc {
            // BCC keys must not reach consumers.
            let mut table = message.headers().cloned().unwrap_or_default();
            let mut stripped = FieldTable::default();
            for (k, v) in table.inner() {
                if k.as_str() != "BCC" {
                    stripped.insert(k.clone(), v.clone());
                }
            }
            table = stripped;
            message.properties = message.properties.clone().with_headers(table);
            message.raw_properties = None;
        }
        let mut result = enqueue_all(&queues, message);
        self.wait_for_unsaved(&queues, &mut result);
        result
    }

    /// Finds the queues a message reaches from `start` for any of `keys`: follows exchange-to-exchange
    /// bindings once each and alternate exchanges where an exchange matched nothing; one entry per queue.
    pub fn route(&self, start: &Arc<Exchange>, keys: &[String], headers: Option<&FieldTable>) -> Vec<Arc<Queue>> {
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        let mut visited: Vec<Arc<Exchange>> = vec![Arc::clone(start)];
        let mut pending: Vec<Arc<Exchange>> = vec![Arc::clone(start)];
        let mut found = Vec::new();
        while let Some(ex) = pending.pop() {
            found.clear();
            if ex.name().is_empty() {
                let all = read(&self.queues);
                for key in keys {
                    if let Some(q) = all.get(key.as_str()) {
                        found.push(Destination::Queue(Arc::clone(q)));
                    }
                }
            } else {
                for key in keys {
                    ex.route(key, headers, &mut found);
                }
            }
            if found.is_empty() {
                if let Some(ae) = ex.spec().alternate_exchange.as_deref().and_then(|n| self.exchange(n).ok()) {
                    found.push(Destination::Exchange(ae));
                }
            }
            for d in found.drain(..) {
                match d {
                    Destination::Queue(q) => {
                        if !q.is_deleted() && !queues.iter().any(|x| Arc::ptr_eq(x, &q)) {
                            queues.push(q);
                        }
                    }
                    Destination::Exchange(e) => {
                        if !visited.iter().any(|x| Arc::ptr_eq(x, &e)) {
                            visited.push(Arc::clone(&e));
                            pending.push(e);
                        }
                    }
                }
            }
        }
        queues
    }
}

impl QueueHooks for VHost {
    fn dead_letter(
        &self,
        queue: &Queue,
        dead: Vec<(DeadLetterReason, Vec<Arc<Message>>)>,
        records: dead_letter::SourceRecords,
    ) {
        if self.is_recovering() {
            self.deferred_dead_letters.lock().unwrap_or_else(|p| p.into_inner()).push((dead, records));
            return;
        }
        let args = queue.args();
        // Dead-lettering without an exchange, or to a missing one, drops the messages silently, as RabbitMQ.
        let Some((dlx_name, Ok(dlx))) = args.dead_letter_exchange.as_deref().map(|n| (n, self.exchange(n))) else {
            records.finish();
            return;
        };
        let mut work = Vec::new();
        for (reason, message) in dead.into_iter().flat_map(|(r, msgs)| msgs.into_iter().map(move |m| (r, m))) {
            let dead = dead_letter::make_dead_letter(
                &message,
                dlx_name,
                queue.name(),
                reason,
                args.dead_letter_routing_key.as_deref(),
            );
            let keys = dead_letter::routing_keys(&dead);
            let targets = self.route(&dlx, &keys, dead.headers());
            let dead = Arc::new(dead);
            for target in targets {
                if dead_letter::check_cycles(reason) && dead_letter::is_cycle(&dead, target.name()) {
                    continue;
                }
                work.push((target, Arc::clone(&dead)));
            }
        }
        dead_letter::push_all(work, records);
    }

    fn expire_queue(&self, queue: &Arc<Queue>) {
        self.remove_queue(queue);
    }

    fn recovery_gate(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.durability.as_ref().filter(|d| d.is_recovering()).map(|d| d.recovering())
    }
}

/// Releases a delayed exchange's messages when due, routing each by the exchange's underlying type.
/// Holds only weak handles, so it ends when the exchange or vhost goes.
async fn run_delayed_release(
    vhost: Weak<VHost>,
    exchange: Weak<Exchange>,
    delayed: Arc<DelayedMessages>,
    recovering: Option<tokio::sync::watch::Receiver<bool>>,
) {
    run_release(delayed, recovering, move |message| {
        let (v, ex) = (vhost.upgrade()?, exchange.upgrade()?);
        let r = (!ex.is_deleted()).then(|| v.route_and_enqueue(&ex, message))?;
        Some(Routed { durable: r.durable, stored_in: r.stored_in, refused: r.refused })
    })
    .await
}

/// A server-generated queue name: `amq.gen-` and 22 URL-safe random characters, as RabbitMQ.
pub fn generate_queue_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name = String::from("amq.gen-");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded per process from OS randomness; hashing a counter gives fresh bits each call.
    let state = std::collections::hash_map::RandomState::new();
    let mut bits = 0u128;
    for round in 0..2u64 {
        let mut h = state.build_hasher();
        h.write_u64(n);
        h.write_u64(round);
        bits = (bits << 64) | h.finish() as u128;
    }
    for _ in 0..22 {
        name.push(ALPHABET[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    name
}

/// Pushes one message onto every routed queue; what the publisher's confirm depends on.
fn enqueue_all(queues: &[Arc<Queue>], message: Message) -> PublishResult {
    let message = Arc::new(message);
    let mut result = PublishResult { routed: !queues.is_empty(), ..PublishResult::default() };
    for q in queues {
        match q.push(Arc::clone(&message)) {
            PushOutcome::Enqueued => {}
            PushOutcome::Stored(ticket) => {
                result.durable.push(ticket);
                result.stored_in.push(Arc::clone(q));
            }
            PushOutcome::Rejected => result.rejected = true,
            PushOutcome::Refused => {
                result.rejected = true;
                result.refused = true;
            }
        }
    }
    result
}
