//! Keeps the access registry on disk: `access.json` in the data directory, in RabbitMQ's definitions
//! format (users with their salted hashes, never plain passwords; permissions; topic permissions; vhost
//! limits as `vhost-limits` parameters), rewritten whole after every change.
//!
//! Why its own file rather than the definitions log: access changes are rare and small (a user, a grant),
//! so a whole rewrite costs nothing worth a log, and the file stays readable by `rabbitmqadmin`-style
//! tools. A write goes to `access.json.tmp`, is fsynced, renamed over `access.json`, and the directory
//! fsynced: a crash leaves the old or the new file, never a mix.

use super::definitions::{AccessDefinitions, DefinitionsError};
use super::registry::{AccessControl, Saver};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File name of the access file in the data directory.
pub const FILE_NAME: &str = "access.json";
const TMP_NAME: &str = "access.json.tmp";

/// A failure to read or write the access file.
#[derive(Debug, thiserror::Error)]
pub enum AccessStoreError {
    /// Reading, writing, fsyncing or renaming failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The file's definitions do not import.
    #[error("{path}: {source}")]
    Definitions {
        /// The file.
        path: PathBuf,
        /// Why.
        source: DefinitionsError,
    },
}

/// Where the registry is saved. Saves are serialised so that the last write holds the newest state.
#[derive(Debug)]
pub struct AccessFile {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl AccessFile {
    /// The access file of data directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), lock: Mutex::new(()) }
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the saved registry into `access`; whether there was a file.
    pub fn load_into(&self, access: &AccessControl) -> Result<bool, AccessStoreError> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(AccessStoreError::Io { what: "reading", path, source }),
        };
        let doc: serde_json::Value =
            serde_json::from_slice(&text).map_err(|source| AccessStoreError::Json { path: path.clone(), source })?;
        let defs = AccessDefinitions::from_json(&doc)
            .map_err(|source| AccessStoreError::Definitions { path: path.clone(), source })?;
        access.import(&defs).map_err(|source| AccessStoreError::Definitions { path, source })?;
        Ok(true)
    }

    /// Writes the registry's current state (tmp file, fsync, rename, fsync of the directory).
    pub fn save(&self, access: &AccessControl) -> Result<(), AccessStoreError> {
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // Read the state only once holding the lock: a later change waits and writes after us.
        let mut doc = serde_json::Map::new();
        access.export().write_json(&mut doc);
        let bytes = serde_json::to_vec_pretty(&serde_json::Value::Object(doc))
            .unwrap_or_else(|e| unreachable!("a JSON value serializes: {e}"));
        let tmp = self.dir.join(TMP_NAME);
        let io = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| AccessStoreError::Io { what, path, source }
        };
        let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("fsyncing", &tmp))?;
        drop(f);
        let path = self.path();
        std::fs::rename(&tmp, &path).map_err(io("renaming", &path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("fsyncing", &self.dir))?;
        Ok(())
    }
}

/// A registry that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The access file cannot be read or written.
    #[error(transparent)]
    Store(#[from] AccessStoreError),
    /// The default user cannot be created.
    #[error(transparent)]
    Bootstrap(#[from] super::bootstrap::BootstrapError),
}

/// A user of a data directory written before `access.json` existed (the old definitions' plain-text
/// users): `(name, password, tags)`.
pub type LegacyUser<'a> = (&'a str, &'a str, &'a [String]);

/// Opens a broker's registry: loads `access.json` from the data directory `dir` if there is one, else
/// upgrades the plain-text users of an older data directory (`legacy`, hashed now, with full permissions
/// on `default_vhost`, where they could log in before), then creates `default` on a blank node and saves
/// every later change to `dir`.
pub fn open_registry(
    loopback_users: super::registry::LoopbackUsers,
    default: &super::bootstrap::DefaultUser,
    default_vhost: &str,
    dir: Option<&Path>,
    legacy: &[LegacyUser<'_>],
) -> Result<AccessControl, OpenError> {
    let access = AccessControl::new(loopback_users);
    let file = dir.map(AccessFile::new);
    let loaded = match &file {
        Some(f) => f.load_into(&access)?,
        None => false,
    };
    if !loaded {
        for (name, password, tags) in legacy {
            let tags = tags.iter().map(|t| super::user::UserTag::parse(t)).collect();
            access.add_user(name, password.as_bytes(), tags).map_err(super::bootstrap::BootstrapError::from)?;
            access
                .set_permissions(name, default_vhost, super::permissions::Permissions::full())
                .map_err(super::bootstrap::BootstrapError::from)?;
        }
    }
    if access.bootstrap(default, default_vhost)? {
        tracing::info!(user = %default.name, vhost = default_vhost, "created the default user");
    }
    if let Some(f) = file {
        f.save(&access)?;
        access.save_changes_with(Saver(Box::new(move |access| {
            if let Err(e) = f.save(access) {
                // The change holds in memory; it is lost at restart unless a later save succeeds.
                tracing::error!(error = %e, "cannot save users and permissions");
            }
        })));
    }
    Ok(access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Permissions, UserTag, VhostLimits};

    #[test]
    fn a_saved_registry_loads_back_with_hashes_only() {
        let dir = std::env::temp_dir().join(format!("mailroom-access-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = AccessFile::new(&dir);
        let ac = AccessControl::default();
        ac.add_user("alice", b"s3cret", vec![UserTag::Management]).unwrap();
        ac.set_permissions("alice", "/", Permissions::new("^a", "^b", "^c").unwrap()).unwrap();
        ac.set_vhost_limits("/", VhostLimits { max_connections: Some(3), max_queues: None });
        file.save(&ac).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains("s3cret"), "no plain password on disk");

        let back = AccessControl::default();
        assert!(file.load_into(&back).unwrap());
        assert_eq!(back.authenticate("alice", b"s3cret", true).unwrap().tags, vec![UserTag::Management]);
        assert_eq!(back.permissions("alice", "/"), ac.permissions("alice", "/"));
        assert_eq!(back.vhost_limits("/").max_connections, Some(3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
