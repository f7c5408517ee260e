//! Content assembly: a `basic.publish`, its content header and body frames, into a message handed to the
//! broker (or to the open transaction), with `basic.return` for unroutable mandatory messages.

use super::{short, Connection, Phase};
use crate::channel::{ChannelMode, ChannelPhase, Confirm, PendingPublish, StartedMessage, TxOp};
use crate::codec::{self, basic, ids, Method};
use crate::error::{code, AmqpError};
use bytes::Bytes;
use mailroom_broker::store::SyncTicket;
use mailroom_broker::vhost::DIRECT_REPLY_TO;
use mailroom_broker::Message;
use mailroom_broker::{client_input, counters};
use std::sync::Arc;

impl Connection {
    /// The publish a content frame belongs to; None (after closing the connection if needed) when the frame
    /// must be dropped: connection not open, channel closing, or no publish before it (505).
    pub(super) fn pending_publish(&mut self, id: u16, what: &str) -> Option<&mut PendingPublish> {
        if self.phase != Phase::Open {
            return None;
        }
        let state = self.channels.get(&id).map(|c| (c.phase, c.pending.is_some()));
        match state {
            None => {
                self.close_connection(AmqpError::connection(code::CHANNEL_ERROR, "expected 'channel.open'"));
                None
            }
            Some((ChannelPhase::Closing, _)) => None,
            Some((_, false)) => {
                self.close_connection(AmqpError::connection(
                    code::UNEXPECTED_FRAME,
                    format!("{what} without a preceding publish"),
                ));
                None
            }
            Some(_) => self.channels.get_mut(&id).and_then(|c| c.pending.as_mut()),
        }
    }

    pub(super) fn handle_content_header(&mut self, id: u16, payload: Bytes) {
        let max = self.ctx.config.max_message_size;
        // The usual frame (the header a publish waits for, on an open channel) looks the channel up once.
        let open = self.phase == Phase::Open;
        let ch = self.channels.get_mut(&id).filter(|c| open && c.phase == ChannelPhase::Open);
        let pending = match ch.and_then(|c| c.pending.as_mut()).filter(|p| p.started.is_none()) {
            Some(pending) => pending,
            None => {
                // The refusals: no channel, no publish before it, a second header.
                let Some(pending) = self.pending_publish(id, "content header") else { return };
                if pending.started.is_some() {
                    self.close_connection(AmqpError::connection(
                        code::UNEXPECTED_FRAME,
                        "second content header for one publish",
                    ));
                }
                return;
            }
        };
        let header = match codec::parse_content_header(payload) {
            Ok(h) => h,
            Err(e) => {
                let code = match e {
                    codec::HeaderError::WrongClass { .. } => code::UNEXPECTED_FRAME,
                    codec::HeaderError::Malformed => code::SYNTAX_ERROR,
                    _ => code::FRAME_ERROR,
                };
                self.close_connection(AmqpError::connection(code, format!("bad content header: {e}")));
                return;
            }
        };
        if header.body_size > max as u64 {
            let size = header.body_size;
            // Closing the channel drops the pending publish; its body frames are ignored from now on.
            self.close_channel_with(
                id,
                AmqpError::channel(
                    code::PRECONDITION_FAILED,
                    format!("message size {size} is larger than configured max size {max}"),
                )
                .at(ids::BASIC_PUBLISH),
            );
            return;
        }
        let complete = header.body_size == 0;
        pending.started = Some(StartedMessage {
            message: Arc::new(Message {
                exchange: Arc::clone(&pending.exchange),
                routing_key: Arc::clone(&pending.routing_key),
                properties: header.properties,
                raw_properties: Some(header.raw_properties),
                body: Bytes::new(),
            }),
            // At most `max_message_size` (checked above), a usize.
            body_size: header.body_size as usize,
        });
        if complete {
            self.finish_publish(id);
        }
    }

    pub(super) fn handle_content_body(&mut self, id: u16, payload: Bytes) {
        // The usual frame, a body within its announced size on an open channel: the channel is looked up once.
        let open = self.phase == Phase::Open;
        if let Some(ch) = self.channels.get_mut(&id).filter(|c| open && c.phase == ChannelPhase::Open) {
            if let Some(pending) = ch.pending.as_mut() {
                if let Some(expected) = pending.started.as_ref().map(|s| s.body_size) {
                    if pending.body.len() + payload.len() <= expected {
                        pending.body.push(payload, expected);
                        if pending.body.len() == expected {
                            let tx = matches!(ch.mode, ChannelMode::Tx(_));
                            let pending = ch.pending.take().expect("checked above");
                            self.publish_complete(id, pending, tx);
                        }
                        return;
                    }
                }
            }
        }
        // Anything else (refusals included) the long way.
        let Some(pending) = self.pending_publish(id, "content body") else { return };
        let Some(started) = pending.started.as_ref() else {
            self.close_connection(AmqpError::connection(
                code::UNEXPECTED_FRAME,
                "content body before its content header",
            ));
            return;
        };
        let expected = started.body_size;
        if pending.body.len() + payload.len() > expected {
            self.close_connection(AmqpError::connection(code::FRAME_ERROR, "content body larger than announced"));
            return;
        }
        pending.body.push(payload, expected);
        if pending.body.len() == expected {
            self.finish_publish(id);
        }
    }

