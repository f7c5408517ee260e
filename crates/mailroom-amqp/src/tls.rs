//! TLS for client listeners (AMQPS, and the HTTP API through the same type): a rustls server
//! configuration built from PEM files, TLS 1.2 and 1.3 only, optional or required client certificates
//! verified against a CA bundle, and reloading of the files on demand (SIGHUP) without touching the
//! connections already open, which keep the configuration they were accepted with.
//!
//! The crypto provider is `ring`: no C library build, unlike aws-lc-rs. rustls 0.23.48 deprecates it
//! because it has no post-quantum key exchange (X25519MLKEM768); TLS 1.3 then uses classical X25519 or
//! P-256. Switching to aws-lc-rs is the provider function below plus the cargo features.
//! Nothing here knows about AMQP: `server.rs` wraps accepted sockets with [`TlsAcceptor::accept`] before
//! the protocol header, and [`TlsAcceptor::external_login`] names the verified client certificate's login
//! for SASL EXTERNAL (see `cert_name.rs`).

use crate::cert_name::{CertLoginFrom, CertSubject};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncRead, AsyncWrite};

/// Whether clients must present a certificate (`--tls-verify`, RabbitMQ's `ssl_options.verify` plus
/// `fail_if_no_peer_cert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientVerification {
    /// No client certificate is asked for.
    #[default]
    None,
    /// A certificate is asked for and verified if given; clients without one are accepted.
    Optional,
    /// A certificate signed by the CA is required.
    Required,
}

impl std::str::FromStr for ClientVerification {
    type Err = TlsError;
    /// `none`, `optional` or `required`.
    fn from_str(s: &str) -> Result<Self, TlsError> {
        match s {
            "none" => Ok(Self::None),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(TlsError::BadVerify(other.to_owned())),
        }
    }
}

/// Where the PEM files are and how clients are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server's certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// The server's private key: PKCS#8, PKCS#1 or SEC1 (`--tls-key`).
    pub key: PathBuf,
    /// CA certificates that sign client certificates (`--tls-ca`); needed unless `verify` is `None`.
    pub ca: Option<PathBuf>,
    /// Client certificate policy (`--tls-verify`).
    pub verify: ClientVerification,
    /// Which part of a verified client certificate SASL EXTERNAL logs in as (`--ssl-cert-login-from`).
    pub cert_login_from: CertLoginFrom,
}

/// A TLS configuration that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or is not PEM.
    #[error("cannot read {what} from {path}: {message}")]
    File {
        /// `certificate`, `private key` or `CA certificates`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The file holds no item of the expected kind.
    #[error("no {what} found in {path}")]
    Empty {
        /// What was looked for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// Client verification was asked for without a CA.
    #[error("--tls-verify {0:?} needs --tls-ca")]
    NoCa(ClientVerification),
    /// An unknown `--tls-verify` value.
    #[error("--tls-verify must be none, optional or required, not '{0}'")]
    BadVerify(String),
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File { what, path: path.to_owned(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_owned() });
    }
    Ok(certs)
}

