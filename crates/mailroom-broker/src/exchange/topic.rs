//! Topic-exchange routing, as RabbitMQ 3.10 does it.
//!
//! A key or pattern is split on `.` into words; the empty string has *zero* words,
//! and every other string has one more word than it has dots (so `"a."` is `a`, ``
//! and `"."` is ``, ``). In a pattern, the word `*` matches exactly one word (which may
//! be empty), `#` matches zero or more words, and any other word (including the empty
//! word, and words such as `a*` or `a#`) matches only itself. Wildcards are whole
//! words only. A key word that happens to be `*` or `#` is an ordinary word.

use std::collections::HashMap;

/// Splits a routing key or pattern into words the way RabbitMQ's `split_topic_key` does.
fn words(s: &str) -> impl Iterator<Item = &str> + Clone {
    // `"".split('.')` would yield one empty word; RabbitMQ yields none.
    let skip = if s.is_empty() { 1 } else { 0 };
    s.split('.').skip(skip)
}

/// True when `routing_key` matches binding `pattern` under RabbitMQ's topic rules.
///
/// Runs in `O(pattern words × key words)` time and `O(pattern words)` space (a
/// simulation of the pattern's automaton, never backtracking).
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    let pat: Vec<&str> = words(pattern).collect();
    let m = pat.len();
    // cur[i]: the first i pattern words can match the key words consumed so far.
    let mut cur = vec![false; m + 1];
    let mut next = vec![false; m + 1];
    cur[0] = true;
    hash_closure(&pat, &mut cur);
    for w in words(routing_key) {
        next.iter_mut().for_each(|b| *b = false);
        let mut any = false;
        for i in 0..m {
            if !cur[i] {
                continue;
            }
            match pat[i] {
                // `#` consumes this word and may consume more.
                "#" => {
                    next[i] = true;
                    any = true;
                }
                p if p == "*" || p == w => {
                    next[i + 1] = true;
                    any = true;
                }
                _ => {}
            }
        }
        if !any {
            return false;
        }
        hash_closure(&pat, &mut next);
        std::mem::swap(&mut cur, &mut next);
    }
    cur[m]
}

/// Lets every `#` match zero words: a state before a `#` is also a state after it.
fn hash_closure(pat: &[&str], states: &mut [bool]) {
    for i in 0..pat.len() {
        if states[i] && pat[i] == "#" {
            states[i + 1] = true;
        }
    }
}

/// The label of the edge from a trie node to its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Edge {
    Root,
    Word(Box<str>),
    Star,
    Hash,
}

/// One trie node: a pattern prefix, with the bindings whose pattern is exactly that prefix.
#[derive(Debug, Clone)]
struct Node<T> {
    parent: usize,
    edge: Edge,
    words: HashMap<Box<str>, usize>,
    star: Option<usize>,
    hash: Option<usize>,
    values: Vec<T>,
}

impl<T> Node<T> {
    fn new(parent: usize, edge: Edge) -> Self {
        Node { parent, edge, words: HashMap::new(), star: None, hash: None, values: Vec::new() }
    }

    fn is_leafless_and_empty(&self) -> bool {
        self.values.is_empty() && self.words.is_empty() && self.star.is_none() && self.hash.is_none()
    }
}

const ROOT: usize = 0;

/// A set of topic bindings, each (pattern, T), that returns every T whose pattern matches a key.
///
/// A trie over pattern words (as RabbitMQ keeps per topic exchange). Matching walks
/// the trie breadth-first with a de-duplicated set of active nodes, so each binding
/// is reported at most once per key even for patterns such as `#.#` (RabbitMQ's own
/// walk can report such a binding several times; it de-duplicates destinations
/// afterwards, as the caller must do here across different bindings).
#[derive(Debug, Clone)]
pub struct TopicIndex<T> {
    nodes: Vec<Node<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T: Clone + PartialEq> Default for TopicIndex<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + PartialEq> TopicIndex<T> {
    /// Creates an empty index.
    pub fn new() -> Self {
        TopicIndex { nodes: vec![Node::new(ROOT, Edge::Root)], free: Vec::new(), len: 0 }
    }

    /// Adds the binding (`pattern`, `value`); adding an equal pair twice stores it twice.
    pub fn insert(&mut self, pattern: &str, value: T) {
        let mut node = ROOT;
        for w in words(pattern) {
            node = match self.child(node, w) {
                Some(c) => c,
                None => self.add_child(node, w),
            };
        }
        self.nodes[node].values.push(value);
        self.len += 1;
    }

    /// Removes one binding (`pattern`, `value`); true if it was there.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let mut node = ROOT;
        for w in words(pattern) {
            match self.child(node, w) {
                Some(c) => node = c,
                None => return false,
            }
        }
        let Some(pos) = self.nodes[node].values.iter().position(|v| v == value) else {
            return false;
        };
        self.nodes[node].values.remove(pos);
        self.len -= 1;
        self.prune(node);
        true
    }

