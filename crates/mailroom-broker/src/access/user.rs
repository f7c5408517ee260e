//! User accounts: name, salted password hash, tags and limits, and what the tags allow in the HTTP API.
//!
//! Tags follow RabbitMQ's management plugin (https://www.rabbitmq.com/docs/management#permissions):
//! `management` may use the API within the vhosts it can reach; `policymaker` adds policies and
//! parameters there; `monitoring` adds every vhost, every connection and channel, and node data;
//! `administrator` adds vhosts, users and permissions and closing anyone's connections. Untagged users may
//! use messaging protocols only. `impersonator` (may set another user's `user_id`) is carried, and unknown
//! tags are kept as RabbitMQ keeps them.

use super::limits::UserLimits;
use super::password::PasswordHash;

/// A user tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UserTag {
    /// Everything, including users, vhosts and permissions.
    Administrator,
    /// All vhosts, connections and node data, read-only.
    Monitoring,
    /// Policies and parameters in the user's vhosts.
    Policymaker,
    /// The HTTP API within the user's vhosts.
    Management,
    /// May publish with a `user_id` other than its own.
    Impersonator,
    /// Any other tag (kept and exported; grants nothing).
    Other(String),
}

impl UserTag {
    /// Reads one tag (case-sensitive, as RabbitMQ).
    pub fn parse(tag: &str) -> Self {
        match tag {
            "administrator" => Self::Administrator,
            "monitoring" => Self::Monitoring,
            "policymaker" => Self::Policymaker,
            "management" => Self::Management,
            "impersonator" => Self::Impersonator,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Reads RabbitMQ's comma-separated form (`rabbitmqctl set_user_tags`, older definitions, the HTTP
    /// API's `tags` string); blanks are dropped.
    pub fn parse_list(tags: &str) -> Vec<Self> {
        tags.split(',').map(str::trim).filter(|t| !t.is_empty()).map(Self::parse).collect()
    }

    /// The tag's name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Administrator => "administrator",
            Self::Monitoring => "monitoring",
            Self::Policymaker => "policymaker",
            Self::Management => "management",
            Self::Impersonator => "impersonator",
            Self::Other(s) => s,
        }
    }
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// The salted password hash; `None` = no password login (RabbitMQ's users with an empty hash, e.g.
    /// certificate-only users).
    pub password_hash: Option<PasswordHash>,
    /// Tags (management rights, impersonation).
    pub tags: Vec<UserTag>,
    /// Connection and channel limits.
    pub limits: UserLimits,
}

impl User {
    /// A user with a SHA-256 hash of `password` and the given tags, no limits.
    pub fn with_password(
        name: impl Into<String>,
        password: &[u8],
        tags: Vec<UserTag>,
    ) -> Result<Self, super::password::PasswordHashError> {
        Ok(Self {
            name: name.into(),
            password_hash: Some(PasswordHash::new(password)?),
            tags,
            limits: UserLimits::default(),
        })
    }

    /// Whether the user has `tag`.
    pub fn has_tag(&self, tag: &UserTag) -> bool {
        self.tags.contains(tag)
    }

    /// What the user's tags allow in the HTTP API.
    pub fn management_rights(&self) -> ManagementRights {
        ManagementRights::from_tags(&self.tags)
    }
}

/// Something the HTTP API lets some users do, by tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiAction {
    /// Log in to the API; see the vhosts the user has permissions in and their queues, exchanges, bindings
    /// and statistics; see and close its own connections and channels.
    UseApi,
    /// See and change policies and parameters in the vhosts the user has permissions in.
    ManagePolicies,
    /// See every vhost, including those the user has no permissions in.
    SeeAllVhosts,
    /// See other users' connections and channels.
    SeeOthersConnections,
    /// See node-level data (memory, disk, store, alarms) and global statistics.
    SeeNode,
    /// Close other users' connections.
    CloseOthersConnections,
    /// Create and delete vhosts.
    ManageVhosts,
    /// See, create, change and delete users (and their limits).
    ManageUsers,
    /// See, set and clear permissions, topic permissions and vhost limits.
    ManagePermissions,
}

