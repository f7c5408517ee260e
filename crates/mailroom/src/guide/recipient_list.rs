//! # Recipient list
//!
//! [`Bus::send_each`](crate::Bus::send_each) sends one message, with one message id, to a computed list
//! of queues and returns a result per recipient: each publish is confirmed on its own, and a queue
//! that does not exist is reported as [`Error::NoRoute`](crate::Error::NoRoute) for that recipient
//! while the others still get the message. Because the id is shared, a recipient that receives it
//! twice (a retried send) can drop the duplicate with an [idempotent consumer](super::idempotent_consumer).
//! Compute the list however the routing rule says (a customer's subscriptions, a tenant's services).
//!
//! ```
//! use mailroom::{Bus, Error};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = Bus::embedded()?;
//! bus.declare_queue("email").await?;
//! bus.declare_queue("sms").await?;
//! let channels = |vip: bool| if vip { vec!["email", "sms", "pager"] } else { vec!["email"] };
//!
//! let results = bus.send_each(&channels(true), "your order shipped".to_string()).await;
//! assert!(results[0].1.is_ok() && results[1].1.is_ok());
//! assert_eq!(results[2].0, "pager");
//! assert!(matches!(results[2].1, Err(Error::NoRoute(_))));
//! assert_eq!(bus.transport().message_count("email").await?, 1);
//! assert_eq!(bus.transport().message_count("sms").await?, 1);
//! # Ok(()) }
//! ```
