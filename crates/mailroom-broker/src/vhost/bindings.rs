//! The vhost's bindings: `queue.bind`/`unbind` and `exchange.bind`/`unbind`, saved when both ends are durable.

use super::VHost;
use crate::error::{BrokerError, ErrorKind, Result};
use crate::exchange::{Destination, Exchange};
use crate::queue::ConnectionId;
use crate::store::{BindingDef, Change, DestinationKind};
use amq_protocol_types::FieldTable;
use std::sync::Arc;

impl VHost {
    fn check_bindable_source(&self, source: &str) -> Result<Arc<Exchange>> {
        if source.is_empty() {
            return Err(BrokerError::access_refused("operation not permitted on the default exchange"));
        }
        self.exchange(source)
    }

    /// `queue.bind`.
    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        owner: ConnectionId,
    ) -> Result<()> {
        let q = self.queue(queue, owner)?;
        let ex = self.check_bindable_source(exchange)?;
        self.add_binding(&ex, Destination::Queue(q), routing_key, arguments)
    }

    /// `queue.unbind` (a missing binding is fine).
    pub fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        owner: ConnectionId,
    ) -> Result<()> {
        // Unbinding from or to something missing succeeds, as RabbitMQ.
        let q = match self.queue(queue, owner) {
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        let ex = match self.check_bindable_source(exchange) {
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        self.remove_binding(&ex, &Destination::Queue(q), routing_key, arguments)
    }

    /// `exchange.bind`: messages from `source` also go to `destination`.
    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let dest = self.check_bindable_source(destination)?;
        let src = self.check_bindable_source(source)?;
        self.add_binding(&src, Destination::Exchange(dest), routing_key, arguments)
    }

    /// `exchange.unbind`.
    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let (dest, src) = match (self.check_bindable_source(destination), self.check_bindable_source(source)) {
            (Ok(d), Ok(s)) => (d, s),
            (Err(e), _) | (_, Err(e)) if e.kind == ErrorKind::NotFound => return Ok(()),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        self.remove_binding(&src, &Destination::Exchange(dest), routing_key, arguments)
    }

    /// Adds a binding; saves the definitions when both ends are durable.
    fn add_binding(
        &self,
        source: &Arc<Exchange>,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let Some(d) = self.durability.as_ref().filter(|_| source.spec().durable && dest.is_durable()) else {
            return source.bind(dest, routing_key, arguments);
        };
        let def = self.binding_def(source, &dest, routing_key, arguments);
        let seq = {
            let _order = self.binding_log.lock().unwrap_or_else(|p| p.into_inner());
            source.bind(dest, routing_key, arguments)?;
            d.record(Change::PutBinding(def))
        };
        // bind-ok only once the binding is on disk.
        d.commit(seq)
    }

    fn binding_def(
        &self,
        source: &Arc<Exchange>,
        dest: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> BindingDef {
        let (destination, destination_kind) = match dest {
            Destination::Queue(q) => (q.name().to_owned(), DestinationKind::Queue),
            Destination::Exchange(e) => (e.name().to_owned(), DestinationKind::Exchange),
        };
        BindingDef {
            vhost: self.name.clone(),
            source: source.name().to_owned(),
            destination,
            destination_kind,
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        }
    }

    /// Removes a binding if it exists: an auto-delete source left without bindings goes too, and the
    /// definitions are saved when both ends are durable.
    fn remove_binding(
        &self,
        source: &Arc<Exchange>,
        dest: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<()> {
        let durable = self.durability.as_ref().filter(|_| source.spec().durable && dest.is_durable());
        let seq = {
            let _order = self.binding_log.lock().unwrap_or_else(|p| p.into_inner());
            if !source.unbind(dest, routing_key, arguments) {
                return Ok(());
            }
            durable
                .map(|d| (d, d.record(Change::DeleteBinding(self.binding_def(source, dest, routing_key, arguments)))))
        };
        if source.spec().auto_delete && !source.has_bindings() {
            self.remove_exchange(source)?;
        }
        // unbind-ok only once the removal is on disk.
        match seq {
            Some((d, seq)) => d.commit(seq),
            None => Ok(()),
        }
    }
}
