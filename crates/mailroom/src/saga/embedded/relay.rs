//! The embedded store's outbox relay: publishes unsent commands in sequence order with publisher
//! confirms, then records them as sent. One active relay per store directory (a lock on
//! `relay.lock`, released by the OS when the holder dies); others stand by and take over.

use super::EmbeddedSagaStore;
use crate::bus::Bus;
use crate::relay::{RelayHandle, RelayShared};
use crate::saga::SagaError;
use crate::transport::{Outbound, Published};
use std::fs::{File, OpenOptions, TryLockError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Default commands read per batch.
pub const DEFAULT_BATCH: usize = 100;
/// Default polling interval: other processes' appends are noticed this late, and a failed publish
/// is retried after it.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// A relay builder; [`EmbeddedRelay::run`] starts it.
#[derive(Debug)]
#[must_use = "a relay does nothing until .run() is awaited"]
pub struct EmbeddedRelay {
    store: EmbeddedSagaStore,
    bus: Bus,
    batch: usize,
    poll: Duration,
}

impl EmbeddedRelay {
    pub(super) fn new(store: EmbeddedSagaStore, bus: Bus) -> EmbeddedRelay {
        EmbeddedRelay { store, bus, batch: DEFAULT_BATCH, poll: DEFAULT_POLL }
    }

    /// Commands read per batch (default 100).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Polling interval, also the standby's lock retry interval (default 500 ms).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll = d;
        self
    }

    /// Starts the relay task. It stands by until it holds the directory's relay lock.
    pub async fn run(self) -> Result<EmbeddedRelayHandle, SagaError> {
        let shared = Arc::new(RelayShared::default());
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // Held for the task's life: aborting the task closes the file and frees the lock.
            let _lock = self.acquire_lock().await;
            s.leader.store(true, Ordering::SeqCst);
            loop {
                if let Err(e) = self.drain(&s).await {
                    tracing::warn!(error = %e, "saga relay: draining failed, retrying after the poll interval");
                }
                tokio::select! {
                    _ = self.store.appended() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        });
        Ok(RelayHandle::new(task, shared))
    }

    async fn acquire_lock(&self) -> File {
        let path = self.store.relay_lock_path();
        loop {
            match OpenOptions::new().create(true).truncate(false).write(true).open(&path) {
                Ok(file) => match file.try_lock() {
                    Ok(()) => return file,
                    Err(TryLockError::WouldBlock) => {}
                    Err(TryLockError::Error(e)) => {
                        tracing::warn!(path = %path.display(), error = %e, "saga relay: cannot lock")
                    }
                },
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "saga relay: cannot open the lock file"),
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Publishes unsent commands in order until none is left or a publish fails (later commands
    /// wait, so they never overtake it).
    async fn drain(&self, shared: &RelayShared) -> Result<(), SagaError> {
        loop {
            let rows = self.store.unsent(self.batch).await?;
            let mut sent = Vec::with_capacity(rows.len());
            let mut stopped = false;
            for row in &rows {
                let out = Outbound {
                    exchange: String::new(),
                    routing_key: row.queue.clone(),
                    properties: row.meta().to_properties(),
                    body: row.body.clone().into_bytes().into(),
                    mandatory: true,
                };
                match self.bus.transport().publish(out).await {
                    Ok(Published::Confirmed) => sent.push(row.seq),
                    Ok(Published::Unroutable) => {
                        tracing::warn!(seq = row.seq, queue = %row.queue, "saga relay: no route, retrying later");
                        stopped = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(seq = row.seq, error = %e, "saga relay: publish failed, retrying later");
                        stopped = true;
                        break;
                    }
                }
            }
            let n = sent.len() as u64;
            if n > 0 {
                self.store.mark_sent(sent).await?;
                shared.published.fetch_add(n, Ordering::Relaxed);
            }
            if stopped || rows.len() < self.batch {
                return Ok(());
            }
        }
    }
}

/// A running embedded relay: the same handle as the PostgreSQL outbox relay's.
pub type EmbeddedRelayHandle = RelayHandle;
