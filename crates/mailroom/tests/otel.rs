//! OpenTelemetry (feature `otel`): spans exported to an in-process collector (the OTel SDK's
//! in-memory exporter) show one trace across four hops — the test's send to `a`, `a`'s process span,
//! its handler's send to `b`, `b`'s process span — each span the parent of the next, and the
//! `traceparent` `b` received names the send span that published it.
#![cfg(feature = "otel")]

use mailroom::{Bus, Envelope};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporterBuilder, SdkTracerProvider, SpanData};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;

fn attr(s: &SpanData, key: &str) -> String {
    s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_four_hops() {
    let exporter = InMemorySpanExporterBuilder::new().build();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("mailroom-test")));
    // Global: workers' tasks run on other threads.
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber in this test binary");

    let bus = Bus::embedded().unwrap();
    let seen_by_b: Arc<Mutex<Option<String>>> = Arc::default();
    let s = seen_by_b.clone();
    let b = bus
        .worker("otel.b")
        .handle(move |e: Envelope<u32>, _ctx| {
            let s = s.clone();
            async move {
                *s.lock().unwrap() = e.meta.header("traceparent").map(str::to_owned);
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    let a = bus
        .worker("otel.a")
        .handle(|e: Envelope<u32>, ctx: mailroom::Context| async move {
            ctx.send("otel.b", e.body + 1).await?;
            Ok(())
        })
        .run()
        .await
        .unwrap();
    bus.send("otel.a", 1u32).await.unwrap();

    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let processed_b = spans.iter().any(|s| s.name == "process" && attr(s, "messaging.destination") == "otel.b");
        if processed_b || tokio::time::Instant::now() > until {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let find = |name: &str, dest: &str| -> SpanData {
        spans.iter().find(|s| s.name == name && attr(s, "messaging.destination") == dest).cloned().unwrap_or_else(
            || {
                panic!(
                    "a {name} span for {dest} among {:?}",
                    spans.iter().map(|s| (&s.name, attr(s, "messaging.destination"))).collect::<Vec<_>>()
                )
            },
        )
    };
    let hops = [find("send", "otel.a"), find("process", "otel.a"), find("send", "otel.b"), find("process", "otel.b")];
    let trace = hops[0].span_context.trace_id();
    for (i, h) in hops.iter().enumerate() {
        assert_eq!(h.span_context.trace_id(), trace, "hop {i} ({}) is in the same trace", h.name);
        if i > 0 {
            assert_eq!(h.parent_span_id, hops[i - 1].span_context.span_id(), "hop {i}'s parent is hop {}", i - 1);
        }
    }
    // What travelled on the wire names the span that sent it.
    let tp = seen_by_b.lock().unwrap().clone().expect("b got a traceparent");
    assert_eq!(tp, format!("00-{}-{}-01", trace, hops[2].span_context.span_id()));
    a.stop().await;
    b.stop().await;
}
