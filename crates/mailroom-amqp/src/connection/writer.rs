//! The writer task: owns the socket's write half and writes the batches the connection hands it. The queue
//! between them is bounded, so a slow client pushes back on the connection instead of growing memory; a
//! write that makes no progress for the write deadline ends the task (the client stopped reading), which the
//! connection sees through [`Writer::closed`]. Once a batch is written, its deliveries' outbound credit goes
//! back, so their queues may hand the connection more.

use bytes::Bytes;
use mailroom_broker::client_memory::{OutboundCredit, CLIENT_MEMORY};
use mailroom_broker::ConnectionTraffic;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Batches of encoded frames queued for the writer: bounds per-connection outbound memory.
const QUEUED_BATCHES: usize = 64;

/// Encoded frames handed to the writer in one go.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The frames, in wire order.
    pub(super) chunks: Vec<Bytes>,
    /// Outbound credit held by the deliveries among them, released once they are written.
    pub(super) credit: u64,
}

impl Batch {
    fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len() as u64).sum()
    }
}

/// Why a batch could not be handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteError {
    /// The writer stopped (the socket failed or missed the write deadline).
    Gone,
    /// The writer stayed behind for the whole stall limit: the peer stopped reading.
    Stalled,
}

/// The connection's handle on its writer task.
pub(super) struct Writer {
    tx: mpsc::Sender<Batch>,
}

/// What the writer task needs besides the socket.
pub(super) struct WriterSettings {
    /// The client, for the log line.
    pub(super) peer: SocketAddr,
    /// A write making no progress for this long ends the task (zero = never).
    pub(super) deadline: Duration,
    /// The connection's outbound credit, released as deliveries are written.
    pub(super) credit: Arc<OutboundCredit>,
    /// Bytes and socket writes, for the management API (the connection holds a clone).
    pub(super) traffic: Arc<ConnectionTraffic>,
}

impl Writer {
    /// Starts the writer task on `wr`; the task ends (shutting the socket down) once the handle is dropped.
    pub(super) fn spawn<W: AsyncWrite + Unpin + Send + 'static>(
        wr: W,
        settings: WriterSettings,
    ) -> (Writer, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
        (Writer { tx }, tokio::spawn(write_loop(wr, rx, settings)))
    }

    /// Hands a batch over, waiting at most `stall_limit` for room.
    pub(super) async fn send(&self, batch: Batch, stall_limit: Duration) -> Result<(), WriteError> {
        let bytes = batch.bytes();
        CLIENT_MEMORY.outbound.add(bytes);
        let result = match timeout(stall_limit, self.tx.send(batch)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => Err(WriteError::Gone),
            Err(_) => Err(WriteError::Stalled),
        };
        // Not handed over: the writer will never account for it (its credit leaves with the connection's).
        CLIENT_MEMORY.outbound.sub(bytes);
        result
    }

    /// Resolves once the writer task has ended (socket failed, write deadline missed).
    pub(super) async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Why writing stopped.
enum Stop {
    Failed,
    Deadline,
}

/// Writes `chunk`, giving up when one write call makes no progress for `deadline`.
async fn write_chunk<W: AsyncWrite + Unpin>(wr: &mut W, chunk: &[u8], deadline: Duration) -> Result<(), Stop> {
    let mut pos = 0;
    while pos < chunk.len() {
        let written = if deadline.is_zero() {
            wr.write(&chunk[pos..]).await
        } else {
            timeout(deadline, wr.write(&chunk[pos..])).await.map_err(|_| Stop::Deadline)?
        };
        match written {
            Ok(0) | Err(_) => return Err(Stop::Failed),
            Ok(n) => pos += n,
        }
    }
    Ok(())
}

async fn write_batch<W: AsyncWrite + Unpin>(wr: &mut W, batch: &Batch, deadline: Duration) -> Result<(), Stop> {
    for chunk in &batch.chunks {
        write_chunk(wr, chunk, deadline).await?;
    }
    // A TLS stream may hold the tail of the batch until flushed.
    let flushed = if deadline.is_zero() {
        wr.flush().await
    } else {
        timeout(deadline, wr.flush()).await.map_err(|_| Stop::Deadline)?
    };
    flushed.map_err(|_| Stop::Failed)
}

/// Gives back what a batch held: its bytes in the process figures, its deliveries' credit.
fn settle(batch: &Batch, credit: &OutboundCredit) {
    CLIENT_MEMORY.outbound.sub(batch.bytes());
    credit.release(batch.credit);
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Batch>, settings: WriterSettings) {
    while let Some(batch) = rx.recv().await {
        let result = write_batch(&mut wr, &batch, settings.deadline).await;
        settle(&batch, &settings.credit);
        match result {
            Ok(()) => settings.traffic.sent(batch.bytes() as usize),
            Err(stop) => {
                if matches!(stop, Stop::Deadline) {
                    tracing::info!(peer = %settings.peer, deadline_ms = settings.deadline.as_millis() as u64,
                        "closing AMQP connection: the client read nothing within the write deadline");
                }
                // Whatever is still queued will never be written: account for it, then drop the socket's write
                // half (the connection sees the closed queue and ends).
                rx.close();
                while let Ok(batch) = rx.try_recv() {
                    settle(&batch, &settings.credit);
                }
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}
