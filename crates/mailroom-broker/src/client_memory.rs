//! Memory the wire layer holds on behalf of clients, outside any queue: partly received messages, publishes
//! held by uncommitted transactions, deliveries on their way to a socket and encoded frames waiting for the
//! writer. The memory alarm adds these to what the queues hold ([`crate::alarm`]), so a client cannot grow
//! the broker past its watermark through them. Also the per-connection outbound credit that stops a queue
//! from handing a connection more than its bound of deliveries it has not yet written to its socket.
//!
//! Counting is one relaxed atomic add on a striped slot (no lock, no per-message allocation); the alarm
//! monitor sums the slots every round.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Slots per gauge (as [`crate::counters`]).
const STRIPES: usize = 16;

/// One cache line holding one slot.
#[repr(align(64))]
struct Slot(AtomicU64);

/// A byte count that goes up and down, striped: each thread adds to and subtracts from its own slot
/// (wrapping), so one slot may underflow while the sum stays right.
pub struct Gauge {
    slots: [Slot; STRIPES],
}

impl Gauge {
    /// A gauge at zero.
    pub const fn new() -> Gauge {
        Gauge { slots: [const { Slot(AtomicU64::new(0)) }; STRIPES] }
    }
    /// Adds `n` bytes.
    #[inline]
    pub fn add(&self, n: u64) {
        self.slots[crate::counters::stripe()].0.fetch_add(n, Ordering::Relaxed);
    }
    /// Takes `n` bytes away (added earlier, maybe by another thread).
    #[inline]
    pub fn sub(&self, n: u64) {
        self.slots[crate::counters::stripe()].0.fetch_sub(n, Ordering::Relaxed);
    }
    /// The bytes counted now (a sum of relaxed loads: exact once the adders are quiet).
    pub fn get(&self) -> u64 {
        let sum = self.slots.iter().fold(0u64, |acc, s| acc.wrapping_add(s.0.load(Ordering::Relaxed)));
        // A racing sub seen before its add reads as a huge number: report zero rather than that.
        if sum > i64::MAX as u64 {
            0
        } else {
            sum
        }
    }
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge::new()
    }
}

/// What the wire layer holds for clients, by kind, process-wide.
pub struct ClientMemory {
    /// Body bytes of messages whose content is still arriving.
    pub partial: Gauge,
    /// Body bytes of publishes held by open transactions until commit.
    pub tx: Gauge,
    /// Body bytes of deliveries handed to connections and not yet written to their sockets (no-ack ones
    /// included; acking ones are also counted by their queue's unacked bytes, so this overstates by at
    /// most each connection's outbound bound).
    pub in_flight: Gauge,
    /// Encoded frames handed to connection writers and not yet written to their sockets.
    pub outbound: Gauge,
}

/// The process's client memory figures.
pub static CLIENT_MEMORY: ClientMemory =
    ClientMemory { partial: Gauge::new(), tx: Gauge::new(), in_flight: Gauge::new(), outbound: Gauge::new() };

/// The figures of [`CLIENT_MEMORY`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientMemoryFigures {
    /// See [`ClientMemory::partial`].
    pub partial: u64,
    /// See [`ClientMemory::tx`].
    pub tx: u64,
    /// See [`ClientMemory::in_flight`].
    pub in_flight: u64,
    /// See [`ClientMemory::outbound`].
    pub outbound: u64,
}

impl ClientMemoryFigures {
    /// All of it.
    pub fn total(&self) -> u64 {
        self.partial + self.tx + self.in_flight + self.outbound
    }
}

impl ClientMemory {
    /// The figures now.
    pub fn figures(&self) -> ClientMemoryFigures {
        ClientMemoryFigures {
            partial: self.partial.get(),
            tx: self.tx.get(),
            in_flight: self.in_flight.get(),
            outbound: self.outbound.get(),
        }
    }
}

/// A connection's outbound credit: body bytes of deliveries its queues handed it and it has not yet written
/// to its socket. A consumer whose connection is at its bound gets nothing more until the writer drains
/// (one message may overshoot, so a message larger than the bound still goes out).
#[derive(Debug)]
pub struct OutboundCredit {
    limit: u64,
    used: AtomicU64,
    /// A release took the credit from full to having room, and the owner has not seen it yet.
    room: AtomicBool,
    /// The owner waiting for room. A slot rather than a `Notify`: the owner polls it on every turn of its
    /// loop, and a `Notified` costs a lock of its waiter list per poll.
    room_waiting: Mutex<Option<Waker>>,
}

impl OutboundCredit {
    /// Credit of `limit` bytes (0 = unbounded).
    pub fn new(limit: u64) -> Arc<OutboundCredit> {
        Arc::new(OutboundCredit {
            limit,
            used: AtomicU64::new(0),
            room: AtomicBool::new(false),
            room_waiting: Mutex::new(None),
        })
    }
    /// Whether a queue may hand the connection another delivery.
    #[inline]
    pub fn has_room(&self) -> bool {
        self.limit == 0 || self.used.load(Ordering::Relaxed) < self.limit
    }
    /// A delivery of `bytes` was handed to the connection.
    #[inline]
    pub fn take(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        CLIENT_MEMORY.in_flight.add(bytes);
    }
    /// Deliveries of `bytes` in all were written out (or went back to their queues). Wakes
    /// [`OutboundCredit::room`] when this takes the credit from full to having room.
    pub fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let before = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(bytes)))
            .unwrap_or_else(|n| n);
        CLIENT_MEMORY.in_flight.sub(bytes.min(before));
        if self.limit != 0 && before >= self.limit && before.saturating_sub(bytes) < self.limit {
            self.room.store(true, Ordering::Release);
            let waiting = self.room_waiting.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(owner) = waiting {
                owner.wake();
            }
        }
    }
    /// Bytes in flight now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
    /// The bound (0 = unbounded).
    pub fn limit(&self) -> u64 {
        self.limit
    }
    /// Ready once a release has taken the credit from full to having room (a release before the call is
    /// remembered), so the owner can ask its queues to dispatch again; until then `cx`'s task is woken by it.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.room.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        {
            let mut waiting = self.room_waiting.lock().unwrap_or_else(|e| e.into_inner());
            crate::waker_slot::remember_waker(&mut waiting, cx.waker());
        }
        // A release between the first look and storing the waker found no waker to wake: look again.
        if self.room.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for OutboundCredit {
    fn drop(&mut self) {
        // Deliveries never released (the connection went first) leave the process figure with it.
        CLIENT_MEMORY.in_flight.sub(*self.used.get_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_sums_adds_and_subs_across_threads() {
        let g = Arc::new(Gauge::new());
        let g2 = Arc::clone(&g);
        g.add(100);
        std::thread::spawn(move || g2.sub(40)).join().expect("thread");
        assert_eq!(g.get(), 60);
    }

    #[tokio::test]
    async fn credit_blocks_at_the_bound_and_wakes_on_room() {
        let c = OutboundCredit::new(100);
        assert!(c.has_room());
        c.take(60);
        assert!(c.has_room());
        c.take(60);
        assert!(!c.has_room(), "120 of 100");
        c.release(10);
        assert!(!c.has_room());
        c.release(60);
        assert!(c.has_room());
        // The wake-up of that release is remembered.
        tokio::time::timeout(std::time::Duration::from_secs(1), std::future::poll_fn(|cx| c.poll_room(cx)))
            .await
            .expect("woken");
        assert_eq!(c.used(), 50);
    }
}
