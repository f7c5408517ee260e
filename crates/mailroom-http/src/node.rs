//! The node as a whole: overview, nodes, vhosts (read-only here), health checks and the aliveness test.

use crate::api::{vhost_of, ApiError, ApiRequest, ApiResult, Reply};
use crate::listing;
use crate::message_stats::{self, Subject};
use crate::ServerInfo;
use bytes::Bytes;
use hyper::StatusCode;
use mailroom_broker::{BasicProperties, Broker, Message, QueueOptions, VHost};
use serde_json::{json, Value};
use std::sync::Arc;

/// The RabbitMQ version whose management API this one follows (tools check it to pick features).
pub const RABBITMQ_COMPAT_VERSION: &str = "3.10.8";
/// The exchange types a declare accepts, RabbitMQ's plus Mailroom's built-in plugins.
const EXCHANGE_TYPES: &[(&str, &str)] = &[
    ("direct", "AMQP direct exchange, as per the AMQP specification"),
    ("fanout", "AMQP fanout exchange, as per the AMQP specification"),
    ("headers", "AMQP headers exchange, as per the AMQP specification"),
    ("topic", "AMQP topic exchange, as per the AMQP specification"),
    ("x-delayed-message", "Delayed Message Exchange"),
    ("x-message-deduplication", "Message Deduplication Exchange"),
];

/// Counts of the objects and messages of every vhost.
struct Totals {
    queues: u64,
    exchanges: u64,
    consumers: u64,
    ready: u64,
    unacked: u64,
}

fn totals(vhosts: &[Arc<VHost>]) -> Totals {
    let mut t = Totals { queues: 0, exchanges: 0, consumers: 0, ready: 0, unacked: 0 };
    for v in vhosts {
        t.exchanges += v.exchanges().len() as u64;
        for q in v.queues() {
            t.queues += 1;
            t.consumers += q.consumer_count() as u64;
            t.ready += q.message_count() as u64;
            t.unacked += q.unacked_count() as u64;
        }
    }
    t
}

fn listeners_json(server: &ServerInfo) -> Value {
    Value::Array(
        server
            .listeners
            .iter()
            .map(|l| {
                json!({
                    "node": server.node_name,
                    "protocol": l.protocol,
                    "ip_address": l.addr.ip().to_string(),
                    "port": l.addr.port(),
                    "socket_opts": {},
                })
            })
            .collect(),
    )
}

