//! Exchanges and their bindings: where a published message goes. Routing per kind: direct and fanout
//! here, topic pattern matching ([`topic`]), headers-exchange bindings ([`headers`]) and the
//! consistent-hash exchange ([`consistent_hash`], RabbitMQ's `rabbitmq_consistent_hash_exchange` plugin
//! built in), following RabbitMQ 3.10 (`rabbit_exchange_type_topic.erl`, `rabbit_exchange_type_headers.erl`),
//! checked against a live RabbitMQ 3.10. What an exchange does beyond routing (delayed, deduplicating) is
//! its flavor ([`flavor`]).
//!
//! Adding a routing kind: a variant of [`ExchangeKind`] and its `Router` arms here, and its own module.

pub mod consistent_hash;
pub mod flavor;
pub mod headers;
pub mod topic;

use crate::error::{BrokerError, ErrorKind, Result};
use crate::message::Message;
use crate::queue::Queue;
use amq_protocol_types::FieldTable;
use consistent_hash::HashRing;
use flavor::{Admit, ExchangeFlavor, FlavorState};
use headers::HeadersBinding;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use topic::TopicIndex;

/// The routing algorithm of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Every bound destination.
    Fanout,
    /// Dotted words with `*` and `#` wildcards.
    Topic,
    /// Header values, per `x-match`.
    Headers,
    /// One destination per message, by a hash of its routing key (or a header), binding keys being
    /// weights (`x-consistent-hash`, RabbitMQ's plugin built in; see [`consistent_hash`]).
    ConsistentHash,
}

impl ExchangeKind {
    /// Parses an exchange type name; unknown types are 503 COMMAND_INVALID, as RabbitMQ.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "direct" => Ok(Self::Direct),
            "fanout" => Ok(Self::Fanout),
            "topic" => Ok(Self::Topic),
            "headers" => Ok(Self::Headers),
            consistent_hash::TYPE => Ok(Self::ConsistentHash),
            other => Err(BrokerError::new(ErrorKind::CommandInvalid, format!("invalid exchange type '{other}'"))),
        }
    }
    /// The AMQP type name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::ConsistentHash => consistent_hash::TYPE,
        }
    }
}

/// What a binding leads to.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A queue.
    Queue(Arc<Queue>),
    /// Another exchange (exchange-to-exchange binding).
    Exchange(Arc<Exchange>),
}

impl Destination {
    /// Whether the destination survives a restart (a durable, non-exclusive queue or a durable exchange).
    pub fn is_durable(&self) -> bool {
        match self {
            Self::Queue(q) => q.spec().durable && q.spec().exclusive_owner.is_none(),
            Self::Exchange(e) => e.spec().durable,
        }
    }
}

/// The destinations one routing step found: inline up to four, so routing allocates nothing in the common case.
pub type Destinations = SmallVec<[Destination; 4]>;

impl PartialEq for Destination {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Queue(a), Self::Queue(b)) => Arc::ptr_eq(a, b),
            (Self::Exchange(a), Self::Exchange(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// One binding from an exchange to a destination.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Where matching messages go.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: String,
    /// The binding arguments (headers exchanges match on them).
    pub arguments: FieldTable,
}

impl Binding {
    fn same_as(&self, destination: &Destination, routing_key: &str, arguments: &FieldTable) -> bool {
        self.destination == *destination && self.routing_key == routing_key && self.arguments == *arguments
    }
}

/// The hasher of a direct exchange's binding keys: foldhash's quality variant, seeded randomly per process
/// (keys come from clients), several times cheaper than std's SipHash on short keys.
type DirectHasher = foldhash::quality::RandomState;

/// Per-kind lookup structure, kept in step with the binding list.
#[derive(Debug)]
enum Router {
    Direct(HashMap<String, Vec<Destination>, DirectHasher>),
    Fanout,
    Topic(TopicIndex<Destination>),
    Headers(Vec<(HeadersBinding, Destination)>),
    ConsistentHash(HashRing<Destination>),
}

#[derive(Debug)]
struct ExchangeState {
    bindings: Vec<Binding>,
    router: Router,
    deleted: bool,
}

/// Declared properties of an exchange.
#[derive(Debug, Clone)]
pub struct ExchangeSpec {
    /// Its name ("" is the default exchange).
    pub name: String,
    /// Its routing algorithm.
    pub kind: ExchangeKind,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Clients cannot publish to it directly.
    pub internal: bool,
    /// Declared arguments.
    pub arguments: FieldTable,
    /// `alternate-exchange`: where unroutable messages go.
    pub alternate_exchange: Option<String>,
    /// Delayed or deduplicating behaviour on top of routing.
    pub flavor: ExchangeFlavor,
}

impl ExchangeSpec {
    /// The type name as declared (`x-delayed-message` for a delayed exchange, and so on).
    pub fn type_name(&self) -> &'static str {
        self.flavor.type_name(self.kind)
    }
}

