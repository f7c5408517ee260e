//! The handle on a running relay task (the PostgreSQL outbox's and the embedded saga store's): whether it
//! is the active one, how much it published, and stopping it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// What a relay task and its handle share (the outbox relay's and the embedded saga store's).
#[derive(Debug, Default)]
pub(crate) struct RelayShared {
    /// It holds the lock that makes it the active relay.
    pub(crate) leader: AtomicBool,
    /// Messages published and marked sent.
    pub(crate) published: AtomicU64,
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    task: tokio::task::JoinHandle<()>,
    shared: Arc<RelayShared>,
}

impl RelayHandle {
    /// A handle on a running relay task.
    pub(crate) fn new(task: tokio::task::JoinHandle<()>, shared: Arc<RelayShared>) -> RelayHandle {
        RelayHandle { task, shared }
    }
    /// Whether this relay holds its lock (the table's advisory lock, or the store directory's), i.e. is the
    /// one publishing.
    pub fn is_active(&self) -> bool {
        self.shared.leader.load(Ordering::SeqCst)
    }
    /// Messages this relay published and marked sent.
    pub fn published(&self) -> u64 {
        self.shared.published.load(Ordering::Relaxed)
    }
    /// Stops the relay (its lock is released to a standby).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
    /// Kills the relay task where it stands (as a crash would).
    pub fn abort(&self) {
        self.task.abort();
    }
}