    /// Calls `f` once for every binding whose pattern matches `routing_key`.
    pub fn for_each_match(&self, routing_key: &str, mut f: impl FnMut(&T)) {
        if self.len == 0 {
            return;
        }
        let mut cur = vec![ROOT];
        self.close(&mut cur);
        let mut next = Vec::new();
        for w in words(routing_key) {
            next.clear();
            for &n in &cur {
                let node = &self.nodes[n];
                if node.edge == Edge::Hash {
                    next.push(n);
                }
                if let Some(&c) = node.words.get(w) {
                    next.push(c);
                }
                if let Some(c) = node.star {
                    next.push(c);
                }
            }
            if next.is_empty() {
                return;
            }
            self.close(&mut next);
            std::mem::swap(&mut cur, &mut next);
        }
        for &n in &cur {
            self.nodes[n].values.iter().for_each(&mut f);
        }
    }

    /// The number of bindings in the index.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the index holds no bindings.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `#` children (a `#` may match zero words), then sorts and de-duplicates.
    fn close(&self, set: &mut Vec<usize>) {
        let mut i = 0;
        while i < set.len() {
            if let Some(h) = self.nodes[set[i]].hash {
                set.push(h);
            }
            i += 1;
        }
        set.sort_unstable();
        set.dedup();
    }

    fn child(&self, node: usize, w: &str) -> Option<usize> {
        let n = &self.nodes[node];
        match w {
            "*" => n.star,
            "#" => n.hash,
            _ => n.words.get(w).copied(),
        }
    }

