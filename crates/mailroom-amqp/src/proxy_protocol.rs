//! The PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy specifies it and RabbitMQ's
//! `proxy_protocol` accepts it: the header a load balancer writes before the client's bytes (before the
//! AMQP protocol header, and before the TLS handshake on an AMQPS listener), naming the client's real
//! address. A listener with `--proxy-protocol` requires it: a connection without a valid header is closed.
//!
//! Only the header is read, never a byte past it, so what follows is the client's own stream. Reading is
//! bounded in time ([`HEADER_TIMEOUT`]) and size ([`V1_MAX_LEN`], [`V2_MAX_LEN`]); nothing is allocated by a
//! length the peer announced.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// How long the proxy has to send its header after connecting.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest v1 header, CRLF included (the specification's bound: `PROXY TCP6` with two full addresses).
pub const V1_MAX_LEN: usize = 107;
/// Longest v2 header we accept, TLVs included: the 16 fixed bytes, 36 of IPv6 addresses, and room for
/// the TLVs proxies add (ALPN, authority, unique id, SSL details). Longer headers are refused.
pub const V2_MAX_LEN: usize = 1024;
/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED_LEN: usize = 16;
/// No valid header is shorter (`PROXY UNKNOWN\r\n` is 15 bytes; v2 needs 16), so this much can always be
/// read without reading past a header.
const MIN_LEN: usize = 15;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied client: its address, and the address it connected to at the proxy.
    Proxied {
        /// The client's address.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// The proxy speaks for itself (v2 `LOCAL`, e.g. a health check; v1 `UNKNOWN`; a v2 family other
    /// than TCP over IPv4/IPv6): the socket's own addresses apply.
    Local,
}

/// A header that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The bytes start with neither signature.
    #[error("no PROXY protocol header")]
    Missing,
    /// A v1 header that breaks the format.
    #[error("invalid PROXY protocol v1 header: {0}")]
    V1(&'static str),
    /// A v2 header that breaks the format.
    #[error("invalid PROXY protocol v2 header: {0}")]
    V2(&'static str),
    /// Longer than the bound ([`V1_MAX_LEN`] or [`V2_MAX_LEN`]).
    #[error("PROXY protocol header longer than {0} bytes")]
    TooLong(usize),
    /// Not complete within [`HEADER_TIMEOUT`].
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    /// The socket failed or closed first.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// The result of looking at the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes.
    Complete {
        /// What it says.
        header: ProxyHeader,
        /// Its length: the client's own bytes start after it.
        len: usize,
    },
    /// Valid so far; at least this many more bytes are needed (reading exactly that many never reads past
    /// the header).
    Needs(usize),
}

/// Parses the start of `buf`: a complete header, how many more bytes a valid one needs, or why it is
/// invalid. Never panics, whatever the bytes.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < MIN_LEN {
        // Refuse early what can no longer become a header.
        let v1 = b"PROXY ".starts_with(&buf[..buf.len().min(6)]);
        let v2 = V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)]);
        return if v1 || v2 { Ok(Parsed::Needs(MIN_LEN - buf.len())) } else { Err(ProxyError::Missing) };
    }
    if buf.starts_with(&V2_SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(b"PROXY ") {
        parse_v1(buf)
    } else {
        Err(ProxyError::Missing)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyError::TooLong(V1_MAX_LEN));
        }
        return Ok(Parsed::Needs(1));
    };
    let len = lf + 1;
    if len > V1_MAX_LEN {
        return Err(ProxyError::TooLong(V1_MAX_LEN));
    }
    let line = buf[..lf].strip_suffix(b"\r").ok_or(ProxyError::V1("line does not end with CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1("not ASCII"))?;
    let mut fields = line.split(' ');
    // "PROXY", checked by the caller.
    fields.next();
    let header = match fields.next() {
        // Whatever follows UNKNOWN is ignored (the specification).
        Some("UNKNOWN") => ProxyHeader::Local,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let v6 = proto == "TCP6";
            let mut next = || fields.next().ok_or(ProxyError::V1("missing field"));
            let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
            if fields.next().is_some() {
                return Err(ProxyError::V1("extra field"));
            }
            ProxyHeader::Proxied {
                source: SocketAddr::new(v1_address(src, v6)?, v1_port(sport)?),
                destination: SocketAddr::new(v1_address(dst, v6)?, v1_port(dport)?),
            }
        }
        _ => return Err(ProxyError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Parsed::Complete { header, len })
}

fn v1_address(text: &str, v6: bool) -> Result<IpAddr, ProxyError> {
    let ip = if v6 { text.parse::<Ipv6Addr>().map(IpAddr::V6) } else { text.parse::<Ipv4Addr>().map(IpAddr::V4) };
    ip.map_err(|_| ProxyError::V1("bad address"))
}

fn v1_port(text: &str) -> Result<u16, ProxyError> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    let no_leading_zero = text == "0" || !text.starts_with('0');
    match text.parse() {
        Ok(port) if digits && no_leading_zero => Ok(port),
        _ => Err(ProxyError::V1("bad port")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::Needs(V2_FIXED_LEN - buf.len()));
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let body_len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if version != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let len = V2_FIXED_LEN + body_len;
    if len > V2_MAX_LEN {
        return Err(ProxyError::TooLong(V2_MAX_LEN));
    }
    if buf.len() < len {
        return Ok(Parsed::Needs(len - buf.len()));
    }
    let body = &buf[V2_FIXED_LEN..len];
    let header = match command {
        // LOCAL: the proxy's own connection; the address block is to be ignored.
        0 => ProxyHeader::Local,
        1 => match (family, transport) {
            (1, 1) => {
                let a = body.get(..12).ok_or(ProxyError::V2("IPv4 address block too short"))?;
                let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
                let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(0), port(8)),
                    destination: SocketAddr::new(ip(4), port(10)),
                }
            }
            (2, 1) => {
                let a = body.get(..36).ok_or(ProxyError::V2("IPv6 address block too short"))?;
                let ip = |i: usize| {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&a[i..i + 16]);
                    IpAddr::V6(Ipv6Addr::from(octets))
                };
                let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(0), port(32)),
                    destination: SocketAddr::new(ip(16), port(34)),
                }
            }
            (1 | 2, _) => return Err(ProxyError::V2("transport is not STREAM")),
            // UNSPEC or UNIX sockets: no address we can use; the socket's own apply.
            (0 | 3, _) => ProxyHeader::Local,
            _ => return Err(ProxyError::V2("unknown address family")),
        },
        _ => return Err(ProxyError::V2("command is neither LOCAL nor PROXY")),
    };
    Ok(Parsed::Complete { header, len })
}

