//! [`AccessControl`]: the registry of users, permissions, topic permissions and vhost limits, which
//! authenticates logins and hands each connection its grants in a vhost.
//!
//! Every change bumps a generation counter; a channel's [`ChannelAccess`] compares it (one atomic load)
//! before each check and rebuilds its grants when it moved, so a revoked permission takes effect on the
//! next operation (RabbitMQ only promises "eventually", through its per-channel cache).

use super::cache::GrantCache;
use super::limits::{UserLimits, VhostLimits};
use super::password::{PasswordHash, PasswordHashError};
use super::permissions::{AccessError, CompiledTopicPermissions, Pattern, PatternError, Permissions, TopicPermissions};
use super::table::{steps, Operation, VhostAccess};
use super::user::{ManagementRights, User, UserTag};
use crate::error::{BrokerError, ErrorKind};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

/// Which users may log in from loopback addresses only (RabbitMQ's `loopback_users`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoopbackUsers {
    /// Nobody is restricted (`--loopback-users none`).
    None,
    /// These users are restricted.
    Only(BTreeSet<String>),
}

impl Default for LoopbackUsers {
    /// `guest`, as RabbitMQ ships.
    fn default() -> Self {
        Self::Only(BTreeSet::from(["guest".to_owned()]))
    }
}

impl LoopbackUsers {
    /// Reads `--loopback-users`: `none`, or a comma-separated list of user names.
    pub fn parse(value: &str) -> Self {
        match value.trim() {
            "none" | "" => Self::None,
            list => Self::Only(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()),
        }
    }

    /// Whether `user` may log in from loopback only.
    pub fn restricts(&self, user: &str) -> bool {
        match self {
            Self::None => false,
            Self::Only(names) => names.contains(user),
        }
    }
}

/// A refused login. The `Display` text is the log line's reason (RabbitMQ's wording); clients get only
/// [`AuthError::reply_text`], which says nothing about why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Unknown user, wrong password, or a user without a password.
    #[error("user '{0}' - invalid credentials")]
    InvalidCredentials(String),
    /// A loopback-only user connecting from elsewhere.
    #[error("user '{0}' can only connect via localhost")]
    LoopbackOnly(String),
}

impl AuthError {
    /// The reply code (403 ACCESS_REFUSED).
    pub fn reply_code(&self) -> u16 {
        403
    }

    /// What the client is told, as RabbitMQ tells clients that advertise `authentication_failure_close`.
    pub fn reply_text(&self, mechanism: &str) -> String {
        format!(
            "ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
        )
    }

    /// The log line, as RabbitMQ logs it (`PLAIN login refused: user 'guest' can only connect via localhost`).
    pub fn log_line(&self, mechanism: &str) -> String {
        format!("{mechanism} login refused: {self}")
    }
}

impl From<AuthError> for BrokerError {
    /// The PLAIN wording the wire layer sends today.
    fn from(e: AuthError) -> Self {
        let text = e.reply_text("PLAIN");
        let message = text.strip_prefix("ACCESS_REFUSED - ").unwrap_or(&text).to_owned();
        BrokerError::new(ErrorKind::AuthenticationFailed, message)
    }
}

/// A change the registry refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No such user.
    #[error("user '{0}' does not exist")]
    NoSuchUser(String),
    /// `add_user` of a name already taken.
    #[error("user '{0}' already exists")]
    UserExists(String),
    /// A permission pattern does not compile.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// A password hash cannot be made or read.
    #[error(transparent)]
    Password(#[from] PasswordHashError),
}

/// A logged-in user: what connections and the HTTP API need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedUser {
    /// The user name.
    pub name: String,
    /// Its tags.
    pub tags: Vec<UserTag>,
    /// Its limits at login.
    pub limits: UserLimits,
}

impl AuthenticatedUser {
    /// What its tags allow in the HTTP API.
    pub fn management_rights(&self) -> ManagementRights {
        ManagementRights::from_tags(&self.tags)
    }

    /// Whether it may publish with another user's `user_id`.
    pub fn is_impersonator(&self) -> bool {
        self.tags.contains(&UserTag::Impersonator)
    }
}

/// One user's permissions in one vhost, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionEntry {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// The patterns.
    pub permissions: Permissions,
}

/// One user's topic permissions on one exchange in one vhost, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermissionEntry {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// The topic exchange.
    pub exchange: String,
    /// The patterns.
    pub permissions: TopicPermissions,
}

