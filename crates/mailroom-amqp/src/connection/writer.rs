//! The writer task: writes the batches the connection hands it to the socket's write half. The queue between
//! them is bounded, so a slow client pushes back on the connection instead of growing memory; a write that
//! makes no progress for the write deadline ends the task (the client stopped reading), which the connection
//! sees through [`Writer::poll_closed`]. Once a batch is written, its deliveries' outbound credit goes back, so
//! their queues may hand the connection more. When nothing is queued and the task is idle, the connection
//! writes a batch itself, as far as the socket takes it without waiting, and queues only the rest: a delivery
//! then reaches the socket without a wake-up of the writer task.

use super::outbound::HEARTBEAT_CHUNK;
use bytes::Bytes;
use mailroom_broker::client_memory::{OutboundCredit, CLIENT_MEMORY};
use mailroom_broker::waker_slot::remember_waker;
use mailroom_broker::ConnectionTraffic;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Batches of encoded frames queued for the writer: bounds per-connection outbound memory.
const QUEUED_BATCHES: usize = 64;
/// A queue that grew past this many slots (a burst) gives them back once the writer has emptied it; below, the
/// few slots stay for the next batches.
const KEPT_SLOTS: usize = 4;

/// The socket's write half, boxed so the connection's handle on the writer needs no type parameter.
type Socket = Box<dyn AsyncWrite + Unpin + Send>;

/// Encoded frames handed to the writer in one go.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// A heartbeat frame first (a static chunk, see [`super::outbound::HEARTBEAT_CHUNK`]).
    pub(super) heartbeat_first: bool,
    /// Sealed frames (large bodies as slices of their messages), in wire order, written before `tail`.
    pub(super) chunks: Vec<Bytes>,
    /// The frames encoded into the outbound buffer, last on the wire: most batches are only this, so they
    /// need no `Vec` of their own.
    pub(super) tail: Bytes,
    /// Outbound credit held by the deliveries among them, released once they are written.
    pub(super) credit: u64,
}

impl Batch {
    fn bytes(&self) -> u64 {
        let heartbeat = if self.heartbeat_first { HEARTBEAT_CHUNK.len() as u64 } else { 0 };
        heartbeat + self.chunks.iter().map(|c| c.len() as u64).sum::<u64>() + self.tail.len() as u64
    }

    /// The frames in wire order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Bytes> {
        let heartbeat = self.heartbeat_first.then_some(&HEARTBEAT_CHUNK);
        heartbeat.into_iter().chain(&self.chunks).chain((!self.tail.is_empty()).then_some(&self.tail))
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

/// The queue between the connection and its writer task. A `VecDeque` behind a mutex with waker slots
/// rather than a tokio mpsc channel, whose first 32-slot block (1.5 KB per connection with its state) was
/// allocated up front whether or not the connection ever sent much; this holds a few slots once the first
/// batches have passed, and the lock is taken once per batch on each side, never across an await.
struct Shared {
    state: Mutex<State>,
    /// Wakes a connection waiting for room in a queue that was full (or for a writer that ended).
    to_conn: Notify,
}

#[derive(Default)]
struct State {
    batches: VecDeque<Batch>,
    /// The write half while nobody writes: the writer task takes it while it has batches, the connection for
    /// a batch it writes itself ([`Shared::take_idle_socket`]). A queued batch means the connection does not
    /// hold it (only the connection queues, and never while it writes).
    socket: Option<Socket>,
    /// The writer task ended: nothing queued will be written, nothing more may be queued.
    writer_gone: bool,
    /// The connection dropped its handle: the writer writes what is queued, then shuts the socket down.
    conn_gone: bool,
    /// The connection's task, to wake when the writer ends ([`Writer::poll_closed`]). A slot rather than
    /// `to_conn`: the connection polls it on every turn of its loop, and a `Notified` made and dropped each
    /// turn takes the waiter list's lock twice.
    closed_waiting: Option<Waker>,
    /// The writer task waiting for a batch (or for the connection to let go): woken by the next one. A slot
    /// rather than a `Notify`, whose `Notified` took its waiter list's lock twice per batch.
    writer_waiting: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `batch` if there is room; gives it back when the queue is full.
    fn try_push(&self, batch: Batch) -> Result<(), Result<Batch, WriteError>> {
        let state = self.lock();
        if state.writer_gone {
            return Err(Err(WriteError::Gone));
        }
        if state.batches.len() >= QUEUED_BATCHES {
            return Err(Ok(batch));
        }
        push_and_wake(state, batch);
        Ok(())
    }

