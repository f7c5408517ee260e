//! Message filters: header predicates (a headers-exchange binding for subscriptions, so unwanted messages
//! never reach the queue) and arbitrary in-process predicates (filtered messages are acked and counted).

use crate::envelope::Metadata;
use crate::wire::{AMQPValue, FieldTable, LongString, ShortString};
use std::sync::Arc;

/// A predicate over message metadata.
#[derive(Clone, Default)]
pub struct Filter {
    pub(crate) equals: Vec<(String, String)>,
    pub(crate) predicate: Option<Predicate>,
}

/// An in-process header predicate.
type Predicate = Arc<dyn Fn(&Metadata) -> bool + Send + Sync>;

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter").field("equals", &self.equals).field("predicate", &self.predicate.is_some()).finish()
    }
}

/// Header predicates.
#[derive(Debug)]
pub struct Headers;

impl Headers {
    /// Header `name` equals `value`.
    pub fn eq(name: impl Into<String>, value: impl Into<String>) -> Filter {
        Filter { equals: vec![(name.into(), value.into())], predicate: None }
    }
}

impl Filter {
    /// An in-process predicate (cannot be expressed as a binding).
    pub fn predicate(f: impl Fn(&Metadata) -> bool + Send + Sync + 'static) -> Filter {
        Filter { equals: Vec::new(), predicate: Some(Arc::new(f)) }
    }
    /// Both filters must match.
    pub fn and(mut self, other: Filter) -> Filter {
        self.equals.extend(other.equals);
        self.predicate = match (self.predicate, other.predicate) {
            (Some(a), Some(b)) => Some(Arc::new(move |m: &Metadata| a(m) && b(m))),
            (a, b) => a.or(b),
        };
        self
    }
    /// Whether `meta` passes.
    pub fn matches(&self, meta: &Metadata) -> bool {
        self.equals.iter().all(|(k, v)| meta.header(k) == Some(v.as_str()))
            && self.predicate.as_ref().is_none_or(|p| p(meta))
    }
    /// The headers-exchange binding arguments (`x-match: all`), if there are header equalities.
    pub fn binding_arguments(&self) -> Option<FieldTable> {
        if self.equals.is_empty() {
            return None;
        }
        let mut t = FieldTable::default();
        t.insert(ShortString::from("x-match"), AMQPValue::LongString(LongString::from("all")));
        for (k, v) in &self.equals {
            t.insert(ShortString::from(k.as_str()), AMQPValue::LongString(LongString::from(v.as_str())));
        }
        Some(t)
    }
}
