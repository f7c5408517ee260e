//! The `connection` class: the handshake (start, tune, open), then close and update-secret on channel 0.

use super::{method_ids, ClientCapabilities, Connection, Phase};
use crate::codec::{self, connection as conn, AMQPValue, FieldTable, LongString, Method};
use crate::error::{code, AmqpError};
use std::time::Duration;

impl Connection {
    pub(super) fn send_start(&mut self) {
        let cfg = &self.ctx.config;
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        props.insert("cluster_name".into(), text(&cfg.cluster_name));
        props.insert("copyright".into(), text("Copyright (c) the Mailroom authors"));
        props.insert("information".into(), text(&cfg.information));
        props.insert("platform".into(), text(&format!("Mailroom {} (Rust)", env!("CARGO_PKG_VERSION"))));
        props.insert("product".into(), text(&cfg.product));
        props.insert("version".into(), text(&cfg.product_version));
        self.send(
            0,
            Method::Connection(conn::AMQPMethod::Start(conn::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: LongString::from(self.mechanisms().as_bytes().to_vec()),
                locales: LongString::from(b"en_US".to_vec()),
            })),
        );
    }

    /// The SASL mechanisms offered: EXTERNAL only over TLS with a verified client certificate.
    fn mechanisms(&self) -> &'static str {
        if self.external_login.is_some() {
            "PLAIN AMQPLAIN EXTERNAL"
        } else {
            "PLAIN AMQPLAIN"
        }
    }

    /// Handles a method on channel 0 before the connection is open, by phase.
    pub(super) fn handle_handshake(&mut self, method: Method) -> Result<(), AmqpError> {
        match (self.phase, method) {
            (Phase::AwaitStartOk, Method::Connection(conn::AMQPMethod::StartOk(ok))) => self.start_ok(ok),
            (Phase::AwaitTuneOk, Method::Connection(conn::AMQPMethod::TuneOk(ok))) => self.tune_ok(ok),
            (Phase::AwaitOpen, Method::Connection(conn::AMQPMethod::Open(open))) => {
                let vhost = crate::authz::open_vhost(&self.ctx.broker, &self.username, open.virtual_host.as_str())?;
                self.register(vhost.name())?;
                tracing::info!(peer = %self.peer, user = %self.username, vhost = %vhost.name(), "connection authenticated and granted access to vhost");
                self.vhost = Some(vhost);
                self.phase = Phase::Open;
                self.send(0, Method::Connection(conn::AMQPMethod::OpenOk(conn::OpenOk {})));
                Ok(())
            }
            (_, Method::Connection(conn::AMQPMethod::Close(_))) => {
                self.answer_connection_close();
                Ok(())
            }
            (_, other) => {
                let (c, m) = method_ids(&other);
                Err(AmqpError::connection(
                    code::COMMAND_INVALID,
                    format!("unexpected method {c}.{m} during the handshake"),
                ))
            }
        }
    }

    /// `connection.start-ok`: the client's capabilities and credentials; tune follows if they are good.
    fn start_ok(&mut self, ok: conn::StartOk) -> Result<(), AmqpError> {
        if let Some(AMQPValue::FieldTable(caps)) = ok.client_properties.inner().get("capabilities") {
            let flag = |name: &str| matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)));
            self.registry.client_properties = ok.client_properties.clone();
            self.capabilities = ClientCapabilities {
                consumer_cancel_notify: flag("consumer_cancel_notify"),
                authentication_failure_close: flag("authentication_failure_close"),
                connection_blocked: flag("connection.blocked"),
            };
        }
        let mechanism = ok.mechanism.as_str();
        let authenticated = match (mechanism, &self.external_login) {
            ("PLAIN" | "AMQPLAIN", _) => {
                crate::authz::login(&self.ctx.broker, mechanism, ok.response.as_bytes(), self.peer)
            }
            // The response (an optional authorization identity) is ignored, as RabbitMQ does.
            ("EXTERNAL", Some(name)) => crate::authz::login_external(&self.ctx.broker, name, self.peer),
            _ => {
                return Err(AmqpError::connection(
                    code::COMMAND_INVALID,
                    format!("unknown authentication mechanism '{mechanism}'"),
                ))
            }
        };
        let authenticated = authenticated.ok().map(|u| u.name);
        match authenticated {
            Some(name) => {
                self.username = name;
                self.phase = Phase::AwaitTuneOk;
                let cfg = &self.ctx.config;
                self.send(
                    0,
                    Method::Connection(conn::AMQPMethod::Tune(conn::Tune {
                        channel_max: cfg.channel_max,
                        frame_max: cfg.frame_max,
                        heartbeat: cfg.heartbeat,
                    })),
                );
                Ok(())
            }
            None => {
                // authz::login logged the refusal with its reason.
                self.login_refused = true;
                let err = AmqpError::connection(
                    code::ACCESS_REFUSED,
                    format!("Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."),
                );
                if self.capabilities.authentication_failure_close {
                    Err(err)
                } else {
                    // Older clients get the socket closed, as RabbitMQ does.
                    self.phase = Phase::Closed;
                    Ok(())
                }
            }
        }
    }

    /// `connection.tune-ok`: the client's frame_max, channel_max and heartbeat, within our limits.
    fn tune_ok(&mut self, ok: conn::TuneOk) -> Result<(), AmqpError> {
        let cfg = &self.ctx.config;
        let frame_max = if ok.frame_max == 0 { cfg.frame_max } else { ok.frame_max };
        if frame_max < codec::FRAME_MIN_SIZE {
            return Err(AmqpError::connection(
                code::NOT_ALLOWED,
                format!("frame_max={frame_max} < {} min size", codec::FRAME_MIN_SIZE),
            ));
        }
        if frame_max > cfg.frame_max {
            return Err(AmqpError::connection(
                code::NOT_ALLOWED,
                format!("frame_max={frame_max} > {} max size", cfg.frame_max),
            ));
        }
        let channel_max = if ok.channel_max == 0 { cfg.channel_max } else { ok.channel_max };
        if channel_max > cfg.channel_max {
            return Err(AmqpError::connection(
                code::NOT_ALLOWED,
                format!("channel_max={channel_max} > {} max", cfg.channel_max),
            ));
        }
        self.frame_max = frame_max;
        self.channel_max = channel_max;
        self.heartbeat = Duration::from_secs(ok.heartbeat as u64);
        self.phase = Phase::AwaitOpen;
        Ok(())
    }

    pub(super) fn handle_connection_method(&mut self, method: Method) -> Result<(), AmqpError> {
        match method {
            Method::Connection(conn::AMQPMethod::Close(_)) => {
                self.answer_connection_close();
                Ok(())
            }
            Method::Connection(conn::AMQPMethod::CloseOk(_)) => {
                self.phase = Phase::Closed;
                Ok(())
            }
            Method::Connection(conn::AMQPMethod::UpdateSecret(_)) => {
                // PLAIN secrets carry no expiry; accepting the new one is all there is to do.
                self.send(0, Method::Connection(conn::AMQPMethod::UpdateSecretOk(conn::UpdateSecretOk {})));
                Ok(())
            }
            Method::Connection(_) => Err(AmqpError::connection(code::COMMAND_INVALID, "unexpected connection method")),
            _ => Err(AmqpError::connection(code::CHANNEL_ERROR, "expected 'connection.*' method on channel 0")),
        }
    }
}
