//! `mailroom admin` commands for the access model: users, permissions, topic permissions, vhosts and
//! vhost/user limits, over `/api/users`, `/api/permissions`, `/api/topic-permissions`, `/api/vhosts`,
//! `/api/vhost-limits` and `/api/user-limits` (RabbitMQ's paths). Argument order follows `rabbitmqctl`
//! (`set_permissions USER CONF WRITE READ`, `set_topic_permissions USER EXCHANGE WRITE READ`).

use super::client::{encode, Client};
use super::BoxError;
use clap::Subcommand;
use serde_json::{json, Value};

/// `user`: list, add, update, delete.
#[derive(Subcommand)]
pub enum UserCommand {
    /// List users and their tags.
    List,
    /// Create a user (or replace one: password and tags).
    Add {
        /// User name.
        name: String,
        /// The password (see also --password-stdin).
        #[arg(long, conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the password from the first line of standard input (keeps it out of `ps`).
        #[arg(long)]
        password_stdin: bool,
        /// Comma-separated tags: administrator, monitoring, policymaker, management.
        #[arg(long, default_value = "")]
        tags: String,
    },
    /// Change a user's password and/or tags (what is not given stays).
    Update {
        /// User name.
        name: String,
        /// The new password.
        #[arg(long, conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the new password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// The new comma-separated tags (an empty string removes every tag).
        #[arg(long)]
        tags: Option<String>,
    },
    /// Delete a user (and its permissions).
    Delete {
        /// User name.
        name: String,
    },
}

/// `permission` (on the --vhost): list, set, clear.
#[derive(Subcommand)]
pub enum PermissionCommand {
    /// List permissions (every vhost, or --user's).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Set a user's configure, write and read patterns on --vhost.
    Set {
        /// User name.
        user: String,
        /// Regular expression over resources the user may declare and delete.
        configure: String,
        /// Regular expression over resources the user may publish to or bind from.
        write: String,
        /// Regular expression over resources the user may consume, get, purge or bind to.
        read: String,
    },
    /// Remove a user's permissions on --vhost.
    Clear {
        /// User name.
        user: String,
    },
}

/// `topic-permission` (on the --vhost): list, set, clear.
#[derive(Subcommand)]
pub enum TopicPermissionCommand {
    /// List topic permissions (every vhost, or --user's).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Set the routing-key patterns a user may publish (write) and bind (read) with on a topic exchange.
    Set {
        /// User name.
        user: String,
        /// The topic exchange.
        exchange: String,
        /// Regular expression over routing keys the user may publish with.
        write: String,
        /// Regular expression over routing keys the user may bind with.
        read: String,
    },
    /// Remove a user's topic permissions on --vhost.
    Clear {
        /// User name.
        user: String,
    },
}

/// `vhost`: list, add, delete.
#[derive(Subcommand)]
pub enum VhostCommand {
    /// List vhosts.
    List,
    /// Create a vhost (the creating user gets full permissions on it, as in RabbitMQ).
    Add {
        /// Vhost name.
        name: String,
    },
    /// Delete a vhost with its queues, exchanges and stored messages.
    Delete {
        /// Vhost name.
        name: String,
    },
}

/// `vhost-limit` (on the --vhost): list, set, clear.
#[derive(Subcommand)]
pub enum VhostLimitCommand {
    /// List the limits of every vhost that has one.
    List,
    /// Set a limit of --vhost: max-connections or max-queues (negative: unlimited).
    Set {
        /// max-connections or max-queues.
        name: String,
        /// The limit.
        #[arg(allow_negative_numbers = true)]
        value: i64,
    },
    /// Remove a limit of --vhost.
    Clear {
        /// max-connections or max-queues.
        name: String,
    },
}

/// `user-limit`: list, set, clear.
#[derive(Subcommand)]
pub enum UserLimitCommand {
    /// List the limits of every user that has one.
    List,
    /// Set a user's limit: max-connections or max-channels (negative: unlimited).
    Set {
        /// User name.
        user: String,
        /// max-connections or max-channels.
        name: String,
        /// The limit.
        #[arg(allow_negative_numbers = true)]
        value: i64,
    },
    /// Remove a user's limit.
    Clear {
        /// User name.
        user: String,
        /// max-connections or max-channels.
        name: String,
    },
}

