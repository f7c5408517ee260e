//! Retries, dead letters and redrive: a handler fails while its "database" is down; the message is
//! retried (immediately, then with backoff: through the delayed-message exchange on Mailroom, TTL retry
//! queues on RabbitMQ), lands in the DLQ with the error in its headers, and is redriven with the same
//! id once the database is back.
//! `--url amqp://guest:guest@127.0.0.1:5672/%2F` runs it against a server.

use mailroom::envelope::headers;
use mailroom::{Amqp, AmqpConfig, Bus, Envelope, HandlerError, Metadata, RetryPolicy};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let bus = match args.iter().position(|a| a == "--url") {
        Some(i) => Bus::new(Amqp::connect(AmqpConfig::new(args.get(i + 1).ok_or("--url needs a value")?)).await?),
        None => Bus::embedded()?,
    };
    let up = Arc::new(AtomicBool::new(false));
    let u = up.clone();
    let worker = bus
        .worker("example.flaky")
        .retry(RetryPolicy::new().immediate(1).delayed(2).backoff(
            Duration::from_millis(100),
            2,
            Duration::from_secs(1),
        ))
        .handle(move |e: Envelope<String>, _| {
            let u = u.clone();
            async move {
                if u.load(Ordering::SeqCst) {
                    println!("handled {} ({})", e.body, e.id);
                    Ok(())
                } else {
                    println!("attempt failed for {}", e.id);
                    Err(HandlerError::transient("database down"))
                }
            }
        })
        .run()
        .await?;
    let id = bus.send("example.flaky", "invoice-7".to_string()).await?;
    println!("sent {id}");
    while bus.transport().message_count("example.flaky.dlq").await? == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(dead) = bus.transport().get("example.flaky.dlq").await? {
        let meta = Metadata::from_properties(&dead.properties);
        println!(
            "dead-lettered {} after {} attempts: {}",
            meta.id,
            meta.header(headers::ATTEMPT).unwrap_or("?"),
            meta.header(headers::ERROR).unwrap_or("?")
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    up.store(true, Ordering::SeqCst);
    println!("redriven: {}", bus.redrive("example.flaky.dlq").await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.stop().await;
    Ok(())
}
