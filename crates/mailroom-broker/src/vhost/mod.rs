//! A virtual host: its exchanges, queues, bindings and policies, and the publish path through them.
//!
//! One file per job: `exchanges.rs` and `bindings.rs` (the exchange side of the registry), `queues.rs`
//! (the queue registry), `policies.rs`, `publish.rs` (route and enqueue), `dead_letters.rs` (the
//! dead-letter settling loop) and `redrive.rs`. This file holds the registry's maps and lookups.

mod bindings;
mod dead_letters;
mod exchanges;
mod policies;
mod publish;
mod queues;
mod redrive;

pub use exchanges::ExchangeOptions;
pub use publish::{PublishCache, PublishResult};
pub use queues::{generate_queue_name, QueueDeclared, QueueOptions};
pub use redrive::{first_death, RedriveOptions, RedriveOutcome, RedriveTarget};

use crate::error::{BrokerError, Result};
use crate::exchange::flavor::ExchangeFlavor;
use crate::exchange::{Exchange, ExchangeKind, ExchangeSpec};
use crate::paging::Paging;
use crate::policy::Policy;
use crate::queue::{ConnectionId, Deaths, Queue, QueueHooks};
use crate::storage::Durability;
use crate::store::syncer::BatchState;
use amq_protocol_types::FieldTable;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use tokio::sync::watch;

/// The hasher of the exchange and queue maps, which every publish looks up by name: foldhash, seeded
/// randomly per process (names come from clients), much cheaper than SipHash on short names.
type NameHasher = foldhash::quality::RandomState;

/// A virtual host.
#[derive(Debug)]
pub struct VHost {
    name: String,
    exchanges: RwLock<HashMap<String, Arc<Exchange>, NameHasher>>,
    queues: RwLock<HashMap<String, Arc<Queue>, NameHasher>>,
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
    deferred_dead_letters: Mutex<Vec<Deaths>>,
    /// Orders durable bind/unbind with the record each appends to the definitions log, so the log's order
    /// of changes to one binding is memory's.
    binding_log: Mutex<()>,
    /// New durable queues whose definition is not on disk yet, with what its save will report: a publish
    /// confirm for a message stored in one also waits for that, or a crash right after the confirm would
    /// lose the queue and the message with it. Usually empty, so publishing checks only `unsaved_count`.
    unsaved: Mutex<Vec<(Arc<Queue>, watch::Receiver<BatchState>)>>,
    unsaved_count: AtomicUsize,
    /// Names a declare is creating right now, so two declares of one name never open its store twice.
    claims: Claims,
}

/// What a [`Claims`] name is the name of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Claimed {
    Queue,
    Exchange,
}

/// Names being declared: a declare that creates a queue or exchange claims its name while it opens the
/// store and inserts it, outside the registry's locks; a second declare of the name waits for the first.
#[derive(Debug, Default)]
pub(super) struct Claims {
    names: Mutex<HashSet<(Claimed, String)>>,
    released: Condvar,
}

impl Claims {
    /// Claims `name` (waiting while another declare holds it) until the returned guard is dropped.
    pub(super) fn claim(&self, kind: Claimed, name: &str) -> NameClaim<'_> {
        let key = (kind, name.to_owned());
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        while names.contains(&key) {
            names = self.released.wait(names).unwrap_or_else(|p| p.into_inner());
        }
        names.insert(key.clone());
        NameClaim { claims: self, key }
    }
}

/// One declare's claim on a name ([`Claims::claim`]); released on drop.
pub(super) struct NameClaim<'a> {
    claims: &'a Claims,
    key: (Claimed, String),
}

impl Drop for NameClaim<'_> {
    fn drop(&mut self) {
        self.claims.names.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
        self.claims.released.notify_all();
    }
}

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

pub(super) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
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
            exchanges: RwLock::new(HashMap::default()),
            queues: RwLock::new(HashMap::default()),
            ids,
            myself: myself.clone(),
            durability,
            policies: RwLock::new(Vec::new()),
            paging,
            deferred_dead_letters: Mutex::new(Vec::new()),
            binding_log: Mutex::new(()),
            unsaved: Mutex::new(Vec::new()),
            unsaved_count: AtomicUsize::new(0),
            claims: Claims::default(),
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
}

impl QueueHooks for VHost {
    fn settle_deaths(&self, deaths: Deaths) {
        self.settle_all_deaths(vec![deaths]);
    }

    fn expire_queue(&self, queue: &Arc<Queue>) {
        self.remove_queue(queue);
    }

    fn recovery_gate(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.durability.as_ref().filter(|d| d.is_recovering()).map(|d| d.recovering())
    }
}
