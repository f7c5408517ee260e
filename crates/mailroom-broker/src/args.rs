//! Queue arguments: RabbitMQ 3.10's `x-` names, type-checked at declare time, compared on redeclare and
//! set by policies, all driven by one table ([`ARGUMENTS`]). Adding an argument: a field of
//! [`QueueArguments`] and an entry in the table here, and its behaviour in the queue.

use crate::error::{BrokerError, Result};
use amq_protocol_types::{AMQPValue, FieldTable};

/// What a queue does when a length limit is reached (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest message: RabbitMQ's default.
    #[default]
    DropHead,
    /// Refuse the new message (nack with confirms).
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// The queue type a client asked for (`x-queue-type`); Mailroom serves all with one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// RabbitMQ's classic queue.
    #[default]
    Classic,
    /// RabbitMQ's replicated quorum queue (durable, non-exclusive, non-auto-delete only).
    Quorum,
    /// RabbitMQ's stream queue.
    Stream,
}

/// The validated arguments of a queue, parsed once at declare.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArguments {
    /// `x-message-ttl`: per-queue message TTL in ms.
    pub message_ttl: Option<u64>,
    /// `x-expires`: delete the queue after this many ms unused.
    pub expires: Option<u64>,
    /// `x-dead-letter-exchange`.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-max-length`: most ready messages.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: most ready body bytes.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-max-priority` (1..=255 makes a priority queue).
    pub max_priority: Option<u8>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `x-delivery-limit`.
    pub delivery_limit: Option<u64>,
    /// `x-queue-type`.
    pub queue_type: QueueType,
    /// `x-message-deduplication` (the deduplication plugin's queue argument).
    pub deduplication: bool,
}

/// Largest TTL RabbitMQ accepts (its timer limit), in ms.
const MAX_TTL_MS: i128 = 4_294_967_295;

/// Reads an integer argument of any AMQP integer width, as RabbitMQ does.
pub fn int_value(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => *v as i128,
        AMQPValue::ShortShortUInt(v) => *v as i128,
        AMQPValue::ShortInt(v) => *v as i128,
        AMQPValue::ShortUInt(v) => *v as i128,
        AMQPValue::LongInt(v) => *v as i128,
        AMQPValue::LongUInt(v) => *v as i128,
        AMQPValue::LongLongInt(v) => *v as i128,
        _ => return None,
    })
}

/// Reads a string argument (long or short string).
pub fn string_value(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// RabbitMQ's name for an AMQP field type, for error texts.
pub fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// RabbitMQ's type classes: all integer widths compare equal, as do float and double.
pub fn type_class(value: &AMQPValue) -> &'static str {
    match value {
        v if int_value(v).is_some() => "int",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "float",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        other => type_name(other),
    }
}

/// Whether two field values are equal under RabbitMQ's type-class comparison.
pub fn values_equivalent(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (int_value(a), int_value(b)) {
        return x == y;
    }
    match (a, b) {
        (AMQPValue::Float(x), AMQPValue::Double(y)) | (AMQPValue::Double(y), AMQPValue::Float(x)) => (*x as f64) == *y,
        (x, y) if type_class(x) == "longstr" && type_class(y) == "longstr" => string_value(x) == string_value(y),
        (x, y) => x == y,
    }
}