    /// The socket, if the writer task is idle (nothing queued) and has not ended: the caller writes now.
    fn take_idle_socket(&self) -> Option<Socket> {
        let mut state = self.lock();
        if state.writer_gone || !state.batches.is_empty() {
            return None;
        }
        state.socket.take()
    }

    /// Gives back the socket [`Shared::take_idle_socket`] lent, all of its batch written.
    fn put_back(&self, socket: Socket) {
        self.lock().socket = Some(socket);
    }

    /// Gives back the socket [`Shared::take_idle_socket`] lent, with the rest of its batch for the writer task;
    /// gives the rest back if the task has ended meanwhile (its runtime shut down).
    fn put_back_with_rest(&self, socket: Socket, rest: Batch) -> Result<(), Batch> {
        let mut state = self.lock();
        state.socket = Some(socket);
        if state.writer_gone {
            return Err(rest);
        }
        push_and_wake(state, rest);
        Ok(())
    }

    /// Queues `batch`, waiting for room.
    async fn push(&self, mut batch: Batch) -> Result<(), WriteError> {
        loop {
            // Created before looking, so a wake-up between the look and the wait is not lost.
            let room = self.to_conn.notified();
            match self.try_push(batch) {
                Ok(()) => return Ok(()),
                Err(Err(e)) => return Err(e),
                Err(Ok(back)) => batch = back,
            }
            room.await;
        }
    }
}

/// Queues `batch` under the held lock, then wakes the writer task if it waits (after letting go of the lock).
fn push_and_wake(mut state: MutexGuard<'_, State>, batch: Batch) {
    state.batches.push_back(batch);
    let writer = state.writer_waiting.take();
    drop(state);
    if let Some(writer) = writer {
        writer.wake();
    }
}

/// The connection's handle on its writer task.
pub(super) struct Writer {
    shared: Arc<Shared>,
    /// Counts the bytes queued for the task (`send_pend`); the task counts them out.
    traffic: Arc<ConnectionTraffic>,
    /// The connection's outbound credit, released here for the batches written without the task.
    credit: Arc<OutboundCredit>,
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
        let state = State { socket: Some(Box::new(wr)), ..State::default() };
        let shared = Arc::new(Shared { state: Mutex::new(state), to_conn: Notify::new() });
        let traffic = Arc::clone(&settings.traffic);
        let credit = Arc::clone(&settings.credit);
        let task = tokio::spawn(write_loop(Arc::clone(&shared), settings));
        (Writer { shared, traffic, credit }, task)
    }

    /// Writes a batch at once if the writer task is idle, queuing what the socket did not take; else hands it
    /// over, waiting at most `stall_limit` for room.
    pub(super) async fn send(&self, batch: Batch, stall_limit: Duration) -> Result<(), WriteError> {
        let bytes = batch.bytes();
        CLIENT_MEMORY.outbound.add(bytes);
        // Counted before the handover: once handed over, the task may write it and count it out at once.
        self.traffic.queued(bytes);
        if let Some(socket) = self.shared.take_idle_socket() {
            return self.write_now(socket, batch).await;
        }
        let result = match self.shared.try_push(batch) {
            Ok(()) => return Ok(()),
            Err(Err(e)) => Err(e),
            // Full: wait for room (no timer unless the writer is behind).
            Err(Ok(batch)) => match timeout(stall_limit, self.shared.push(batch)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(WriteError::Stalled),
            },
        };
        // Not handed over: the writer will never account for it (its credit leaves with the connection's).
        self.uncount(bytes);
        result
    }

