//! Per-handler metrics through the `metrics` facade (feature `metrics`): a recorder installed by the
//! application sees each worker's counters and latency, labelled with its queue and handler.
#![cfg(feature = "metrics")]

use mailroom::{Bus, Envelope, HandlerError, RetryPolicy};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records everything by name and labels (`name{queue=..,handler=..}`).
#[derive(Default, Clone)]
struct Capture {
    counters: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
    histograms: Arc<Mutex<HashMap<String, Arc<Samples>>>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);
impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn render(key: &Key) -> String {
    let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::clone(self.counters.lock().unwrap().entry(render(key)).or_default()))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::clone(self.histograms.lock().unwrap().entry(render(key)).or_default()))
    }
}

impl Capture {
    fn counter(&self, name: &str, queue: &str) -> u64 {
        let key = format!("{name}{{handler={queue},queue={queue}}}");
        self.counters.lock().unwrap().get(&key).map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_metrics_reach_the_installed_recorder() {
    let capture = Capture::default();
    metrics::set_global_recorder(capture.clone()).unwrap();
    let bus = Bus::embedded().unwrap();
    let worker = bus
        .worker("invoices")
        .retry(RetryPolicy::new().immediate(1))
        .handle(|m: Envelope<u32>, _ctx| async move {
            if m.body == 0 {
                Err(HandlerError::transient("zero"))
            } else {
                Ok(())
            }
        })
        .run()
        .await
        .unwrap();
    bus.send("invoices", 7u32).await.unwrap();
    bus.send("invoices", 0u32).await.unwrap();
    for _ in 0..500 {
        if worker.metrics().dead_lettered == 1 && worker.metrics().ok == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = |name| capture.counter(name, "invoices");
    assert_eq!(c("mailroom_handler_received_total"), 2);
    assert_eq!(c("mailroom_handler_handled_total"), 1);
    // The failing one: tried twice (one immediate retry), then dead-lettered.
    assert_eq!(c("mailroom_handler_failed_total"), 2);
    assert_eq!(c("mailroom_handler_retried_total"), 1);
    assert_eq!(c("mailroom_handler_dead_lettered_total"), 1);
    let snapshot = worker.metrics();
    assert_eq!((snapshot.received, snapshot.ok, snapshot.failed), (2, 1, 2), "the same counts in the snapshot");
    worker.stop().await;
    let latency = Arc::clone(
        &capture.histograms.lock().unwrap()["mailroom_handler_duration_seconds{handler=invoices,queue=invoices}"],
    );
    let samples = latency.0.lock().unwrap().clone();
    assert_eq!(samples.len(), 2, "one latency sample per delivery");
    assert!(samples.iter().all(|s| *s >= 0.0 && *s < 10.0));
}
