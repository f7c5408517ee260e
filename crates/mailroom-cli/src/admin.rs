//! `mailroom admin`: the broker's resources through its HTTP API (RabbitMQ's management API): list,
//! declare and delete them, publish, get, peek, purge, redrive, definitions export and import, close a
//! connection. Answers print as tables (see [`crate::table`]), or as JSON with `--json`. A small HTTP/1.1
//! client over a tokio `TcpStream` (one request per connection, `Connection: close`).

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
    /// Print the API's JSON answer instead of a table (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

/// What `list` can list.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Listable {
    Queues,
    Exchanges,
    Bindings,
    Connections,
    Channels,
    Consumers,
    Vhosts,
    Policies,
    Nodes,
}

impl Listable {
    /// The API path (scoped to `vhost` where RabbitMQ's API scopes it) and the table's columns.
    fn path_and_columns(self, vhost: &str) -> (String, &'static [&'static str]) {
        match self {
            Listable::Queues => (
                format!("/api/queues/{vhost}"),
                &["name", "durable", "auto_delete", "messages_ready", "messages_unacknowledged", "consumers"],
            ),
            Listable::Exchanges => {
                (format!("/api/exchanges/{vhost}"), &["name", "type", "durable", "auto_delete", "internal"])
            }
            Listable::Bindings => (
                format!("/api/bindings/{vhost}"),
                &["source", "destination", "destination_type", "routing_key", "properties_key"],
            ),
            Listable::Connections => {
                ("/api/connections".into(), &["name", "user", "vhost", "channels", "client_properties.product"])
            }
            Listable::Channels => {
                ("/api/channels".into(), &["name", "user", "vhost", "consumer_count", "messages_unacknowledged"])
            }
            Listable::Consumers => (
                format!("/api/consumers/{vhost}"),
                &["queue.name", "consumer_tag", "channel_details.name", "ack_required", "prefetch_count"],
            ),
            Listable::Vhosts => ("/api/vhosts".into(), &["name", "messages", "messages_ready"]),
            Listable::Policies => {
                (format!("/api/policies/{vhost}"), &["name", "pattern", "apply-to", "priority", "definition"])
            }
            Listable::Nodes => ("/api/nodes".into(), &["name", "uptime", "mem_used", "mem_alarm", "disk_free_alarm"]),
        }
    }
}

/// `declare`: a queue, an exchange or a binding.
#[derive(Subcommand)]
enum DeclareCommand {
    /// Declare a queue (an existing one with the same settings is kept).
    Queue {
        /// Queue name.
        name: String,
        /// Transient instead of durable.
        #[arg(long)]
        transient: bool,
        /// Deleted when its last consumer goes.
        #[arg(long)]
        auto_delete: bool,
        /// Queue arguments, a JSON object (e.g. '{"x-max-length":1000}').
        #[arg(long)]
        arguments: Option<String>,
    },
    /// Declare an exchange.
    Exchange {
        /// Exchange name.
        name: String,
        /// direct, fanout, topic, headers, x-delayed-message, x-message-deduplication.
        #[arg(long = "type", default_value = "direct")]
        kind: String,
        /// Transient instead of durable.
        #[arg(long)]
        transient: bool,
        /// Deleted when its last binding goes.
        #[arg(long)]
        auto_delete: bool,
        /// Exchange arguments, a JSON object.
        #[arg(long)]
        arguments: Option<String>,
    },
    /// Bind a queue (or, with --to-exchange, an exchange) to an exchange.
    Binding {
        /// The source exchange.
        source: String,
        /// The destination queue (or exchange).
        destination: String,
        /// The destination is an exchange.
        #[arg(long)]
        to_exchange: bool,
        /// Routing key.
        #[arg(long, default_value = "")]
        routing_key: String,
        /// Binding arguments, a JSON object (headers exchanges).
        #[arg(long)]
        arguments: Option<String>,
    },
}

/// `delete`: a queue, an exchange or a binding.
#[derive(Subcommand)]
enum DeleteCommand {
    /// Delete a queue.
    Queue {
        /// Queue name.
        name: String,
        /// Only if it has no messages.
        #[arg(long)]
        if_empty: bool,
        /// Only if it has no consumers.
        #[arg(long)]
        if_unused: bool,
    },
    /// Delete an exchange.
    Exchange {
        /// Exchange name.
        name: String,
        /// Only if it has no bindings.
        #[arg(long)]
        if_unused: bool,
    },
    /// Delete a binding, named by its properties key (`list bindings` shows it; the routing key when
    /// the binding has no arguments).
    Binding {
        /// The source exchange.
        source: String,
        /// The destination queue (or exchange).
        destination: String,
        /// The destination is an exchange.
        #[arg(long)]
        to_exchange: bool,
        /// The binding's properties key.
        #[arg(long, default_value = "~")]
        properties_key: String,
    },
}

