//! Open client connections, as the management API lists and closes them.
//!
//! A wire server registers each connection once it is open ([`ConnectionRegistry::register`]) and keeps
//! the returned [`Registration`] for the connection's lifetime: dropping it deregisters. The connection
//! task also watches the [`ControlReceiver`] it got: the API asks it through that inbox for a
//! snapshot of its channels and consumers (pulled on demand, so an unwatched broker pays nothing) or to
//! close with a reason. Nothing here knows about frames or sockets.

use crate::access::{LimitError, UserLimits, VhostLimits};
use crate::queue::{ConnectionId, ConsumerId};
use amq_protocol_types::FieldTable;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

/// Requests a connection task may have outstanding from the API (snapshots and a close); more are refused
/// rather than queued: a stuck connection must not make API calls pile up memory.
const CONTROL_QUEUE: usize = 16;
/// How long the API waits for a connection task to describe its channels.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a connection said about itself when it opened (fixed for its lifetime).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The connection's id (also the exclusive-queue owner id).
    pub id: ConnectionId,
    /// The client's address.
    pub peer: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// The authenticated user.
    pub user: String,
    /// The vhost it opened.
    pub vhost: String,
    /// The protocol, as RabbitMQ names it (`AMQP 0-9-1`).
    pub protocol: &'static str,
    /// `client_properties` from `connection.start-ok`.
    pub client_properties: FieldTable,
    /// Negotiated frame size limit.
    pub frame_max: u32,
    /// Negotiated channel limit.
    pub channel_max: u16,
    /// Negotiated heartbeat, in seconds.
    pub heartbeat: u16,
    /// When it connected.
    pub connected_at: SystemTime,
    /// Its socket traffic so far, counted by the connection's reader and writer.
    pub traffic: Arc<ConnectionTraffic>,
}

/// Bytes and socket operations of one connection (RabbitMQ's `recv_oct`, `send_oct`, `recv_cnt`,
/// `send_cnt`, `send_pend`): the reader adds once per socket read, the writer once per batch, never per
/// frame.
#[derive(Debug, Default)]
pub struct ConnectionTraffic {
    recv_oct: AtomicU64,
    recv_cnt: AtomicU64,
    send_oct: AtomicU64,
    send_cnt: AtomicU64,
    /// Bytes handed to the writer and not yet written (or dropped): RabbitMQ's `send_pend`, the bytes
    /// waiting in the socket's send queue, is the closest figure Mailroom has.
    send_pend: AtomicU64,
    /// Turns of the connection task that did channel work (frames other than heartbeats, deliveries,
    /// confirms): the channels' snapshots can only have changed when this moved, heartbeats leave it be.
    channel_turns: AtomicU64,
}

impl ConnectionTraffic {
    /// The connection task finished a turn that did channel work (once per turn, not per frame).
    pub fn channel_turn(&self) {
        self.channel_turns.fetch_add(1, Ordering::Relaxed);
    }

    /// Turns that did channel work so far: unchanged means the channels' snapshots are unchanged.
    pub fn channel_turns(&self) -> u64 {
        self.channel_turns.load(Ordering::Relaxed)
    }

    /// One socket read of `bytes`.
    pub fn received(&self, bytes: usize) {
        self.recv_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        self.recv_cnt.fetch_add(1, Ordering::Relaxed);
    }

    /// One batch of `bytes` written to the socket.
    pub fn sent(&self, bytes: usize) {
        self.send_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        self.send_cnt.fetch_add(1, Ordering::Relaxed);
    }

