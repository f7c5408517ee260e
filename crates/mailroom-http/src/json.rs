//! Broker values as JSON, with RabbitMQ management API field names.

use base64::Engine;
use mailroom_broker::{AMQPValue, BasicProperties, FieldArray, FieldTable, Message, Policy, Queue, VHost};
use serde_json::{json, Map, Value};

/// An AMQP field value as JSON (byte arrays and non-UTF-8 strings as base64-free lossy text).
pub fn amqp_value(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(items) => Value::Array(items.as_slice().iter().map(amqp_value).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// A field table as a JSON object.
pub fn table(t: &FieldTable) -> Value {
    Value::Object(t.inner().iter().map(|(k, v)| (k.as_str().to_owned(), amqp_value(v))).collect())
}

/// Message properties as the management API's `properties` object (only those that are set).
pub fn properties(p: &BasicProperties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    if let Some(v) = p.content_type() {
        put("content_type", json!(v.as_str()));
    }
    if let Some(v) = p.content_encoding() {
        put("content_encoding", json!(v.as_str()));
    }
    if let Some(v) = p.headers() {
        put("headers", table(v));
    }
    if let Some(v) = p.delivery_mode() {
        put("delivery_mode", json!(v));
    }
    if let Some(v) = p.priority() {
        put("priority", json!(v));
    }
    if let Some(v) = p.correlation_id() {
        put("correlation_id", json!(v.as_str()));
    }
    if let Some(v) = p.reply_to() {
        put("reply_to", json!(v.as_str()));
    }
    if let Some(v) = p.expiration() {
        put("expiration", json!(v.as_str()));
    }
    if let Some(v) = p.message_id() {
        put("message_id", json!(v.as_str()));
    }
    if let Some(v) = p.timestamp() {
        put("timestamp", json!(v));
    }
    if let Some(v) = p.kind() {
        put("type", json!(v.as_str()));
    }
    if let Some(v) = p.user_id() {
        put("user_id", json!(v.as_str()));
    }
    if let Some(v) = p.app_id() {
        put("app_id", json!(v.as_str()));
    }
    Value::Object(m)
}

/// A peeked message, as the management API's "get messages" answer: UTF-8 bodies as `string`, others as
/// `base64` in `payload_encoding`.
pub fn message(m: &Message, redelivered: bool, remaining: usize) -> Value {
    let (payload, encoding) = match std::str::from_utf8(&m.body) {
        Ok(s) => (s.to_owned(), "string"),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(&m.body), "base64"),
    };
    json!({
        "payload_bytes": m.body.len(),
        "redelivered": redelivered,
        "exchange": &*m.exchange,
        "routing_key": &*m.routing_key,
        "message_count": remaining,
        "properties": properties(&m.properties),
        "payload": payload,
        "payload_encoding": encoding,
    })
}

/// A JSON value as an AMQP field value (integers as signed 64-bit, other numbers as doubles).
pub fn to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(items.iter().map(to_amqp).collect::<Vec<_>>())),
        Value::Object(map) => AMQPValue::FieldTable(to_table(map)),
    }
}

/// A JSON object as a field table.
pub fn to_table(map: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in map {
        t.insert(k.as_str().into(), to_amqp(v));
    }
    t
}

/// A policy as the management API shows it.
pub fn policy(vhost: &str, p: &Policy) -> Value {
    json!({
        "vhost": vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to.as_str(),
        "definition": table(&p.definition),
        "priority": p.priority,
    })
}

