//! The broker's cumulative fsync count, read before and after a run for the fsyncs/s figure.
//!
//! Two sources: an HTTP URL (Mailroom's `/metrics`, whose `mailroom_fsyncs_total` counts the store's
//! fsyncs, or RabbitMQ's management `/api/nodes`, whose `io_sync_count` counts its file syncs), or a
//! shell command that prints the count (for RabbitMQ without the management plugin, e.g.
//! `rabbitmqctl eval '{_, N} = lists:keyfind({io_sync,count}, 1, file_handle_cache_stats:get()), N.'`).
//! The HTTP client is a plain HTTP/1.0 GET over a TCP socket: one request per run needs no library.

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::BenchError;

/// Largest HTTP answer read (RabbitMQ's /api/nodes is a few tens of KiB).
const MAX_RESPONSE: usize = 8 << 20;

/// Where the fsync count comes from.
#[derive(Debug, Clone)]
pub enum FsyncSource {
    /// `http://[user:pass@]host:port/path`.
    Http {
        /// `host:port`.
        addr: String,
        /// Path and query.
        path: String,
        /// `user:pass`, sent as basic auth.
        auth: Option<String>,
    },
    /// A shell command whose output's last number is the count.
    Command(String),
}

impl FsyncSource {
    /// Parses `--metrics-url`.
    pub fn from_url(url: &str) -> Result<FsyncSource, BenchError> {
        let rest =
            url.strip_prefix("http://").ok_or_else(|| BenchError::Usage("--metrics-url must be http://".into()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        let (auth, addr) = match authority.rsplit_once('@') {
            Some((a, h)) => (Some(a.to_owned()), h.to_owned()),
            None => (None, authority.to_owned()),
        };
        Ok(FsyncSource::Http { addr, path: path.to_owned(), auth })
    }

    /// Reads the current count.
    pub async fn read(&self) -> Result<u64, BenchError> {
        match self {
            FsyncSource::Http { addr, path, auth } => {
                let body = http_get(addr, path, auth.as_deref()).await?;
                parse_count(&body).ok_or_else(|| {
                    BenchError::Protocol(format!("no mailroom_fsyncs_total or io_sync_count at http://{addr}{path}"))
                })
            }
            FsyncSource::Command(cmd) => {
                let cmd = cmd.clone();
                let out =
                    tokio::task::spawn_blocking(move || std::process::Command::new("sh").arg("-c").arg(&cmd).output())
                        .await
                        .map_err(|e| BenchError::Protocol(format!("fsync command panicked: {e}")))??;
                let text = String::from_utf8_lossy(&out.stdout);
                last_number(&text)
                    .ok_or_else(|| BenchError::Protocol(format!("fsync command printed no number: {}", text.trim())))
            }
        }
    }
}

async fn http_get(addr: &str, path: &str, auth: Option<&str>) -> Result<String, BenchError> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n");
    if let Some(a) = auth {
        req += &format!("Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(a));
    }
    req += "\r\n";
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    (&mut stream).take(MAX_RESPONSE as u64).read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(BenchError::Protocol(format!("GET http://{addr}{path}: {}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_owned())
}

/// The fsync count in a Prometheus text page (`mailroom_fsyncs_total N`) or in RabbitMQ's `/api/nodes`
/// JSON (the sum of every node's `io_sync_count`).
pub fn parse_count(body: &str) -> Option<u64> {
    if let Some(line) = body.lines().find(|l| l.starts_with("mailroom_fsyncs_total ")) {
        return line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|v| v as u64);
    }
    let nodes: serde_json::Value = serde_json::from_str(body).ok()?;
    let counts: Vec<u64> = nodes.as_array()?.iter().filter_map(|n| n.get("io_sync_count")?.as_u64()).collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

fn last_number(text: &str) -> Option<u64> {
    text.split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_brokers_and_commands() {
        let prom = "# HELP mailroom_fsyncs_total x\n# TYPE mailroom_fsyncs_total counter\nmailroom_fsyncs_total 1234\n";
        assert_eq!(parse_count(prom), Some(1234));
        let rabbit = r#"[{"name":"a","io_sync_count":7},{"name":"b","io_sync_count":5}]"#;
        assert_eq!(parse_count(rabbit), Some(12));
        assert_eq!(parse_count("nothing here"), None);
        assert_eq!(last_number("warning 3 ...\n42\n"), Some(42));
        assert_eq!(last_number("none"), None);
        match FsyncSource::from_url("http://guest:guest@127.0.0.1:15672/api/nodes").unwrap() {
            FsyncSource::Http { addr, path, auth } => {
                assert_eq!(
                    (addr.as_str(), path.as_str(), auth.as_deref()),
                    ("127.0.0.1:15672", "/api/nodes", Some("guest:guest"))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(FsyncSource::from_url("https://x").is_err());
    }
}
