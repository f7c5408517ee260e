//! RabbitMQ's access-control table: which AMQP 0-9-1 operation needs which permission on which resource,
//! and the check of an operation against one user's grants in one vhost ([`VhostAccess`]).
//!
//! Source: RabbitMQ's access-control guide, "Authorisation: How Permissions Work"
//! (https://www.rabbitmq.com/docs/access-control#authorisation; rabbitmq-website `docs/access-control.md`):
//!
//! | AMQP 0-9-1 operation |                 | configure | write                  | read              |
//! |----------------------|-----------------|-----------|------------------------|-------------------|
//! | exchange.declare     | (passive=false) | exchange  |                        |                   |
//! | exchange.declare     | (passive=true)  |           |                        |                   |
//! | exchange.declare     | (with AE)       | exchange  | exchange (AE)          | exchange          |
//! | exchange.delete      |                 | exchange  |                        |                   |
//! | queue.declare        | (passive=false) | queue     |                        |                   |
//! | queue.declare        | (passive=true)  |           |                        |                   |
//! | queue.declare        | (with DLX)      | queue     | exchange (DLX)         | queue             |
//! | queue.delete         |                 | queue     |                        |                   |
//! | exchange.bind        |                 |           | exchange (destination) | exchange (source) |
//! | exchange.unbind      |                 |           | exchange (destination) | exchange (source) |
//! | queue.bind           |                 |           | queue                  | exchange          |
//! | queue.unbind         |                 |           | queue                  | exchange          |
//! | basic.publish        |                 |           | exchange               |                   |
//! | basic.get            |                 |           |                        | queue             |
//! | basic.consume        |                 |           |                        | queue             |
//! | queue.purge          |                 |           |                        | queue             |
//!
//! The order of the checks, and the structural refusals interleaved with them, follow
//! `rabbit_channel.erl` (`handle_method/5`, `binding_action`, `check_name`, `check_not_default_exchange`,
//! `check_exchange_deletion`) and `rabbit_access_control:check_resource_access` (the default exchange is
//! checked as `amq.default`), and were confirmed against RabbitMQ 3.10.8 with pika:
//! - a client-named queue starting with `amq.` is refused before any permission check, even if it exists;
//!   a server-named queue (`amq.gen-…`) needs `configure` on its generated name;
//! - an exchange named `amq.*` is refused only when it would be created, after the `configure` check;
//! - the AE / DLX checks apply only when the exchange / queue is created (RabbitMQ checks the vhost's
//!   `max-queues` before the DLX; the wire layer does that check, see [`super::limits`]);
//! - bindings check `write` on the destination, then refuse the default exchange as source or
//!   destination, then `read` on the source, then (source is a topic exchange) the topic `read`
//!   permission on the binding key; unbind is the same;
//! - publish checks `write` on the exchange, then (a topic exchange) the topic `write` permission on the
//!   routing key; topic permissions apply only where one is set for that exchange.
//!
//! Exclusive queues need no permission of their own; using another connection's exclusive queue is a
//! 405 RESOURCE_LOCKED from the vhost, not an access refusal.

use super::permissions::{
    permission_name, AccessError, CompiledTopicPermissions, Permission, Permissions, ResourceKind,
};
use std::collections::HashMap;

