//! Typed envelopes and their mapping onto AMQP properties.
//!
//! | envelope field   | AMQP                                  |
//! |------------------|---------------------------------------|
//! | `id`             | `message_id`                          |
//! | `correlation_id` | `correlation_id`                      |
//! | `type_name`      | `type`                                |
//! | `sent_at`        | `timestamp` (s) + `x-mailroom-sent-at-ms` |
//! | `reply_to`       | `reply_to`                            |
//! | body encoding    | `content_type`                        |
//! | `kind`, `causation_id`, user headers | `headers`         |
//!
//! Header values are strings in the SDK: they are what filters compare and what operators read in a
//! management UI; numbers sent by other clients are read back as their decimal text.

use crate::wire::{AMQPValue, BasicProperties, FieldTable, LongString, ShortString};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Header names the SDK writes. Prefixed so they never clash with application headers.
pub mod headers {
    /// Command, event or document.
    pub const KIND: &str = "x-mailroom-kind";
    /// The id of the message whose handling produced this one.
    pub const CAUSATION_ID: &str = "x-mailroom-causation-id";
    /// Send time in milliseconds since the epoch (AMQP's `timestamp` only has seconds).
    pub const SENT_AT_MS: &str = "x-mailroom-sent-at-ms";
    /// How many times handling was attempted before this copy was sent (retries, DLQ).
    pub const ATTEMPT: &str = "x-mailroom-attempt";
    /// How many delayed retry rounds the message went through.
    pub const DELAYED_RETRIES: &str = "x-mailroom-delayed-retries";
    /// When the first attempt failed (ms since epoch).
    pub const FIRST_FAILURE_MS: &str = "x-mailroom-first-failure-ms";
    /// When the last attempt failed (ms since epoch).
    pub const LAST_FAILURE_MS: &str = "x-mailroom-last-failure-ms";
    /// The error category of the last failure.
    pub const ERROR_KIND: &str = "x-mailroom-error-kind";
    /// The error message of the last failure, capped at [`super::MAX_ERROR_HEADER`] bytes.
    pub const ERROR: &str = "x-mailroom-error";
    /// The queue the message was consumed from when it failed (redrive target).
    pub const SOURCE_QUEUE: &str = "x-mailroom-source-queue";
    /// The handler (worker name) that failed.
    pub const HANDLER: &str = "x-mailroom-handler";
    /// Set on a reply that carries a fault instead of a response.
    pub const FAULT: &str = "x-mailroom-fault";
    /// The responder that produced a reply (scatter-gather reports who answered).
    pub const RESPONDER: &str = "x-mailroom-responder";
    /// Set on the copy a worker dead-letters, to the queue it failed in. A worker that receives a
    /// message carrying it (a dead letter the broker moved back, as Mailroom's server-side redrive
    /// does with headers untouched) starts its attempts afresh, as after a client-side redrive.
    pub const DEAD_LETTERED: &str = "x-mailroom-dead-lettered";
    /// Every SDK-internal failure header, removed on redrive so the attempt count starts again.
    pub const FAILURE_HEADERS: &[&str] =
        &[ATTEMPT, FIRST_FAILURE_MS, LAST_FAILURE_MS, ERROR_KIND, ERROR, SOURCE_QUEUE, HANDLER, DEAD_LETTERED];
}

/// Longest error text written into a header: frame_max is 128 KiB on both brokers and headers share it
/// with everything else; Spring AMQP trims stack traces for the same reason.
pub const MAX_ERROR_HEADER: usize = 1024;

/// What a message means to its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Do something: one logical receiver (a queue).
    Command,
    /// Something happened: any number of subscribers.
    Event,
    /// Data handed over (a reply, a report): no implied action.
    Document,
}

impl MessageKind {
    /// The header text.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Command => "command",
            MessageKind::Event => "event",
            MessageKind::Document => "document",
        }
    }
    fn parse(text: &str) -> Option<Self> {
        match text {
            "command" => Some(MessageKind::Command),
            "event" => Some(MessageKind::Event),
            "document" => Some(MessageKind::Document),
            _ => None,
        }
    }
}

/// Everything about a message except its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// Unique per logical message (UUIDv7 text); kept across retries, redeliveries and redrive.
    pub id: String,
    /// Command, event or document.
    pub kind: MessageKind,
    /// Ties every message of one conversation together.
    pub correlation_id: Option<String>,
    /// The id of the message whose handling sent this one.
    pub causation_id: Option<String>,
    /// When the producer created it.
    pub sent_at: SystemTime,
    /// The message type name (AMQP `type`), for routing in handlers and for humans.
    pub type_name: String,
    /// The return address for replies.
    pub reply_to: Option<String>,
    /// Application and SDK headers (string values).
    pub headers: BTreeMap<String, String>,
    /// How the body is encoded.
    pub content_type: Option<String>,
}