    /// A batch of `bytes` was queued for the writer.
    pub fn queued(&self, bytes: u64) {
        self.send_pend.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A queued batch of `bytes` left the writer's queue (written, or dropped with the connection).
    pub fn dequeued(&self, bytes: u64) {
        self.send_pend.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes queued for the writer and not written yet (RabbitMQ's `send_pend`).
    pub fn send_pend(&self) -> u64 {
        self.send_pend.load(Ordering::Relaxed)
    }

    /// `(recv_oct, recv_cnt, send_oct, send_cnt)` now.
    pub fn read(&self) -> (u64, u64, u64, u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (get(&self.recv_oct), get(&self.recv_cnt), get(&self.send_oct), get(&self.send_cnt))
    }
}

/// A channel's message counts since it opened (RabbitMQ's channel `message_stats`), kept by the
/// connection task that owns the channel: the same counters a queue keeps.
pub type ChannelMessageStats = crate::queue::MessageStats;

/// A channel's counts for one exchange it published to (RabbitMQ's `publishes` of a channel) or one queue
/// it consumed or got from (its `deliveries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMessageStats {
    /// The exchange's or the queue's name (in the connection's vhost).
    pub name: String,
    /// The counts: `publish`, `confirm` and the unroutable ones for an exchange; the delivery counts for a
    /// queue.
    pub stats: ChannelMessageStats,
}

impl ConnectionInfo {
    /// RabbitMQ's connection name: `"peer -> local"`, e.g. `127.0.0.1:51234 -> 127.0.0.1:5672`.
    pub fn name(&self) -> String {
        format!("{} -> {}", self.peer, self.local)
    }
}

/// One open channel of a connection, at the moment it was asked.
#[derive(Debug, Clone)]
pub struct ChannelSnapshot {
    /// Its channel number.
    pub number: u16,
    /// `basic.qos` per-consumer limit.
    pub prefetch_count: u32,
    /// `basic.qos` channel-wide (global) limit.
    pub global_prefetch_count: u32,
    /// In confirm mode.
    pub confirm: bool,
    /// In transaction mode.
    pub transactional: bool,
    /// Deliveries not yet acknowledged.
    pub unacknowledged: u64,
    /// Publishes not yet confirmed (confirm mode: persistent ones waiting for their fsync).
    pub unconfirmed: u64,
    /// Publishes held by an open transaction.
    pub uncommitted_publishes: u64,
    /// Acks and rejects held by an open transaction.
    pub uncommitted_acks: u64,
    /// Its consumers.
    pub consumers: Vec<ConsumerSnapshot>,
    /// Its message counts since it opened.
    pub message_stats: ChannelMessageStats,
    /// Its counts per exchange published to (RabbitMQ's `publishes`), in first-use order.
    pub publishes: Vec<ObjectMessageStats>,
    /// Its counts per queue delivered or got from (RabbitMQ's `deliveries`), in first-use order; queues
    /// deleted since are left out.
    pub deliveries: Vec<ObjectMessageStats>,
}

/// One consumer on a channel.
#[derive(Debug, Clone)]
pub struct ConsumerSnapshot {
    /// The consumer tag.
    pub tag: String,
    /// The consumer's id in its queue (for the queue-side details).
    pub id: ConsumerId,
    /// The queue it consumes from.
    pub queue: String,
    /// Deliveries must be acknowledged (not `no-ack`).
    pub ack_required: bool,
}

/// What the API asks of a connection task.
#[derive(Debug)]
pub enum ConnectionControl {
    /// Close with `connection.close` 320 CONNECTION_FORCED and this reason.
    Close {
        /// The reason given to the client.
        reason: String,
    },
    /// Describe the open channels.
    Snapshot(oneshot::Sender<Vec<ChannelSnapshot>>),
}

/// The API's requests waiting for one connection task. Not a tokio mpsc channel: that allocates a 32-slot
/// block per channel up front, about 1.3 KB that every idle connection would hold for requests that are rare.
#[derive(Debug, Default)]
struct Inbox {
    state: Mutex<InboxState>,
}

/// The waiting requests, and whether the connection task stopped taking them.
#[derive(Debug, Default)]
struct InboxState {
    requests: VecDeque<ConnectionControl>,
    closed: bool,
    /// The connection task waiting for a request. A slot rather than a `Notify`: the task polls the inbox
    /// on every turn of its loop, and a `Notified` made and dropped each turn takes the waiter list's lock twice.
    waiting: Option<Waker>,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The API's end of a connection's inbox.
#[derive(Debug, Clone)]
struct ControlSender(Arc<Inbox>);

impl ControlSender {
    /// Queues `request`; false if the connection task is gone or already has [`CONTROL_QUEUE`] waiting.
    fn try_send(&self, request: ConnectionControl) -> bool {
        let waiting = {
            let mut state = self.0.lock();
            if state.closed || state.requests.len() >= CONTROL_QUEUE {
                return false;
            }
            state.requests.push_back(request);
            state.waiting.take()
        };
        // Woken outside the lock.
        if let Some(task) = waiting {
            task.wake();
        }
        true
    }
}

/// A connection task's end of its inbox: the API's requests, in order. Dropping it refuses later ones.
#[derive(Debug)]
pub struct ControlReceiver(Arc<Inbox>);

impl ControlReceiver {
    /// The next request, waiting for one. Cancel-safe: a request leaves the inbox only when returned.
    pub async fn recv(&mut self) -> ConnectionControl {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next request, or `Pending` with `cx`'s task woken by the next one queued.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<ConnectionControl> {
        let mut state = self.0.lock();
        match state.requests.pop_front() {
            Some(request) => Poll::Ready(request),
            None => {
                crate::waker_slot::remember_waker(&mut state.waiting, cx.waker());
                Poll::Pending
            }
        }
    }

    /// The next request if one is waiting.
    pub fn try_recv(&mut self) -> Option<ConnectionControl> {
        self.0.lock().requests.pop_front()
    }
}

impl Drop for ControlReceiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.closed = true;
        state.requests.clear(); // their reply senders drop: the API's waits end now
    }
}

#[derive(Debug)]
struct Entry {
    info: Arc<ConnectionInfo>,
    control: ControlSender,
}

/// The registered connections and how many each vhost and each user has, kept together under one lock
/// so that a limit check and the registration it admits are one step.
#[derive(Debug, Default)]
struct Entries {
    by_id: BTreeMap<ConnectionId, Entry>,
    per_vhost: HashMap<String, u64>,
    per_user: HashMap<String, u64>,
}

fn count_up(counts: &mut HashMap<String, u64>, key: &str) {
    *counts.entry(key.to_owned()).or_insert(0) += 1;
}

fn count_down(counts: &mut HashMap<String, u64>, key: &str) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// The connection limits a new connection is admitted under: its vhost's and its user's `max-connections`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The vhost's limits.
    pub vhost: VhostLimits,
    /// The user's limits.
    pub user: UserLimits,
}