/// An AMQP operation that RabbitMQ checks, with what the check needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation<'a> {
    /// `exchange.declare`.
    ExchangeDeclare {
        /// The exchange.
        exchange: &'a str,
        /// Passive declares check nothing but the default exchange.
        passive: bool,
        /// Whether the exchange already exists (a redeclare creates nothing).
        exists: bool,
        /// The `alternate-exchange` argument, if any.
        alternate_exchange: Option<&'a str>,
    },
    /// `exchange.delete`.
    ExchangeDelete {
        /// The exchange.
        exchange: &'a str,
    },
    /// `queue.declare`.
    QueueDeclare {
        /// The queue; for a server-named queue, the name the server generated.
        queue: &'a str,
        /// The client left the name empty and the server generated `queue`.
        server_named: bool,
        /// Passive declares check nothing.
        passive: bool,
        /// Whether the queue already exists.
        exists: bool,
        /// The `x-dead-letter-exchange` argument, if any (`""` is the default exchange).
        dead_letter_exchange: Option<&'a str>,
    },
    /// `queue.delete`.
    QueueDelete {
        /// The queue.
        queue: &'a str,
    },
    /// `queue.bind` (and `queue.unbind`, which is checked the same).
    QueueBind {
        /// The destination queue.
        queue: &'a str,
        /// The source exchange.
        exchange: &'a str,
        /// The binding key.
        routing_key: &'a str,
        /// Whether the source exists and is a topic exchange.
        exchange_is_topic: bool,
    },
    /// `queue.unbind`.
    QueueUnbind {
        /// The destination queue.
        queue: &'a str,
        /// The source exchange.
        exchange: &'a str,
        /// The binding key.
        routing_key: &'a str,
        /// Whether the source exists and is a topic exchange.
        exchange_is_topic: bool,
    },
    /// `exchange.bind`.
    ExchangeBind {
        /// The destination exchange.
        destination: &'a str,
        /// The source exchange.
        source: &'a str,
        /// The binding key.
        routing_key: &'a str,
        /// Whether the source exists and is a topic exchange.
        source_is_topic: bool,
    },
    /// `exchange.unbind`.
    ExchangeUnbind {
        /// The destination exchange.
        destination: &'a str,
        /// The source exchange.
        source: &'a str,
        /// The binding key.
        routing_key: &'a str,
        /// Whether the source exists and is a topic exchange.
        source_is_topic: bool,
    },
    /// `basic.publish`.
    Publish {
        /// The exchange (`""` is the default exchange).
        exchange: &'a str,
        /// The routing key.
        routing_key: &'a str,
        /// Whether the exchange is a topic exchange.
        exchange_is_topic: bool,
    },
    /// `basic.get`.
    Get {
        /// The queue.
        queue: &'a str,
    },
    /// `basic.consume`.
    Consume {
        /// The queue.
        queue: &'a str,
    },
    /// `queue.purge`.
    Purge {
        /// The queue.
        queue: &'a str,
    },
}

/// One check of the table, in the order RabbitMQ makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    /// Refuse the default exchange (`""`).
    NotDefaultExchange {
        /// The exchange.
        exchange: &'a str,
    },
    /// Refuse a name starting with `amq.`.
    NotReservedName {
        /// Exchange or queue.
        kind: ResourceKind,
        /// The name.
        name: &'a str,
    },
    /// Refuse deleting an `amq.*` exchange.
    NotSystemExchange {
        /// The exchange.
        exchange: &'a str,
    },
    /// Require a permission on a resource.
    Resource {
        /// The permission.
        permission: Permission,
        /// Exchange or queue.
        kind: ResourceKind,
        /// The resource's name (`""` for the default exchange; checked as `amq.default`).
        name: &'a str,
    },
    /// Require a topic permission on a routing or binding key of a topic exchange.
    Topic {
        /// Write (publish) or read (bind, unbind).
        permission: Permission,
        /// The topic exchange.
        exchange: &'a str,
        /// The key.
        routing_key: &'a str,
    },
}

/// The checks of one operation (at most five; kept inline so a check allocates nothing).
#[derive(Debug, Clone, Copy)]
pub struct Steps<'a> {
    items: [Option<Step<'a>>; 5],
    len: usize,
}

impl<'a> Steps<'a> {
    fn new() -> Self {
        Self { items: [None; 5], len: 0 }
    }

    fn push(&mut self, step: Step<'a>) {
        // Every operation below pushes at most five steps (binding: write, default x2, read, topic).
        self.items[self.len] = Some(step);
        self.len += 1;
    }

    /// The steps in order.
    pub fn iter(&self) -> impl Iterator<Item = Step<'a>> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }
}

