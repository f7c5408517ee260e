//! The broker: virtual hosts and users, opened in-process with [`Broker::open`].

use crate::alarm::{self, AlarmConfig, AlarmState};
use crate::error::{BrokerError, ErrorKind, Result};
use crate::queue::ConnectionId;
use crate::vhost::VHost;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// A user account.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Password (plain; the store of hashed passwords comes with the management API).
    pub password: String,
    /// Only connections from loopback may log in as this user (RabbitMQ's rule for `guest`).
    pub loopback_only: bool,
}

/// How to open a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Virtual hosts to create.
    pub vhosts: Vec<String>,
    /// Users who may log in (to every vhost, for now).
    pub users: Vec<User>,
    /// Memory and disk thresholds that block publishers.
    pub alarms: AlarmConfig,
}

impl Default for BrokerConfig {
    /// One vhost `/` and the user `guest`/`guest`, allowed from loopback only, as RabbitMQ ships.
    fn default() -> Self {
        Self {
            vhosts: vec!["/".to_owned()],
            users: vec![User { name: "guest".into(), password: "guest".into(), loopback_only: true }],
            alarms: AlarmConfig::default(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct BrokerInner {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    users: RwLock<HashMap<String, User>>,
    ids: Arc<AtomicU64>,
    alarms: watch::Sender<AlarmState>,
}

impl BrokerInner {
    /// Message body bytes held by every queue (ready and unacked; a fanout copy counts per queue).
    pub(crate) fn held_bytes(&self) -> u64 {
        let vhosts: Vec<_> = self.vhosts.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        vhosts.iter().flat_map(|v| v.queues()).map(|q| q.held_bytes()).sum()
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
        let vhosts = config
            .vhosts
            .iter()
            .map(|name| (name.clone(), VHost::new(name, Arc::clone(&ids))))
            .collect();
        let users = config.users.into_iter().map(|u| (u.name.clone(), u)).collect();
        let (alarms, _) = watch::channel(AlarmState::default());
        let inner = Arc::new(BrokerInner { vhosts: RwLock::new(vhosts), users: RwLock::new(users), ids, alarms });
        let alarm_config = config.alarms;
        if alarm_config.memory_high_watermark.is_some() || alarm_config.disk_free_limit.is_some() {
            tokio::spawn(alarm::run_monitor(Arc::downgrade(&inner), alarm_config, inner.alarms.clone()));
        }
        Ok(Broker { inner })
    }

    /// Watches the resource alarms (memory, disk); publishers are blocked while any is raised.
    pub fn alarms(&self) -> watch::Receiver<AlarmState> {
        self.inner.alarms.subscribe()
    }

    /// Message body bytes held by every queue (what the memory alarm compares with its watermark).
    pub fn held_bytes(&self) -> u64 {
        self.inner.held_bytes()
    }

    /// Checks credentials; `from_loopback` says whether the peer is on this machine.
    pub fn authenticate(&self, username: &str, password: &str, from_loopback: bool) -> Result<User> {
        let users = self.inner.users.read().unwrap_or_else(|p| p.into_inner());
        let refused = || {
            BrokerError::new(
                ErrorKind::AuthenticationFailed,
                format!("ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."),
            )
        };
        let user = users.get(username).ok_or_else(refused)?;
        if user.password != password || (user.loopback_only && !from_loopback) {
            return Err(refused());
        }
        Ok(user.clone())
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

    /// Adds a virtual host (no-op if it exists).
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        let mut vhosts = self.inner.vhosts.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(vhosts.entry(name.to_owned()).or_insert_with(|| VHost::new(name, Arc::clone(&self.inner.ids))))
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
