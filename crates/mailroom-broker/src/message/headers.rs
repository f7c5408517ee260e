//! Header and property conventions the broker reads from messages: `expiration`, `CC`/`BCC` routing keys
//! and the deduplication value (`x-deduplication-header`, read by deduplicating exchanges and queues).

use crate::args::{int_value, string_value};
use amq_protocol_types::{AMQPValue, FieldTable};

/// Parses an `expiration` property: a non-negative decimal integer of milliseconds, as RabbitMQ requires.
pub fn parse_expiration(text: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid expiration '{text}'"));
    }
    text.parse::<u64>().map_err(|_| format!("invalid expiration '{text}'"))
}

/// Reads the routing keys of a `CC` or `BCC` header: an array of strings (non-string items ignored).
pub fn header_routing_keys(headers: Option<&FieldTable>, name: &str) -> Vec<String> {
    let Some(value) = headers.and_then(|h| h.inner().get(name)) else {
        return Vec::new();
    };
    match value {
        AMQPValue::FieldArray(items) => items
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            })
            .collect(),
        // RabbitMQ accepts only arrays; a lone string is ignored, as there.
        _ => Vec::new(),
    }
}

/// The value a message is deduplicated on, rendered to a canonical key.
pub fn dedup_key(message: &super::Message) -> Option<String> {
    let value = message.headers()?.inner().get("x-deduplication-header")?;
    Some(match value {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => format!("s:{}", string_value(value)?),
        v => match int_value(v) {
            Some(i) => format!("i:{i}"),
            None => format!("v:{v:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_must_be_digits() {
        assert_eq!(parse_expiration("1000"), Ok(1000));
        assert_eq!(parse_expiration("0"), Ok(0));
        assert!(parse_expiration("").is_err());
        assert!(parse_expiration("-1").is_err());
        assert!(parse_expiration("abc").is_err());
        assert!(parse_expiration("1.5").is_err());
    }
}
