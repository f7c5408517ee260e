//! An order saga: reserve inventory, charge the payment, ship; a failed step compensates the steps
//! before it in reverse order (release the stock, refund). Saga state and the outbox live in the
//! local PostgreSQL (`MAILROOM_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`); the
//! services are responders on the embedded broker.
//!
//! `cargo run --example order_saga`: order 1 is shipped; order 2's card is declined, so its stock is
//! released; both histories are printed.

use mailroom::outbox::Outbox;
use mailroom::saga::{Command, Saga, Status};
use mailroom::{Bus, Envelope, HandlerError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    order: u32,
    sku: String,
    cents: i64,
}

fn reserve(o: &Order) -> Command {
    Command::new("example.inventory.reserve", serde_json::json!({ "order": o.order, "sku": o.sku }))
}
fn release(o: &Order) -> Command {
    Command::new("example.inventory.release", serde_json::json!({ "order": o.order, "sku": o.sku }))
}
fn charge(o: &Order) -> Command {
    Command::new("example.payment.charge", serde_json::json!({ "order": o.order, "cents": o.cents }))
}
fn refund(o: &Order) -> Command {
    Command::new("example.payment.refund", serde_json::json!({ "order": o.order }))
}
fn ship(o: &Order) -> Command {
    Command::new("example.shipping.ship", serde_json::json!({ "order": o.order }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MAILROOM_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = sqlx::PgPool::connect(&url).await?;
    let bus = Bus::embedded()?;

    // The services: each answers its command (an error becomes a fault reply).
    let mut services = Vec::new();
    for queue in
        ["example.inventory.reserve", "example.inventory.release", "example.payment.refund", "example.shipping.ship"]
    {
        services.push(
            bus.responder(queue)
                .handle_request(move |cmd: Envelope<serde_json::Value>, _| async move {
                    println!("  {queue}: {}", cmd.body);
                    // A compensation must accept "nothing to undo" (a timed-out step may never have run).
                    Ok(serde_json::json!({ "done": queue }))
                })
                .run()
                .await?,
        );
    }
    services.push(
        bus.responder("example.payment.charge")
            .handle_request(|cmd: Envelope<serde_json::Value>, _| async move {
                let cents = cmd.body["cents"].as_i64().unwrap_or(0);
                println!("  example.payment.charge: {}", cmd.body);
                if cents > 10_000 {
                    return Err(HandlerError::permanent("card declined"));
                }
                Ok(serde_json::json!({ "charged": cents }))
            })
            .run()
            .await?,
    );

    // Saga commands leave through the outbox, in the same transaction as the saga's state.
    let outbox = Outbox::new(pool.clone(), "example_outbox")?;
    outbox.migrate().await?;
    let relay = outbox.relay(bus.clone()).poll_interval(Duration::from_millis(100)).run().await?;
    let saga = Saga::<Order>::named("example_order")
        .step("reserve", reserve, Some(release))
        .step("charge", charge, Some(refund))
        .step("ship", ship, None)
        .step_timeout(Duration::from_secs(5))
        .tick(Duration::from_millis(100))
        .run(bus.clone(), outbox.clone())
        .await?;

    let orders =
        [Order { order: 1, sku: "book".into(), cents: 2_500 }, Order { order: 2, sku: "piano".into(), cents: 450_000 }];
    for o in &orders {
        println!("order {} ({} cents):", o.order, o.cents);
        let id = saga.start(o).await?;
        let status = loop {
            let s = saga.get(&id).await?.status;
            if s.is_final() || s == Status::Stuck {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!("order {}: {status}", o.order);
        for h in saga.history(&id).await? {
            println!("    {}", h.event);
        }
    }

    saga.stop().await;
    relay.stop().await;
    for s in services {
        s.stop().await;
    }
    Ok(())
}
