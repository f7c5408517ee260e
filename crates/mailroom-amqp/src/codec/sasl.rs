//! SASL responses from connection.start-ok: PLAIN and AMQPLAIN.

use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::AMQPValue;

use super::nesting;

/// A username and password taken from a SASL response.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Login name.
    pub username: String,
    /// Password in clear (the transport is what protects it).
    pub password: String,
}

// Hand-written so a stray `{:?}` never puts a password in the logs.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// PLAIN: "\0user\0pass" (authzid ignored). AMQPLAIN: a field table WITHOUT its 4-byte length prefix, keys LOGIN and PASSWORD. Returns None on a malformed response.
///
/// Mechanism names are matched exactly, as RabbitMQ lists them in connection.start.
pub fn parse_sasl_response(mechanism: &str, response: &[u8]) -> Option<Credentials> {
    match mechanism {
        "PLAIN" => parse_plain(response),
        "AMQPLAIN" => parse_amqplain(response),
        _ => None,
    }
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`, none of them containing NUL.
fn parse_plain(response: &[u8]) -> Option<Credentials> {
    let mut parts = response.split(|&b| b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Credentials {
        username: String::from_utf8(user.to_vec()).ok()?,
        password: String::from_utf8(pass.to_vec()).ok()?,
    })
}

/// What py-amqp, pika and amq-protocol send: table entries with the length prefix cut off.
fn parse_amqplain(response: &[u8]) -> Option<Credentials> {
    nesting::check_table_entries(response).ok()?;
    // amq-protocol parses whole tables only: put the prefix back. A response is bounded by
    // frame_max, so the copy is small, and this runs once per connection.
    let len = u32::try_from(response.len()).ok()?;
    let mut table = Vec::with_capacity(response.len() + 4);
    table.extend_from_slice(&len.to_be_bytes());
    table.extend_from_slice(response);
    let (rest, table) = parse_field_table(&table[..]).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let text = |key: &str| match table.inner().get(key)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    Some(Credentials {
        username: text("LOGIN")?,
        password: text("PASSWORD")?,
    })
}
