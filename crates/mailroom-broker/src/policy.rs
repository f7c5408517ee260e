//! Policies: named argument sets applied to the queues whose names match a pattern, as RabbitMQ's.
//!
//! One policy applies per queue: the matching one with the highest priority (ties: the greatest name, so
//! the choice is stable). The definition keys are RabbitMQ's (`message-ttl`, `expires`, `max-length`,
//! `max-length-bytes`, `overflow`, `dead-letter-exchange`, `dead-letter-routing-key`, `delivery-limit`);
//! they are validated as the matching `x-` queue arguments would be. For `expires`, `message-ttl`,
//! `max-length` and `max-length-bytes` the effective value is the smaller of argument and policy; for the
//! others a declared argument wins, as RabbitMQ. Which keys exist and how each merges is read from the
//! queue-argument table ([`crate::args::ARGUMENTS`]).

use crate::args::{Merge, QueueArguments, ARGUMENTS};
use crate::error::{BrokerError, Result};
use amq_protocol_types::{AMQPValue, FieldTable};

/// Definition keys a policy may set on queues (those of [`ARGUMENTS`] with a policy key, in its order).
pub fn supported_keys() -> impl Iterator<Item = &'static str> {
    ARGUMENTS.iter().filter_map(|s| s.policy.as_ref().map(|p| p.key))
}

/// Longest pattern accepted (patterns are compiled and matched against every queue name).
pub const MAX_PATTERN_LEN: usize = 1024;

/// What a policy applies to (`apply-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    /// Queues only.
    Queues,
    /// Exchanges only (no exchange keys are supported yet, so such a policy changes nothing).
    Exchanges,
    /// Queues and exchanges.
    All,
}

impl ApplyTo {
    /// Parses RabbitMQ's names.
    pub fn parse(s: &str) -> Result<ApplyTo> {
        match s {
            "queues" => Ok(ApplyTo::Queues),
            "exchanges" => Ok(ApplyTo::Exchanges),
            "all" => Ok(ApplyTo::All),
            other => Err(BrokerError::precondition(format!("invalid apply-to '{other}' (queues, exchanges or all)"))),
        }
    }
    /// RabbitMQ's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::All => "all",
        }
    }
    fn queues(self) -> bool {
        matches!(self, ApplyTo::Queues | ApplyTo::All)
    }
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its name.
    pub name: String,
    /// The regular expression over resource names, as given.
    pub pattern: String,
    /// What it applies to.
    pub apply_to: ApplyTo,
    /// Highest wins.
    pub priority: i64,
    /// The definition as given (RabbitMQ keys, without `x-`).
    pub definition: FieldTable,
    /// The definition validated as queue arguments.
    pub args: QueueArguments,
    regex: regex_lite::Regex,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.pattern == other.pattern
            && self.apply_to == other.apply_to
            && self.priority == other.priority
            && self.definition == other.definition
    }
}

impl Policy {
    /// Validates a policy: a compilable pattern, known definition keys (`max-priority` refused, as
    /// RabbitMQ cannot set it by policy) with values valid as the matching queue arguments.
    pub fn new(name: &str, pattern: &str, apply_to: ApplyTo, priority: i64, definition: FieldTable) -> Result<Policy> {
        if name.is_empty() {
            return Err(BrokerError::precondition("policy name must not be empty"));
        }
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(BrokerError::precondition(format!("pattern longer than {MAX_PATTERN_LEN} bytes")));
        }
        let regex = regex_lite::Regex::new(pattern)
            .map_err(|e| BrokerError::precondition(format!("invalid pattern '{pattern}': {e}")))?;
        if definition.inner().is_empty() {
            return Err(BrokerError::precondition("policy definition must not be empty"));
        }
        let mut as_args = FieldTable::default();
        for (key, value) in definition.inner() {
            let key = key.as_str();
            if key == "max-priority" {
                return Err(BrokerError::precondition(
                    "max-priority cannot be set by a policy (declare the queue with x-max-priority)",
                ));
            }
            let Some((spec, policy_key)) =
                ARGUMENTS.iter().find_map(|s| s.policy.as_ref().filter(|p| p.key == key).map(|p| (s, p)))
            else {
                return Err(BrokerError::precondition(format!(
                    "unsupported policy key '{key}' (supported: {})",
                    supported_keys().collect::<Vec<_>>().join(", ")
                )));
            };
            if let Some(check) = policy_key.check {
                check(value)?;
            }
            as_args.insert(spec.name.into(), value.clone());
        }
        let args = QueueArguments::parse(&as_args, &format!("policy {name}"), "")
            .map_err(|e| BrokerError::precondition(format!("invalid definition of policy '{name}': {}", e.message)))?;
        Ok(Policy { name: name.to_owned(), pattern: pattern.to_owned(), apply_to, priority, definition, args, regex })
    }

    /// Whether it applies to the queue `name`.
    pub fn matches_queue(&self, name: &str) -> bool {
        self.apply_to.queues() && self.regex.is_match(name)
    }
}