/// A queue as the management API lists it.
pub fn queue(v: &VHost, q: &Queue) -> Value {
    let vhost = v.name();
    let spec = q.spec();
    let policy_name = q.policy_name();
    let effective = policy_name.as_deref().and_then(|n| v.policy(n)).map(|p| table(&p.definition)).unwrap_or(json!({}));
    let ready = q.message_count();
    let unacked = q.unacked_count();
    json!({
        "name": spec.name,
        "vhost": vhost,
        "durable": spec.durable,
        "auto_delete": spec.auto_delete,
        "exclusive": spec.exclusive_owner.is_some(),
        "arguments": table(&spec.arguments),
        "messages": ready as u64 + unacked as u64,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "consumers": q.consumer_count(),
        // RabbitMQ's meanings: all message bytes, those in RAM, and ready messages whose body is on disk.
        "message_bytes": q.message_bytes(),
        "message_bytes_ram": q.held_bytes(),
        "messages_paged_out": q.paged_count(),
        // Records that failed their checksum, copied to the store's quarantine file and removed.
        "quarantined": q.quarantined_count(),
        // Body reads that failed with an I/O error (each retried; the message stayed in the queue).
        "read_errors": q.read_error_count(),
        "policy": policy_name,
        "effective_policy_definition": effective,
        "type": "classic",
        "state": "running",
    })
}

/// An exchange as the management API lists it (`""` is the default exchange, as RabbitMQ shows it).
pub fn exchange(vhost: &str, e: &mailroom_broker::Exchange) -> Value {
    let spec = e.spec();
    json!({
        "name": spec.name,
        "vhost": vhost,
        "type": spec.type_name(),
        "durable": spec.durable,
        "auto_delete": spec.auto_delete,
        "internal": spec.internal,
        "arguments": table(&spec.arguments),
        "user_who_performed_action": if spec.name.is_empty() || spec.name.starts_with("amq.") { "rmq-internal" } else { "" },
    })
}

/// RabbitMQ's `properties_key` of a binding: the routing key with `%` and `~` escaped, or `~` for an empty
/// one, then `~` and a short hash of the arguments when there are any. Clients treat it as opaque: they
/// read it from a listing and send it back to address one binding.
pub fn properties_key(routing_key: &str, arguments: &FieldTable) -> String {
    let key = if routing_key.is_empty() && arguments.inner().is_empty() {
        "~".to_owned()
    } else {
        routing_key.replace('%', "%25").replace('~', "%7E")
    };
    if arguments.inner().is_empty() {
        return key;
    }
    // FNV-1a over the arguments' JSON (field tables keep their keys sorted, so equal tables hash equal).
    let text = table(arguments).to_string();
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    format!("{key}~{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.to_be_bytes()))
}

/// A binding as the management API lists it.
pub fn binding(vhost: &str, source: &str, destination: &str, queue: bool, key: &str, args: &FieldTable) -> Value {
    json!({
        "source": source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": if queue { "queue" } else { "exchange" },
        "routing_key": key,
        "arguments": table(args),
        "properties_key": properties_key(key, args),
    })
}

/// Message properties from the management API's `properties` object (publish); unknown fields are errors.
pub fn to_properties(value: &Value) -> Result<BasicProperties, String> {
    let Some(map) = value.as_object() else {
        return if value.is_null() {
            Ok(BasicProperties::default())
        } else {
            Err("properties must be an object".into())
        };
    };
    let mut p = BasicProperties::default();
    for (k, v) in map {
        let text = || v.as_str().map(|s| s.into()).ok_or_else(|| format!("property {k} must be a string"));
        let int = || v.as_u64().ok_or_else(|| format!("property {k} must be a non-negative integer"));
        p = match k.as_str() {
            "content_type" => p.with_content_type(text()?),
            "content_encoding" => p.with_content_encoding(text()?),
            "headers" => match v {
                Value::Object(h) => p.with_headers(to_table(h)),
                _ => return Err("headers must be an object".into()),
            },
            "delivery_mode" => p.with_delivery_mode(int()?.min(255) as u8),
            "priority" => p.with_priority(int()?.min(255) as u8),
            "correlation_id" => p.with_correlation_id(text()?),
            "reply_to" => p.with_reply_to(text()?),
            "expiration" => p.with_expiration(text()?),
            "message_id" => p.with_message_id(text()?),
            "timestamp" => p.with_timestamp(int()?),
            "type" => p.with_type(text()?),
            "user_id" => p.with_user_id(text()?),
            "app_id" => p.with_app_id(text()?),
            "cluster_id" => p,
            other => return Err(format!("unknown property {other}")),
        };
    }
    Ok(p)
}
