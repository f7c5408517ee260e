//! # Saga as a state machine (event-driven)
//!
//! When a saga is better told as "in this state, on that event, do this" than as a list of steps,
//! implement [`StateMachine`](crate::saga::StateMachine): a serde state kept per correlation key,
//! a serde event enum, and `on_event`, which returns the next state and records on the
//! [`Transition`](crate::saga::Transition) what to send ([`send`](crate::saga::Transition::send),
//! or [`request`](crate::saga::Transition::request) whose reply comes back as the event variant
//! named by `on_reply`/`on_fault`), which timers to [`schedule`](crate::saga::Transition::schedule)
//! or [`cancel`](crate::saga::Transition::cancel), and whether the saga is over. Run it with
//! [`Machine::run_on`](crate::saga::Machine::run_on) on a saga store (the embedded one below, or
//! PostgreSQL) and the store's relay; [`MachineHandle::wait`](crate::saga::MachineHandle::wait)
//! returns the final state when the orchestrator commits it, without polling. The order saga
//! (reserve, charge, ship; a declined card or a payment timer releases the stock) is written this way
//! in `examples/order_saga.rs`: `cargo run -p mailroom --example order_saga`.
//!
//! What the SDK guarantees: each transition (state, version, commands, timers, the id of the
//! message that caused it) is one atomic store write, so an orchestrator killed anywhere resumes from
//! the store with nothing lost and no message applied twice (a redelivered event is recognised by
//! its id); commands leave through the outbox with fixed ids; timers are delayed messages (TTL
//! queues dead-lettering into the saga's queue), so they survive a restart of the orchestrator.
//!
//! Pitfalls, as users of MassTransit's or NServiceBus's saga state machines meet them:
//! - **Services must be idempotent.** A command published by a relay killed before it marked it
//!   sent goes out again with the same id: give services an [inbox](super::idempotent_consumer).
//! - **`on_event` must be deterministic and side-effect free.** It runs again after a version
//!   conflict or a crash before commit; put effects in commands, not in the function.
//! - **Handle every event in every state**, if only by ignoring it: a duplicate `Placed`, a reply
//!   that arrives after a timer already moved the saga on. The event enum must stay externally
//!   tagged (serde's default) for replies to map onto variants by name.
//! - **Timers are not cancelled at the broker**: a cancelled or replaced timer still fires and is
//!   ignored. Each distinct delay is one TTL queue `saga.<name>.timer.<ms>`; keep the set small.
//! - **`wait` sees this orchestrator's commits**: an instance finished by another process is seen by
//!   the next call (or read it with [`get`](crate::saga::MachineHandle::get)).
//!
//! ```
//! use mailroom::saga::{EmbeddedSagaStore, Machine, StateMachine, Status, Transition};
//! use mailroom::{Bus, Envelope, Fault, HandlerError};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! enum Order { New, Charging, Paid, Declined(String), TimedOut }
//!
//! #[derive(Serialize, Deserialize)]
//! enum Event { Placed { id: u32, cents: i64 }, Charged(serde_json::Value), Declined(Fault), PaymentLate }
//!
//! struct Checkout;
//! impl StateMachine for Checkout {
//!     type State = Order;
//!     type Event = Event;
//!     fn name(&self) -> &str { "checkout" }
//!     fn key(&self, e: &Event) -> String {
//!         match e { Event::Placed { id, .. } => id.to_string(), _ => String::new() }
//!     }
//!     fn start(&self, e: &Event) -> Option<Order> { matches!(e, Event::Placed { .. }).then_some(Order::New) }
//!     fn on_event(&self, s: Order, e: Event, t: &mut Transition<Event>) -> Result<Order, HandlerError> {
//!         Ok(match (s, e) {
//!             (Order::New, Event::Placed { cents, .. }) => {
//!                 t.request("payment.charge", cents).on_reply("Charged").on_fault("Declined");
//!                 t.schedule("late", Duration::from_secs(30), Event::PaymentLate);
//!                 Order::Charging
//!             }
//!             (Order::Charging, Event::Charged(_)) => { t.cancel("late"); t.complete(); Order::Paid }
//!             (Order::Charging, Event::Declined(f)) => { t.cancel("late"); t.fail(&f.message); Order::Declined(f.message) }
//!             (Order::Charging, Event::PaymentLate) => { t.fail("payment late"); Order::TimedOut }
//!             (s, _) => s, // anything else changes nothing
//!         })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! let payment = bus.responder("payment.charge")
//!     .handle_request(|c: Envelope<i64>, _| async move {
//!         if c.body > 10_000 { return Err(HandlerError::permanent("declined")); }
//!         Ok(serde_json::json!({ "charged": c.body }))
//!     })
//!     .run().await?;
//!
//! # let dir = std::env::temp_dir().join(format!("mailroom-guide-machine-{}", std::process::id()));
//! let store = EmbeddedSagaStore::open(&dir)?;
//! let relay = store.relay(bus.clone()).run().await?;
//! let checkout = Machine::new(Checkout).run_on(bus.clone(), store).await?;
//! checkout.send(Event::Placed { id: 1, cents: 500 }).await?;
//! checkout.send(Event::Placed { id: 2, cents: 99_000 }).await?;
//! let paid = checkout.wait("1").await?;
//! assert_eq!((paid.status, paid.state), (Status::Done, Order::Paid));
//! let declined = checkout.wait("2").await?;
//! assert_eq!(declined.status, Status::Failed);
//! assert_eq!(declined.state, Order::Declined("declined".into()));
//! # checkout.stop().await; relay.stop().await; payment.stop().await;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```
