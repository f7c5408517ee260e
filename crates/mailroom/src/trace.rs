//! W3C trace context (`traceparent`): created on the first send, continued on every handle and send after.
//!
//! Without the `otel` feature the SDK does not depend on OpenTelemetry; it carries the header and
//! records the trace id on its `tracing` spans so any subscriber can join the flow. With it, the
//! `send` and `process` spans are linked through the header for an OTel layer (see `otel.rs`).

use std::fmt;

/// The AMQP header that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes shared by every span of one flow.
    pub trace_id: [u8; 16],
    /// 8 bytes naming the span that sent the message.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
}

fn random_bytes() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

impl TraceContext {
    /// A new root context (fresh trace id), sampled.
    pub fn new_root() -> Self {
        let t = random_bytes();
        let s = random_bytes();
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&s[..8]);
        Self { trace_id: t, span_id, flags: 1 }
    }

    /// A child context: same trace id, a fresh span id (the span that is about to send or handle).
    pub fn child(&self) -> Self {
        let s = random_bytes();
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&s[8..]);
        Self { span_id, ..*self }
    }

    /// Parses a `traceparent` value; `None` for anything malformed (then a new root is started).
    pub fn parse(text: &str) -> Option<Self> {
        let parts: Vec<&str> = text.trim().split('-').collect();
        if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" {
            return None;
        }
        let trace_id: [u8; 16] = hex_decode(parts[1])?.try_into().ok()?;
        let span_id: [u8; 8] = hex_decode(parts[2])?.try_into().ok()?;
        let flags = *hex_decode(parts[3])?.first()?;
        // All-zero ids are invalid per the spec.
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, span_id, flags })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex_encode(&self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", hex_encode(&self.trace_id), hex_encode(&self.span_id), self.flags)
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_child_keeps_trace_id() {
        let root = TraceContext::new_root();
        let text = root.to_string();
        assert_eq!(TraceContext::parse(&text), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }

    #[test]
    fn rejects_malformed() {
        assert!(TraceContext::parse("garbage").is_none());
        assert!(TraceContext::parse("00-00000000000000000000000000000000-0000000000000001-01").is_none());
        assert!(TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    }
}
