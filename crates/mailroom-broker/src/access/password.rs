//! Salted password hashes in RabbitMQ's format, so that users exported from RabbitMQ keep their passwords.
//!
//! RabbitMQ's internal backend stores `base64(salt ‖ H(salt ‖ password))` with a 4-byte random salt, where
//! `H` is named by the user's `hashing_algorithm`: `rabbit_password_hashing_sha256` (the default since
//! 3.6), `rabbit_password_hashing_sha512`, or `rabbit_password_hashing_md5`, which is also what a
//! definitions file means when the field is absent (files from before 3.6). Verification recomputes the
//! digest with the stored salt and compares in constant time.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use md5::Md5;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// Length of the random salt that precedes the digest.
pub const SALT_LEN: usize = 4;

/// A password hashing function, as RabbitMQ names them in definitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashingAlgorithm {
    /// `rabbit_password_hashing_sha256` (RabbitMQ's default, and ours).
    Sha256,
    /// `rabbit_password_hashing_sha512`.
    Sha512,
    /// `rabbit_password_hashing_md5` (legacy; implied when a definitions file names no algorithm).
    Md5,
}

/// Why a stored hash or algorithm name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordHashError {
    /// The `hashing_algorithm` is not one RabbitMQ ships.
    #[error("unsupported hashing_algorithm '{0}'")]
    UnknownAlgorithm(String),
    /// The `password_hash` is not base64.
    #[error("password_hash is not valid base64")]
    NotBase64,
    /// The decoded hash is not a salt followed by a digest of the algorithm's length.
    #[error("password_hash has {actual} bytes, {algorithm} needs {expected} (4-byte salt and digest)")]
    WrongLength {
        /// The algorithm's RabbitMQ name.
        algorithm: &'static str,
        /// Salt plus digest length.
        expected: usize,
        /// What the hash decoded to.
        actual: usize,
    },
    /// The operating system's random number generator failed (no salt could be drawn).
    #[error("cannot draw a random salt: {0}")]
    Rng(String),
}

impl HashingAlgorithm {
    /// The name RabbitMQ uses in definitions (`hashing_algorithm`).
    pub fn rabbitmq_name(self) -> &'static str {
        match self {
            Self::Sha256 => "rabbit_password_hashing_sha256",
            Self::Sha512 => "rabbit_password_hashing_sha512",
            Self::Md5 => "rabbit_password_hashing_md5",
        }
    }

    /// Reads a definitions file's `hashing_algorithm`; absent means MD5, as RabbitMQ reads old files.
    pub fn from_rabbitmq_name(name: Option<&str>) -> Result<Self, PasswordHashError> {
        match name {
            None => Ok(Self::Md5),
            Some("rabbit_password_hashing_sha256") => Ok(Self::Sha256),
            Some("rabbit_password_hashing_sha512") => Ok(Self::Sha512),
            Some("rabbit_password_hashing_md5") => Ok(Self::Md5),
            Some(other) => Err(PasswordHashError::UnknownAlgorithm(other.to_owned())),
        }
    }

    /// The digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha512 => 64,
            Self::Md5 => 16,
        }
    }

    fn digest(self, salt: &[u8; SALT_LEN], password: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::new().chain_update(salt).chain_update(password).finalize().to_vec(),
            Self::Sha512 => Sha512::new().chain_update(salt).chain_update(password).finalize().to_vec(),
            Self::Md5 => Md5::new().chain_update(salt).chain_update(password).finalize().to_vec(),
        }
    }
}

