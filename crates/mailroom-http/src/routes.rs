//! Request handling: authentication, routing and the JSON answers.

use crate::{json, Body, MAX_PEEK_COUNT, MAX_REQUEST_BODY};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use mailroom_broker::{ApplyTo, Broker, BrokerError, ErrorKind, Policy, RedriveOptions, RedriveTarget};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;

/// An error answer: a status and RabbitMQ-style `{"error", "reason"}`.
pub(crate) struct ApiError {
    status: StatusCode,
    reason: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self { status, reason: reason.into() }
    }
    fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }
    fn not_found(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, reason)
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let status = match e.kind {
            ErrorKind::NotFound | ErrorKind::NotAllowed => StatusCode::NOT_FOUND,
            ErrorKind::AccessRefused | ErrorKind::ResourceLocked => StatusCode::FORBIDDEN,
            ErrorKind::PreconditionFailed | ErrorKind::CommandInvalid => StatusCode::BAD_REQUEST,
            ErrorKind::AuthenticationFailed => StatusCode::UNAUTHORIZED,
            ErrorKind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::ResourceError => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, e.message)
    }
}

type ApiResult = Result<(StatusCode, Value), ApiError>;

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: ApiError) -> Response<Body> {
    let error = match e.status {
        StatusCode::UNAUTHORIZED => "not_authorised",
        StatusCode::NOT_FOUND => "Object Not Found",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        _ => "error",
    };
    let mut resp = respond(e.status, &json!({ "error": error, "reason": e.reason }));
    if e.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"Mailroom\""));
    }
    resp
}

/// Authenticates, routes and answers one request.
pub(crate) async fn handle(broker: &Broker, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    // Prometheus scrapes without credentials, as RabbitMQ's prometheus plugin allows; the counters reveal
    // no names or message contents.
    if req.uri().path() == "/metrics" {
        if req.method() != Method::GET {
            return error_response(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "only GET on /metrics"));
        }
        let mut resp = Response::new(Full::new(Bytes::from(crate::metrics::render(broker))));
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
        return resp;
    }
    if let Err(e) = authenticate(broker, peer, &req) {
        return error_response(e);
    }
    match route(broker, req).await {
        Ok((status, body)) if status == StatusCode::NO_CONTENT || body.is_null() => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = status;
            let _ = body;
            resp
        }
        Ok((status, body)) => respond(status, &body),
        Err(e) => error_response(e),
    }
}

/// Basic auth against the broker's users (loopback-only users only from loopback, as for AMQP).
fn authenticate(broker: &Broker, peer: SocketAddr, req: &Request<Incoming>) -> Result<(), ApiError> {
    let unauthorized = || ApiError::new(StatusCode::UNAUTHORIZED, "Not_Authorized");
    let header = req.headers().get(AUTHORIZATION).and_then(|h| h.to_str().ok()).ok_or_else(unauthorized)?;
    let encoded = header.strip_prefix("Basic ").ok_or_else(unauthorized)?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| unauthorized())?;
    let text = String::from_utf8(decoded).map_err(|_| unauthorized())?;
    let (user, pass) = text.split_once(':').ok_or_else(unauthorized)?;
    broker.authenticate(user, pass, peer.ip().is_loopback()).map_err(|_| unauthorized())?;
    Ok(())
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