/// Renders a value for an error text, roughly as RabbitMQ prints it.
fn render(value: &AMQPValue) -> String {
    match value {
        v if int_value(v).is_some() => int_value(v).map(|i| i.to_string()).unwrap_or_default(),
        v if string_value(v).is_some() => string_value(v).unwrap_or_default(),
        AMQPValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// One queue argument: how it is validated and stored, whether a redeclare compares it, and how a policy
/// sets it. [`ARGUMENTS`] lists them all: parsing, redeclare equivalence and policies read only it.
pub struct ArgSpec {
    /// The `x-` name.
    pub name: &'static str,
    /// Compared on redeclare (RabbitMQ 3.10's equivalence check; a difference is 406).
    pub compared: bool,
    /// Validates a value and stores what the queue uses of it.
    pub parse: fn(&mut QueueArguments, &Arg<'_>) -> Result<()>,
    /// The policy definition key that sets it, if a policy may.
    pub policy: Option<PolicyKey>,
}

/// How a policy sets a queue argument.
pub struct PolicyKey {
    /// The definition key (RabbitMQ's, without `x-`).
    pub key: &'static str,
    /// How the policy's value combines with a declared one.
    pub merge: Merge,
    /// A check of the policy's value before it is parsed as the argument, with its own message.
    pub check: Option<fn(&AMQPValue) -> Result<()>>,
}

/// How a policy value combines with the declared argument.
pub enum Merge {
    /// The effective value is `f(effective, policy)` (the smaller of the two, for limits and TTLs).
    Always(fn(&mut QueueArguments, &QueueArguments)),
    /// A declared argument wins; else `f(effective, policy)` copies the policy's value (when it sets it).
    UnlessDeclared(fn(&mut QueueArguments, &QueueArguments)),
}

/// The smaller of two optional limits (either alone if the other is unset).
fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Largest value of an unbounded integer argument.
const MAX_INT: i128 = i64::MAX as i128;

/// Every queue argument, in the order RabbitMQ 3.10 compares them on redeclare.
pub static ARGUMENTS: &[ArgSpec] = &[
    ArgSpec {
        name: "x-expires",
        compared: true,
        parse: |q, a| {
            q.expires = Some(a.int(1, MAX_TTL_MS)?);
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "expires",
            merge: Merge::Always(|e, p| e.expires = min(e.expires, p.expires)),
            check: None,
        }),
    },
    ArgSpec {
        name: "x-message-ttl",
        compared: true,
        parse: |q, a| {
            q.message_ttl = Some(a.int(0, MAX_TTL_MS)?);
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "message-ttl",
            merge: Merge::Always(|e, p| e.message_ttl = min(e.message_ttl, p.message_ttl)),
            check: None,
        }),
    },
    ArgSpec {
        name: "x-dead-letter-exchange",
        compared: true,
        parse: |q, a| {
            q.dead_letter_exchange = Some(a.string()?);
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "dead-letter-exchange",
            merge: Merge::UnlessDeclared(|e, p| e.dead_letter_exchange = p.dead_letter_exchange.clone()),
            check: None,
        }),
    },
    ArgSpec {
        name: "x-dead-letter-routing-key",
        compared: true,
        parse: |q, a| {
            q.dead_letter_routing_key = Some(a.string()?);
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "dead-letter-routing-key",
            merge: Merge::UnlessDeclared(|e, p| e.dead_letter_routing_key = p.dead_letter_routing_key.clone()),
            check: None,
        }),
    },
    ArgSpec {
        name: "x-max-length",
        compared: true,
        parse: |q, a| {
            q.max_length = Some(a.int(0, MAX_INT)?);
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "max-length",
            merge: Merge::Always(|e, p| e.max_length = min(e.max_length, p.max_length)),
            check: None,
        }),
    },
    ArgSpec {
        name: "x-max-length-bytes",
        compared: true,
        parse: |q, a| {
            q.max_length_bytes = Some(a.int(0, MAX_INT)?);
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "max-length-bytes",
            merge: Merge::Always(|e, p| e.max_length_bytes = min(e.max_length_bytes, p.max_length_bytes)),
            check: None,
        }),
    },
    ArgSpec { name: "x-max-in-memory-length", compared: true, parse: |_, a| a.int(0, MAX_INT).map(drop), policy: None },
    ArgSpec { name: "x-max-in-memory-bytes", compared: true, parse: |_, a| a.int(0, MAX_INT).map(drop), policy: None },
    ArgSpec {
        name: "x-max-priority",
        compared: true,
        parse: |q, a| {
            let p = a.int(0, 255)?;
            q.max_priority = (p > 0).then_some(p as u8);
            Ok(())
        },
        policy: None,
    },
    ArgSpec {
        name: "x-overflow",
        compared: true,
        parse: |q, a| {
            q.overflow = match a.one_of(&["drop-head", "reject-publish", "reject-publish-dlx"])?.as_str() {
                "reject-publish" => Overflow::RejectPublish,
                "reject-publish-dlx" => Overflow::RejectPublishDlx,
                _ => Overflow::DropHead,
            };
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "overflow",
            merge: Merge::UnlessDeclared(|e, p| e.overflow = p.overflow),
            check: None,
        }),
    },
    ArgSpec {
        name: "x-queue-mode",
        compared: true,
        parse: |_, a| a.one_of(&["default", "lazy"]).map(drop),
        policy: None,
    },
    ArgSpec { name: "x-queue-version", compared: true, parse: |_, a| a.int(1, 2).map(drop), policy: None },
    ArgSpec {
        name: "x-single-active-consumer",
        compared: true,
        parse: |q, a| {
            q.single_active_consumer = a.boolean()?;
            Ok(())
        },
        policy: None,
    },
    ArgSpec {
        name: "x-queue-type",
        compared: true,
        parse: |q, a| {
            q.queue_type = match a.one_of(&["classic", "quorum", "stream"])?.as_str() {
                "quorum" => QueueType::Quorum,
                "stream" => QueueType::Stream,
                _ => QueueType::Classic,
            };
            Ok(())
        },
        policy: None,
    },
    ArgSpec {
        name: "x-quorum-initial-group-size",
        compared: true,
        parse: |_, a| a.int(1, MAX_INT).map(drop),
        policy: None,
    },
    ArgSpec { name: "x-max-age", compared: true, parse: |_, a| a.string().map(drop), policy: None },
    ArgSpec {
        name: "x-stream-max-segment-size-bytes",
        compared: true,
        parse: |_, a| a.int(0, MAX_INT).map(drop),
        policy: None,
    },
    ArgSpec { name: "x-initial-cluster-size", compared: true, parse: |_, a| a.int(1, MAX_INT).map(drop), policy: None },
    ArgSpec {
        name: "x-queue-leader-locator",
        compared: true,
        parse: |_, a| a.one_of(LOCATORS).map(drop),
        policy: None,
    },
    ArgSpec {
        name: "x-queue-master-locator",
        compared: true,
        parse: |_, a| a.one_of(LOCATORS).map(drop),
        policy: None,
    },
    ArgSpec {
        name: "x-dead-letter-strategy",
        compared: true,
        parse: |_, a| a.one_of(&["at-most-once", "at-least-once"]).map(drop),
        policy: None,
    },
    ArgSpec {
        name: "x-delivery-limit",
        compared: true,
        parse: |q, a| {
            q.delivery_limit = Some(a.int(0, MAX_INT)?);
            Ok(())
        },
        policy: Some(PolicyKey {
            key: "delivery-limit",
            merge: Merge::UnlessDeclared(|e, p| e.delivery_limit = p.delivery_limit),
            check: Some(|v| match int_value(v) {
                Some(n) if n >= 0 => Ok(()),
                _ => Err(BrokerError::precondition("delivery-limit must be a non-negative integer")),
            }),
        }),
    },
    // The deduplication plugin's queue argument: RabbitMQ 3.10 does not compare it on redeclare.
    ArgSpec {
        name: "x-message-deduplication",
        compared: false,
        parse: |q, a| {
            q.deduplication = a.boolean()?;
            Ok(())
        },
        policy: None,
    },
];