/// A salted password hash. Its `Debug` output hides the digest.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    algorithm: HashingAlgorithm,
    salt: [u8; SALT_LEN],
    digest: Vec<u8>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHash").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl PasswordHash {
    /// Hashes `password` with SHA-256 and a fresh random salt (what `rabbitmqctl add_user` does).
    pub fn new(password: &[u8]) -> Result<Self, PasswordHashError> {
        Self::with_algorithm(password, HashingAlgorithm::Sha256)
    }

    /// Hashes `password` with `algorithm` and a fresh random salt.
    pub fn with_algorithm(password: &[u8], algorithm: HashingAlgorithm) -> Result<Self, PasswordHashError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::getrandom(&mut salt).map_err(|e| PasswordHashError::Rng(e.to_string()))?;
        Ok(Self::with_salt(password, algorithm, salt))
    }

    /// Hashes `password` with `algorithm` and the given salt (deterministic; for tests and imports).
    pub fn with_salt(password: &[u8], algorithm: HashingAlgorithm, salt: [u8; SALT_LEN]) -> Self {
        Self { algorithm, salt, digest: algorithm.digest(&salt, password) }
    }

    /// Reads a definitions file's `password_hash` (base64 of salt and digest) for `algorithm`.
    pub fn from_base64(algorithm: HashingAlgorithm, encoded: &str) -> Result<Self, PasswordHashError> {
        let bytes = BASE64.decode(encoded.trim()).map_err(|_| PasswordHashError::NotBase64)?;
        let expected = SALT_LEN + algorithm.digest_len();
        if bytes.len() != expected {
            return Err(PasswordHashError::WrongLength {
                algorithm: algorithm.rabbitmq_name(),
                expected,
                actual: bytes.len(),
            });
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[..SALT_LEN]);
        Ok(Self { algorithm, salt, digest: bytes[SALT_LEN..].to_vec() })
    }

    /// The `password_hash` a definitions export carries: base64 of salt and digest.
    pub fn to_base64(&self) -> String {
        let mut bytes = Vec::with_capacity(SALT_LEN + self.digest.len());
        bytes.extend_from_slice(&self.salt);
        bytes.extend_from_slice(&self.digest);
        BASE64.encode(bytes)
    }

    /// The hashing function.
    pub fn algorithm(&self) -> HashingAlgorithm {
        self.algorithm
    }

    /// Whether `password` hashes to this digest; the comparison takes the same time wherever the
    /// digests differ, so response times say nothing about how close a guess was.
    pub fn verify(&self, password: &[u8]) -> bool {
        let candidate = self.algorithm.digest(&self.salt, password);
        bool::from(candidate.ct_eq(&self.digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Exported by RabbitMQ 3.10.8 on the local node: `rabbitmqctl add_user sectest pw123`, then
    /// `rabbitmqctl export_definitions` (the same user is in testdata/rabbitmq-3.10.8-export.json).
    const RABBITMQ_SECTEST_PW123: &str = "XLzAOrwLW3UNWHalIrxlv5nfO5TMvu0OfDaxBgJd0l1i5qe5";
    /// The same export's `guest` user (password `guest`).
    const RABBITMQ_GUEST_GUEST: &str = "A0IOCnrhEGSve7OFSLX5+B9bhZSV8EVqc9mAigs7cP1VCtDb";

    #[test]
    fn verifies_hashes_made_by_rabbitmq() {
        let h = PasswordHash::from_base64(HashingAlgorithm::Sha256, RABBITMQ_SECTEST_PW123).unwrap();
        assert!(h.verify(b"pw123"));
        assert!(!h.verify(b"pw124"));
        assert!(!h.verify(b""));
        let g = PasswordHash::from_base64(HashingAlgorithm::Sha256, RABBITMQ_GUEST_GUEST).unwrap();
        assert!(g.verify(b"guest"));
        assert!(!g.verify(b"pw123"));
        // Round trip: what we export is what RabbitMQ exported.
        assert_eq!(h.to_base64(), RABBITMQ_SECTEST_PW123);
    }

    #[test]
    fn the_format_is_salt_then_digest_of_salt_and_password() {
        // Recomputed independently of PasswordHash: base64(salt ‖ sha256(salt ‖ password)).
        let salt = [0x90, 0x8d, 0xae, 0x01];
        let mut expected = salt.to_vec();
        expected.extend_from_slice(&Sha256::digest([&salt[..], b"secret"].concat()));
        let h = PasswordHash::with_salt(b"secret", HashingAlgorithm::Sha256, salt);
        assert_eq!(h.to_base64(), BASE64.encode(&expected));

        let mut expected = salt.to_vec();
        expected.extend_from_slice(&Sha512::digest([&salt[..], b"secret"].concat()));
        let h = PasswordHash::with_salt(b"secret", HashingAlgorithm::Sha512, salt);
        assert_eq!(h.to_base64(), BASE64.encode(&expected));

        let mut expected = salt.to_vec();
        expected.extend_from_slice(&Md5::digest([&salt[..], b"secret"].concat()));
        let h = PasswordHash::with_salt(b"secret", HashingAlgorithm::Md5, salt);
        assert_eq!(h.to_base64(), BASE64.encode(&expected));
    }

    #[test]
    fn algorithm_names() {
        assert_eq!(HashingAlgorithm::from_rabbitmq_name(None), Ok(HashingAlgorithm::Md5));
        for a in [HashingAlgorithm::Sha256, HashingAlgorithm::Sha512, HashingAlgorithm::Md5] {
            assert_eq!(HashingAlgorithm::from_rabbitmq_name(Some(a.rabbitmq_name())), Ok(a));
        }
        assert_eq!(
            HashingAlgorithm::from_rabbitmq_name(Some("rabbit_password_hashing_bcrypt")),
            Err(PasswordHashError::UnknownAlgorithm("rabbit_password_hashing_bcrypt".into()))
        );
    }

    #[test]
    fn malformed_hashes_are_rejected() {
        assert_eq!(PasswordHash::from_base64(HashingAlgorithm::Sha256, "%%%"), Err(PasswordHashError::NotBase64));
        // A SHA-256 hash read as SHA-512 has the wrong length.
        assert!(matches!(
            PasswordHash::from_base64(HashingAlgorithm::Sha512, RABBITMQ_SECTEST_PW123),
            Err(PasswordHashError::WrongLength { expected: 68, actual: 36, .. })
        ));
    }

    #[test]
    fn fresh_salts_differ_and_debug_hides_the_digest() {
        let a = PasswordHash::new(b"pw").unwrap();
        let b = PasswordHash::new(b"pw").unwrap();
        assert!(a.verify(b"pw") && b.verify(b"pw"));
        // Two 4-byte random salts collide with probability 2^-32.
        assert_ne!(a.to_base64(), b.to_base64());
        assert!(!format!("{a:?}").contains(&a.to_base64()));
    }

    proptest! {
        #[test]
        fn hash_verify_round_trip(
            password in proptest::collection::vec(any::<u8>(), 0..64),
            other in proptest::collection::vec(any::<u8>(), 0..64),
            salt in any::<[u8; 4]>(),
            alg in prop_oneof![Just(HashingAlgorithm::Sha256), Just(HashingAlgorithm::Sha512), Just(HashingAlgorithm::Md5)],
        ) {
            let h = PasswordHash::with_salt(&password, alg, salt);
            prop_assert!(h.verify(&password));
            prop_assert_eq!(h.verify(&other), other == password);
            let back = PasswordHash::from_base64(alg, &h.to_base64()).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert!(back.verify(&password));
        }
    }
}
