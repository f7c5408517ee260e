//! The listener's defences that come before routing: its limits and timeouts ([`HttpSettings`]), the
//! `Host` check against DNS rebinding, the cross-site request checks (`Origin`, `Sec-Fetch-Site`, form
//! content types) and reading a request body within its size limit and time.
//!
//! Browsers send a cross-site "simple" request (a form post, or `fetch` with `no-cors`) without asking
//! the server first; basic auth credentials the browser remembers go with it. Refusing mutating requests
//! that name another origin, and bodies of the types such requests may carry, leaves an attacker's page
//! nothing it can send. A DNS-rebinding page runs on the attacker's name resolved to 127.0.0.1: its
//! requests carry the attacker's name in `Host`, which a loopback-only listener refuses.

use crate::api::ApiError;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, TRANSFER_ENCODING};
use hyper::{Method, StatusCode};
use std::time::Duration;

/// Largest request body by default (policies, bindings and published messages through the API).
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Largest definitions upload by default (`POST /api/definitions`: a whole node's topology).
pub const DEFAULT_MAX_DEFINITIONS_BODY: usize = 64 * 1024 * 1024;
/// How long a client has to send a complete request head once the server waits for one (slow-header
/// clients hold a connection slot at most this long).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a connection may sit without a byte in either direction and no request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may take to arrive.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Open connections per listener; more are closed at once (each holds a task and its buffers).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// The listener's limits and the names its `Host` check accepts.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest request body, except a definitions upload.
    pub max_body: usize,
    /// Largest `POST /api/definitions` body.
    pub max_definitions_body: usize,
    /// Time for a complete request head (hyper's `header_read_timeout`).
    pub header_read_timeout: Duration,
    /// A connection idle this long (no bytes, no request in flight) is closed.
    pub idle_timeout: Duration,
    /// Time for a request body to arrive.
    pub body_read_timeout: Duration,
    /// Open connections per listener.
    pub max_connections: usize,
    /// Host names besides the loopback ones that a loopback-only listener accepts (`--http-allowed-hosts`).
    pub allowed_hosts: Vec<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
            max_definitions_body: DEFAULT_MAX_DEFINITIONS_BODY,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            allowed_hosts: Vec::new(),
        }
    }
}

/// What a request's handling needs to know about the listener it came in on.
#[derive(Debug)]
pub struct ListenerContext {
    /// Limits, timeouts and allowed host names.
    pub settings: HttpSettings,
    /// The listener is bound to a loopback address only (the `Host` check applies).
    pub loopback_only: bool,
    /// The listener speaks TLS (`Origin`'s default port is 443).
    pub tls: bool,
}

/// The host part of a `Host` header or an origin's authority (`name:port`, `[v6]:port`), lowercased.
fn host_part(authority: &str) -> String {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // `[::1]:15672`: the brackets stay, so `[::1]` is compared as written.
        match rest.split_once(']') {
            Some((inside, _)) => return format!("[{}]", inside.to_ascii_lowercase()),
            None => authority,
        }
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.to_ascii_lowercase()
}

/// Whether `host` (no port) names this machine's loopback interface.
fn is_loopback_name(host: &str) -> bool {
    if host == "localhost" || host.ends_with(".localhost") || host == "[::1]" {
        return true;
    }
    host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// DNS rebinding: a loopback-only listener answers only requests whose `Host` names loopback or one of
/// `allowed` (a name, or `name:port` for one port only).
pub fn check_host(headers: &HeaderMap, loopback_only: bool, allowed: &[String]) -> Result<(), ApiError> {
    if !loopback_only {
        return Ok(());
    }
    let refused = |what: &str| {
        ApiError::new(StatusCode::FORBIDDEN, format!("{what}: this listener only answers loopback host names"))
    };
    let host = headers.get(HOST).and_then(|h| h.to_str().ok()).ok_or_else(|| refused("no Host header"))?;
    let name = host_part(host);
    let listed = allowed.iter().any(|a| {
        let a = a.trim().to_ascii_lowercase();
        a == name || a == host.trim().to_ascii_lowercase()
    });
    if is_loopback_name(&name) || listed {
        Ok(())
    } else {
        Err(refused(&format!("Host '{host}' is not allowed")))
    }
}

/// Whether `method` changes something (the verbs a cross-site page must not send).
fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// `scheme://host[:port]` of an `Origin` header as `host:port` with the scheme's default port filled in,
/// or None for `null` and anything unparsable.
fn origin_authority(origin: &str) -> Option<(String, u16)> {
    let (scheme, rest) = origin.trim().split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    Some(split_port(authority, default_port))
}

/// `name[:port]` as (lowercased host, port or `default_port`).
fn split_port(authority: &str, default_port: u16) -> (String, u16) {
    let host = host_part(authority);
    let after_host = if authority.trim().starts_with('[') {
        authority.split_once(']').map_or("", |(_, r)| r)
    } else {
        authority.rsplit_once(':').map_or("", |(_, p)| p)
    };
    let port = after_host.trim_start_matches(':').parse().unwrap_or(default_port);
    (host, port)
}

/// Cross-site request forgery: a mutating request naming another origin (`Origin`, `Sec-Fetch-Site`) is
/// refused with 403; a body of a type an HTML form or a no-cors `fetch` can send is refused with 415
/// (except a multipart definitions upload). Body-less requests need no `Content-Type`.
pub fn check_cross_site(
    method: &Method,
    headers: &HeaderMap,
    tls: bool,
    definitions_upload: bool,
) -> Result<(), ApiError> {
    if !is_mutating(method) {
        return Ok(());
    }
    let forbidden = |reason: String| ApiError::new(StatusCode::FORBIDDEN, reason).with_error("cross_site_request");
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("").trim().to_ascii_lowercase();
        if site == "cross-site" || site == "same-site" {
            return Err(forbidden(format!("{method} from a {site} page refused")));
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        let same = match (origin_authority(origin), host) {
            (Some(from), Some(host)) => from == split_port(host, if tls { 443 } else { 80 }),
            _ => false,
        };
        if !same {
            return Err(forbidden(format!("{method} from origin '{origin}' refused: not this server's origin")));
        }
    }
    if has_body(headers) {
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let form = match essence.as_str() {
            "application/x-www-form-urlencoded" | "text/plain" => true,
            "multipart/form-data" => !definitions_upload,
            _ => false,
        };
        if form {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("a {essence} body is not accepted here; send application/json"),
            )
            .with_error("unsupported_media_type"));
        }
    }
    Ok(())
}