/// The values `x-queue-leader-locator` and `x-queue-master-locator` accept.
const LOCATORS: &[&str] = &["client-local", "balanced", "random", "least-leaders", "min-masters"];

/// The spec of the argument named `name`, if it is one Mailroom knows.
pub fn spec(name: &str) -> Option<&'static ArgSpec> {
    ARGUMENTS.iter().find(|s| s.name == name)
}

/// One argument value being parsed, with what its error messages name.
pub struct Arg<'a> {
    key: &'a str,
    value: &'a AMQPValue,
    queue: &'a str,
    vhost: &'a str,
}

impl Arg<'_> {
    /// A 406 naming the argument, the queue and the vhost, as RabbitMQ words it.
    fn invalid(&self, why: String) -> BrokerError {
        BrokerError::precondition(format!(
            "invalid arg '{}' for queue '{}' in vhost '{}': {why}",
            self.key, self.queue, self.vhost
        ))
    }
    fn unacceptable_type(&self) -> BrokerError {
        self.invalid(format!("{{unacceptable_type,{}}}", type_name(self.value)))
    }
    /// An integer of any AMQP width within `min..=max`.
    pub fn int(&self, min: i128, max: i128) -> Result<u64> {
        let v = int_value(self.value).ok_or_else(|| self.unacceptable_type())?;
        if v < min || v > max {
            let why =
                if min > 0 && v < min { format!("{{value_zero,{v}}}") } else { format!("{{value_out_of_range,{v}}}") };
            return Err(self.invalid(why));
        }
        Ok(v as u64)
    }
    /// A long or short string.
    pub fn string(&self) -> Result<String> {
        string_value(self.value).ok_or_else(|| self.unacceptable_type())
    }
    /// A string among `allowed`.
    pub fn one_of(&self, allowed: &[&str]) -> Result<String> {
        let s = self.string()?;
        if allowed.contains(&s.as_str()) {
            Ok(s)
        } else {
            Err(self.invalid(format!("{{unacceptable_value,<<\"{s}\">>}}")))
        }
    }
    /// A boolean.
    pub fn boolean(&self) -> Result<bool> {
        match self.value {
            AMQPValue::Boolean(b) => Ok(*b),
            _ => Err(self.unacceptable_type()),
        }
    }
}

