//! The default user of a blank node: `--default-user`/`--default-pass` (or `MAILROOM_DEFAULT_USER` /
//! `MAILROOM_DEFAULT_PASS`, like `RABBITMQ_DEFAULT_USER`/`_PASS`), else `guest`/`guest`, created with the
//! `administrator` tag and full permissions on the default vhost when the registry has no users (first
//! start, nothing imported), as RabbitMQ does.
//!
//! Unlike RabbitMQ, a default user without a password is an error rather than a user with password
//! `guest`: a network-facing broker should not invent a well-known password for a chosen name.

use super::permissions::Permissions;
use super::registry::{AccessControl, RegistryError};
use super::user::UserTag;

/// The environment variable naming the default user.
pub const ENV_DEFAULT_USER: &str = "MAILROOM_DEFAULT_USER";
/// The environment variable holding the default user's password.
pub const ENV_DEFAULT_PASS: &str = "MAILROOM_DEFAULT_PASS";

/// The user a blank node is created with. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DefaultUser {
    /// The name.
    pub name: String,
    /// The password (hashed when the user is created).
    pub password: String,
}

impl std::fmt::Debug for DefaultUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultUser").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A default user that cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// A name without a password, or a password without a name.
    #[error("--default-user and --default-pass ({ENV_DEFAULT_USER} / {ENV_DEFAULT_PASS}) must be given together")]
    Incomplete,
    /// An empty name.
    #[error("the default user's name is empty")]
    EmptyName,
    /// Creating the user failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl DefaultUser {
    /// `guest`/`guest` (restricted to loopback by the default `--loopback-users`).
    pub fn guest() -> Self {
        Self { name: "guest".into(), password: "guest".into() }
    }

    /// Picks the default user: command-line values first, then the environment (read through `env`, so
    /// tests need not touch the process environment), else `guest`/`guest`.
    pub fn resolve(
        cli_user: Option<&str>,
        cli_pass: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, BootstrapError> {
        let user = cli_user.map(str::to_owned).or_else(|| env(ENV_DEFAULT_USER));
        let pass = cli_pass.map(str::to_owned).or_else(|| env(ENV_DEFAULT_PASS));
        match (user, pass) {
            (None, None) => Ok(Self::guest()),
            (Some(name), Some(password)) if !name.is_empty() => Ok(Self { name, password }),
            (Some(_), Some(_)) => Err(BootstrapError::EmptyName),
            _ => Err(BootstrapError::Incomplete),
        }
    }

    /// Reads the real process environment.
    pub fn resolve_from_env(cli_user: Option<&str>, cli_pass: Option<&str>) -> Result<Self, BootstrapError> {
        Self::resolve(cli_user, cli_pass, |k| std::env::var(k).ok())
    }
}

impl AccessControl {
    /// On a blank node (no users at all), creates `default` with the `administrator` tag and full
    /// permissions on `vhost`. Returns whether it did; a node with users (restored or imported) is left
    /// alone, as RabbitMQ creates its default user only on first boot.
    pub fn bootstrap(&self, default: &DefaultUser, vhost: &str) -> Result<bool, BootstrapError> {
        if !self.is_empty() {
            return Ok(false);
        }
        self.add_user(&default.name, default.password.as_bytes(), vec![UserTag::Administrator])?;
        self.set_permissions(&default.name, vhost, Permissions::full())?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::registry::{AuthError, LoopbackUsers};
    use super::super::table::Operation;
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn resolve_prefers_flags_then_env_then_guest() {
        assert_eq!(DefaultUser::resolve(None, None, env(&[])), Ok(DefaultUser::guest()));
        let from_env = DefaultUser::resolve(None, None, env(&[(ENV_DEFAULT_USER, "ops"), (ENV_DEFAULT_PASS, "pw")]));
        assert_eq!(from_env, Ok(DefaultUser { name: "ops".into(), password: "pw".into() }));
        let flags =
            DefaultUser::resolve(Some("admin"), Some("x"), env(&[(ENV_DEFAULT_USER, "ops"), (ENV_DEFAULT_PASS, "pw")]));
        assert_eq!(flags, Ok(DefaultUser { name: "admin".into(), password: "x".into() }));
        // A flag and an env var may complete each other.
        let mixed = DefaultUser::resolve(Some("admin"), None, env(&[(ENV_DEFAULT_PASS, "pw")]));
        assert_eq!(mixed, Ok(DefaultUser { name: "admin".into(), password: "pw".into() }));
        assert_eq!(DefaultUser::resolve(Some("admin"), None, env(&[])), Err(BootstrapError::Incomplete));
        assert_eq!(DefaultUser::resolve(None, Some("pw"), env(&[])), Err(BootstrapError::Incomplete));
        assert_eq!(DefaultUser::resolve(Some(""), Some("pw"), env(&[])), Err(BootstrapError::EmptyName));
        assert!(!format!("{:?}", DefaultUser::guest()).contains("password"));
    }

    #[test]
    fn guest_bootstrap_is_loopback_only() {
        let ac = AccessControl::default();
        assert!(ac.bootstrap(&DefaultUser::guest(), "/").unwrap());
        let u = ac.authenticate("guest", b"guest", true).unwrap();
        assert!(u.management_rights().administrator);
        assert_eq!(ac.authenticate("guest", b"guest", false), Err(AuthError::LoopbackOnly("guest".into())));
        ac.vhost_access("guest", "/").unwrap().check(&Operation::Get { queue: "q" }).unwrap();
        // Second start: users exist, nothing is created or changed.
        ac.change_password("guest", b"changed").unwrap();
        assert!(!ac.bootstrap(&DefaultUser::guest(), "/").unwrap());
        assert!(ac.authenticate("guest", b"guest", true).is_err());
    }

    #[test]
    fn a_chosen_default_user_replaces_guest_and_may_log_in_remotely() {
        let ac = AccessControl::new(LoopbackUsers::default());
        let admin = DefaultUser { name: "admin".into(), password: "s3cret".into() };
        assert!(ac.bootstrap(&admin, "/").unwrap());
        assert!(ac.user("guest").is_none());
        let u = ac.authenticate("admin", b"s3cret", false).unwrap();
        assert!(u.management_rights().administrator);
        assert_eq!(ac.permissions("admin", "/"), Some(Permissions::full()));
    }
}
