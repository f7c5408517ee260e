//! The consistent-hash exchange (`x-consistent-hash`), as RabbitMQ's
//! `rabbitmq_consistent_hash_exchange` plugin (3.8+) does it: each binding's key is its **weight**, a
//! positive integer; the binding owns that many buckets, bucket numbers following binding order; a
//! message goes to exactly one destination, the owner of bucket `jump_hash(hash(value), buckets)`
//! (Lamping and Veach's jump consistent hash). The hashed value is the routing key, or the header named
//! by the exchange's `hash-header` argument. Messages lacking that header all hash the same empty
//! value (one destination), so they are still routed, consistently.
//!
//! What differs from RabbitMQ: the hash function. RabbitMQ hashes with Erlang's `phash2`, which only
//! the Erlang VM computes; here it is FNV-1a (64 bit), stable across restarts, versions and machines,
//! so a key keeps its destination for as long as the bindings stay the same. Which destination a given
//! key lands on therefore differs between the two brokers; the distribution (proportional to weight)
//! and the stability (same key, same bindings: same destination; a new binding moves only about
//! `weight / total` of the keys) are the same. `hash-property` (hashing `message_id`,
//! `correlation_id` or `timestamp`) is refused at declare: the exchange routes on the routing key and
//! headers only.

use amq_protocol_types::{AMQPValue, FieldTable};

/// Exchange type name.
pub const TYPE: &str = "x-consistent-hash";
/// Exchange argument naming the header whose value is hashed instead of the routing key.
pub const HASH_HEADER: &str = "hash-header";
/// Exchange argument naming a message property to hash (not supported: refused at declare).
pub const HASH_PROPERTY: &str = "hash-property";

/// Most buckets one binding may own: a weight is a ring share, not a count of messages, and the bucket
/// table (one pointer per bucket) must stay small.
pub const MAX_WEIGHT: u32 = 10_000;

/// What an `x-consistent-hash` exchange hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// The routing key (the default).
    RoutingKey,
    /// The value of this header.
    Header(String),
}

/// Why a declaration or binding of a consistent-hash exchange is refused (406 PRECONDITION_FAILED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsistentHashError {
    /// The binding key is not a positive integer.
    #[error("The binding key must be an integer: {0:?}")]
    NotAnInteger(String),
    /// The binding key is zero, negative or above [`MAX_WEIGHT`].
    #[error("The binding key must be greater than 0 and at most {MAX_WEIGHT}: {0}")]
    WeightOutOfRange(i64),
    /// Both `hash-header` and `hash-property` given.
    #[error("hash-header and hash-property are mutually exclusive")]
    BothHashArguments,
    /// `hash-header` is not a string.
    #[error("hash-header must be a string")]
    HeaderNotAString,
    /// `hash-property` given (Mailroom hashes routing keys and headers only).
    #[error("hash-property is not supported by Mailroom's x-consistent-hash exchange (use hash-header)")]
    PropertyUnsupported,
}

/// Reads the exchange arguments: what to hash.
pub fn parse_arguments(args: &FieldTable) -> Result<HashOn, ConsistentHashError> {
    let header = args.inner().get(HASH_HEADER);
    let property = args.inner().get(HASH_PROPERTY);
    match (header, property) {
        (Some(_), Some(_)) => Err(ConsistentHashError::BothHashArguments),
        (None, Some(_)) => Err(ConsistentHashError::PropertyUnsupported),
        (Some(h), None) => match h {
            AMQPValue::LongString(s) => Ok(HashOn::Header(String::from_utf8_lossy(s.as_bytes()).into_owned())),
            AMQPValue::ShortString(s) => Ok(HashOn::Header(s.as_str().to_owned())),
            _ => Err(ConsistentHashError::HeaderNotAString),
        },
        (None, None) => Ok(HashOn::RoutingKey),
    }
}

/// A binding key read as a weight.
pub fn parse_weight(binding_key: &str) -> Result<u32, ConsistentHashError> {
    let w: i64 = binding_key.trim().parse().map_err(|_| ConsistentHashError::NotAnInteger(binding_key.to_owned()))?;
    if w < 1 || w > i64::from(MAX_WEIGHT) {
        return Err(ConsistentHashError::WeightOutOfRange(w));
    }
    Ok(w as u32)
}

/// The bucket table: bucket `i` belongs to `buckets[i]`. Rebuilt on bind/unbind (rare); routing only
/// reads it.
#[derive(Debug)]
pub struct HashRing<D> {
    hash_on: HashOn,
    buckets: Vec<D>,
}

