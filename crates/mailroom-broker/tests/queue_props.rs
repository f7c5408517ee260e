//! State-machine property test of one queue against a model: random publish / get / ack / reject / purge
//! sequences (and, in a priority queue, random priorities).
//!
//! Invariants checked after every step: the ready and unacked counts match the model; `get` returns the
//! model's head (priority first, then publish order, requeued messages back at their original place) with
//! the right `redelivered` flag; purge drops exactly the ready messages. At the end every published
//! message is accounted for exactly once: acked, dropped (reject without requeue, purge), unacked, or
//! still ready, in order.

use bytes::Bytes;
use mailroom_broker::{AMQPValue, BasicProperties, Broker, BrokerConfig, FieldTable, Message, MessageId, QueueOptions};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone)]
enum Op {
    Publish {
        priority: Option<u8>,
    },
    Get,
    Ack(usize),
    Reject {
        pick: usize,
        requeue: bool,
    },
    /// Settle several unacked at once (as a multiple ack/nack does).
    SettleMany {
        count: usize,
        ack: bool,
        requeue: bool,
    },
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::option::of(0u8..12).prop_map(|priority| Op::Publish { priority }),
        4 => Just(Op::Get),
        2 => any::<usize>().prop_map(Op::Ack),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, requeue)| Op::Reject { pick, requeue }),
        1 => (1usize..4, any::<bool>(), any::<bool>()).prop_map(|(count, ack, requeue)| Op::SettleMany { count, ack, requeue }),
        1 => Just(Op::Purge),
    ]
}

/// Where a message sits in the ready list: (255 - effective priority, publish sequence).
type Key = (u8, u64);

#[derive(Default)]
struct Model {
    max_priority: Option<u8>,
    next_seq: u64,
    ready: BTreeMap<Key, ()>,
    /// Unacked, in the order they were taken: (queue id, key).
    unacked: Vec<(MessageId, Key)>,
    requeued_once: HashSet<u64>,
    acked: Vec<u64>,
    dropped: Vec<u64>,
}

impl Model {
    fn key(&self, seq: u64, priority: Option<u8>) -> Key {
        match self.max_priority {
            Some(max) => (255 - priority.unwrap_or(0).min(max), seq),
            None => (255, seq),
        }
    }
}

fn run(ops: Vec<Op>, max_priority: Option<u8>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let broker = Broker::open(BrokerConfig::default()).unwrap();
    let vhost = broker.vhost("/").unwrap();
    let owner = broker.next_connection_id();
    let mut args = FieldTable::default();
    if let Some(p) = max_priority {
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(p));
    }
    vhost.declare_queue("prop", &QueueOptions { arguments: args, ..Default::default() }, owner).unwrap();
    let q = vhost.queue("prop", owner).unwrap();
    let mut m = Model { max_priority, ..Default::default() };
    let mut priorities: HashMap<u64, Option<u8>> = HashMap::new();

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Publish { priority } => {
                let seq = m.next_seq;
                m.next_seq += 1;
                let mut props = BasicProperties::default();
                if let Some(p) = priority {
                    props = props.with_priority(p);
                }
                let msg = Message::new("", "prop", props, Bytes::from(seq.to_be_bytes().to_vec()));
                let r = vhost.publish("", msg).unwrap();
                prop_assert!(r.routed && !r.rejected);
                priorities.insert(seq, priority);
                let key = m.key(seq, priority);
                m.ready.insert(key, ());
            }
            Op::Get => {
                let got = q.get(false);
                let expected = m.ready.keys().next().copied();
                match (got, expected) {
                    (None, None) => {}
                    (Some(g), Some(key)) => {
                        let seq = u64::from_be_bytes(g.message.body[..].try_into().unwrap());
                        prop_assert_eq!(seq, key.1, "step {}: get returned the wrong message", step);
                        prop_assert_eq!(
                            g.redelivered,
                            m.requeued_once.contains(&seq),
                            "step {}: redelivered flag",
                            step
                        );
                        m.ready.remove(&key);
                        prop_assert_eq!(g.remaining as usize, m.ready.len());
                        m.unacked.push((g.id, key));
                    }
                    (got, expected) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: get gave {:?}, model expected {expected:?}",
                            got.map(|g| g.id)
                        )))
                    }
                }
            }
            Op::Ack(pick) => {
                if !m.unacked.is_empty() {
                    let (id, key) = m.unacked.remove(pick % m.unacked.len());
                    q.ack(&[id]);
                    m.acked.push(key.1);
                }
            }
            Op::Reject { pick, requeue } => {
                if !m.unacked.is_empty() {
                    let (id, key) = m.unacked.remove(pick % m.unacked.len());
                    q.reject(&[id], requeue);
                    settle_model(&mut m, key, false, requeue);
                }
            }
            Op::SettleMany { count, ack, requeue } => {
                let n = count.min(m.unacked.len());
                let taken: Vec<_> = m.unacked.drain(..n).collect();
                let ids: Vec<MessageId> = taken.iter().map(|(id, _)| *id).collect();
                if ack {
                    q.ack(&ids);
                } else {
                    q.reject(&ids, requeue);
                }
                for (_, key) in taken {
                    settle_model(&mut m, key, ack, requeue);
                }
            }
            Op::Purge => {
                let n = q.purge();
                prop_assert_eq!(n as usize, m.ready.len(), "step {}: purge count", step);
                let purged: Vec<u64> = m.ready.keys().map(|k| k.1).collect();
                m.dropped.extend(purged);
                m.ready.clear();
            }
        }
        prop_assert_eq!(q.message_count() as usize, m.ready.len(), "step {}: ready count", step);
        prop_assert_eq!(q.unacked_count() as usize, m.unacked.len(), "step {}: unacked count", step);
    }

    // Drain what is left: exactly the model's ready list, in order.
    let mut rest = Vec::new();
    while let Some(g) = q.get(true) {
        rest.push(u64::from_be_bytes(g.message.body[..].try_into().unwrap()));
    }
    let expected_rest: Vec<u64> = m.ready.keys().map(|k| k.1).collect();
    prop_assert_eq!(&rest, &expected_rest, "remaining ready messages and their order");

    // Accounting: every published message is in exactly one place.
    let mut seen = HashSet::new();
    let unacked: Vec<u64> = m.unacked.iter().map(|(_, k)| k.1).collect();
    for seq in m.acked.iter().chain(&m.dropped).chain(&unacked).chain(&rest) {
        prop_assert!(seen.insert(*seq), "message {} accounted twice", seq);
    }
    prop_assert_eq!(seen.len() as u64, m.next_seq, "a published message went missing");
    Ok(())
}

fn settle_model(m: &mut Model, key: Key, ack: bool, requeue: bool) {
    if ack {
        m.acked.push(key.1);
    } else if requeue {
        m.requeued_once.insert(key.1);
        m.ready.insert(key, ());
    } else {
        m.dropped.push(key.1);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fifo_queue_matches_model(ops in proptest::collection::vec(op(), 0..120)) {
        run(ops, None)?;
    }

    #[test]
    fn priority_queue_matches_model(ops in proptest::collection::vec(op(), 0..120), max in 1u8..10) {
        run(ops, Some(max))?;
    }
}