/// The crypto provider (see the module doc for why ring).
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration `settings` describe: TLS 1.2 and 1.3 only, ring's cipher suites.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain = certificates(&settings.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| TlsError::File {
        what: "private key",
        path: settings.key.clone(),
        message: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (settings.verify, &settings.ca) {
        (ClientVerification::None, _) => builder.with_no_client_auth(),
        (verify, None) => return Err(TlsError::NoCa(verify)),
        (verify, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "CA certificates")? {
                roots.add(cert).map_err(|e| TlsError::Config(format!("CA certificate in {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match verify {
                ClientVerification::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Config(e.to_string()))?)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Accepts TLS connections with the current configuration; [`TlsAcceptor::reload`] swaps in a new one.
#[derive(Debug)]
pub struct TlsAcceptor {
    settings: TlsSettings,
    // Read once per accepted connection (not per message); replaced whole on reload.
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsAcceptor {
    /// Reads the files and builds the first configuration.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let config = server_config(&settings)?;
        Ok(Self { settings, current: RwLock::new(config) })
    }

    /// Re-reads the files (after a certificate renewal, on SIGHUP). On error the old configuration stays
    /// in force. Open connections are not affected either way.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.settings)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// Runs the server side of the handshake on `stream`.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<S>> {
        tokio_rustls::TlsAcceptor::from(self.config()).accept(stream).await
    }

    /// The login name SASL EXTERNAL offers on `connection`: taken from the client's certificate, which
    /// rustls verified against the CA during the handshake; None without a certificate (or without the
    /// common name `--ssl-cert-login-from common_name` asks for), and EXTERNAL is then not offered.
    pub fn external_login(&self, connection: &rustls::ServerConnection) -> Option<String> {
        let leaf = connection.peer_certificates()?.first()?;
        match CertSubject::from_der(leaf.as_ref()) {
            Ok(subject) => subject.login_name(self.settings.cert_login_from),
            Err(e) => {
                tracing::warn!(error = %e, "client certificate subject unreadable; EXTERNAL not offered");
                None
            }
        }
    }
}

// The test CA, shared with tests/access_conn.rs (a path on a file-level module starts at src/).
#[cfg(test)]
#[path = "../tests/support/test_ca.rs"]
mod test_ca;

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::ClientConfig;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::test_ca::TestCa as Ca;

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new() -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "mailroom-tls-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, contents).unwrap();
            p
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn settings(dir: &Scratch, ca: &Ca, verify: ClientVerification) -> TlsSettings {
        let (cert, key) = ca.leaf_cn("mailroom", &["localhost", "127.0.0.1"], false);
        TlsSettings {
            cert: dir.write("server.pem", &cert),
            key: dir.write("server.key", &key),
            ca: Some(dir.write("ca.pem", &ca.pem())),
            verify,
            cert_login_from: CertLoginFrom::default(),
        }
    }

    fn client(
        trust: &Ca,
        identity: Option<(String, String)>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(trust.pem().as_bytes()).unwrap()).unwrap();
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    const ALL: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

    /// A server that accepts TLS connections and echoes 8 bytes per connection, over and over.
    async fn serve(acceptor: Arc<TlsAcceptor>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = Arc::clone(&acceptor);
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = [0u8; 8];
                    while tls.read_exact(&mut buf).await.is_ok() {
                        if tls.write_all(&buf).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

    /// Connects, handshakes and does one echo round trip (the AMQP protocol header).
    async fn round_trip(
        addr: std::net::SocketAddr,
        connector: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<ClientStream> {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await?;
        echo(&mut tls).await?;
        Ok(tls)
    }

    async fn echo(tls: &mut ClientStream) -> std::io::Result<()> {
        tls.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut back = [0u8; 8];
        // With TLS 1.3 a refused client certificate surfaces at the first read, not at the handshake.
        tls.read_exact(&mut back).await?;
        assert_eq!(&back, b"AMQP\x00\x00\x09\x01");
        Ok(())
    }

    #[tokio::test]
    async fn server_only_tls_with_1_2_and_1_3() {
        let (dir, ca) = (Scratch::new(), Ca::new("test CA"));
        let acceptor = Arc::new(TlsAcceptor::new(settings(&dir, &ca, ClientVerification::None)).unwrap());
        let addr = serve(acceptor).await;
        let tls = round_trip(addr, &client(&ca, None, ALL)).await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        let tls = round_trip(addr, &client(&ca, None, &[&rustls::version::TLS12])).await.unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
        // A client that does not trust the CA refuses the server.
        let other = Ca::new("other CA");
        assert!(round_trip(addr, &client(&other, None, ALL)).await.is_err());
    }

    #[tokio::test]
    async fn required_client_certificates() {
        let (dir, ca) = (Scratch::new(), Ca::new("test CA"));
        let acceptor = Arc::new(TlsAcceptor::new(settings(&dir, &ca, ClientVerification::Required)).unwrap());
        let addr = serve(acceptor).await;
        assert!(round_trip(addr, &client(&ca, None, ALL)).await.is_err(), "no certificate");
        let good = ca.leaf_cn("alice", &["alice"], false);
        round_trip(addr, &client(&ca, Some(good.clone()), ALL)).await.unwrap();
        round_trip(addr, &client(&ca, Some(good), &[&rustls::version::TLS12])).await.unwrap();
        let expired = ca.leaf_cn("alice", &["alice"], true);
        assert!(round_trip(addr, &client(&ca, Some(expired), ALL)).await.is_err(), "expired certificate");
        let stranger = Ca::new("other CA").leaf_cn("mallory", &["mallory"], false);
        assert!(round_trip(addr, &client(&ca, Some(stranger), ALL)).await.is_err(), "certificate from another CA");
    }

    #[tokio::test]
    async fn optional_client_certificates() {
        let (dir, ca) = (Scratch::new(), Ca::new("test CA"));
        let acceptor = Arc::new(TlsAcceptor::new(settings(&dir, &ca, ClientVerification::Optional)).unwrap());
        let addr = serve(acceptor).await;
        round_trip(addr, &client(&ca, None, ALL)).await.unwrap();
        round_trip(addr, &client(&ca, Some(ca.leaf_cn("bob", &["bob"], false)), ALL)).await.unwrap();
        // A certificate that is given must still verify.
        let stranger = Ca::new("other CA").leaf_cn("mallory", &["mallory"], false);
        assert!(round_trip(addr, &client(&ca, Some(stranger), ALL)).await.is_err());
    }

    #[tokio::test]
    async fn reload_swaps_certificates_and_keeps_open_connections() {
        let (dir, ca) = (Scratch::new(), Ca::new("first CA"));
        let settings = settings(&dir, &ca, ClientVerification::None);
        let acceptor = Arc::new(TlsAcceptor::new(settings.clone()).unwrap());
        let addr = serve(Arc::clone(&acceptor)).await;
        let mut open = round_trip(addr, &client(&ca, None, ALL)).await.unwrap();

        // Renew with a certificate from another CA, in place.
        let ca2 = Ca::new("second CA");
        let (cert, key) = ca2.leaf_cn("mailroom", &["localhost"], false);
        std::fs::write(&settings.cert, cert).unwrap();
        std::fs::write(&settings.key, key).unwrap();
        // Not yet reloaded: new connections still get the old certificate.
        round_trip(addr, &client(&ca, None, ALL)).await.unwrap();
        acceptor.reload().unwrap();
        round_trip(addr, &client(&ca2, None, ALL)).await.unwrap();
        assert!(round_trip(addr, &client(&ca, None, ALL)).await.is_err());
        // The connection opened before the reload still works.
        echo(&mut open).await.unwrap();

        // A broken file: the reload fails and the current configuration stays.
        std::fs::write(&settings.key, "not a key").unwrap();
        assert!(matches!(acceptor.reload(), Err(TlsError::File { what: "private key", .. })));
        round_trip(addr, &client(&ca2, None, ALL)).await.unwrap();
    }

    #[test]
    fn bad_settings_are_refused() {
        let (dir, ca) = (Scratch::new(), Ca::new("test CA"));
        let good = settings(&dir, &ca, ClientVerification::Required);
        assert!(matches!(
            TlsAcceptor::new(TlsSettings { ca: None, ..good.clone() }),
            Err(TlsError::NoCa(ClientVerification::Required))
        ));
        assert!(matches!(
            TlsAcceptor::new(TlsSettings { cert: dir.0.join("missing.pem"), ..good.clone() }),
            Err(TlsError::File { what: "certificate", .. })
        ));
        let empty = dir.write("empty.pem", "");
        assert!(matches!(TlsAcceptor::new(TlsSettings { cert: empty, ..good.clone() }), Err(TlsError::Empty { .. })));
        // A key that does not belong to the certificate.
        let (_, other_key) = ca.leaf_cn("x", &["x"], false);
        let mismatched = dir.write("other.key", &other_key);
        assert!(matches!(TlsAcceptor::new(TlsSettings { key: mismatched, ..good }), Err(TlsError::Config(_))));
        assert_eq!("required".parse::<ClientVerification>().unwrap(), ClientVerification::Required);
        assert_eq!("optional".parse::<ClientVerification>().unwrap(), ClientVerification::Optional);
        assert_eq!("none".parse::<ClientVerification>().unwrap(), ClientVerification::None);
        assert!("peer".parse::<ClientVerification>().is_err());
    }
}
