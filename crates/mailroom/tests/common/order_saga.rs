//! The order saga the saga tests share: its data and the commands of its steps and compensations.

use mailroom::saga::Command;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The saga's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub prefix: String,
    pub order: u32,
    pub cents: i64,
    /// Set from the charge step's reply (`on_reply`); the refund carries it.
    #[serde(default)]
    pub payment: Option<String>,
}

pub fn reserve(o: &Order) -> Command {
    Command::new(format!("{}.reserve", o.prefix), serde_json::json!({ "order": o.order }))
}
pub fn release(o: &Order) -> Command {
    Command::new(format!("{}.release", o.prefix), serde_json::json!({ "order": o.order }))
}
pub fn charge(o: &Order) -> Command {
    Command::new(format!("{}.charge", o.prefix), serde_json::json!({ "order": o.order, "cents": o.cents }))
}
pub fn refund(o: &Order) -> Command {
    Command::new(format!("{}.refund", o.prefix), serde_json::json!({ "order": o.order, "payment": o.payment }))
}
pub fn ship(o: &Order) -> Command {
    Command::new(format!("{}.ship", o.prefix), serde_json::json!({ "order": o.order }))
}

/// How each service behaves: fail its first `n` calls (`u32::MAX`: always).
pub type Failures = HashMap<&'static str, u32>;
