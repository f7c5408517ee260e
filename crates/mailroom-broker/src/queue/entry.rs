//! An entry of a queue's ready index: 24 bytes per message (or per run of messages, see `runs.rs`).

use super::MessageId;
use crate::store::{MsgRef, SegmentPos};

/// Position of a ready message: lower ranks go first (rank = 255 - priority), then lower ids (FIFO).
pub(super) type Rank = (u8, MessageId);

/// [`Entry::flags`]: delivered before.
pub(super) const REDELIVERED: u8 = 1;
/// [`Entry::flags`]: its body is in RAM, in the ready index's body map.
pub(super) const RESIDENT: u8 = 2;
/// [`Entry::flags`]: `pos` names its record in the queue's durable store.
pub(super) const STORED: u8 = 4;
/// [`Entry::flags`]: `pos` names its record in the queue's paging store.
pub(super) const PAGED: u8 = 8;

/// [`Entry::flags`]: this slot is a run (see `runs.rs` for what its fields mean then).
pub(super) const RUN: u8 = 16;
/// [`Entry::flags`]: a message of a run whose record was not where the run said (the segment was damaged
/// after it was written): reading it fails as corrupt, so it is quarantined and settled like any
/// damaged record, never delivered and never left waiting.
pub(super) const MISSING: u8 = 32;

/// A message in the queue's index: 24 bytes, whether its body is in RAM or only on disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) id: MessageId,
    /// Its record in the durable or the paging store (see the flags); meaningless without either flag.
    pub(super) pos: SegmentPos,
    /// Body bytes (for the length limits and memory accounting).
    pub(super) size: u32,
    /// 255 minus the effective priority; constant for queues without priorities.
    pub(super) rank: u8,
    /// [`REDELIVERED`], [`RESIDENT`], [`STORED`], [`PAGED`], [`RUN`], [`MISSING`].
    pub(super) flags: u8,
    /// Times the message was returned to the queue (requeue, or its channel closed while unacked);
    /// saturates at `u16::MAX`, so a delivery limit above 65534 never triggers.
    pub(super) delivery_count: u16,
}

impl Entry {
    pub(super) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
    pub(super) fn key(&self) -> Rank {
        (self.rank, self.id)
    }
    pub(super) fn stored_ref(&self) -> Option<MsgRef> {
        self.has(STORED).then_some(MsgRef { id: self.id, pos: self.pos })
    }
    pub(super) fn msg_ref(&self) -> MsgRef {
        MsgRef { id: self.id, pos: self.pos }
    }
}

impl Entry {
    /// Whether this slot is a run rather than one message.
    #[inline]
    pub(super) fn is_run(&self) -> bool {
        self.flags & RUN != 0
    }
    /// Messages this slot stands for: a run's count, else 1.
    #[inline]
    pub(super) fn count(&self) -> usize {
        if self.is_run() {
            self.delivery_count as usize
        } else {
            1
        }
    }
    /// The id of the last message this slot stands for.
    pub(super) fn last_id(&self) -> u64 {
        self.id + self.count() as u64 - 1
    }
    /// Whether the message with `key` is this slot's (for a run: one of its messages).
    pub(super) fn covers(&self, key: Rank) -> bool {
        key.0 == self.rank && key.1 >= self.id && key.1 <= self.last_id()
    }
    /// Whether a new message (no body in RAM, no expiry) may ever be part of a run.
    pub(super) fn run_eligible(&self) -> bool {
        self.flags == STORED && self.delivery_count == 0
    }
}
