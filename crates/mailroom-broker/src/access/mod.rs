//! The access model, after RabbitMQ's: users with salted password hashes, tags and limits; per-vhost
//! permissions and topic permissions; RabbitMQ's access-control table; vhost and user limits; the
//! registry that authenticates and hands out per-vhost grants; and the users/permissions/limits sections
//! of RabbitMQ's definitions JSON.
//!
//! It knows nothing about sockets or frames: the wire layer asks it questions ("may this user log in
//! from here?", "may this channel publish to that exchange?") and maps its typed errors to reply codes.

pub mod bootstrap;
pub mod cache;
pub mod definitions;
pub mod limits;
pub mod password;
pub mod permissions;
pub mod registry;
pub mod store;
pub mod table;
pub mod usage;
pub mod user;

pub use bootstrap::{BootstrapError, DefaultUser};
pub use definitions::{AccessDefinitions, AccessImportCounts, DefinitionsError, UserBody};
pub use limits::{LimitError, UserLimits, VhostLimits};
pub use password::{HashingAlgorithm, PasswordHash, PasswordHashError};
pub use permissions::{AccessError, Permission, Permissions, ResourceKind, TopicPermissions};
pub use registry::{
    AccessControl, AuthError, AuthenticatedUser, ChannelAccess, LoopbackUsers, RegistryError, UserDeleted,
};
pub use store::{AccessFile, AccessStoreError};
pub use table::{Operation, VhostAccess};
pub use usage::ChannelSlot;
pub use user::{ApiAction, ManagementRights, User, UserTag};
