//! Request handling: authentication, routing and the answers' envelope (status, JSON, RabbitMQ's error
//! bodies). The resources themselves live in [`crate::resources`], [`crate::clients`],
//! [`crate::definitions`] and [`crate::node`].

use crate::api::{
    error_response, queue_of, respond, vhost_of, ApiError, ApiRequest, ApiResult, PolicyBody, Query, Reply,
};
use crate::hardening::ListenerContext;
use crate::{clients, definitions, hardening, json, node, resources, Body, ServerInfo, MAX_PEEK_COUNT};
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use mailroom_broker::{Broker, RedriveOptions, RedriveTarget};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;

/// Checks the listener's defences, authenticates, routes and answers one request.
pub(crate) async fn handle(
    broker: &Broker,
    server: &Arc<ServerInfo>,
    listener: &ListenerContext,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let settings = &listener.settings;
    // The Host check comes first, for every path: a rebinding page must not read /metrics or the UI either.
    if let Err(e) = hardening::check_host(req.headers(), listener.loopback_only, &settings.allowed_hosts) {
        tracing::warn!(%peer, "HTTP request refused: {}", e.reason());
        return error_response(e);
    }
    let definitions_upload = req.method() == Method::POST && req.uri().path().starts_with("/api/definitions");
    if let Err(e) = hardening::check_cross_site(req.method(), req.headers(), listener.tls, definitions_upload) {
        tracing::warn!(%peer, "HTTP request refused: {}", e.reason());
        return error_response(e);
    }
    // Prometheus scrapes without credentials, as RabbitMQ's prometheus plugin allows; the counters reveal
    // no names or message contents.
    if req.uri().path() == "/metrics" {
        if req.method() != Method::GET {
            return error_response(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "only GET on /metrics"));
        }
        let mut resp = Response::new(Full::new(Bytes::from(crate::metrics::render(broker).await)));
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
        return resp;
    }
    // The web UI's static files need no credentials: the page asks for them, then calls /api.
    if let Some(resp) = crate::ui::serve(req.method(), req.uri().path()) {
        return resp;
    }
    let user = match authenticate(broker, peer, &req) {
        Ok(user) => user,
        Err(e) => return error_response(e),
    };
    let limit = if definitions_upload { settings.max_definitions_body } else { settings.max_body };
    let (parts, body) = req.into_parts();
    let body = match hardening::read_body(&parts.headers, body, limit, settings.body_read_timeout).await {
        Ok(b) => b,
        Err(e) => {
            // The rest of an unread body would be taken for the next request: close the connection.
            let mut resp = error_response(e);
            resp.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    let request = ApiRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: Query::parse(parts.uri.query()),
        headers: parts.headers,
        body,
        rights: user.management_rights(),
        user: user.name,
    };
    match route(broker, server, &request).await {
        Ok(reply) => {
            let mut resp = if reply.status == StatusCode::NO_CONTENT || reply.body.is_null() {
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = reply.status;
                resp
            } else {
                respond(reply.status, &reply.body)
            };
            if let Some(location) = reply.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
                resp.headers_mut().insert(LOCATION, location);
            }
            resp
        }
        Err(e) => error_response(e),
    }
}

/// Basic auth against the broker's users (loopback-only users only from loopback, as for AMQP).
fn authenticate(
    broker: &Broker,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Result<mailroom_broker::AuthenticatedUser, ApiError> {
    let unauthorized = || ApiError::new(StatusCode::UNAUTHORIZED, "Not_Authorized");
    let header = req.headers().get(AUTHORIZATION).and_then(|h| h.to_str().ok()).ok_or_else(unauthorized)?;
    let encoded = header.strip_prefix("Basic ").ok_or_else(unauthorized)?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| unauthorized())?;
    let text = String::from_utf8(decoded).map_err(|_| unauthorized())?;
    let (user, pass) = text.split_once(':').ok_or_else(unauthorized)?;
    broker.authenticate(user, pass, peer.ip().is_loopback()).map_err(|e| {
        tracing::warn!(peer = %peer, "HTTP {}", e.log_line("basic"));
        unauthorized()
    })
}