/// Everything the registry holds, behind one lock.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Users by name.
    pub(super) users: BTreeMap<String, User>,
    /// (user, vhost) → permissions.
    pub(super) permissions: BTreeMap<(String, String), Permissions>,
    /// (user, vhost) → exchange → topic permissions.
    pub(super) topic_permissions: BTreeMap<(String, String), BTreeMap<String, TopicPermissions>>,
    /// Vhost → limits (only vhosts with some limit).
    pub(super) vhost_limits: BTreeMap<String, VhostLimits>,
}

/// Per (user, vhost): the generation the shared grants were built at, and the grants while a channel holds them.
type SharedGrants = HashMap<(String, String), (u64, Weak<VhostAccess>)>;

#[derive(Debug)]
struct Inner {
    state: RwLock<State>,
    loopback_users: RwLock<LoopbackUsers>,
    generation: AtomicU64,
    /// Where every change is saved (a broker with a data dir); unset keeps the registry in memory.
    saver: OnceLock<Saver>,
    /// Channels open per user (the `max-channels` limit).
    channels: Arc<super::usage::ChannelCounts>,
    /// Told the name of every deleted user (the broker closes its connections); unset does nothing.
    on_user_deleted: OnceLock<UserDeleted>,
    /// The grants of one user in one vhost shared by their open channels, with the generation they were built
    /// at: built once, not per channel (each holds compiled patterns; 10,000 idle channels held 10,000 copies).
    shared_grants: Mutex<SharedGrants>,
}

/// Shared grants remembered before the dead ones (no channel holds them) are swept out.
const SHARED_GRANTS_SWEEP: usize = 1024;

/// What the broker does when a user is deleted, whichever way (HTTP API, CLI, embedded API): close the
/// user's open connections, as RabbitMQ does. The registry knows no connections, so the broker sets this.
pub struct UserDeleted(pub Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for UserDeleted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserDeleted")
    }
}

/// Saves the registry after a change (set by `access::store` for a broker with a data directory; the
/// registry does not know the file, so the store may depend on the registry and not the reverse). A save
/// that fails is logged by the saver: the change holds in memory.
pub struct Saver(pub Box<dyn Fn(&AccessControl) + Send + Sync>);

impl std::fmt::Debug for Saver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Saver")
    }
}

/// The access registry. Cheap to clone; every clone is the same registry.
#[derive(Debug, Clone)]
pub struct AccessControl {
    inner: Arc<Inner>,
}

impl Default for AccessControl {
    fn default() -> Self {
        Self::new(LoopbackUsers::default())
    }
}

/// A hash to verify against when the user does not exist, so that an unknown name takes as long to
/// refuse as a wrong password.
fn decoy_hash() -> &'static PasswordHash {
    static DECOY: OnceLock<PasswordHash> = OnceLock::new();
    DECOY.get_or_init(|| PasswordHash::with_salt(b"decoy", super::password::HashingAlgorithm::Sha256, [0; 4]))
}

impl AccessControl {
    /// An empty registry (no users: nobody can log in until users are added or bootstrapped).
    pub fn new(loopback_users: LoopbackUsers) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: RwLock::default(),
                loopback_users: RwLock::new(loopback_users),
                generation: AtomicU64::new(0),
                saver: OnceLock::new(),
                channels: Default::default(),
                on_user_deleted: OnceLock::new(),
                shared_grants: Mutex::default(),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the write lock; call `changed` after the guard is dropped.
    pub(super) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the generation after a change, so channels rebuild their grants.
    pub(super) fn changed(&self) {
        self.inner.generation.fetch_add(1, Ordering::Release);
        if let Some(saver) = self.inner.saver.get() {
            (saver.0)(self);
        }
    }

    /// Saves every later change with `saver` (set once, after the saved state was loaded).
    pub fn save_changes_with(&self, saver: Saver) {
        let _ = self.inner.saver.set(saver);
    }

    /// Calls `hook` with the name of every user deleted from now on (set once, by the broker).
    pub fn on_user_deleted(&self, hook: UserDeleted) {
        let _ = self.inner.on_user_deleted.set(hook);
    }

    /// Counts a channel `user` opens, or refuses it with 530 when the user's `max-channels` is reached.
    /// Called at `channel.open` (not on a hot path: one short lock).
    pub fn open_channel(&self, user: &str) -> Result<super::usage::ChannelSlot, super::limits::LimitError> {
        let limits = self.user(user).map(|u| u.limits).unwrap_or_default();
        self.inner.channels.open(user, limits)
    }

