//! The order saga as an event-driven state machine: reserve the stock, charge the card, ship; a
//! declined card releases the stock. Each order is one instance keyed by its number; events, the
//! services' replies and a payment timer move it between phases. The services are idempotent
//! responders (an inbox each) on the embedded broker.
//!
//! `cargo run -p mailroom --example order_saga`: order 1 ships; order 2's card is declined, so its
//! stock is released; each transition is printed as it commits, then each order's final state.
//! Instances and their outbox live in the embedded saga store: a temporary directory, removed at the
//! end, or `MAILROOM_SAGA_STORE=<dir>` to keep it and look at it with
//! `mailroom saga --store <dir> list` / `history order:<n>`.
//!
//! `cargo run -p mailroom --features postgres --example order_saga -- --postgres`: the same with the
//! instances in the local PostgreSQL (`MAILROOM_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), commands through its outbox table.

use mailroom::saga::{EmbeddedSagaStore, Machine, MachineHandle, StateMachine, Transition};
use mailroom::{Bus, Envelope, Fault, HandlerError, MemoryInbox, WorkerHandle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The saga's name: it names its queue (`saga.order.events`) and its stored instances (`order:<n>`).
const NAME: &str = "order";
/// How long the card may take before the saga gives up on it and releases the stock.
const PAYMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an order is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Phase {
    New,
    Reserving,
    Charging,
    Shipping,
    Releasing,
    Shipped,
    Cancelled,
}

/// The state of one order's saga (versioned in the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    order: u32,
    sku: String,
    cents: i64,
    phase: Phase,
    payment: Option<String>,
    reason: Option<String>,
}

/// What moves an order: the event that starts it, the services' replies (mapped onto variants by
/// name), and the payment timer.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum OrderEvent {
    Placed { order: u32, sku: String, cents: i64 },
    Reserved(Value),
    Charged(Value),
    ChargeDeclined(Fault),
    PaymentTimedOut,
    Shipped(Value),
    Released(Value),
}

/// The order saga: in this phase, on that event, send this and move there.
struct OrderSaga;

impl StateMachine for OrderSaga {
    type State = Order;
    type Event = OrderEvent;

    fn name(&self) -> &str {
        NAME
    }

    fn key(&self, event: &OrderEvent) -> String {
        match event {
            OrderEvent::Placed { order, .. } => order.to_string(),
            // Replies and timers carry their instance's key themselves.
            _ => String::new(),
        }
    }

    fn start(&self, event: &OrderEvent) -> Option<Order> {
        match event {
            OrderEvent::Placed { order, sku, cents } => Some(Order {
                order: *order,
                sku: sku.clone(),
                cents: *cents,
                phase: Phase::New,
                payment: None,
                reason: None,
            }),
            _ => None,
        }
    }

