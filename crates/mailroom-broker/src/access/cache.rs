//! A channel's cache of recently granted checks, so that a publish to an exchange already checked runs no
//! regex (as `rabbit_channel`'s `permission_cache` and `topic_permission_cache`, 12 entries each).
//!
//! Lookups compare strings and allocate nothing; a miss that is granted takes the least recently used
//! slot and reuses its string buffers, so a steady stream of distinct routing keys allocates only until
//! the buffers have grown to the keys' length.

use super::permissions::{Permission, ResourceKind};
use super::table::Step;

/// Entries per cache, as RabbitMQ's `?MAX_PERMISSION_CACHE_SIZE`.
pub const CACHE_SIZE: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    permission: Permission,
    /// `Some` for a resource check, `None` for a topic check.
    kind: Option<ResourceKind>,
    /// The resource name, or the topic exchange.
    name: String,
    /// The routing key of a topic check (empty for a resource check).
    key: String,
}

impl Entry {
    fn matches(&self, permission: Permission, kind: Option<ResourceKind>, name: &str, key: &str) -> bool {
        // Not `==` on the strings: see `same_name` (the default exchange's "" and a resource check's empty
        // key were two slow `memcmp`s per publish).
        use crate::message::same_name;
        self.permission == permission && self.kind == kind && same_name(&self.name, name) && same_name(&self.key, key)
    }
}

/// Granted checks, most recently used first.
#[derive(Debug, Clone, Default)]
pub struct GrantCache {
    entries: Vec<Entry>,
}

fn key_of<'a>(step: &Step<'a>) -> Option<(Permission, Option<ResourceKind>, &'a str, &'a str)> {
    match *step {
        Step::Resource { permission, kind, name } => Some((permission, Some(kind), name, "")),
        Step::Topic { permission, exchange, routing_key } => Some((permission, None, exchange, routing_key)),
        // Structural checks are a comparison each: not worth caching.
        _ => None,
    }
}

impl GrantCache {
    /// Whether `step` was granted recently (and moves it to the front).
    pub fn hit(&mut self, step: &Step<'_>) -> bool {
        let Some((permission, kind, name, key)) = key_of(step) else { return false };
        match self.entries.iter().position(|e| e.matches(permission, kind, name, key)) {
            Some(i) => {
                self.entries[..=i].rotate_right(1);
                true
            }
            None => false,
        }
    }

    /// Records that `step` was granted.
    pub fn insert(&mut self, step: &Step<'_>) {
        let Some((permission, kind, name, key)) = key_of(step) else { return };
        if self.entries.len() < CACHE_SIZE {
            self.entries.push(Entry { permission, kind, name: String::new(), key: String::new() });
        }
        // Reuse the least recently used slot (the last one) and move it to the front.
        self.entries.rotate_right(1);
        let e = &mut self.entries[0];
        e.permission = permission;
        e.kind = kind;
        e.name.clear();
        e.name.push_str(name);
        e.key.clear();
        e.key.push_str(key);
    }

    /// Forgets everything (permissions changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str) -> Step<'_> {
        Step::Resource { permission: Permission::Write, kind: ResourceKind::Exchange, name }
    }

    #[test]
    fn hits_after_insert_and_evicts_least_recently_used() {
        let mut c = GrantCache::default();
        assert!(!c.hit(&write("x")));
        c.insert(&write("x"));
        assert!(c.hit(&write("x")));
        // Same name, other permission or kind: a different check.
        assert!(!c.hit(&Step::Resource { permission: Permission::Read, kind: ResourceKind::Exchange, name: "x" }));
        assert!(!c.hit(&Step::Resource { permission: Permission::Write, kind: ResourceKind::Queue, name: "x" }));
        assert!(!c.hit(&Step::Topic { permission: Permission::Write, exchange: "x", routing_key: "" }));
        let names: Vec<String> = (0..CACHE_SIZE).map(|i| format!("e{i}")).collect();
        for n in &names {
            c.insert(&write(n));
        }
        assert_eq!(c.len(), CACHE_SIZE);
        // "x" was the least recently used: gone. The others are all there.
        assert!(!c.hit(&write("x")));
        assert!(names.iter().all(|n| c.hit(&write(n))));
        // Touching e0 keeps it when one more arrives; e1 (now the oldest) goes.
        assert!(c.hit(&write("e0")));
        c.insert(&write("new"));
        assert!(c.hit(&write("e0")));
        assert!(!c.hit(&write("e1")));
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn topic_entries_key_on_exchange_and_routing_key() {
        let mut c = GrantCache::default();
        let t = |k| Step::Topic { permission: Permission::Write, exchange: "amq.topic", routing_key: k };
        c.insert(&t("a.b"));
        assert!(c.hit(&t("a.b")));
        assert!(!c.hit(&t("a.c")));
        // Structural steps are never cached.
        c.insert(&Step::NotDefaultExchange { exchange: "" });
        assert!(!c.hit(&Step::NotDefaultExchange { exchange: "" }));
        assert_eq!(c.len(), 1);
    }
}
