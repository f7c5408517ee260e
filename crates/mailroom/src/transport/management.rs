//! Mailroom's server-side redrive through its HTTP API (`POST /api/queues/{vhost}/{queue}/redrive`), for
//! an AMQP transport given a management URL.
//!
//! One plain `http://` HTTP/1.1 request per redrive on a socket of its own (`Connection: close`, the
//! answer read to its end), so the SDK needs no HTTP client crate. `https://` is refused when the
//! transport is configured: it would need a TLS stack; put the API behind a local proxy, or leave the
//! URL out and the bus redrives client-side.

use crate::error::TransportError;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer read (the redrive answer is `{"moved":n,"skipped":m}`; error bodies are short too).
const MAX_RESPONSE: usize = 64 * 1024;

/// Where the HTTP API is and who to log in as.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ManagementApi {
    /// `host:port`, for the socket and the `Host` header.
    authority: String,
    /// A path prefix (a proxy's), without the trailing `/`; usually empty.
    base: String,
    /// `user:password` from the URL, if it has them (else the AMQP URL's are used).
    credentials: Option<(String, String)>,
}

impl std::fmt::Debug for ManagementApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementApi").field("authority", &self.authority).field("base", &self.base).finish()
    }
}

/// What the API said to a redrive.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Done: how many moved.
    Moved(u64),
    /// 404: the DLQ or the target queue does not exist (nothing moved).
    NotFound,
}

impl ManagementApi {
    /// Parses `http://[user:password@]host[:port][/prefix]`.
    pub(crate) fn parse(url: &str) -> Result<ManagementApi, TransportError> {
        let invalid = |why: &str| TransportError::Config(format!("management URL: {why}"));
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            invalid("only http:// is supported (https would need a TLS stack in the SDK; leave the URL out to redrive client-side)")
        })?;
        let (hostpart, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (credentials, hostport) = match hostpart.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((percent_decode(user), percent_decode(pass))), host)
            }
            None => (None, hostpart),
        };
        if hostport.is_empty() {
            return Err(invalid("no host"));
        }
        // `[::1]:15672`, `host:15672`, or a host alone (port 80).
        let has_port = match hostport.rfind(':') {
            Some(i) => hostport[i + 1..].chars().all(|c| c.is_ascii_digit()) && !hostport[..i].ends_with(':'),
            None => false,
        };
        let authority = if has_port { hostport.to_owned() } else { format!("{hostport}:80") };
        Ok(ManagementApi { authority, base: base.to_owned(), credentials })
    }

    /// The credentials to send: the URL's, else `fallback` (the AMQP connection's).
    fn credentials<'a>(&'a self, fallback: (&'a str, &'a str)) -> (&'a str, &'a str) {
        match &self.credentials {
            Some((u, p)) => (u.as_str(), p.as_str()),
            None => fallback,
        }
    }

    /// Asks the server to move the dead letters of `dlq` whose header `filter.0` is `filter.1` to the
    /// queue `target`, within `timeout`.
    pub(crate) async fn redrive(
        &self,
        vhost: &str,
        dlq: &str,
        filter: (&str, &str),
        target: &str,
        login: (&str, &str),
        timeout: Duration,
    ) -> Result<Answer, TransportError> {
        let body = serde_json::json!({
            "header_filter": { "name": filter.0, "value": filter.1 },
            "target": { "queue": target },
        })
        .to_string();
        let path = format!("{}/api/queues/{}/{}/redrive", self.base, percent_encode(vhost), percent_encode(dlq));
        let (user, pass) = self.credentials(login);
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.authority,
            base64(format!("{user}:{pass}").as_bytes()),
            body.len()
        );
        let exchange = async {
            let mut socket = TcpStream::connect(&self.authority).await?;
            socket.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            // At most MAX_RESPONSE + 1 bytes: one more tells an oversized answer from a full one.
            (&mut socket).take(MAX_RESPONSE as u64 + 1).read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout(format!("redrive of {dlq} through the HTTP API")))?
            .map_err(|e| TransportError::Disconnected(format!("HTTP API at {}: {e}", self.authority)))?;
        if response.len() > MAX_RESPONSE {
            return Err(TransportError::Broker("HTTP API answer too large".into()));
        }
        parse_answer(&response)
    }
}

/// Reads the status and, for a 200, the `moved` count of an HTTP/1.1 answer.
fn parse_answer(response: &[u8]) -> Result<Answer, TransportError> {
    let bad = |why: &str| TransportError::Broker(format!("HTTP API: {why}"));
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&response[..split]).map_err(|_| bad("header not UTF-8"))?;
    let mut body = response[split + 4..].to_vec();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("no status"))?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked")
        })
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    match status {
        200 => {
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(&format!("answer: {e}")))?;
            v.get("moved").and_then(serde_json::Value::as_u64).map(Answer::Moved).ok_or_else(|| bad("no `moved`"))
        }
        404 => Ok(Answer::NotFound),
        other => Err(bad(&format!("status {other}: {}", String::from_utf8_lossy(&body).trim()))),
    }
}

/// The body of a `Transfer-Encoding: chunked` answer (sizes in hex, each chunk followed by CRLF).
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        // The size is checked against what arrived, never allocated ahead.
        let chunk = data.get(..size)?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..)?;
    }
}

/// A path segment with everything but RFC 3986's unreserved characters percent-encoded (vhost `/` is `%2F`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` sequences decoded (user names and passwords in a URL); invalid ones are kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 with padding (for the `Authorization: Basic` header).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_management_urls() {
        let api = ManagementApi::parse("http://admin:p%40ss@127.0.0.1:15672").unwrap();
        assert_eq!(api.authority, "127.0.0.1:15672");
        assert_eq!(api.base, "");
        assert_eq!(api.credentials, Some(("admin".into(), "p@ss".into())));
        let api = ManagementApi::parse("http://mq.local/mgmt/").unwrap();
        assert_eq!((api.authority.as_str(), api.base.as_str(), api.credentials), ("mq.local:80", "/mgmt", None));
        assert_eq!(ManagementApi::parse("http://[::1]:8080").unwrap().authority, "[::1]:8080");
        assert_eq!(ManagementApi::parse("http://[::1]").unwrap().authority, "[::1]:80");
        assert!(matches!(ManagementApi::parse("https://mq.local"), Err(TransportError::Config(_))));
        assert!(matches!(ManagementApi::parse("http://"), Err(TransportError::Config(_))));
    }

    #[test]
    fn encodes_what_the_request_needs() {
        assert_eq!(percent_encode("/"), "%2F");
        assert_eq!(percent_encode("orders.dlq"), "orders.dlq");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn reads_answers() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 23\r\n\r\n{\"moved\":3,\"skipped\":1}";
        assert_eq!(parse_answer(ok).unwrap(), Answer::Moved(3));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"mov\r\n7\r\ned\":12}\r\n0\r\n\r\n";
        assert_eq!(parse_answer(chunked).unwrap(), Answer::Moved(12));
        let missing = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_answer(missing).unwrap(), Answer::NotFound);
        let denied = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}";
        assert!(matches!(parse_answer(denied), Err(TransportError::Broker(_))));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(dechunk(b"ffffffff\r\nab").is_none(), "a size larger than what arrived is refused");
    }
}
