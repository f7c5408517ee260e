//! Durability glue between the broker and its store: where a durable queue's files live, how a message
//! becomes a stored record and back, and the definitions file kept in step with durable declares.

use crate::exchange::{Destination, ExchangeSpec};
use crate::message::Message;
use crate::store::segment::{OsIo, StoreIo};
use crate::store::{
    BindingDef, Definitions, DestinationKind, ExchangeDef, QueueDef, QueueStore, StoreConfig, StoreResult,
    StoredMessage, SyncStats, Syncer, SyncerConfig, VhostDef,
};
use crate::vhost::VHost;
use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

/// The broker's durable state: the data directory, the shared fsync syncer and the definitions file.
#[derive(Debug)]
pub struct Durability {
    dir: PathBuf,
    syncer: Mutex<Syncer>,
    /// The store's file I/O (the real file system, or a fault-injecting one in tests).
    io: Arc<dyn StoreIo>,
    vhosts: RwLock<Vec<Weak<VHost>>>,
    /// Serialises definition saves so the newest snapshot is the one left on disk.
    save_lock: Mutex<()>,
    /// While the broker re-declares saved definitions, saving them again would be wasted fsyncs.
    recovering: std::sync::atomic::AtomicBool,
    /// The same flag, watched by delayed exchanges: they release nothing until queues and bindings are back.
    recovering_watch: watch::Sender<bool>,
}

/// Which exchange service a store under the data dir belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeStoreKind {
    /// The held messages of a durable delayed-message exchange.
    Delayed,
    /// The cache of a durable deduplicating exchange with `x-cache-persistence: disk`.
    Dedup,
}

impl ExchangeStoreKind {
    fn dir_name(self) -> &'static str {
        match self {
            Self::Delayed => "delayed",
            Self::Dedup => "dedup",
        }
    }
}

impl Durability {
    /// Opens the data directory and starts the group-commit syncer (`io` None = the real file system).
    pub fn open(dir: &Path, syncer: SyncerConfig, io: Option<Arc<dyn StoreIo>>) -> std::io::Result<Arc<Durability>> {
        std::fs::create_dir_all(dir.join("msgs"))?;
        Ok(Arc::new(Durability {
            dir: dir.to_path_buf(),
            syncer: Mutex::new(Syncer::start(syncer)),
            io: io.unwrap_or_else(|| Arc::new(OsIo)),
            vhosts: RwLock::new(Vec::new()),
            save_lock: Mutex::new(()),
            recovering: std::sync::atomic::AtomicBool::new(false),
            recovering_watch: watch::channel(false).0,
        }))
    }