impl QueueArguments {
    /// Validates `args` for queue `queue` in `vhost` the way RabbitMQ 3.10 does (406 on a bad value);
    /// unknown arguments are ignored, as RabbitMQ does.
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> Result<Self> {
        let mut parsed = QueueArguments::default();
        for (key, value) in args.inner() {
            let key = key.as_str();
            if let Some(spec) = spec(key) {
                (spec.parse)(&mut parsed, &Arg { key, value, queue, vhost })?;
            }
        }
        if parsed.dead_letter_routing_key.is_some() && parsed.dead_letter_exchange.is_none() {
            return Err(BrokerError::precondition(format!(
                "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': \
                 Key 'x-dead-letter-routing-key' requires 'x-dead-letter-exchange'"
            )));
        }
        Ok(parsed)
    }
}

/// Checks a redeclare's arguments against the existing queue's (406 on any difference in a known key).
pub fn assert_equivalent(current: &FieldTable, requested: &FieldTable, queue: &str, vhost: &str) -> Result<()> {
    for key in ARGUMENTS.iter().filter(|s| s.compared).map(|s| s.name) {
        let (old, new) = (current.inner().get(key), requested.inner().get(key));
        let same = match (old, new) {
            (None, None) => true,
            (Some(a), Some(b)) => values_equivalent(a, b),
            _ => false,
        };
        if !same {
            let describe = |v: Option<&AMQPValue>| match v {
                Some(v) => format!("the value '{}' of type '{}'", render(v), type_name(v)),
                None => "none".to_string(),
            };
            return Err(BrokerError::precondition(format!(
                "inequivalent arg '{key}' for queue '{queue}' in vhost '{vhost}': received {} but current is {}",
                describe(new),
                describe(old)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::LongString;

    fn table(items: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in items {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn parses_known_arguments() {
        let args = table(&[
            ("x-message-ttl", AMQPValue::LongInt(1000)),
            ("x-expires", AMQPValue::ShortInt(5)),
            ("x-dead-letter-exchange", AMQPValue::LongString(LongString::from("dlx"))),
            ("x-max-priority", AMQPValue::ShortShortUInt(10)),
            ("x-overflow", AMQPValue::LongString(LongString::from("reject-publish"))),
            ("x-something-else", AMQPValue::Boolean(true)),
        ]);
        let parsed = QueueArguments::parse(&args, "q", "/").unwrap();
        assert_eq!(parsed.message_ttl, Some(1000));
        assert_eq!(parsed.expires, Some(5));
        assert_eq!(parsed.dead_letter_exchange.as_deref(), Some("dlx"));
        assert_eq!(parsed.max_priority, Some(10));
        assert_eq!(parsed.overflow, Overflow::RejectPublish);
    }

    #[test]
    fn rejects_bad_types_and_ranges() {
        for bad in [
            table(&[("x-message-ttl", AMQPValue::LongString(LongString::from("1000")))]),
            table(&[("x-max-length", AMQPValue::LongInt(-1))]),
            table(&[("x-expires", AMQPValue::LongInt(0))]),
            table(&[("x-max-priority", AMQPValue::LongInt(256))]),
            table(&[("x-overflow", AMQPValue::LongString(LongString::from("nope")))]),
            table(&[("x-queue-type", AMQPValue::LongString(LongString::from("fancy")))]),
            table(&[("x-dead-letter-routing-key", AMQPValue::LongString(LongString::from("k")))]),
        ] {
            let err = QueueArguments::parse(&bad, "q", "/").unwrap_err();
            assert_eq!(err.kind, crate::ErrorKind::PreconditionFailed, "{bad:?}");
        }
    }

    #[test]
    fn equivalence_uses_type_classes() {
        let a = table(&[("x-message-ttl", AMQPValue::LongInt(1000))]);
        let b = table(&[("x-message-ttl", AMQPValue::LongLongInt(1000))]);
        let c = table(&[("x-message-ttl", AMQPValue::LongLongInt(2000))]);
        assert!(assert_equivalent(&a, &b, "q", "/").is_ok());
        assert!(assert_equivalent(&a, &c, "q", "/").is_err());
        assert!(assert_equivalent(&a, &FieldTable::default(), "q", "/").is_err());
        // Unknown keys are not compared.
        let d = table(&[("x-message-ttl", AMQPValue::LongInt(1000)), ("x-other", AMQPValue::Boolean(true))]);
        assert!(assert_equivalent(&a, &d, "q", "/").is_ok());
    }

    #[test]
    fn the_table_names_each_argument_once_and_policy_keys_match() {
        for (i, s) in ARGUMENTS.iter().enumerate() {
            assert!(ARGUMENTS[i + 1..].iter().all(|o| o.name != s.name), "{} listed twice", s.name);
            if let Some(p) = &s.policy {
                assert_eq!(s.name, format!("x-{}", p.key), "a policy key is its argument without x-");
            }
        }
    }
}
