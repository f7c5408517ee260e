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
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
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
    Some(Credentials { username: text("LOGIN")?, password: text("PASSWORD")? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::auth::{Credentials as AmqCredentials, SASLMechanism};
    use amq_protocol::types::generation::gen_field_table;
    use amq_protocol::types::{FieldTable, LongString};

    fn creds(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials { username: u.into(), password: p.into() })
    }

    #[test]
    fn plain() {
        assert_eq!(parse_sasl_response("PLAIN", b"\0guest\0guest"), creds("guest", "guest"));
        assert_eq!(parse_sasl_response("PLAIN", b"admin\0bob\0s3cr\xc3\xa9t"), creds("bob", "s3crét"));
        assert_eq!(parse_sasl_response("PLAIN", b"\0\0"), creds("", ""));
        assert_eq!(parse_sasl_response("PLAIN", b"guest\0guest"), None);
        assert_eq!(parse_sasl_response("PLAIN", b"\0a\0b\0c"), None);
        assert_eq!(parse_sasl_response("PLAIN", b"\0\xff\0x"), None);
        assert_eq!(parse_sasl_response("PLAIN", b""), None);
        // What lapin sends.
        let lapin = AmqCredentials::new("user".into(), "pa ss".into()).sasl_auth_string(SASLMechanism::Plain);
        assert_eq!(parse_sasl_response("PLAIN", lapin.as_bytes()), creds("user", "pa ss"));
    }

    /// What py-amqp and pika send: `_write_table({...})[4:]`.
    fn amqplain_bytes(entries: &[(&str, AMQPValue)]) -> Vec<u8> {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        let (buf, _) = gen_field_table(&t)(Vec::new().into()).unwrap().into_inner();
        buf[4..].to_vec()
    }

    #[test]
    fn amqplain() {
        let ls = |s: &str| AMQPValue::LongString(LongString::from(s));
        let bytes = amqplain_bytes(&[("LOGIN", ls("guest")), ("PASSWORD", ls("pw"))]);
        assert_eq!(parse_sasl_response("AMQPLAIN", &bytes), creds("guest", "pw"));
        // pika/py-amqp put LOGIN first; hand-built in that order (amq-protocol sorts keys anyway).
        let mut py = vec![5];
        py.extend_from_slice(b"LOGIN");
        py.push(b'S');
        py.extend_from_slice(&3u32.to_be_bytes());
        py.extend_from_slice(b"bob");
        py.push(8);
        py.extend_from_slice(b"PASSWORD");
        py.push(b'S');
        py.extend_from_slice(&2u32.to_be_bytes());
        py.extend_from_slice(b"pw");
        assert_eq!(parse_sasl_response("AMQPLAIN", &py), creds("bob", "pw"));
        // lapin's own AMQPLAIN string.
        let lapin = AmqCredentials::new("u".into(), "p".into()).sasl_auth_string(SASLMechanism::AMQPlain);
        assert_eq!(parse_sasl_response("AMQPLAIN", lapin.as_bytes()), creds("u", "p"));

        // Missing key, wrong type, a length prefix left on, truncation, trailing garbage.
        assert_eq!(parse_sasl_response("AMQPLAIN", &amqplain_bytes(&[("LOGIN", ls("u"))])), None);
        assert_eq!(
            parse_sasl_response(
                "AMQPLAIN",
                &amqplain_bytes(&[("LOGIN", ls("u")), ("PASSWORD", AMQPValue::LongInt(1))])
            ),
            None
        );
        let mut prefixed = (bytes.len() as u32).to_be_bytes().to_vec();
        prefixed.extend_from_slice(&bytes);
        assert_eq!(parse_sasl_response("AMQPLAIN", &prefixed), None);
        assert_eq!(parse_sasl_response("AMQPLAIN", &bytes[..bytes.len() - 1]), None);
        assert_eq!(parse_sasl_response("AMQPLAIN", &[&bytes[..], &[1]].concat()), None);
        assert_eq!(parse_sasl_response("AMQPLAIN", b""), None);
    }

    #[test]
    fn amqplain_deep_nesting_is_none() {
        let mut entries = vec![1, b'k', b'F'];
        entries.extend(crate::codec::nesting::tests::nested_tables(20_000));
        assert_eq!(parse_sasl_response("AMQPLAIN", &entries), None);
    }

    #[test]
    fn other_mechanisms_are_none() {
        assert_eq!(parse_sasl_response("EXTERNAL", b""), None);
        assert_eq!(parse_sasl_response("plain", b"\0a\0b"), None);
    }

    #[test]
    fn debug_hides_password() {
        let c = creds("u", "hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
