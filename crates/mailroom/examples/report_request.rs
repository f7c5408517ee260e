//! Request-reply: a client asks a report service for a monthly sales report and awaits the answer,
//! with a deadline. Shows the three outcomes besides a reply: a remote fault (the service refused the
//! request), no route (nobody serves that queue) and a timeout. Runs on the embedded broker;
//! `--url amqp://guest:guest@127.0.0.1:5672/%2F` runs it against a server.

use mailroom::{Amqp, AmqpConfig, Bus, Envelope, HandlerError, RequestError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
struct ReportRequest {
    year: u32,
    month: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    title: String,
    orders: u32,
    revenue_cents: u64,
}

const SERVICE: &str = "example.reports";
const SLOW_SERVICE: &str = "example.reports.slow";

async fn bus_from_args() -> Result<Bus, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    Ok(match args.iter().position(|a| a == "--url") {
        Some(i) => Bus::new(Amqp::connect(AmqpConfig::new(args.get(i + 1).ok_or("--url needs a value")?)).await?),
        None => Bus::embedded()?,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = bus_from_args().await?;
    let service = bus
        .responder(SERVICE)
        .handle_request(|req: Envelope<ReportRequest>, _| async move {
            let ReportRequest { year, month } = req.body;
            if !(1..=12).contains(&month) {
                return Err(HandlerError::permanent(format!("no month {month}")).with_kind("invalid"));
            }
            Ok(Report {
                title: format!("Sales {year}-{month:02}"),
                orders: 40 + month,
                revenue_cents: 125_000 * month as u64,
            })
        })
        .run()
        .await?;
    let slow = bus
        .responder(SLOW_SERVICE)
        .handle_request(|_: Envelope<ReportRequest>, _| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(Report { title: "too late".into(), orders: 0, revenue_cents: 0 })
        })
        .run()
        .await?;

    let report: Report =
        bus.request(SERVICE, ReportRequest { year: 2026, month: 11 }).timeout(Duration::from_secs(5)).await?;
    println!("reply: {} - {} orders, {:.2} total", report.title, report.orders, report.revenue_cents as f64 / 100.0);

    match bus
        .request::<Report, _>(SERVICE, ReportRequest { year: 2026, month: 13 })
        .timeout(Duration::from_secs(5))
        .await
    {
        Err(RequestError::Remote(fault)) => println!("fault: {} ({})", fault.message, fault.kind),
        other => return Err(format!("expected a fault, got {other:?}").into()),
    }
    match bus.request::<Report, _>("example.nobody-serves-this", ReportRequest { year: 2026, month: 1 }).await {
        Err(RequestError::NoRoute(q)) => println!("no route: nobody serves {q}"),
        other => return Err(format!("expected no route, got {other:?}").into()),
    }
    match bus
        .request::<Report, _>(SLOW_SERVICE, ReportRequest { year: 2026, month: 1 })
        .timeout(Duration::from_millis(300))
        .await
    {
        Err(RequestError::Timeout) => println!("timeout: the slow service missed the 300 ms deadline"),
        other => return Err(format!("expected a timeout, got {other:?}").into()),
    }

    service.stop().await;
    slow.stop().await;
    println!("late replies dropped so far: {}", bus.late_replies());
    for q in [SERVICE, SLOW_SERVICE] {
        for name in [q.to_owned(), format!("{q}.dlq")] {
            bus.transport().delete_queue(&name).await?;
        }
    }
    Ok(())
}