/// Which checks `op` needs, in RabbitMQ's order: the table above as code.
pub fn steps<'a>(op: &Operation<'a>) -> Steps<'a> {
    use Permission::*;
    use ResourceKind::*;
    let mut s = Steps::new();
    match *op {
        Operation::ExchangeDeclare { exchange, passive, exists, alternate_exchange } => {
            s.push(Step::NotDefaultExchange { exchange });
            if !passive {
                s.push(Step::Resource { permission: Configure, kind: Exchange, name: exchange });
                if !exists {
                    s.push(Step::NotReservedName { kind: Exchange, name: exchange });
                    if let Some(ae) = alternate_exchange {
                        s.push(Step::Resource { permission: Read, kind: Exchange, name: exchange });
                        s.push(Step::Resource { permission: Write, kind: Exchange, name: ae });
                    }
                }
            }
        }
        Operation::ExchangeDelete { exchange } => {
            s.push(Step::NotDefaultExchange { exchange });
            s.push(Step::NotSystemExchange { exchange });
            s.push(Step::Resource { permission: Configure, kind: Exchange, name: exchange });
        }
        Operation::QueueDeclare { queue, server_named, passive, exists, dead_letter_exchange } => {
            if !passive {
                if !server_named {
                    s.push(Step::NotReservedName { kind: Queue, name: queue });
                }
                s.push(Step::Resource { permission: Configure, kind: Queue, name: queue });
                if let (false, Some(dlx)) = (exists, dead_letter_exchange) {
                    s.push(Step::Resource { permission: Read, kind: Queue, name: queue });
                    s.push(Step::Resource { permission: Write, kind: Exchange, name: dlx });
                }
            }
        }
        Operation::QueueDelete { queue } => {
            s.push(Step::Resource { permission: Configure, kind: Queue, name: queue });
        }
        Operation::QueueBind { queue, exchange, routing_key, exchange_is_topic }
        | Operation::QueueUnbind { queue, exchange, routing_key, exchange_is_topic } => {
            s.push(Step::Resource { permission: Write, kind: Queue, name: queue });
            s.push(Step::NotDefaultExchange { exchange });
            s.push(Step::Resource { permission: Read, kind: Exchange, name: exchange });
            if exchange_is_topic {
                s.push(Step::Topic { permission: Read, exchange, routing_key });
            }
        }
        Operation::ExchangeBind { destination, source, routing_key, source_is_topic }
        | Operation::ExchangeUnbind { destination, source, routing_key, source_is_topic } => {
            s.push(Step::Resource { permission: Write, kind: Exchange, name: destination });
            s.push(Step::NotDefaultExchange { exchange: destination });
            s.push(Step::NotDefaultExchange { exchange: source });
            s.push(Step::Resource { permission: Read, kind: Exchange, name: source });
            if source_is_topic {
                s.push(Step::Topic { permission: Read, exchange: source, routing_key });
            }
        }
        Operation::Publish { exchange, routing_key, exchange_is_topic } => {
            s.push(Step::Resource { permission: Write, kind: Exchange, name: exchange });
            if exchange_is_topic {
                s.push(Step::Topic { permission: Write, exchange, routing_key });
            }
        }
        Operation::Get { queue } | Operation::Consume { queue } | Operation::Purge { queue } => {
            s.push(Step::Resource { permission: Read, kind: Queue, name: queue });
        }
    }
    s
}

/// One user's grants in one vhost: permissions, and topic permissions expanded for this user and vhost.
/// Built when a connection opens a vhost; checks against it take no lock and allocate only to report a
/// refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostAccess {
    user: String,
    vhost: String,
    permissions: Permissions,
    topics: HashMap<String, CompiledTopicPermissions>,
}

impl VhostAccess {
    /// Grants `permissions` (and topic permissions by exchange) to `user` in `vhost`.
    pub fn new(
        user: impl Into<String>,
        vhost: impl Into<String>,
        permissions: Permissions,
        topics: HashMap<String, CompiledTopicPermissions>,
    ) -> Self {
        Self { user: user.into(), vhost: vhost.into(), permissions, topics }
    }

    /// The user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The vhost.
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The user's permissions in the vhost.
    pub fn permissions(&self) -> &Permissions {
        &self.permissions
    }

    /// Whether topic permissions are set on `exchange` (only then does a publish need to know whether the
    /// exchange is a topic exchange).
    pub fn has_topic_permissions(&self, exchange: &str) -> bool {
        !self.topics.is_empty() && self.topics.contains_key(exchange)
    }

    /// Checks `op`: the first refusal, in RabbitMQ's order, or Ok.
    pub fn check(&self, op: &Operation<'_>) -> Result<(), AccessError> {
        steps(op).iter().try_for_each(|step| self.check_step(&step))
    }