/// An exchange with its bindings.
#[derive(Debug)]
pub struct Exchange {
    spec: ExchangeSpec,
    state: RwLock<ExchangeState>,
    flavor: FlavorState,
    /// Messages published to it (the API's `publish_in`), a relaxed atomic: one add per publish.
    publish_in: AtomicU64,
    /// Queue copies it routed them to (the API's `publish_out`: a message reaching three queues counts three).
    publish_out: AtomicU64,
    /// Set once by [`Exchange::mark_deleted`], beside the state's flag: publishers holding the exchange
    /// between publishes ([`crate::vhost::PublishCache`]) check it on every use without taking the lock.
    deleted: AtomicBool,
}

impl Exchange {
    /// Creates an exchange with no bindings.
    pub fn new(spec: ExchangeSpec) -> Self {
        let router = match spec.kind {
            ExchangeKind::Direct => Router::Direct(HashMap::default()),
            ExchangeKind::Fanout => Router::Fanout,
            ExchangeKind::Topic => Router::Topic(TopicIndex::new()),
            ExchangeKind::Headers => Router::Headers(Vec::new()),
            // Arguments were checked at declare (`ExchangeFlavor::parse`); a recovered exchange with
            // arguments no longer valid falls back to hashing routing keys.
            ExchangeKind::ConsistentHash => Router::ConsistentHash(HashRing::new(
                consistent_hash::parse_arguments(&spec.arguments).unwrap_or(consistent_hash::HashOn::RoutingKey),
            )),
        };
        let flavor = FlavorState::new(&spec.flavor);
        Self {
            spec,
            state: RwLock::new(ExchangeState { bindings: Vec::new(), router, deleted: false }),
            flavor,
            publish_in: AtomicU64::new(0),
            publish_out: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
        }
    }

    /// Its declared properties.
    pub fn spec(&self) -> &ExchangeSpec {
        &self.spec
    }
    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// Counts a message published to it.
    #[inline]
    pub fn count_publish_in(&self) {
        self.publish_in.fetch_add(1, Ordering::Relaxed);
    }
    /// Counts the queue copies one message was routed to.
    #[inline]
    pub fn count_publish_out(&self, copies: usize) {
        self.publish_out.fetch_add(copies as u64, Ordering::Relaxed);
    }
    /// Messages published to it and queue copies routed from it, since it was created.
    pub fn publish_counts(&self) -> (u64, u64) {
        (self.publish_in.load(Ordering::Relaxed), self.publish_out.load(Ordering::Relaxed))
    }
    /// Its flavor's state (delayed messages, deduplication cache).
    pub fn flavor(&self) -> &FlavorState {
        &self.flavor
    }
    /// What its flavor decides about a message published to it, routing it with `route` if it is to be
    /// routed now (see [`FlavorState::admit`]).
    #[inline]
    pub fn admit<R>(&self, message: Message, route: impl FnOnce(Message) -> R) -> Admit<R> {
        self.flavor.admit(&self.spec.name, message, route)
    }

    fn read(&self) -> RwLockReadGuard<'_, ExchangeState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, ExchangeState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a binding (a duplicate is a no-op). Headers arguments are validated (406 when invalid).
    pub fn bind(&self, destination: Destination, routing_key: &str, arguments: &FieldTable) -> Result<()> {
        let mut st = self.write();
        if st.bindings.iter().any(|b| b.same_as(&destination, routing_key, arguments)) {
            return Ok(());
        }
        match &mut st.router {
            Router::Direct(map) => map.entry(routing_key.to_owned()).or_default().push(destination.clone()),
            Router::Fanout => {}
            Router::Topic(index) => index.insert(routing_key, destination.clone()),
            Router::Headers(list) => {
                let compiled =
                    HeadersBinding::parse(arguments).map_err(|e| BrokerError::precondition(e.to_string()))?;
                list.push((compiled, destination.clone()));
            }
            Router::ConsistentHash(_) => {
                consistent_hash::parse_weight(routing_key).map_err(|e| BrokerError::precondition(e.to_string()))?;
            }
        }
        st.bindings.push(Binding { destination, routing_key: routing_key.to_owned(), arguments: arguments.clone() });
        Self::rebuild_ring(&mut st);
        Ok(())
    }