    /// Channels `user` has open now.
    pub fn open_channels(&self, user: &str) -> u64 {
        self.inner.channels.open_now(user)
    }

    /// Channels open now over every user's connections (what `/api/overview` counts, without asking any
    /// connection).
    pub fn open_channels_total(&self) -> u64 {
        self.inner.channels.open_total()
    }

    /// Counts changes; a channel rebuilds its grants when it moves.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The loopback-only users.
    pub fn loopback_users(&self) -> LoopbackUsers {
        self.inner.loopback_users.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the loopback-only users.
    pub fn set_loopback_users(&self, users: LoopbackUsers) {
        *self.inner.loopback_users.write().unwrap_or_else(|p| p.into_inner()) = users;
    }

    // ---- users ----

    /// Whether there are no users at all (a blank node: the default user is created then).
    pub fn is_empty(&self) -> bool {
        self.read().users.is_empty()
    }

    /// Creates `name` with a SHA-256 hash of `password` (`rabbitmqctl add_user`); refused if it exists.
    pub fn add_user(&self, name: &str, password: &[u8], tags: Vec<UserTag>) -> Result<(), RegistryError> {
        let user = User::with_password(name, password, tags)?;
        let mut s = self.write();
        if s.users.contains_key(name) {
            return Err(RegistryError::UserExists(name.to_owned()));
        }
        s.users.insert(name.to_owned(), user);
        drop(s);
        self.changed();
        Ok(())
    }

    /// Creates or replaces a user (`PUT /api/users/{name}`, definitions import); its permissions stay.
    /// Returns whether it was created.
    pub fn put_user(&self, user: User) -> bool {
        let created = self.write().users.insert(user.name.clone(), user).is_none();
        self.changed();
        created
    }

    fn update_user(&self, name: &str, f: impl FnOnce(&mut User)) -> Result<(), RegistryError> {
        let mut s = self.write();
        let user = s.users.get_mut(name).ok_or_else(|| RegistryError::NoSuchUser(name.to_owned()))?;
        f(user);
        drop(s);
        self.changed();
        Ok(())
    }

    /// Sets a new password (`rabbitmqctl change_password`), hashed with SHA-256 and a fresh salt.
    pub fn change_password(&self, name: &str, password: &[u8]) -> Result<(), RegistryError> {
        let hash = PasswordHash::new(password)?;
        self.update_user(name, |u| u.password_hash = Some(hash))
    }

    /// Removes the password: the user can no longer log in with one (`rabbitmqctl clear_password`).
    pub fn clear_password(&self, name: &str) -> Result<(), RegistryError> {
        self.update_user(name, |u| u.password_hash = None)
    }

    /// Replaces the user's tags (`rabbitmqctl set_user_tags`).
    pub fn set_tags(&self, name: &str, tags: Vec<UserTag>) -> Result<(), RegistryError> {
        self.update_user(name, |u| u.tags = tags)
    }

    /// Replaces the user's limits (`PUT /api/user-limits/{user}/...`; `UserLimits::default()` clears).
    pub fn set_user_limits(&self, name: &str, limits: UserLimits) -> Result<(), RegistryError> {
        self.update_user(name, |u| u.limits = limits)
    }

    /// Deletes the user with its permissions and topic permissions, then tells the [`UserDeleted`] hook,
    /// which closes the user's open connections (RabbitMQ closes them with 320 "user 'u' is deleted").
    pub fn delete_user(&self, name: &str) -> Result<User, RegistryError> {
        let mut s = self.write();
        let user = s.users.remove(name).ok_or_else(|| RegistryError::NoSuchUser(name.to_owned()))?;
        s.permissions.retain(|(u, _), _| u != name);
        s.topic_permissions.retain(|(u, _), _| u != name);
        drop(s);
        self.changed();
        if let Some(hook) = self.inner.on_user_deleted.get() {
            (hook.0)(name);
        }
        Ok(user)
    }

    /// A user by name.
    pub fn user(&self, name: &str) -> Option<User> {
        self.read().users.get(name).cloned()
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<User> {
        self.read().users.values().cloned().collect()
    }

    // ---- permissions ----

    /// Sets the user's permissions in `vhost` (`rabbitmqctl set_permissions`). The vhost's existence is
    /// the broker's to check.
    pub fn set_permissions(&self, user: &str, vhost: &str, permissions: Permissions) -> Result<(), RegistryError> {
        let mut s = self.write();
        if !s.users.contains_key(user) {
            return Err(RegistryError::NoSuchUser(user.to_owned()));
        }
        s.permissions.insert((user.to_owned(), vhost.to_owned()), permissions);
        drop(s);
        self.changed();
        Ok(())
    }

    /// Clears the user's permissions in `vhost`; whether there were any.
    pub fn clear_permissions(&self, user: &str, vhost: &str) -> bool {
        let removed = self.write().permissions.remove(&(user.to_owned(), vhost.to_owned())).is_some();
        self.changed();
        removed
    }

    /// The user's permissions in `vhost`.
    pub fn permissions(&self, user: &str, vhost: &str) -> Option<Permissions> {
        self.read().permissions.get(&(user.to_owned(), vhost.to_owned())).cloned()
    }

    /// Every permission, by user then vhost.
    pub fn list_permissions(&self) -> Vec<PermissionEntry> {
        self.read()
            .permissions
            .iter()
            .map(|((user, vhost), p)| PermissionEntry {
                user: user.clone(),
                vhost: vhost.clone(),
                permissions: p.clone(),
            })
            .collect()
    }

    /// Sets the user's topic permissions on `exchange` in `vhost` (`rabbitmqctl set_topic_permissions`).
    pub fn set_topic_permissions(
        &self,
        user: &str,
        vhost: &str,
        exchange: &str,
        permissions: TopicPermissions,
    ) -> Result<(), RegistryError> {
        let mut s = self.write();
        if !s.users.contains_key(user) {
            return Err(RegistryError::NoSuchUser(user.to_owned()));
        }
        s.topic_permissions
            .entry((user.to_owned(), vhost.to_owned()))
            .or_default()
            .insert(exchange.to_owned(), permissions);
        drop(s);
        self.changed();
        Ok(())
    }

    /// Clears the user's topic permissions in `vhost`, on one exchange or (None) all; whether any were.
    pub fn clear_topic_permissions(&self, user: &str, vhost: &str, exchange: Option<&str>) -> bool {
        let key = (user.to_owned(), vhost.to_owned());
        let mut s = self.write();
        let removed = match exchange {
            None => s.topic_permissions.remove(&key).is_some(),
            Some(x) => {
                let removed = s.topic_permissions.get_mut(&key).is_some_and(|m| m.remove(x).is_some());
                if s.topic_permissions.get(&key).is_some_and(BTreeMap::is_empty) {
                    s.topic_permissions.remove(&key);
                }
                removed
            }
        };
        drop(s);
        self.changed();
        removed
    }

    /// Every topic permission, by user, vhost, exchange.
    pub fn list_topic_permissions(&self) -> Vec<TopicPermissionEntry> {
        let s = self.read();
        let mut out = Vec::new();
        for ((user, vhost), by_exchange) in &s.topic_permissions {
            for (exchange, p) in by_exchange {
                out.push(TopicPermissionEntry {
                    user: user.clone(),
                    vhost: vhost.clone(),
                    exchange: exchange.clone(),
                    permissions: p.clone(),
                });
            }
        }
        out
    }

    // ---- vhosts ----

    /// Sets a vhost's limits (`VhostLimits::default()` clears them).
    pub fn set_vhost_limits(&self, vhost: &str, limits: VhostLimits) {
        let mut s = self.write();
        if limits.is_empty() {
            s.vhost_limits.remove(vhost);
        } else {
            s.vhost_limits.insert(vhost.to_owned(), limits);
        }
        drop(s);
        self.changed();
    }

    /// A vhost's limits (none set: unlimited).
    pub fn vhost_limits(&self, vhost: &str) -> VhostLimits {
        self.read().vhost_limits.get(vhost).copied().unwrap_or_default()
    }

    /// Every vhost with limits.
    pub fn list_vhost_limits(&self) -> Vec<(String, VhostLimits)> {
        self.read().vhost_limits.iter().map(|(v, l)| (v.clone(), *l)).collect()
    }

    /// Forgets a deleted vhost's permissions, topic permissions and limits.
    pub fn delete_vhost(&self, vhost: &str) {
        let mut s = self.write();
        s.permissions.retain(|(_, v), _| v != vhost);
        s.topic_permissions.retain(|(_, v), _| v != vhost);
        s.vhost_limits.remove(vhost);
        drop(s);
        self.changed();
    }

    // ---- login and grants ----

    /// Checks a password login (PLAIN, AMQPLAIN, HTTP basic auth). `peer_is_loopback` says whether the
    /// client connects from this machine (behind a proxy, from the PROXY protocol's source address).
    /// As RabbitMQ: the password is checked first, then the loopback rule.
    pub fn authenticate(
        &self,
        username: &str,
        password: &[u8],
        peer_is_loopback: bool,
    ) -> Result<AuthenticatedUser, AuthError> {
        let found = self.read().users.get(username).cloned();
        let Some(user) = found else {
            // Same work as a wrong password, so that timing does not reveal which names exist.
            decoy_hash().verify(password);
            return Err(AuthError::InvalidCredentials(username.to_owned()));
        };
        let verified = match &user.password_hash {
            Some(h) => h.verify(password),
            None => {
                decoy_hash().verify(password);
                false
            }
        };
        if !verified {
            return Err(AuthError::InvalidCredentials(username.to_owned()));
        }
        self.admit(user, peer_is_loopback)
    }

    /// Checks a login without password (EXTERNAL: the name comes from a verified client certificate).
    pub fn authenticate_external(
        &self,
        username: &str,
        peer_is_loopback: bool,
    ) -> Result<AuthenticatedUser, AuthError> {
        let found = self.read().users.get(username).cloned();
        let user = found.ok_or_else(|| AuthError::InvalidCredentials(username.to_owned()))?;
        self.admit(user, peer_is_loopback)
    }

    fn admit(&self, user: User, peer_is_loopback: bool) -> Result<AuthenticatedUser, AuthError> {
        if !peer_is_loopback && self.loopback_users().restricts(&user.name) {
            return Err(AuthError::LoopbackOnly(user.name));
        }
        Ok(AuthenticatedUser { name: user.name, tags: user.tags, limits: user.limits })
    }

    /// The user's grants in `vhost`, or 530 "access to vhost 'v' refused for user 'u'" when it has no
    /// permissions there (`connection.open`). Call after checking that the vhost exists.
    pub fn vhost_access(&self, user: &str, vhost: &str) -> Result<Arc<VhostAccess>, AccessError> {
        let s = self.read();
        let key = (user.to_owned(), vhost.to_owned());
        let refused = || AccessError::Vhost { vhost: vhost.to_owned(), user: user.to_owned() };
        if !s.users.contains_key(user) {
            return Err(refused());
        }
        let permissions = s.permissions.get(&key).cloned().ok_or_else(refused)?;
        let mut topics = HashMap::new();
        for (exchange, t) in s.topic_permissions.get(&key).into_iter().flatten() {
            match t.compile(user, vhost) {
                Ok(c) => {
                    topics.insert(exchange.clone(), c);
                }
                // The user or vhost name made the expanded pattern invalid: grant nothing on that
                // exchange rather than everything.
                Err(_) => {
                    topics.insert(exchange.clone(), deny_all_topics());
                }
            }
        }
        Ok(Arc::new(VhostAccess::new(user, vhost, permissions, topics)))
    }

    /// A channel's view of the user's grants in `vhost`, cached and kept current.
    pub fn channel_access(&self, user: &str, vhost: &str) -> Result<ChannelAccess, AccessError> {
        let generation = self.generation();
        let access = self.shared_vhost_access(user, vhost, generation)?;
        Ok(ChannelAccess { control: self.clone(), access, generation, cache: GrantCache::default() })
    }

    /// [`Self::vhost_access`], shared with the user's other open channels in `vhost` while no grant has
    /// changed since (`generation`); a change makes the next channel build afresh.
    fn shared_vhost_access(&self, user: &str, vhost: &str, generation: u64) -> Result<Arc<VhostAccess>, AccessError> {
        let key = (user.to_owned(), vhost.to_owned());
        let lock = || self.inner.shared_grants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_at, access)) = lock().get(&key) {
            if let Some(access) = access.upgrade().filter(|_| *built_at == generation) {
                return Ok(access);
            }
        }
        let access = self.vhost_access(user, vhost)?;
        let mut shared = lock();
        if shared.len() >= SHARED_GRANTS_SWEEP {
            shared.retain(|_, (_, a)| a.strong_count() > 0);
        }
        shared.insert(key, (generation, Arc::downgrade(&access)));
        Ok(access)
    }
}

