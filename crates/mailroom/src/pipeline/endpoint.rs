//! Endpoints: one queue, several message types, each dispatched by the message's `type` property to
//! its handler; an unknown type is dead-lettered with a reason, never decoded.

use super::builder::WorkerBuilder;
use super::handlers::typed_terminal;
use super::middleware::{Incoming, Outcome, Terminal};
use super::worker::{Worker, WorkerHandle};
use crate::bus::Context;
use crate::envelope::Envelope;
use crate::error::{HandlerError, Result};
use std::future::Future;
use std::sync::Arc;

impl WorkerBuilder {
    /// The handler for messages of type `T` (their `type` property is [`Message::NAME`]); add more
    /// types with [`Endpoint::on`]. A message of a type with no handler goes to the DLQ with error kind
    /// `unknown-type` and a reason naming its type and the ones handled, never through a decoder.
    ///
    /// [`Message::NAME`]: crate::Message::NAME
    pub fn on<T, F, Fut>(self, handler: F) -> Endpoint
    where
        T: crate::Message,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        Endpoint { builder: self, handlers: Vec::new() }.on(handler)
    }
}

/// A worker handling several message types, dispatched by the `type` property.
#[must_use = "an endpoint does nothing until .run() is awaited"]
pub struct Endpoint {
    builder: WorkerBuilder,
    handlers: Vec<(&'static str, Terminal)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<&str> = self.handlers.iter().map(|(n, _)| *n).collect();
        f.debug_struct("Endpoint").field("queue", &self.builder.queue).field("types", &types).finish()
    }
}

impl Endpoint {
    /// Adds the handler for messages of type `T`.
    pub fn on<T, F, Fut>(mut self, handler: F) -> Endpoint
    where
        T: crate::Message,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handlers.push((T::NAME, typed_terminal(handler)));
        self
    }

    /// Checks the type names (non-empty, one handler each), then declares and starts the worker.
    pub async fn run(self) -> Result<WorkerHandle> {
        let mut map = std::collections::HashMap::new();
        for (name, terminal) in self.handlers {
            if name.is_empty() {
                return Err(crate::Error::Invalid("a message type name is empty".into()));
            }
            if map.insert(name, terminal).is_some() {
                return Err(crate::Error::Invalid(format!(
                    "two handlers for message type `{name}` on `{}`: type names must be unique",
                    self.builder.queue
                )));
            }
        }
        let mut known: Vec<&str> = map.keys().copied().collect();
        known.sort_unstable();
        let known = known.join(", ");
        let queue = self.builder.queue.clone();
        let map = Arc::new(map);
        let terminal: Terminal = Arc::new(move |msg: Incoming| match map.get(msg.meta.type_name.as_str()) {
            Some(handler) => handler(msg),
            None => {
                let reason =
                    format!("no handler for message type `{}` on `{queue}` (it handles: {known})", msg.meta.type_name);
                Box::pin(std::future::ready(Outcome::DeadLetter(
                    HandlerError::permanent(reason).with_kind("unknown-type"),
                )))
            }
        });
        Worker { builder: self.builder, terminal }.run().await
    }
}
