//! `mailroom admin`: the broker's resources through its HTTP API (RabbitMQ's management API): list,
//! declare and delete them, publish, get, peek, purge, redrive, definitions export and import, close a
//! connection; users, permissions, vhosts and limits (see [`access`]). Answers print as tables (see
//! [`crate::table`]), or as JSON with `--json`. Over http or https (see [`client`]).

mod access;
mod client;
mod progress;

use clap::{Args, Subcommand};
use client::{encode, Client, Trust};
use serde_json::{json, Value};

/// Flags of `mailroom admin`.
#[derive(Args)]
pub struct AdminArgs {
    /// The broker's HTTP API (`http://host:port` or `https://host:port`).
    #[arg(long, env = "MAILROOM_ADMIN_URL", default_value = "http://127.0.0.1:15672")]
    url: String,
    /// https: trust the CA certificates in this PEM file (default: the system's CA bundle).
    #[arg(long, env = "MAILROOM_ADMIN_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// https: accept any server certificate (encrypted but unauthenticated; for tests only).
    #[arg(long, conflicts_with = "cacert")]
    insecure: bool,
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
    /// Show progress of long operations (redrive, import) on stderr even when it is not a terminal.
    #[arg(long, global = true)]
    progress: bool,
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
    /// Users: list, add, update (password, tags), delete.
    User {
        #[command(subcommand)]
        command: access::UserCommand,
    },
    /// Permissions on --vhost: list, set, clear.
    Permission {
        #[command(subcommand)]
        command: access::PermissionCommand,
    },
    /// Topic permissions on --vhost: list, set, clear.
    TopicPermission {
        #[command(subcommand)]
        command: access::TopicPermissionCommand,
    },
    /// Virtual hosts: list, add, delete.
    Vhost {
        #[command(subcommand)]
        command: access::VhostCommand,
    },
    /// Limits of --vhost (max-connections, max-queues): list, set, clear.
    VhostLimit {
        #[command(subcommand)]
        command: access::VhostLimitCommand,
    },
    /// Limits of users (max-connections, max-channels): list, set, clear.
    UserLimit {
        #[command(subcommand)]
        command: access::UserLimitCommand,
    },
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

/// Any error of an admin command (printed by `main`).
pub(crate) type BoxError = Box<dyn std::error::Error>;

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
    let trust = match (&args.cacert, args.insecure) {
        (Some(path), _) => Trust::CaFile(path.clone()),
        (None, true) => {
            if args.url.starts_with("https://") {
                eprintln!("warning: --insecure: the server's certificate is not checked; anyone in between can read and change this session");
            }
            Trust::Insecure
        }
        (None, false) => Trust::System,
    };
    let client = Client::new(&args.url, &args.user, &args.password, trust)?;
    let progress = progress::Mode::detect(args.progress);
    let vhost = encode(&args.vhost);
    // The table's columns (empty: the answer's own fields).
    let mut columns: &'static [&'static str] = &[];
    let answer = match args.command {
        AdminCommand::User { command } => with_columns(&mut columns, access::user(&client, command).await?),
        AdminCommand::Permission { command } => {
            with_columns(&mut columns, access::permission(&client, &args.vhost, command).await?)
        }
        AdminCommand::TopicPermission { command } => {
            with_columns(&mut columns, access::topic_permission(&client, &args.vhost, command).await?)
        }
        AdminCommand::Vhost { command } => with_columns(&mut columns, access::vhost(&client, command).await?),
        AdminCommand::VhostLimit { command } => {
            with_columns(&mut columns, access::vhost_limit(&client, &args.vhost, command).await?)
        }
        AdminCommand::UserLimit { command } => with_columns(&mut columns, access::user_limit(&client, command).await?),
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
            let import = client.request("POST", "/api/definitions", Some(&doc));
            progress::spinner(progress, "importing definitions", import).await?;
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
            let queue_path = format!("/api/queues/{vhost}/{}", encode(&queue));
            let redrive_path = format!("{queue_path}/redrive");
            let work = client.request("POST", &redrive_path, Some(&body));
            progress::redrive(progress, &client, &queue_path, count, work).await?
        }
    };
    match answer {
        Some(v) if args.json => println!("{}", serde_json::to_string_pretty(&v)?),
        Some(v) => print!("{}", crate::table::render(&v, columns)),
        None => {}
    }
    Ok(())
}

/// Takes the columns of an [`access::Answer`], returning its value.
fn with_columns(columns: &mut &'static [&'static str], (answer, cols): access::Answer) -> Option<Value> {
    *columns = cols;
    answer
}
