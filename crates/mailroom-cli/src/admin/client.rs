//! The HTTP/1.1 client of `mailroom admin`: one request per connection (`Connection: close`), over plain
//! TCP (`http://`) or TLS (`https://`, rustls with the ring provider, as the AMQPS listener), with basic
//! auth and JSON bodies. Small on purpose: the admin API needs nothing more, and it keeps the tree free of
//! a second HTTP stack.

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest an admin request may take (connect, send and read the whole answer).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Where the system's CA bundle is looked for when neither `--cacert` nor `SSL_CERT_FILE` names one.
const SYSTEM_CA_BUNDLES: &[&str] = &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL or TLS flags are unusable.
    #[error("{0}")]
    Setup(String),
    /// Connecting, TLS or the exchange itself failed.
    #[error("{method} {path}: {reason}")]
    Transport {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The server answered outside 2xx.
    #[error("{method} {path}: HTTP {status}: {reason}")]
    Status {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The server's `reason` (or its body).
        reason: String,
    },
}

/// How to trust an https server.
pub enum Trust {
    /// The system's CA bundle (or `SSL_CERT_FILE`).
    System,
    /// The PEM CA certificates in this file (`--cacert`).
    CaFile(PathBuf),
    /// Any certificate (`--insecure`): encrypted, but anyone in the middle can read it.
    Insecure,
}

/// The admin API's address and credentials.
pub struct Client {
    /// `host:port` to connect to.
    host_port: String,
    /// The host alone (TLS server name).
    host: String,
    /// The TLS connector for https URLs.
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Basic` credentials.
    auth: String,
}

impl Client {
    /// Parses `url` (`http://host[:port]` or `https://host[:port]`); `trust` applies to https only.
    pub fn new(url: &str, user: &str, password: &str, trust: Trust) -> Result<Client, ClientError> {
        let setup = |m: String| ClientError::Setup(m);
        let (rest, https) = if let Some(r) = url.strip_prefix("http://") {
            (r, false)
        } else if let Some(r) = url.strip_prefix("https://") {
            (r, true)
        } else {
            return Err(setup(format!("--url must start with http:// or https://, got {url}")));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(setup(format!("--url must be http(s)://host[:port], got {url}")));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, host_port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() && !h.is_empty() => (h.to_owned(), authority.to_owned()),
            _ => (authority.to_owned(), format!("{authority}:{default_port}")),
        };
        let tls = if https { Some(connector(&trust)?) } else { None };
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Client { host_port, host, tls, auth })
    }

    /// Sends one request; an answer outside 2xx becomes an error carrying the server's reason.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Option<Value>, ClientError> {
        self.request_with(method, path, body, &[]).await
    }

    /// [`Client::request`] with extra headers (`X-Reason` of a connection close).
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Option<Value>, ClientError> {
        let transport = |reason: String| ClientError::Transport { method: method.into(), path: path.into(), reason };
        if headers.iter().any(|(k, v)| [k, v].iter().any(|s| s.contains(['\r', '\n']))) {
            return Err(transport("header values cannot contain line breaks".into()));
        }
        let request = self.request_text(method, path, body, headers);
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&self.host_port)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.host_port))?;
            match &self.tls {
                None => exchange(tcp, &request).await,
                Some(connector) => {
                    let name = ServerName::try_from(self.host.trim_matches(['[', ']']).to_owned())
                        .map_err(|e| format!("bad TLS server name {}: {e}", self.host))?;
                    let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
                    exchange(tls, &request).await
                }
            }
        };
        let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| transport(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(transport)?;
        let (status, payload) = parse_answer(&raw).map_err(transport)?;
        let value: Option<Value> = if payload.is_empty() { None } else { serde_json::from_slice(&payload).ok() };
        if !(200..300).contains(&status) {
            let reason = value
                .as_ref()
                .and_then(|v| v.get("reason"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&payload).into_owned());
            return Err(ClientError::Status { method: method.into(), path: path.into(), status, reason });
        }
        Ok(value)
    }

    fn request_text(&self, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> String {
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nConnection: close\r\n{extra}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host_port,
            self.auth,
            body.len()
        )
    }
}

/// Writes `request` and reads the whole answer (the server closes after it).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> Result<Vec<u8>, String> {
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw).await {
        Ok(_) => Ok(raw),
        // A TLS server that closes without close_notify after a complete answer: keep what arrived.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e.to_string()),
    }
}

/// The status and the (de-chunked) body of a raw HTTP/1.1 answer.
fn parse_answer(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("malformed HTTP answer")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut payload = raw[split + 4..].to_vec();
    let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("malformed HTTP status line")?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        payload = dechunk(&payload)?;
    }
    Ok((status, payload))
}

/// Decodes a chunked body.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|e| e.to_string())?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|e| format!("bad chunk size: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// The TLS connector `trust` asks for: TLS 1.2 and 1.3, ring's suites.
fn connector(trust: &Trust) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let provider = mailroom_amqp::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ClientError::Setup(format!("TLS setup: {e}")))?;
    let config = match trust {
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        Trust::CaFile(path) => builder.with_root_certificates(roots(path)?).with_no_client_auth(),
        Trust::System => {
            let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            let path = from_env
                .or_else(|| SYSTEM_CA_BUNDLES.iter().map(PathBuf::from).find(|p| p.is_file()))
                .ok_or_else(|| ClientError::Setup("no system CA bundle found: pass --cacert FILE".into()))?;
            builder.with_root_certificates(roots(&path)?).with_no_client_auth()
        }
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The CA certificates of a PEM file.
fn roots(path: &Path) -> Result<rustls::RootCertStore, ClientError> {
    let bad = |e: String| ClientError::Setup(format!("CA file {}: {e}", path.display()));
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        store.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(store)
}

/// `--insecure`: accepts any server certificate (signatures are still checked, so the handshake is sound;
/// who holds the key is not).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Percent-encodes a path segment (everything but unreserved characters).
pub fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("my queue.1"), "my%20queue.1");
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
        assert!(dechunk(b"5\r\nab").is_err());
    }

    #[test]
    fn parses_urls() {
        let c = |u: &str| Client::new(u, "u", "p", Trust::Insecure);
        assert_eq!(c("http://127.0.0.1:15672").unwrap().host_port, "127.0.0.1:15672");
        assert_eq!(c("http://localhost/").unwrap().host_port, "localhost:80");
        let https = c("https://broker.example").unwrap();
        assert_eq!((https.host_port.as_str(), https.host.as_str()), ("broker.example:443", "broker.example"));
        assert!(https.tls.is_some());
        assert!(c("ftp://x").is_err());
        assert!(c("http://x/api").is_err());
        assert!(Client::new("https://x", "u", "p", Trust::CaFile("/nonexistent.pem".into())).is_err());
    }

    #[test]
    fn parses_answers() {
        let (status, body) = parse_answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((status, body.as_slice()), (404, b"{}".as_slice()));
        assert!(parse_answer(b"HTTP/1.1 200").is_err());
    }
}