fn query_param(query: Option<&str>, name: &str) -> Result<Option<usize>, ApiError> {
    for pair in query.unwrap_or("").split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if k == name {
                return v
                    .parse()
                    .map(Some)
                    .map_err(|_| ApiError::bad_request(format!("{name} must be a non-negative integer")));
            }
        }
    }
    Ok(None)
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read body: {e}")))?
        .to_bytes();
    let body: &[u8] = if body.iter().all(|b| b.is_ascii_whitespace()) { b"{}" } else { &body };
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn route(broker: &Broker, req: Request<Incoming>) -> ApiResult {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let segments: Vec<String> =
        path.trim_end_matches('/').split('/').skip(1).map(percent_decode).collect::<Result<_, _>>()?;
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["api", "overview"]) => Ok((StatusCode::OK, overview(broker))),
        (&Method::GET, ["api", "queues"]) => {
            let all = broker
                .vhosts()
                .iter()
                .flat_map(|v| sorted_queues(v).into_iter().map(move |q| json::queue(v, &q)))
                .collect();
            Ok((StatusCode::OK, Value::Array(all)))
        }
        (&Method::GET, ["api", "queues", vhost]) => {
            let v = vhost_of(broker, vhost)?;
            Ok((StatusCode::OK, Value::Array(sorted_queues(&v).iter().map(|q| json::queue(&v, q)).collect())))
        }
        (&Method::GET, ["api", "queues", vhost, name]) => {
            let v = vhost_of(broker, vhost)?;
            let q = queue_of(&v, name)?;
            Ok((StatusCode::OK, json::queue(&v, &q)))
        }
        (&Method::GET, ["api", "queues", vhost, name, "peek"]) => {
            let v = vhost_of(broker, vhost)?;
            let q = queue_of(&v, name)?;
            let offset = query_param(query.as_deref(), "offset")?.unwrap_or(0);
            let count = query_param(query.as_deref(), "count")?.unwrap_or(10);
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
            Ok((StatusCode::OK, Value::Array(items)))
        }
        (&Method::POST, ["api", "queues", vhost, name, "redrive"]) => {
            let v = vhost_of(broker, vhost)?;
            queue_of(&v, name)?;
            let body: RedriveBody = read_json(req).await?;
            let options = body.into_options()?;
            // On its own task: a client that gives up does not stop a redrive half-way (it would be safe,
            // but surprising).
            let queue = (*name).to_owned();
            let out = tokio::spawn(async move { v.redrive(&queue, &options).await })
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("redrive failed: {e}")))??;
            Ok((StatusCode::OK, json!({ "moved": out.moved, "skipped": out.skipped })))
        }
        (&Method::GET, ["api", "policies"]) => {
            let all = broker
                .vhosts()
                .iter()
                .flat_map(|v| v.policies().into_iter().map(move |p| json::policy(v.name(), &p)))
                .collect();
            Ok((StatusCode::OK, Value::Array(all)))
        }
        (&Method::GET, ["api", "policies", vhost]) => {
            let v = vhost_of(broker, vhost)?;
            Ok((StatusCode::OK, Value::Array(v.policies().iter().map(|p| json::policy(v.name(), p)).collect())))
        }
        (&Method::GET, ["api", "policies", vhost, name]) => {
            let v = vhost_of(broker, vhost)?;
            let p = v
                .policy(name)
                .ok_or_else(|| ApiError::not_found(format!("policy '{name}' not found in vhost '{}'", v.name())))?;
            Ok((StatusCode::OK, json::policy(v.name(), &p)))
        }
        (&Method::PUT, ["api", "policies", vhost, name]) => {
            let v = vhost_of(broker, vhost)?;
            let body: PolicyBody = read_json(req).await?;
            let apply_to = ApplyTo::parse(body.apply_to.as_deref().unwrap_or("all"))
                .map_err(|e| ApiError::bad_request(e.message))?;
            let definition = match &body.definition {
                Value::Object(map) => json::to_table(map),
                _ => return Err(ApiError::bad_request("definition must be a JSON object")),
            };
            let policy = Policy::new(name, &body.pattern, apply_to, body.priority.unwrap_or(0), definition)
                .map_err(|e| ApiError::bad_request(e.message))?;
            let existed = v.policy(name).is_some();
            v.set_policy(policy);
            Ok((if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED }, Value::Null))
        }
        (&Method::DELETE, ["api", "policies", vhost, name]) => {
            let v = vhost_of(broker, vhost)?;
            v.delete_policy(name)?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (_, ["api", "overview"]) | (_, ["api", "queues", ..]) | (_, ["api", "policies", ..]) => {
            Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} not allowed on {path}")))
        }
        _ => Err(ApiError::not_found(format!("no such resource: {path}"))),
    }
}

fn sorted_queues(v: &mailroom_broker::VHost) -> Vec<std::sync::Arc<mailroom_broker::Queue>> {
    let mut qs = v.queues();
    qs.sort_by(|a, b| a.name().cmp(b.name()));
    qs
}

fn vhost_of(broker: &Broker, name: &str) -> Result<std::sync::Arc<mailroom_broker::VHost>, ApiError> {
    broker.vhost(name).map_err(|_| ApiError::not_found(format!("vhost '{name}' not found")))
}

fn queue_of(v: &mailroom_broker::VHost, name: &str) -> Result<std::sync::Arc<mailroom_broker::Queue>, ApiError> {
    v.queues()
        .into_iter()
        .find(|q| q.name() == name)
        .ok_or_else(|| ApiError::not_found(format!("queue '{name}' not found in vhost '{}'", v.name())))
}

fn overview(broker: &Broker) -> Value {
    let (mut queues, mut exchanges, mut consumers, mut ready, mut unacked) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for v in broker.vhosts() {
        exchanges += v.exchanges().len() as u64;
        for q in v.queues() {
            queues += 1;
            consumers += q.consumer_count() as u64;
            ready += q.message_count() as u64;
            unacked += q.unacked_count() as u64;
        }
    }
    let sync = broker.sync_stats();
    json!({
        "store_totals": {
            "fsyncs": sync.fsyncs,
            "sync_rounds": sync.rounds,
            "records_synced": sync.records,
            "sync_failures": sync.failures,
            "fsync_seconds": sync.fsync_micros as f64 / 1e6,
            "stores_failing": sync.failing_stores,
            "quarantined_records": mailroom_broker::store::quarantined_records_total(),
        },
        "product_name": "Mailroom",
        "product_version": env!("CARGO_PKG_VERSION"),
        "management_version": env!("CARGO_PKG_VERSION"),
        "object_totals": { "queues": queues, "exchanges": exchanges, "consumers": consumers, "vhosts": broker.vhosts().len() },
        "queue_totals": { "messages": ready + unacked, "messages_ready": ready, "messages_unacknowledged": unacked },
    })
}

#[derive(Deserialize)]
struct PolicyBody {
    pattern: String,
    definition: Value,
    priority: Option<i64>,
    #[serde(rename = "apply-to")]
    apply_to: Option<String>,
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
