//! `mailroom server`'s access and TLS flags (users, loopback rule, AMQPS listener and certificates, SASL
//! EXTERNAL's login name, the PROXY protocol), and what they build: the broker's default user and loopback
//! rule, and the TLS acceptor reloaded on SIGHUP.

use clap::Args;
use mailroom_amqp::cert_name::CertLoginFrom;
use mailroom_amqp::tls::{ClientVerification, TlsAcceptor, TlsSettings};
use mailroom_broker::access::{DefaultUser, LoopbackUsers};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Access and TLS flags; each also reads a `MAILROOM_*` environment variable.
#[derive(Args)]
pub struct AccessArgs {
    /// The user a blank node is created with (tag `administrator`, full permissions on `/`), with
    /// --default-pass (RabbitMQ's default_user). Without them: guest/guest, loopback only.
    #[arg(long, env = "MAILROOM_DEFAULT_USER")]
    default_user: Option<String>,
    /// The default user's password (RabbitMQ's default_pass).
    #[arg(long, env = "MAILROOM_DEFAULT_PASS", hide_env_values = true)]
    default_pass: Option<String>,
    /// Users who may log in from loopback addresses only: `none`, or a comma-separated list
    /// (RabbitMQ's loopback_users).
    #[arg(long, env = "MAILROOM_LOOPBACK_USERS", default_value = "guest")]
    loopback_users: String,
    /// AMQPS (AMQP over TLS) listen addresses, e.g. 0.0.0.0:5671 (repeat or comma-separate); needs
    /// --tls-cert and --tls-key.
    #[arg(long, env = "MAILROOM_AMQPS_LISTEN", value_delimiter = ',')]
    pub amqps_listen: Vec<SocketAddr>,
    /// The server's PEM certificate chain, leaf first (reloaded on SIGHUP).
    #[arg(long, env = "MAILROOM_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The server's PEM private key (reloaded on SIGHUP).
    #[arg(long, env = "MAILROOM_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates that sign client certificates.
    #[arg(long, env = "MAILROOM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificates: none, optional or required.
    #[arg(long, env = "MAILROOM_TLS_VERIFY", default_value = "none")]
    tls_verify: ClientVerification,
    /// What SASL EXTERNAL logs in as, from a verified client certificate: distinguished_name (e.g.
    /// "CN=alice,O=Org") or common_name (RabbitMQ's ssl_cert_login_from).
    #[arg(long, env = "MAILROOM_SSL_CERT_LOGIN_FROM", default_value = "distinguished_name")]
    ssl_cert_login_from: CertLoginFrom,
    /// Require a PROXY protocol v1/v2 header on every AMQP and AMQPS connection and take the client's
    /// address from it (RabbitMQ's proxy_protocol). Only trusted proxies may reach the listeners then.
    #[arg(long, env = "MAILROOM_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,
}

impl AccessArgs {
    /// The default user (flags, else guest/guest; clap already read the environment).
    pub fn default_user(&self) -> Result<DefaultUser, String> {
        DefaultUser::resolve(self.default_user.as_deref(), self.default_pass.as_deref(), |_| None)
            .map_err(|e| e.to_string())
    }

    /// The loopback-only users.
    pub fn loopback_users(&self) -> LoopbackUsers {
        LoopbackUsers::parse(&self.loopback_users)
    }

    /// The TLS acceptor of the AMQPS listener and of the HTTPS one (`https`), when one is asked for.
    pub fn tls_acceptor(&self, https: bool) -> Result<Option<Arc<TlsAcceptor>>, String> {
        if self.amqps_listen.is_empty() && !https {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Err("--amqps-listen and --https-listen need --tls-cert and --tls-key".into());
        };
        let settings = TlsSettings {
            cert: cert.clone(),
            key: key.clone(),
            ca: self.tls_ca.clone(),
            verify: self.tls_verify,
            cert_login_from: self.ssl_cert_login_from,
        };
        TlsAcceptor::new(settings).map(|a| Some(Arc::new(a))).map_err(|e| e.to_string())
    }
}

/// Re-reads the certificate and key on every SIGHUP; open connections keep theirs, a bad file keeps
/// the old configuration in force (and is logged).
pub fn reload_on_sighup(acceptor: Arc<TlsAcceptor>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot watch SIGHUP: TLS certificates will not be reloaded");
            return;
        };
        while hup.recv().await.is_some() {
            match acceptor.reload() {
                Ok(()) => tracing::info!("TLS certificates reloaded"),
                Err(e) => tracing::error!(error = %e, "cannot reload TLS certificates; keeping the old ones"),
            }
        }
    });
    #[cfg(not(unix))]
    drop(acceptor);
}