impl Metadata {
    /// Fresh metadata: a new UUIDv7 id, sent now.
    pub fn new(kind: MessageKind, type_name: impl Into<String>) -> Self {
        Self {
            id: new_message_id(),
            kind,
            correlation_id: None,
            causation_id: None,
            sent_at: SystemTime::now(),
            type_name: type_name.into(),
            reply_to: None,
            headers: BTreeMap::new(),
            content_type: None,
        }
    }

    /// A header value by name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The attempt count recorded by the retry slot (0 for a first delivery).
    pub fn attempt(&self) -> u32 {
        self.header(headers::ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(0)
    }

    /// Builds AMQP properties (persistent delivery) from this metadata.
    pub fn to_properties(&self) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in &self.headers {
            table.insert(ShortString::from(k.as_str()), AMQPValue::LongString(LongString::from(v.as_str())));
        }
        table.insert(ShortString::from(headers::KIND), AMQPValue::LongString(self.kind.as_str().into()));
        if let Some(c) = &self.causation_id {
            table.insert(ShortString::from(headers::CAUSATION_ID), AMQPValue::LongString(c.as_str().into()));
        }
        let ms = millis(self.sent_at);
        table.insert(ShortString::from(headers::SENT_AT_MS), AMQPValue::LongString(ms.to_string().as_str().into()));
        let mut p = BasicProperties::default()
            .with_message_id(self.id.as_str().into())
            .with_type(self.type_name.as_str().into())
            .with_timestamp(ms / 1000)
            .with_delivery_mode(2)
            .with_headers(table);
        if let Some(c) = &self.correlation_id {
            p = p.with_correlation_id(c.as_str().into());
        }
        if let Some(r) = &self.reply_to {
            p = p.with_reply_to(r.as_str().into());
        }
        if let Some(ct) = &self.content_type {
            p = p.with_content_type(ct.as_str().into());
        }
        p
    }

    /// Reads metadata from AMQP properties. Messages from other clients may lack our headers:
    /// a missing id becomes a fresh one (so the pipeline can still track it), a missing kind a document.
    pub fn from_properties(p: &BasicProperties) -> Self {
        let mut hdrs = BTreeMap::new();
        if let Some(table) = p.headers() {
            for (k, v) in table.inner() {
                if let Some(text) = value_text(v) {
                    hdrs.insert(k.as_str().to_owned(), text);
                }
            }
        }
        let kind = hdrs.remove(headers::KIND).and_then(|k| MessageKind::parse(&k)).unwrap_or(MessageKind::Document);
        let causation_id = hdrs.remove(headers::CAUSATION_ID);
        let sent_at = match hdrs.remove(headers::SENT_AT_MS).and_then(|m| m.parse::<u64>().ok()) {
            Some(ms) => UNIX_EPOCH + Duration::from_millis(ms),
            None => p.timestamp().map(|s| UNIX_EPOCH + Duration::from_secs(s)).unwrap_or(UNIX_EPOCH),
        };
        Self {
            id: p.message_id().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_else(new_message_id),
            kind,
            correlation_id: p.correlation_id().as_ref().map(|s| s.as_str().to_owned()),
            causation_id,
            sent_at,
            type_name: p.kind().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default(),
            reply_to: p.reply_to().as_ref().map(|s| s.as_str().to_owned()),
            headers: hdrs,
            content_type: p.content_type().as_ref().map(|s| s.as_str().to_owned()),
        }
    }
}

/// A typed message: metadata plus a body. Derefs to [`Metadata`] so `env.id` reads naturally.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    /// Ids, kind, time, headers.
    pub meta: Metadata,
    /// The payload.
    pub body: T,
}

impl<T> Deref for Envelope<T> {
    type Target = Metadata;
    fn deref(&self) -> &Metadata {
        &self.meta
    }
}
impl<T> DerefMut for Envelope<T> {
    fn deref_mut(&mut self) -> &mut Metadata {
        &mut self.meta
    }
}

/// The last path segment of a Rust type name: stable enough for humans, free of crate paths.
fn short_type_name<T>() -> String {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_owned()
}

impl<T> Envelope<T> {
    /// An envelope of `kind` around `body`, with a fresh id and the body's type name.
    pub fn new(kind: MessageKind, body: T) -> Self {
        Self { meta: Metadata::new(kind, short_type_name::<T>()), body }
    }
    /// A command envelope.
    pub fn command(body: T) -> Self {
        Self::new(MessageKind::Command, body)
    }
    /// An event envelope.
    pub fn event(body: T) -> Self {
        Self::new(MessageKind::Event, body)
    }
    /// A document envelope.
    pub fn document(body: T) -> Self {
        Self::new(MessageKind::Document, body)
    }
    /// Sets the correlation id.
    pub fn correlation(mut self, id: impl Into<String>) -> Self {
        self.meta.correlation_id = Some(id.into());
        self
    }
    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.headers.insert(name.into(), value.into());
        self
    }
    /// Overrides the type name.
    pub fn type_name(mut self, name: impl Into<String>) -> Self {
        self.meta.type_name = name.into();
        self
    }
    /// Overrides the message id (e.g. a business key, so the producer's retries dedupe).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.meta.id = id.into();
        self
    }
}