fn deny_all_topics() -> CompiledTopicPermissions {
    CompiledTopicPermissions { write: Pattern::never(), read: Pattern::never() }
}

/// One channel's access checks: the grants of its user in its vhost, a cache of recent grants, and the
/// registry's generation they were built at.
#[derive(Debug)]
pub struct ChannelAccess {
    control: AccessControl,
    access: Arc<VhostAccess>,
    generation: u64,
    cache: GrantCache,
}

impl ChannelAccess {
    /// Checks `op` (see [`super::table`]). A cached grant costs a few string comparisons; nothing is
    /// allocated unless the check is new or refused.
    pub fn check(&mut self, op: &Operation<'_>) -> Result<(), AccessError> {
        let now = self.control.generation();
        if now != self.generation {
            self.refresh(now);
        }
        for step in steps(op).iter() {
            if self.cache.hit(&step) {
                continue;
            }
            self.access.check_step(&step)?;
            self.cache.insert(&step);
        }
        Ok(())
    }

    fn refresh(&mut self, now: u64) {
        self.cache.clear();
        self.generation = now;
        let (user, vhost) = (self.access.user().to_owned(), self.access.vhost().to_owned());
        self.access = match self.control.shared_vhost_access(&user, &vhost, now) {
            Ok(a) => a,
            // Permissions cleared or user deleted: every resource check is refused from now on.
            Err(_) => Arc::new(VhostAccess::new(user, vhost, Permissions::none(), HashMap::new())),
        };
    }

