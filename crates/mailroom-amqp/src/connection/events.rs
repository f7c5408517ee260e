//! The connection's consumer-event channel (deliveries and broker cancels from its queues), created on the
//! first `basic.consume`: tokio allocates a channel's first block of 32 slots up front, which an idle
//! connection without consumers should not hold.

use mailroom_broker::{ConsumerEvent, ConsumerSink};
use tokio::sync::mpsc::{self, error::TryRecvError};

/// The receiving end, and the sender that consumers are registered with, once a consumer exists.
#[derive(Default)]
pub(super) struct Events {
    channel: Option<(ConsumerSink, mpsc::UnboundedReceiver<ConsumerEvent>)>,
}

impl Events {
    /// Where a new consumer's events go (creates the channel on first use).
    pub(super) fn sink(&mut self) -> ConsumerSink {
        let (tx, _) = self.channel.get_or_insert_with(mpsc::unbounded_channel);
        tx.clone()
    }

    /// The next event; never completes while no consumer was ever created (cancel-safe, for `select!`).
    pub(super) async fn recv(&mut self) -> Option<ConsumerEvent> {
        match &mut self.channel {
            Some((_, rx)) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// An event already queued, if any.
    pub(super) fn try_recv(&mut self) -> Result<ConsumerEvent, TryRecvError> {
        match &mut self.channel {
            Some((_, rx)) => rx.try_recv(),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Events queued now.
    pub(super) fn len(&self) -> usize {
        self.channel.as_ref().map_or(0, |(_, rx)| rx.len())
    }

    /// Refuses further events (teardown); those already queued can still be taken.
    pub(super) fn close(&mut self) {
        if let Some((_, rx)) = &mut self.channel {
            rx.close();
        }
    }
}