    /// Writes `batch` on the idle `socket` as far as it goes without waiting and settles what was written; the
    /// rest is queued for the writer task (which waits for the socket, and meets any error the socket gave here
    /// again, and ends).
    async fn write_now(&self, mut socket: Socket, batch: Batch) -> Result<(), WriteError> {
        let (written, rest) =
            std::future::poll_fn(|cx| Poll::Ready(write_without_waiting(&mut socket, &batch, cx))).await;
        self.uncount(written);
        if written > 0 {
            self.traffic.sent(written as usize);
        }
        let Some(chunks) = rest else {
            // Released after the socket is back, so a queue this credit wakes finds the writer idle.
            self.shared.put_back(socket);
            self.credit.release(batch.credit);
            return Ok(());
        };
        let rest = Batch { heartbeat_first: false, chunks, tail: Bytes::new(), credit: batch.credit };
        self.shared.put_back_with_rest(socket, rest).map_err(|rest| {
            // The writer task ended meanwhile: the rest is never written (as in `send`).
            self.uncount(rest.bytes());
            WriteError::Gone
        })
    }

    /// Takes `bytes` that [`Writer::send`] counted as queued out of the process and connection figures again:
    /// written here, or never to be written.
    fn uncount(&self, bytes: u64) {
        CLIENT_MEMORY.outbound.sub(bytes);
        self.traffic.dequeued(bytes);
    }

    /// Gives the queue's slots back while it is empty (a quiet connection's timer turn, as the outbound and read
    /// buffers): an idle connection then holds no queue memory, and the next batch allocates a few slots.
    pub(super) fn park(&self) {
        let mut state = self.shared.lock();
        if state.batches.is_empty() && state.batches.capacity() > 0 {
            state.batches = VecDeque::new();
        }
    }

    /// Resolves once the writer task has ended (socket failed, write deadline missed).
    #[cfg(test)]
    pub(super) async fn closed(&self) {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }

    /// Ready once the writer task has ended (socket failed, write deadline missed); until then `cx`'s task is
    /// woken when it ends.
    pub(super) fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.lock();
        if state.writer_gone {
            return Poll::Ready(());
        }
        remember_waker(&mut state.closed_waiting, cx.waker());
        Poll::Pending
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let writer = {
            let mut state = self.shared.lock();
            state.conn_gone = true;
            state.writer_waiting.take()
        };
        if let Some(writer) = writer {
            writer.wake();
        }
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
    for chunk in batch.iter() {
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

/// Writes what `socket` takes of `batch` without waiting (waking `cx`'s task, spuriously, once it could take
/// more): the bytes written, and the frames left, None once everything was written and flushed. An empty rest
/// is a flush still pending (a TLS stream's buffered tail); a failed write leaves its frame as the rest.
fn write_without_waiting(socket: &mut Socket, batch: &Batch, cx: &mut Context<'_>) -> (u64, Option<Vec<Bytes>>) {
    let mut written = 0u64;
    let mut frames = batch.iter();
    while let Some(frame) = frames.next() {
        let mut pos = 0;
        while pos < frame.len() {
            match Pin::new(&mut *socket).poll_write(cx, &frame[pos..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    pos += n;
                    written += n as u64;
                }
                _ => return (written, Some(std::iter::once(frame.slice(pos..)).chain(frames.cloned()).collect())),
            }
        }
    }
    match Pin::new(&mut *socket).poll_flush(cx) {
        Poll::Ready(Ok(())) => (written, None),
        _ => (written, Some(Vec::new())),
    }
}

/// Gives back what a batch of `bytes` held: its bytes in the process figures and the connection's
/// `send_pend`, its deliveries' credit.
fn settle(batch: &Batch, bytes: u64, settings: &WriterSettings) {
    CLIENT_MEMORY.outbound.sub(bytes);
    settings.traffic.dequeued(bytes);
    settings.credit.release(batch.credit);
}

/// Marks the writer gone however its task ends (returned, or dropped with the runtime): what is still queued is
/// accounted for and dropped, and the connection stops waiting for room.
struct Ending<'a> {
    shared: &'a Shared,
    settings: &'a WriterSettings,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        let (left, closed_waiting) = {
            let mut state = self.shared.lock();
            state.writer_gone = true;
            (std::mem::take(&mut state.batches), state.closed_waiting.take())
        };
        if let Some(conn) = closed_waiting {
            conn.wake();
        }
        for batch in &left {
            settle(batch, batch.bytes(), self.settings);
        }
        self.shared.to_conn.notify_one();
    }
}

