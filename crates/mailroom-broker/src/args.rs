//! Queue arguments: RabbitMQ 3.10's `x-` names, type-checked at declare time and compared on redeclare.

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

/// The `x-` arguments RabbitMQ 3.10 validates and compares on redeclare.
const KNOWN_ARGUMENTS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    "x-queue-type",
    "x-quorum-initial-group-size",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
    "x-queue-master-locator",
    "x-dead-letter-strategy",
    "x-delivery-limit",
];

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

impl QueueArguments {
    /// Validates `args` for queue `queue` in `vhost` the way RabbitMQ 3.10 does (406 on a bad value).
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> Result<Self> {
        let mut parsed = QueueArguments::default();
        let invalid = |key: &str, why: String| {
            BrokerError::precondition(format!("invalid arg '{key}' for queue '{queue}' in vhost '{vhost}': {why}"))
        };
        let int_arg = |key: &str, value: &AMQPValue, min: i128, max: i128| -> Result<u64> {
            let v =
                int_value(value).ok_or_else(|| invalid(key, format!("{{unacceptable_type,{}}}", type_name(value))))?;
            if v < min || v > max {
                let why = if min > 0 && v < min {
                    format!("{{value_zero,{v}}}")
                } else {
                    format!("{{value_out_of_range,{v}}}")
                };
                return Err(invalid(key, why));
            }
            Ok(v as u64)
        };
        let str_arg = |key: &str, value: &AMQPValue| -> Result<String> {
            string_value(value).ok_or_else(|| invalid(key, format!("{{unacceptable_type,{}}}", type_name(value))))
        };
        let one_of = |key: &str, value: &AMQPValue, allowed: &[&str]| -> Result<String> {
            let s = str_arg(key, value)?;
            if allowed.contains(&s.as_str()) {
                Ok(s)
            } else {
                Err(invalid(key, format!("{{unacceptable_value,<<\"{s}\">>}}")))
            }
        };
        for (key, value) in args.inner() {
            let key = key.as_str();
            match key {
                "x-message-ttl" => parsed.message_ttl = Some(int_arg(key, value, 0, MAX_TTL_MS)?),
                "x-expires" => parsed.expires = Some(int_arg(key, value, 1, MAX_TTL_MS)?),
                "x-dead-letter-exchange" => parsed.dead_letter_exchange = Some(str_arg(key, value)?),
                "x-dead-letter-routing-key" => parsed.dead_letter_routing_key = Some(str_arg(key, value)?),
                "x-max-length" => parsed.max_length = Some(int_arg(key, value, 0, i64::MAX as i128)?),
                "x-max-length-bytes" => parsed.max_length_bytes = Some(int_arg(key, value, 0, i64::MAX as i128)?),
                "x-max-in-memory-length" | "x-max-in-memory-bytes" | "x-stream-max-segment-size-bytes" => {
                    int_arg(key, value, 0, i64::MAX as i128)?;
                }
                "x-delivery-limit" => parsed.delivery_limit = Some(int_arg(key, value, 0, i64::MAX as i128)?),
                "x-max-priority" => {
                    let p = int_arg(key, value, 0, 255)?;
                    parsed.max_priority = (p > 0).then_some(p as u8);
                }
                "x-overflow" => {
                    parsed.overflow =
                        match one_of(key, value, &["drop-head", "reject-publish", "reject-publish-dlx"])?.as_str() {
                            "reject-publish" => Overflow::RejectPublish,
                            "reject-publish-dlx" => Overflow::RejectPublishDlx,
                            _ => Overflow::DropHead,
                        }
                }
                "x-queue-mode" => {
                    one_of(key, value, &["default", "lazy"])?;
                }
                "x-queue-version" => {
                    int_arg(key, value, 1, 2)?;
                }
                "x-single-active-consumer" => match value {
                    AMQPValue::Boolean(b) => parsed.single_active_consumer = *b,
                    other => return Err(invalid(key, format!("{{unacceptable_type,{}}}", type_name(other)))),
                },
                "x-message-deduplication" => match value {
                    AMQPValue::Boolean(b) => parsed.deduplication = *b,
                    other => return Err(invalid(key, format!("{{unacceptable_type,{}}}", type_name(other)))),
                },
                "x-queue-type" => {
                    parsed.queue_type = match one_of(key, value, &["classic", "quorum", "stream"])?.as_str() {
                        "quorum" => QueueType::Quorum,
                        "stream" => QueueType::Stream,
                        _ => QueueType::Classic,
                    }
                }
                "x-quorum-initial-group-size" | "x-initial-cluster-size" => {
                    int_arg(key, value, 1, i64::MAX as i128)?;
                }
                "x-max-age" => {
                    str_arg(key, value)?;
                }
                "x-queue-leader-locator" | "x-queue-master-locator" => {
                    one_of(key, value, &["client-local", "balanced", "random", "least-leaders", "min-masters"])?;
                }
                "x-dead-letter-strategy" => {
                    one_of(key, value, &["at-most-once", "at-least-once"])?;
                }
                // Unknown arguments are ignored, as RabbitMQ does.
                _ => {}
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
    for key in KNOWN_ARGUMENTS {
        let (old, new) = (current.inner().get(*key), requested.inner().get(*key));
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
}
