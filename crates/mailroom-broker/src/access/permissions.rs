//! Permissions: a user's configure/write/read regular expressions in a vhost, topic permissions on
//! routing keys, and the errors an access check returns (worded as RabbitMQ 3.10 words them).
//!
//! As in RabbitMQ's internal backend (`rabbit_auth_backend_internal`): a pattern matches a resource when
//! it matches anywhere in the name (not anchored); the empty pattern means `^$` (nothing but the empty
//! name, which no resource has: the default exchange is checked as `amq.default`). Topic permission
//! patterns first have `{username}` and `{vhost}` replaced by the connection's user and vhost (plain text
//! substitution, as RabbitMQ's `expand_topic_permission`). Patterns are compiled once, when set (topic
//! ones once per user and vhost), and rejected then if they do not compile. The engine is `regex-lite`;
//! the PCRE features it lacks (look-around, backreferences) are refused when set, not misread.

use crate::error::{BrokerError, ErrorKind};
use std::fmt;

/// The three kinds of access RabbitMQ distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Create, delete or alter a resource.
    Configure,
    /// Inject messages into a resource.
    Write,
    /// Take messages out of a resource.
    Read,
}

impl Permission {
    /// Lower-case name, as in definitions and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configure => "configure",
            Self::Write => "write",
            Self::Read => "read",
        }
    }
}

/// The kinds of resource permissions apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// An exchange.
    Exchange,
    /// A queue.
    Queue,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exchange => "exchange",
            Self::Queue => "queue",
        })
    }
}

/// A pattern that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid permission pattern '{pattern}': {reason}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// The regex engine's complaint.
    pub reason: String,
}

/// One compiled permission pattern.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    matcher: Matcher,
}

#[derive(Clone)]
enum Matcher {
    /// `.*` and `^.*` match every name (each matches the empty prefix): no regex run is needed.
    All,
    /// Matches nothing (revoked grants).
    Nothing,
    Regex(regex_lite::Regex),
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Pattern {}

impl Pattern {
    /// Compiles `source`; the empty pattern means `^$`.
    pub fn new(source: &str) -> Result<Self, PatternError> {
        let matcher = match source {
            ".*" | "^.*" => Matcher::All,
            "" => Matcher::Regex(compile(source, "^$")?),
            _ => Matcher::Regex(compile(source, source)?),
        };
        Ok(Self { source: source.to_owned(), matcher })
    }

    /// A pattern that matches no name at all, not even the empty one.
    pub fn never() -> Self {
        Self { source: "(never)".into(), matcher: Matcher::Nothing }
    }

    /// The pattern as given (what definitions export).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches anywhere in `name`.
    pub fn is_match(&self, name: &str) -> bool {
        match &self.matcher {
            Matcher::All => true,
            Matcher::Nothing => false,
            Matcher::Regex(re) => re.is_match(name),
        }
    }
}

fn compile(source: &str, regex: &str) -> Result<regex_lite::Regex, PatternError> {
    regex_lite::Regex::new(regex).map_err(|e| PatternError { pattern: source.to_owned(), reason: e.to_string() })
}

/// A user's permissions in one vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Resources the user may declare, delete and alter.
    pub configure: Pattern,
    /// Resources the user may publish to and bind to.
    pub write: Pattern,
    /// Resources the user may consume, get, purge and bind from.
    pub read: Pattern,
}

impl Permissions {
    /// Compiles the three patterns.
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Self, PatternError> {
        Ok(Self { configure: Pattern::new(configure)?, write: Pattern::new(write)?, read: Pattern::new(read)? })
    }

    /// `.*` for all three (what the default user gets on `/`).
    pub fn full() -> Self {
        let all = || Pattern { source: ".*".into(), matcher: Matcher::All };
        Self { configure: all(), write: all(), read: all() }
    }

    /// Nothing granted (what a channel falls back to when its user's permissions are cleared).
    pub fn none() -> Self {
        Self { configure: Pattern::never(), write: Pattern::never(), read: Pattern::never() }
    }

    /// The pattern for `permission`.
    pub fn pattern(&self, permission: Permission) -> &Pattern {
        match permission {
            Permission::Configure => &self.configure,
            Permission::Write => &self.write,
            Permission::Read => &self.read,
        }
    }

    /// Whether `permission` on a resource called `name` is granted (the default exchange is passed as
    /// `amq.default`; see [`permission_name`]).
    pub fn allows(&self, permission: Permission, name: &str) -> bool {
        self.pattern(permission).is_match(name)
    }
}

/// A user's topic permissions on one topic exchange in one vhost: patterns on routing keys, before
/// variable expansion. (RabbitMQ has no `configure` here.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermissions {
    /// Routing keys the user may publish with.
    pub write: String,
    /// Binding keys the user may bind with (queue.bind, exchange.bind and their unbinds).
    pub read: String,
}