/// `definitions`: export or import RabbitMQ's definitions JSON.
#[derive(Subcommand)]
enum DefinitionsCommand {
    /// Print the definitions (all vhosts) as JSON, or write them to --file.
    Export {
        /// Write here instead of printing.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Import a definitions file (as `rabbitmqctl export_definitions` writes it).
    Import {
        /// The file.
        file: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// List queues, exchanges, bindings, connections, channels, consumers, vhosts, policies or nodes.
    List {
        /// What to list.
        what: Listable,
    },
    /// Declare a queue, an exchange or a binding.
    Declare {
        #[command(subcommand)]
        command: DeclareCommand,
    },
    /// Delete a queue, an exchange or a binding.
    Delete {
        #[command(subcommand)]
        command: DeleteCommand,
    },
    /// Publish a message through an exchange (the default exchange: `--exchange ""`).
    Publish {
        /// The message body (UTF-8).
        body: String,
        /// Exchange name.
        #[arg(long, default_value = "")]
        exchange: String,
        /// Routing key (the queue name, through the default exchange).
        #[arg(long)]
        routing_key: String,
        /// Message properties, a JSON object (e.g. '{"delivery_mode":2,"headers":{"k":"v"}}').
        #[arg(long)]
        properties: Option<String>,
    },
    /// Take messages from a queue (RabbitMQ's "get messages"): by default they go back (requeued).
    Get {
        /// The queue.
        queue: String,
        /// At most this many.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// ack_requeue_true (they stay), ack_requeue_false (consumed), reject_requeue_true, reject_requeue_false.
        #[arg(long, default_value = "ack_requeue_true")]
        ackmode: String,
    },
    /// Remove every ready message of a queue.
    Purge {
        /// The queue.
        queue: String,
    },
    /// Close a client connection (its name as `list connections` shows it).
    CloseConnection {
        /// The connection's name, `peer -> local`.
        name: String,
        /// The reason sent to the client in `connection.close`.
        #[arg(long, default_value = "closed by mailroom admin")]
        reason: String,
    },
    /// Export or import definitions (RabbitMQ's JSON format).
    Definitions {
        #[command(subcommand)]
        command: DefinitionsCommand,
    },
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

/// Parses an optional JSON object flag.
fn json_arg(flag: &str, text: Option<&str>) -> Result<Value, BoxError> {
    match text {
        None => Ok(json!({})),
        Some(t) => {
            let v: Value = serde_json::from_str(t).map_err(|e| format!("--{flag} is not valid JSON: {e}"))?;
            if v.is_object() {
                Ok(v)
            } else {
                Err(format!("--{flag} must be a JSON object").into())
            }
        }
    }
}

/// Runs one admin command, printing the answer as a table (or JSON with `--json`).
pub async fn run(args: AdminArgs) -> Result<(), BoxError> {
    let client = Client::new(&args.url, &args.user, &args.password)?;
    let vhost = encode(&args.vhost);
    // The table's columns (empty: the answer's own fields).
    let mut columns: &[&str] = &[];
    let answer = match args.command {
        AdminCommand::List { what } => {
            let (path, cols) = what.path_and_columns(&vhost);
            columns = cols;
            client.request("GET", &path, None).await?
        }
        AdminCommand::Declare { command: DeclareCommand::Queue { name, transient, auto_delete, arguments } } => {
            let body = json!({ "durable": !transient, "auto_delete": auto_delete,
                               "arguments": json_arg("arguments", arguments.as_deref())? });
            client.request("PUT", &format!("/api/queues/{vhost}/{}", encode(&name)), Some(&body)).await?;
            Some(json!({ "declared": "queue", "name": name }))
        }
        AdminCommand::Declare {
            command: DeclareCommand::Exchange { name, kind, transient, auto_delete, arguments },
        } => {
            let body = json!({ "type": kind, "durable": !transient, "auto_delete": auto_delete,
                               "arguments": json_arg("arguments", arguments.as_deref())? });
            client.request("PUT", &format!("/api/exchanges/{vhost}/{}", encode(&name)), Some(&body)).await?;
            Some(json!({ "declared": "exchange", "name": name }))
        }
        AdminCommand::Declare {
            command: DeclareCommand::Binding { source, destination, to_exchange, routing_key, arguments },
        } => {
            let kind = if to_exchange { "e" } else { "q" };
            let body = json!({ "routing_key": routing_key, "arguments": json_arg("arguments", arguments.as_deref())? });
            let path = format!("/api/bindings/{vhost}/e/{}/{kind}/{}", encode(&source), encode(&destination));
            client.request("POST", &path, Some(&body)).await?;
            Some(
                json!({ "declared": "binding", "source": source, "destination": destination, "routing_key": routing_key }),
            )
        }
        AdminCommand::Delete { command: DeleteCommand::Queue { name, if_empty, if_unused } } => {
            let path = format!("/api/queues/{vhost}/{}?if-empty={if_empty}&if-unused={if_unused}", encode(&name));
            client.request("DELETE", &path, None).await?;
            Some(json!({ "deleted": "queue", "name": name }))
        }
        AdminCommand::Delete { command: DeleteCommand::Exchange { name, if_unused } } => {
            let path = format!("/api/exchanges/{vhost}/{}?if-unused={if_unused}", encode(&name));
            client.request("DELETE", &path, None).await?;
            Some(json!({ "deleted": "exchange", "name": name }))
        }
        AdminCommand::Delete {
            command: DeleteCommand::Binding { source, destination, to_exchange, properties_key },
        } => {
            let kind = if to_exchange { "e" } else { "q" };
            let path = format!(
                "/api/bindings/{vhost}/e/{}/{kind}/{}/{}",
                encode(&source),
                encode(&destination),
                encode(&properties_key)
            );
            client.request("DELETE", &path, None).await?;
            Some(json!({ "deleted": "binding", "source": source, "destination": destination }))
        }
        AdminCommand::Publish { body, exchange, routing_key, properties } => {
            let exchange = if exchange.is_empty() { "amq.default".to_owned() } else { exchange };
            let request = json!({ "routing_key": routing_key, "payload": body, "payload_encoding": "string",
                                  "properties": json_arg("properties", properties.as_deref())? });
            let path = format!("/api/exchanges/{vhost}/{}/publish", encode(&exchange));
            client.request("POST", &path, Some(&request)).await?
        }
        AdminCommand::Get { queue, count, ackmode } => {
            columns = &["payload", "payload_bytes", "redelivered", "exchange", "routing_key", "message_count"];
            let request = json!({ "count": count, "ackmode": ackmode, "encoding": "auto" });
            client.request("POST", &format!("/api/queues/{vhost}/{}/get", encode(&queue)), Some(&request)).await?
        }
        AdminCommand::Purge { queue } => {
            client.request("DELETE", &format!("/api/queues/{vhost}/{}/contents", encode(&queue)), None).await?;
            Some(json!({ "purged": queue }))
        }
        AdminCommand::CloseConnection { name, reason } => {
            let path = format!("/api/connections/{}", encode(&name));
            client.request_with("DELETE", &path, None, &[("X-Reason", &reason)]).await?;
            Some(json!({ "closed": name, "reason": reason }))
        }
        AdminCommand::Definitions { command: DefinitionsCommand::Export { file } } => {
            let defs = client.request("GET", "/api/definitions", None).await?.unwrap_or(Value::Null);
            match file {
                Some(path) => {
                    std::fs::write(&path, serde_json::to_string_pretty(&defs)?)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    Some(json!({ "exported": path.display().to_string() }))
                }
                None => {
                    // Definitions are a document to save, not a table: always JSON.
                    println!("{}", serde_json::to_string_pretty(&defs)?);
                    None
                }
            }
        }
        AdminCommand::Definitions { command: DefinitionsCommand::Import { file } } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", file.display()))?;
            with_progress("importing definitions", client.request("POST", "/api/definitions", Some(&doc))).await?;
            Some(json!({ "imported": file.display().to_string() }))
        }
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
            columns = &["payload", "payload_bytes", "redelivered", "exchange", "routing_key"];
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
            let path = format!("/api/queues/{vhost}/{}/redrive", encode(&queue));
            with_progress("redriving", client.request("POST", &path, Some(&body))).await?
        }
    };
    match answer {
        Some(v) if args.json => println!("{}", serde_json::to_string_pretty(&v)?),
        Some(v) => print!("{}", crate::table::render(&v, columns)),
        None => {}
    }
    Ok(())
}

/// Runs `work`, showing `what` and the time it has taken on stderr while it runs, if stderr is a terminal
/// (the API answers a redrive or an import only when it is done, so there is no fraction to show).
async fn with_progress<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tokio::pin!(work);
    let spinner = ['|', '/', '-', '\\'];
    let mut turn = 0;
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tick.tick() => {
                turn += 1;
                let secs = started.elapsed().as_secs_f64();
                eprint!("\r{} {what}... {secs:.1} s", spinner[turn % spinner.len()]);
                let _ = std::io::stderr().flush();
            }
        }
    };
    // Clear the line (carriage return, erase to end of line).
    eprint!("\r\x1b[2K");
    out
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
        self.request_with(method, path, body, &[]).await
    }

    /// [`Client::request`] with extra headers (`X-Reason` of a connection close).
    async fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Option<Value>, BoxError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body, headers))
            .await
            .map_err(|_| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Option<Value>, BoxError> {
        if headers.iter().any(|(k, v)| [k, v].iter().any(|s| s.contains(['\r', '\n']))) {
            return Err("header values cannot contain line breaks".into());
        }
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let mut stream = tokio::net::TcpStream::connect(&self.host_port)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.host_port))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nConnection: close\r\n{extra}\
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