/// The policy that applies to queue `name`: the highest priority among matching ones.
pub fn select<'a>(policies: &'a [Policy], name: &str) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|p| p.matches_queue(name))
        .max_by(|a, b| a.priority.cmp(&b.priority).then_with(|| a.name.cmp(&b.name)))
}

/// A queue's effective arguments under `policy`, each argument merged as its [`ARGUMENTS`] entry says:
/// min(argument, policy) for `expires`, `message-ttl`, `max-length` and `max-length-bytes`; for the others
/// a declared argument wins (`declared_table` tells which were declared, since a parsed default looks like
/// an absent value).
pub fn effective(declared: &QueueArguments, declared_table: &FieldTable, policy: Option<&Policy>) -> QueueArguments {
    let Some(p) = policy else { return declared.clone() };
    let mut e = declared.clone();
    for spec in ARGUMENTS {
        let Some(key) = &spec.policy else { continue };
        match key.merge {
            Merge::Always(merge) => merge(&mut e, &p.args),
            Merge::UnlessDeclared(merge) => {
                if !declared_table.contains_key(spec.name) && p.definition.contains_key(key.key) {
                    merge(&mut e, &p.args);
                }
            }
        }
    }
    e
}

/// An integer definition value, for callers that build definitions.
pub fn int(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Overflow;

    fn def(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }
    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(s.into())
    }
    fn policy(name: &str, pattern: &str, priority: i64, pairs: &[(&str, AMQPValue)]) -> Policy {
        Policy::new(name, pattern, ApplyTo::Queues, priority, def(pairs)).unwrap()
    }

    #[test]
    fn validation() {
        assert!(Policy::new("p", "^a", ApplyTo::Queues, 0, def(&[("max-priority", int(5))])).is_err());
        assert!(Policy::new("p", "^a", ApplyTo::Queues, 0, def(&[("bogus", int(5))])).is_err());
        assert!(Policy::new("p", "(", ApplyTo::Queues, 0, def(&[("max-length", int(5))])).is_err());
        assert!(Policy::new("p", "^a", ApplyTo::Queues, 0, def(&[("max-length", text("x"))])).is_err());
        assert!(Policy::new("p", "^a", ApplyTo::Queues, 0, def(&[("message-ttl", int(-1))])).is_err());
        assert!(Policy::new("p", "^a", ApplyTo::Queues, 0, def(&[("overflow", text("sideways"))])).is_err());
        assert!(Policy::new("p", "^a", ApplyTo::Queues, 0, FieldTable::default()).is_err());
        assert!(ApplyTo::parse("bindings").is_err());
        let p = policy("p", "^a", 0, &[("overflow", text("reject-publish")), ("dead-letter-exchange", text("dlx"))]);
        assert_eq!(p.args.overflow, Overflow::RejectPublish);
    }

    #[test]
    fn highest_priority_matching_policy_wins() {
        let ps = vec![
            policy("low", ".*", 0, &[("max-length", int(1))]),
            policy("high", "^orders", 5, &[("max-length", int(2))]),
            policy("exchanges", ".*", 9, &[("max-length", int(3))]),
        ];
        let mut ps = ps;
        ps[2].apply_to = ApplyTo::Exchanges;
        assert_eq!(select(&ps, "orders.eu").unwrap().name, "high");
        assert_eq!(select(&ps, "billing").unwrap().name, "low");
        assert!(select(&ps[1..2], "billing").is_none());
    }

    #[test]
    fn min_rule_and_argument_wins_rule() {
        let table = def(&[
            ("x-message-ttl", int(5000)),
            ("x-max-length", int(10)),
            ("x-dead-letter-exchange", text("arg-dlx")),
            ("x-overflow", text("drop-head")),
        ]);
        let declared = QueueArguments::parse(&table, "q", "/").unwrap();
        let p = policy(
            "p",
            ".*",
            0,
            &[
                ("message-ttl", int(1000)),
                ("max-length", int(50)),
                ("expires", int(60000)),
                ("max-length-bytes", int(4096)),
                ("dead-letter-exchange", text("policy-dlx")),
                ("dead-letter-routing-key", text("rk")),
                ("overflow", text("reject-publish")),
                ("delivery-limit", int(3)),
            ],
        );
        let e = effective(&declared, &table, Some(&p));
        assert_eq!(e.message_ttl, Some(1000));
        assert_eq!(e.max_length, Some(10));
        assert_eq!(e.expires, Some(60000));
        assert_eq!(e.max_length_bytes, Some(4096));
        assert_eq!(e.dead_letter_exchange.as_deref(), Some("arg-dlx"));
        assert_eq!(e.dead_letter_routing_key.as_deref(), Some("rk"));
        assert_eq!(e.overflow, Overflow::DropHead);
        assert_eq!(e.delivery_limit, Some(3));
        assert_eq!(effective(&declared, &table, None), declared);
        let bare = QueueArguments::default();
        let e = effective(&bare, &FieldTable::default(), Some(&p));
        assert_eq!(e.overflow, Overflow::RejectPublish);
        assert_eq!(e.dead_letter_exchange.as_deref(), Some("policy-dlx"));
    }
}
