//! `mailroom bench --delayed MAX_MS`: delay accuracy of an `x-delayed-message` exchange.
//!
//! Producers publish as fast as they can with `x-delay` drawn uniformly from `[--delay-min-ms, MAX_MS]`,
//! each body stamped with its *due* time (publish time plus delay) instead of its publish time, so the
//! ordinary consumers' latency histogram measures lateness: receive time minus due time. The stamp is
//! taken when the message is encoded, before it is written, so lateness includes the client's buffering
//! and the network: it is never understated. Each message has its own headers, so publishes are encoded
//! one by one (amq-protocol) instead of patched into a template; at a few µs each that is still far
//! faster than the rate at which messages fall due.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{basic, exchange, queue, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::conn::{self, Conn, CH};
use super::producer::{count_confirmed, read_confirms, ProducerStats, CLOSE_WAIT};
use super::wire::{self, BODY_STAMP_LEN};
use super::{now_ns, BenchError, Shared};

/// Bytes encoded before one write: small, so a message's stamp is at most this far ahead of its send.
const WRITE_BYTES: usize = 64 << 10;

/// What one delayed producer sends.
#[derive(Debug, Clone)]
pub struct DelayedPlan {
    /// The delayed exchange.
    pub exchange: String,
    /// Routing key the queue is bound with.
    pub routing_key: String,
    /// Body size (at least the 16-byte stamp).
    pub size: usize,
    /// delivery-mode 2.
    pub persistent: bool,
    /// Messages to send.
    pub quota: u64,
    /// Publisher-confirm window, if confirms are on.
    pub confirm: Option<u64>,
    /// Smallest and largest `x-delay`, in ms.
    pub delay_ms: (u64, u64),
    /// Seed of this producer's delays.
    pub seed: u64,
}

/// Declares the delayed exchange (routing as `direct`) and binds `queue` to it with key `queue`.
pub async fn declare(setup: &mut Conn, name: &str, durable: bool, queue: &str) -> Result<(), BenchError> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-delayed-type".into(), AMQPValue::LongString("direct".into()));
    setup
        .call(
            CH,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: name.into(),
                kind: "x-delayed-message".into(),
                passive: false,
                durable,
                auto_delete: false,
                internal: false,
                nowait: false,
                arguments,
            })),
        )
        .await?;
    setup
        .call(
            CH,
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: queue.into(),
                exchange: name.into(),
                routing_key: queue.into(),
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await?;
    Ok(())
}

/// xorshift64*: reproducible delays without a dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Appends one publish (method, header with `x-delay`, body frames) stamped with its due time.
fn encode_publish(out: &mut Vec<u8>, plan: &DelayedPlan, frame_max: u32, delay_ms: u64, seq: u64) {
    let due_ns = now_ns() + delay_ms * 1_000_000;
    let publish = basic::Publish {
        exchange: plan.exchange.as_str().into(),
        routing_key: plan.routing_key.as_str().into(),
        mandatory: false,
        immediate: false,
    };
    out.extend(conn::method(CH, AMQPClass::Basic(basic::AMQPMethod::Publish(publish))));
    let mut headers = FieldTable::default();
    headers.insert("x-delay".into(), AMQPValue::LongLongInt(delay_ms as i64));
    let properties =
        BasicProperties::default().with_headers(headers).with_delivery_mode(if plan.persistent { 2 } else { 1 });
    let header = AMQPContentHeader { class_id: wire::CLASS_BASIC, body_size: plan.size as u64, properties };
    out.extend(conn::encode(&AMQPFrame::Header(CH, header)));
    let mut body = vec![b'd'; plan.size];
    body[..8].copy_from_slice(&due_ns.to_be_bytes());
    body[8..BODY_STAMP_LEN].copy_from_slice(&seq.to_be_bytes());
    let chunk = wire::effective_frame_max(frame_max) as usize - wire::FRAME_OVERHEAD;
    for part in body.chunks(chunk) {
        out.extend(conn::encode(&AMQPFrame::Body(CH, part.to_vec())));
    }
}

