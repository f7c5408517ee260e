//! OpenTelemetry links for the SDK's `send` and `process` spans (feature `otel`): with a
//! [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry) layer installed, a `send` span
//! is a child of the span that sends (or of the message's `traceparent` when nothing is active) and
//! the `traceparent` it writes names that span; a `process` span's parent is the incoming
//! `traceparent`. So an OTel backend shows send → broker → handle → publish → handle as one trace.
//! Without an OTel layer nothing changes: the SDK's own `traceparent` travels as before.

use crate::trace::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// An OTel context whose (remote) parent is `tc`.
fn remote(tc: &TraceContext) -> opentelemetry::Context {
    let sc = SpanContext::new(
        TraceId::from_bytes(tc.trace_id),
        SpanId::from_bytes(tc.span_id),
        TraceFlags::new(tc.flags),
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

/// `span`'s OTel span context, if an OTel layer records it.
fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceContext {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

/// Links a `send` span: under the active OTel span if there is one (a handler's `process` span),
/// else under the message's `carried` context. Returns the context to write as its `traceparent`.
pub(crate) fn send(span: &tracing::Span, carried: &TraceContext) -> Option<TraceContext> {
    if context_of(&tracing::Span::current()).is_none() {
        // No OTel layer: an error we ignore (the SDK's own traceparent is carried).
        let _ = span.set_parent(remote(carried));
    }
    context_of(span)
}

/// Links a `process` span under the incoming `traceparent`. Returns the span's context, which the
/// handler's [`Context::trace`](crate::Context::trace) then reports.
pub(crate) fn process(span: &tracing::Span, incoming: Option<&TraceContext>) -> Option<TraceContext> {
    if let Some(parent) = incoming {
        let _ = span.set_parent(remote(parent));
    }
    context_of(span)
}
