//! Exchanges, queues and bindings: list, declare, delete, purge, get messages, publish.

use crate::api::{queue_of, vhost_of, ApiError, ApiRequest, ApiResult, Reply};
use crate::listing;
use crate::message_stats::{self, Subject};
use crate::{json, ServerInfo, MAX_PEEK_COUNT};
use base64::Engine;
use bytes::Bytes;
use hyper::StatusCode;
use mailroom_broker::exchange::Destination;
use mailroom_broker::{Broker, ExchangeOptions, FieldTable, Message, QueueOptions, VHost};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The name RabbitMQ's API uses in paths for the default exchange `""`.
const DEFAULT_EXCHANGE_PATH_NAME: &str = "amq.default";

fn exchange_name(path_name: &str) -> &str {
    if path_name == DEFAULT_EXCHANGE_PATH_NAME {
        ""
    } else {
        path_name
    }
}

fn vhosts_of(broker: &Broker, vhost: Option<&str>) -> Result<Vec<Arc<VHost>>, ApiError> {
    match vhost {
        Some(name) => Ok(vec![vhost_of(broker, name)?]),
        None => Ok(broker.vhosts()),
    }
}

fn arguments(value: &Option<Value>) -> Result<FieldTable, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(FieldTable::default()),
        Some(Value::Object(map)) => Ok(json::to_table(map)),
        Some(_) => Err(ApiError::bad_request("arguments must be an object")),
    }
}

// ---- exchanges ----

/// `GET /api/exchanges[/{vhost}]`.
pub fn list_exchanges(broker: &Broker, server: &ServerInfo, vhost: Option<&str>, req: &ApiRequest) -> ApiResult {
    let mut items = Vec::new();
    for v in vhosts_of(broker, vhost)? {
        let mut exchanges = v.exchanges();
        exchanges.sort_by(|a, b| a.name().cmp(b.name()));
        items.extend(exchanges.iter().map(|e| exchange_json(server, v.name(), e)));
    }
    listing::list(items, &req.query).map(Reply::ok)
}

fn exchange_of(v: &VHost, path_name: &str) -> Result<Arc<mailroom_broker::Exchange>, ApiError> {
    v.exchange(exchange_name(path_name))
        .map_err(|_| ApiError::not_found(format!("exchange '{path_name}' not found in vhost '{}'", v.name())))
}

/// An exchange as listed, with its `message_stats`.
fn exchange_json(server: &ServerInfo, vhost: &str, e: &mailroom_broker::Exchange) -> Value {
    let mut out = json::exchange(vhost, e);
    let subject = Subject::Exchange(vhost.to_owned(), e.name().to_owned());
    out["message_stats"] = server.rates.render(&subject, &message_stats::exchange_counts(e));
    out
}

/// `GET /api/exchanges/{vhost}/{name}`.
pub fn get_exchange(broker: &Broker, server: &ServerInfo, vhost: &str, name: &str) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let e = exchange_of(&v, name)?;
    let mut out = exchange_json(server, v.name(), &e);
    out["incoming"] = json!([]);
    out["outgoing"] = json!([]);
    Ok(Reply::ok(out))
}

#[derive(Deserialize)]
struct ExchangeBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    durable: Option<bool>,
    auto_delete: Option<bool>,
    internal: Option<bool>,
    arguments: Option<Value>,
}

/// `PUT /api/exchanges/{vhost}/{name}`: 201 when created, 204 when it existed (equivalent).
pub fn declare_exchange(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let body: ExchangeBody = req.json()?;
    let kind = body.kind.ok_or_else(|| ApiError::bad_request("[{key_missing,type}]"))?;
    let existed = v.exchange(name).is_ok();
    let options = ExchangeOptions {
        passive: false,
        // The management API's default, unlike AMQP's.
        durable: body.durable.unwrap_or(true),
        auto_delete: body.auto_delete.unwrap_or(false),
        internal: body.internal.unwrap_or(false),
        arguments: arguments(&body.arguments)?,
    };
    v.declare_exchange(name, &kind, &options)?;
    Ok(Reply::created_or_updated(!existed))
}

