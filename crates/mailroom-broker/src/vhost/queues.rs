//! The vhost's queue registry: declaring (store opened or recovered, definition saved), deleting,
//! exclusive and reply queues, and consumers coming and going.

use super::{read, write, Claimed, VHost, DIRECT_REPLY_TO};
use crate::args::{self, QueueArguments, QueueType};
use crate::client_input::ConsumerArguments;
use crate::error::{BrokerError, ErrorKind, Result};
use crate::exchange::Destination;
use crate::queue::{
    ConnectionId, ConsumeOptions, ConsumerId, ConsumerSink, MessageId, Queue, QueueHooks, QueueSpec, RecoveredIndex,
};
use crate::store::syncer::BatchState;
use crate::store::{Change, QueueDef};
use amq_protocol_types::FieldTable;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::watch;

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

impl VHost {
    /// `queue.declare` on behalf of connection `owner`.
    ///
    /// A durable queue's store is created, or opened and recovered, outside the queue map's lock (a deep
    /// queue's recovery reads every segment; routing and lookups go on meanwhile). Declares of one name are
    /// serialised by a claim on the name (`Claims`), so two of them never open the same store; the queue is inserted
    /// under the map's lock, with its definition's record.
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
        self.check_quorum(&name, &args, options)?;
        if let Some(existing) = read(&self.queues).get(&name).cloned() {
            return self.redeclare(&existing, options, owner);
        }
        let (queue, save, recovering) = {
            let _claim = self.claims.claim(Claimed::Queue, &name);
            // Another declare of the name may have won while this one waited for the claim.
            if let Some(existing) = read(&self.queues).get(&name).cloned() {
                return self.redeclare(&existing, options, owner);
            }
            let spec = QueueSpec {
                name: name.clone(),
                durable: options.durable,
                exclusive_owner: options.exclusive.then_some(owner),
                auto_delete: options.auto_delete,
                arguments: options.arguments.clone(),
                args,
            };
            let store = self.open_queue_store(&spec)?;
            let recovering = store.as_ref().is_some_and(|s| !s.recovered.is_empty());
            let (queue, save) = self.insert_queue(spec, store);
            (queue, save, recovering)
        };
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
        if let Some(PendingSave { durability, seq, unsaved }) = save {
            let result = durability.commit(seq);
            if let Some(tx) = unsaved {
                self.remove_unsaved(&queue, tx, &result);
            }
            result?;
        }
        Ok(declared)
    }

    /// Quorum queues must be durable, non-exclusive and not auto-delete.
    fn check_quorum(&self, name: &str, args: &QueueArguments, options: &QueueOptions) -> Result<()> {
        if args.queue_type != QueueType::Quorum {
            return Ok(());
        }
        let bad = if options.exclusive {
            Some("exclusive")
        } else if !options.durable {
            Some("non-durable")
        } else if options.auto_delete {
            Some("auto-delete")
        } else {
            None
        };
        match bad {
            Some(prop) => Err(BrokerError::precondition(format!(
                "invalid property '{prop}' for queue '{name}' in vhost '{}'",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// A declare of a queue that exists: ownership and equivalence checks, then declare-ok with its counts.
    fn redeclare(&self, existing: &Arc<Queue>, options: &QueueOptions, owner: ConnectionId) -> Result<QueueDeclared> {
        let name = existing.name();
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
        args::assert_equivalent(&s.arguments, &options.arguments, name, &self.name)?;
        existing.touch();
        Ok(QueueDeclared {
            name: name.to_owned(),
            message_count: existing.message_count(),
            consumer_count: existing.consumer_count(),
        })
    }

    /// Durable, non-exclusive queues keep persistent messages in a store: a saved queue being recovered
    /// opens its saved store (its messages become the index), a new one gets an empty store under a fresh
    /// generation (so its directory is its own). Runs under the name's claim, outside the map's lock.
    fn open_queue_store(&self, spec: &QueueSpec) -> Result<Option<OpenedStore>> {
        let Some(d) = self.durability.as_ref().filter(|_| spec.durable && spec.exclusive_owner.is_none()) else {
            return Ok(None);
        };
        let store_error = |e: crate::store::StoreError| {
            BrokerError::new(
                ErrorKind::ResourceError,
                format!("cannot open the store of queue '{}' in vhost '{}': {e}", spec.name, self.name),
            )
        };
        let mut recovered = RecoveredIndex::new(&spec.args);
        let fresh = d.saved_queue_generation(&self.name, &spec.name).is_none();
        let (store, generation) = if fresh {
            d.create_queue_store(&self.name, &spec.name).map_err(store_error)?
        } else {
            d.open_queue_store(&self.name, &spec.name, |r| recovered.add(r)).map_err(store_error)?
        };
        Ok(Some(OpenedStore { store, generation, recovered, fresh }))
    }

    /// Creates the queue and inserts it into the map with its definition's record (under the map's lock, so
    /// the log orders this declare and a deletion of the name as memory does). Returns the queue and, for a
    /// durable one, the save to wait for.
    fn insert_queue(&self, spec: QueueSpec, opened: Option<OpenedStore>) -> (Arc<Queue>, Option<PendingSave<'_>>) {
        let hooks: Weak<dyn QueueHooks> = self.myself.clone();
        let name = spec.name.clone();
        let def = opened.as_ref().map(|o| QueueDef {
            vhost: self.name.clone(),
            name: name.clone(),
            auto_delete: spec.auto_delete,
            arguments: spec.arguments.clone(),
            generation: o.generation,
        });
        let is_new = opened.as_ref().is_some_and(|o| o.fresh);
        let (store, recovered) = match opened {
            Some(o) => (Some(o.store), o.recovered),
            None => (None, RecoveredIndex::default()),
        };
        let queue = Queue::create(spec, hooks, store, recovered, Arc::clone(&self.paging));
        let mut queues = write(&self.queues);
        let save = self.durability.as_ref().zip(def).map(|(d, def)| PendingSave {
            durability: d,
            seq: d.record(Change::PutQueue(def)),
            // Registered before the queue is visible, so no publish can miss it.
            unsaved: is_new.then(|| self.add_unsaved(&queue)),
        });
        queues.insert(name, Arc::clone(&queue));
        (queue, save)
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
                    // Marked for routing as it leaves the map, under its lock: a publisher's cached queue
                    // (`PublishCache`) that is not marked is still the map's queue of its name.
                    queue.stop_routing();
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
        mut options: ConsumeOptions,
        sink: ConsumerSink,
    ) -> Result<(Arc<Queue>, ConsumerId)> {
        ConsumerArguments::apply(&mut options)?;
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

    /// [`VHost::cancel`] that also takes back, in the same step, every delivery the consumer still holds
    /// ([`Queue::cancel_and_return`]): for an in-process client whose consumer and channel go together.
    pub fn cancel_and_return(&self, queue: &Arc<Queue>, consumer: ConsumerId, seen: &HashSet<MessageId>) {
        if queue.cancel_and_return(consumer, seen) && queue.should_auto_delete() {
            self.remove_queue(queue);
        }
    }
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

/// A durable queue's store, opened for a declare before the queue exists.
struct OpenedStore {
    store: crate::store::QueueStore,
    generation: u64,
    /// What the store held (empty for a new store).
    recovered: RecoveredIndex,
    /// A new store under a fresh generation (not a saved queue's).
    fresh: bool,
}

/// A queue definition recorded in the definitions log, not yet committed.
struct PendingSave<'a> {
    durability: &'a Arc<crate::storage::Durability>,
    seq: u64,
    /// For a new queue: tells publishes waiting on its save how it went.
    unsaved: Option<watch::Sender<BatchState>>,
}

#[cfg(test)]
mod tests {
    use crate::store::queue_store::test_dir;
    use crate::vhost::QueueOptions;
    use crate::{Broker, BrokerConfig};
    use std::sync::Arc;

    /// Declares of one new durable queue racing each other: all succeed, and only one store is created
    /// for it (the name's claim lets one declare open a store; the others find the queue).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_declares_of_a_durable_queue_create_one_store() {
        let dir = test_dir("declare-race");
        let broker = Broker::open(BrokerConfig { data_dir: Some(dir.clone()), ..BrokerConfig::default() }).unwrap();
        let v = broker.vhost("/").unwrap();
        let runtime = tokio::runtime::Handle::current();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let declares: Vec<_> = (0..8)
            .map(|_| {
                let (v, runtime, barrier) = (Arc::clone(&v), runtime.clone(), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let _runtime = runtime.enter();
                    barrier.wait();
                    v.declare_queue("raced", &QueueOptions { durable: true, ..Default::default() }, 1).map(|d| d.name)
                })
            })
            .collect();
        for declare in declares {
            assert_eq!(declare.join().unwrap().unwrap(), "raced");
        }
        let stores = std::fs::read_dir(dir.join("msgs")).unwrap().count();
        assert_eq!(stores, 1, "one store directory for the queue, none left over by a losing declare");
        assert_eq!(v.queues().iter().filter(|q| q.name() == "raced").count(), 1);
    }
}