impl<D: Clone> HashRing<D> {
    /// An empty ring hashing `hash_on`.
    pub fn new(hash_on: HashOn) -> Self {
        Self { hash_on, buckets: Vec::new() }
    }

    /// Rebuilds the buckets from `(destination, weight)` in binding order.
    pub fn rebuild<'a>(&mut self, bindings: impl IntoIterator<Item = (&'a D, u32)>)
    where
        D: 'a,
    {
        self.buckets.clear();
        for (d, weight) in bindings {
            self.buckets.extend(std::iter::repeat_n(d, weight as usize).cloned());
        }
    }

    /// How many buckets there are (the sum of the weights).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether nothing is bound.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The one destination for a message, or `None` when nothing is bound. No allocation.
    pub fn route(&self, routing_key: &str, headers: Option<&FieldTable>) -> Option<&D> {
        if self.buckets.is_empty() {
            return None;
        }
        let key = match &self.hash_on {
            HashOn::RoutingKey => fnv1a(FNV_OFFSET, routing_key.as_bytes()),
            HashOn::Header(name) => match headers.and_then(|h| h.inner().get(name.as_str())) {
                Some(v) => hash_value(v),
                None => FNV_OFFSET,
            },
        };
        self.buckets.get(jump_hash(key, self.buckets.len() as u32) as usize)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// A header value's hash: strings by their bytes (so a string header hashes as the same routing key
/// would), integers by their decimal digits (so `7` and `"7"` land together, as keys usually are
/// text on one side and numbers on the other), anything else by its debug form (rare, allocates).
fn hash_value(v: &AMQPValue) -> u64 {
    match v {
        AMQPValue::LongString(s) => fnv1a(FNV_OFFSET, s.as_bytes()),
        AMQPValue::ShortString(s) => fnv1a(FNV_OFFSET, s.as_str().as_bytes()),
        other => match crate::args::int_value(other) {
            Some(n) => {
                let mut buf = [0u8; 40];
                fnv1a(FNV_OFFSET, decimal(n, &mut buf))
            }
            None => fnv1a(FNV_OFFSET, format!("{other:?}").as_bytes()),
        },
    }
}

/// `n` in decimal, written into `buf` (no allocation).
fn decimal(n: i128, buf: &mut [u8; 40]) -> &[u8] {
    let negative = n < 0;
    let mut m = n.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if negative {
        // 39 digits at most for |i128::MIN|, so there is room for the sign.
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Jump consistent hash (Lamping, Veach 2014): a bucket in `0..buckets` for `key`; growing the bucket
/// count from n to n+1 moves only about 1/(n+1) of the keys, all to the new bucket.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::LongString;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn ring(weights: &[(&'static str, u32)]) -> HashRing<&'static str> {
        let mut r = HashRing::new(HashOn::RoutingKey);
        r.rebuild(weights.iter().map(|(d, w)| (d, *w)));
        r
    }

    #[test]
    fn weights_are_positive_integers() {
        assert_eq!(parse_weight("3"), Ok(3));
        assert_eq!(parse_weight(" 10 "), Ok(10));
        assert_eq!(parse_weight("0"), Err(ConsistentHashError::WeightOutOfRange(0)));
        assert_eq!(parse_weight("-2"), Err(ConsistentHashError::WeightOutOfRange(-2)));
        assert!(matches!(parse_weight("abc"), Err(ConsistentHashError::NotAnInteger(_))));
        assert!(matches!(parse_weight(""), Err(ConsistentHashError::NotAnInteger(_))));
        assert!(parse_weight("10001").is_err());
    }

    #[test]
    fn arguments() {
        let mut args = FieldTable::default();
        assert_eq!(parse_arguments(&args), Ok(HashOn::RoutingKey));
        args.insert(HASH_HEADER.into(), AMQPValue::LongString(LongString::from("order")));
        assert_eq!(parse_arguments(&args), Ok(HashOn::Header("order".into())));
        args.insert(HASH_PROPERTY.into(), AMQPValue::LongString(LongString::from("message_id")));
        assert_eq!(parse_arguments(&args), Err(ConsistentHashError::BothHashArguments));
        let mut only_property = FieldTable::default();
        only_property.insert(HASH_PROPERTY.into(), AMQPValue::LongString(LongString::from("message_id")));
        assert_eq!(parse_arguments(&only_property), Err(ConsistentHashError::PropertyUnsupported));
        let mut bad = FieldTable::default();
        bad.insert(HASH_HEADER.into(), AMQPValue::LongInt(1));
        assert_eq!(parse_arguments(&bad), Err(ConsistentHashError::HeaderNotAString));
    }

    #[test]
    fn empty_ring_routes_nowhere_and_one_binding_takes_all() {
        assert_eq!(ring(&[]).route("k", None), None);
        let r = ring(&[("q1", 5)]);
        for k in 0..100 {
            assert_eq!(r.route(&k.to_string(), None), Some(&"q1"));
        }
    }

    /// Pinned values: the hash must never change between versions (a key moving to another queue
    /// breaks per-key ordering across an upgrade).
    #[test]
    fn hash_is_stable() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(jump_hash(0, 1), 0);
        // Computed independently (a Python FNV-1a + jump hash), not by this code.
        let r = ring(&[("q1", 1), ("q2", 1), ("q3", 1), ("q4", 1)]);
        let got: Vec<&str> = (1..=5).map(|i| *r.route(&format!("order-{i}"), None).unwrap()).collect();
        assert_eq!(got, ["q2", "q1", "q3", "q2", "q1"]);
        let buckets: Vec<u32> =
            (0..5).map(|i| jump_hash(fnv1a(FNV_OFFSET, format!("k{i}").as_bytes()), 1000)).collect();
        assert_eq!(buckets, [589, 19, 124, 304, 215]);
    }

    #[test]
    fn distribution_follows_weights() {
        let r = ring(&[("a", 1), ("b", 2), ("c", 1)]);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        let n = 40_000;
        for k in 0..n {
            *counts.entry(*r.route(&format!("key-{k}"), None).unwrap()).or_default() += 1;
        }
        let share = |d: &str| f64::from(counts[d]) / f64::from(n);
        assert!((share("a") - 0.25).abs() < 0.02, "{counts:?}");
        assert!((share("b") - 0.50).abs() < 0.02, "{counts:?}");
        assert!((share("c") - 0.25).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn adding_a_binding_moves_only_its_share() {
        let before = ring(&[("a", 1), ("b", 1), ("c", 1)]);
        let after = ring(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        let n = 20_000;
        let mut moved = 0;
        for k in 0..n {
            let key = format!("key-{k}");
            let (x, y) = (before.route(&key, None).unwrap(), after.route(&key, None).unwrap());
            if x != y {
                assert_eq!(*y, "d", "a key only ever moves to the new binding");
                moved += 1;
            }
        }
        let share = f64::from(moved) / f64::from(n);
        assert!((share - 0.25).abs() < 0.02, "moved {share}");
    }

    #[test]
    fn header_hashing() {
        let mut r = HashRing::new(HashOn::Header("order".into()));
        r.rebuild([(&"a", 1), (&"b", 1), (&"c", 1)]);
        let headers = |v: AMQPValue| {
            let mut t = FieldTable::default();
            t.insert("order".into(), v);
            t
        };
        for k in 0..200i64 {
            let as_text = headers(AMQPValue::LongString(LongString::from(k.to_string().as_str())));
            let as_int = headers(AMQPValue::LongLongInt(k));
            let by_header = r.route("ignored", Some(&as_text));
            assert_eq!(by_header, r.route("other", Some(&as_text)), "the routing key does not matter");
            assert_eq!(by_header, r.route("x", Some(&as_int)), "7 and \"7\" hash alike");
        }
        // No header: always the same destination.
        let none = r.route("k1", None);
        assert!(none.is_some());
        assert_eq!(none, r.route("k2", Some(&FieldTable::default())));
    }

    #[test]
    fn decimal_digits() {
        let mut buf = [0u8; 40];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(-42, &mut buf), b"-42");
        assert_eq!(decimal(i64::MIN.into(), &mut buf), b"-9223372036854775808");
        assert_eq!(decimal(i128::MIN, &mut buf), i128::MIN.to_string().as_bytes());
    }

    proptest! {
        /// Jump hash stays in range and moves keys only to the new bucket when one is added.
        #[test]
        fn jump_hash_is_monotone(key in any::<u64>(), n in 1u32..500) {
            let b = jump_hash(key, n);
            prop_assert!(b < n);
            let c = jump_hash(key, n + 1);
            prop_assert!(c == b || c == n);
        }
    }
}