    /// Registers a vhost whose durable resources the definitions file must list.
    pub fn register(&self, vhost: &Arc<VHost>) {
        self.vhosts.write().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(vhost));
    }

    /// The definitions saved by a previous run, if any.
    pub fn load_definitions(&self) -> StoreResult<Option<Definitions>> {
        Definitions::load(&self.dir)
    }

    /// Marks the start or end of recovery (saves are skipped meanwhile).
    pub fn set_recovering(&self, on: bool) {
        self.recovering.store(on, std::sync::atomic::Ordering::SeqCst);
        self.recovering_watch.send_replace(on);
    }

    /// Watches whether the broker is still re-declaring saved definitions.
    pub fn recovering(&self) -> watch::Receiver<bool> {
        self.recovering_watch.subscribe()
    }

    /// Whether the broker is re-declaring saved definitions right now.
    pub fn is_recovering(&self) -> bool {
        self.recovering.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes the durable exchanges, queues and bindings of every vhost (fsynced, atomic rename).
    pub fn save_definitions(&self) {
        if self.recovering.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let _guard = self.save_lock.lock().unwrap_or_else(|p| p.into_inner());
        let vhosts: Vec<Arc<VHost>> =
            self.vhosts.read().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
        let mut defs = Definitions::default();
        for v in &vhosts {
            defs.vhosts.push(VhostDef { name: v.name().to_owned() });
            for p in v.policies() {
                defs.policies.push(crate::store::PolicyDef {
                    vhost: v.name().to_owned(),
                    name: p.name.clone(),
                    pattern: p.pattern.clone(),
                    apply_to: p.apply_to.as_str().to_owned(),
                    priority: p.priority,
                    definition: p.definition.clone(),
                });
            }
            for ex in v.exchanges() {
                let s = ex.spec();
                if !is_user_durable_exchange(s) {
                    continue;
                }
                defs.exchanges.push(ExchangeDef {
                    vhost: v.name().to_owned(),
                    name: s.name.clone(),
                    kind: s.type_name().to_owned(),
                    auto_delete: s.auto_delete,
                    internal: s.internal,
                    arguments: s.arguments.clone(),
                });
            }
            for q in v.queues() {
                let s = q.spec();
                if s.durable && s.exclusive_owner.is_none() {
                    defs.queues.push(QueueDef {
                        vhost: v.name().to_owned(),
                        name: s.name.clone(),
                        auto_delete: s.auto_delete,
                        arguments: s.arguments.clone(),
                    });
                }
            }
            for ex in v.exchanges() {
                if !ex.spec().durable || ex.name().is_empty() {
                    continue;
                }
                for b in ex.bindings().into_iter().filter(|b| b.destination.is_durable()) {
                    let (destination, destination_kind) = match &b.destination {
                        Destination::Queue(q) => (q.name().to_owned(), DestinationKind::Queue),
                        Destination::Exchange(e) => (e.name().to_owned(), DestinationKind::Exchange),
                    };
                    defs.bindings.push(BindingDef {
                        vhost: v.name().to_owned(),
                        source: ex.name().to_owned(),
                        destination,
                        destination_kind,
                        routing_key: b.routing_key.clone(),
                        arguments: b.arguments.clone(),
                    });
                }
            }
        }
        if let Err(e) = defs.save(&self.dir) {
            tracing::error!(error = %e, dir = %self.dir.display(), "cannot save definitions");
        }
    }

    /// The directory of a durable queue's segments: a fixed-length hash of its vhost and name, so any
    /// name (up to 255 bytes, any characters) maps to a valid file name.
    pub fn queue_dir(&self, vhost: &str, queue: &str) -> PathBuf {
        let key = format!("{vhost}\u{0}{queue}");
        let a = fnv1a64(key.as_bytes(), 0xcbf2_9ce4_8422_2325);
        let b = fnv1a64(key.as_bytes(), 0x6c62_272e_07bb_0142);
        self.dir.join("msgs").join(format!("{a:016x}{b:016x}"))
    }

    /// Opens (recovering) a durable queue's store, handing each message it still holds to `visit` as the
    /// scan finds it (so the caller keeps only an index and memory stays bounded by one segment).
    pub fn open_queue_store(
        &self,
        vhost: &str,
        queue: &str,
        visit: impl FnMut(crate::store::Recovered),
    ) -> StoreResult<QueueStore> {
        let dir = self.queue_dir(vhost, queue);
        let handle = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).handle();
        let (store, report) =
            QueueStore::recover_with(&dir, StoreConfig::default(), handle, Arc::clone(&self.io), visit)?;
        for d in &report.damaged {
            tracing::warn!(queue, file = %d.path.display(), offset = d.offset, "damaged record skipped");
        }
        for t in &report.truncated {
            tracing::warn!(queue, file = %t.path.display(), offset = t.offset, "torn tail cut off");
        }
        Ok(store)
    }

    /// The store's file I/O (the paging stores use it too).
    pub fn io(&self) -> Arc<dyn StoreIo> {
        Arc::clone(&self.io)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of a durable exchange's store (delayed messages or deduplication cache), named like
    /// a queue's: a fixed-length hash of its vhost and name.
    pub fn exchange_store_dir(&self, kind: ExchangeStoreKind, vhost: &str, exchange: &str) -> PathBuf {
        let key = format!("{vhost}\u{0}{exchange}");
        let a = fnv1a64(key.as_bytes(), 0xcbf2_9ce4_8422_2325);
        let b = fnv1a64(key.as_bytes(), 0x6c62_272e_07bb_0142);
        self.dir.join(kind.dir_name()).join(format!("{a:016x}{b:016x}"))
    }

    /// Opens a durable exchange's store, handing each record it still holds to `visit` in append order.
    /// Outside recovery the exchange is new, so a directory left by a deletion that crashed midway is
    /// stale and is removed first.
    pub fn open_exchange_store(
        &self,
        kind: ExchangeStoreKind,
        vhost: &str,
        exchange: &str,
        config: StoreConfig,
        visit: impl FnMut(crate::store::Recovered),
    ) -> StoreResult<QueueStore> {
        let dir = self.exchange_store_dir(kind, vhost, exchange);
        if !self.recovering.load(std::sync::atomic::Ordering::SeqCst) && dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| crate::store::StoreError::io("removing", &dir, e))?;
        }
        let handle = self.syncer.lock().unwrap_or_else(|p| p.into_inner()).handle();
        let (store, report) = QueueStore::recover_with(&dir, config, handle, Arc::clone(&self.io), visit)?;
        for d in &report.damaged {
            tracing::warn!(exchange, file = %d.path.display(), offset = d.offset, "damaged record skipped");
        }
        for t in &report.truncated {
            tracing::warn!(exchange, file = %t.path.display(), offset = t.offset, "torn tail cut off");
        }
        Ok(store)
    }

    /// The syncer's counters (fsyncs, rounds, records), for the metrics.
    pub fn sync_stats(&self) -> SyncStats {
        self.syncer.lock().unwrap_or_else(|p| p.into_inner()).stats()
    }

    /// Why the most recent failing store failed (empty if none did).
    pub fn failing_reason(&self) -> String {
        let syncer = self.syncer.lock().unwrap_or_else(|p| p.into_inner());
        if syncer.handle().is_stopped() {
            return "the syncer is not running".to_owned();
        }
        syncer.failing_reason()
    }

    /// Stores that cannot write now; the whole store counts as failing while the syncer is not running
    /// (every durable write is then refused).
    pub fn failing_stores(&self) -> u64 {
        let syncer = self.syncer.lock().unwrap_or_else(|p| p.into_inner());
        syncer.stats().failing_stores + u64::from(syncer.handle().is_stopped())
    }
}

