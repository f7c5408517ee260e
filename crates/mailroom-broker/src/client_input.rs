//! What clients hand the broker's entry points, checked and typed there so every front end (AMQP, HTTP API,
//! the embedded SDK transport) gets the same rules: consumer arguments at consume, a published message's
//! properties at publish, and its `user_id` against the publishing user.

use crate::args::int_value;
use crate::error::BrokerError;
use crate::message::{parse_expiration, Message};
use crate::queue::ConsumeOptions;
use amq_protocol_types::FieldTable;

/// Why a client's input was refused; the front ends answer each with 406 PRECONDITION_FAILED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// `x-priority` is not an integer within i32 (the text shows the value as received).
    #[error("invalid arg 'x-priority' for consumer: {0}")]
    ConsumerPriority(String),
    /// The `expiration` property is not a non-negative integer of milliseconds.
    #[error("invalid expiration '{0}': no_integer")]
    Expiration(String),
    /// The `user_id` property names another user than the one who published.
    #[error("user_id property set to '{claimed}' but authenticated user was '{user}'")]
    UserId {
        /// What the message claims.
        claimed: String,
        /// Who published it.
        user: String,
    },
}

impl From<InputError> for BrokerError {
    fn from(e: InputError) -> Self {
        BrokerError::precondition(e.to_string())
    }
}

/// The consumer arguments the broker acts on, read from `basic.consume`'s argument table (others are ignored,
/// as RabbitMQ does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerArguments {
    /// `x-priority`, when given.
    pub priority: Option<i32>,
}

impl ConsumerArguments {
    /// Reads and checks the table.
    pub fn parse(arguments: &FieldTable) -> Result<Self, InputError> {
        let priority = match arguments.inner().get("x-priority") {
            None => None,
            Some(v) => match int_value(v) {
                Some(p) if (i32::MIN as i128..=i32::MAX as i128).contains(&p) => Some(p as i32),
                _ => return Err(InputError::ConsumerPriority(format!("{v:?}"))),
            },
        };
        Ok(Self { priority })
    }

    /// Reads `options.arguments` and applies them to `options` (the consume entry point calls this).
    pub fn apply(options: &mut ConsumeOptions) -> Result<(), InputError> {
        let parsed = Self::parse(&options.arguments)?;
        if let Some(priority) = parsed.priority {
            options.priority = priority;
        }
        Ok(())
    }
}

/// Checks a published message's properties (the publish entry point calls this): `expiration` must be an
/// integer. Nothing is allocated unless the message is refused.
pub fn check_message(message: &Message) -> Result<(), InputError> {
    if let Some(exp) = message.properties.expiration() {
        if parse_expiration(exp.as_str()).is_err() {
            return Err(InputError::Expiration(exp.as_str().to_owned()));
        }
    }
    Ok(())
}

/// Checks the `user_id` property against the user who published the message (front ends that authenticate
/// their clients call this; the embedded transport has no users).
pub fn check_user_id(message: &Message, user: &str) -> Result<(), InputError> {
    match message.properties.user_id() {
        Some(claimed) if claimed.as_str() != user => {
            Err(InputError::UserId { claimed: claimed.as_str().to_owned(), user: user.to_owned() })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::queue::{ChannelPrefetch, ConsumerEvent};
    use crate::{BasicProperties, Broker, BrokerConfig, QueueOptions};
    use amq_protocol_types::{AMQPValue, LongString, ShortString};
    use bytes::Bytes;
    use std::sync::Arc;

    fn options(arguments: FieldTable) -> ConsumeOptions {
        ConsumeOptions {
            no_ack: false,
            exclusive: false,
            prefetch: 0,
            channel_prefetch: Arc::new(ChannelPrefetch::default()),
            priority: 0,
            arguments,
        }
    }

    fn table(key: &str, value: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(ShortString::from(key), value);
        t
    }

    #[test]
    fn consumer_priority_is_an_i32() {
        assert_eq!(ConsumerArguments::parse(&FieldTable::default()), Ok(ConsumerArguments { priority: None }));
        for (v, want) in [(AMQPValue::ShortShortInt(-3), -3), (AMQPValue::LongLongInt(i32::MAX as i64), i32::MAX)] {
            assert_eq!(ConsumerArguments::parse(&table("x-priority", v)).unwrap().priority, Some(want));
        }
        for v in [AMQPValue::LongLongInt(i32::MAX as i64 + 1), AMQPValue::LongString(LongString::from("high"))] {
            let e = ConsumerArguments::parse(&table("x-priority", v)).unwrap_err();
            assert!(e.to_string().starts_with("invalid arg 'x-priority' for consumer: "), "{e}");
        }
        assert_eq!(ConsumerArguments::parse(&table("x-other", AMQPValue::Boolean(true))), Ok(Default::default()));
    }

    #[test]
    fn message_checks() {
        let with = |props: BasicProperties| Message::new("", "q", props, Bytes::new());
        assert_eq!(check_message(&with(BasicProperties::default())), Ok(()));
        assert_eq!(check_message(&with(BasicProperties::default().with_expiration("60000".into()))), Ok(()));
        let e = check_message(&with(BasicProperties::default().with_expiration("soon".into()))).unwrap_err();
        assert_eq!(e, InputError::Expiration("soon".into()));
        assert_eq!(e.to_string(), "invalid expiration 'soon': no_integer");
        let claimed = with(BasicProperties::default().with_user_id("alice".into()));
        assert_eq!(check_user_id(&claimed, "alice"), Ok(()));
        assert_eq!(
            check_user_id(&claimed, "bob").unwrap_err().to_string(),
            "user_id property set to 'alice' but authenticated user was 'bob'"
        );
        assert_eq!(check_user_id(&with(BasicProperties::default()), "bob"), Ok(()));
    }

    /// The embedded path (no AMQP connection in between) gets the same checks at the broker's entry points.
    #[tokio::test]
    async fn the_embedded_entry_points_enforce_them() {
        let broker = Broker::open(BrokerConfig::default()).unwrap();
        let v = broker.vhost("/").unwrap();
        v.declare_queue("q", &QueueOptions::default(), 1).unwrap();

        let (sink, _events) = tokio::sync::mpsc::unbounded_channel::<ConsumerEvent>();
        let bad = table("x-priority", AMQPValue::LongString(LongString::from("high")));
        let e = v.consume("q", 1, options(bad), sink.clone()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PreconditionFailed);
        assert!(e.message.starts_with("invalid arg 'x-priority' for consumer"), "{}", e.message);
        assert_eq!(v.queue("q", 1).unwrap().consumer_count(), 0, "no consumer was added");
        let (q, id) = v.consume("q", 1, options(table("x-priority", AMQPValue::LongInt(7))), sink).unwrap();
        let details = q.consumer_details();
        assert_eq!((details[0].id, details[0].priority), (id, 7));

        let expiring = BasicProperties::default().with_expiration("soon".into());
        let e = v.publish("", Message::new("", "q", expiring, Bytes::from_static(b"m"))).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::PreconditionFailed, "invalid expiration 'soon': no_integer")
        );
        assert_eq!(q.message_count(), 0, "the refused message was not enqueued");
        assert!(
            v.publish("", Message::new("", "q", BasicProperties::default(), Bytes::from_static(b"m"))).unwrap().routed
        );
    }
}