/// `DELETE /api/exchanges/{vhost}/{name}[?if-unused=true]`.
pub fn delete_exchange(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    exchange_of(&v, name)?;
    v.delete_exchange(exchange_name(name), req.query.flag("if-unused"))?;
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// Every binding of a vhost as (source, destination name, is queue, key, args), the default exchange's
/// implicit ones (one per queue, keyed by its name) first, as RabbitMQ lists them.
fn vhost_bindings(v: &VHost) -> Vec<Value> {
    let mut queues = v.queues();
    queues.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out: Vec<Value> =
        queues.iter().map(|q| json::binding(v.name(), "", q.name(), true, q.name(), &FieldTable::default())).collect();
    let mut exchanges = v.exchanges();
    exchanges.sort_by(|a, b| a.name().cmp(b.name()));
    let mut explicit = Vec::new();
    for e in exchanges.iter().filter(|e| !e.name().is_empty()) {
        for b in e.bindings() {
            let (dest, is_queue) = match &b.destination {
                Destination::Queue(q) => (q.name().to_owned(), true),
                Destination::Exchange(x) => (x.name().to_owned(), false),
            };
            explicit.push(json::binding(v.name(), e.name(), &dest, is_queue, &b.routing_key, &b.arguments));
        }
    }
    // RabbitMQ orders by source, then destination type and name, then key.
    explicit.sort_by(|a, b| {
        let k = |x: &Value| {
            (
                x["source"].as_str().unwrap_or("").to_owned(),
                x["destination_type"].as_str().unwrap_or("").to_owned(),
                x["destination"].as_str().unwrap_or("").to_owned(),
                x["routing_key"].as_str().unwrap_or("").to_owned(),
            )
        };
        k(a).cmp(&k(b))
    });
    out.extend(explicit);
    out
}

/// `GET /api/exchanges/{vhost}/{name}/bindings/source|destination`.
pub fn exchange_bindings(broker: &Broker, vhost: &str, name: &str, as_source: bool, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    exchange_of(&v, name)?;
    let name = exchange_name(name);
    let items = vhost_bindings(&v)
        .into_iter()
        .filter(|b| {
            if as_source {
                b["source"] == name && !name.is_empty()
            } else {
                b["destination_type"] == "exchange" && b["destination"] == name
            }
        })
        .collect();
    listing::list(items, &req.query).map(Reply::ok)
}

#[derive(Deserialize)]
struct PublishBody {
    #[serde(default)]
    properties: Value,
    routing_key: String,
    payload: String,
    payload_encoding: String,
}

/// `POST /api/exchanges/{vhost}/{name}/publish`: `{"routed": bool}`; answers once a persistent message is
/// on disk in every durable queue it reached.
pub async fn publish(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    exchange_of(&v, name)?;
    let body: PublishBody = req.json()?;
    let payload = match body.payload_encoding.as_str() {
        "string" => Bytes::from(body.payload.into_bytes()),
        "base64" => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(body.payload.as_bytes())
                .map_err(|_| ApiError::bad_request("payload is not valid base64"))?,
        ),
        other => return Err(ApiError::bad_request(format!("unsupported payload_encoding '{other}'"))),
    };
    let properties = json::to_properties(&body.properties).map_err(ApiError::bad_request)?;
    let exchange = exchange_name(name);
    let result = v.publish(exchange, Message::new(exchange, &body.routing_key, properties, payload))?;
    for ticket in result.durable {
        ticket
            .wait()
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("message not stored: {e}")))?;
    }
    if result.rejected {
        return Err(ApiError::bad_request("the message was refused (queue full or store unavailable)"));
    }
    Ok(Reply::ok(json!({ "routed": result.routed })))
}

// ---- queues ----