/// Whether the request announces a body (a non-zero `Content-Length`, or a chunked one).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

/// 413 with RabbitMQ's reason text for an oversized body.
fn too_large(limit: usize) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("Exceeded HTTP request body size limit ({limit} bytes)"))
        .with_error("payload_too_large")
}

/// Most bytes of a refused body read and thrown away so that the client, still sending, gets to read the
/// 413 (closing a socket with unread input resets it, and the answer may be lost); past this the
/// connection is simply closed.
pub const MAX_DISCARDED_BODY: u64 = 16 * 1024 * 1024;
/// Longest time spent throwing a refused body away.
const DISCARD_TIME: Duration = Duration::from_secs(2);

/// Reads a body of at most `limit` bytes within `timeout`: an announced `Content-Length` over the limit is
/// refused before reading (413), a slow body with 408. The buffer grows with what arrives, never by what
/// the client announced.
pub async fn read_body(
    headers: &HeaderMap,
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let announced =
        headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = announced.filter(|n| *n > limit as u64) {
        if n <= MAX_DISCARDED_BODY {
            discard(&mut body).await;
        }
        return Err(too_large(limit));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "request body not received in time")
                    .with_error("request_timeout"))
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(ApiError::bad_request(format!("cannot read body: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > limit {
            discard(&mut body).await;
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&data);
    }
}

/// Reads and drops the rest of `body`, up to [`MAX_DISCARDED_BODY`] bytes and [`DISCARD_TIME`].
async fn discard(body: &mut Incoming) {
    let mut seen: u64 = 0;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > MAX_DISCARDED_BODY {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn loopback_hosts_pass_others_do_not() {
        let allowed = vec!["mq.example.com".to_owned(), "box:8080".to_owned()];
        for ok in
            ["localhost", "localhost:15672", "127.0.0.1:1", "[::1]:15672", "[::1]", "a.localhost", "MQ.example.com:9"]
        {
            let h = headers(&[("host", ok)]);
            assert!(check_host(&h, true, &allowed).is_ok(), "{ok}");
        }
        assert!(check_host(&headers(&[("host", "box:8080")]), true, &allowed).is_ok());
        for bad in ["evil.example", "evil.example:15672", "box:8081", "127.0.0.1.evil.example", "10.0.0.1"] {
            let h = headers(&[("host", bad)]);
            assert!(check_host(&h, true, &allowed).unwrap_err().reason().contains("not allowed"), "{bad}");
        }
        assert!(check_host(&HeaderMap::new(), true, &allowed).is_err());
        assert!(check_host(&headers(&[("host", "evil.example")]), false, &allowed).is_ok());
    }

    #[test]
    fn cross_site_checks() {
        let put = Method::PUT;
        let same = headers(&[("host", "localhost:15672"), ("origin", "http://localhost:15672")]);
        assert!(check_cross_site(&put, &same, false, false).is_ok());
        let default_port = headers(&[("host", "example.com"), ("origin", "https://example.com")]);
        assert!(check_cross_site(&put, &default_port, true, false).is_ok());
        assert!(check_cross_site(&put, &default_port, false, false).is_err());
        let other = headers(&[("host", "localhost:15672"), ("origin", "http://evil.example")]);
        assert!(check_cross_site(&put, &other, false, false).is_err());
        assert!(check_cross_site(&Method::GET, &other, false, false).is_ok());
        let null = headers(&[("host", "localhost:15672"), ("origin", "null")]);
        assert!(check_cross_site(&Method::DELETE, &null, false, false).is_err());
        for site in ["cross-site", "same-site"] {
            let h = headers(&[("host", "localhost"), ("sec-fetch-site", site)]);
            assert!(check_cross_site(&Method::POST, &h, false, false).is_err());
        }
        let h = headers(&[("host", "localhost"), ("sec-fetch-site", "same-origin")]);
        assert!(check_cross_site(&Method::POST, &h, false, false).is_ok());
        let form = headers(&[("content-type", "text/plain;charset=UTF-8"), ("content-length", "2")]);
        let e = check_cross_site(&put, &form, false, false).unwrap_err();
        assert_eq!(e.reason(), "a text/plain body is not accepted here; send application/json");
        let multipart =
            headers(&[("content-type", "multipart/form-data; boundary=x"), ("transfer-encoding", "chunked")]);
        assert!(check_cross_site(&put, &multipart, false, false).is_err());
        assert!(check_cross_site(&Method::POST, &multipart, false, true).is_ok());
        let empty_form = headers(&[("content-type", "application/x-www-form-urlencoded"), ("content-length", "0")]);
        assert!(check_cross_site(&put, &empty_form, false, false).is_ok());
        assert!(check_cross_site(&put, &HeaderMap::new(), false, false).is_ok());
    }
}