/// Publishes `plan.quota` delayed messages as fast as the socket (and the confirm window) allows, then
/// closes and waits for `close-ok`, i.e. until the broker has read every publish.
pub async fn produce(conn: Conn, plan: DelayedPlan, shared: Arc<Shared>) -> Result<ProducerStats, BenchError> {
    let frame_max = conn.frame_max;
    let Conn { stream, rbuf, .. } = conn;
    let (r, mut w) = stream.into_split();
    let (confirm_tx, mut confirm_rx) = watch::channel((0u64, 0u64));
    // No confirm-latency figure here (lateness is the measure): the batch channel stays empty.
    let (_written_tx, written_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let reader = tokio::spawn(read_confirms(r, rbuf, frame_max, confirm_tx, written_rx));
    let mut rng = plan.seed | 1;
    let (lo, hi) = plan.delay_ms;
    let mut buf = Vec::with_capacity(WRITE_BYTES + plan.size + 512);
    let mut sent = 0u64;
    let stop = shared.stop.subscribe();
    let mut result: Result<(), BenchError> = Ok(());
    while sent < plan.quota && !*stop.borrow() && !reader.is_finished() {
        let mut limit = plan.quota - sent;
        if let Some(window) = plan.confirm {
            let inflight = sent - confirm_rx.borrow().0.min(sent);
            if inflight >= window {
                if confirm_rx.changed().await.is_err() {
                    break; // the reader ended: the broker closed on us; reported below
                }
                continue;
            }
            limit = limit.min(window - inflight);
        }
        let mut n = 0;
        while n < limit && buf.len() < WRITE_BYTES {
            let delay = lo + next_random(&mut rng) % (hi - lo + 1);
            encode_publish(&mut buf, &plan, frame_max, delay, sent + n);
            n += 1;
        }
        if let Err(e) = w.write_all(&buf).await {
            result = Err(e.into());
            break;
        }
        buf.clear();
        sent += n;
        if plan.confirm.is_none() {
            shared.published.fetch_add(n, Ordering::Relaxed);
        }
    }
    let mut stats =
        ProducerStats { published: sent, nacked: 0, end: Some(Instant::now()), confirm_latency: Default::default() };
    if result.is_ok() && plan.confirm.is_some() {
        count_confirmed(&mut stats, sent, &mut confirm_rx, &shared).await;
    }
    let _ = w.write_all(&conn::method(0, conn::close_frame())).await;
    let read_result = match tokio::time::timeout(CLOSE_WAIT, reader).await {
        Ok(Ok(r)) => r.map(|_| ()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::wire::{Frame, Scanner};

    #[test]
    fn publish_carries_the_delay_header_and_the_due_stamp() {
        let plan = DelayedPlan {
            exchange: "dx".into(),
            routing_key: "q".into(),
            size: 40,
            persistent: true,
            quota: 1,
            confirm: None,
            delay_ms: (0, 0),
            seed: 1,
        };
        let before = now_ns();
        let mut out = Vec::new();
        encode_publish(&mut out, &plan, wire::MAX_FRAME, 1500, 7);
        let after = now_ns();
        // Method frame, then the content header: parse the header's properties back.
        let method_len = conn::frame_end(&out).unwrap();
        let header_len = conn::frame_end(&out[method_len..]).unwrap();
        let payload = &out[method_len + 7..method_len + header_len - 1];
        let (_, props) = amq_protocol::protocol::basic::parse_properties(&payload[12..]).unwrap();
        let delay = props.headers().as_ref().unwrap().inner().get("x-delay").cloned();
        assert_eq!(delay, Some(AMQPValue::LongLongInt(1500)));
        assert_eq!(props.delivery_mode(), &Some(2));
        let body = &out[method_len + header_len + 7..method_len + header_len + 7 + 40];
        let due = u64::from_be_bytes(body[..8].try_into().unwrap());
        assert!(due >= before + 1_500_000_000 && due <= after + 1_500_000_000);
        assert_eq!(u64::from_be_bytes(body[8..16].try_into().unwrap()), 7);
        // The bench's scanner sees one publish, nothing malformed.
        let mut scanner = Scanner::new(wire::MAX_FRAME);
        let used = scanner.scan(&out, |_f: Frame<'_>| Ok(())).unwrap();
        assert_eq!(used, out.len());
    }

    #[test]
    fn delays_cover_the_range_uniformly() {
        let mut rng = 42u64;
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[(next_random(&mut rng) % 10_001 / 1001) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (9_000..11_000).contains(&b)), "{buckets:?}");
    }
}
