//! The publishing hot loop: one pre-filled batch buffer, patched and written whole.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{connection, AMQPClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::watch;

use super::conn::{self, check_close, parse_method, Conn, CH};
use super::histogram::Histogram;
use super::pacer::Pacer;
use super::wire::{Batch, Frame, ReadBuf, Scanner, Template};
use super::{now_ns, BenchError, Shared};

/// How long to wait for outstanding confirms after the last publish before giving up.
pub(super) const CONFIRM_DRAIN: Duration = Duration::from_secs(30);
/// How long to wait for `close-ok`, i.e. for a flow-controlled broker to read our backlog.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(60);

/// What one producer is asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Exchange to publish to ("" = default exchange).
    pub exchange: String,
    /// Routing key (the queue name for the default exchange).
    pub routing_key: String,
    /// Body size in bytes.
    pub size: usize,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Publisher-confirm window, if confirms are on.
    pub confirm: Option<u64>,
    /// Messages to send, or unlimited.
    pub quota: Option<u64>,
    /// This producer's share of `--rate` in msg/s; 0 = as fast as possible.
    pub rate: f64,
    /// The step of the pacing grid (`--tick-us`): rate-paced writes happen on its ticks from the start.
    pub tick: Duration,
    /// Target bytes per write.
    pub batch_bytes: usize,
}

/// A connected producer, ready to start.
#[derive(Debug)]
pub struct Producer {
    conn: Conn,
    plan: Plan,
}

/// Result of one producer.
#[derive(Debug, Default, Clone)]
pub struct ProducerStats {
    /// Messages written (and confirmed, with confirms on).
    pub published: u64,
    /// Messages the broker nacked.
    pub nacked: u64,
    /// When the last message was written (or confirmed).
    pub end: Option<Instant>,
    /// Publish-to-confirm latency in ns (with confirms), measured per write batch: from the write to the
    /// confirm that covers the batch's last message.
    pub confirm_latency: Histogram,
}

impl Producer {
    /// Connects and enables confirms if asked; done before the clock starts.
    pub async fn setup(uri: &amq_protocol::uri::AMQPUri, plan: Plan) -> Result<Producer, BenchError> {
        let mut conn = Conn::open(uri).await?;
        if plan.confirm.is_some() {
            conn.confirm_select().await?;
        }
        Ok(Producer { conn, plan })
    }

