//! The vhost's queue registry: declaring (store opened or recovered, definition saved), deleting,
//! exclusive and reply queues, and consumers coming and going.

use super::{write, VHost, DIRECT_REPLY_TO};
use crate::args::{self, QueueArguments, QueueType};
use crate::error::{BrokerError, ErrorKind, Result};
use crate::exchange::Destination;
use crate::queue::{
    ConnectionId, ConsumeOptions, ConsumerId, ConsumerSink, Queue, QueueHooks, QueueSpec, RecoveredIndex,
};
use crate::store::syncer::BatchState;
use crate::store::{Change, QueueDef};
use amq_protocol_types::FieldTable;
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