    /// Checks one step of the table.
    pub fn check_step(&self, step: &Step<'_>) -> Result<(), AccessError> {
        match *step {
            Step::NotDefaultExchange { exchange } => match exchange {
                "" => Err(AccessError::DefaultExchange),
                _ => Ok(()),
            },
            Step::NotReservedName { kind, name } if name.starts_with("amq.") => {
                Err(AccessError::ReservedName { kind, name: name.to_owned() })
            }
            Step::NotReservedName { .. } => Ok(()),
            Step::NotSystemExchange { exchange } if exchange.starts_with("amq.") => {
                Err(AccessError::SystemExchange { name: exchange.to_owned(), vhost: self.vhost.clone() })
            }
            Step::NotSystemExchange { .. } => Ok(()),
            Step::Resource { permission, kind, name } => {
                let name = permission_name(kind, name);
                if self.permissions.allows(permission, name) {
                    Ok(())
                } else {
                    Err(AccessError::Resource {
                        permission,
                        kind,
                        name: name.to_owned(),
                        vhost: self.vhost.clone(),
                        user: self.user.clone(),
                    })
                }
            }
            Step::Topic { permission, exchange, routing_key } => match self.topics.get(exchange) {
                // No topic permission set for this exchange: allowed (RabbitMQ's opt-in rule).
                None => Ok(()),
                Some(t) if t.allows(permission, routing_key) => Ok(()),
                Some(_) => Err(AccessError::Topic {
                    permission,
                    routing_key: routing_key.to_owned(),
                    exchange: exchange.to_owned(),
                    vhost: self.vhost.clone(),
                    user: self.user.clone(),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::permissions::TopicPermissions;
    use super::*;
    use Permission::*;
    use ResourceKind::*;

    /// Only the resource checks of `op`, as (permission, kind, name) rows.
    fn resource_rows<'a>(op: &Operation<'a>) -> Vec<(Permission, ResourceKind, &'a str)> {
        steps(op)
            .iter()
            .filter_map(|s| match s {
                Step::Resource { permission, kind, name } => Some((permission, kind, name)),
                _ => None,
            })
            .collect()
    }

    fn declare_x(passive: bool, exists: bool, ae: Option<&'static str>) -> Operation<'static> {
        Operation::ExchangeDeclare { exchange: "x", passive, exists, alternate_exchange: ae }
    }

    fn declare_q(passive: bool, exists: bool, dlx: Option<&'static str>) -> Operation<'static> {
        Operation::QueueDeclare { queue: "q", server_named: false, passive, exists, dead_letter_exchange: dlx }
    }

    /// An operation and the (permission, kind, name) checks it needs.
    type Row = (Operation<'static>, Vec<(Permission, ResourceKind, &'static str)>);

    /// Every row of RabbitMQ's table, written out from the guide, against `steps`.
    #[test]
    fn the_table_row_by_row() {
        let rows: Vec<Row> = vec![
            (declare_x(false, false, None), vec![(Configure, Exchange, "x")]),
            (declare_x(true, true, None), vec![]),
            (
                declare_x(false, false, Some("ae")),
                vec![(Configure, Exchange, "x"), (Read, Exchange, "x"), (Write, Exchange, "ae")],
            ),
            // A redeclare creates nothing: the AE is not checked again.
            (declare_x(false, true, Some("ae")), vec![(Configure, Exchange, "x")]),
            (Operation::ExchangeDelete { exchange: "x" }, vec![(Configure, Exchange, "x")]),
            (declare_q(false, false, None), vec![(Configure, Queue, "q")]),
            (declare_q(true, true, None), vec![]),
            (
                declare_q(false, false, Some("dlx")),
                vec![(Configure, Queue, "q"), (Read, Queue, "q"), (Write, Exchange, "dlx")],
            ),
            (declare_q(false, true, Some("dlx")), vec![(Configure, Queue, "q")]),
            (Operation::QueueDelete { queue: "q" }, vec![(Configure, Queue, "q")]),
            (
                Operation::ExchangeBind { destination: "d", source: "s", routing_key: "k", source_is_topic: false },
                vec![(Write, Exchange, "d"), (Read, Exchange, "s")],
            ),
            (
                Operation::ExchangeUnbind { destination: "d", source: "s", routing_key: "k", source_is_topic: false },
                vec![(Write, Exchange, "d"), (Read, Exchange, "s")],
            ),
            (
                Operation::QueueBind { queue: "q", exchange: "x", routing_key: "k", exchange_is_topic: false },
                vec![(Write, Queue, "q"), (Read, Exchange, "x")],
            ),
            (
                Operation::QueueUnbind { queue: "q", exchange: "x", routing_key: "k", exchange_is_topic: false },
                vec![(Write, Queue, "q"), (Read, Exchange, "x")],
            ),
            (
                Operation::Publish { exchange: "x", routing_key: "k", exchange_is_topic: false },
                vec![(Write, Exchange, "x")],
            ),
            (Operation::Get { queue: "q" }, vec![(Read, Queue, "q")]),
            (Operation::Consume { queue: "q" }, vec![(Read, Queue, "q")]),
            (Operation::Purge { queue: "q" }, vec![(Read, Queue, "q")]),
        ];
        for (op, expected) in rows {
            assert_eq!(resource_rows(&op), expected, "{op:?}");
        }
    }

    /// Grants exactly the listed (permission, name) pairs, by exact-name patterns.
    fn grants(user: &str, configure: &[&str], write: &[&str], read: &[&str]) -> VhostAccess {
        let pat = |names: &[&str]| {
            if names.is_empty() {
                String::new()
            } else {
                let alts: Vec<String> = names.iter().map(|n| regex_lite::escape(n)).collect();
                format!("^({})$", alts.join("|"))
            }
        };
        let p = Permissions::new(&pat(configure), &pat(write), &pat(read)).unwrap();
        VhostAccess::new(user, "/", p, HashMap::new())
    }

    /// For every operation: granting exactly what its row needs passes, and withholding any one of those
    /// grants is refused with that grant's error.
    #[test]
    fn each_required_grant_is_necessary_and_together_sufficient() {
        let ops = [
            declare_x(false, false, Some("ae")),
            declare_x(false, false, None),
            Operation::ExchangeDelete { exchange: "x" },
            declare_q(false, false, Some("dlx")),
            declare_q(false, false, Some("")),
            Operation::QueueDelete { queue: "q" },
            Operation::ExchangeBind { destination: "d", source: "s", routing_key: "k", source_is_topic: false },
            Operation::ExchangeUnbind { destination: "d", source: "s", routing_key: "k", source_is_topic: false },
            Operation::QueueBind { queue: "q", exchange: "x", routing_key: "k", exchange_is_topic: false },
            Operation::QueueUnbind { queue: "q", exchange: "x", routing_key: "k", exchange_is_topic: false },
            Operation::Publish { exchange: "x", routing_key: "k", exchange_is_topic: false },
            Operation::Publish { exchange: "", routing_key: "q", exchange_is_topic: false },
            Operation::Get { queue: "q" },
            Operation::Consume { queue: "q" },
            Operation::Purge { queue: "q" },
        ];
        for op in ops {
            let rows: Vec<(Permission, ResourceKind, String)> =
                resource_rows(&op).into_iter().map(|(p, k, n)| (p, k, permission_name(k, n).to_owned())).collect();
            assert!(!rows.is_empty());
            let build = |skip: Option<usize>| {
                let mut c = vec![];
                let mut w = vec![];
                let mut r = vec![];
                for (i, (p, _, n)) in rows.iter().enumerate() {
                    if Some(i) == skip {
                        continue;
                    }
                    match p {
                        Configure => c.push(n.as_str()),
                        Write => w.push(n.as_str()),
                        Read => r.push(n.as_str()),
                    }
                }
                // Granting the same (permission, name) twice in a row would hide the skip: rows are distinct.
                grants("u", &c, &w, &r)
            };
            build(None).check(&op).unwrap_or_else(|e| panic!("{op:?} refused with all grants: {e}"));
            for (i, (p, k, n)) in rows.iter().enumerate() {
                let err = build(Some(i)).check(&op).unwrap_err();
                assert_eq!(
                    err,
                    AccessError::Resource {
                        permission: *p,
                        kind: *k,
                        name: n.clone(),
                        vhost: "/".into(),
                        user: "u".into()
                    },
                    "{op:?} without {p:?} on {n}"
                );
            }
        }
    }

    /// The refusals RabbitMQ 3.10.8 sent to pika, user `sectest` with configure
    /// `^(sectest-.*|amq\.default)$`, write `^sectest-w.*`, read `^sectest-r.*`.
    #[test]
    fn matches_rabbitmq_probe() {
        let p = Permissions::new("^(sectest-.*|amq\\.default)$", "^sectest-w.*", "^sectest-r.*").unwrap();
        let a = VhostAccess::new("sectest", "/", p, HashMap::new());
        let text = |op: Operation<'_>| a.check(&op).map_err(|e| e.reply_text());
        let declare = |q, server_named| Operation::QueueDeclare {
            queue: q,
            server_named,
            passive: false,
            exists: false,
            dead_letter_exchange: None,
        };
        assert_eq!(
            text(declare("x", false)),
            Err("ACCESS_REFUSED - access to queue 'x' in vhost '/' refused for user 'sectest'".into())
        );
        assert_eq!(text(declare("sectest-a", false)), Ok(()));
        assert_eq!(
            text(declare("amq.gen-jRv2S-ehzCJwkQTjyfOjMA", true)),
            Err("ACCESS_REFUSED - access to queue 'amq.gen-jRv2S-ehzCJwkQTjyfOjMA' in vhost '/' refused for user 'sectest'".into())
        );
        assert_eq!(
            text(declare("amq.foo", false)),
            Err("ACCESS_REFUSED - queue name 'amq.foo' contains reserved prefix 'amq.*'".into())
        );
        let xdeclare =
            |x| Operation::ExchangeDeclare { exchange: x, passive: false, exists: false, alternate_exchange: None };
        assert_eq!(
            text(xdeclare("amq.foo")),
            Err("ACCESS_REFUSED - access to exchange 'amq.foo' in vhost '/' refused for user 'sectest'".into())
        );
        assert_eq!(text(xdeclare("sectest-x")), Ok(()));
        assert_eq!(
            text(Operation::ExchangeDelete { exchange: "amq.direct" }),
            Err("ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed".into())
        );
        assert_eq!(
            text(Operation::ExchangeDelete { exchange: "" }),
            Err("ACCESS_REFUSED - operation not permitted on the default exchange".into())
        );
        assert_eq!(
            text(Operation::Publish { exchange: "", routing_key: "sectest-a", exchange_is_topic: false }),
            Err("ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' refused for user 'sectest'".into())
        );
        for op in [
            Operation::Consume { queue: "sectest-a" },
            Operation::Get { queue: "sectest-a" },
            Operation::Purge { queue: "sectest-a" },
            Operation::QueueBind {
                queue: "sectest-a",
                exchange: "amq.topic",
                routing_key: "k",
                exchange_is_topic: true,
            },
        ] {
            assert_eq!(
                text(op),
                Err("ACCESS_REFUSED - access to queue 'sectest-a' in vhost '/' refused for user 'sectest'".into())
            );
        }
        assert_eq!(
            text(Operation::QueueBind {
                queue: "sectest-wq",
                exchange: "",
                routing_key: "k",
                exchange_is_topic: false
            }),
            Err("ACCESS_REFUSED - operation not permitted on the default exchange".into())
        );
        assert_eq!(
            text(Operation::QueueBind {
                queue: "sectest-wq",
                exchange: "amq.topic",
                routing_key: "k",
                exchange_is_topic: true
            }),
            Err("ACCESS_REFUSED - access to exchange 'amq.topic' in vhost '/' refused for user 'sectest'".into())
        );
        assert_eq!(
            text(Operation::Publish { exchange: "amq.topic", routing_key: "other.k", exchange_is_topic: true }),
            Err("ACCESS_REFUSED - access to exchange 'amq.topic' in vhost '/' refused for user 'sectest'".into())
        );
        assert_eq!(
            text(Operation::QueueDeclare {
                queue: "sectest-dlx",
                server_named: false,
                passive: false,
                exists: false,
                dead_letter_exchange: Some("zz"),
            }),
            Err("ACCESS_REFUSED - access to queue 'sectest-dlx' in vhost '/' refused for user 'sectest'".into())
        );
        assert_eq!(text(Operation::QueueDelete { queue: "sectest-a" }), Ok(()));
    }

    /// The second probe: write and read `.*`, topic permissions on amq.topic write `^{username}\..*`,
    /// read `^{vhost}-r.*`.
    #[test]
    fn topic_permissions_match_rabbitmq_probe() {
        let p = Permissions::new("^(sectest-.*|amq\\.default)$", ".*", ".*").unwrap();
        let t = TopicPermissions::new("^{username}\\..*", "^{vhost}-r.*").unwrap();
        let topics = HashMap::from([("amq.topic".to_owned(), t.compile("sectest", "/").unwrap())]);
        let a = VhostAccess::new("sectest", "/", p, topics);
        let text = |op: Operation<'_>| a.check(&op).map_err(|e| e.reply_text());
        let refused = |key: &str| {
            Err(format!(
                "ACCESS_REFUSED - access to topic '{key}' in exchange 'amq.topic' in vhost '/' refused for user 'sectest'"
            ))
        };
        let publish = |k| Operation::Publish { exchange: "amq.topic", routing_key: k, exchange_is_topic: true };
        assert_eq!(text(publish("other.k")), refused("other.k"));
        assert_eq!(text(publish("sectest.k")), Ok(()));
        let bind = |k| Operation::QueueBind {
            queue: "sectest-q",
            exchange: "amq.topic",
            routing_key: k,
            exchange_is_topic: true,
        };
        assert_eq!(text(bind("zz")), refused("zz"));
        assert_eq!(text(bind("/-rk")), Ok(()));
        let unbind = Operation::QueueUnbind {
            queue: "sectest-q",
            exchange: "amq.topic",
            routing_key: "zz",
            exchange_is_topic: true,
        };
        assert_eq!(text(unbind), refused("zz"));
        let x2x = Operation::ExchangeBind {
            destination: "sectest-x",
            source: "amq.topic",
            routing_key: "zz",
            source_is_topic: true,
        };
        assert_eq!(text(x2x), refused("zz"));
        // The topic check is for topic exchanges only, and only where a topic permission is set.
        assert_eq!(
            text(Operation::Publish { exchange: "amq.topic", routing_key: "zz", exchange_is_topic: false }),
            Ok(())
        );
        assert_eq!(
            text(Operation::Publish { exchange: "other.topic", routing_key: "zz", exchange_is_topic: true }),
            Ok(())
        );
        // Publishing checks the write pattern, binding the read pattern.
        assert_eq!(text(publish("/-rk")), refused("/-rk"));
        assert_eq!(text(bind("sectest.k")), refused("sectest.k"));
    }

    #[test]
    fn structural_refusals_and_their_order() {
        let all = VhostAccess::new("u", "v", Permissions::full(), HashMap::new());
        let none = VhostAccess::new("u", "v", Permissions::new("", "", "").unwrap(), HashMap::new());
        // Passive declares: only the default exchange is refused; nothing else is checked.
        let passive_default =
            Operation::ExchangeDeclare { exchange: "", passive: true, exists: true, alternate_exchange: None };
        assert_eq!(none.check(&passive_default), Err(AccessError::DefaultExchange));
        none.check(&declare_x(true, true, None)).unwrap();
        none.check(&declare_q(true, true, None)).unwrap();
        // amq.* exchanges: refused on creation only; existing ones may be redeclared.
        let amq = |exists| Operation::ExchangeDeclare {
            exchange: "amq.direct",
            passive: false,
            exists,
            alternate_exchange: None,
        };
        assert!(matches!(all.check(&amq(false)), Err(AccessError::ReservedName { kind: Exchange, .. })));
        all.check(&amq(true)).unwrap();
        // amq.* queues: refused even when they exist; server-named ones are not refused.
        let amq_q = |server_named, exists| Operation::QueueDeclare {
            queue: "amq.gen-1",
            server_named,
            passive: false,
            exists,
            dead_letter_exchange: None,
        };
        assert!(matches!(all.check(&amq_q(false, true)), Err(AccessError::ReservedName { kind: Queue, .. })));
        all.check(&amq_q(true, false)).unwrap();
        // Binding to the default exchange is refused only after the write check on the destination.
        let bind_default =
            Operation::QueueBind { queue: "q", exchange: "", routing_key: "q", exchange_is_topic: false };
        assert!(matches!(none.check(&bind_default), Err(AccessError::Resource { permission: Write, .. })));
        assert_eq!(all.check(&bind_default), Err(AccessError::DefaultExchange));
        let x_to_default =
            Operation::ExchangeBind { destination: "", source: "s", routing_key: "", source_is_topic: false };
        assert_eq!(all.check(&x_to_default), Err(AccessError::DefaultExchange));
        // Deleting an amq.* exchange is refused before the configure check.
        assert!(matches!(
            none.check(&Operation::ExchangeDelete { exchange: "amq.fanout" }),
            Err(AccessError::SystemExchange { .. })
        ));
        // A DLX of "" is the default exchange, checked as amq.default.
        let dlx_default = declare_q(false, false, Some(""));
        let only_q = Permissions::new("^q$", "^q$", "^q$").unwrap();
        let a = VhostAccess::new("u", "v", only_q, HashMap::new());
        assert!(matches!(a.check(&dlx_default), Err(AccessError::Resource { ref name, .. }) if name == "amq.default"));
    }
}