/// Decodes `%XX` escapes of one path segment.
fn percent_decode(segment: &str) -> Result<String, ApiError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3).ok_or_else(|| ApiError::bad_request("bad percent-encoding"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ApiError::bad_request("bad percent-encoding"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request("path is not UTF-8"))
}

fn usize_param(query: &Query, name: &str) -> Result<Option<usize>, ApiError> {
    query
        .get(name)
        .map(|v| v.parse().map_err(|_| ApiError::bad_request(format!("{name} must be a non-negative integer"))))
        .transpose()
}

async fn route(broker: &Broker, server: &Arc<ServerInfo>, req: &ApiRequest) -> ApiResult {
    // Trailing slashes are tolerated; an empty segment in the middle (`/api/queues//q`) is not a vhost.
    let segments: Vec<String> =
        req.path.trim_end_matches('/').split('/').skip(1).map(percent_decode).collect::<Result<_, _>>()?;
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let Some(("api", rest)) = segs.split_first().map(|(a, r)| (*a, r)) else {
        return Err(ApiError::not_found("Not Found"));
    };
    crate::access_routes::check_rights(req.rights, &req.method, rest)?;
    let caller = crate::access_routes::Caller::new(broker, &req.user, req.rights);
    caller.check_vhost(broker, rest)?;
    caller.check_owner(broker, server, &req.method, rest).await?;
    let Some(keep) = caller.list_filter(&req.method, rest) else {
        return dispatch(broker, server, req, rest).await;
    };
    // A list the caller sees only part of: the whole list (no paging, all columns), filtered, then
    // sorted, projected and paged as asked.
    let whole = ApiRequest {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.without(&["page", "page_size", "name", "use_regex", "columns"]),
        headers: req.headers.clone(),
        body: req.body.clone(),
        user: req.user.clone(),
        rights: req.rights,
    };
    let reply = dispatch(broker, server, &whole, rest).await?;
    let Value::Array(items) = reply.body else { return Ok(reply) };
    let kept = items.into_iter().filter(|item| keep.keeps(item)).collect();
    crate::listing::list(kept, &req.query).map(Reply::ok)
}

/// Answers a request whose caller may make it.
async fn dispatch(broker: &Broker, server: &Arc<ServerInfo>, req: &ApiRequest, rest: &[&str]) -> ApiResult {
    if let Some(answer) = crate::access_routes::route(broker, req, rest) {
        return answer;
    }
    use Method as M;
    let m = &req.method;
    let answer = match (m, rest) {
        // Node and cluster.
        (&M::GET, ["overview"]) => node::overview(broker, server, req).await,
        (&M::GET, ["cluster-name"]) => Ok(Reply::ok(json!({ "name": server.cluster_name }))),
        (&M::GET, ["nodes"]) => node::nodes(broker, server, req),
        (&M::GET, ["nodes", name]) => node::node(broker, server, name),
        (&M::GET, ["extensions"]) => Ok(Reply::ok(json!([]))),
        (&M::GET, ["vhosts"]) => node::vhosts(broker, server, req),
        (&M::GET, ["vhosts", name]) => node::vhost(broker, server, name),
        (&M::GET, ["health", "checks", "alarms"]) | (&M::GET, ["health", "checks", "local-alarms"]) => {
            node::alarms(broker, server)
        }
        (&M::GET, ["health", "checks", "port-listener", port]) => node::port_listener(server, port),
        (&M::GET, ["health", "checks", "protocol-listener", protocol]) => node::protocol_listener(server, protocol),
        (&M::GET, ["health", "checks", "virtual-hosts"]) => Ok(Reply::ok(json!({ "status": "ok" }))),
        (&M::GET, ["health", "checks", "is-in-service"]) => Ok(Reply::ok(json!({ "status": "ok" }))),
        (&M::GET, ["health", "checks", "node-is-quorum-critical"])
        | (&M::GET, ["health", "checks", "node-is-mirror-sync-critical"]) => Ok(Reply::ok(json!({ "status": "ok" }))),
        (&M::GET, ["aliveness-test", vhost]) => node::aliveness(broker, vhost).await,

        // Exchanges.
        (&M::GET, ["exchanges"]) => resources::list_exchanges(broker, server, None, req),
        (&M::GET, ["exchanges", vhost]) => resources::list_exchanges(broker, server, Some(vhost), req),
        (&M::GET, ["exchanges", vhost, name]) => resources::get_exchange(broker, server, vhost, name),
        (&M::PUT, ["exchanges", vhost, name]) => resources::declare_exchange(broker, vhost, name, req),
        (&M::DELETE, ["exchanges", vhost, name]) => resources::delete_exchange(broker, vhost, name, req),
        (&M::GET, ["exchanges", vhost, name, "bindings", "source"]) => {
            resources::exchange_bindings(broker, vhost, name, true, req)
        }
        (&M::GET, ["exchanges", vhost, name, "bindings", "destination"]) => {
            resources::exchange_bindings(broker, vhost, name, false, req)
        }
        (&M::POST, ["exchanges", vhost, name, "publish"]) => resources::publish(broker, vhost, name, req).await,

        // Queues.
        (&M::GET, ["queues"]) => resources::list_queues(broker, server, None, req),
        (&M::GET, ["queues", vhost]) => resources::list_queues(broker, server, Some(vhost), req),
        (&M::GET, ["queues", vhost, name]) => resources::get_queue(broker, server, vhost, name),
        (&M::PUT, ["queues", vhost, name]) => resources::declare_queue(broker, vhost, name, req),
        (&M::DELETE, ["queues", vhost, name]) => resources::delete_queue(broker, vhost, name, req),
        (&M::DELETE, ["queues", vhost, name, "contents"]) => resources::purge_queue(broker, vhost, name),
        (&M::POST, ["queues", vhost, name, "get"]) => resources::get_messages(broker, vhost, name, req),
        (&M::GET, ["queues", vhost, name, "bindings"]) => resources::queue_bindings(broker, vhost, name, req),
        (&M::GET, ["queues", vhost, name, "peek"]) => peek(broker, vhost, name, req),
        (&M::POST, ["queues", vhost, name, "redrive"]) => redrive(broker, vhost, name, req).await,

        // Bindings.
        (&M::GET, ["bindings"]) => resources::list_bindings(broker, None, req),
        (&M::GET, ["bindings", vhost]) => resources::list_bindings(broker, Some(vhost), req),
        (&M::GET, ["bindings", vhost, "e", source, kind @ ("q" | "e"), destination]) => {
            resources::bindings_between(broker, vhost, source, kind, destination, req)
        }
        (&M::POST, ["bindings", vhost, "e", source, kind @ ("q" | "e"), destination]) => {
            resources::create_binding(broker, vhost, source, kind, destination, req)
        }
        (&M::GET, ["bindings", vhost, "e", source, kind @ ("q" | "e"), destination, props]) => {
            resources::get_binding(broker, vhost, source, kind, destination, props)
        }
        (&M::DELETE, ["bindings", vhost, "e", source, kind @ ("q" | "e"), destination, props]) => {
            resources::delete_binding(broker, vhost, source, kind, destination, props)
        }

        // Connections, channels, consumers.
        (&M::GET, ["connections"]) => clients::list_connections(broker, server, None, req).await,
        (&M::GET, ["vhosts", vhost, "connections"]) => {
            clients::list_connections(broker, server, Some(vhost), req).await
        }
        (&M::GET, ["connections", name]) => clients::get_connection(broker, server, name).await,
        (&M::DELETE, ["connections", name]) => clients::close_connection(broker, name, req),
        (&M::GET, ["connections", name, "channels"]) => clients::connection_channels(broker, server, name, req).await,
        (&M::GET, ["channels"]) => clients::list_channels(broker, server, None, req).await,
        (&M::GET, ["vhosts", vhost, "channels"]) => clients::list_channels(broker, server, Some(vhost), req).await,
        (&M::GET, ["channels", name]) => clients::get_channel(broker, server, name).await,
        (&M::GET, ["consumers"]) => clients::list_consumers(broker, server, None, req).await,
        (&M::GET, ["consumers", vhost]) => clients::list_consumers(broker, server, Some(vhost), req).await,

        // Policies and parameters.
        (&M::GET, ["policies"]) => {
            let all = broker
                .vhosts()
                .iter()
                .flat_map(|v| v.policies().into_iter().map(move |p| json::policy(v.name(), &p)))
                .collect();
            crate::listing::list(all, &req.query).map(Reply::ok)
        }
        (&M::GET, ["policies", vhost]) => {
            let v = vhost_of(broker, vhost)?;
            let all = v.policies().iter().map(|p| json::policy(v.name(), p)).collect();
            crate::listing::list(all, &req.query).map(Reply::ok)
        }
        (&M::GET, ["policies", vhost, name]) => {
            let v = vhost_of(broker, vhost)?;
            let p = v
                .policy(name)
                .ok_or_else(|| ApiError::not_found(format!("policy '{name}' not found in vhost '{}'", v.name())))?;
            Ok(Reply::ok(json::policy(v.name(), &p)))
        }
        (&M::PUT, ["policies", vhost, name]) => {
            let v = vhost_of(broker, vhost)?;
            let body: PolicyBody = req.json()?;
            let existed = v.policy(name).is_some();
            v.set_policy(body.into_policy(name)?);
            Ok(Reply::created_or_updated(!existed))
        }
        (&M::DELETE, ["policies", vhost, name]) => {
            let v = vhost_of(broker, vhost)?;
            v.delete_policy(name)?;
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        // Operator policies and runtime parameters: Mailroom has neither kind, so the lists are empty and
        // a single one is never found (writes are refused rather than silently ignored).
        (&M::GET, ["operator-policies"]) | (&M::GET, ["operator-policies", _]) => Ok(Reply::ok(json!([]))),
        (&M::GET, ["parameters"]) | (&M::GET, ["parameters", _]) | (&M::GET, ["parameters", _, _]) => {
            Ok(Reply::ok(json!([])))
        }
        (&M::GET, ["global-parameters"]) => Ok(Reply::ok(json!([]))),
        (&M::GET, ["operator-policies", _, _]) | (&M::GET, ["parameters", _, _, _]) => {
            Err(ApiError::not_found("Not Found"))
        }

        // Definitions.
        (&M::GET, ["definitions"]) => Ok(Reply::ok(definitions::export(broker, None)?)),
        (&M::GET, ["definitions", vhost]) => Ok(Reply::ok(definitions::export(broker, Some(vhost))?)),
        (&M::POST, ["definitions"]) => definitions::import_request(broker, None, req),
        (&M::POST, ["definitions", vhost]) => definitions::import_request(broker, Some(vhost), req),

        _ => return Err(method_or_not_found(m, rest)),
    };
    answer
}

/// 405 when the path names a known resource that does not take this verb, else 404.
fn method_or_not_found(method: &Method, rest: &[&str]) -> ApiError {
    const KNOWN: &[&str] = &[
        "overview",
        "nodes",
        "extensions",
        "exchanges",
        "queues",
        "bindings",
        "connections",
        "channels",
        "consumers",
        "policies",
        "operator-policies",
        "parameters",
        "definitions",
        "health",
        "aliveness-test",
        "vhosts",
        "cluster-name",
        "users",
        "permissions",
        "topic-permissions",
        "vhost-limits",
        "user-limits",
        "whoami",
    ];
    let known_shape = match rest {
        ["queues", _, _, "redrive"] | ["queues", _, _, "peek"] | ["queues", _, _, "get"] => true,
        ["queues", ..] => rest.len() <= 3,
        ["overview"] | ["definitions", ..] => true,
        _ => false,
    };
    if known_shape && rest.first().is_some_and(|r| KNOWN.contains(r)) {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} not allowed"))
    } else {
        ApiError::not_found("Not Found")
    }
}

fn peek(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    let q = queue_of(&v, name)?;
    let offset = usize_param(&req.query, "offset")?.unwrap_or(0);
    let count = usize_param(&req.query, "count")?.unwrap_or(10);
    if count > MAX_PEEK_COUNT {
        return Err(ApiError::bad_request(format!("count must be at most {MAX_PEEK_COUNT}")));
    }
    let peeked = q.peek(offset, count);
    let total = q.message_count() as usize;
    let items = peeked
        .iter()
        .enumerate()
        .map(|(i, p)| json::message(&p.message, p.redelivered, total.saturating_sub(offset + i + 1)))
        .collect();
    Ok(Reply::ok(Value::Array(items)))
}

async fn redrive(broker: &Broker, vhost: &str, name: &str, req: &ApiRequest) -> ApiResult {
    let v = vhost_of(broker, vhost)?;
    queue_of(&v, name)?;
    let body: RedriveBody = req.json()?;
    let options = body.into_options()?;
    // On its own task: a client that gives up does not stop a redrive half-way (it would be safe, but
    // surprising).
    let queue = name.to_owned();
    let out = tokio::spawn(async move { v.redrive(&queue, &options).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("redrive failed: {e}")))??;
    Ok(Reply::ok(json!({ "moved": out.moved, "skipped": out.skipped })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    count: Option<usize>,
    header_filter: Option<HeaderFilter>,
    target: Option<TargetBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderFilter {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    exchange: Option<String>,
    routing_key: Option<String>,
    queue: Option<String>,
}

impl RedriveBody {
    fn into_options(self) -> Result<RedriveOptions, ApiError> {
        let target = match self.target {
            None => None,
            Some(TargetBody { queue: Some(q), exchange: None, routing_key: None }) => Some(RedriveTarget::Queue(q)),
            Some(TargetBody { queue: None, exchange: Some(exchange), routing_key }) => {
                Some(RedriveTarget::Exchange { exchange, routing_key: routing_key.unwrap_or_default() })
            }
            Some(_) => return Err(ApiError::bad_request("target is either {queue} or {exchange, routing_key}")),
        };
        Ok(RedriveOptions { count: self.count, header_filter: self.header_filter.map(|h| (h.name, h.value)), target })
    }
}
