//! The wire layer's side of the access model: logins at `connection.start-ok`, vhost access and
//! connection limits at `connection.open`, the channel limit at `channel.open`, and the per-operation
//! checks, each mapped to RabbitMQ's reply codes. The rules themselves live in
//! [`mailroom_broker::access`].

use crate::codec;
use crate::error::{code, AmqpError};
use mailroom_broker::access::{AccessError, AuthError, AuthenticatedUser, ChannelAccess, ChannelSlot, Operation};
use mailroom_broker::exchange::ExchangeKind;
use mailroom_broker::{AMQPValue, Broker, BrokerError, FieldTable, VHost};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a refused login waits before its answer, so that guessing passwords is slow.
pub const LOGIN_REFUSED_DELAY: Duration = Duration::from_secs(1);

/// Checks a PLAIN or AMQPLAIN `start-ok` response. A refusal is logged with the peer, as RabbitMQ logs it.
pub fn login(
    broker: &Broker,
    mechanism: &str,
    response: &[u8],
    peer: SocketAddr,
) -> Result<AuthenticatedUser, AuthError> {
    let result = match codec::parse_sasl_response(mechanism, response) {
        Some(c) => broker.authenticate(&c.username, &c.password, peer.ip().is_loopback()),
        None => Err(AuthError::InvalidCredentials(String::new())),
    };
    if let Err(e) = &result {
        tracing::warn!(%peer, "{}", e.log_line(mechanism));
    }
    result
}

fn refused(e: AccessError) -> AmqpError {
    AmqpError::from(BrokerError::from(e))
}

/// `connection.open`: the vhost must exist (530), the user needs permissions there (530 "access to vhost
/// 'v' refused for user 'u'"), and the vhost's and the user's `max-connections` must not be reached (530).
pub fn open_vhost(broker: &Broker, user: &str, name: &str) -> Result<Arc<VHost>, AmqpError> {
    let vhost =
        broker.vhost(name).map_err(|_| AmqpError::connection(code::NOT_ALLOWED, format!("vhost {name} not found")))?;
    let access = broker.access();
    access.vhost_access(user, name).map_err(refused)?;
    let limits = access.vhost_limits(name);
    let user_limits = access.user(user).map(|u| u.limits).unwrap_or_default();
    if !limits.is_empty() || !user_limits.is_empty() {
        // Connection opens are rare: counting the registered connections is cheap enough.
        let all = broker.connections().list();
        let in_vhost = all.iter().filter(|c| c.info().vhost == name).count() as u64;
        let of_user = all.iter().filter(|c| c.info().user == user).count() as u64;
        let over =
            limits.check_connection(name, user, in_vhost).and_then(|_| user_limits.check_connection(user, of_user));
        over.map_err(|e| AmqpError::from(BrokerError::from(e)))?;
    }
    Ok(vhost)
}

/// `channel.open`: counts the channel against the user's `max-channels` (530 when reached) and builds its
/// grants in the vhost.
pub fn open_channel(
    broker: &Broker,
    user: &str,
    vhost: &str,
) -> Result<(Option<ChannelAccess>, ChannelSlot), AmqpError> {
    let slot = broker.access().open_channel(user).map_err(|e| AmqpError::from(BrokerError::from(e)))?;
    Ok((broker.access().channel_access(user, vhost).ok(), slot))
}

/// Checks `op` against a channel's grants (403 ACCESS_REFUSED closes the channel).
pub fn check(access: &mut Option<ChannelAccess>, user: &str, vhost: &str, op: &Operation<'_>) -> Result<(), AmqpError> {
    match access {
        Some(a) => a.check(op).map_err(refused),
        None => Err(AmqpError::channel(
            code::ACCESS_REFUSED,
            format!("access to vhost '{vhost}' refused for user '{user}'"),
        )),
    }
}

/// Whether `exchange` exists in `vhost` and is a topic exchange (topic permissions apply only there).
pub fn is_topic(vhost: &VHost, exchange: &str) -> bool {
    vhost.exchange(exchange).is_ok_and(|x| x.spec().kind == ExchangeKind::Topic)
}

/// Whether a publish to `exchange` needs the topic check: only when topic permissions are set on it
/// (checked first, without a lock) and it is a topic exchange.
pub fn publish_is_topic(access: &Option<ChannelAccess>, vhost: &VHost, exchange: &str) -> bool {
    access.as_ref().is_some_and(|a| a.vhost_access().has_topic_permissions(exchange)) && is_topic(vhost, exchange)
}

/// A string argument (`alternate-exchange`, `x-dead-letter-exchange`).
pub fn str_arg<'a>(args: &'a FieldTable, key: &str) -> Option<&'a str> {
    match args.inner().get(key) {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str()),
        _ => None,
    }
}