impl TopicPermissions {
    /// Checks that both patterns compile once expanded (with sample values, since the real ones are only
    /// known per connection).
    pub fn new(write: &str, read: &str) -> Result<Self, PatternError> {
        let this = Self { write: write.to_owned(), read: read.to_owned() };
        this.compile("user", "vhost")?;
        Ok(this)
    }

    /// Expands `{username}` and `{vhost}` and compiles, for one connection's user and vhost.
    pub fn compile(&self, username: &str, vhost: &str) -> Result<CompiledTopicPermissions, PatternError> {
        let one = |p: &str| {
            let expanded = expand_variables(p, username, vhost);
            Pattern::new(&expanded).map_err(|e| PatternError { pattern: p.to_owned(), reason: e.reason })
        };
        Ok(CompiledTopicPermissions { write: one(&self.write)?, read: one(&self.read)? })
    }
}

/// Topic permissions expanded and compiled for one user and vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledTopicPermissions {
    /// Routing keys the user may publish with.
    pub write: Pattern,
    /// Binding keys the user may bind with.
    pub read: Pattern,
}

impl CompiledTopicPermissions {
    /// Whether `permission` (write or read; configure is never granted) allows `routing_key`.
    pub fn allows(&self, permission: Permission, routing_key: &str) -> bool {
        match permission {
            Permission::Write => self.write.is_match(routing_key),
            Permission::Read => self.read.is_match(routing_key),
            Permission::Configure => false,
        }
    }
}

/// Replaces `{username}` then `{vhost}` everywhere in `pattern` (RabbitMQ folds over its variable map in
/// key order, so a user name containing `{vhost}` is expanded again, as there).
pub fn expand_variables(pattern: &str, username: &str, vhost: &str) -> String {
    pattern.replace("{username}", username).replace("{vhost}", vhost)
}

/// The name permission checks use for an exchange: the default exchange `""` is `amq.default`.
pub fn permission_name(kind: ResourceKind, name: &str) -> &str {
    match (kind, name) {
        (ResourceKind::Exchange, "") => "amq.default",
        _ => name,
    }
}

/// An operation refused by the access model. Each variant's text is RabbitMQ 3.10's reply text (after
/// the `ACCESS_REFUSED - ` / `NOT_ALLOWED - ` prefix).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The user lacks a permission on a resource (403, closes the channel).
    #[error("access to {kind} '{name}' in vhost '{vhost}' refused for user '{user}'")]
    Resource {
        /// The permission that was missing.
        permission: Permission,
        /// Exchange or queue.
        kind: ResourceKind,
        /// The resource name as checked (`amq.default` for the default exchange).
        name: String,
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
    },
    /// A topic permission refuses a routing or binding key (403, closes the channel).
    #[error("access to topic '{routing_key}' in exchange '{exchange}' in vhost '{vhost}' refused for user '{user}'")]
    Topic {
        /// Write (publish) or read (bind).
        permission: Permission,
        /// The routing or binding key.
        routing_key: String,
        /// The topic exchange.
        exchange: String,
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
    },
    /// Binding to or from, deleting or declaring the default exchange (403).
    #[error("operation not permitted on the default exchange")]
    DefaultExchange,
    /// Creating a queue or exchange whose name starts with `amq.` (403).
    #[error("{kind} name '{name}' contains reserved prefix 'amq.*'")]
    ReservedName {
        /// Exchange or queue.
        kind: ResourceKind,
        /// The name.
        name: String,
    },
    /// Deleting a built-in `amq.*` exchange (403).
    #[error("deletion of system exchange '{name}' in vhost '{vhost}' not allowed")]
    SystemExchange {
        /// The exchange.
        name: String,
        /// The vhost.
        vhost: String,
    },
    /// The user has no permissions in the vhost (530 at `connection.open`).
    #[error("access to vhost '{vhost}' refused for user '{user}'")]
    Vhost {
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
    },
}

impl AccessError {
    /// The AMQP reply code: 530 for a refused vhost, else 403.
    pub fn reply_code(&self) -> u16 {
        match self {
            Self::Vhost { .. } => 530,
            _ => 403,
        }
    }

    /// The AMQP reply text, e.g. `ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'`.
    pub fn reply_text(&self) -> String {
        let name = if self.reply_code() == 530 { "NOT_ALLOWED" } else { "ACCESS_REFUSED" };
        format!("{name} - {self}")
    }

    /// Whether the error closes the connection (else only the channel).
    pub fn closes_connection(&self) -> bool {
        self.reply_code() == 530
    }
}

