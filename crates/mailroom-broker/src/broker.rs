//! The broker: virtual hosts and the access registry (users, permissions, limits), opened in-process
//! with [`Broker::open`].

use crate::access::{AccessControl, AuthError, AuthenticatedUser, DefaultUser, LoopbackUsers};
use crate::alarm::{self, AlarmConfig, AlarmState, Watched};
use crate::connections::ConnectionRegistry;
use crate::definitions;
use crate::error::{BrokerError, ErrorKind, Result};
use crate::paging::{Paging, PagingConfig};
use crate::queue::ConnectionId;
use crate::storage::Durability;
use crate::store::segment::StoreIo;
use crate::store::{SyncStats, SyncerConfig};
use crate::vhost::VHost;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// How to open a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Virtual hosts to create.
    pub vhosts: Vec<String>,
    /// The user a blank node is created with (administrator, full permissions on `/`).
    pub default_user: DefaultUser,
    /// Users allowed to log in from loopback only (RabbitMQ's `loopback_users`).
    pub loopback_users: LoopbackUsers,
    /// Memory and disk thresholds that block publishers.
    pub alarms: AlarmConfig,
    /// Where durable queues keep persistent messages and where definitions are saved; None keeps
    /// everything in memory (the embedded default).
    pub data_dir: Option<PathBuf>,
    /// Group commit of the store: how long a round may wait to gather more writers (used with `data_dir`).
    pub syncer: SyncerConfig,
    /// The store's file I/O (None = the real file system); tests inject faults through it.
    pub store_io: Option<Arc<dyn StoreIo>>,
    /// Each queue's memory budget; bodies past it are paged to disk (see [`crate::paging`]).
    pub paging: PagingConfig,
}