/// A queue as listed, with the node it lives on and its `message_stats`.
fn queue_json(server: &ServerInfo, v: &VHost, q: &mailroom_broker::Queue) -> Value {
    let mut out = json::queue(v, q);
    if let Value::Object(map) = &mut out {
        map.insert("node".into(), json!(server.node_name));
        let subject = Subject::Queue(v.name().to_owned(), q.name().to_owned());
        map.insert("message_stats".into(), server.rates.render(&subject, &message_stats::queue_counts(q)));
        let ready = q.ready_bytes();
        map.insert("message_bytes_ready".into(), json!(ready));
        map.insert("message_bytes_unacknowledged".into(), json!(q.message_bytes().saturating_sub(ready)));
        map.insert("exclusive_consumer_tag".into(), Value::Null);
        map.insert("operator_policy".into(), Value::Null);
    }
    out
}

/// `GET /api/queues[/{vhost}]`.
pub fn list_queues(broker: &Broker, server: &ServerInfo, vhost: Option<&str>, req: &ApiRequest) -> ApiResult {
    let mut items = Vec::new();
    for v in vhosts_of(broker, vhost)? {
        let mut queues = v.queues();
        queues.sort_by(|a, b| a.name().cmp(b.name()));
        items.extend(queues.iter().map(|q| queue_json(server, &v, q)));
    }
    listing::list(items, &req.query).map(Reply::ok)
}

/// `GET /api/queues/{vhost}/{name}`.
pub fn get_queue(broker: &Broker, server: &ServerInfo, vhost: &str, name: &str) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let q = queue_of(&v, name)?;
    let mut out = queue_json(server, &v, &q);
    out["consumer_details"] = json!([]);
    out["deliveries"] = json!([]);
    out["incoming"] = json!([]);
    Ok(Reply::ok(out))
}

#[derive(Deserialize)]
struct QueueBody {
    durable: Option<bool>,
    auto_delete: Option<bool>,
    arguments: Option<Value>,
    #[allow(dead_code)]
    node: Option<String>,
}

/// `PUT /api/queues/{vhost}/{name}`: 201 when created, 204 when it existed (equivalent).
pub fn declare_queue(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let body: QueueBody = req.json()?;
    if name.is_empty() {
        return Err(ApiError::bad_request("queue name must not be empty"));
    }
    let existing = v.queues().into_iter().find(|q| q.name() == name);
    let owner = existing.as_ref().and_then(|q| q.spec().exclusive_owner).unwrap_or(0);
    let options = QueueOptions {
        passive: false,
        durable: body.durable.unwrap_or(true),
        exclusive: false,
        auto_delete: body.auto_delete.unwrap_or(false),
        arguments: arguments(&body.arguments)?,
    };
    v.declare_queue(name, &options, owner)?;
    Ok(Reply::created_or_updated(existing.is_none()))
}

/// `DELETE /api/queues/{vhost}/{name}[?if-empty=true&if-unused=true]`.
pub fn delete_queue(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let q = queue_of(&v, name)?;
    let owner = q.spec().exclusive_owner.unwrap_or(0);
    v.delete_queue(name, req.query.flag("if-unused"), req.query.flag("if-empty"), owner)?;
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// `DELETE /api/queues/{vhost}/{name}/contents`: purges the ready messages.
pub fn purge_queue(broker: &Broker, vhost: &str, name: &str) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let q = queue_of(&v, name)?;
    v.purge_queue(name, q.spec().exclusive_owner.unwrap_or(0))?;
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

#[derive(Deserialize)]
struct GetBody {
    count: Option<usize>,
    ackmode: Option<String>,
    encoding: Option<String>,
    truncate: Option<usize>,
}

/// What happens to messages taken by `POST /api/queues/{vhost}/{name}/get`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// Back to the queue (marked redelivered).
    Requeue,
    /// Acknowledged: gone.
    Ack,
    /// Rejected without requeue: dead-lettered where the queue says so.
    Reject,
}

