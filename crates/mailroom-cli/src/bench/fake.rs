//! `--sink` / `--source`: an in-process fake broker, to measure the bench's own ceiling.
//!
//! It accepts the handshake and answers every synchronous method with its `-ok`, discards
//! publishes (acking them in batches when confirms are on) and, on `basic.consume` in source
//! mode, streams pre-encoded deliveries as fast as the socket takes them (prefetch is ignored).
//! It runs on plain blocking threads, off the bench's runtime, over real loopback TCP, so the
//! figures include the same syscalls a real broker connection costs.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{FieldTable, LongString};

use super::conn::{method, parse_method, READ_BUF};
use super::wire::{self, put_ack, Batch, Frame, ReadBuf, Scanner, Template};
use super::{now_ns, BenchError};

/// Bytes the source writes per `write` call: large enough to amortise the syscall.
const SOURCE_BATCH_BYTES: usize = 256 << 10;

/// A running fake broker.
#[derive(Debug)]
pub struct FakePeer {
    /// Where it listens (127.0.0.1, ephemeral port).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cpu_ticks: Arc<AtomicU64>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug, Clone)]
struct Config {
    /// Body size of streamed deliveries; `None` = not a source (consumes get no messages).
    source_size: Option<usize>,
    stop: Arc<AtomicBool>,
    cpu_ticks: Arc<AtomicU64>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FakePeer {
    /// Starts listening; `source_size` enables streaming deliveries of that body size.
    pub fn start(source_size: Option<usize>) -> io::Result<FakePeer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_ticks = Arc::new(AtomicU64::new(0));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let cfg = Config { source_size, stop: stop.clone(), cpu_ticks: cpu_ticks.clone(), threads: threads.clone() };
        let acceptor = std::thread::Builder::new().name("fake-accept".into()).spawn(move || {
            for s in listener.incoming() {
                if cfg.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(s) = s else { continue };
                let c = cfg.clone();
                let h = std::thread::Builder::new()
                    .name("fake-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(s, &c) {
                            if !c.stop.load(Ordering::Relaxed) {
                                eprintln!("fake peer: {e}");
                            }
                        }
                        c.cpu_ticks.fetch_add(super::cpu::thread_ticks(), Ordering::Relaxed);
                    })
                    .expect("spawn fake connection thread");
                cfg.threads.lock().unwrap().push(h);
            }
        })?;
        Ok(FakePeer { addr, stop, cpu_ticks, threads, acceptor: Some(acceptor) })
    }

    /// Stops accepting, waits for its connection threads and returns their CPU seconds.
    pub fn shutdown(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept() so the acceptor sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let hs: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for h in hs {
            let _ = h.join();
        }
        super::cpu::secs(self.cpu_ticks.load(Ordering::Relaxed))
    }
}

