//! The innermost slots: decode the body and call the user's handler, for typed workers
//! ([`WorkerBuilder::handle`]) and request handlers ([`WorkerBuilder::handle_request`], whose value or
//! error becomes the reply).

use super::builder::WorkerBuilder;
use super::middleware::{Incoming, Outcome, Terminal};
use super::worker::Worker;
use crate::bus::Context;
use crate::envelope::{Envelope, Payload};
use crate::error::HandlerError;
use std::future::Future;
use std::sync::Arc;

impl WorkerBuilder {
    /// Sets a typed handler; `run` starts it.
    pub fn handle<T, F, Fut>(self, handler: F) -> Worker
    where
        T: Payload,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        Worker { builder: self, terminal: typed_terminal(handler) }
    }

    /// Sets a request handler (use with [`Bus::responder`](crate::Bus::responder)): its value is the reply.
    pub fn handle_request<T, R, F, Fut>(mut self, handler: F) -> Worker
    where
        T: Payload,
        R: Payload,
        F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        self.responder = true;
        let handler = Arc::new(handler);
        let terminal: Terminal = Arc::new(move |msg: Incoming| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let env = match Envelope::<T>::from_parts((*msg.meta).clone(), &msg.body) {
                    Ok(e) => e,
                    Err(e) => {
                        let err = HandlerError::permanent(e).with_kind("decode");
                        crate::request::reply_fault(&msg.ctx, &err).await;
                        return Outcome::DeadLetter(err);
                    }
                };
                let ctx = msg.ctx.clone();
                match handler(env, msg.ctx).await {
                    Ok(resp) => match crate::request::reply(&ctx, resp).await {
                        Ok(()) => Outcome::Ack,
                        Err(e) => Outcome::Retry(HandlerError::transient(e).with_kind("reply")),
                    },
                    Err(e) => {
                        crate::request::reply_fault(&ctx, &e).await;
                        // The fault reply is the answer: nothing to retry or dead-letter.
                        Outcome::Drop(format!("fault replied: {e}"))
                    }
                }
            })
        });
        Worker { builder: self, terminal }
    }
}

/// Decode, then call `handler`: the innermost slots of a typed worker.
pub(super) fn typed_terminal<T, F, Fut>(handler: F) -> Terminal
where
    T: Payload,
    F: Fn(Envelope<T>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |msg: Incoming| {
        let handler = Arc::clone(&handler);
        Box::pin(async move {
            let env = match Envelope::<T>::from_parts((*msg.meta).clone(), &msg.body) {
                Ok(e) => e,
                Err(e) => return Outcome::DeadLetter(HandlerError::permanent(e).with_kind("decode")),
            };
            match handler(env, msg.ctx).await {
                Ok(()) => Outcome::Ack,
                Err(e) if e.permanent => Outcome::DeadLetter(e),
                Err(e) => Outcome::Retry(e),
            }
        })
    })
}