    /// The grants currently in force.
    pub fn vhost_access(&self) -> &Arc<VhostAccess> {
        &self.access
    }
}

#[cfg(test)]
mod tests {
    use super::super::permissions::{Permission, ResourceKind};
    use super::*;

    fn registry_with(user: &str, password: &str) -> AccessControl {
        let ac = AccessControl::default();
        ac.add_user(user, password.as_bytes(), vec![]).unwrap();
        ac
    }

    #[test]
    fn password_login() {
        let ac = registry_with("alice", "s3cret");
        let u = ac.authenticate("alice", b"s3cret", false).unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(ac.authenticate("alice", b"wrong", true), Err(AuthError::InvalidCredentials("alice".into())));
        assert_eq!(ac.authenticate("bob", b"s3cret", true), Err(AuthError::InvalidCredentials("bob".into())));
        ac.clear_password("alice").unwrap();
        assert!(ac.authenticate("alice", b"s3cret", true).is_err());
        ac.change_password("alice", b"new").unwrap();
        ac.authenticate("alice", b"new", true).unwrap();
        assert_eq!(ac.add_user("alice", b"x", vec![]), Err(RegistryError::UserExists("alice".into())));
    }

    #[test]
    fn guest_is_loopback_only_unless_lifted() {
        let ac = registry_with("guest", "guest");
        ac.authenticate("guest", b"guest", true).unwrap();
        let e = ac.authenticate("guest", b"guest", false).unwrap_err();
        assert_eq!(e, AuthError::LoopbackOnly("guest".into()));
        assert_eq!(e.log_line("PLAIN"), "PLAIN login refused: user 'guest' can only connect via localhost");
        assert_eq!(
            e.reply_text("PLAIN"),
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
        );
        // The password is checked first: a wrong one from afar reads as invalid credentials.
        assert_eq!(ac.authenticate("guest", b"nope", false), Err(AuthError::InvalidCredentials("guest".into())));
        ac.set_loopback_users(LoopbackUsers::parse("none"));
        ac.authenticate("guest", b"guest", false).unwrap();
        ac.set_loopback_users(LoopbackUsers::parse("guest, ops"));
        assert!(ac.authenticate("guest", b"guest", false).is_err());
        // The same rule for EXTERNAL.
        assert!(ac.authenticate_external("guest", false).is_err());
        ac.authenticate_external("guest", true).unwrap();
        assert!(ac.authenticate_external("nobody", true).is_err());
        let b: BrokerError = AuthError::InvalidCredentials("x".into()).into();
        assert_eq!(b.kind, ErrorKind::AuthenticationFailed);
        assert_eq!(
            b.message,
            "Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
        );
    }