/// Whether an exchange is one the definitions file records (durable, not predeclared).
fn is_user_durable_exchange(spec: &ExchangeSpec) -> bool {
    spec.durable && !spec.name.is_empty() && !spec.name.starts_with("amq.")
}

fn fnv1a64(bytes: &[u8], offset: u64) -> u64 {
    bytes.iter().fold(offset, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// How far ahead the broker computes a deadline at most: about a century. A TTL, delay or stored expiry
/// further away never fires in practice, and computing it exactly would overflow `Instant` (a panic) or
/// wrap around to "already expired".
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `from` plus `ms` milliseconds, capped at [`FAR_FUTURE`] (any `u64` is safe, `u64::MAX` included).
pub fn deadline_after(from: Instant, ms: u64) -> Instant {
    from + Duration::from_millis(ms).min(FAR_FUTURE)
}

/// Milliseconds since the Unix epoch for an `Instant` deadline (records outlive the process's clock).
pub fn wall_clock_ms(deadline: Instant) -> u64 {
    let now_wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let remaining = deadline.saturating_duration_since(Instant::now());
    u64::try_from((now_wall + remaining).as_millis()).unwrap_or(u64::MAX)
}

/// The `Instant` for a wall-clock deadline in ms since the Unix epoch (one in the past is now).
pub fn instant_from_wall_ms(ms: u64) -> Instant {
    let now_wall_ms =
        u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX);
    deadline_after(Instant::now(), ms.saturating_sub(now_wall_ms))
}

/// The stored form of a message (property bytes kept verbatim when the broker has them).
pub fn to_stored(id: u64, message: &Message, expires_at: Option<Instant>) -> StoredMessage {
    StoredMessage {
        id,
        exchange: message.exchange.to_string(),
        routing_key: message.routing_key.to_string(),
        properties: message.raw_properties.clone().unwrap_or_else(|| encode_properties(&message.properties)),
        body: message.body.clone(),
        expires_at_ms: expires_at.map(wall_clock_ms),
        delivery_count: 0,
    }
}

/// The message back from its stored form; None if its property bytes do not parse.
pub fn from_stored(stored: StoredMessage) -> Option<Message> {
    let properties = parse_properties(&stored.properties)?;
    Some(Message {
        exchange: stored.exchange.into(),
        routing_key: stored.routing_key.into(),
        properties,
        raw_properties: Some(stored.properties),
        body: stored.body,
    })
}

/// Encodes content-header property bytes (flags + list) for a message the broker changed.
pub(crate) fn encode_properties(properties: &BasicProperties) -> Bytes {
    match cookie_factory::gen_simple(amq_protocol::protocol::basic::gen_properties(properties), Vec::new()) {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) => {
            // Only a ShortString over 255 bytes can fail; such a property could not have been received.
            tracing::error!(error = %e, "cannot encode message properties; storing none");
            Bytes::from_static(&[0, 0])
        }
    }
}

/// Parses content-header property bytes; None if they do not parse completely.
pub(crate) fn parse_properties(bytes: &[u8]) -> Option<BasicProperties> {
    match amq_protocol::protocol::basic::parse_properties(bytes) {
        Ok((&[], p)) => Some(p),
        _ => None,
    }
}

/// Opens the stores of a new durable exchange that needs one (delayed-message; deduplicating with
/// `x-cache-persistence: disk`) and loads what they hold.
pub fn attach_exchange_stores(
    durability: &Durability,
    vhost: &str,
    exchange: &crate::exchange::Exchange,
) -> StoreResult<()> {
    use crate::plugins::ExchangeFlavor;
    let spec = exchange.spec();
    if !spec.durable {
        return Ok(());
    }
    let extras = exchange.extras();
    match spec.flavor {
        ExchangeFlavor::Delayed => {
            let store = durability.open_exchange_store(
                ExchangeStoreKind::Delayed,
                vhost,
                &spec.name,
                StoreConfig::default(),
                |r| extras.delayed.recover(&r),
            )?;
            extras.delayed.attach_store(store);
            if !extras.delayed.is_empty() {
                tracing::info!(exchange = %spec.name, messages = extras.delayed.len(), "recovered delayed messages");
            }
        }
        ExchangeFlavor::Deduplicating { cache_size, disk: true, .. } => {
            let store = durability.open_exchange_store(
                ExchangeStoreKind::Dedup,
                vhost,
                &spec.name,
                crate::dedup::store_config(),
                |r| extras.dedup.recover(&r),
            )?;
            extras.dedup.attach_store(store, cache_size);
        }
        _ => {}
    }
    Ok(())
}
