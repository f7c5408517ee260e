//! `mailroom admin`: policies, peek and redrive through a running broker's HTTP API, with a small
//! HTTP/1.1 client over a tokio `TcpStream` (one request per connection, `Connection: close`).

use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest an admin request may take (connect, send and read the whole answer).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Flags of `mailroom admin`.
#[derive(Args)]
pub struct AdminArgs {
    /// The broker's HTTP API (`http://host:port`).
    #[arg(long, env = "MAILROOM_ADMIN_URL", default_value = "http://127.0.0.1:15672")]
    url: String,
    /// User name.
    #[arg(long, env = "MAILROOM_ADMIN_USER", default_value = "guest")]
    user: String,
    /// Password.
    #[arg(long, env = "MAILROOM_ADMIN_PASSWORD", default_value = "guest")]
    password: String,
    /// Virtual host.
    #[arg(long, default_value = "/")]
    vhost: String,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Policies: named argument sets applied to queues whose names match a pattern.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print ready messages of a queue without consuming them.
    Peek {
        /// The queue.
        queue: String,
        /// Skip this many ready messages.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Show at most this many.
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
    /// Move messages from a dead-letter queue back to where they died (or to another queue).
    Redrive {
        /// The dead-letter queue.
        queue: String,
        /// Move at most this many.
        #[arg(long)]
        count: Option<usize>,
        /// Send them to this queue instead.
        #[arg(long)]
        to_queue: Option<String>,
        /// Send them through this exchange instead (with --routing-key).
        #[arg(long, conflicts_with = "to_queue")]
        to_exchange: Option<String>,
        /// Routing key for --to-exchange.
        #[arg(long, requires = "to_exchange")]
        routing_key: Option<String>,
        /// Only messages with this header value (NAME=VALUE).
        #[arg(long)]
        header: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Create or replace a policy.
    Set {
        /// Policy name.
        name: String,
        /// Regular expression over queue names.
        pattern: String,
        /// The definition, a JSON object (e.g. '{"message-ttl":60000}').
        definition: String,
        /// Highest priority wins when several policies match.
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// What the policy applies to.
        #[arg(long, default_value = "queues")]
        apply_to: String,
    },
    /// List policies.
    List,
    /// Delete a policy.
    Delete {
        /// Policy name.
        name: String,
    },
}

type BoxError = Box<dyn std::error::Error>;

/// Runs one admin command, printing the answer as JSON.
pub async fn run(args: AdminArgs) -> Result<(), BoxError> {
    let client = Client::new(&args.url, &args.user, &args.password)?;
    let vhost = encode(&args.vhost);
    let answer = match args.command {
        AdminCommand::Policy { command: PolicyCommand::Set { name, pattern, definition, priority, apply_to } } => {
            let definition: Value =
                serde_json::from_str(&definition).map_err(|e| format!("DEFINITION is not valid JSON: {e}"))?;
            let body =
                json!({ "pattern": pattern, "definition": definition, "priority": priority, "apply-to": apply_to });
            client.request("PUT", &format!("/api/policies/{vhost}/{}", encode(&name)), Some(&body)).await?
        }
        AdminCommand::Policy { command: PolicyCommand::List } => {
            client.request("GET", &format!("/api/policies/{vhost}"), None).await?
        }
        AdminCommand::Policy { command: PolicyCommand::Delete { name } } => {
            client.request("DELETE", &format!("/api/policies/{vhost}/{}", encode(&name)), None).await?
        }
        AdminCommand::Peek { queue, offset, count } => {
            let path = format!("/api/queues/{vhost}/{}/peek?offset={offset}&count={count}", encode(&queue));
            client.request("GET", &path, None).await?
        }
        AdminCommand::Redrive { queue, count, to_queue, to_exchange, routing_key, header } => {
            let mut body = json!({});
            if let Some(n) = count {
                body["count"] = json!(n);
            }
            if let Some(q) = to_queue {
                body["target"] = json!({ "queue": q });
            }
            if let Some(ex) = to_exchange {
                body["target"] = json!({ "exchange": ex, "routing_key": routing_key.unwrap_or_default() });
            }
            if let Some(h) = header {
                let (name, value) = h.split_once('=').ok_or("--header takes NAME=VALUE")?;
                body["header_filter"] = json!({ "name": name, "value": value });
            }
            client.request("POST", &format!("/api/queues/{vhost}/{}/redrive", encode(&queue)), Some(&body)).await?
        }
    };
    if let Some(v) = answer {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

/// Percent-encodes a path segment (everything but unreserved characters).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Client {
    host_port: String,
    auth: String,
}

impl Client {
    fn new(url: &str, user: &str, password: &str) -> Result<Client, BoxError> {
        let rest = url.strip_prefix("http://").ok_or("--url must start with http:// (no TLS in the admin client)")?;
        let host_port = rest.trim_end_matches('/').to_owned();
        if host_port.is_empty() || host_port.contains('/') {
            return Err(format!("--url must be http://host:port, got {url}").into());
        }
        let host_port = if host_port.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            host_port
        } else {
            format!("{host_port}:80")
        };
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Client { host_port, auth })
    }

    /// Sends one request; an answer outside 2xx becomes an error carrying the server's reason.
    async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Option<Value>, BoxError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn request_inner(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Option<Value>, BoxError> {
        let mut stream = tokio::net::TcpStream::connect(&self.host_port)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.host_port))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host_port,
            self.auth,
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("malformed HTTP answer")?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut payload = raw[split + 4..].to_vec();
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("malformed HTTP status line")?;
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            payload = dechunk(&payload)?;
        }
        let value: Option<Value> = if payload.is_empty() { None } else { serde_json::from_slice(&payload).ok() };
        if !(200..300).contains(&status) {
            let reason = value
                .as_ref()
                .and_then(|v| v.get("reason"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&payload).into_owned());
            return Err(format!("{method} {path}: HTTP {status}: {reason}").into());
        }
        Ok(value)
    }
}

/// Decodes a chunked body.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, BoxError> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let size_text = std::str::from_utf8(&data[..line_end])?.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
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
    }

    #[test]
    fn parses_urls() {
        assert_eq!(Client::new("http://127.0.0.1:15672", "u", "p").unwrap().host_port, "127.0.0.1:15672");
        assert_eq!(Client::new("http://localhost/", "u", "p").unwrap().host_port, "localhost:80");
        assert!(Client::new("https://x", "u", "p").is_err());
    }
}