    #[test]
    fn loopback_users_parse() {
        assert_eq!(LoopbackUsers::parse("none"), LoopbackUsers::None);
        assert_eq!(LoopbackUsers::default(), LoopbackUsers::parse("guest"));
        assert!(LoopbackUsers::parse("a,b").restricts("b"));
        assert!(!LoopbackUsers::parse("a,b").restricts("guest"));
    }

    #[test]
    fn vhost_access_needs_permissions() {
        let ac = registry_with("u", "p");
        let e = ac.vhost_access("u", "v").unwrap_err();
        assert_eq!(e.reply_text(), "NOT_ALLOWED - access to vhost 'v' refused for user 'u'");
        assert_eq!(e.reply_code(), 530);
        ac.set_permissions("u", "v", Permissions::new("", "", "").unwrap()).unwrap();
        // Empty patterns still grant the vhost (RabbitMQ: any permission record opens it).
        let a = ac.vhost_access("u", "v").unwrap();
        assert!(a.check(&Operation::Get { queue: "q" }).is_err());
        assert_eq!(
            ac.set_permissions("ghost", "v", Permissions::full()),
            Err(RegistryError::NoSuchUser("ghost".into()))
        );
        assert!(ac.vhost_access("ghost", "v").is_err());
    }

    #[test]
    fn deleting_users_and_vhosts_removes_their_grants() {
        let ac = registry_with("u", "p");
        ac.add_user("w", b"p", vec![]).unwrap();
        for (user, vhost) in [("u", "a"), ("u", "b"), ("w", "a")] {
            ac.set_permissions(user, vhost, Permissions::full()).unwrap();
            ac.set_topic_permissions(user, vhost, "amq.topic", TopicPermissions::new(".*", ".*").unwrap()).unwrap();
        }
        ac.set_vhost_limits("a", VhostLimits { max_connections: Some(3), max_queues: None });
        ac.delete_user("u").unwrap();
        assert_eq!(ac.list_permissions().len(), 1);
        assert_eq!(ac.list_topic_permissions().len(), 1);
        assert!(ac.delete_user("u").is_err());
        ac.delete_vhost("a");
        assert!(ac.list_permissions().is_empty());
        assert!(ac.list_topic_permissions().is_empty());
        assert_eq!(ac.vhost_limits("a"), VhostLimits::default());
    }