impl From<AccessError> for BrokerError {
    fn from(e: AccessError) -> Self {
        let kind = if e.closes_connection() { ErrorKind::NotAllowed } else { ErrorKind::AccessRefused };
        BrokerError::new(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn patterns_match_unanchored_and_empty_means_nothing() {
        let p = Permissions::new("", "^app-", "gen").unwrap();
        assert!(!p.allows(Permission::Configure, "anything"));
        assert!(!p.allows(Permission::Configure, "amq.default"));
        assert!(p.allows(Permission::Write, "app-1"));
        assert!(!p.allows(Permission::Write, "my-app-1"));
        // Unanchored: matches anywhere, as Erlang's re:run.
        assert!(p.allows(Permission::Read, "amq.gen-abc"));
        let full = Permissions::full();
        for perm in [Permission::Configure, Permission::Write, Permission::Read] {
            assert!(full.allows(perm, ""));
            assert!(full.allows(perm, "line\nbreak"));
        }
        assert_eq!(full, Permissions::new(".*", ".*", ".*").unwrap());
        let none = Permissions::none();
        for perm in [Permission::Configure, Permission::Write, Permission::Read] {
            assert!(!none.allows(perm, ""));
            assert!(!none.allows(perm, "x"));
        }
    }

    #[test]
    fn rabbitmq_doc_example_pattern() {
        // From the access-control guide: server-generated names and the default exchange.
        let p = Pattern::new("^(amq\\.gen.*|amq\\.default)$").unwrap();
        assert!(p.is_match("amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        assert!(p.is_match("amq.default"));
        assert!(!p.is_match("amq.direct"));
        assert!(!p.is_match("orders"));
    }

    #[test]
    fn invalid_patterns_are_refused_when_set() {
        let e = Permissions::new(".*", "(", ".*").unwrap_err();
        assert_eq!(e.pattern, "(");
        // PCRE look-ahead is not supported by the engine: refused rather than misread.
        assert!(Pattern::new("^(?!secret).*").is_err());
        assert!(TopicPermissions::new("^{username}\\.", "(").is_err());
    }

    #[test]
    fn topic_variables_expand_per_connection() {
        // The same patterns as RabbitMQ 3.10.8 accepted in the probe (testdata export).
        let t = TopicPermissions::new("^{username}\\..*", "^{vhost}-r.*").unwrap();
        let c = t.compile("sectest", "/").unwrap();
        assert!(c.allows(Permission::Write, "sectest.k"));
        assert!(!c.allows(Permission::Write, "other.k"));
        assert!(c.allows(Permission::Read, "/-rk"));
        assert!(!c.allows(Permission::Read, "zz"));
        assert!(!c.allows(Permission::Configure, "sectest.k"));
        // RabbitMQ's own unit test cases for expand_topic_permission.
        assert_eq!(
            expand_variables("services/{vhost}/accounts/{username}/notifications", "guest", "default"),
            "services/default/accounts/guest/notifications"
        );
        assert_eq!(
            expand_variables("services/{vhost}/accounts/{vhost}/{username}/notifications", "guest", "default"),
            "services/default/accounts/default/guest/notifications"
        );
        assert_eq!(expand_variables("services/accounts/notifications", "g", "d"), "services/accounts/notifications");
    }

    #[test]
    fn the_default_exchange_is_checked_as_amq_default() {
        assert_eq!(permission_name(ResourceKind::Exchange, ""), "amq.default");
        assert_eq!(permission_name(ResourceKind::Exchange, "x"), "x");
        assert_eq!(permission_name(ResourceKind::Queue, ""), "");
    }

    #[test]
    fn error_texts_and_codes() {
        let e = AccessError::Resource {
            permission: Permission::Write,
            kind: ResourceKind::Exchange,
            name: "amq.default".into(),
            vhost: "/".into(),
            user: "sectest".into(),
        };
        assert_eq!(
            e.reply_text(),
            "ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' refused for user 'sectest'"
        );
        assert!(!e.closes_connection());
        let v = AccessError::Vhost { vhost: "sectest-vh2".into(), user: "sectest".into() };
        assert_eq!(v.reply_code(), 530);
        assert_eq!(v.reply_text(), "NOT_ALLOWED - access to vhost 'sectest-vh2' refused for user 'sectest'");
        let b: BrokerError = v.into();
        assert_eq!(b.kind, ErrorKind::NotAllowed);
        let b: BrokerError = AccessError::DefaultExchange.into();
        assert_eq!(b.kind, ErrorKind::AccessRefused);
        assert_eq!(b.message, "operation not permitted on the default exchange");
    }

    proptest! {
        /// `.*` (the shortcut) agrees with the regex engine on every name.
        #[test]
        fn match_all_shortcut_agrees_with_regex(name in ".*") {
            let re = regex_lite::Regex::new(".*").unwrap();
            prop_assert_eq!(Pattern::new(".*").unwrap().is_match(&name), re.is_match(&name));
            prop_assert_eq!(Pattern::new("^.*").unwrap().is_match(&name), re.is_match(&name));
        }

        /// A literal prefix pattern grants exactly the names with that prefix.
        #[test]
        fn prefix_patterns(prefix in "[a-z]{1,6}", name in "[a-z.-]{0,12}") {
            let p = Pattern::new(&format!("^{prefix}")).unwrap();
            prop_assert_eq!(p.is_match(&name), name.starts_with(&prefix));
        }
    }
}
