//! The durable message store: per-queue append-only segment files, a sidecar ack log per segment,
//! one group-commit syncer shared by every queue, and the fsynced definitions file.
//!
//! Design (after LavinMQ and Kafka, see DESIGN.md "Shape"):
//! - A [`QueueStore`] owns one directory per durable queue. [`QueueStore::append`] only copies the
//!   encoded record into an in-memory buffer and returns at once with a [`SyncTicket`]; it never
//!   writes or fsyncs, so a queue can call it under its own short mutex.
//! - The [`Syncer`] thread takes every dirty store's buffer, writes it with one `pwrite` per segment,
//!   `fdatasync`s every touched file once (concurrently, so one journal commit serves several queues),
//!   fsyncs the directory when files were created, and only then completes the tickets of that round.
//!   Publishers arriving during an fsync share the next one.
//! - Acks and "delivered" marks go to a small ack log beside each segment, one write per call and
//!   segment (the queue batches: one call per ack batch, one per dispatch round). They are written to
//!   the page cache at once, so a process crash (`kill -9`) keeps them; their fsync rides on a round at
//!   most [`StoreConfig::ack_sync_interval`] (100 ms) later, so rounds, and the confirms waiting for
//!   them, mostly fsync segments only. After a power loss, acks of that last interval may bring their
//!   messages back once (DESIGN.md allows it). A rolled segment whose messages are all settled is
//!   deleted with its ack log.
//! - Recovery ([`QueueStore::recover`]) scans segments with CRCs: a torn tail is cut off, a damaged
//!   record in the middle is reported and skipped (the scanner resyncs on the next magic number whose
//!   header CRC checks). No file content can make it panic.
//! - The same store, opened with [`StoreConfig::ephemeral`], is a queue's paging store
//!   ([`crate::paging`]): records are written by their own syncer thread but never fsynced, and settles
//!   only count (no ack log), because nothing in it has to survive a restart.
//! - [`QueueStore::read_many`] reads a deep queue's head back in spans (one `pread` for many records).
//! - The store is generic over its record type ([`record::Record`]): messages ([`StoredMessage`], the
//!   codec in [`record`]) for queues, paging and delayed exchanges, and deduplication keys ([`KeyRecord`],
//!   [`key_record`]) for deduplicating exchanges' caches; both share one on-disk layout.

pub mod ack_log;
pub mod definitions;
pub mod definitions_log;
pub mod key_record;
pub mod queue_store;
pub mod record;
pub mod segment;
pub mod syncer;

use std::path::PathBuf;
use std::sync::Arc;

pub use definitions::{BindingDef, Definitions, DestinationKind, ExchangeDef, PolicyDef, QueueDef, UserDef, VhostDef};
pub use definitions_log::{Change, DefinitionsLog};
pub use key_record::KeyRecord;
pub use queue_store::{
    quarantined_records_total, Damaged, MsgRef, QueueStore, Recovered, RecoveryReport, SegmentPos, StoreConfig,
    Truncated,
};
pub use record::{Record, StoredMessage};
pub use syncer::{SyncStats, SyncTicket, Syncer, SyncerConfig};

/// Errors of the store. Cloneable (I/O errors are shared) because one failed write fails every
/// ticket of its batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The disk is full (ENOSPC or EDQUOT): the store rolled the file back and retries later.
    #[error("disk full while {op} {path}")]
    DiskFull {
        /// What the store was doing.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("I/O error while {op} {path}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error, shared between every ticket it fails.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The store was closed (its queue deleted): it takes no more writes. (A failed fsync no longer closes
    /// a store: it fails that round and the store retries, see [`queue_store`].)
    #[error("store closed: {0}")]
    Closed(Arc<str>),
    /// The definition of the queue holding the record could not be saved, so the record may not
    /// outlive a crash (its confirm is a nack).
    #[error("{0}")]
    DefinitionNotSaved(Arc<str>),
    /// A record read back did not check (CRC, magic or encoding).
    #[error("corrupt record in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the record in it.
        offset: u64,
        /// What did not check.
        reason: &'static str,
    },
    /// A position that does not name a record of this store (segment deleted or offset past the end).
    #[error("no record at segment {segment} offset {offset}")]
    NotFound {
        /// Segment sequence number.
        segment: u32,
        /// Byte offset.
        offset: u32,
    },
    /// A message larger than the store accepts in one record.
    #[error("record of {0} bytes exceeds the store's limit")]
    TooLarge(usize),
    /// Too many bytes are waiting to be written (the disk is slower than publishers or failing).
    #[error("{0} bytes already waiting to be written; publisher must back off")]
    Backpressure(usize),
    /// The syncer has been shut down, so no write can become durable any more.
    #[error("the syncer has stopped")]
    SyncerStopped,
    /// The definitions file exists but is damaged or of an unknown version.
    #[error("definitions file {path} is invalid: {reason}")]
    BadDefinitions {
        /// The file.
        path: PathBuf,
        /// What did not check.
        reason: String,
    },
}

impl StoreError {
    /// Classifies an I/O error, separating "disk full" (recoverable when space returns) from the rest.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, err: std::io::Error) -> StoreError {
        // ENOSPC = 28, EDQUOT = 122 on Linux; `StorageFull`/`QuotaExceeded` are what std maps them to.
        let full = matches!(err.raw_os_error(), Some(28) | Some(122))
            || matches!(err.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded);
        if full {
            StoreError::DiskFull { op, path: path.into() }
        } else {
            StoreError::Io { op, path: path.into(), source: Arc::new(err) }
        }
    }

    /// Whether the record itself is bad (checksum, magic, encoding) or absent: no retry can help, so the
    /// reader quarantines it. Every other error (I/O, a short read, a full disk) is worth a retry.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. } | StoreError::NotFound { .. })
    }

    /// Whether this is a full disk, i.e. the caller should block publishers rather than give up.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. })
    }
}

/// Result type of the store.
pub type StoreResult<T> = std::result::Result<T, StoreError>;