    /// Publishes until the quota, the deadline or a stop, then closes the connection.
    pub async fn run(
        self,
        shared: Arc<Shared>,
        start: Instant,
        deadline: Option<Instant>,
    ) -> Result<ProducerStats, BenchError> {
        let Producer { conn, plan } = self;
        let frame_max = conn.frame_max;
        let Conn { stream, rbuf, .. } = conn;
        let mut pacer =
            if plan.rate > 0.0 { Some(Pacer::grid(start, pacing_interval(plan.rate, plan.tick))?) } else { None };
        let (r, mut w) = stream.into_split();
        let (confirm_tx, mut confirm_rx) = watch::channel((0u64, 0u64));
        // (last sequence number of a write batch, its write time): for the confirm latency.
        let (written_tx, written_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
        let reader = tokio::spawn(read_confirms(r, rbuf, frame_max, confirm_tx, written_rx));

        let t = Template::publish(CH, &plan.exchange, &plan.routing_key, plan.size, plan.persistent, frame_max);
        let mut batch = Batch::new(&t, (plan.batch_bytes / t.bytes.len()).max(1));
        let stop = shared.stop.subscribe();
        let mut sent = 0u64;
        let mut result: Result<(), BenchError> = Ok(());
        loop {
            // A finished reader means the broker closed the channel or connection: stop early.
            if *stop.borrow() || reader.is_finished() {
                break;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            let mut n = batch.capacity() as u64;
            if let Some(q) = plan.quota {
                n = n.min(q - sent);
                if n == 0 {
                    break;
                }
            }
            if let Some(pacer) = pacer.as_mut() {
                // Messages due by now minus messages sent; with none due, wait for the grid's next tick (at high
                // rates a write per tick carries the messages due in it; a grid from the start, so the wake-ups'
                // lateness never adds up into a double write).
                let due = ((now - start).as_secs_f64() * plan.rate) as u64 + 1;
                if due <= sent {
                    if let Err(e) = pacer.tick(deadline).await {
                        result = Err(e.into());
                        break;
                    }
                    continue;
                }
                n = n.min(due - sent);
            }
            if let Some(window) = plan.confirm {
                let confirmed = confirm_rx.borrow().0;
                let inflight = sent - confirmed.min(sent);
                if inflight >= window {
                    let wait = confirm_rx.changed();
                    let r = match deadline {
                        Some(d) => tokio::time::timeout_at(d.into(), wait).await.unwrap_or(Ok(())),
                        None => wait.await,
                    };
                    if r.is_err() {
                        // The reader ended: the broker closed on us; its error is reported below.
                        break;
                    }
                    continue;
                }
                n = n.min(window - inflight);
            }
            let stamp = now_ns();
            let bytes = batch.fill(n as usize, stamp, sent);
            if let Err(e) = w.write_all(bytes).await {
                result = Err(e.into());
                break;
            }
            sent += n;
            if plan.confirm.is_some() {
                let _ = written_tx.send((sent, stamp));
            }
            if plan.confirm.is_none() {
                shared.published.fetch_add(n, Ordering::Relaxed);
            }
        }
        drop(written_tx);
        let mut stats = ProducerStats {
            published: sent,
            end: Some(Instant::now()),
            nacked: 0,
            confirm_latency: Histogram::default(),
        };
        if result.is_ok() && plan.confirm.is_some() {
            count_confirmed(&mut stats, sent, &mut confirm_rx, &shared).await;
        }
        // Close and wait for close-ok: the broker answers only after reading every publish before
        // it, so this is when the messages left our socket buffers; dropping the socket earlier
        // would discard the ones a flow-controlled broker has not read yet.
        let _ = w.write_all(&conn::method(0, conn::close_frame())).await;
        let read_result = match tokio::time::timeout(CLOSE_WAIT, reader).await {
            Ok(Ok(Ok((true, latency)))) => {
                if plan.confirm.is_none() {
                    stats.end = Some(Instant::now());
                }
                stats.confirm_latency = latency;
                Ok(())
            }
            Ok(Ok(Ok((false, latency)))) => {
                stats.confirm_latency = latency;
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(e)) => Err(BenchError::Protocol(format!("confirm reader panicked: {e}"))),
            Err(_) => {
                eprintln!("bench: no close-ok from the broker after {CLOSE_WAIT:?}");
                Ok(())
            }
        };
        result?;
        read_result?;
        Ok(stats)
    }
}

/// With confirms, a message counts as published once the broker vouched for it: waits (at most
/// [`CONFIRM_DRAIN`]) for the confirms of the `sent` messages, then counts the confirmed ones.
pub(super) async fn count_confirmed(
    stats: &mut ProducerStats,
    sent: u64,
    confirm_rx: &mut watch::Receiver<(u64, u64)>,
    shared: &Shared,
) {
    let _ = tokio::time::timeout(CONFIRM_DRAIN, confirm_rx.wait_for(|c| c.0 >= sent)).await;
    let (confirmed, nacked) = *confirm_rx.borrow();
    stats.published = confirmed.min(sent) - nacked.min(confirmed);
    stats.nacked = nacked;
    stats.end = Some(Instant::now());
    shared.published.fetch_add(stats.published, Ordering::Relaxed);
}

/// Reads confirms (and errors) off the producer's socket; publishes `(confirmed, nacked)`.
///
/// Returns whether it saw `connection.close-ok` (as opposed to the socket just closing), and the confirm
/// latencies of the write batches announced on `written` (last sequence number, write time).
pub(super) async fn read_confirms(
    mut r: OwnedReadHalf,
    mut rbuf: ReadBuf,
    frame_max: u32,
    tx: watch::Sender<(u64, u64)>,
    mut written: tokio::sync::mpsc::UnboundedReceiver<(u64, u64)>,
) -> Result<(bool, Histogram), BenchError> {
    let mut latency = Histogram::default();
    // Write batches not yet wholly confirmed: (first seq, last seq, write time).
    let mut batches = std::collections::VecDeque::new();
    let mut next_first = 1u64;
    let mut scanner = Scanner::new(frame_max);
    let mut upto = 0u64;
    let mut nacked = 0u64;
    // Single (non-multiple) acks can arrive out of order; hold those above the contiguous prefix.
    let mut ahead = BTreeSet::new();
    loop {
        let mut closed = false;
        let mut changed = false;
        let used = scanner.scan(rbuf.data(), |f| {
            match f {
                Frame::Confirm { tag, multiple, nack } => {
                    let before = upto;
                    if multiple {
                        upto = upto.max(tag);
                    } else if tag == upto + 1 {
                        upto = tag;
                    } else if tag > upto {
                        ahead.insert(tag);
                    }
                    while ahead.first().is_some_and(|&t| t <= upto + 1) {
                        let t = ahead.pop_first().unwrap();
                        upto = upto.max(t);
                    }
                    if nack {
                        nacked += if multiple { upto - before } else { 1 };
                    }
                    changed = true;
                }
                Frame::Method { payload, .. } => {
                    let m = parse_method(payload)?;
                    match m {
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => closed = true,
                        AMQPClass::Connection(connection::AMQPMethod::Blocked(ref b)) => {
                            eprintln!("bench: broker blocked publishers: {}", b.reason);
                        }
                        _ => check_close(&m)?,
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        rbuf.consume(used);
        if changed {
            let _ = tx.send((upto, nacked));
            let now = now_ns();
            while let Ok((last, at)) = written.try_recv() {
                batches.push_back((next_first, last, at));
                next_first = last + 1;
            }
            while let Some(&(first, last, at)) = batches.front() {
                if last > upto {
                    break;
                }
                latency.record_n(now.saturating_sub(at), last + 1 - first);
                batches.pop_front();
            }
        }
        if closed {
            return Ok((true, latency));
        }
        let n = r.read(rbuf.spare()).await?;
        if n == 0 {
            return Ok((false, latency));
        }
        rbuf.filled(n);
    }
}

/// The pacing grid's step: `--tick-us`, or as many whole ticks as fit between two messages at low rates (so a
/// slow producer does not wake every tick for nothing).
fn pacing_interval(rate: f64, tick: Duration) -> Duration {
    let tick = tick.max(Duration::from_micros(1));
    // The epsilon keeps a whole ratio whole through the float division (1,000 msg/s and 1 ms: one tick).
    let ticks_per_message = (1.0 / (rate * tick.as_secs_f64()) + 1e-9).floor().max(1.0);
    tick.mul_f64(ticks_per_message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacing_grid_is_the_tick_or_whole_ticks_between_messages() {
        let ms = Duration::from_millis(1);
        assert_eq!(pacing_interval(1_000.0, ms), ms);
        assert_eq!(pacing_interval(100_000.0, ms), ms);
        assert_eq!(pacing_interval(300.0, ms), 3 * ms);
        assert_eq!(pacing_interval(0.5, ms), 2_000 * ms);
    }
}