    #[test]
    fn topic_permissions_set_and_clear() {
        let ac = registry_with("u", "p");
        let t = TopicPermissions::new("^a", "^b").unwrap();
        ac.set_topic_permissions("u", "/", "x1", t.clone()).unwrap();
        ac.set_topic_permissions("u", "/", "x2", t.clone()).unwrap();
        assert!(ac.clear_topic_permissions("u", "/", Some("x1")));
        assert!(!ac.clear_topic_permissions("u", "/", Some("x1")));
        assert_eq!(ac.list_topic_permissions().len(), 1);
        assert!(ac.clear_topic_permissions("u", "/", None));
        assert!(ac.list_topic_permissions().is_empty());
    }

    #[test]
    fn channel_access_sees_changes_at_the_next_check() {
        let ac = registry_with("u", "p");
        ac.set_permissions("u", "/", Permissions::full()).unwrap();
        let mut ch = ac.channel_access("u", "/").unwrap();
        let publish = Operation::Publish { exchange: "x", routing_key: "k", exchange_is_topic: true };
        ch.check(&publish).unwrap();
        ch.check(&publish).unwrap(); // cached
                                     // A topic permission appears: the cached grant is dropped and the key is checked.
        ac.set_topic_permissions("u", "/", "x", TopicPermissions::new("^{username}\\.", "").unwrap()).unwrap();
        let e = ch.check(&publish).unwrap_err();
        assert!(matches!(e, AccessError::Topic { permission: Permission::Write, .. }));
        ch.check(&Operation::Publish { exchange: "x", routing_key: "u.k", exchange_is_topic: true }).unwrap();
        // Permissions narrowed.
        ac.set_permissions("u", "/", Permissions::new(".*", "^y$", ".*").unwrap()).unwrap();
        let e = ch.check(&publish).unwrap_err();
        assert!(matches!(e, AccessError::Resource { permission: Permission::Write, kind: ResourceKind::Exchange, .. }));
        // Permissions cleared: everything is refused.
        assert!(ac.clear_permissions("u", "/"));
        assert!(ch.check(&Operation::Consume { queue: "q" }).is_err());
        // And restored.
        ac.set_permissions("u", "/", Permissions::full()).unwrap();
        ch.check(&Operation::Consume { queue: "q" }).unwrap();
    }