impl Default for BrokerConfig {
    /// One vhost `/` and the default user `guest`/`guest`, allowed from loopback only, as RabbitMQ ships.
    fn default() -> Self {
        Self {
            vhosts: vec!["/".to_owned()],
            default_user: DefaultUser::guest(),
            loopback_users: LoopbackUsers::default(),
            alarms: AlarmConfig::default(),
            data_dir: None,
            syncer: SyncerConfig::default(),
            store_io: None,
            paging: PagingConfig::default(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct BrokerInner {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    access: AccessControl,
    ids: Arc<AtomicU64>,
    alarms: watch::Sender<AlarmState>,
    durability: Option<Arc<Durability>>,
    paging: Arc<Paging>,
    connections: Arc<ConnectionRegistry>,
}

impl alarm::Watched for BrokerInner {
    /// Whether saving the definitions is failing: the disk alarm stays raised meanwhile.
    fn definitions_failing(&self) -> bool {
        self.durability.as_ref().is_some_and(|d| d.definitions_failing())
    }

    /// Message body bytes held in RAM by every queue (ready and unacked; a fanout copy counts per queue;
    /// bodies paged out to disk do not count).
    fn held_bytes(&self) -> u64 {
        let vhosts: Vec<_> = self.vhosts.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        vhosts.iter().flat_map(|v| v.queues()).map(|q| q.held_bytes()).sum()
    }

    /// Durable stores that cannot write right now (their retries run; the store alarm is raised meanwhile).
    fn failing_stores(&self) -> u64 {
        self.durability.as_ref().map_or(0, |d| d.failing_stores())
    }

    /// Why the most recent failing store failed, for the alarm's log line.
    fn failing_reason(&self) -> String {
        self.durability.as_ref().map(|d| d.failing_reason()).unwrap_or_default()
    }
}

/// The broker core. Cheap to clone; every clone is the same broker.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

impl Broker {
    /// Opens a broker in this process. Must be called inside a tokio runtime (queues run timers).
    pub fn open(config: BrokerConfig) -> Result<Broker> {
        let ids = Arc::new(AtomicU64::new(1));
        let durability = match &config.data_dir {
            Some(dir) => Some(Durability::open(dir, config.syncer.clone(), config.store_io.clone()).map_err(|e| {
                BrokerError::new(ErrorKind::ResourceError, format!("cannot open data dir {}: {e}", dir.display()))
            })?),
            None => None,
        };
        let definitions = definitions::load(durability.as_deref())?;
        let paging = Paging::new(config.paging.clone(), config.data_dir.as_deref(), config.store_io.clone());
        let mut names = config.vhosts.clone();
        for v in definitions.iter().flat_map(|d| d.vhosts.iter()) {
            if !names.contains(&v.name) {
                names.push(v.name.clone());
            }
        }
        let vhosts: HashMap<String, Arc<VHost>> = names
            .iter()
            .map(|name| (name.clone(), VHost::new(name, Arc::clone(&ids), durability.clone(), Arc::clone(&paging))))
            .collect();
        let legacy: Vec<_> = definitions
            .iter()
            .flat_map(|d| &d.users)
            .map(|u| (u.name.clone(), u.password.clone(), u.tags.clone()))
            .collect();
        if let (Some(d), Some(defs)) = (&durability, definitions) {
            definitions::replay(d, &vhosts, defs);
        }
        let legacy: Vec<_> = legacy.iter().map(|(n, p, t)| (n.as_str(), p.as_str(), t.as_slice())).collect();
        let access = crate::access::store::open_registry(
            config.loopback_users,
            &config.default_user,
            "/",
            config.data_dir.as_deref(),
            &legacy,
        )
        .map_err(|e| BrokerError::new(ErrorKind::ResourceError, format!("cannot open users and permissions: {e}")))?;
        let connections: Arc<ConnectionRegistry> = Arc::default();
        let registry = Arc::downgrade(&connections);
        access.on_user_deleted(crate::access::UserDeleted(Box::new(move |user| {
            if let Some(registry) = registry.upgrade() {
                registry.close_user(user);
            }
        })));
        let (alarms, _) = watch::channel(AlarmState::default());
        if let Some(d) = &durability {
            d.set_alarms(alarms.clone());
        }
        let inner =
            Arc::new(BrokerInner { vhosts: RwLock::new(vhosts), access, ids, alarms, durability, paging, connections });
        let alarm_config = config.alarms;
        // With a data dir the monitor also watches the stores (the store alarm), so it always runs.
        if alarm_config.memory_high_watermark.is_some()
            || alarm_config.disk_free_limit.is_some()
            || inner.durability.is_some()
        {
            alarm::start_monitor(Arc::downgrade(&inner), alarm_config, inner.alarms.clone()).map_err(|e| {
                BrokerError::new(ErrorKind::ResourceError, format!("cannot start the alarm monitor thread: {e}"))
            })?;
        }
        Ok(Broker { inner })
    }

    /// Watches the resource alarms (memory, disk); publishers are blocked while any is raised.
    pub fn alarms(&self) -> watch::Receiver<AlarmState> {
        self.inner.alarms.subscribe()
    }

    /// The open client connections (registered by the wire servers, read by the management API).
    pub fn connections(&self) -> &Arc<ConnectionRegistry> {
        &self.inner.connections
    }

    /// Whether the durable store is in use (a data directory was given).
    pub fn is_durable(&self) -> bool {
        self.inner.durability.is_some()
    }

    /// Fsyncs the store has performed (0 without a data dir), for the fsyncs/s metric.
    pub fn fsyncs(&self) -> u64 {
        self.sync_stats().fsyncs
    }

    /// The store's group-commit counters (all zero without a data dir): fsyncs, rounds, records covered.
    pub fn sync_stats(&self) -> SyncStats {
        self.inner.durability.as_ref().map_or_else(SyncStats::default, |d| d.sync_stats())
    }

    /// Message body bytes held by every queue (with [`Broker::client_memory`], what the memory alarm compares
    /// with its watermark).
    pub fn held_bytes(&self) -> u64 {
        self.inner.held_bytes()
    }

    /// Bytes connections hold for clients outside the queues, by kind (process-wide).
    pub fn client_memory(&self) -> crate::client_memory::ClientMemoryFigures {
        crate::client_memory::CLIENT_MEMORY.figures()
    }

    /// The users, permissions, topic permissions and limits.
    pub fn access(&self) -> &AccessControl {
        &self.inner.access
    }

    /// Checks a password login; `from_loopback` says whether the peer is on this machine.
    pub fn authenticate(
        &self,
        username: &str,
        password: &str,
        from_loopback: bool,
    ) -> std::result::Result<AuthenticatedUser, AuthError> {
        self.inner.access.authenticate(username, password.as_bytes(), from_loopback)
    }

    /// A virtual host by name (530 NOT_ALLOWED when missing, as `connection.open` answers).
    pub fn vhost(&self, name: &str) -> Result<Arc<VHost>> {
        self.inner
            .vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::new(ErrorKind::NotAllowed, format!("vhost {name} not found")))
    }

    /// Every virtual host, sorted by name.
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        let mut all: Vec<_> = self.inner.vhosts.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Adds a virtual host (no-op if it exists).
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        let mut vhosts = self.inner.vhosts.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(vhosts.entry(name.to_owned()).or_insert_with(|| {
            VHost::new(name, Arc::clone(&self.inner.ids), self.inner.durability.clone(), Arc::clone(&self.inner.paging))
        }))
    }

    /// Deletes a virtual host with its queues, exchanges and stored messages, forgets its permissions and
    /// limits, and closes its connections (320 "vhost 'v' is deleted", as RabbitMQ) (`DELETE
    /// /api/vhosts/{name}`). NOT_FOUND when it does not exist.
    pub fn delete_vhost(&self, name: &str) -> Result<()> {
        let removed = self.inner.vhosts.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        let vhost =
            removed.ok_or_else(|| BrokerError::new(ErrorKind::NotFound, format!("vhost '{name}' not found")))?;
        self.inner.connections.close_vhost(name);
        for q in vhost.queues() {
            // The queue's own owner, so that exclusive queues go too (their connections see them vanish).
            let owner = q.spec().exclusive_owner.unwrap_or(0);
            if let Err(e) = vhost.delete_queue(q.name(), false, false, owner) {
                tracing::warn!(vhost = name, queue = q.name(), error = %e, "cannot delete queue of deleted vhost");
            }
        }
        for x in vhost.exchanges().iter().filter(|x| !x.name().is_empty() && !x.name().starts_with("amq.")) {
            if let Err(e) = vhost.delete_exchange(x.name(), false) {
                tracing::warn!(vhost = name, exchange = x.name(), error = %e, "cannot delete exchange of deleted vhost");
            }
        }
        self.inner.access.delete_vhost(name);
        if let Some(d) = &self.inner.durability {
            d.record_and_commit(crate::store::definitions_log::Change::DeleteVhost { name: name.to_owned() })?;
        }
        Ok(())
    }

    /// Writes what exchanges still buffer for their stores (the settles of released delayed messages), so
    /// a clean stop does not release those messages again after the restart. Call before exiting.
    pub fn flush_exchange_stores(&self) {
        for v in self.vhosts() {
            for ex in v.exchanges() {
                ex.flavor().flush();
            }
        }
    }

    /// Before a clean exit: stops every queue's expiry (what falls due from now on expires at the next
    /// start), lets dead-letter moves in flight settle (up to 2 s), runs
    /// [`Broker::flush_exchange_stores`], then fsyncs every queue store, ack logs included (those are
    /// otherwise fsynced at most every `ack_sync_interval`), so that even a power loss right after a clean
    /// stop brings no acked message back.
    pub async fn flush_stores(&self) {
        // Nothing may expire any more: a move begun after the wait below could be cut off by the exit, and
        // in the embedded broker, a queue outliving this stop would keep changing its files.
        for q in self.vhosts().iter().flat_map(|v| v.queues()) {
            q.stop_expiring();
        }
        // Dead-letter moves settle their sources once the copies are durable: let those in flight finish
        // (bounded: a target refusing copies keeps its move retrying), or the restart moves them again.
        const MOVES_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
        let deadline = tokio::time::Instant::now() + MOVES_WAIT;
        while self.vhosts().iter().flat_map(|v| v.queues()).any(|q| q.moves_in_flight() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        self.flush_exchange_stores();
        let tickets: Vec<_> = self.vhosts().iter().flat_map(|v| v.queues()).filter_map(|q| q.sync_store()).collect();
        for ticket in tickets {
            if let Err(e) = ticket.wait().await {
                tracing::warn!(error = %e, "a queue store could not be synced at shutdown");
            }
        }
    }

    /// A fresh id for a connection or embedded session (exclusive-queue owner).
    pub fn next_connection_id(&self) -> ConnectionId {
        self.inner.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Cleans up after a connection: deletes its exclusive queues in every vhost.
    pub fn connection_closed(&self, connection: ConnectionId) {
        let vhosts: Vec<_> = self.inner.vhosts.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for v in vhosts {
            v.connection_closed(connection);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::store::queue_store::test_dir;
    use crate::store::queue_store::tests::{FaultIo, Faults};
    use crate::vhost::QueueOptions;
    use amq_protocol::protocol::BasicProperties;
    use bytes::Bytes;

    /// A clean stop leaves no ack-log write un-fsynced (they are otherwise fsynced lazily, at most every
    /// `ack_sync_interval`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flush_stores_fsyncs_every_ack_log() {
        let dir = test_dir("flush-stores");
        let faults = Arc::new(Faults::default());
        let broker = Broker::open(BrokerConfig {
            data_dir: Some(dir.clone()),
            store_io: Some(Arc::new(FaultIo(faults.clone()))),
            ..BrokerConfig::default()
        })
        .unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("q", &QueueOptions { durable: true, ..Default::default() }, 1).unwrap();
        let props = BasicProperties::default().with_delivery_mode(2);
        for _ in 0..20 {
            let published = v.publish("", Message::new("", "q", props.clone(), Bytes::from_static(b"m"))).unwrap();
            for t in published.durable {
                t.wait().await.unwrap();
            }
        }
        let q = v.queue("q", 1).unwrap();
        // Acks one at a time, each its own ack-log write, as fast as possible.
        while let Some(got) = q.get(false) {
            q.ack(&[got.id]);
        }

        broker.flush_stores().await;
        let written = faults.written.lock().unwrap().clone();
        let synced = faults.synced.lock().unwrap().clone();
        let ack_logs: Vec<_> = written.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "ack")).collect();
        assert!(!ack_logs.is_empty(), "the acks were logged");
        for (path, end) in ack_logs {
            assert_eq!(synced.get(path), Some(end), "{} not fsynced to its end by flush_stores", path.display());
        }
    }

    /// A duplicate dropped by a deduplicating queue is confirmed only once the original is on disk: a
    /// crash before that fsync would otherwise lose a message whose duplicate was already acked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_level_duplicate_is_confirmed_only_after_the_original_is_fsynced() {
        use amq_protocol_types::{AMQPValue, FieldTable, LongString};
        let dir = test_dir("dedup-confirm");
        let faults = Arc::new(Faults::default());
        let broker = Broker::open(BrokerConfig {
            data_dir: Some(dir.clone()),
            store_io: Some(Arc::new(FaultIo(faults.clone()))),
            ..BrokerConfig::default()
        })
        .unwrap();
        let v = broker.vhost("/").unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
        v.declare_queue("q", &QueueOptions { durable: true, arguments, ..Default::default() }, 1).unwrap();
        let mut headers = FieldTable::default();
        headers.insert("x-deduplication-header".into(), AMQPValue::LongString(LongString::from("k1")));
        let props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);

        // No fsync completes while the gate is closed.
        *faults.gate_closed.lock().unwrap() = true;
        let original = v.publish("", Message::new("", "q", props.clone(), Bytes::from_static(b"a"))).unwrap();
        let duplicate = v.publish("", Message::new("", "q", props, Bytes::from_static(b"b"))).unwrap();
        assert_eq!(original.durable.len(), 1);
        assert_eq!(duplicate.durable.len(), 1, "the duplicate's confirm waits for the store");
        let waiting = tokio::spawn(async move {
            for t in duplicate.durable {
                t.wait().await.unwrap();
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let confirmed_early = waiting.is_finished();
        // Open the gate before asserting: a failing test must not leave the syncer blocked forever.
        *faults.gate_closed.lock().unwrap() = false;
        faults.gate.notify_all();
        assert!(!confirmed_early, "the duplicate is not confirmed before the original's fsync");
        for t in original.durable {
            t.wait().await.unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await.unwrap().unwrap();
        assert_eq!(v.queue("q", 1).unwrap().message_count(), 1, "the duplicate was dropped");
    }
}
