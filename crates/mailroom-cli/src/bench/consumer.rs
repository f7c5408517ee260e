//! The consuming hot loop: scan deliveries straight out of a large read buffer.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use amq_protocol::protocol::{basic, AMQPClass};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::conn::{self, check_close, parse_method, Conn, CH};
use super::histogram::Histogram;
use super::wire::{put_ack, Frame, Scanner};
use super::{now_ns, BenchError, Shared};

/// A connected consumer, subscribed before the clock starts.
#[derive(Debug)]
pub struct Consumer {
    conn: Conn,
    auto_ack: bool,
    ack_every: u64,
}

/// Result of one consumer.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages received.
    pub consumed: u64,
    /// Publish-to-receive latency in ns.
    pub latency: Histogram,
    /// When the last message arrived.
    pub last: Option<Instant>,
}

impl Consumer {
    /// Connects, sets prefetch and subscribes to `queue`.
    pub async fn setup(
        uri: &amq_protocol::uri::AMQPUri,
        queue: &str,
        prefetch: u16,
        auto_ack: bool,
        ack_every: u64,
    ) -> Result<Consumer, BenchError> {
        let mut conn = Conn::open(uri).await?;
        if prefetch > 0 {
            conn.qos(prefetch).await?;
        }
        conn.consume(queue, auto_ack).await?;
        // Acking less often than prefetch allows would stall the consumer forever.
        let ack_every = if prefetch > 0 { ack_every.clamp(1, prefetch as u64) } else { ack_every.max(1) };
        Ok(Consumer { conn, auto_ack, ack_every })
    }

    /// Consumes until stopped, then closes the connection.
    pub async fn run(self, shared: Arc<Shared>) -> Result<ConsumerStats, BenchError> {
        let Consumer { conn, auto_ack, ack_every } = self;
        let Conn { mut stream, mut rbuf, frame_max } = conn;
        let mut scanner = Scanner::new(frame_max);
        let mut stats = ConsumerStats::default();
        let mut stop = shared.stop.subscribe();
        let mut acks = Vec::with_capacity(64 << 10);
        let mut unacked = 0u64;
        loop {
            // One clock reading per read: every message in it arrived at the same moment.
            let now = now_ns();
            let mut got = 0u64;
            let used = scanner.scan(rbuf.data(), |f| {
                match f {
                    Frame::Delivery { tag, stamp, .. } => {
                        got += 1;
                        if let Some(s) = stamp {
                            stats.latency.record(now.saturating_sub(s));
                        }
                        if !auto_ack {
                            unacked += 1;
                            if unacked >= ack_every {
                                put_ack(&mut acks, CH, tag, ack_every > 1);
                                unacked = 0;
                            }
                        }
                    }
                    Frame::Method { payload, .. } => {
                        let m = parse_method(payload)?;
                        check_close(&m)?;
                        if let AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) = m {
                            return Err(BenchError::Protocol("broker cancelled the consumer".into()));
                        }
                    }
                    _ => {}
                }
                Ok(())
            })?;
            rbuf.consume(used);
            if got > 0 {
                stats.consumed += got;
                stats.last = Some(Instant::now());
                let total = shared.consumed.fetch_add(got, Ordering::Relaxed) + got;
                if total >= shared.target.load(Ordering::Relaxed) {
                    let _ = shared.stop.send(true);
                }
            }
            if !acks.is_empty() {
                // All acks of one read leave in one write.
                stream.write_all(&acks).await?;
                acks.clear();
            }
            if *stop.borrow_and_update() {
                break;
            }
            tokio::select! {
                biased;
                r = stream.read(rbuf.spare()) => {
                    let n = r?;
                    if n == 0 {
                        return Err(BenchError::Protocol("broker closed the connection".into()));
                    }
                    rbuf.filled(n);
                }
                _ = stop.changed() => break,
            }
        }
        // Unacked messages go back to the queue on close; the queue is deleted anyway.
        let _ = stream.write_all(&conn::method(0, conn::close_frame())).await;
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            conn::drain_until_close_ok(&mut stream, &mut rbuf, frame_max),
        )
        .await;
        Ok(stats)
    }
}