    #[test]
    fn channels_of_a_user_in_a_vhost_share_their_grants_until_a_change() {
        let ac = registry_with("u", "p");
        ac.set_permissions("u", "/", Permissions::full()).unwrap();
        let a = ac.channel_access("u", "/").unwrap();
        let b = ac.channel_access("u", "/").unwrap();
        assert!(Arc::ptr_eq(a.vhost_access(), b.vhost_access()), "one copy for both channels");
        // A change: the next channel builds afresh, and a channel refreshing on its next check shares that.
        ac.set_permissions("u", "/", Permissions::new(".*", "^y$", ".*").unwrap()).unwrap();
        let c = ac.channel_access("u", "/").unwrap();
        assert!(!Arc::ptr_eq(a.vhost_access(), c.vhost_access()));
        let mut a = a;
        let publish = Operation::Publish { exchange: "x", routing_key: "k", exchange_is_topic: false };
        assert!(a.check(&publish).is_err(), "the narrowed grant is in force");
        assert!(Arc::ptr_eq(a.vhost_access(), c.vhost_access()));
        // Gone when no channel holds them: a later channel builds again.
        drop((a, b, c));
        let d = ac.channel_access("u", "/").unwrap();
        assert!(d.vhost_access().check(&Operation::Consume { queue: "q" }).is_ok());
    }

    mod cached_checks {
        use super::*;
        use proptest::prelude::*;

        const NAMES: [&str; 6] = ["", "a1", "a2", "b1", "amq.topic", "amq.gen-x"];
        const KEYS: [&str; 4] = ["u.k", "x.k", "/-r", "zz"];

        fn op(kind: u8, a: usize, b: usize, k: usize, topic: bool) -> Operation<'static> {
            let (a, b, key) = (NAMES[a], NAMES[b], KEYS[k]);
            match kind % 8 {
                0 => Operation::Publish { exchange: a, routing_key: key, exchange_is_topic: topic },
                1 => Operation::QueueBind { queue: a, exchange: b, routing_key: key, exchange_is_topic: topic },
                2 => Operation::ExchangeBind { destination: a, source: b, routing_key: key, source_is_topic: topic },
                3 => Operation::Consume { queue: a },
                4 => Operation::QueueDeclare {
                    queue: a,
                    server_named: topic,
                    passive: false,
                    exists: false,
                    dead_letter_exchange: Some(b),
                },
                5 => Operation::ExchangeDeclare {
                    exchange: a,
                    passive: false,
                    exists: topic,
                    alternate_exchange: Some(b),
                },
                6 => Operation::ExchangeDelete { exchange: a },
                _ => Operation::Purge { queue: a },
            }
        }

        proptest! {
            /// Through any sequence of operations and permission changes, the cached channel view
            /// answers exactly what a fresh, uncached check of the current grants answers.
            #[test]
            fn cache_never_changes_an_answer(
                steps in proptest::collection::vec(
                    (0u8..10, 0usize..6, 0usize..6, 0usize..4, any::<bool>(), 0usize..4),
                    1..80,
                ),
            ) {
                let patterns = ["^a", "1$", ".*", ""];
                let ac = registry_with("u", "p");
                ac.set_permissions("u", "/", Permissions::full()).unwrap();
                let mut ch = ac.channel_access("u", "/").unwrap();
                for (kind, a, b, k, topic, p) in steps {
                    match kind {
                        8 => ac
                            .set_permissions("u", "/", Permissions::new(patterns[p], patterns[(p + a) % 4], patterns[(p + b) % 4]).unwrap())
                            .unwrap(),
                        9 => ac
                            .set_topic_permissions("u", "/", "amq.topic", TopicPermissions::new(&format!("^{{username}}|{}", patterns[p]), "^{vhost}-").unwrap())
                            .unwrap(),
                        _ => {
                            let op = op(kind, a, b, k, topic);
                            let fresh = ac.vhost_access("u", "/").unwrap().check(&op);
                            prop_assert_eq!(ch.check(&op), fresh, "{:?}", op);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn user_updates() {
        let ac = registry_with("u", "p");
        ac.set_tags("u", UserTag::parse_list("administrator")).unwrap();
        ac.set_user_limits("u", UserLimits { max_connections: Some(2), max_channels: None }).unwrap();
        let a = ac.authenticate("u", b"p", true).unwrap();
        assert!(a.management_rights().administrator);
        assert_eq!(a.limits.max_connections, Some(2));
        assert!(!a.is_impersonator());
        assert_eq!(ac.set_tags("nobody", vec![]), Err(RegistryError::NoSuchUser("nobody".into())));
        let g = ac.generation();
        assert!(ac.put_user(User::with_password("v", b"p", vec![UserTag::Impersonator]).unwrap()));
        assert!(ac.generation() > g);
        assert!(!ac.put_user(User::with_password("v", b"q", vec![]).unwrap()));
        ac.authenticate("v", b"q", true).unwrap();
        assert_eq!(ac.users().iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["u", "v"]);
    }
}
