//! What a worker declares besides its queue and DLQ: where delayed retries wait (the delayed-message
//! exchange or TTL retry queues) and a subscription's bindings (topic, or topic then headers filter).

use crate::bus::Bus;
use crate::error::Result;
use crate::filter::Filter;
use crate::retry::RetryPolicy;
use crate::transport::{Declaration, ExchangeKind};
use crate::wire::{AMQPValue, FieldTable, LongString, ShortString};

/// The TTL queue of delayed retry round `round`.
pub(super) fn retry_queue(queue: &str, round: u32) -> String {
    format!("{queue}.retry.{round}")
}

/// Declares where delayed retries wait. With a delayed-message exchange (Mailroom): the exchange,
/// and a binding from it to `queue` keyed by the queue's name; returns the exchange's name. Without
/// one (RabbitMQ without the plugin): one TTL queue per round, `<queue>.retry.<n>`, whose expired
/// messages dead-letter back to `queue`; returns `None`.
pub(super) async fn declare_retry_topology(bus: &Bus, queue: &str, retry: &RetryPolicy) -> Result<Option<String>> {
    if retry.delayed == 0 {
        return Ok(None);
    }
    if bus.transport().has_delayed_exchange() {
        let exchange = bus.config().delayed_exchange.clone();
        bus.declare(Declaration::Exchange { name: exchange.clone(), kind: ExchangeKind::Delayed }).await?;
        bus.declare(Declaration::Bind {
            queue: queue.to_owned(),
            exchange: exchange.clone(),
            routing_key: queue.to_owned(),
            arguments: FieldTable::default(),
        })
        .await?;
        return Ok(Some(exchange));
    }
    for round in 0..retry.delayed {
        let mut args = FieldTable::default();
        let ttl = retry.ceiling(round).as_millis() as u32;
        args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongUInt(ttl));
        args.insert(ShortString::from("x-dead-letter-exchange"), AMQPValue::LongString(LongString::from("")));
        args.insert(ShortString::from("x-dead-letter-routing-key"), AMQPValue::LongString(LongString::from(queue)));
        bus.quorum(&mut args);
        bus.declare(Declaration::Queue { name: retry_queue(queue, round), durable: true, arguments: args }).await?;
    }
    Ok(None)
}

/// Binds a subscription's queue to the events exchange, one binding per topic pattern; a filter whose
/// header equalities can be a binding puts a per-group headers exchange (`<queue>.filter`) in between,
/// so only matching events reach the queue. No patterns: nothing to declare.
pub(super) async fn declare_subscription(
    bus: &Bus,
    queue: &str,
    bindings: &[String],
    filter: Option<&Filter>,
) -> Result<()> {
    if bindings.is_empty() {
        return Ok(());
    }
    bus.ensure_events_exchange().await?;
    let events = bus.config().events_exchange.clone();
    match filter.and_then(Filter::binding_arguments) {
        Some(args) => {
            // Topic first, then a per-group headers exchange: only matching events reach the queue.
            let hx = format!("{}.filter", queue);
            bus.declare(Declaration::Exchange { name: hx.clone(), kind: ExchangeKind::Headers }).await?;
            for pattern in bindings {
                bus.declare(Declaration::BindExchange {
                    destination: hx.clone(),
                    source: events.clone(),
                    routing_key: pattern.clone(),
                })
                .await?;
            }
            bus.declare(Declaration::Bind {
                queue: queue.to_owned(),
                exchange: hx,
                routing_key: String::new(),
                arguments: args,
            })
            .await?;
        }
        None => {
            for pattern in bindings {
                bus.declare(Declaration::Bind {
                    queue: queue.to_owned(),
                    exchange: events.clone(),
                    routing_key: pattern.clone(),
                    arguments: FieldTable::default(),
                })
                .await?;
            }
        }
    }
    Ok(())
}
