//! End-to-end runs against the in-process fake peer, over real loopback TCP.

use clap::Parser;

use super::{run_report, BenchArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(line: &str) -> BenchArgs {
    Cli::parse_from(std::iter::once("bench").chain(line.split_whitespace())).args
}

#[tokio::test]
async fn sink_publishes_a_count() {
    let r = run_report(args("--sink --count 200000")).await.unwrap();
    assert_eq!(r.published, 200_000);
    assert_eq!(r.consumed, 0);
    assert!(r.publish_rate > 0.0);
    assert!(r.broker_cpu_s.is_some());
}

#[tokio::test]
async fn sink_with_confirms_and_large_bodies() {
    let r =
        run_report(args("--sink --count 5000 --size 200000 --confirm 64 --persistent --producers 2")).await.unwrap();
    assert_eq!((r.published, r.nacked), (5000, 0));
}

#[tokio::test]
async fn source_delivers_a_count_with_manual_acks() {
    let r = run_report(args("--source --count 300000 --prefetch 100 --multiple-ack-every 50")).await.unwrap();
    assert!(r.consumed >= 300_000, "{}", r.line());
    assert_eq!(r.published, 0);
    assert!(r.p50_ms > 0.0 && r.max_ms >= r.p99_ms, "{}", r.line());
}

#[tokio::test]
async fn sink_and_source_for_a_short_duration() {
    let r = run_report(args("--sink --source --duration 0.3 --size 1024 --auto-ack")).await.unwrap();
    assert!(r.published > 0 && r.consumed > 0, "{}", r.line());
    let line = r.line();
    assert!(line.starts_with("RESULT published="));
    for key in ["consume_rate=", "p999_ms=", "bench_cpu_s=", "broker_cpu_s=", "msgs_per_broker_cpu_s="] {
        assert!(line.contains(key), "{line}");
    }
}

/// Messages per broker CPU-second: deliveries when anything was consumed, publishes otherwise; none
/// without the broker's CPU time or when it is too small to divide by.
#[test]
fn messages_per_broker_cpu_second() {
    let mut r = super::Report { published: 1000, consumed: 4000, broker_cpu_s: Some(2.0), ..Default::default() };
    assert_eq!(r.msgs_per_broker_cpu_s(), Some(2000.0));
    assert!(r.line().contains(" msgs_per_broker_cpu_s=2000 "), "{}", r.line());
    r.consumed = 0;
    assert_eq!(r.msgs_per_broker_cpu_s(), Some(500.0));
    r.broker_cpu_s = Some(0.0);
    assert_eq!(r.msgs_per_broker_cpu_s(), None);
    r.broker_cpu_s = None;
    assert_eq!(r.msgs_per_broker_cpu_s(), None);
    assert!(r.line().contains(" msgs_per_broker_cpu_s=na "), "{}", r.line());
}

#[test]
fn rejects_tiny_messages() {
    assert!(Cli::try_parse_from(["bench", "--size", "8"]).is_err());
}
