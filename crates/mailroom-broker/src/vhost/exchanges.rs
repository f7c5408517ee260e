//! The vhost's exchanges: declaring (with redeclare equivalence and saving), deleting with their
//! bindings, and the release task of a delayed exchange.

use super::{read, write, Claimed, VHost};
use crate::args;
use crate::error::{BrokerError, ErrorKind, Result};
use crate::exchange::flavor::delayed::{run_release, DelayedMessages, Routed};
use crate::exchange::flavor::ExchangeFlavor;
use crate::exchange::{Destination, Exchange, ExchangeKind, ExchangeSpec};
use crate::store::{Change, ExchangeDef};
use amq_protocol_types::FieldTable;
use std::sync::{Arc, Weak};

/// Options of `exchange.declare`.
#[derive(Debug, Clone, Default)]
pub struct ExchangeOptions {
    /// Only check that it exists.
    pub passive: bool,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Not publishable by clients.
    pub internal: bool,
    /// Declared arguments (`alternate-exchange`).
    pub arguments: FieldTable,
}

impl VHost {
    /// `exchange.declare`.
    pub fn declare_exchange(&self, name: &str, kind: &str, options: &ExchangeOptions) -> Result<()> {
        if options.passive {
            return self.exchange(name).map(|_| ());
        }
        let type_name = kind;
        let (kind, flavor) = ExchangeFlavor::parse(type_name, &options.arguments)?;
        let reserved =
            || BrokerError::access_refused(format!("exchange name '{name}' contains reserved prefix 'amq.*'"));
        if name.is_empty() {
            return Err(reserved());
        }
        let alternate_exchange = match options.arguments.inner().get("alternate-exchange") {
            None => None,
            Some(v) => Some(args::string_value(v).ok_or_else(|| {
                BrokerError::precondition(format!(
                    "invalid arg 'alternate-exchange' for exchange '{name}' in vhost '{}': {{unacceptable_type,{}}}",
                    self.name,
                    args::type_name(v)
                ))
            })?),
        };
        if let Some(existing) = read(&self.exchanges).get(name).cloned() {
            return self.redeclare_exchange(&existing, type_name, kind, options, alternate_exchange);
        }
        // Existing `amq.*` exchanges may be redeclared equivalently; new ones may not be created.
        if name.starts_with("amq.") {
            return Err(reserved());
        }
        let spec = ExchangeSpec {
            name: name.to_owned(),
            kind,
            durable: options.durable,
            auto_delete: options.auto_delete,
            internal: options.internal,
            arguments: options.arguments.clone(),
            alternate_exchange,
            flavor,
        };
        let change = {
            let _claim = self.claims.claim(Claimed::Exchange, name);
            // Another declare of the name may have won while this one waited for the claim.
            if let Some(existing) = read(&self.exchanges).get(name).cloned() {
                let alternate_exchange = spec.alternate_exchange.clone();
                return self.redeclare_exchange(&existing, type_name, kind, options, alternate_exchange);
            }
            let exchange = Arc::new(Exchange::new(spec));
            // Outside the map's lock: a delayed or deduplicating exchange's store may be recovered here.
            let generation = self.open_exchange_stores(&exchange)?;
            if let Some(delayed) = exchange.flavor().delayed() {
                tokio::spawn(run_delayed_release(
                    self.myself.clone(),
                    Arc::downgrade(&exchange),
                    Arc::clone(delayed),
                    self.durability.as_ref().map(|d| d.recovering()),
                ));
            }
            let mut exchanges = write(&self.exchanges);
            let change = self.durability.as_ref().zip(generation).map(|(d, generation)| {
                let s = exchange.spec();
                let def = ExchangeDef {
                    vhost: self.name.clone(),
                    name: s.name.clone(),
                    kind: s.type_name().to_owned(),
                    auto_delete: s.auto_delete,
                    internal: s.internal,
                    arguments: s.arguments.clone(),
                    generation,
                };
                // Under the map lock: the log orders this declare and a deletion of the name as memory does.
                (d, d.record(Change::PutExchange(def)))
            });
            exchanges.insert(name.to_owned(), exchange);
            change
        };
        // declare-ok only once the exchange is on disk.
        match change {
            Some((d, seq)) => d.commit(seq),
            None => Ok(()),
        }
    }

