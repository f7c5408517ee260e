//! The writer task: owns the socket's write half and writes the batches the connection hands it. The queue
//! between them is bounded, so a slow client pushes back on the connection instead of growing memory.

use bytes::Bytes;
use mailroom_broker::ConnectionTraffic;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Batches of encoded frames queued for the writer: bounds per-connection outbound memory.
const QUEUED_BATCHES: usize = 64;

/// Why a batch could not be handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteError {
    /// The writer stopped (the socket failed).
    Gone,
    /// The writer stayed behind for the whole stall limit: the peer stopped reading.
    Stalled,
}

/// The connection's handle on its writer task.
pub(super) struct Writer {
    tx: mpsc::Sender<Vec<Bytes>>,
}

impl Writer {
    /// Starts the writer task on `wr`, counting what it writes in `traffic`; the task ends (shutting the
    /// socket down) once the handle is dropped.
    pub(super) fn spawn<W: AsyncWrite + Unpin + Send + 'static>(
        wr: W,
        traffic: Arc<ConnectionTraffic>,
    ) -> (Writer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
        (Writer { tx }, tokio::spawn(write_loop(wr, rx, traffic)))
    }

    /// Hands a batch over, waiting at most `stall_limit` for room.
    pub(super) async fn send(&self, batch: Vec<Bytes>, stall_limit: Duration) -> Result<(), WriteError> {
        match timeout(stall_limit, self.tx.send(batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteError::Gone),
            Err(_) => Err(WriteError::Stalled),
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    traffic: Arc<ConnectionTraffic>,
) {
    while let Some(batch) = rx.recv().await {
        let mut bytes = 0;
        for chunk in batch {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            bytes += chunk.len();
        }
        traffic.sent(bytes);
    }
    let _ = wr.shutdown().await;
}
