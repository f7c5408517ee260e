//! The dead-letter settling loop: deaths that queue operations output are routed to their queues'
//! dead-letter exchanges, the copies pushed onto the target queues, and the source records settled once
//! the copies are safe. Deaths that a push in the loop causes (a full or TTL-0 target) join the same loop,
//! so a long chain of dead-letter queues neither recurses nor re-enters the vhost. While the broker
//! recovers its definitions, deaths wait ([`VHost::finish_recovery`] settles them).

use super::VHost;
use crate::dead_letter;
use crate::message::Message;
use crate::queue::SourceRecords;
use crate::queue::{DeadLetterReason, Deaths, Queue};
use std::collections::VecDeque;
use std::sync::Arc;

impl VHost {
    /// Whether the broker is still re-declaring saved definitions (nothing may be routed meanwhile).
    pub(super) fn is_recovering(&self) -> bool {
        self.durability.as_ref().is_some_and(|d| d.is_recovering())
    }

    /// Ends this vhost's part of recovery, once the broker has re-declared every definition: routes the
    /// dead letters held back meanwhile, then dead-letters recovered messages already past their
    /// delivery limit. Queue timers start by themselves when the broker's recovery flag clears.
    pub(crate) fn finish_recovery(&self) {
        let deferred = std::mem::take(&mut *self.deferred_dead_letters.lock().unwrap_or_else(|p| p.into_inner()));
        self.settle_all_deaths(deferred);
        for q in self.queues() {
            q.dead_letter_over_delivery_limit();
        }
    }

    /// Settles every batch of deaths in `first` and whatever deaths pushing their copies causes, in one
    /// loop (breadth first, in the order they died). Each batch's source records are settled only after the
    /// loop, once every copy it pushed is accounted for ([`SourceRecords::finish`]): a copy stored in a
    /// durable queue is waited for, a refused one is pushed again; a confirmed dead letter is never lost.
    pub(crate) fn settle_all_deaths(&self, first: Vec<Deaths>) {
        if first.is_empty() {
            return;
        }
        let mut pending = VecDeque::from(first);
        let mut moves = Vec::new();
        let mut caused = Vec::new();
        while let Some(deaths) = pending.pop_front() {
            if self.is_recovering() {
                self.deferred_dead_letters.lock().unwrap_or_else(|p| p.into_inner()).push(deaths);
                continue;
            }
            moves.extend(self.dead_letter(deaths, &mut caused));
            pending.extend(caused.drain(..));
        }
        for records in moves {
            records.finish();
        }
    }

    /// Routes one queue's deaths to its dead-letter exchange and pushes the copies, adding the deaths those
    /// pushes cause to `caused`. Returns the source records to finish once the loop is done, or None if they
    /// were settled already (no dead-letter exchange, or a missing one: the messages are dropped silently,
    /// as RabbitMQ drops them).
    fn dead_letter(&self, deaths: Deaths, caused: &mut Vec<Deaths>) -> Option<SourceRecords> {
        let Deaths { queue, dead, records } = deaths;
        let mut records = SourceRecords::new(Arc::clone(&queue), records);
        let args = queue.args();
        let Some((dlx_name, Ok(dlx))) = args.dead_letter_exchange.as_deref().map(|n| (n, self.exchange(n))) else {
            records.finish();
            return None;
        };
        // Grouped by reason, in the order each reason first appears, as the queue used to hand them over.
        let mut work: Vec<(Arc<Queue>, Arc<Message>)> = Vec::new();
        for reason in reasons_in_order(&dead) {
            for (message, _) in dead.iter().filter(|(_, r)| *r == reason) {
                let copy = dead_letter::make_dead_letter(
                    message,
                    dlx_name,
                    queue.name(),
                    reason,
                    args.dead_letter_routing_key.as_deref(),
                );
                let keys = dead_letter::routing_keys(&copy);
                let targets = self.route(&dlx, &keys, copy.headers());
                let copy = Arc::new(copy);
                for target in targets {
                    if dead_letter::check_cycles(reason) && dead_letter::is_cycle(&copy, target.name()) {
                        continue;
                    }
                    work.push((target, Arc::clone(&copy)));
                }
            }
        }
        for (target, copy) in work {
            let outcome = target.push_into(Arc::clone(&copy), caused);
            records.record_push(target, &copy, outcome);
        }
        Some(records)
    }
}

/// The distinct reasons among `dead`, in the order each first appears.
fn reasons_in_order(dead: &[(Arc<Message>, DeadLetterReason)]) -> impl Iterator<Item = DeadLetterReason> {
    let mut reasons: [Option<DeadLetterReason>; 4] = [None; 4];
    let mut n = 0;
    for (_, reason) in dead {
        if n < reasons.len() && !reasons[..n].contains(&Some(*reason)) {
            reasons[n] = Some(*reason);
            n += 1;
        }
    }
    reasons.into_iter().flatten()
}
