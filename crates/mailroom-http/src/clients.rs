//! Connections, channels and consumers, read from the broker's connection registry: each connection task
//! describes its channels on request (see `mailroom_broker::connections`).

use crate::api::{vhost_of, ApiError, ApiRequest, ApiResult, Reply};
use crate::listing;
use crate::message_stats::{
    channel_counts, channel_exchange_counts, channel_name, channel_queue_counts, connection_counts, Subject,
};
use crate::{json, ServerInfo};
use hyper::StatusCode;
use mailroom_broker::{Broker, ChannelSnapshot, ConnectionHandle, ConnectionInfo};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// The reason a connection closed through the API gives its client when the request names none.
const DEFAULT_CLOSE_REASON: &str = "Closed via management plugin";

fn connections_in(broker: &Broker, vhost: Option<&str>) -> Result<Vec<ConnectionHandle>, ApiError> {
    if let Some(v) = vhost {
        vhost_of(broker, v)?;
    }
    Ok(broker.connections().list().into_iter().filter(|c| vhost.is_none_or(|v| c.info().vhost == v)).collect())
}

fn connection_json(server: &ServerInfo, info: &ConnectionInfo, channels: Option<&[ChannelSnapshot]>) -> Value {
    let user_provided_name = match info.client_properties.inner().get("connection_name") {
        Some(v) => json::amqp_value(v),
        None => Value::Null,
    };
    let connected_at = info.connected_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let (_, recv_cnt, _, send_cnt) = info.traffic.read();
    let mut out = json!({
        "name": info.name(),
        "node": server.node_name,
        "vhost": info.vhost,
        "user": info.user,
        "user_who_performed_action": info.user,
        "protocol": info.protocol,
        "type": "network",
        "state": "running",
        "host": info.local.ip().to_string(),
        "port": info.local.port(),
        "peer_host": info.peer.ip().to_string(),
        "peer_port": info.peer.port(),
        "ssl": false,
        "auth_mechanism": "PLAIN",
        "channels": channels.map_or(0, |c| c.len()),
        "channel_max": info.channel_max,
        "frame_max": info.frame_max,
        "timeout": info.heartbeat,
        "connected_at": connected_at,
        "client_properties": json::table(&info.client_properties),
        "user_provided_name": user_provided_name,
        "recv_cnt": recv_cnt,
        "send_cnt": send_cnt,
        // Bytes handed to the connection's writer and not yet written to the socket.
        "send_pend": info.traffic.send_pend(),
    });
    // recv_oct, send_oct and their `*_details.rate`, at the top level as RabbitMQ puts them.
    let octets = server.rates.render(&Subject::Connection(info.name()), &connection_counts(&info.traffic));
    if let (Some(out), Value::Object(octets)) = (out.as_object_mut(), octets) {
        out.extend(octets);
    }
    out
}

/// `GET /api/connections` and `/api/vhosts/{vhost}/connections`.
pub async fn list_connections(
    broker: &Broker,
    server: &Arc<ServerInfo>,
    vhost: Option<&str>,
    req: &ApiRequest,
) -> ApiResult {
    let items = crate::snapshots::with_channels(connections_in(broker, vhost)?)
        .await
        .iter()
        .map(|(c, channels)| connection_json(server, c.info(), channels.as_deref()))
        .collect();
    listing::list(items, &req.query).map(Reply::ok)
}

fn connection_named(broker: &Broker, name: &str) -> Result<ConnectionHandle, ApiError> {
    broker.connections().by_name(name).ok_or_else(|| ApiError::not_found(format!("connection '{name}' not found")))
}

/// `GET /api/connections/{name}`.
pub async fn get_connection(broker: &Broker, server: &Arc<ServerInfo>, name: &str) -> ApiResult {
    let c = connection_named(broker, name)?;
    let channels = c.channels().await;
    Ok(Reply::ok(connection_json(server, c.info(), channels.as_deref())))
}

/// `DELETE /api/connections/{name}`: closes it with `connection.close` 320 and the `X-Reason` header's
/// text (RabbitMQ's "Closed via management plugin" without one).
pub fn close_connection(broker: &Broker, name: &str, req: &ApiRequest) -> ApiResult {
    let c = connection_named(broker, name)?;
    let reason = req.headers.get("x-reason").and_then(|h| h.to_str().ok()).unwrap_or(DEFAULT_CLOSE_REASON);
    if !c.close(reason) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("connection '{name}' is not answering")));
    }
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

fn channel_json(server: &ServerInfo, info: &ConnectionInfo, ch: &ChannelSnapshot) -> Value {
    let conn_name = info.name();
    let name = channel_name(&conn_name, ch.number);
    let message_stats = server.rates.render(&Subject::Channel(name.clone()), &channel_counts(&ch.message_stats));
    json!({
        "name": name,
        "number": ch.number,
        "node": server.node_name,
        "vhost": info.vhost,
        "user": info.user,
        "user_who_performed_action": info.user,
        "state": "running",
        "connection_details": {
            "name": conn_name,
            "peer_host": info.peer.ip().to_string(),
            "peer_port": info.peer.port(),
        },
        "consumer_count": ch.consumers.len(),
        "messages_unacknowledged": ch.unacknowledged,
        "messages_unconfirmed": ch.unconfirmed,
        "messages_uncommitted": ch.uncommitted_publishes,
        "acks_uncommitted": ch.uncommitted_acks,
        // Quorum queue commands awaiting consensus: Mailroom has no quorum queues.
        "pending_raft_commands": 0,
        "prefetch_count": ch.prefetch_count,
        "global_prefetch_count": ch.global_prefetch_count,
        "confirm": ch.confirm,
        "transactional": ch.transactional,
        "message_stats": message_stats,
    })
}

