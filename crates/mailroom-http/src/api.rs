//! What every handler shares: the request ([`ApiRequest`] with its [`Query`]), the answers ([`Reply`],
//! [`ApiError`] with RabbitMQ's error bodies), and the lookups of objects named in a path. Routing is
//! [`crate::routes`]; the resources live in their own modules, which depend on this one and not on routes.

use crate::{json, Body};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Response, StatusCode};
use mailroom_broker::{ApplyTo, Broker, BrokerError, ErrorKind, Policy};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// An error answer: a status and RabbitMQ-style `{"error", "reason"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: Option<&'static str>,
    reason: String,
}

impl ApiError {
    /// An error with RabbitMQ's default `error` text for its status.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self { status, error: None, reason: reason.into() }
    }
    /// 400 Bad Request.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }
    /// 404 Not Found (RabbitMQ always says "Not Found"; we name what is missing).
    pub fn not_found(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, reason)
    }
    /// The reason text.
    pub fn reason(&self) -> &str {
        &self.reason
    }
    /// Replaces the `error` field (RabbitMQ's `invalid_pagination_parameters` and friends).
    pub fn with_error(mut self, error: &'static str) -> Self {
        self.error = Some(error);
        self
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
            ErrorKind::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.message)
    }
}

/// A successful answer.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The JSON body (Null: no body).
    pub body: Value,
    /// A `Location` header (binding creation).
    pub location: Option<String>,
}

impl Reply {
    /// 200 with a body.
    pub fn ok(body: Value) -> Self {
        Self { status: StatusCode::OK, body, location: None }
    }
    /// A status without a body.
    pub fn empty(status: StatusCode) -> Self {
        Self { status, body: Value::Null, location: None }
    }
    /// 201 when `created`, else 204 (RabbitMQ's answer to a PUT).
    pub fn created_or_updated(created: bool) -> Self {
        Self::empty(if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT })
    }
}

/// What a handler answers.
pub type ApiResult = Result<Reply, ApiError>;

pub(crate) fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(crate) fn error_response(e: ApiError) -> Response<Body> {
    let error = e.error.unwrap_or(match e.status {
        StatusCode::UNAUTHORIZED => "not_authorised",
        StatusCode::NOT_FOUND => "Object Not Found",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::FORBIDDEN => "access_refused",
        _ => "error",
    });
    let mut resp = respond(e.status, &json!({ "error": error, "reason": e.reason }));
    if e.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"Mailroom\""));
    }
    resp
}

/// One request, its body read.
pub struct ApiRequest {
    /// The verb.
    pub method: Method,
    /// The raw path.
    pub path: String,
    /// The decoded query string.
    pub query: Query,
    /// The request headers.
    pub headers: HeaderMap,
    /// The body (empty if none).
    pub body: Bytes,
    /// The authenticated user.
    pub user: String,
    /// What the user's tags allow.
    pub rights: mailroom_broker::access::ManagementRights,
}

impl ApiRequest {
    /// The body as JSON (an empty body reads as `{}`).
    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.iter().all(|b| b.is_ascii_whitespace()) { b"{}" } else { &self.body };
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// A request's query string, decoded.
#[derive(Debug, Default, Clone)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `a=1&b=x%20y` (`+` is a space, as forms write it).
    pub fn parse(raw: Option<&str>) -> Query {
        let pairs = raw
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (form_decode(k), form_decode(v))
            })
            .collect();
        Query(pairs)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The same query without the parameters in `names`.
    pub fn without(&self, names: &[&str]) -> Query {
        Query(self.0.iter().filter(|(k, _)| !names.contains(&k.as_str())).cloned().collect())
    }

    /// `name` as a boolean (`true` only).
    pub fn flag(&self, name: &str) -> bool {
        self.get(name) == Some("true")
    }
}

/// `%XX` and `+` of one query value, decoded (an invalid escape is kept as it is).
pub(crate) fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A vhost named in a path (404 if missing).
pub fn vhost_of(broker: &Broker, name: &str) -> Result<Arc<mailroom_broker::VHost>, ApiError> {
    broker.vhost(name).map_err(|_| ApiError::not_found(format!("vhost '{name}' not found")))
}

/// A queue named in a path (404 if missing; exclusive queues too: the API acts as their owner).
pub fn queue_of(v: &mailroom_broker::VHost, name: &str) -> Result<Arc<mailroom_broker::Queue>, ApiError> {
    v.queues()
        .into_iter()
        .find(|q| q.name() == name)
        .ok_or_else(|| ApiError::not_found(format!("queue '{name}' not found in vhost '{}'", v.name())))
}

/// `PUT /api/policies/{vhost}/{name}` body (also a policy of a definitions file).
#[derive(Deserialize)]
pub struct PolicyBody {
    pattern: String,
    definition: Value,
    priority: Option<i64>,
    #[serde(rename = "apply-to")]
    apply_to: Option<String>,
}

impl PolicyBody {
    /// The broker policy named `name`.
    pub fn into_policy(self, name: &str) -> Result<Policy, ApiError> {
        let apply_to =
            ApplyTo::parse(self.apply_to.as_deref().unwrap_or("all")).map_err(|e| ApiError::bad_request(e.message))?;
        let definition = match &self.definition {
            Value::Object(map) => json::to_table(map),
            _ => return Err(ApiError::bad_request("definition must be a JSON object")),
        };
        Policy::new(name, &self.pattern, apply_to, self.priority.unwrap_or(0), definition)
            .map_err(|e| ApiError::bad_request(e.message))
    }
}
