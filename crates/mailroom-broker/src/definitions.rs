//! The definitions a previous run saved (vhosts, policies, durable exchanges, queues and bindings): loading
//! them from the data directory and replaying them into the vhosts at startup, behind the recovery barrier.
//! What is saved is recorded by the vhost as it changes, through [`Durability::record`].

use crate::error::{BrokerError, ErrorKind, Result};
use crate::policy::{ApplyTo, Policy};
use crate::queue::ConnectionId;
use crate::storage::Durability;
use crate::store::{Definitions, DestinationKind};
use crate::vhost::{ExchangeOptions, QueueOptions, VHost};
use std::collections::HashMap;
use std::sync::Arc;

/// The definitions a previous run saved, if there is a data directory and it holds any.
pub fn load(durability: Option<&Durability>) -> Result<Option<Definitions>> {
    let Some(d) = durability else { return Ok(None) };
    d.load_definitions()
        .map_err(|e| BrokerError::new(ErrorKind::ResourceError, format!("cannot read saved definitions: {e}")))
}

/// Re-declares `defs` into `vhosts`, then lets each vhost finish its recovery. Recovery is a barrier:
/// nothing is routed or dropped (TTL, length limits, delivery limits, `x-expires`, delayed releases) until
/// every exchange, queue and binding is back.
pub fn replay(durability: &Durability, vhosts: &HashMap<String, Arc<VHost>>, defs: Definitions) {
    durability.set_recovering(true);
    recover_definitions(vhosts, defs);
    durability.set_recovering(false);
    for v in vhosts.values() {
        v.finish_recovery();
    }
}

/// Re-declares the durable exchanges, queues (with their stored messages) and bindings of a previous run.
fn recover_definitions(vhosts: &HashMap<String, Arc<VHost>>, defs: Definitions) {
    // Recovered resources belong to no connection.
    const NO_OWNER: ConnectionId = 0;
    for p in defs.policies {
        let Some(v) = vhosts.get(&p.vhost) else { continue };
        let policy = ApplyTo::parse(&p.apply_to)
            .and_then(|apply_to| Policy::new(&p.name, &p.pattern, apply_to, p.priority, p.definition));
        match policy {
            Ok(policy) => v.set_policy(policy),
            Err(err) => tracing::warn!(policy = %p.name, error = %err, "cannot recover policy"),
        }
    }
    for e in defs.exchanges {
        let Some(v) = vhosts.get(&e.vhost) else { continue };
        let options = ExchangeOptions {
            durable: true,
            auto_delete: e.auto_delete,
            internal: e.internal,
            arguments: e.arguments,
            ..Default::default()
        };
        if let Err(err) = v.declare_exchange(&e.name, &e.kind, &options) {
            tracing::warn!(exchange = %e.name, error = %err, "cannot recover exchange");
        }
    }
    for q in defs.queues {
        let Some(v) = vhosts.get(&q.vhost) else { continue };
        let options =
            QueueOptions { durable: true, auto_delete: q.auto_delete, arguments: q.arguments, ..Default::default() };
        match v.declare_queue(&q.name, &options, NO_OWNER) {
            Ok(ok) => tracing::info!(queue = %q.name, messages = ok.message_count, "recovered queue"),
            Err(err) => tracing::warn!(queue = %q.name, error = %err, "cannot recover queue"),
        }
    }
    for b in defs.bindings {
        let Some(v) = vhosts.get(&b.vhost) else { continue };
        let result = match b.destination_kind {
            DestinationKind::Queue => v.bind_queue(&b.destination, &b.source, &b.routing_key, &b.arguments, NO_OWNER),
            DestinationKind::Exchange => v.bind_exchange(&b.destination, &b.source, &b.routing_key, &b.arguments),
        };
        if let Err(err) = result {
            tracing::warn!(source = %b.source, destination = %b.destination, error = %err, "cannot recover binding");
        }
    }
}

#[cfg(test)]
mod tests;