    fn on_event(&self, mut s: Order, event: OrderEvent, t: &mut Transition<OrderEvent>) -> Result<Order, HandlerError> {
        match (&s.phase, event) {
            // The event that started the instance: ask for the stock.
            (Phase::New, OrderEvent::Placed { .. }) => {
                s.phase = Phase::Reserving;
                t.request("example.inventory.reserve", json!({ "order": s.order, "sku": s.sku })).on_reply("Reserved");
            }
            (Phase::Reserving, OrderEvent::Reserved(_)) => {
                s.phase = Phase::Charging;
                t.request("example.payment.charge", json!({ "order": s.order, "cents": s.cents }))
                    .on_reply("Charged")
                    .on_fault("ChargeDeclined");
                t.schedule("payment", PAYMENT_TIMEOUT, OrderEvent::PaymentTimedOut);
            }
            (Phase::Charging, OrderEvent::Charged(reply)) => {
                s.phase = Phase::Shipping;
                s.payment = reply["payment"].as_str().map(str::to_owned);
                t.cancel("payment");
                t.request("example.shipping.ship", json!({ "order": s.order })).on_reply("Shipped");
            }
            (Phase::Charging, OrderEvent::ChargeDeclined(fault)) => {
                s.phase = Phase::Releasing;
                s.reason = Some(fault.message);
                t.cancel("payment");
                t.request("example.inventory.release", json!({ "order": s.order, "sku": s.sku })).on_reply("Released");
            }
            (Phase::Charging, OrderEvent::PaymentTimedOut) => {
                s.phase = Phase::Releasing;
                s.reason = Some("payment timed out".into());
                t.request("example.inventory.release", json!({ "order": s.order, "sku": s.sku })).on_reply("Released");
            }
            (Phase::Shipping, OrderEvent::Shipped(_)) => {
                s.phase = Phase::Shipped;
                t.send("example.notify", json!({ "order": s.order, "shipped": true }));
                t.complete();
            }
            (Phase::Releasing, OrderEvent::Released(_)) => {
                s.phase = Phase::Cancelled;
                t.send("example.notify", json!({ "order": s.order, "shipped": false }));
                t.fail(s.reason.clone().unwrap_or_default());
            }
            // Anything else (a second `Placed`, a reply the phase no longer expects) changes nothing.
            _ => {}
        }
        Ok(s)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = Bus::embedded()?;
    let services = start_services(&bus).await?;
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

/// The services: each answers its command (an error becomes a fault reply). A command re-published
/// after a crash carries the same id; each service's inbox absorbs the copy.
async fn start_services(bus: &Bus) -> Result<Vec<WorkerHandle>, Box<dyn std::error::Error>> {
    let inbox = || Arc::new(MemoryInbox::new(Duration::from_secs(3600)));
    let mut services = Vec::new();
    for queue in ["example.inventory.reserve", "example.inventory.release", "example.shipping.ship"] {
        services.push(
            bus.responder(queue)
                .idempotent(inbox())
                .handle_request(move |cmd: Envelope<Value>, _| async move {
                    println!("    {queue}: {}", cmd.body);
                    Ok(json!({ "done": queue }))
                })
                .run()
                .await?,
        );
    }
    services.push(
        bus.responder("example.payment.charge")
            .idempotent(inbox())
            .handle_request(|cmd: Envelope<Value>, _| async move {
                println!("    example.payment.charge: {}", cmd.body);
                let cents = cmd.body["cents"].as_i64().unwrap_or(0);
                if cents > 10_000 {
                    return Err(HandlerError::permanent("card declined"));
                }
                Ok(json!({ "payment": format!("pay-{}", cmd.body["order"]) }))
            })
            .run()
            .await?,
    );
    services.push(
        bus.worker("example.notify")
            .idempotent(inbox())
            .handle(|n: Envelope<Value>, _| async move {
                println!("    example.notify: {}", n.body);
                Ok(())
            })
            .run()
            .await?,
    );
    Ok(services)
}

/// The saga, printing each transition as it commits.
fn order_machine() -> Machine<OrderSaga> {
    // One message at a time: the printed transitions follow the order they commit in.
    Machine::new(OrderSaga).concurrency(1).on_transition(|t| async move {
        println!("  order {} v{} {}: {}", t.key, t.version, t.status, t.event);
    })
}

/// The default: instances and their outbox in the embedded saga store (a directory, no database).
async fn on_embedded_store(bus: &Bus) -> Result<(), Box<dyn std::error::Error>> {
    let (dir, keep) = match std::env::var_os("MAILROOM_SAGA_STORE") {
        Some(dir) => (std::path::PathBuf::from(dir), true),
        None => (std::env::temp_dir().join(format!("mailroom-order-saga-{}", std::process::id())), false),
    };
    println!("saga store: {} (embedded)", dir.display());
    let store = EmbeddedSagaStore::open(&dir)?;
    // Commands and timers leave through the store's outbox, written with each transition; the relay sends them.
    let relay = store.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await?;
    let saga = order_machine().run_on(bus.clone(), store).await?;
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

/// `--postgres`: instances in PostgreSQL, commands and timers through its outbox table.
#[cfg(feature = "postgres")]
async fn on_postgres(bus: &Bus) -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MAILROOM_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    println!("saga store: {url} (PostgreSQL)");
    let pool = sqlx::PgPool::connect(&url).await?;
    let outbox = mailroom::outbox::Outbox::new(pool, "example_outbox")?;
    outbox.migrate().await?;
    let relay = outbox.relay(bus.clone()).poll_interval(Duration::from_millis(50)).run().await?;
    let saga = order_machine().run_on(bus.clone(), mailroom::saga::PgSagaStore::new(outbox)).await?;
    place_orders(&saga).await?;
    saga.stop().await;
    relay.stop().await;
    Ok(())
}

#[cfg(not(feature = "postgres"))]
async fn on_postgres(_bus: &Bus) -> Result<(), Box<dyn std::error::Error>> {
    Err("built without the `postgres` feature: cargo run -p mailroom --features postgres --example order_saga -- --postgres".into())
}

/// Order 1 ships; order 2's card is declined and its stock released. `wait` returns when the
/// orchestrator commits an order's last transition (no polling); then its stored history is printed.
async fn place_orders(saga: &MachineHandle<OrderSaga>) -> Result<(), Box<dyn std::error::Error>> {
    // In a store kept from an earlier run these orders are already over: the new `Placed` events are
    // ignored and their earlier ends printed.
    let orders = [(1u32, "book", 2_500), (2, "piano", 450_000)];
    for (order, sku, cents) in orders {
        println!("order {order}: {sku}, {cents} cents");
        saga.send(OrderEvent::Placed { order, sku: sku.into(), cents }).await?;
        let done = tokio::time::timeout(Duration::from_secs(30), saga.wait(&order.to_string())).await??;
        println!("order {order}: {} in phase {:?}", done.status, done.state.phase);
        if let Some(reason) = &done.error {
            println!("  reason: {reason}");
        }
        println!("  history ({NAME}:{order}):");
        for h in saga.store().history(&format!("{NAME}:{order}")).await? {
            println!("    {}", h.event);
        }
    }
    Ok(())
}
