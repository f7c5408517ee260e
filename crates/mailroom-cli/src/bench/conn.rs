//! The slow path of a bench connection: handshake and synchronous methods via amq-protocol.
//!
//! Everything here runs a handful of times per connection, so it favours correctness (amq-protocol
//! encodes and parses the methods) over speed. The read buffer is shared with the hot loops so no
//! bytes that arrive right after a reply (e.g. deliveries after `consume-ok`) are lost.

use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, parse_class, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::AMQPUri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{self, ReadBuf};
use super::BenchError;

/// Size of every connection's read buffer: large, so one read drains many deliveries.
pub const READ_BUF: usize = 4 << 20;

/// Encodes one frame with amq-protocol.
pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    match gen_frame(frame)(WriteContext::from(Vec::new())) {
        Ok(ctx) => ctx.write,
        // Only reachable with strings over 255 bytes, which we never build.
        Err(e) => panic!("encoding {frame:?}: {e:?}"),
    }
}

/// Encodes a method frame on `channel`.
pub fn method(channel: u16, class: AMQPClass) -> Vec<u8> {
    encode(&AMQPFrame::Method(channel, class))
}

/// Parses a method payload (class id onwards) with amq-protocol.
pub fn parse_method(payload: &[u8]) -> Result<AMQPClass, BenchError> {
    parse_class(payload).map(|(_, m)| m).map_err(|e| BenchError::Protocol(format!("unparsable method: {e:?}")))
}

/// A client connection with one channel open (channel 1).
#[derive(Debug)]
pub struct Conn {
    /// The socket; hot loops split it after setup.
    pub stream: TcpStream,
    /// Bytes read but not yet consumed, shared with the hot loops.
    pub rbuf: ReadBuf,
    /// Negotiated maximum frame size.
    pub frame_max: u32,
}

/// The channel every bench connection uses.
pub const CH: u16 = 1;

impl Conn {
    /// Connects, runs the handshake with PLAIN credentials from the URI and opens channel 1.
    pub async fn open(uri: &AMQPUri) -> Result<Conn, BenchError> {
        let stream = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port)).await?;
        // Latency runs write one small batch at a time; Nagle would hold them back.
        stream.set_nodelay(true)?;
        let mut c = Conn { stream, rbuf: ReadBuf::new(READ_BUF), frame_max: wire::MAX_FRAME };
        c.stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        match c.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(_)) => {}
            other => return Err(unexpected("connection.start", &other)),
        }
        let mut props = FieldTable::default();
        props.insert("product".into(), AMQPValue::LongString("mailroom-bench".into()));
        // Without this capability RabbitMQ drops the socket on bad credentials instead of
        // sending connection.close 403, leaving the user a bare "connection reset".
        let mut caps = FieldTable::default();
        caps.insert("authentication_failure_close".into(), AMQPValue::Boolean(true));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        let user = &uri.authority.userinfo;
        let response = format!("\0{}\0{}", user.username, user.password);
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let tune = match c.next_method(0).await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            other => return Err(unexpected("connection.tune", &other)),
        };
        c.frame_max = wire::effective_frame_max(tune.frame_max);
        // Heartbeat 0: the bench never idles long, and heartbeats would need a timer in hot loops.
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: c.frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        let vhost = ShortString::from(uri.vhost.as_str());
        c.call(0, AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open { virtual_host: vhost })))
            .await?;
        c.call(CH, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await?;
        Ok(c)
    }

    /// Writes one method frame.
    pub async fn send(&mut self, ch: u16, m: AMQPClass) -> Result<(), BenchError> {
        self.stream.write_all(&method(ch, m)).await?;
        Ok(())
    }

    /// Sends a synchronous method and returns the next method on that channel (its reply).
    pub async fn call(&mut self, ch: u16, m: AMQPClass) -> Result<AMQPClass, BenchError> {
        self.send(ch, m).await?;
        self.next_method(ch).await
    }

    /// Reads until a method frame for `ch` arrives; turns a close from the broker into an error.
    ///
    /// Deliveries arriving meanwhile would be lost, so this is only used before consuming starts.
    pub async fn next_method(&mut self, ch: u16) -> Result<AMQPClass, BenchError> {
        loop {
            let mut found = None;
            // Take at most one method, so any later bytes stay buffered for the caller.
            let data = self.rbuf.data();
            let mut pos = 0;
            while let Some(end) = frame_end(&data[pos..]) {
                let f = &data[pos..pos + end];
                pos += end;
                if f[end - 1] != wire::FRAME_END {
                    return Err(BenchError::Protocol("bad frame end octet".into()));
                }
                if f[0] == wire::FRAME_METHOD {
                    let channel = u16::from_be_bytes([f[1], f[2]]);
                    found = Some((channel, parse_method(&f[7..end - 1])?));
                    break;
                }
            }
            self.rbuf.consume(pos);
            if let Some((channel, m)) = found {
                check_close(&m)?;
                if channel == ch {
                    return Ok(m);
                }
                continue;
            }
            let n = self.stream.read(self.rbuf.spare()).await?;
            if n == 0 {
                return Err(BenchError::Protocol("connection closed by peer".into()));
            }
            self.rbuf.filled(n);
        }
    }

    /// Declares a queue (durable if messages are persistent) and returns its name.
    pub async fn declare_queue(&mut self, name: &str, durable: bool, auto_delete: bool) -> Result<(), BenchError> {
        self.call(
            CH,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: name.into(),
                passive: false,
                durable,
                exclusive: false,
                auto_delete,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await?;
        Ok(())
    }

    /// Declares a fanout exchange and binds `queues` to it.
    pub async fn declare_fanout(&mut self, name: &str, durable: bool, queues: &[String]) -> Result<(), BenchError> {
        self.call(
            CH,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: name.into(),
                kind: "fanout".into(),
                passive: false,
                durable,
                auto_delete: true,
                internal: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await?;
        for q in queues {
            self.call(
                CH,
                AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                    queue: q.as_str().into(),
                    exchange: name.into(),
                    routing_key: "".into(),
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            )
            .await?;
        }
        Ok(())
    }

    /// Deletes a queue; "not found" is fine (auto-delete may have beaten us to it).
    pub async fn delete_queue(&mut self, name: &str) -> Result<(), BenchError> {
        let r = self
            .call(
                CH,
                AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                    queue: name.into(),
                    if_unused: false,
                    if_empty: false,
                    nowait: false,
                })),
            )
            .await;
        self.tolerate_not_found(r).await
    }

    /// Deletes an exchange; "not found" is fine (it is auto-delete).
    pub async fn delete_exchange(&mut self, name: &str) -> Result<(), BenchError> {
        let r = self
            .call(
                CH,
                AMQPClass::Exchange(exchange::AMQPMethod::Delete(exchange::Delete {
                    exchange: name.into(),
                    if_unused: false,
                    nowait: false,
                })),
            )
            .await;
        self.tolerate_not_found(r).await
    }

    async fn tolerate_not_found(&mut self, r: Result<AMQPClass, BenchError>) -> Result<(), BenchError> {
        match r {
            Ok(_) => Ok(()),
            Err(BenchError::Closed { code: 404, channel: true, .. }) => {
                // The broker closed the channel: acknowledge and reopen it for the next call.
                self.send(CH, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))).await?;
                self.call(CH, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sets the channel's prefetch (0 = unlimited).
    pub async fn qos(&mut self, prefetch: u16) -> Result<(), BenchError> {
        self.call(CH, AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: prefetch, global: false })))
            .await?;
        Ok(())
    }

    /// Puts the channel in publisher-confirm mode.
    pub async fn confirm_select(&mut self) -> Result<(), BenchError> {
        self.call(CH, AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false }))).await?;
        Ok(())
    }

    /// Starts consuming; deliveries may follow `consume-ok` in the same read.
    pub async fn consume(&mut self, queue: &str, no_ack: bool) -> Result<(), BenchError> {
        self.call(
            CH,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: queue.into(),
                consumer_tag: "".into(),
                no_local: false,
                no_ack,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await?;
        Ok(())
    }

    /// Closes the connection politely and waits (briefly) for `close-ok`, discarding deliveries.
    pub async fn close(mut self) -> Result<(), BenchError> {
        self.send(0, close_frame()).await?;
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            drain_until_close_ok(&mut self.stream, &mut self.rbuf, self.frame_max),
        )
        .await;
        Ok(())
    }
}