/// What a set of tags allows in the HTTP API (RabbitMQ's management permission levels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagementRights {
    /// `management` or any higher tag.
    pub management: bool,
    /// `policymaker` or `administrator`.
    pub policymaker: bool,
    /// `monitoring` or `administrator`.
    pub monitoring: bool,
    /// `administrator`.
    pub administrator: bool,
}

impl ManagementRights {
    /// The rights `tags` confer; each level includes the ones below it, as in RabbitMQ.
    pub fn from_tags(tags: &[UserTag]) -> Self {
        let administrator = tags.contains(&UserTag::Administrator);
        let monitoring = administrator || tags.contains(&UserTag::Monitoring);
        let policymaker = administrator || tags.contains(&UserTag::Policymaker);
        let management = monitoring || policymaker || tags.contains(&UserTag::Management);
        Self { management, policymaker, monitoring, administrator }
    }

    /// Whether these rights allow `action`. Vhost-scoped actions (`UseApi`, `ManagePolicies`) still need
    /// the user to have permissions in the vhost, unless `SeeAllVhosts` is allowed.
    pub fn allows(&self, action: ApiAction) -> bool {
        match action {
            ApiAction::UseApi => self.management,
            ApiAction::ManagePolicies => self.policymaker,
            ApiAction::SeeAllVhosts | ApiAction::SeeOthersConnections | ApiAction::SeeNode => self.monitoring,
            ApiAction::CloseOthersConnections
            | ApiAction::ManageVhosts
            | ApiAction::ManageUsers
            | ApiAction::ManagePermissions => self.administrator,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ApiAction::*;

    const ALL: [ApiAction; 9] = [
        UseApi,
        ManagePolicies,
        SeeAllVhosts,
        SeeOthersConnections,
        SeeNode,
        CloseOthersConnections,
        ManageVhosts,
        ManageUsers,
        ManagePermissions,
    ];

    fn allowed(tags: &str) -> Vec<ApiAction> {
        let rights = ManagementRights::from_tags(&UserTag::parse_list(tags));
        ALL.into_iter().filter(|a| rights.allows(*a)).collect()
    }

    /// RabbitMQ's management guide, "Permissions" table, one row per tag.
    #[test]
    fn tags_grant_what_rabbitmq_grants() {
        assert_eq!(allowed(""), vec![]);
        assert_eq!(allowed("impersonator,custom"), vec![]);
        assert_eq!(allowed("management"), vec![UseApi]);
        assert_eq!(allowed("policymaker"), vec![UseApi, ManagePolicies]);
        assert_eq!(allowed("monitoring"), vec![UseApi, SeeAllVhosts, SeeOthersConnections, SeeNode]);
        assert_eq!(
            allowed("monitoring, policymaker"),
            vec![UseApi, ManagePolicies, SeeAllVhosts, SeeOthersConnections, SeeNode]
        );
        assert_eq!(allowed("administrator"), ALL.to_vec());
    }

    #[test]
    fn tags_parse_and_print() {
        let tags = UserTag::parse_list("administrator, monitoring,,x-custom");
        assert_eq!(tags, vec![UserTag::Administrator, UserTag::Monitoring, UserTag::Other("x-custom".into())]);
        assert_eq!(tags.iter().map(UserTag::as_str).collect::<Vec<_>>(), ["administrator", "monitoring", "x-custom"]);
        for t in ["administrator", "monitoring", "policymaker", "management", "impersonator"] {
            assert_eq!(UserTag::parse(t).as_str(), t);
            assert!(!matches!(UserTag::parse(t), UserTag::Other(_)));
        }
        // Case matters, as in RabbitMQ.
        assert_eq!(UserTag::parse("Administrator"), UserTag::Other("Administrator".into()));
    }

    #[test]
    fn user_with_password() {
        let u = User::with_password("alice", b"s3cret", vec![UserTag::Management]).unwrap();
        assert!(u.password_hash.as_ref().unwrap().verify(b"s3cret"));
        assert!(u.has_tag(&UserTag::Management));
        assert!(u.management_rights().allows(UseApi));
        assert!(!u.management_rights().allows(ManageUsers));
    }
}