    pub(super) fn finish_publish(&mut self, id: u16) {
        // Called only with a complete pending publish on an open channel.
        let ch = self.channel(id);
        let tx = matches!(ch.mode, ChannelMode::Tx(_));
        let Some(pending) = ch.pending.take() else { return };
        self.publish_complete(id, pending, tx);
    }

    /// A complete publish taken from channel `id` (open; `tx` when it is transactional): to its exchange, or to
    /// the transaction.
    fn publish_complete(&mut self, id: u16, pending: PendingPublish, tx: bool) {
        let Some(StartedMessage { mut message, .. }) = pending.started else { return };
        // Held only by this publish until now, so this sets the body in place (no copy is made); the broker
        // takes the Arc as it is.
        Arc::make_mut(&mut message).body = pending.body.finish();
        if message.properties.reply_to().as_ref().is_some_and(|r| r.as_str() == DIRECT_REPLY_TO) {
            // Direct reply-to: point the reply at this channel's reply queue, which must exist.
            let Some(reply_queue) = self.channel(id).reply_queue.clone() else {
                self.fail(
                    id,
                    AmqpError::channel(code::PRECONDITION_FAILED, "fast reply consumer does not exist")
                        .at(ids::BASIC_PUBLISH),
                );
                return;
            };
            // Not shared yet: no copy is made.
            let message = Arc::make_mut(&mut message);
            message.properties = std::mem::take(&mut message.properties).with_reply_to(short(&reply_queue));
            message.raw_properties = None;
        }
        // Only the connection knows who published; the broker checks the rest as it takes the message.
        if let Err(e) = client_input::check_user_id(&message, &self.username) {
            self.fail(id, AmqpError::from(e).at(ids::BASIC_PUBLISH));
            return;
        }
        if tx {
            // The broker takes the message at commit, but its properties are checked and the exchange must exist
            // now, at publish.
            if let Err(e) = client_input::check_message(&message) {
                self.fail(id, AmqpError::from(e).at(ids::BASIC_PUBLISH));
                return;
            }
            let vhost = self.vhost();
            if let Err(e) = vhost.publishable_exchange_cached(&mut self.channel(id).publish_cache, &pending.exchange) {
                self.fail(id, AmqpError::from(e).at(ids::BASIC_PUBLISH));
                return;
            }
            let Some(tx) = self.channel(id).tx() else { return };
            tx.push(TxOp::Publish { exchange: pending.exchange.to_string(), message, mandatory: pending.mandatory });
            return;
        }
        if let Err(e) = self.route_publish(id, &pending.exchange, message, pending.mandatory) {
            self.fail(id, e.at(ids::BASIC_PUBLISH));
        }
    }

    /// Routes one publish; returns the store tickets a caller must wait for when confirms do not
    /// (a transaction's commit), empty otherwise.
    pub(super) fn route_publish(
        &mut self,
        id: u16,
        exchange: &str,
        message: Arc<Message>,
        mandatory: bool,
    ) -> Result<Vec<SyncTicket>, AmqpError> {
        // A publish may depend on earlier acks having reached their queues (a deduplicating queue frees a
        // value on ack), and the fast publish path never passes through `handle_method`.
        self.apply_acks();
        // Borrowed, not cloned (no reference count to touch per publish); only called once open.
        let vhost = self.vhost.as_deref().expect("vhost is set once the connection is open");
        // What a basic.return needs, kept without deep-copying the properties (the usual case has their raw bytes).
        let returned = mandatory.then(|| {
            let raw = message.raw_properties.clone().unwrap_or_else(|| codec::encode_properties(&message.properties));
            (Arc::clone(&message.routing_key), raw, message.body.clone())
        });
        // The channel's cache: the exchange is looked up only when this channel last published elsewhere,
        // or that exchange was deleted since (then this publish gets the 404 of a missing exchange).
        // The channel is looked up once; the frames below go to `self.out`, a field of its own.
        let ch = self.channels.get_mut(&id).expect("channel checked by caller");
        let result = vhost.publish_cached(&mut ch.publish_cache, exchange, message)?;
        self.yield_to_consumers |= result.backlogged;
        ch.record_publish(exchange, result.routed, mandatory);
        if !result.routed {
            if mandatory { &counters::RETURN_UNROUTABLE } else { &counters::DROP_UNROUTABLE }.inc();
        }
        if let Some((routing_key, raw, body)) = returned.filter(|_| !result.routed) {
            self.out.method(
                id,
                &Method::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: code::NO_ROUTE,
                    reply_text: short("NO_ROUTE"),
                    exchange: short(exchange),
                    routing_key: short(&routing_key),
                })),
            );
            self.out.content(id, &raw, &body, self.frame_max);
        }
        let epoch = ch.epoch;
        let Some(confirms) = ch.confirms() else { return Ok(result.durable) };
        match confirms.published(result.rejected, !result.durable.is_empty()) {
            // Confirmed only once every durable queue's copy is fsynced.
            Confirm::AwaitFsync(seq) => {
                self.fsyncs.wait(id, epoch, seq, result.durable);
            }
            other => self.send_confirm(id, other),
        }
        Ok(Vec::new())
    }
}