/// `POST /api/queues/{vhost}/{name}/get` with `{count, ackmode, encoding, truncate}`.
pub fn get_messages(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let q = queue_of(&v, name)?;
    let body: GetBody = req.json()?;
    let count = body.count.ok_or_else(|| ApiError::bad_request("[{key_missing,count}]"))?;
    if count > MAX_PEEK_COUNT {
        return Err(ApiError::bad_request(format!("count must be at most {MAX_PEEK_COUNT}")));
    }
    let mode = match body.ackmode.as_deref() {
        Some("ack_requeue_true") | Some("reject_requeue_true") => AckMode::Requeue,
        Some("ack_requeue_false") => AckMode::Ack,
        Some("reject_requeue_false") => AckMode::Reject,
        Some(other) => return Err(ApiError::bad_request(format!("Unknown ackmode: {other}"))),
        None => return Err(ApiError::bad_request("[{key_missing,ackmode}]")),
    };
    let base64_always = match body.encoding.as_deref() {
        Some("auto") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::bad_request(format!("Unknown encoding: {other}"))),
        None => return Err(ApiError::bad_request("[{key_missing,encoding}]")),
    };
    // Every message is taken before any goes back: requeueing one at a time would hand the same message
    // out again.
    let mut taken = Vec::new();
    let mut out = Vec::new();
    for _ in 0..count {
        let Some(got) = q.get(mode == AckMode::Ack) else { break };
        out.push(got_json(&got, base64_always, body.truncate));
        taken.push(got.id);
    }
    match mode {
        AckMode::Ack => {}
        AckMode::Requeue => q.reject(&taken, true),
        AckMode::Reject => q.reject(&taken, false),
    }
    Ok(Reply::ok(Value::Array(out)))
}

