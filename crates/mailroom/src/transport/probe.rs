//! Which broker is behind a URL: lapin does not expose the server's `connection.start` properties, so
//! the transport reads them itself from a throwaway socket (protocol header, one frame, close).
//!
//! Mailroom reports `product = "RabbitMQ"` (clients such as kombu key RabbitMQ semantics off it) and
//! `platform = "Mailroom <version> (Rust)"`; the platform tells the SDK it can use the built-in
//! delayed-message exchange. Any failure (TLS, timeout, odd frame) answers "unknown", and the SDK
//! falls back to what every broker has (TTL retry queues).

use lapin::protocol::{connection::AMQPMethod, parse_class, AMQPClass};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::{AMQPScheme, AMQPUri};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest `connection.start` frame we accept (its properties are a few hundred bytes).
const MAX_START_FRAME: usize = 64 * 1024;
/// How long the probe may take before the answer is "unknown".
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `server_properties` of the broker at `url`, or `None` if they could not be read.
pub(crate) async fn server_properties(url: &str) -> Option<FieldTable> {
    let uri: AMQPUri = url.parse().ok()?;
    if uri.scheme != AMQPScheme::AMQP {
        return None;
    }
    tokio::time::timeout(PROBE_TIMEOUT, read_start(&uri.authority.host, uri.authority.port)).await.ok()?
}

async fn read_start(host: &str, port: u16) -> Option<FieldTable> {
    let mut socket = TcpStream::connect((host, port)).await.ok()?;
    socket.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
    let mut header = [0u8; 7];
    socket.read_exact(&mut header).await.ok()?;
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    if header[0] != 1 || size > MAX_START_FRAME {
        return None;
    }
    let mut payload = vec![0u8; size + 1];
    socket.read_exact(&mut payload).await.ok()?;
    payload.pop(); // frame-end octet
    drop(socket);
    match parse_class(&payload[..]) {
        Ok((_, AMQPClass::Connection(AMQPMethod::Start(start)))) => Some(start.server_properties),
        _ => None,
    }
}

/// Whether these server properties are Mailroom's (its `platform` starts with "Mailroom").
pub(crate) fn is_mailroom(props: &FieldTable) -> bool {
    match props.inner().get("platform") {
        Some(AMQPValue::LongString(s)) => s.to_string().starts_with("Mailroom"),
        Some(AMQPValue::ShortString(s)) => s.as_str().starts_with("Mailroom"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_mailroom_by_platform() {
        let mut props = FieldTable::default();
        props.insert("product".into(), AMQPValue::LongString("RabbitMQ".into()));
        props.insert("platform".into(), AMQPValue::LongString("Erlang/OTP 24.3".into()));
        assert!(!is_mailroom(&props));
        props.insert("platform".into(), AMQPValue::LongString("Mailroom 0.1.0 (Rust)".into()));
        assert!(is_mailroom(&props));
        assert!(!is_mailroom(&FieldTable::default()));
    }

    #[tokio::test]
    async fn unreachable_or_tls_brokers_are_unknown() {
        assert!(server_properties("amqps://guest:guest@127.0.0.1:1/%2F").await.is_none());
        assert!(server_properties("amqp://guest:guest@127.0.0.1:1/%2F").await.is_none());
        assert!(server_properties("not a url").await.is_none());
    }
}