    /// A declare of an exchange that exists: it must be equivalent (type, flags, alternate exchange).
    fn redeclare_exchange(
        &self,
        existing: &Exchange,
        type_name: &str,
        kind: ExchangeKind,
        options: &ExchangeOptions,
        alternate_exchange: Option<String>,
    ) -> Result<()> {
        let s = existing.spec();
        let name = existing.name();
        let mismatch = |field: &str, received: String, current: String| {
            Err(BrokerError::precondition(format!(
                "inequivalent arg '{field}' for exchange '{name}' in vhost '{}': received '{received}' but current is '{current}'",
                self.name
            )))
        };
        if s.type_name() != type_name || s.kind != kind {
            return mismatch("type", type_name.into(), s.type_name().into());
        }
        if s.durable != options.durable {
            return mismatch("durable", options.durable.to_string(), s.durable.to_string());
        }
        if s.auto_delete != options.auto_delete {
            return mismatch("auto_delete", options.auto_delete.to_string(), s.auto_delete.to_string());
        }
        if s.internal != options.internal {
            return mismatch("internal", options.internal.to_string(), s.internal.to_string());
        }
        if s.alternate_exchange != alternate_exchange {
            return mismatch(
                "alternate-exchange",
                alternate_exchange.unwrap_or_default(),
                s.alternate_exchange.clone().unwrap_or_default(),
            );
        }
        Ok(())
    }

    /// Opens (or, for a saved exchange being recovered, recovers) a durable exchange's stores; returns the
    /// generation to save it with, None for a transient exchange or a broker without a data directory.
    fn open_exchange_stores(&self, exchange: &Exchange) -> Result<Option<u64>> {
        let Some(d) = self.durability.as_ref().filter(|_| exchange.spec().durable) else { return Ok(None) };
        let name = exchange.name();
        // A saved exchange not in memory is being recovered: it keeps its generation (store directory).
        let generation = match d.saved_exchange_generation(&self.name, name) {
            Some(g) => (g, false),
            None => (d.new_generation(), true),
        };
        exchange.flavor().attach(d, &self.name, exchange.spec(), generation).map_err(|e| {
            BrokerError::new(
                ErrorKind::ResourceError,
                format!("cannot open the store of exchange '{name}' in vhost '{}': {e}", self.name),
            )
        })?;
        Ok(Some(generation.0))
    }

    /// `exchange.delete`. A missing exchange is fine (RabbitMQ answers delete-ok).
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(BrokerError::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let Some(exchange) = read(&self.exchanges).get(name).cloned() else { return Ok(()) };
        if if_unused && exchange.has_bindings() {
            return Err(BrokerError::precondition(format!("exchange '{name}' in vhost '{}' in use", self.name)));
        }
        self.remove_exchange(&exchange)
    }

    /// Removes an exchange with its bindings (and auto-delete exchanges left without any); returns once the
    /// deletion is on disk.
    pub(super) fn remove_exchange(&self, exchange: &Arc<Exchange>) -> Result<()> {
        let mut seq = None;
        {
            let mut exchanges = write(&self.exchanges);
            match exchanges.get(exchange.name()) {
                Some(e) if Arc::ptr_eq(e, exchange) => {
                    exchanges.remove(exchange.name());
                    // Under the map lock, so a re-declare of the name is logged after this deletion.
                    if let Some(d) = self.durability.as_ref().filter(|_| exchange.spec().durable) {
                        seq = Some((
                            d,
                            d.record(Change::DeleteExchange {
                                vhost: self.name.clone(),
                                name: exchange.name().to_owned(),
                            }),
                        ));
                    }
                }
                _ => return Ok(()),
            }
        }
        exchange.mark_deleted();
        let cascade = self.unbind_everywhere(&Destination::Exchange(Arc::clone(exchange)));
        if let Some((d, seq)) = seq {
            d.commit(seq)?;
        }
        cascade
    }

    /// Removes every binding leading to `destination`, then auto-deletes exchanges left without bindings.
    pub(super) fn unbind_everywhere(&self, destination: &Destination) -> Result<()> {
        let mut emptied = Vec::new();
        for ex in self.exchanges() {
            if ex.unbind_destination(destination) > 0 && ex.spec().auto_delete && !ex.has_bindings() {
                emptied.push(ex);
            }
        }
        let mut result = Ok(());
        for ex in emptied {
            result = result.and(self.remove_exchange(&ex));
        }
        result
    }
}

/// Releases a delayed exchange's messages when due, routing each by the exchange's underlying type.
/// Holds only weak handles, so it ends when the exchange or vhost goes.
async fn run_delayed_release(
    vhost: Weak<VHost>,
    exchange: Weak<Exchange>,
    delayed: Arc<DelayedMessages>,
    recovering: Option<tokio::sync::watch::Receiver<bool>>,
) {
    run_release(delayed, recovering, move |message| {
        let (v, ex) = (vhost.upgrade()?, exchange.upgrade()?);
        let r = (!ex.is_deleted()).then(|| v.route_and_enqueue(&ex, message))?;
        Some(Routed { durable: r.durable, stored_in: r.stored_in, refused: r.refused })
    })
    .await
}