/// The `connection.close` method the bench sends when it is done.
pub fn close_frame() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: 200,
        reply_text: "bench done".into(),
        class_id: 0,
        method_id: 0,
    }))
}

/// Reads and discards frames until `connection.close-ok` (or EOF).
pub async fn drain_until_close_ok<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    rbuf: &mut ReadBuf,
    frame_max: u32,
) -> Result<(), BenchError> {
    // A fresh scanner would choke on the middle of a message, so skip raw frames instead.
    let _ = frame_max;
    loop {
        let mut done = false;
        let mut pos = 0;
        let data = rbuf.data();
        while let Some(end) = frame_end(&data[pos..]) {
            let f = &data[pos..pos + end];
            // connection.close-ok: method frame on channel 0, class 10, method 51.
            if f[0] == wire::FRAME_METHOD && f.len() >= 11 && f[1..3] == [0, 0] && f[7..11] == [0, 10, 0, 51] {
                done = true;
            }
            pos += end;
        }
        rbuf.consume(pos);
        if done {
            return Ok(());
        }
        let n = r.read(rbuf.spare()).await?;
        if n == 0 {
            return Ok(());
        }
        rbuf.filled(n);
    }
}

/// Length of the first complete frame in `data`, if there is one.
pub fn frame_end(data: &[u8]) -> Option<usize> {
    if data.len() < 7 {
        return None;
    }
    let size = u32::from_be_bytes([data[3], data[4], data[5], data[6]]) as usize;
    let len = 7 + size + 1;
    (data.len() >= len).then_some(len)
}

/// Turns a `channel.close` or `connection.close` from the broker into an error.
pub fn check_close(m: &AMQPClass) -> Result<(), BenchError> {
    match m {
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
            Err(BenchError::Closed { code: c.reply_code, text: c.reply_text.to_string(), channel: true })
        }
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            Err(BenchError::Closed { code: c.reply_code, text: c.reply_text.to_string(), channel: false })
        }
        _ => Ok(()),
    }
}

fn unexpected(want: &str, got: &AMQPClass) -> BenchError {
    BenchError::Protocol(format!("expected {want}, got {got:?}"))
}