fn got_json(got: &mailroom_broker::GetResult, base64_always: bool, truncate: Option<usize>) -> Value {
    let m = &got.message;
    let body = match truncate {
        Some(n) if n < m.body.len() => &m.body[..n],
        _ => &m.body[..],
    };
    let (payload, encoding) = match (base64_always, std::str::from_utf8(body)) {
        (false, Ok(s)) => (s.to_owned(), "string"),
        _ => (base64::engine::general_purpose::STANDARD.encode(body), "base64"),
    };
    json!({
        "payload_bytes": m.body.len(),
        "redelivered": got.redelivered,
        "exchange": &*m.exchange,
        "routing_key": &*m.routing_key,
        "message_count": got.remaining,
        "properties": json::properties(&m.properties),
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// `GET /api/queues/{vhost}/{name}/bindings`.
pub fn queue_bindings(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    queue_of(&v, name)?;
    let items = vhost_bindings(&v)
        .into_iter()
        .filter(|b| b["destination_type"] == "queue" && b["destination"] == name)
        .collect();
    listing::list(items, &req.query).map(Reply::ok)
}

// ---- bindings ----

/// `GET /api/bindings[/{vhost}]`.
pub fn list_bindings(broker: &Broker, vhost: Option<&str>, req: &ApiRequest) -> ApiResult {
    let items = vhosts_of(broker, vhost)?.iter().flat_map(|v| vhost_bindings(v)).collect();
    listing::list(items, &req.query).map(Reply::ok)
}

/// Checks both ends of `/api/bindings/{vhost}/e/{source}/{q|e}/{destination}` exist (404 otherwise).
fn binding_ends(
    broker: &Broker,
    vhost: &str,
    source: &str,
    kind: &str,
    destination: &str,
) -> Result<Arc<VHost>, ApiError> {
    let v = vhost_of(broker, vhost)?;
    exchange_of(&v, source)?;
    if kind == "q" {
        queue_of(&v, destination)?;
    } else {
        exchange_of(&v, destination)?;
    }
    Ok(v)
}

fn between(v: &VHost, source: &str, kind: &str, destination: &str) -> Vec<Value> {
    let source = exchange_name(source);
    let dest_type = if kind == "q" { "queue" } else { "exchange" };
    let destination = if kind == "q" { destination } else { exchange_name(destination) };
    vhost_bindings(v)
        .into_iter()
        .filter(|b| b["source"] == source && b["destination_type"] == dest_type && b["destination"] == destination)
        .collect()
}

/// `GET /api/bindings/{vhost}/e/{source}/{q|e}/{destination}`.
pub fn bindings_between(
    broker: &Broker,
    vhost: &str,
    source: &str,
    kind: &str,
    destination: &str,
    req: &ApiRequest,
) -> ApiResult {
    let v = binding_ends(broker, vhost, source, kind, destination)?;
    listing::list(between(&v, source, kind, destination), &req.query).map(Reply::ok)
}

#[derive(Deserialize)]
struct BindingBody {
    #[serde(default)]
    routing_key: String,
    arguments: Option<Value>,
}

/// `POST /api/bindings/{vhost}/e/{source}/{q|e}/{destination}`: 201 with a `Location` naming the binding.
pub fn create_binding(
    broker: &Broker,
    vhost: &str,
    source: &str,
    kind: &str,
    destination: &str,
    req: &ApiRequest,
) -> ApiResult {
    let v = binding_ends(broker, vhost, source, kind, destination)?;
    let body: BindingBody = req.json()?;
    let args = arguments(&body.arguments)?;
    let source = exchange_name(source);
    if kind == "q" {
        let owner = queue_of(&v, destination)?.spec().exclusive_owner.unwrap_or(0);
        v.bind_queue(destination, source, &body.routing_key, &args, owner)?;
    } else {
        v.bind_exchange(exchange_name(destination), source, &body.routing_key, &args)?;
    }
    let key = json::properties_key(&body.routing_key, &args);
    Ok(Reply {
        status: StatusCode::CREATED,
        body: Value::Null,
        location: Some(format!("{}/{}", path_escape(destination), path_escape(&key))),
    })
}

/// Percent-escapes a path segment (RFC 3986 unreserved characters stay).
fn path_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn find_binding(v: &VHost, source: &str, kind: &str, destination: &str, props: &str) -> Result<Value, ApiError> {
    between(v, source, kind, destination)
        .into_iter()
        .find(|b| b["properties_key"] == props)
        .ok_or_else(|| ApiError::not_found(format!("binding '{props}' not found")))
}

/// `GET /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{props}`.
pub fn get_binding(
    broker: &Broker,
    vhost: &str,
    source: &str,
    kind: &str,
    destination: &str,
    props: &str,
) -> ApiResult {
    let v = binding_ends(broker, vhost, source, kind, destination)?;
    find_binding(&v, source, kind, destination, props).map(Reply::ok)
}

/// `DELETE /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{props}`.
pub fn delete_binding(
    broker: &Broker,
    vhost: &str,
    source: &str,
    kind: &str,
    destination: &str,
    props: &str,
) -> ApiResult {
    let v = binding_ends(broker, vhost, source, kind, destination)?;
    let b = find_binding(&v, source, kind, destination, props)?;
    let key = b["routing_key"].as_str().unwrap_or("");
    let args = match &b["arguments"] {
        Value::Object(map) => json::to_table(map),
        _ => json::to_table(&Map::new()),
    };
    // The stored arguments, not their JSON round trip (integer widths differ): unbind by the binding itself.
    let args = stored_arguments(&v, source, kind, destination, key, &args).unwrap_or(args);
    let source = exchange_name(source);
    if source.is_empty() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "operation not permitted on the default exchange"));
    }
    if kind == "q" {
        let owner = queue_of(&v, destination)?.spec().exclusive_owner.unwrap_or(0);
        v.unbind_queue(destination, source, key, &args, owner)?;
    } else {
        v.unbind_exchange(exchange_name(destination), source, key, &args)?;
    }
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// The arguments table of the binding whose JSON form equals `wanted`.
fn stored_arguments(
    v: &VHost,
    source: &str,
    kind: &str,
    destination: &str,
    key: &str,
    wanted: &FieldTable,
) -> Option<FieldTable> {
    let e = v.exchange(exchange_name(source)).ok()?;
    let wanted = json::table(wanted);
    e.bindings()
        .into_iter()
        .find(|b| {
            let dest_matches = match &b.destination {
                Destination::Queue(q) => kind == "q" && q.name() == destination,
                Destination::Exchange(x) => kind == "e" && x.name() == exchange_name(destination),
            };
            dest_matches && b.routing_key == key && json::table(&b.arguments) == wanted
        })
        .map(|b| b.arguments)
}