/// `GET /api/overview`. As RabbitMQ 3.10's (`rabbit_mgmt_wm_overview`, `rabbit_mgmt_db:overview`): a
/// monitoring or administrator user sees the whole node; anyone else sees the totals of the vhosts they
/// have permissions in and of their own connections and channels, no `consumers` total (RabbitMQ: "too
/// expensive to filter") and no `node`, `listeners` or `contexts`.
pub async fn overview(broker: &Broker, server: &Arc<ServerInfo>, req: &ApiRequest) -> ApiResult {
    let whole = req.rights.monitoring;
    let vhosts: Vec<Arc<VHost>> = if whole {
        broker.vhosts()
    } else {
        let access = broker.access();
        broker.vhosts().into_iter().filter(|v| access.permissions(&req.user, v.name()).is_some()).collect()
    };
    let t = totals(&vhosts);
    // Counted, not asked of each connection: an overview (the UI polls it) wakes no idle connection.
    let connections = broker.connections().list().into_iter().filter(|c| whole || c.info().user == req.user).count();
    let channels = if whole { broker.access().open_channels_total() } else { broker.access().open_channels(&req.user) };
    let message_stats = if whole {
        // The node's counts come from the process-wide counters (one broker per process).
        server.rates.render(&Subject::Overview, &message_stats::overview_counts())
    } else {
        let subjects: Vec<Subject> = vhosts.iter().map(|v| Subject::VHost(v.name().to_owned())).collect();
        server.rates.render_sum(&subjects, &message_stats::vhosts_counts(&vhosts))
    };
    let sync = broker.sync_stats();
    let zero_rate = json!({ "rate": 0.0 });
    let mut out = json!({
        "management_version": RABBITMQ_COMPAT_VERSION,
        "rabbitmq_version": RABBITMQ_COMPAT_VERSION,
        "product_name": "Mailroom",
        "product_version": env!("CARGO_PKG_VERSION"),
        "erlang_version": "none",
        "erlang_full_version": format!("Mailroom {} (Rust, no Erlang)", env!("CARGO_PKG_VERSION")),
        "rates_mode": "basic",
        "disable_stats": false,
        "enable_queue_totals": true,
        "cluster_name": server.cluster_name,
        "node": server.node_name,
        "statistics_db_event_queue": 0,
        "churn_rates": {},
        "exchange_types": EXCHANGE_TYPES
            .iter()
            .map(|(name, description)| json!({ "name": name, "description": description, "enabled": true }))
            .collect::<Vec<_>>(),
        "listeners": listeners_json(server),
        "contexts": [],
        "message_stats": message_stats,
        "object_totals": {
            "queues": t.queues,
            "exchanges": t.exchanges,
            "consumers": t.consumers,
            "connections": connections,
            "channels": channels,
            "vhosts": vhosts.len(),
        },
        "queue_totals": {
            "messages": t.ready + t.unacked,
            "messages_details": zero_rate,
            "messages_ready": t.ready,
            "messages_ready_details": zero_rate,
            "messages_unacknowledged": t.unacked,
            "messages_unacknowledged_details": zero_rate,
        },
        "store_totals": {
            "fsyncs": sync.fsyncs,
            "sync_rounds": sync.rounds,
            "records_synced": sync.records,
            "sync_failures": sync.failures,
            "fsync_seconds": sync.fsync_micros as f64 / 1e6,
            "stores_failing": sync.failing_stores,
            "quarantined_records": mailroom_broker::store::quarantined_records_total(),
        },
    });
    if !whole {
        if let Some(o) = out.as_object_mut() {
            // Node-level data a non-monitoring user does not get (RabbitMQ leaves these out; the store
            // figures are node-level too).
            for key in ["node", "listeners", "contexts", "store_totals"] {
                o.remove(key);
            }
        }
        if let Some(totals) = out["object_totals"].as_object_mut() {
            totals.remove("consumers");
        }
    }
    Ok(Reply::ok(out))
}

fn client_memory_json(m: mailroom_broker::client_memory::ClientMemoryFigures) -> Value {
    json!({ "partial_messages": m.partial, "uncommitted_tx": m.tx, "deliveries_in_flight": m.in_flight,
            "outbound_buffers": m.outbound })
}

fn node_json(broker: &Broker, server: &ServerInfo) -> Value {
    let alarms = *broker.alarms().borrow();
    json!({
        "name": server.node_name,
        "type": "disc",
        "running": true,
        "being_drained": false,
        "uptime": server.started.elapsed().as_millis() as u64,
        "os_pid": std::process::id().to_string(),
        "processors": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "mem_used": mailroom_broker::alarm::memory_in_use(broker.held_bytes()),
        // Beyond RabbitMQ: what connections hold for clients outside the queues (counted in mem_used).
        "mem_clients": client_memory_json(broker.client_memory()),
        "mem_alarm": alarms.memory,
        "disk_free_alarm": alarms.disk,
        "rates_mode": "basic",
        "enabled_plugins": [],
        "applications": [],
        "exchange_types": EXCHANGE_TYPES.iter().map(|(name, _)| json!({ "name": name, "enabled": true })).collect::<Vec<_>>(),
        "rabbitmq_version": RABBITMQ_COMPAT_VERSION,
    })
}

/// `GET /api/nodes`: this node.
pub fn nodes(broker: &Broker, server: &Arc<ServerInfo>, req: &ApiRequest) -> ApiResult {
    listing::list(vec![node_json(broker, server)], &req.query).map(Reply::ok)
}

/// `GET /api/nodes/{name}`.
pub fn node(broker: &Broker, server: &Arc<ServerInfo>, name: &str) -> ApiResult {
    if name != server.node_name {
        return Err(ApiError::not_found(format!("node '{name}' not found")));
    }
    Ok(Reply::ok(node_json(broker, server)))
}

fn vhost_json(server: &ServerInfo, v: &mailroom_broker::VHost) -> Value {
    let (mut ready, mut unacked) = (0u64, 0u64);
    for q in v.queues() {
        ready += q.message_count() as u64;
        unacked += q.unacked_count() as u64;
    }
    json!({
        "name": v.name(),
        "description": "",
        "tags": [],
        "default_queue_type": "classic",
        "tracing": false,
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "message_stats": server.rates.render(&Subject::VHost(v.name().to_owned()), &message_stats::vhost_counts(v)),
        "cluster_state": {},
    })
}