fn to_io(e: BenchError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Serves one client connection until it closes.
fn serve(mut s: TcpStream, cfg: &Config) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut header = [0u8; 8];
    s.read_exact(&mut header)?;
    if &header != b"AMQP\x00\x00\x09\x01" {
        return Err(io::Error::other("bad protocol header"));
    }
    let writer = Arc::new(Mutex::new(s.try_clone()?));
    writer.lock().unwrap().write_all(&method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable::default(),
            mechanisms: LongString::from("PLAIN"),
            locales: LongString::from("en_US"),
        })),
    ))?;
    let mut rbuf = ReadBuf::new(READ_BUF);
    let mut scanner = Scanner::new(wire::MAX_FRAME);
    let mut confirm_mode = false;
    let (mut published, mut confirmed) = (0u64, 0u64);
    let conn_stop = Arc::new(AtomicBool::new(false));
    let mut source: Option<JoinHandle<()>> = None;
    let mut replies = Vec::new();
    let mut closing = false;
    let result = loop {
        let n = match s.read(rbuf.spare()) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        rbuf.filled(n);
        let mut start_source = false;
        let used = scanner
            .scan(rbuf.data(), |f| {
                match f {
                    Frame::Published => published += 1,
                    Frame::Method { channel: ch, payload, .. } => {
                        let reply = respond(parse_method(payload)?, &mut confirm_mode, &mut start_source, &mut closing);
                        if let Some(r) = reply {
                            replies.extend_from_slice(&method(ch, r));
                        }
                    }
                    // Consumer acks and heartbeats need no answer.
                    _ => {}
                }
                Ok(())
            })
            .map_err(to_io)?;
        rbuf.consume(used);
        if confirm_mode && published > confirmed {
            // One multiple-ack per read: what a fast broker's group commit looks like.
            put_ack(&mut replies, 1, published, true);
            confirmed = published;
        }
        if closing {
            conn_stop.store(true, Ordering::Relaxed);
        }
        if !replies.is_empty() {
            writer.lock().unwrap().write_all(&replies)?;
            replies.clear();
        }
        if start_source && source.is_none() {
            if let Some(size) = cfg.source_size {
                let (w, stop, global) = (writer.clone(), conn_stop.clone(), cfg.stop.clone());
                let ticks = cfg.cpu_ticks.clone();
                source = Some(std::thread::Builder::new().name("fake-source".into()).spawn(move || {
                    let _ = stream_deliveries(&w, size, &stop, &global);
                    ticks.fetch_add(super::cpu::thread_ticks(), Ordering::Relaxed);
                })?);
            }
        }
        if closing {
            break Ok(());
        }
    };
    conn_stop.store(true, Ordering::Relaxed);
    if let Some(h) = source {
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = h.join();
    }
    result
}

/// The reply to one method from the client, if it needs one.
fn respond(m: AMQPClass, confirm_mode: &mut bool, start_source: &mut bool, closing: &mut bool) -> Option<AMQPClass> {
    use AMQPClass as C;
    Some(match m {
        C::Connection(connection::AMQPMethod::StartOk(_)) => {
            C::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: 2047,
                frame_max: wire::MAX_FRAME,
                heartbeat: 0,
            }))
        }
        C::Connection(connection::AMQPMethod::Open(_)) => {
            C::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {}))
        }
        C::Connection(connection::AMQPMethod::Close(_)) => {
            *closing = true;
            C::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}))
        }
        C::Channel(channel::AMQPMethod::Open(_)) => C::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        C::Channel(channel::AMQPMethod::Close(_)) => C::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        C::Confirm(confirm::AMQPMethod::Select(_)) => {
            *confirm_mode = true;
            C::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {}))
        }
        C::Basic(basic::AMQPMethod::Qos(_)) => C::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        C::Basic(basic::AMQPMethod::Consume(_)) => {
            *start_source = true;
            C::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk { consumer_tag: "amq.ctag-fake".into() }))
        }
        C::Queue(queue::AMQPMethod::Declare(d)) => C::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
            queue: d.queue,
            message_count: 0,
            consumer_count: 0,
        })),
        C::Queue(queue::AMQPMethod::Bind(_)) => C::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
        C::Queue(queue::AMQPMethod::Delete(_)) => {
            C::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk { message_count: 0 }))
        }
        C::Exchange(exchange::AMQPMethod::Declare(_)) => {
            C::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}))
        }
        C::Exchange(exchange::AMQPMethod::Delete(_)) => {
            C::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}))
        }
        _ => return None,
    })
}

/// Writes batches of deliveries until told to stop or the socket fails.
fn stream_deliveries(w: &Mutex<TcpStream>, size: usize, stop: &AtomicBool, global: &AtomicBool) -> io::Result<()> {
    let t = Template::deliver(1, "amq.ctag-fake", "", "bench", size, wire::MAX_FRAME);
    let mut batch = Batch::new(&t, (SOURCE_BATCH_BYTES / t.bytes.len()).max(1));
    let n = batch.capacity();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) && !global.load(Ordering::Relaxed) {
        let bytes = batch.fill(n, now_ns(), seq);
        w.lock().unwrap().write_all(bytes)?;
        seq += n as u64;
    }
    Ok(())
}