/// Every registered connection.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    entries: Mutex<Entries>,
}

impl ConnectionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an open connection without limits; it stays listed until the returned [`Registration`] is
    /// dropped. The receiver carries the API's requests to the connection task.
    pub fn register(self: &Arc<Self>, info: ConnectionInfo) -> (Registration, ControlReceiver) {
        let mut entries = self.lock();
        self.insert(&mut entries, info)
    }

    /// Registers an open connection if its vhost's and its user's `max-connections` allow one more
    /// (530 NOT_ALLOWED otherwise, as RabbitMQ answers `connection.open`). The count and the registration
    /// happen under one lock, so concurrent opens never exceed a limit.
    pub fn register_within(
        self: &Arc<Self>,
        info: ConnectionInfo,
        limits: ConnectionLimits,
    ) -> Result<(Registration, ControlReceiver), LimitError> {
        let mut entries = self.lock();
        let in_vhost = entries.per_vhost.get(&info.vhost).copied().unwrap_or(0);
        let of_user = entries.per_user.get(&info.user).copied().unwrap_or(0);
        limits.vhost.check_connection(&info.vhost, &info.user, in_vhost)?;
        limits.user.check_connection(&info.user, of_user)?;
        Ok(self.insert(&mut entries, info))
    }

    /// Lists `info` and counts it for its vhost and user (the caller holds the lock).
    fn insert(self: &Arc<Self>, entries: &mut Entries, info: ConnectionInfo) -> (Registration, ControlReceiver) {
        let inbox = Arc::new(Inbox::default());
        let (tx, rx) = (ControlSender(Arc::clone(&inbox)), ControlReceiver(inbox));
        let id = info.id;
        count_up(&mut entries.per_vhost, &info.vhost);
        count_up(&mut entries.per_user, &info.user);
        entries.by_id.insert(id, Entry { info: Arc::new(info), control: tx });
        (Registration { registry: Arc::downgrade(self), id }, rx)
    }

    /// Every registered connection, oldest first.
    pub fn list(&self) -> Vec<ConnectionHandle> {
        self.lock()
            .by_id
            .values()
            .map(|e| ConnectionHandle { info: Arc::clone(&e.info), control: e.control.clone() })
            .collect()
    }

    /// Connections open to `vhost` now.
    pub fn count_in_vhost(&self, vhost: &str) -> u64 {
        self.lock().per_vhost.get(vhost).copied().unwrap_or(0)
    }

    /// Connections `user` has open now.
    pub fn count_of_user(&self, user: &str) -> u64 {
        self.lock().per_user.get(user).copied().unwrap_or(0)
    }

    /// Asks every connection of `user` to close with 320 CONNECTION_FORCED "user 'u' is deleted" (RabbitMQ
    /// 3.10's words when the user is deleted); how many were asked.
    pub fn close_user(&self, user: &str) -> usize {
        self.close_where(|c| c.user == user, &format!("user '{user}' is deleted"))
    }

    /// Asks every connection to `vhost` to close with 320 CONNECTION_FORCED "vhost 'v' is deleted" (RabbitMQ
    /// 3.10's words when the vhost is deleted; there a race with the vhost's supervisor stopping sometimes
    /// says "vhost 'v' is down" instead); how many were asked.
    pub fn close_vhost(&self, vhost: &str) -> usize {
        self.close_where(|c| c.vhost == vhost, &format!("vhost '{vhost}' is deleted"))
    }

    fn close_where(&self, matches: impl Fn(&ConnectionInfo) -> bool, reason: &str) -> usize {
        let targets: Vec<ConnectionHandle> = self.list().into_iter().filter(|c| matches(c.info())).collect();
        for c in &targets {
            if !c.close(reason) {
                tracing::warn!(connection = %c.info().name(), %reason, "connection did not take the close request");
            }
        }
        targets.len()
    }

    /// The connection with this name (`"peer -> local"`).
    pub fn by_name(&self, name: &str) -> Option<ConnectionHandle> {
        self.list().into_iter().find(|c| c.info.name() == name)
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// No connection is registered.
    pub fn is_empty(&self) -> bool {
        self.lock().by_id.is_empty()
    }
}