async fn all_channels(
    broker: &Broker,
    vhost: Option<&str>,
) -> Result<Vec<(ConnectionHandle, Vec<ChannelSnapshot>)>, ApiError> {
    let all = crate::snapshots::with_channels(connections_in(broker, vhost)?).await;
    Ok(all.into_iter().filter_map(|(c, channels)| Some((c, channels?))).collect())
}

/// `GET /api/channels` and `/api/vhosts/{vhost}/channels`.
pub async fn list_channels(
    broker: &Broker,
    server: &Arc<ServerInfo>,
    vhost: Option<&str>,
    req: &ApiRequest,
) -> ApiResult {
    let items = all_channels(broker, vhost)
        .await?
        .iter()
        .flat_map(|(c, chs)| chs.iter().map(|ch| channel_json(server, c.info(), ch)))
        .collect();
    listing::list(items, &req.query).map(Reply::ok)
}

/// `GET /api/connections/{name}/channels`.
pub async fn connection_channels(broker: &Broker, server: &Arc<ServerInfo>, name: &str, req: &ApiRequest) -> ApiResult {
    let c = connection_named(broker, name)?;
    let channels = c.channels().await.unwrap_or_default();
    let items = channels.iter().map(|ch| channel_json(server, c.info(), ch)).collect();
    listing::list(items, &req.query).map(Reply::ok)
}

/// `GET /api/channels/{name}` (`"peer -> local (N)"`).
pub async fn get_channel(broker: &Broker, server: &Arc<ServerInfo>, name: &str) -> ApiResult {
    let missing = || ApiError::not_found(format!("channel '{name}' not found"));
    let (conn_name, number) = name.rsplit_once(" (").ok_or_else(missing)?;
    let number: u16 = number.strip_suffix(')').and_then(|n| n.parse().ok()).ok_or_else(missing)?;
    let c = broker.connections().by_name(conn_name).ok_or_else(missing)?;
    let channels = c.channels().await.unwrap_or_default();
    let ch = channels.iter().find(|ch| ch.number == number).ok_or_else(missing)?;
    let mut out = channel_json(server, c.info(), ch);
    out["consumer_details"] = Value::Array(consumers_of(broker, server, c.info(), ch));
    let (vhost, channel) = (&c.info().vhost, channel_name(&c.info().name(), ch.number));
    // RabbitMQ's per-exchange and per-queue breakdown, shown for one channel only (as its API does).
    out["publishes"] = ch
        .publishes
        .iter()
        .map(|p| {
            let subject = Subject::ChannelExchange(channel.clone(), p.name.clone());
            json!({
                "exchange": { "name": p.name, "vhost": vhost },
                "stats": server.rates.render(&subject, &channel_exchange_counts(&p.stats)),
            })
        })
        .collect();
    out["deliveries"] = ch
        .deliveries
        .iter()
        .map(|d| {
            let subject = Subject::ChannelQueue(channel.clone(), d.name.clone());
            json!({
                "queue": { "name": d.name, "vhost": vhost },
                "stats": server.rates.render(&subject, &channel_queue_counts(&d.stats)),
            })
        })
        .collect();
    Ok(Reply::ok(out))
}

/// The consumers of one channel as the management API lists them; the queue adds how each consumes.
fn consumers_of(broker: &Broker, server: &ServerInfo, info: &ConnectionInfo, ch: &ChannelSnapshot) -> Vec<Value> {
    let Ok(v) = broker.vhost(&info.vhost) else { return Vec::new() };
    let queues: HashMap<String, _> = v.queues().into_iter().map(|q| (q.name().to_owned(), q)).collect();
    let conn_name = info.name();
    let mut out = Vec::new();
    for c in &ch.consumers {
        let details = queues.get(&c.queue).and_then(|q| q.consumer_details().into_iter().find(|d| d.id == c.id));
        let arguments = match details {
            Some(d) if d.priority != 0 => json!({ "x-priority": d.priority }),
            _ => json!({}),
        };
        out.push(json!({
            "consumer_tag": c.tag,
            "queue": { "name": c.queue, "vhost": info.vhost },
            "channel_details": {
                "name": format!("{conn_name} ({})", ch.number),
                "number": ch.number,
                "connection_name": conn_name,
                "node": server.node_name,
                "peer_host": info.peer.ip().to_string(),
                "peer_port": info.peer.port(),
                "user": info.user,
            },
            "ack_required": c.ack_required,
            "exclusive": details.is_some_and(|d| d.exclusive),
            "prefetch_count": details.map_or(0, |d| d.prefetch),
            "active": true,
            "activity_status": "up",
            "consumer_timeout": 0,
            "arguments": arguments,
        }));
    }
    out
}

/// `GET /api/consumers[/{vhost}]`.
pub async fn list_consumers(
    broker: &Broker,
    server: &Arc<ServerInfo>,
    vhost: Option<&str>,
    req: &ApiRequest,
) -> ApiResult {
    let items = all_channels(broker, vhost)
        .await?
        .iter()
        .flat_map(|(c, chs)| chs.iter().flat_map(|ch| consumers_of(broker, server, c.info(), ch)))
        .collect();
    listing::list(items, &req.query).map(Reply::ok)
}
