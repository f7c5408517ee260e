//! Definitions in RabbitMQ's JSON format (`rabbitmqctl export_definitions`, `GET /api/definitions`):
//! export, and import with RabbitMQ's merge rules: vhosts are created, policies overwritten, queues and
//! exchanges that exist are kept as they are, bindings added (an existing one is a no-op). Import stops at
//! the first error and reports it. Users (with their password hashes), permissions, topic permissions and
//! vhost limits go to the broker's access registry ([`mailroom_broker::access`]); other runtime and
//! global parameters are accepted and skipped (Mailroom has no federation or shovel).

use crate::api::{vhost_of, ApiError, ApiRequest, ApiResult, PolicyBody, Reply};
use crate::json;
use crate::node::RABBITMQ_COMPAT_VERSION;
use hyper::StatusCode;
use mailroom_broker::exchange::Destination;
use mailroom_broker::{Broker, ExchangeOptions, FieldTable, QueueOptions, VHost};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Exports every vhost's definitions (`vhost` None) or one vhost's (without `vhost` fields, as RabbitMQ).
pub fn export(broker: &Broker, vhost: Option<&str>) -> Result<Value, ApiError> {
    let vhosts = match vhost {
        Some(name) => vec![vhost_of(broker, name)?],
        None => broker.vhosts(),
    };
    let with_vhost = vhost.is_none();
    let (mut policies, mut queues, mut exchanges, mut bindings) = (vec![], vec![], vec![], vec![]);
    for v in &vhosts {
        let tag = |mut o: Value| {
            if !with_vhost {
                if let Value::Object(m) = &mut o {
                    m.remove("vhost");
                }
            }
            o
        };
        let mut ps = v.policies();
        ps.sort_by(|a, b| a.name.cmp(&b.name));
        policies.extend(ps.iter().map(|p| tag(json::policy(v.name(), p))));
        let mut qs = v.queues();
        qs.sort_by(|a, b| a.name().cmp(b.name()));
        // Exclusive queues belong to their connection and are never exported (RabbitMQ leaves them out too).
        for q in qs.iter().filter(|q| q.spec().exclusive_owner.is_none()) {
            let spec = q.spec();
            queues.push(tag(json!({
                "name": spec.name,
                "vhost": v.name(),
                "durable": spec.durable,
                "auto_delete": spec.auto_delete,
                "arguments": json::table(&spec.arguments),
            })));
        }
        let mut xs = v.exchanges();
        xs.sort_by(|a, b| a.name().cmp(b.name()));
        for e in &xs {
            if e.name().is_empty() || e.name().starts_with("amq.") {
                continue;
            }
            let mut o = json::exchange(v.name(), e);
            if let Value::Object(m) = &mut o {
                m.remove("user_who_performed_action");
            }
            exchanges.push(tag(o));
            let mut bs = e.bindings();
            bs.sort_by(|a, b| a.routing_key.cmp(&b.routing_key));
            for b in bs {
                let (dest, is_queue, exclusive) = match &b.destination {
                    Destination::Queue(q) => (q.name().to_owned(), true, q.spec().exclusive_owner.is_some()),
                    Destination::Exchange(x) => (x.name().to_owned(), false, false),
                };
                if exclusive {
                    continue;
                }
                let mut o = json::binding(v.name(), e.name(), &dest, is_queue, &b.routing_key, &b.arguments);
                if let Value::Object(m) = &mut o {
                    m.remove("properties_key");
                }
                bindings.push(tag(o));
            }
        }
        // amq.* exchanges can be sources of user bindings too.
        for e in xs.iter().filter(|e| e.name().starts_with("amq.")) {
            for b in e.bindings() {
                let (dest, is_queue) = match &b.destination {
                    Destination::Queue(q) if q.spec().exclusive_owner.is_none() => (q.name().to_owned(), true),
                    Destination::Queue(_) => continue,
                    Destination::Exchange(x) => (x.name().to_owned(), false),
                };
                let mut o = json::binding(v.name(), e.name(), &dest, is_queue, &b.routing_key, &b.arguments);
                if let Value::Object(m) = &mut o {
                    m.remove("properties_key");
                }
                bindings.push(tag(o));
            }
        }
    }
    let mut out = json!({
        "rabbit_version": RABBITMQ_COMPAT_VERSION,
        "rabbitmq_version": RABBITMQ_COMPAT_VERSION,
        "product_name": "Mailroom",
        "product_version": env!("CARGO_PKG_VERSION"),
        "parameters": [],
        "policies": policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    });
    if with_vhost {
        out["vhosts"] = Value::Array(vhosts.iter().map(|v| json!({ "name": v.name() })).collect());
        out["global_parameters"] = json!([]);
        if let Value::Object(doc) = &mut out {
            // Users (with their hashes), permissions, topic permissions and vhost limits.
            broker.access().export().write_json(doc);
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct QueueDef {
    name: String,
    vhost: Option<String>,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    arguments: Map<String, Value>,
}

#[derive(Deserialize)]
struct ExchangeDef {
    name: String,
    vhost: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: Map<String, Value>,
}

#[derive(Deserialize)]
struct BindingDef {
    source: String,
    vhost: Option<String>,
    destination: String,
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: Map<String, Value>,
}

fn yes() -> bool {
    true
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Vhosts created.
    pub vhosts: usize,
    /// Policies set (new or overwritten).
    pub policies: usize,
    /// Queues declared (existing ones are kept and not counted).
    pub queues: usize,
    /// Exchanges declared (existing ones are kept and not counted).
    pub exchanges: usize,
    /// Bindings added or confirmed.
    pub bindings: usize,
    /// Users created or replaced (with their password hashes).
    pub users: usize,
    /// Permissions and topic permissions set.
    pub permissions: usize,
    /// Sections accepted but not applied (parameters other than vhost limits), with their item counts.
    pub skipped: Vec<(String, usize)>,
}

fn items<'a>(doc: &'a Value, key: &str) -> Result<&'a [Value], String> {
    match doc.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("'{key}' must be a list")),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(kind: &str, v: &Value) -> Result<T, String> {
    serde_json::from_value(v.clone()).map_err(|e| format!("invalid {kind} definition {v}: {e}"))
}

/// Imports a definitions document into the broker (into `vhost` when given: the document is then a
/// per-vhost one and its items' `vhost` fields are ignored). Stops at the first error.
pub fn import(broker: &Broker, doc: &Value, vhost: Option<&str>) -> Result<ImportReport, String> {
    if !doc.is_object() {
        return Err("definitions must be a JSON object".into());
    }
    let mut report = ImportReport::default();
    // Checked before anything is applied, applied after the vhosts exist.
    let access = if vhost.is_none() {
        Some(mailroom_broker::access::AccessDefinitions::from_json(doc).map_err(|e| e.to_string())?)
    } else {
        None
    };
    for section in ["parameters", "global_parameters"] {
        let n = items(doc, section)?.len();
        if n > 0 {
            tracing::info!(
                section,
                items = n,
                "definitions import: section skipped (not managed by Mailroom's definitions)"
            );
            report.skipped.push((section.to_owned(), n));
        }
    }
    let target = |item_vhost: &Option<String>| -> Result<std::sync::Arc<VHost>, String> {
        let name = vhost.or(item_vhost.as_deref()).unwrap_or("/");
        broker.vhost(name).map_err(|_| format!("vhost '{name}' does not exist"))
    };
    if vhost.is_none() {
        for v in items(doc, "vhosts")? {
            let name = v.get("name").and_then(Value::as_str).ok_or_else(|| format!("invalid vhost {v}"))?;
            if broker.vhost(name).is_err() {
                broker.add_vhost(name);
                report.vhosts += 1;
            }
        }
    }
    if let Some(access) = &access {
        let counts = broker.access().import(access).map_err(|e| e.to_string())?;
        report.users = counts.users;
        report.permissions = counts.permissions + counts.topic_permissions;
    }
    for p in items(doc, "policies")? {
        let name = p.get("name").and_then(Value::as_str).ok_or_else(|| format!("invalid policy {p}"))?;
        let item_vhost = p.get("vhost").and_then(Value::as_str).map(str::to_owned);
        let v = target(&item_vhost)?;
        let body: PolicyBody = parse("policy", p)?;
        let policy = body.into_policy(name).map_err(|e| format!("policy '{name}': {}", e.reason()))?;
        v.set_policy(policy);
        report.policies += 1;
    }
    for q in items(doc, "queues")? {
        let q: QueueDef = parse("queue", q)?;
        let v = target(&q.vhost)?;
        if v.queues().iter().any(|existing| existing.name() == q.name) {
            continue;
        }
        let options = QueueOptions {
            durable: q.durable,
            auto_delete: q.auto_delete,
            arguments: json::to_table(&q.arguments),
            ..Default::default()
        };
        v.declare_queue(&q.name, &options, 0).map_err(|e| format!("queue '{}': {}", q.name, e.message))?;
        report.queues += 1;
    }
    for e in items(doc, "exchanges")? {
        let e: ExchangeDef = parse("exchange", e)?;
        let v = target(&e.vhost)?;
        if v.exchange(&e.name).is_ok() {
            continue;
        }
        let options = ExchangeOptions {
            passive: false,
            durable: e.durable,
            auto_delete: e.auto_delete,
            internal: e.internal,
            arguments: json::to_table(&e.arguments),
        };
        v.declare_exchange(&e.name, &e.kind, &options)
            .map_err(|err| format!("exchange '{}': {}", e.name, err.message))?;
        report.exchanges += 1;
    }
    for b in items(doc, "bindings")? {
        let b: BindingDef = parse("binding", b)?;
        let v = target(&b.vhost)?;
        let args: FieldTable = json::to_table(&b.arguments);
        let result = match b.destination_type.as_str() {
            "queue" => v.bind_queue(&b.destination, &b.source, &b.routing_key, &args, 0),
            "exchange" => v.bind_exchange(&b.destination, &b.source, &b.routing_key, &args),
            other => return Err(format!("binding from '{}': unknown destination_type '{other}'", b.source)),
        };
        result.map_err(|e| format!("binding from '{}' to '{}': {}", b.source, b.destination, e.message))?;
        report.bindings += 1;
    }
    Ok(report)
}

/// `POST /api/definitions[/{vhost}]`: 204, or 400 with the first error.
pub fn import_request(broker: &Broker, vhost: Option<&str>, req: &ApiRequest) -> ApiResult {
    if let Some(v) = vhost {
        vhost_of(broker, v)?;
    }
    let doc: Value = req.json()?;
    let before: Vec<String> = broker.vhosts().iter().map(|v| v.name().to_owned()).collect();
    let result = import(broker, &doc, vhost);
    // As RabbitMQ: the importing user gets full permissions on the vhosts the import created.
    for v in broker.vhosts().iter().filter(|v| !before.iter().any(|b| b == v.name())) {
        if broker.access().permissions(&req.user, v.name()).is_none() {
            let _ = broker.access().set_permissions(&req.user, v.name(), mailroom_broker::access::Permissions::full());
        }
    }
    let report = result.map_err(ApiError::bad_request)?;
    tracing::info!(?report, user = %req.user, "definitions imported");
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}