/// Keeps a connection listed; dropping it deregisters the connection.
#[derive(Debug)]
pub struct Registration {
    registry: Weak<ConnectionRegistry>,
    id: ConnectionId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            let mut entries = registry.lock();
            if let Some(entry) = entries.by_id.remove(&self.id) {
                count_down(&mut entries.per_vhost, &entry.info.vhost);
                count_down(&mut entries.per_user, &entry.info.user);
            }
        }
    }
}

/// The API's view of one registered connection.
#[derive(Debug, Clone)]
pub struct ConnectionHandle {
    info: Arc<ConnectionInfo>,
    control: ControlSender,
}

impl ConnectionHandle {
    /// What the connection said when it opened.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Its open channels and their consumers; None if the connection did not answer in time (it is
    /// closing, or busy past [`SNAPSHOT_TIMEOUT`]).
    pub async fn channels(&self) -> Option<Vec<ChannelSnapshot>> {
        let (tx, rx) = oneshot::channel();
        if !self.control.try_send(ConnectionControl::Snapshot(tx)) {
            return None;
        }
        tokio::time::timeout(SNAPSHOT_TIMEOUT, rx).await.ok()?.ok()
    }

    /// Asks the connection to close with `reason`; false if it is already gone or cannot take the request.
    pub fn close(&self, reason: &str) -> bool {
        self.control.try_send(ConnectionControl::Close { reason: reason.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: ConnectionId, port: u16) -> ConnectionInfo {
        ConnectionInfo {
            id,
            peer: SocketAddr::from(([127, 0, 0, 1], port)),
            local: SocketAddr::from(([127, 0, 0, 1], 5672)),
            user: "guest".into(),
            vhost: "/".into(),
            protocol: "AMQP 0-9-1",
            client_properties: FieldTable::default(),
            frame_max: 131072,
            channel_max: 2047,
            heartbeat: 60,
            connected_at: SystemTime::now(),
            traffic: Arc::default(),
        }
    }

    #[test]
    fn limits_hold_under_concurrent_registrations() {
        use crate::access::{UserLimits, VhostLimits};
        let registry = Arc::new(ConnectionRegistry::default());
        let limits = ConnectionLimits {
            vhost: VhostLimits { max_connections: Some(7), max_queues: None },
            user: UserLimits { max_connections: Some(5), max_channels: None },
        };
        let threads = 32;
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (registry, barrier) = (Arc::clone(&registry), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut info = info(i as u64, 40000 + i as u16);
                    // Half the threads are guest, half another user: the vhost limit (7) binds both.
                    if i % 2 == 1 {
                        info.user = "other".into();
                    }
                    barrier.wait();
                    registry.register_within(info, limits).ok().map(|(reg, _rx)| reg)
                })
            })
            .collect();
        let admitted: Vec<Registration> = handles.into_iter().filter_map(|h| h.join().unwrap()).collect();
        assert_eq!(admitted.len(), 7, "the vhost limit, exactly");
        assert_eq!(registry.count_in_vhost("/"), 7);
        assert!(registry.count_of_user("guest") <= 5 && registry.count_of_user("other") <= 5);
        let refused = registry.register_within(info(99, 1), limits).unwrap_err();
        assert_eq!(refused.reply_code(), 530);
        drop(admitted);
        assert!(registry.is_empty());
        assert_eq!(registry.count_in_vhost("/"), 0);
        assert_eq!(registry.count_of_user("guest"), 0);
    }

    #[tokio::test]
    async fn close_user_and_close_vhost_ask_only_their_connections() {
        let registry = Arc::new(ConnectionRegistry::default());
        let mut a = info(1, 1);
        a.user = "u".into();
        let mut b = info(2, 2);
        b.vhost = "v".into();
        let (_ra, mut rx_a) = registry.register(a);
        let (_rb, mut rx_b) = registry.register(b);
        assert_eq!(registry.close_user("u"), 1);
        match rx_a.try_recv() {
            Some(ConnectionControl::Close { reason }) => assert_eq!(reason, "user 'u' is deleted"),
            other => panic!("{other:?}"),
        }
        assert!(rx_b.try_recv().is_none());
        assert_eq!(registry.close_vhost("v"), 1);
        match rx_b.try_recv() {
            Some(ConnectionControl::Close { reason }) => assert_eq!(reason, "vhost 'v' is deleted"),
            other => panic!("{other:?}"),
        }
        assert_eq!(registry.close_vhost("nothing"), 0);
    }

    #[tokio::test]
    async fn registration_lists_until_dropped_and_carries_requests() {
        let registry = Arc::new(ConnectionRegistry::default());
        let (reg, mut rx) = registry.register(info(7, 40000));
        assert_eq!(registry.len(), 1);
        let handle = registry.by_name("127.0.0.1:40000 -> 127.0.0.1:5672").expect("listed by name");
        assert_eq!(handle.info().id, 7);
        assert!(registry.by_name("127.0.0.1:1 -> 127.0.0.1:5672").is_none());

        // The connection task answers a snapshot request.
        let task = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    ConnectionControl::Snapshot(tx) => {
                        let _ = tx.send(vec![ChannelSnapshot {
                            number: 1,
                            prefetch_count: 10,
                            global_prefetch_count: 0,
                            confirm: true,
                            transactional: false,
                            unacknowledged: 0,
                            unconfirmed: 0,
                            uncommitted_publishes: 0,
                            uncommitted_acks: 0,
                            consumers: vec![],
                            message_stats: ChannelMessageStats::default(),
                            publishes: vec![],
                            deliveries: vec![],
                        }]);
                    }
                    ConnectionControl::Close { reason } => return reason,
                }
            }
        });
        let channels = handle.channels().await.expect("answered");
        assert_eq!(channels.len(), 1);
        assert_eq!(channels[0].prefetch_count, 10);
        assert!(handle.close("bye"));
        assert_eq!(task.await.unwrap(), "bye");

        drop(reg);
        assert!(registry.is_empty());
        assert!(handle.channels().await.is_none(), "a gone connection answers nothing");
        assert!(!handle.close("again"));
    }
    #[tokio::test]
    async fn the_inbox_wakes_its_task_refuses_when_full_and_ends_waits_when_dropped() {
        let registry = Arc::new(ConnectionRegistry::default());
        let (_reg, mut rx) = registry.register(info(1, 1));
        let handle = registry.list().pop().expect("listed");
        // A task already waiting is woken by a request sent after it started to wait.
        let waiter = tokio::spawn(async move {
            let first = rx.recv().await;
            (rx, first)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(handle.close("one"));
        let (mut rx, first) = waiter.await.unwrap();
        assert!(matches!(first, ConnectionControl::Close { reason } if reason == "one"));
        // At most CONTROL_QUEUE requests wait; taking one makes room for one.
        for _ in 0..CONTROL_QUEUE {
            assert!(handle.close("more"));
        }
        assert!(!handle.close("too many"));
        assert!(rx.try_recv().is_some());
        assert!(handle.close("room again"));
        while rx.try_recv().is_some() {}
        // A snapshot asked of a connection that then goes away ends at once, not after SNAPSHOT_TIMEOUT.
        let asking = tokio::spawn({
            let handle = handle.clone();
            async move { handle.channels().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let dropped_at = std::time::Instant::now();
        drop(rx);
        assert!(asking.await.unwrap().is_none());
        assert!(dropped_at.elapsed() < SNAPSHOT_TIMEOUT / 2, "the wait ended with the receiver");
        assert!(!handle.close("gone"));
    }
}
