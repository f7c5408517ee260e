//! An order saga: reserve inventory, charge the payment, ship; a failed step compensates the steps
//! before it in reverse order (release the stock, refund). The services are responders on the
//! embedded broker.
//!
//! `cargo run -p mailroom --example order_saga`: order 1 is shipped; order 2's card is declined, so its
//! stock is released; both histories are printed. Saga state and its outbox live in the embedded
//! store: a temporary directory, removed at the end, or `MAILROOM_SAGA_STORE=<dir>` to keep it and
//! look at it with `mailroom saga --store <dir> list` / `history <id>`.
//!
//! `cargo run -p mailroom --features postgres --example order_saga -- --postgres`: the same on the local PostgreSQL
//! (`MAILROOM_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`), commands through its outbox.

use mailroom::saga::{Command, EmbeddedSagaStore, Saga, SagaHandle, Status};
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

/// The saga: three steps, the first two with a compensation.
fn order_saga() -> Saga<Order> {
    Saga::<Order>::named("example_order")
        .step("reserve", reserve, Some(release))
        .step("charge", charge, Some(refund))
        .step("ship", ship, None)
        .step_timeout(Duration::from_secs(5))
        .tick(Duration::from_millis(100))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
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

    if std::env::args().any(|a| a == "--postgres") {
        on_postgres(&bus).await?;
    } else {
        on_embedded_store(&bus).await?;
    }
    for s in services {
        s.stop().await;
    }
    Ok(())
}

/// The default: saga state and outbox in the embedded store (a directory, no database).
async fn on_embedded_store(bus: &Bus) -> Result<(), Box<dyn std::error::Error>> {
    let (dir, keep) = match std::env::var_os("MAILROOM_SAGA_STORE") {
        Some(dir) => (std::path::PathBuf::from(dir), true),
        None => (std::env::temp_dir().join(format!("mailroom-order-saga-{}", std::process::id())), false),
    };
    println!("saga store: {} (embedded)", dir.display());
    let store = EmbeddedSagaStore::open(&dir)?;
    // Saga commands leave through the store's outbox, written with the saga's state; the relay sends them.
    let relay = store.relay(bus.clone()).poll_interval(Duration::from_millis(100)).run().await?;
    let saga = order_saga().run_on(bus.clone(), store).await?;
    place_orders(&saga).await?;
    saga.stop().await;
    relay.stop().await;
    if keep {
        println!("inspect it: mailroom saga --store {} list", dir.display());
    } else {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// `--postgres`: saga state in PostgreSQL, commands through its outbox table.
#[cfg(feature = "postgres")]
async fn on_postgres(bus: &Bus) -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MAILROOM_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    println!("saga store: {url} (PostgreSQL)");
    let pool = sqlx::PgPool::connect(&url).await?;
    let outbox = mailroom::outbox::Outbox::new(pool, "example_outbox")?;
    outbox.migrate().await?;
    let relay = outbox.relay(bus.clone()).poll_interval(Duration::from_millis(100)).run().await?;
    let saga = order_saga().run(bus.clone(), outbox).await?;
    place_orders(&saga).await?;
    saga.stop().await;
    relay.stop().await;
    Ok(())
}

#[cfg(not(feature = "postgres"))]
async fn on_postgres(_bus: &Bus) -> Result<(), Box<dyn std::error::Error>> {
    Err("built without the `postgres` feature: cargo run -p mailroom --features postgres --example order_saga -- --postgres".into())
}

/// Order 1 ships; order 2's card is declined and its stock released. Prints each history.
async fn place_orders(saga: &SagaHandle<Order>) -> Result<(), Box<dyn std::error::Error>> {
    let orders =
        [Order { order: 1, sku: "book".into(), cents: 2_500 }, Order { order: 2, sku: "piano".into(), cents: 450_000 }];
    for o in &orders {
        println!("order {} ({} cents):", o.order, o.cents);
        let id = saga.start(o).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            let s = saga.get(&id).await?.status;
            if s.is_final() || s == Status::Stuck || tokio::time::Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!("order {} ({id}): {status}", o.order);
        for h in saga.history(&id).await? {
            println!("    {}", h.event);
        }
    }
    Ok(())
}