/// `GET /api/vhosts` (read-only here: creating vhosts belongs to the security work).
pub fn vhosts(broker: &Broker, server: &ServerInfo, req: &ApiRequest) -> ApiResult {
    listing::list(broker.vhosts().iter().map(|v| vhost_json(server, v)).collect(), &req.query).map(Reply::ok)
}

/// `GET /api/vhosts/{name}`.
pub fn vhost(broker: &Broker, server: &ServerInfo, name: &str) -> ApiResult {
    Ok(Reply::ok(vhost_json(server, &*vhost_of(broker, name)?)))
}

fn failed(body: Value) -> ApiResult {
    Ok(Reply { status: StatusCode::SERVICE_UNAVAILABLE, body, location: None })
}

/// `GET /api/health/checks/alarms` and `local-alarms` (one node: the same answer).
pub fn alarms(broker: &Broker, server: &Arc<ServerInfo>) -> ApiResult {
    let state = *broker.alarms().borrow();
    if !state.any() {
        return Ok(Reply::ok(json!({ "status": "ok" })));
    }
    let mut alarms = Vec::new();
    if state.memory {
        alarms.push(json!({ "node": server.node_name, "resource": "memory" }));
    }
    if state.disk {
        alarms.push(json!({ "node": server.node_name, "resource": "disk" }));
    }
    failed(json!({ "status": "failed", "reason": "There are alarms in effect in the cluster", "alarms": alarms }))
}

/// `GET /api/health/checks/port-listener/{port}`.
pub fn port_listener(server: &Arc<ServerInfo>, port: &str) -> ApiResult {
    let port: u16 = port.parse().map_err(|_| ApiError::bad_request(format!("invalid port: {port}")))?;
    let ports: Vec<u16> = server.listeners.iter().map(|l| l.addr.port()).collect();
    if ports.contains(&port) {
        return Ok(Reply::ok(json!({ "status": "ok", "port": port })));
    }
    failed(json!({ "status": "failed", "reason": "No active listener", "missing": port, "ports": ports }))
}

/// `GET /api/health/checks/protocol-listener/{protocol}` (`amqp`, `amqp091`, `amqp0-9-1`, `http`).
pub fn protocol_listener(server: &Arc<ServerInfo>, protocol: &str) -> ApiResult {
    let wanted = match protocol.to_ascii_lowercase().as_str() {
        "amqp" | "amqp091" | "amqp0-9-1" | "amqp0.9.1" | "amqp0_9_1" => "amqp",
        "http" | "management" => "http",
        other => return failed_protocol(server, other),
    };
    if server.listeners.iter().any(|l| l.protocol == wanted) {
        return Ok(Reply::ok(json!({ "status": "ok", "protocol": wanted })));
    }
    failed_protocol(server, wanted)
}

fn failed_protocol(server: &ServerInfo, missing: &str) -> ApiResult {
    let mut protocols: Vec<&str> = server.listeners.iter().map(|l| l.protocol).collect();
    protocols.dedup();
    failed(json!({ "status": "failed", "reason": "No active listener", "missing": missing, "protocols": protocols }))
}

/// `GET /api/aliveness-test/{vhost}`, as RabbitMQ 3.10: declares the non-durable queue `aliveness-test`,
/// publishes a message to it through the default exchange and gets it back.
pub async fn aliveness(broker: &Broker, vhost: &str) -> ApiResult {
    const QUEUE: &str = "aliveness-test";
    const BODY: &[u8] = b"test_message";
    let v = vhost_of(broker, vhost)?;
    let options = QueueOptions { durable: false, ..Default::default() };
    v.declare_queue(QUEUE, &options, 0)?;
    let q = crate::api::queue_of(&v, QUEUE)?;
    // Leftovers of an earlier test that failed half-way must not be mistaken for this one's message.
    q.purge();
    v.publish("", Message::new("", QUEUE, BasicProperties::default(), Bytes::from_static(BODY)))?;
    match q.get(true) {
        Some(got) if got.message.body.as_ref() == BODY => Ok(Reply::ok(json!({ "status": "ok" }))),
        _ => failed(json!({ "status": "failed", "reason": "the test message did not come back" })),
    }
}
