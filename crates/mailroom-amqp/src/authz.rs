//! The wire layer's side of the access model: logins at `connection.start-ok`, vhost access and
//! connection limits at `connection.open`, the channel limit at `channel.open`, and the per-operation
//! checks, each mapped to RabbitMQ's reply codes. The rules themselves live in
//! [`mailroom_broker::access`].

use crate::codec;
use crate::error::{code, AmqpError};
use mailroom_broker::access::{AccessError, AuthError, AuthenticatedUser, ChannelAccess, ChannelSlot, Operation};
use mailroom_broker::connections::ConnectionLimits;
use mailroom_broker::exchange::ExchangeKind;
use mailroom_broker::{
    AMQPValue, Broker, BrokerError, ConnectionInfo, ControlReceiver, FieldTable, Registration, VHost,
};
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

/// Checks an EXTERNAL login as `name`, the login name of the client's verified certificate: the user must
/// exist (no password is checked) and pass the loopback rule. A refusal is logged with the peer.
pub fn login_external(broker: &Broker, name: &str, peer: SocketAddr) -> Result<AuthenticatedUser, AuthError> {
    let result = broker.access().authenticate_external(name, peer.ip().is_loopback());
    if let Err(e) = &result {
        tracing::warn!(%peer, "{}", e.log_line("EXTERNAL"));
    }
    result
}

fn refused(e: AccessError) -> AmqpError {
    AmqpError::from(BrokerError::from(e))
}

/// `connection.open`: the vhost must exist (530) and the user needs permissions there (530 "access to vhost
/// 'v' refused for user 'u'"). The connection limits are checked when it registers ([`register`]).
pub fn open_vhost(broker: &Broker, user: &str, name: &str) -> Result<Arc<VHost>, AmqpError> {
    let vhost =
        broker.vhost(name).map_err(|_| AmqpError::connection(code::NOT_ALLOWED, format!("vhost {name} not found")))?;
    broker.access().vhost_access(user, name).map_err(refused)?;
    Ok(vhost)
}

/// Lists an opening connection in the broker's registry if the vhost's and the user's `max-connections`
/// allow it (530 otherwise); the count and the listing are one step, so concurrent opens cannot overshoot.
pub fn register(broker: &Broker, info: ConnectionInfo) -> Result<(Registration, ControlReceiver), AmqpError> {
    let access = broker.access();
    let limits = ConnectionLimits {
        vhost: access.vhost_limits(&info.vhost),
        user: access.user(&info.user).map(|u| u.limits).unwrap_or_default(),
    };
    let (user, vhost) = (info.user.clone(), info.vhost.clone());
    let registered =
        broker.connections().register_within(info, limits).map_err(|e| AmqpError::from(BrokerError::from(e)))?;
    // Deleting a user or vhost first removes it, then closes the listed connections: one listed before the
    // removal is closed by it, and one listed after it sees the removal here.
    if access.user(&user).is_none() {
        return Err(AmqpError::connection(
            code::NOT_ALLOWED,
            format!("access to vhost '{vhost}' refused for user '{user}'"),
        ));
    }
    if broker.vhost(&vhost).is_err() {
        return Err(AmqpError::connection(code::NOT_ALLOWED, format!("vhost {vhost} not found")));
    }
    Ok(registered)
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
