//! The pipeline's vocabulary and its user layers: what handling came to ([`Outcome`]), the delivery
//! the layers see ([`Incoming`]), and the [`Middleware`] chain ([`Next`]) that ends in decode and the
//! handler.

use crate::bus::Context;
use crate::envelope::Metadata;
use crate::error::HandlerError;
use crate::transport::BoxFuture;
use bytes::Bytes;
use std::sync::Arc;

/// What handling a delivery came to; the dispatcher turns it into broker operations.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Done: ack.
    Ack,
    /// Failed, may succeed later: the retry slot decides.
    Retry(HandlerError),
    /// Failed for good: to the DLQ.
    DeadLetter(HandlerError),
    /// Deliberately ignored (filtered, duplicate): ack and count.
    Drop(String),
}

/// A delivery as the pipeline sees it (body still encoded).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Metadata read from the AMQP properties.
    pub meta: Arc<Metadata>,
    /// The encoded body.
    pub body: Bytes,
    /// The handler context (bus, trace, queue).
    pub ctx: Context,
}

/// A user layer between the idempotency slot and decoding (auth checks, tenant scoping, timing).
pub trait Middleware: Send + Sync + 'static {
    /// Handles `msg`, usually by calling `next.run(msg)` and inspecting or mapping the outcome.
    fn call(&self, msg: Incoming, next: Next) -> BoxFuture<'static, Outcome>;
}

/// The innermost slots (decode and the handler) as one function.
pub(super) type Terminal = Arc<dyn Fn(Incoming) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// The rest of the pipeline after a user layer.
#[derive(Clone)]
pub struct Next {
    pub(super) layers: Arc<[Arc<dyn Middleware>]>,
    pub(super) index: usize,
    pub(super) terminal: Terminal,
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next").field("index", &self.index).finish()
    }
}

impl Next {
    /// Runs the remaining layers, then decode and the handler.
    pub fn run(self, msg: Incoming) -> BoxFuture<'static, Outcome> {
        match self.layers.get(self.index).cloned() {
            Some(layer) => layer.call(msg, Next { index: self.index + 1, ..self }),
            None => (self.terminal)(msg),
        }
    }
}
