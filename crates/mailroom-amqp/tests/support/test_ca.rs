//! A certificate authority made inside a test, which signs server and client certificates (rcgen),
//! so the TLS tests need no files from outside. Included with `#[path]` by `src/tls.rs`'s unit tests
//! and by `tests/access_conn.rs`; each uses a subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// A self-signed CA and its key.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    /// A fresh CA whose subject is `CN=name`.
    pub fn new(name: &str) -> Self {
        // unwraps: rcgen fails only on malformed parameters, and these are fixed.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A certificate for `subject` ((type, value) in certificate order) with the subject alternative
    /// names `sans`, signed by this CA; `expired` puts its validity in the past. PEM cert and key.
    pub fn leaf(&self, subject: &[(DnType, &str)], sans: &[&str], expired: bool) -> (String, String) {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A leaf whose subject is just `CN=cn`.
    pub fn leaf_cn(&self, cn: &str, sans: &[&str], expired: bool) -> (String, String) {
        self.leaf(&[(DnType::CommonName, cn)], sans, expired)
    }

    /// A client certificate for `O=Org, CN=cn`, no alternative names.
    pub fn client(&self, cn: &str) -> (String, String) {
        self.leaf(&[(DnType::OrganizationName, "Org"), (DnType::CommonName, cn)], &[], false)
    }

    /// The CA's own certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}