    /// Removes a binding; returns whether it existed.
    pub fn unbind(&self, destination: &Destination, routing_key: &str, arguments: &FieldTable) -> bool {
        let mut st = self.write();
        let Some(pos) = st.bindings.iter().position(|b| b.same_as(destination, routing_key, arguments)) else {
            return false;
        };
        st.bindings.remove(pos);
        Self::rebuild_router_entry(&mut st, destination, routing_key, arguments);
        Self::rebuild_ring(&mut st);
        true
    }

    /// A consistent-hash exchange's buckets follow its binding list (order and weights).
    fn rebuild_ring(st: &mut ExchangeState) {
        let ExchangeState { bindings, router, .. } = st;
        if let Router::ConsistentHash(ring) = router {
            // Every stored binding passed `parse_weight` in `bind`.
            ring.rebuild(
                bindings.iter().map(|b| (&b.destination, consistent_hash::parse_weight(&b.routing_key).unwrap_or(1))),
            );
        }
    }

    fn rebuild_router_entry(
        st: &mut ExchangeState,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) {
        match &mut st.router {
            Router::Direct(map) => {
                if let Some(list) = map.get_mut(routing_key) {
                    if let Some(i) = list.iter().position(|d| d == destination) {
                        list.remove(i);
                    }
                    if list.is_empty() {
                        map.remove(routing_key);
                    }
                }
            }
            Router::Fanout | Router::ConsistentHash(_) => {}
            Router::Topic(index) => {
                index.remove(routing_key, destination);
            }
            Router::Headers(list) => {
                // Rebuild from the binding list: arguments identify the binding, compiled forms do not.
                let _ = arguments;
                list.retain(|(_, d)| d != destination);
                for b in st.bindings.iter().filter(|b| b.destination == *destination) {
                    if let Ok(compiled) = HeadersBinding::parse(&b.arguments) {
                        list.push((compiled, b.destination.clone()));
                    }
                }
            }
        }
    }

    /// Removes every binding to `destination`; returns how many went.
    pub fn unbind_destination(&self, destination: &Destination) -> usize {
        let mut st = self.write();
        let gone: Vec<Binding> = st.bindings.iter().filter(|b| b.destination == *destination).cloned().collect();
        st.bindings.retain(|b| b.destination != *destination);
        for b in &gone {
            Self::rebuild_router_entry(&mut st, &b.destination, &b.routing_key, &b.arguments);
        }
        Self::rebuild_ring(&mut st);
        gone.len()
    }

    /// A snapshot of the bindings.
    pub fn bindings(&self) -> Vec<Binding> {
        self.read().bindings.clone()
    }
    /// Whether anything is bound to this exchange.
    pub fn has_bindings(&self) -> bool {
        !self.read().bindings.is_empty()
    }
    /// Marks the exchange deleted and drops its bindings, its held delayed messages and its deduplication
    /// cache (deleting their store files).
    pub fn mark_deleted(&self) {
        {
            let mut st = self.write();
            st.deleted = true;
            // Set with the state's flag, under its lock; read without it by `is_deleted`.
            self.deleted.store(true, Ordering::Release);
            st.bindings.clear();
            st.router = Router::Fanout;
        }
        // Also wakes a delayed exchange's release task, which sees the deletion and ends.
        self.flavor.destroy();
    }
    /// Whether the exchange was deleted.
    #[inline]
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Collects the destinations matching `routing_key` (and `headers`) into `out`.
    pub fn route(&self, routing_key: &str, headers: Option<&FieldTable>, out: &mut Destinations) {
        let st = self.read();
        if st.deleted {
            return;
        }
        match &st.router {
            Router::Direct(map) => {
                if let Some(list) = map.get(routing_key) {
                    out.extend(list.iter().cloned());
                }
            }
            Router::Fanout => out.extend(st.bindings.iter().map(|b| b.destination.clone())),
            Router::Topic(index) => index.for_each_match(routing_key, |d| out.push(d.clone())),
            Router::Headers(list) => {
                for (binding, d) in list {
                    if binding.matches(headers) {
                        out.push(d.clone());
                    }
                }
            }
            Router::ConsistentHash(ring) => out.extend(ring.route(routing_key, headers).cloned()),
        }
    }
}