/// An answer and the columns of its table (empty: the answer's own fields).
pub type Answer = (Option<Value>, &'static [&'static str]);

/// Tags as the API takes them: a list, from a comma-separated flag.
fn tag_list(tags: &str) -> Vec<&str> {
    tags.split(',').map(str::trim).filter(|t| !t.is_empty()).collect()
}

/// The password from `--password` or the first line of standard input.
fn password_from(flag: Option<String>, stdin: bool) -> Result<Option<String>, BoxError> {
    if !stdin {
        return Ok(flag);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

/// Runs a `user` command.
pub async fn user(client: &Client, command: UserCommand) -> Result<Answer, BoxError> {
    Ok(match command {
        UserCommand::List => (client.request("GET", "/api/users", None).await?, &["name", "tags"]),
        UserCommand::Add { name, password, password_stdin, tags } => {
            let password =
                password_from(password, password_stdin)?.ok_or("a new user needs --password or --password-stdin")?;
            let body = json!({ "password": password, "tags": tag_list(&tags) });
            client.request("PUT", &format!("/api/users/{}", encode(&name)), Some(&body)).await?;
            (Some(json!({ "user": name, "tags": tag_list(&tags) })), &[])
        }
        UserCommand::Update { name, password, password_stdin, tags } => {
            let path = format!("/api/users/{}", encode(&name));
            let current = client.request("GET", &path, None).await?.unwrap_or(Value::Null);
            let tags: Vec<String> = match &tags {
                Some(t) => tag_list(t).into_iter().map(str::to_owned).collect(),
                None => current["tags"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .or_else(|| current["tags"].as_str().map(|s| tag_list(s).into_iter().map(str::to_owned).collect()))
                    .unwrap_or_default(),
            };
            let body = match password_from(password, password_stdin)? {
                Some(p) => json!({ "password": p, "tags": tags }),
                // Keep the password: send back its hash (an absent algorithm means MD5 in RabbitMQ's
                // export format, but SHA-256 in a PUT body).
                None => json!({
                    "password_hash": current["password_hash"].as_str().unwrap_or(""),
                    "hashing_algorithm": current["hashing_algorithm"].as_str().unwrap_or("rabbit_password_hashing_md5"),
                    "tags": tags,
                }),
            };
            client.request("PUT", &path, Some(&body)).await?;
            (Some(json!({ "user": name, "tags": tags })), &[])
        }
        UserCommand::Delete { name } => {
            client.request("DELETE", &format!("/api/users/{}", encode(&name)), None).await?;
            (Some(json!({ "deleted": "user", "name": name })), &[])
        }
    })
}

/// Runs a `permission` command on `vhost` (the raw name).
pub async fn permission(client: &Client, vhost: &str, command: PermissionCommand) -> Result<Answer, BoxError> {
    const COLUMNS: &[&str] = &["user", "vhost", "configure", "write", "read"];
    let v = encode(vhost);
    Ok(match command {
        PermissionCommand::List { user: None } => (client.request("GET", "/api/permissions", None).await?, COLUMNS),
        PermissionCommand::List { user: Some(u) } => {
            (client.request("GET", &format!("/api/users/{}/permissions", encode(&u)), None).await?, COLUMNS)
        }
        PermissionCommand::Set { user, configure, write, read } => {
            let body = json!({ "configure": configure, "write": write, "read": read });
            client.request("PUT", &format!("/api/permissions/{v}/{}", encode(&user)), Some(&body)).await?;
            (Some(json!({ "user": user, "vhost": vhost, "configure": configure, "write": write, "read": read })), &[])
        }
        PermissionCommand::Clear { user } => {
            client.request("DELETE", &format!("/api/permissions/{v}/{}", encode(&user)), None).await?;
            (Some(json!({ "cleared": "permissions", "user": user, "vhost": vhost })), &[])
        }
    })
}

/// Runs a `topic-permission` command on `vhost` (the raw name).
pub async fn topic_permission(
    client: &Client,
    vhost: &str,
    command: TopicPermissionCommand,
) -> Result<Answer, BoxError> {
    const COLUMNS: &[&str] = &["user", "vhost", "exchange", "write", "read"];
    let v = encode(vhost);
    Ok(match command {
        TopicPermissionCommand::List { user: None } => {
            (client.request("GET", "/api/topic-permissions", None).await?, COLUMNS)
        }
        TopicPermissionCommand::List { user: Some(u) } => {
            (client.request("GET", &format!("/api/users/{}/topic-permissions", encode(&u)), None).await?, COLUMNS)
        }
        TopicPermissionCommand::Set { user, exchange, write, read } => {
            let body = json!({ "exchange": exchange, "write": write, "read": read });
            client.request("PUT", &format!("/api/topic-permissions/{v}/{}", encode(&user)), Some(&body)).await?;
            (Some(json!({ "user": user, "vhost": vhost, "exchange": exchange, "write": write, "read": read })), &[])
        }
        TopicPermissionCommand::Clear { user } => {
            client.request("DELETE", &format!("/api/topic-permissions/{v}/{}", encode(&user)), None).await?;
            (Some(json!({ "cleared": "topic-permissions", "user": user, "vhost": vhost })), &[])
        }
    })
}

/// Runs a `vhost` command.
pub async fn vhost(client: &Client, command: VhostCommand) -> Result<Answer, BoxError> {
    Ok(match command {
        VhostCommand::List => {
            (client.request("GET", "/api/vhosts", None).await?, &["name", "messages", "messages_ready", "tracing"])
        }
        VhostCommand::Add { name } => {
            client.request("PUT", &format!("/api/vhosts/{}", encode(&name)), Some(&json!({}))).await?;
            (Some(json!({ "declared": "vhost", "name": name })), &[])
        }
        VhostCommand::Delete { name } => {
            client.request("DELETE", &format!("/api/vhosts/{}", encode(&name)), None).await?;
            (Some(json!({ "deleted": "vhost", "name": name })), &[])
        }
    })
}

/// Runs a `vhost-limit` command on `vhost` (the raw name).
pub async fn vhost_limit(client: &Client, vhost: &str, command: VhostLimitCommand) -> Result<Answer, BoxError> {
    let v = encode(vhost);
    Ok(match command {
        VhostLimitCommand::List => (client.request("GET", "/api/vhost-limits", None).await?, &["vhost", "value"]),
        VhostLimitCommand::Set { name, value } => {
            let path = format!("/api/vhost-limits/{v}/{}", encode(&name));
            client.request("PUT", &path, Some(&json!({ "value": value }))).await?;
            (Some(json!({ "vhost": vhost, "limit": name, "value": value })), &[])
        }
        VhostLimitCommand::Clear { name } => {
            client.request("DELETE", &format!("/api/vhost-limits/{v}/{}", encode(&name)), None).await?;
            (Some(json!({ "vhost": vhost, "cleared": name })), &[])
        }
    })
}

/// Runs a `user-limit` command.
pub async fn user_limit(client: &Client, command: UserLimitCommand) -> Result<Answer, BoxError> {
    Ok(match command {
        UserLimitCommand::List => (client.request("GET", "/api/user-limits", None).await?, &["user", "value"]),
        UserLimitCommand::Set { user, name, value } => {
            let path = format!("/api/user-limits/{}/{}", encode(&user), encode(&name));
            client.request("PUT", &path, Some(&json!({ "value": value }))).await?;
            (Some(json!({ "user": user, "limit": name, "value": value })), &[])
        }
        UserLimitCommand::Clear { user, name } => {
            let path = format!("/api/user-limits/{}/{}", encode(&user), encode(&name));
            client.request("DELETE", &path, None).await?;
            (Some(json!({ "user": user, "cleared": name })), &[])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_on_commas_and_drop_blanks() {
        assert_eq!(tag_list("administrator, monitoring,,"), vec!["administrator", "monitoring"]);
        assert!(tag_list("").is_empty());
    }
}