    fn add_child(&mut self, node: usize, w: &str) -> usize {
        let edge = match w {
            "*" => Edge::Star,
            "#" => Edge::Hash,
            _ => Edge::Word(w.into()),
        };
        let new = Node::new(node, edge.clone());
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id] = new;
                id
            }
            None => {
                self.nodes.push(new);
                self.nodes.len() - 1
            }
        };
        let parent = &mut self.nodes[node];
        match edge {
            Edge::Star => parent.star = Some(id),
            Edge::Hash => parent.hash = Some(id),
            Edge::Word(w) => {
                parent.words.insert(w, id);
            }
            Edge::Root => unreachable!(),
        }
        id
    }

    /// Detaches `node` and its ancestors while they hold neither bindings nor children.
    fn prune(&mut self, mut node: usize) {
        while node != ROOT && self.nodes[node].is_leafless_and_empty() {
            let parent = self.nodes[node].parent;
            let edge = std::mem::replace(&mut self.nodes[node].edge, Edge::Root);
            let p = &mut self.nodes[parent];
            match edge {
                Edge::Star => p.star = None,
                Edge::Hash => p.hash = None,
                Edge::Word(w) => {
                    p.words.remove(&w);
                }
                Edge::Root => unreachable!(),
            }
            self.nodes[node].words = HashMap::new();
            self.free.push(node);
            node = parent;
        }
    }

    /// Number of live trie nodes, root included (for tests of pruning).
    #[cfg(test)]
    fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    /// (pattern, key, matches?) — every row was also checked against RabbitMQ 3.10.8
    /// (topic exchange, one binding, mandatory publish) unless marked "derived".
    const CASES: &[(&str, &str, bool)] = &[
        ("*", "", false),
        ("#", "", true),
        ("#.#", "", true),
        ("", "", true),
        ("", "a", false),
        ("a.*", "a.", true),
        ("a.*", "a", false),
        ("a.#.b", "a.b", true),
        ("a.#.b", "a.x.y.b", true),
        ("a..b", "a..b", true),
        ("a.*.b", "a..b", true),
        ("*", ".", false),
        ("*.*", ".", true),
        ("#", ".", true),
        ("a.#", "a", true),
        ("#.a", "a", true),
        ("#.#.a", "a", true),
        ("#.*", "", false),
        ("#.*", "a", true),
        ("a.#.#.b", "a.b", true),
        (".", "", false),
        ("*.", "a.", true),
        ("*.", "", false),
        ("#.", "a", false),
        ("#.", "a.", true),
        ("#.", "", false),
        (".#", "", false),
        (".#", ".", true),
        ("a*", "ab", false),
        ("a#", "a", false),
        ("a#", "a#", true),
        ("*", "*", true),
        ("#", "#.#", true),
        ("a.b", "a.b.", false),
        ("*.*.*", "a..", true),
        // derived
        ("a.b", "a.b", true),
        ("a.b", "a.c", false),
        ("*", "a", true),
        ("*", "a.b", false),
        ("#", "a.b.c", true),
        ("a.#", "a.b.c", true),
        ("a.#", "b", false),
        ("#.b", "a.b", true),
        ("#.b", "a.b.c", false),
        ("a.*.#", "a", false),
        ("a.*.#", "a.b", true),
        ("a.*.#", "a.b.c.d", true),
        ("#.*.#", "", false),
        ("#.*.#", "x", true),
        ("*.#.*", "x", false),
        ("*.#.*", "x.y", true),
        ("#.#.#", "a.b", true),
        ("#.a.#", "b.a.c", true),
        ("#.a.#", "b.c", false),
        ("#", "#", true),
        ("*", "#", true),
        ("#", "*", true),
        ("#", "a", true),
        ("a.#", "a.", true),
        ("..", "..", true),
        ("..", ".", false),
        ("*..*", "a..b", true),
    ];

    #[test]
    fn matches_table() {
        for &(p, k, want) in CASES {
            assert_eq!(matches(p, k), want, "pattern {p:?} key {k:?}");
        }
    }

    #[test]
    fn index_table() {
        let mut idx = TopicIndex::new();
        for (i, &(p, _, _)) in CASES.iter().enumerate() {
            idx.insert(p, i);
        }
        for &(_, k, _) in CASES {
            let mut got = Vec::new();
            idx.for_each_match(k, |&i| got.push(i));
            got.sort_unstable();
            let want: Vec<usize> = CASES.iter().enumerate().filter(|(_, c)| matches(c.0, k)).map(|(i, _)| i).collect();
            assert_eq!(got, want, "key {k:?}");
        }
    }

    #[test]
    fn words_split_like_rabbitmq() {
        fn w(s: &str) -> Vec<&str> {
            words(s).collect()
        }
        assert_eq!(w(""), Vec::<&str>::new());
        assert_eq!(w("a"), vec!["a"]);
        assert_eq!(w("a."), vec!["a", ""]);
        assert_eq!(w("."), vec!["", ""]);
        assert_eq!(w(".a.."), vec!["", "a", "", ""]);
    }

    #[test]
    fn double_hash_reported_once() {
        // RabbitMQ's trie walk can find `#.#` twice for a key; we report each binding once.
        let mut idx = TopicIndex::new();
        idx.insert("#.#", "q");
        idx.insert("#.#.#", "r");
        idx.insert("#", "q");
        let mut got = Vec::new();
        idx.for_each_match("a.b.c", |v| got.push(*v));
        got.sort_unstable();
        assert_eq!(got, vec!["q", "q", "r"]);
    }

    #[test]
    fn duplicates_and_remove() {
        let mut idx = TopicIndex::new();
        assert!(idx.is_empty());
        idx.insert("a.*", 1);
        idx.insert("a.*", 1);
        idx.insert("a.#", 2);
        assert_eq!(idx.len(), 3);
        let count = |idx: &TopicIndex<i32>, k| {
            let mut n = 0;
            idx.for_each_match(k, |_| n += 1);
            n
        };
        assert_eq!(count(&idx, "a.b"), 3);
        assert!(idx.remove("a.*", &1));
        assert_eq!(count(&idx, "a.b"), 2);
        assert!(idx.remove("a.*", &1));
        assert!(!idx.remove("a.*", &1));
        assert!(!idx.remove("a.*.c", &2));
        assert!(!idx.remove("a.#", &3));
        assert!(idx.remove("a.#", &2));
        assert!(idx.is_empty());
        assert_eq!(idx.node_count(), 1, "trie pruned back to the root");
        assert_eq!(count(&idx, "a.b"), 0);
    }

    #[test]
    fn prune_keeps_shared_prefixes() {
        let mut idx = TopicIndex::new();
        idx.insert("a.b.c", 1);
        idx.insert("a", 2);
        idx.insert("a.#", 3);
        assert!(idx.remove("a.b.c", &1));
        assert_eq!(idx.node_count(), 3); // root, a, a.#
        let mut got = Vec::new();
        idx.for_each_match("a", |v| got.push(*v));
        got.sort_unstable();
        assert_eq!(got, vec![2, 3]);
        // Reuses freed nodes.
        idx.insert("x.y.z", 4);
        assert_eq!(idx.node_count(), 6);
        let mut got = Vec::new();
        idx.for_each_match("x.y.z", |v| got.push(*v));
        assert_eq!(got, vec![4]);
    }

    #[test]
    fn no_exponential_blowup() {
        let key = vec!["w"; 50].join(".");
        let nomatch = format!("{key}.y");
        let pats = ["#.#.#.#.#.#.#.x", "#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.#.x", "#.*.#.*.#.*.#.*.#.x"];
        let start = Instant::now();
        for p in pats {
            assert!(!matches(p, &key));
            assert!(!matches(p, &nomatch));
            assert!(matches(p, &format!("{key}.x")));
        }
        let mut idx = TopicIndex::new();
        for (i, p) in pats.iter().enumerate() {
            idx.insert(p, i);
        }
        let mut n = 0;
        idx.for_each_match(&key, |_| n += 1);
        idx.for_each_match(&format!("{key}.x"), |_| n += 1);
        assert_eq!(n, 3);
        assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    }

    #[test]
    fn thousands_of_bindings() {
        let mut idx = TopicIndex::new();
        for i in 0..5000 {
            idx.insert(&format!("stock.{}.{}", i % 50, i), i);
            idx.insert(&format!("*.{}.#", i % 50), i);
        }
        idx.insert("#", -1);
        let start = Instant::now();
        let mut got = Vec::new();
        for _ in 0..1000 {
            got.clear();
            idx.for_each_match("stock.7.107", |v| got.push(*v));
        }
        got.sort_unstable();
        let mut want: Vec<i32> = (0..5000).filter(|i| i % 50 == 7).collect();
        want.push(-1);
        want.push(107);
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    }

    fn word() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "", "*", "#"])
    }

    fn key_word() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "", "*", "#", "c"])
    }

    fn text(w: impl Strategy<Value = &'static str>, max: usize) -> impl Strategy<Value = String> {
        // Zero words is the empty string; n words are joined by dots.
        prop::collection::vec(w, 0..=max).prop_map(|v| v.join("."))
    }

    /// A plain backtracking matcher over the same word split, as an independent reference.
    fn reference(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| reference(rest, &k[i..])),
            Some((&w, rest)) => !k.is_empty() && (w == "*" || w == k[0]) && reference(rest, &k[1..]),
        }
    }

    proptest! {
        #[test]
        fn matches_agrees_with_backtracking(p in text(word(), 6), k in text(key_word(), 6)) {
            let pw: Vec<&str> = words(&p).collect();
            let kw: Vec<&str> = words(&k).collect();
            prop_assert_eq!(matches(&p, &k), reference(&pw, &kw), "pattern {:?} key {:?}", p, k);
        }

        #[test]
        fn index_agrees_with_matches(
            pats in prop::collection::vec(text(word(), 5), 0..24),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            keys in prop::collection::vec(text(key_word(), 6), 1..12),
        ) {
            let mut idx = TopicIndex::new();
            let mut live: Vec<(String, usize)> = Vec::new();
            for (i, p) in pats.iter().enumerate() {
                // Values repeat so that equal (pattern, value) pairs occur.
                idx.insert(p, i % 7);
                live.push((p.clone(), i % 7));
            }
            for r in removals {
                if live.is_empty() { break; }
                let (p, v) = live.remove(r.index(live.len()));
                prop_assert!(idx.remove(&p, &v));
            }
            prop_assert!(!idx.remove("never.inserted", &99));
            prop_assert_eq!(idx.len(), live.len());
            for k in &keys {
                let mut got = Vec::new();
                idx.for_each_match(k, |v| got.push(*v));
                got.sort_unstable();
                let mut want: Vec<usize> =
                    live.iter().filter(|(p, _)| matches(p, k)).map(|(_, v)| *v).collect();
                want.sort_unstable();
                prop_assert_eq!(got, want, "key {:?}", k);
            }
            for (p, v) in live.clone() {
                prop_assert!(idx.remove(&p, &v));
            }
            prop_assert!(idx.is_empty());
            prop_assert_eq!(idx.node_count(), 1);
        }
    }
}