/// The next batch to write, with the socket in `socket`; or `Pending` with `cx`'s task woken by the next one
/// queued and the socket given back (the connection may write the next batch itself); None, with the socket
/// in `socket`, once the connection let go and everything was written.
fn poll_next_batch(shared: &Shared, socket: &mut Option<Socket>, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
    let mut state = shared.lock();
    let was_full = state.batches.len() >= QUEUED_BATCHES;
    if let Some(batch) = state.batches.pop_front() {
        if socket.is_none() {
            *socket = state.socket.take();
        }
        if state.batches.is_empty() && state.batches.capacity() > KEPT_SLOTS {
            state.batches = VecDeque::new();
        }
        drop(state);
        if was_full {
            // The connection may be waiting for room (only then: no wake-up per batch).
            shared.to_conn.notify_one();
        }
        return Poll::Ready(Some(batch));
    }
    if let Some(idle) = socket.take() {
        state.socket = Some(idle);
    }
    if state.conn_gone {
        *socket = state.socket.take();
        return Poll::Ready(None);
    }
    remember_waker(&mut state.writer_waiting, cx.waker());
    Poll::Pending
}

async fn write_loop(shared: Arc<Shared>, settings: WriterSettings) {
    let _ending = Ending { shared: &shared, settings: &settings };
    // The socket while this task has batches to write (see `State::socket`).
    let mut socket = None;
    while let Some(batch) = std::future::poll_fn(|cx| poll_next_batch(&shared, &mut socket, cx)).await {
        let Some(wr) = socket.as_mut() else {
            // Cannot happen (a queued batch means the connection does not hold the socket); if it did, ending
            // the task closes the connection rather than writing out of order.
            debug_assert!(false, "a queued batch without the socket");
            settle(&batch, batch.bytes(), &settings);
            return;
        };
        // Boxed: the write's state (its write-deadline timers) is held only while a batch is being written,
        // not by every idle connection's task (~0.5 KB each); one allocation per batch, not per frame.
        let result = Box::pin(write_batch(wr, &batch, settings.deadline)).await;
        let bytes = batch.bytes();
        settle(&batch, bytes, &settings);
        match result {
            Ok(()) => settings.traffic.sent(bytes as usize),
            Err(stop) => {
                if matches!(stop, Stop::Deadline) {
                    tracing::info!(peer = %settings.peer, deadline_ms = settings.deadline.as_millis() as u64,
                        "closing AMQP connection: the client read nothing within the write deadline");
                }
                // Whatever is still queued will never be written: `_ending` accounts for it, then the socket's
                // write half is dropped (the connection sees the writer gone and ends).
                return;
            }
        }
    }
    if let Some(mut wr) = socket {
        let _ = wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn settings() -> WriterSettings {
        WriterSettings {
            peer: "127.0.0.1:1".parse().unwrap(),
            deadline: Duration::ZERO,
            credit: OutboundCredit::new(0),
            traffic: Arc::new(ConnectionTraffic::default()),
        }
    }

    fn batch(byte: u8) -> Batch {
        Batch { tail: Bytes::from(vec![byte; 100]), ..Batch::default() }
    }

    #[tokio::test]
    async fn a_full_queue_pushes_back_until_the_peer_reads_and_everything_arrives_in_order() {
        let (client, server) = tokio::io::duplex(64);
        let (writer, task) = Writer::spawn(server, settings());
        let stall = Duration::from_millis(50);
        // The peer reads nothing: the socket takes 64 bytes, the task holds one batch, the queue the rest.
        let mut sent = 0u32;
        while writer.send(batch(sent as u8), stall).await.is_ok() {
            sent += 1;
            assert!(sent <= QUEUED_BATCHES as u32 + 2, "the queue is bounded");
        }
        assert_eq!(writer.send(batch(0), stall).await, Err(WriteError::Stalled));
        assert!(sent >= QUEUED_BATCHES as u32);
        // Room again once the peer reads; the stalled batches were not queued.
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        writer.send(batch(0xEE), Duration::from_secs(10)).await.unwrap();
        writer.park();
        drop(writer);
        task.await.unwrap();
        let all = reader.await.unwrap();
        let expected: Vec<u8> =
            (0..sent).flat_map(|i| vec![i as u8; 100]).chain(std::iter::repeat_n(0xEE, 100)).collect();
        assert_eq!(all, expected);
    }

    /// One read of what is on the socket now, without waiting (None: nothing there).
    fn read_now(client: &mut tokio::io::DuplexStream) -> Option<Vec<u8>> {
        use tokio::io::AsyncRead;
        let mut buf = [0u8; 1024];
        let mut read = tokio::io::ReadBuf::new(&mut buf);
        let waker = std::task::Waker::noop();
        match Pin::new(client).poll_read(&mut Context::from_waker(waker), &mut read) {
            Poll::Ready(Ok(())) => Some(read.filled().to_vec()),
            _ => None,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_writer_lets_the_connection_write_at_once_and_queues_only_what_the_socket_did_not_take() {
        let (mut client, server) = tokio::io::duplex(150);
        let settings = settings();
        let traffic = Arc::clone(&settings.traffic);
        let credit = Arc::clone(&settings.credit);
        let (writer, task) = Writer::spawn(server, settings);
        let stall = Duration::from_secs(5);
        // Nothing queued: the batch is written, and its credit back, before the writer task ever ran (one thread,
        // and `send` did not yield to it).
        credit.take(100);
        writer.send(Batch { credit: 100, ..batch(1) }, stall).await.unwrap();
        assert_eq!((credit.used(), traffic.send_pend()), (0, 0));
        // The socket takes 50 more bytes: half of the second batch is queued for the task with its credit, and
        // the third batch queues behind it, so nothing is reordered.
        credit.take(100);
        writer.send(Batch { credit: 100, ..batch(2) }, stall).await.unwrap();
        writer.send(batch(3), stall).await.unwrap();
        assert_eq!((credit.used(), traffic.send_pend()), (100, 150));
        let mut all = Vec::new();
        let read_all = async {
            while all.len() < 300 {
                match read_now(&mut client) {
                    Some(bytes) => all.extend(bytes),
                    None => tokio::task::yield_now().await, // the task writes once the socket has room
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read_all).await.expect("every batch arrives");
        let expected: Vec<u8> = [1u8, 2, 3].iter().flat_map(|&b| std::iter::repeat_n(b, 100)).collect();
        assert_eq!(all, expected);
        assert_eq!(credit.used(), 0);
        drop(writer);
        task.await.unwrap();
        assert_eq!(traffic.send_pend(), 0);
    }

    #[tokio::test]
    async fn a_failed_socket_ends_the_task_and_later_batches_are_refused() {
        let (client, server) = tokio::io::duplex(64);
        let settings = settings();
        let traffic = Arc::clone(&settings.traffic);
        let (writer, task) = Writer::spawn(server, settings);
        drop(client);
        // The first write fails; the task ends and the connection sees it.
        let _ = writer.send(batch(1), Duration::from_secs(1)).await;
        tokio::time::timeout(Duration::from_secs(5), writer.closed()).await.expect("the writer's end is seen");
        assert_eq!(writer.send(batch(2), Duration::from_secs(1)).await, Err(WriteError::Gone));
        task.await.unwrap();
        assert_eq!(traffic.send_pend(), 0, "nothing is left counted as queued");
    }
}