/// Reads one header from `stream` within [`HEADER_TIMEOUT`], never a byte past it.
pub async fn read_header<R: AsyncRead + Unpin>(stream: &mut R) -> Result<ProxyHeader, ProxyError> {
    read_header_within(stream, HEADER_TIMEOUT).await
}

/// Reads one header from `stream` within `limit`, never a byte past it.
pub async fn read_header_within<R: AsyncRead + Unpin>(
    stream: &mut R,
    limit: Duration,
) -> Result<ProxyHeader, ProxyError> {
    match tokio::time::timeout(limit, read_header_untimed(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(limit)),
    }
}

async fn read_header_untimed<R: AsyncRead + Unpin>(stream: &mut R) -> Result<ProxyHeader, ProxyError> {
    // Fixed size: the bound, not what the peer announces.
    let mut buf = [0u8; V2_MAX_LEN];
    let mut filled = 0;
    loop {
        match parse(&buf[..filled])? {
            Parsed::Complete { header, .. } => return Ok(header),
            Parsed::Needs(n) => {
                // parse() bounds every header by V2_MAX_LEN or V1_MAX_LEN, both within the buffer. A short
                // read is parsed at once, so a client that sends no header (only the AMQP one) is refused
                // without waiting for bytes it will never send.
                let end = (filled + n).min(buf.len());
                match stream.read(&mut buf[filled..end]).await? {
                    0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                    got => filled += got,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf).unwrap() {
            Parsed::Complete { header, len } => (header, len),
            Parsed::Needs(n) => panic!("needs {n} more"),
        }
    }

    fn proxied(src: &str, dst: &str) -> ProxyHeader {
        ProxyHeader::Proxied { source: src.parse().unwrap(), destination: dst.parse().unwrap() }
    }

    /// A v2 header: command, family/transport byte, address block and TLV bytes.
    fn v2(command: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(fam);
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 5672\r\nAMQP";
        assert_eq!(complete(line), (proxied("192.0.2.7:56324", "10.0.0.1:5672"), line.len() - 4));
        let line = b"PROXY TCP6 2001:db8::1 ::1 65535 5671\r\n";
        assert_eq!(complete(line), (proxied("[2001:db8::1]:65535", "[::1]:5671"), line.len()));
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (ProxyHeader::Local, 15));
        assert_eq!(complete(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").0, ProxyHeader::Local);
        // The longest allowed.
        let max = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert!(max.len() <= V1_MAX_LEN);
        assert_eq!(complete(max.as_bytes()).1, max.len());
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],  // LF without CR
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",       // missing port
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",   // extra field
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",         // IPv6 in TCP4
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",         // IPv4 in TCP6
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", // port out of range
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",    // leading zero
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",    // sign
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",    // double space
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",     // protocol
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n",  // not ASCII
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(parse(b"AMQP\x00\x00\x09\x01"), Err(ProxyError::Missing)));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing)));
        // No CRLF within the bound.
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        assert!(matches!(parse(long.as_bytes()), Err(ProxyError::TooLong(V1_MAX_LEN))));
    }

    #[test]
    fn v2_inet_inet6_local() {
        let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&5672u16.to_be_bytes());
        let h = v2(1, 0x11, &body);
        assert_eq!(complete(&h), (proxied("192.0.2.7:56324", "10.0.0.1:5672"), 28));
        // TLVs after the addresses are skipped.
        let mut with_tlv = body.clone();
        with_tlv.extend_from_slice(&[0x05, 0x00, 0x03, b'a', b'b', b'c']);
        let h = v2(1, 0x11, &with_tlv);
        assert_eq!(complete(&h).1, 16 + 18);

        let mut body6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets().to_vec();
        body6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body6.extend_from_slice(&1u16.to_be_bytes());
        body6.extend_from_slice(&5671u16.to_be_bytes());
        assert_eq!(complete(&v2(1, 0x21, &body6)).0, proxied("[2001:db8::1]:1", "[::1]:5671"));

        assert_eq!(complete(&v2(0, 0x00, &[])), (ProxyHeader::Local, 16));
        assert_eq!(complete(&v2(0, 0x11, &body)).0, ProxyHeader::Local, "LOCAL ignores the addresses");
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).0, ProxyHeader::Local, "UNIX: no usable address");
    }

    #[test]
    fn v2_refusals_and_bounds() {
        assert!(matches!(parse(&v2(1, 0x11, &[1, 2, 3])), Err(ProxyError::V2(_))), "short IPv4 block");
        assert!(matches!(parse(&v2(1, 0x21, &[0; 12])), Err(ProxyError::V2(_))), "short IPv6 block");
        assert!(matches!(parse(&v2(1, 0x12, &[0; 12])), Err(ProxyError::V2(_))), "DGRAM");
        assert!(matches!(parse(&v2(2, 0x11, &[0; 12])), Err(ProxyError::V2(_))), "command 2");
        assert!(matches!(parse(&v2(1, 0x41, &[0; 12])), Err(ProxyError::V2(_))), "family 4");
        let mut v1_version = v2(1, 0x11, &[0; 12]);
        v1_version[12] = 0x11;
        assert!(matches!(parse(&v1_version), Err(ProxyError::V2(_))));
        // An announced length over the bound is refused before anything is read.
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(parse(&huge), Err(ProxyError::TooLong(V2_MAX_LEN))));
    }

    #[test]
    fn needs_counts_never_read_past_the_header() {
        let h = v2(1, 0x11, &[0; 12]);
        assert_eq!(parse(&[]).unwrap(), Parsed::Needs(MIN_LEN));
        assert_eq!(parse(&h[..3]).unwrap(), Parsed::Needs(MIN_LEN - 3));
        assert_eq!(parse(&h[..15]).unwrap(), Parsed::Needs(1));
        assert_eq!(parse(&h[..16]).unwrap(), Parsed::Needs(12));
        assert_eq!(parse(b"PROXY UNKNOWN\r").unwrap(), Parsed::Needs(1));
        assert_eq!(parse(b"PROXY TCP4 1.2.3").unwrap(), Parsed::Needs(1));
        assert!(matches!(parse(b"PROXX"), Err(ProxyError::Missing)));
    }

    #[tokio::test]
    async fn reads_exactly_the_header() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 5672\r\nAMQP\x00\x00\x09\x01";
        let mut rd = &line[..];
        assert_eq!(read_header(&mut rd).await.unwrap(), proxied("192.0.2.7:56324", "10.0.0.1:5672"));
        assert_eq!(rd, b"AMQP\x00\x00\x09\x01");
        let mut bytes = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        bytes.extend_from_slice(b"\x16\x03\x01");
        let mut rd = &bytes[..];
        assert_eq!(read_header(&mut rd).await.unwrap(), proxied("1.2.3.4:1", "5.6.7.8:2"));
        assert_eq!(rd, b"\x16\x03\x01");
        let mut rd = &b"AMQP\x00\x00\x09\x01"[..];
        assert!(matches!(read_header(&mut rd).await, Err(ProxyError::Missing)));
        let mut rd = &b"PROXY TCP4 1.2"[..];
        assert!(matches!(read_header(&mut rd).await, Err(ProxyError::Io(_))), "closed mid-header");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let read = tokio::spawn(async move { read_header_within(&mut server, Duration::from_millis(50)).await });
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY ").await.unwrap();
        assert!(matches!(read.await.unwrap(), Err(ProxyError::Timeout(_))));
    }

    proptest! {
        /// Arbitrary bytes never panic the parser, and a complete header never claims more bytes than given
        /// or more than the bounds; `Needs` always asks for at least one byte.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            match parse(&bytes) {
                Ok(Parsed::Complete { len, .. }) => {
                    prop_assert!(len <= bytes.len());
                    prop_assert!(len <= V2_MAX_LEN);
                }
                Ok(Parsed::Needs(n)) => prop_assert!(n >= 1 && bytes.len() + n <= V2_MAX_LEN),
                Err(_) => {}
            }
        }

        /// The same with either signature in front, so the parsers behind them see arbitrary input too.
        #[test]
        fn arbitrary_bodies_never_panic(v2_sig in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let mut bytes = if v2_sig { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
            bytes.extend_from_slice(&tail);
            let _ = parse(&bytes);
            for cut in [0, 1, 15, 16, 28, 52, 107, 108] {
                let _ = parse(&bytes[..cut.min(bytes.len())]);
            }
        }
    }
}
