//! The SQLite outbox and inbox (feature `sqlite`): an order row and its `OrderPlaced` event commit in
//! one SQLite transaction; the relay publishes the event after commit; the shipping consumer records
//! the message id in its SQLite inbox in the same transaction as its own row, so a redelivered copy
//! changes nothing. Runs on the embedded broker:
//! `cargo run -p mailroom --example sqlite_outbox --features sqlite`.

use mailroom::sqlite::{self, Dest, SqliteInbox, SqliteOutbox};
use mailroom::{Bus, Envelope};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    order: i64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("mailroom-example-sqlite-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bus = Bus::embedded()?;

    // The shop: orders and the outbox in one database file.
    let shop_db = dir.join("shop.db");
    let shop = sqlite::open(&shop_db).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)").execute(&shop).await?;
    let outbox = SqliteOutbox::new(shop.clone(), &shop_db, "outbox")?;
    outbox.migrate().await?;
    let relay = outbox.relay(bus.clone()).run().await?;

    // Shipping: its own database with the inbox and its shipments.
    let shipping = sqlite::open(dir.join("shipping.db")).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS shipments (order_id INTEGER NOT NULL)").execute(&shipping).await?;
    let inbox = SqliteInbox::new(shipping.clone());
    inbox.migrate().await?;
    let worker = bus
        .worker("example.shipping")
        .idempotent(std::sync::Arc::new(inbox))
        .handle(|e: Envelope<OrderPlaced>, ctx| async move {
            let mut tx = ctx.sqlite_tx()?;
            sqlx::query("INSERT INTO shipments (order_id) VALUES (?)").bind(e.body.order).execute(&mut **tx).await?;
            println!("shipping: order {} scheduled (message {})", e.body.order, e.meta.id);
            Ok(())
        })
        .run()
        .await?;

    for order in 1..=3 {
        let mut tx = shop.begin().await?;
        sqlx::query("INSERT INTO orders (id) VALUES (?)").bind(order).execute(&mut *tx).await?;
        outbox
            .enqueue(&mut tx, Dest::Queue("example.shipping".into()), &Envelope::event(OrderPlaced { order }))
            .await?;
        tx.commit().await?; // the event leaves only now
    }
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM shipments").fetch_one(&shipping).await? < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("3 orders, 3 shipments; outbox rows still unsent: {}", outbox.pending().await?);
    worker.stop().await;
    relay.stop().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