impl<T: Message> Envelope<T> {
    /// An envelope of `kind` whose type name is `T`'s explicit [`Message::NAME`].
    pub fn message(kind: MessageKind, body: T) -> Self {
        Self { meta: Metadata::new(kind, T::NAME), body }
    }
}

impl<T: Payload> Envelope<T> {
    /// Encodes to AMQP properties and body bytes.
    pub fn to_wire(&self) -> Result<(BasicProperties, Bytes), String> {
        let body = self.body.encode()?;
        let mut meta = self.meta.clone();
        meta.content_type = Some(self.body.content_type().to_owned());
        Ok((meta.to_properties(), body))
    }

    /// Decodes a body read from the wire.
    pub fn from_parts(meta: Metadata, body: &Bytes) -> Result<Self, String> {
        let body = T::decode(meta.content_type.as_deref(), body)?;
        Ok(Self { meta, body })
    }
}

/// A message type with a stable, explicit name: the AMQP `type` property endpoints dispatch on
/// ([`WorkerBuilder::on`](crate::pipeline::WorkerBuilder::on)). Name it for the wire, not for Rust:
/// renaming or moving the struct must not change it, and two types on one endpoint must not share it
/// (the endpoint refuses to start). `std::any::type_name` is neither stable nor collision-free.
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct PlaceOrder { sku: String }
/// impl mailroom::Message for PlaceOrder {
///     const NAME: &'static str = "shop.place-order.v1";
/// }
/// ```
pub trait Message: Payload {
    /// The type name on the wire (AMQP `type`).
    const NAME: &'static str;
}

/// A body encoding. Every serde type is JSON; [`Raw`] passes bytes through untouched.
pub trait Payload: Sized + Send + 'static {
    /// The `content_type` written on the wire.
    fn content_type(&self) -> &'static str;
    /// Encodes the body.
    fn encode(&self) -> Result<Bytes, String>;
    /// Decodes a body; an error sends the message straight to the DLQ (it can never succeed).
    fn decode(content_type: Option<&str>, body: &Bytes) -> Result<Self, String>;
}

impl<T: Serialize + DeserializeOwned + Send + 'static> Payload for T {
    fn content_type(&self) -> &'static str {
        "application/json"
    }
    fn encode(&self) -> Result<Bytes, String> {
        serde_json::to_vec(self).map(Bytes::from).map_err(|e| e.to_string())
    }
    fn decode(_content_type: Option<&str>, body: &Bytes) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| format!("json decode: {e}"))
    }
}

/// An opaque body: bytes in, bytes out (`application/octet-stream` unless stated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw(pub Bytes);

impl Payload for Raw {
    fn content_type(&self) -> &'static str {
        "application/octet-stream"
    }
    fn encode(&self) -> Result<Bytes, String> {
        Ok(self.0.clone())
    }
    fn decode(_content_type: Option<&str>, body: &Bytes) -> Result<Self, String> {
        Ok(Raw(body.clone()))
    }
}

/// A new message id: UUIDv7, so ids sort by creation time (friendly to inbox indexes).
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the epoch.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A header value as text (numbers in decimal); `None` for tables and arrays such as `x-death`.
pub fn value_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct PlaceOrder {
        sku: String,
    }

    #[test]
    fn roundtrip_through_properties() {
        let env = Envelope::command(PlaceOrder { sku: "a".into() }).correlation("c1").with_header("region", "eu");
        let (props, body) = env.to_wire().unwrap();
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), env.id);
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "PlaceOrder");
        let meta = Metadata::from_properties(&props);
        let back = Envelope::<PlaceOrder>::from_parts(meta, &body).unwrap();
        assert_eq!(back.body, env.body);
        assert_eq!(back.id, env.id);
        assert_eq!(back.kind, MessageKind::Command);
        assert_eq!(back.correlation_id.as_deref(), Some("c1"));
        assert_eq!(back.header("region"), Some("eu"));
        assert_eq!(millis(back.sent_at), millis(env.sent_at));
        assert_eq!(back.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn raw_bodies_pass_through() {
        let env = Envelope::document(Raw(Bytes::from_static(b"\x00\x01")));
        let (props, body) = env.to_wire().unwrap();
        assert_eq!(props.content_type().as_ref().unwrap().as_str(), "application/octet-stream");
        let back = Envelope::<Raw>::from_parts(Metadata::from_properties(&props), &body).unwrap();
        assert_eq!(back.body, env.body);
    }

    #[test]
    fn ids_are_v7() {
        let id = uuid::Uuid::parse_str(&new_message_id()).unwrap();
        assert_eq!(id.get_version_num(), 7);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
