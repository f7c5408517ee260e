//! Publish/subscribe: an order-placed event reaches billing and shipping, each a subscriber group with
//! its own durable queue. Runs on the embedded broker; `--url amqp://guest:guest@127.0.0.1:5672/%2F`
//! runs it against a server.

use mailroom::{Amqp, AmqpConfig, Bus, Envelope};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: u32,
    total_cents: u64,
}

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
    let billing = bus
        .subscribe("example.orders.*")
        .group("example.billing")
        .handle(|e: Envelope<OrderPlaced>, _| async move {
            println!("billing: charge {} cents for order {}", e.body.total_cents, e.body.order);
            Ok(())
        })
        .run()
        .await?;
    let shipping = bus
        .subscribe("example.orders.placed")
        .group("example.shipping")
        .handle(|e: Envelope<OrderPlaced>, _| async move {
            println!("shipping: pack order {} (event {})", e.body.order, e.id);
            Ok(())
        })
        .run()
        .await?;
    for order in 1..=3 {
        bus.publish("example.orders.placed", OrderPlaced { order, total_cents: 1250 * order as u64 }).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    billing.stop().await;
    shipping.stop().await;
    Ok(())
}
