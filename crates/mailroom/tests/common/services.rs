//! The services outside the test process that some tests need (RabbitMQ, PostgreSQL), and the one
//! place that decides whether such a test runs, is skipped with one line, or fails (`CI=true`).
//! std only, so the tests of other crates (`mailroom-cli`, `mailroom-amqp`) include it by path.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long a reachability probe waits for the TCP handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A service outside the test process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The RabbitMQ at `RABBITMQ_URL` (the oracle, and one of the SDK's targets).
    RabbitMq,
    /// The PostgreSQL at `MAILROOM_PG_URL` (inbox, outbox, saga store).
    Postgres,
}

impl Service {
    /// The environment variable that points the tests at it.
    pub fn env_var(self) -> &'static str {
        match self {
            Service::RabbitMq => "RABBITMQ_URL",
            Service::Postgres => "MAILROOM_PG_URL",
        }
    }

    /// The URL the tests use: the environment variable, or the default on our machines.
    pub fn url(self) -> String {
        let default = match self {
            Service::RabbitMq => "amqp://guest:guest@127.0.0.1:5672/%2F",
            Service::Postgres => "postgres://postgres@127.0.0.1:5432/test",
        };
        std::env::var(self.env_var()).unwrap_or_else(|_| default.into())
    }

    /// Its name in `MAILROOM_MISSING_SERVICES` (set by scripts/test-all.sh).
    fn key(self) -> &'static str {
        match self {
            Service::RabbitMq => "rabbitmq",
            Service::Postgres => "postgres",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Service::RabbitMq => "RabbitMQ",
            Service::Postgres => "PostgreSQL",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Service::RabbitMq => 5672,
            Service::Postgres => 5432,
        }
    }
}

/// The RabbitMQ URL (`RABBITMQ_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2F`).
pub fn rabbit_url() -> String {
    Service::RabbitMq.url()
}

/// The PostgreSQL URL (`MAILROOM_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
pub fn pg_url() -> String {
    Service::Postgres.url()
}

/// Host and port of `scheme://[user[:pass]@]host[:port][/path]`; None when it has no `://`.
fn host_port(url: &str, default_port: u16) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (h, p.parse().ok()?),
        _ => (hostport, default_port),
    };
    Some((host.trim_start_matches('[').trim_end_matches(']').to_owned(), port))
}

/// Why `service` cannot be reached (`host:port: error`), or None when a TCP connection succeeds.
/// A service scripts/test-all.sh found missing (`MAILROOM_MISSING_SERVICES=rabbitmq,postgres`) is
/// unreachable whatever answers on its default port (a chroot sees the host's ports).
fn unreachable(service: Service) -> Option<String> {
    let missing = std::env::var("MAILROOM_MISSING_SERVICES").unwrap_or_default();
    if missing.split(',').any(|k| k.trim() == service.key()) {
        return Some("scripts/test-all.sh found it missing".into());
    }
    let url = service.url();
    let Some((host, port)) = host_port(&url, service.default_port()) else {
        return Some(format!("{} is not a URL", service.env_var()));
    };
    let addrs: Vec<_> = match (host.as_str(), port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Some(format!("{host}:{port}: {e}")),
    };
    let mut why = format!("{host}:{port}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(_) => return None,
            Err(e) => why = format!("{host}:{port}: {e}"),
        }
    }
    Some(why)
}

/// True when every service in `needs` accepts connections, so `test` can run. Otherwise prints one
/// `SKIP` line, appends it to `$MAILROOM_SKIP_LOG` (scripts/test-all.sh counts them) and returns
/// false, so the test returns without running; with `CI=true` it panics instead (CI runs every test).
pub fn can_run(needs: &[Service], test: &str) -> bool {
    for &service in needs {
        let Some(why) = unreachable(service) else { continue };
        let line = format!(
            "SKIP {test}: needs {} ({why}); set {} or run scripts/test-all.sh as root to install it",
            service.name(),
            service.env_var()
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{line} (CI=true requires every service)");
        }
        eprintln!("{line}");
        if let Ok(path) = std::env::var("MAILROOM_SKIP_LOG") {
            // One short line per write with O_APPEND: tests running in parallel do not interleave.
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(f, "{line}");
            }
        }
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn host_and_port_of_urls() {
        assert_eq!(host_port("amqp://guest:guest@127.0.0.1:5673/%2F", 5672), Some(("127.0.0.1".into(), 5673)));
        assert_eq!(host_port("postgres://postgres@db/test", 5432), Some(("db".into(), 5432)));
        assert_eq!(host_port("amqp://[::1]:5672", 1), Some(("::1".into(), 5672)));
        assert_eq!(host_port("nonsense", 1), None);
    }
}
