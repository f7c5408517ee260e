//! The login name SASL EXTERNAL takes from a verified client certificate, worded exactly as RabbitMQ 3.10
//! words it (`rabbit_ssl:peer_cert_auth_name`, `rabbit_cert_info`): the subject's distinguished name in
//! RFC 4514 order (last RDN first, no spaces: `CN=alice,O=Org,C=GB`), or with `--ssl-cert-login-from
//! common_name` the common name (several joined with `,`), so users made for RabbitMQ keep their names.
//!
//! Only the subject is read, from the certificate's DER with a small bounds-checked reader: rustls has
//! already verified the certificate, and nothing here allocates by a length the bytes announce.

/// Where the login name comes from (RabbitMQ's `ssl_cert_login_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CertLoginFrom {
    /// The subject's distinguished name (RabbitMQ's default).
    #[default]
    DistinguishedName,
    /// The subject's common name.
    CommonName,
}

impl std::str::FromStr for CertLoginFrom {
    type Err = String;
    /// `distinguished_name` or `common_name`, as RabbitMQ spells them.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "distinguished_name" => Ok(Self::DistinguishedName),
            "common_name" => Ok(Self::CommonName),
            other => Err(format!("--ssl-cert-login-from must be distinguished_name or common_name, not '{other}'")),
        }
    }
}

/// A certificate whose subject cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read the certificate's subject: {0}")]
pub struct CertNameError(&'static str);

/// A certificate's subject, as RabbitMQ renders it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSubject {
    /// The distinguished name, e.g. `CN=alice,O=Org`.
    pub distinguished_name: String,
    /// The common names, in certificate order, unescaped.
    pub common_names: Vec<String>,
}

impl CertSubject {
    /// Reads the subject of a DER-encoded X.509 certificate.
    pub fn from_der(cert: &[u8]) -> Result<Self, CertNameError> {
        let certificate = Der(cert).expect(SEQUENCE)?;
        let mut tbs = Der(Der(certificate).expect(SEQUENCE)?);
        if tbs.peek() == Some(0xa0) {
            tbs.read()?; // [0] version
        }
        tbs.expect(0x02)?; // serial number
        tbs.expect(SEQUENCE)?; // signature algorithm
        tbs.expect(SEQUENCE)?; // issuer
        tbs.expect(SEQUENCE)?; // validity
        let mut rdns = Der(tbs.expect(SEQUENCE)?);
        let mut formatted = Vec::new();
        let mut common_names = Vec::new();
        while !rdns.0.is_empty() {
            let mut set = Der(rdns.expect(SET)?);
            let mut parts = Vec::new();
            while !set.0.is_empty() {
                let mut attribute = Der(set.expect(SEQUENCE)?);
                let oid = oid_text(attribute.expect(0x06)?)?;
                let (tag, value) = attribute.read()?;
                let text = directory_string(tag, value);
                let name = attribute_name(&oid).map(str::to_owned).unwrap_or(oid.clone());
                parts.push(format!("{name}={}", escape(&text)));
                if oid == COMMON_NAME {
                    common_names.push(String::from_utf8_lossy(&text).into_owned());
                }
            }
            formatted.push(parts.join("+"));
        }
        formatted.reverse();
        Ok(Self { distinguished_name: formatted.join(","), common_names })
    }

    /// The login name `from` says to use; None when the certificate has no common name to use.
    pub fn login_name(&self, from: CertLoginFrom) -> Option<String> {
        match from {
            CertLoginFrom::DistinguishedName => Some(self.distinguished_name.clone()),
            CertLoginFrom::CommonName if self.common_names.is_empty() => None,
            CertLoginFrom::CommonName => Some(self.common_names.join(",")),
        }
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const COMMON_NAME: &str = "2.5.4.3";

/// A DER reader over the bytes left.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next element's tag and contents (single-byte tags, definite lengths up to 4 bytes).
    fn read(&mut self) -> Result<(u8, &'a [u8]), CertNameError> {
        let [tag, first, rest @ ..] = self.0 else { return Err(CertNameError("truncated element")) };
        let (len, rest) = match *first {
            n @ 0..=0x7f => (usize::from(n), rest),
            n @ 0x81..=0x84 => {
                let width = usize::from(n & 0x7f);
                let bytes = rest.get(..width).ok_or(CertNameError("truncated length"))?;
                let len = bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                (len, &rest[width..])
            }
            _ => return Err(CertNameError("unsupported length")),
        };
        let contents = rest.get(..len).ok_or(CertNameError("element longer than its container"))?;
        self.0 = &rest[len..];
        Ok((*tag, contents))
    }

    fn expect(&mut self, tag: u8) -> Result<&'a [u8], CertNameError> {
        match self.read()? {
            (t, contents) if t == tag => Ok(contents),
            _ => Err(CertNameError("unexpected element")),
        }
    }
}

/// An OID in dotted decimal.
fn oid_text(bytes: &[u8]) -> Result<String, CertNameError> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if value > u64::MAX >> 7 {
            return Err(CertNameError("OID arc too large"));
        }
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.extend([first, value - first * 40]);
            } else {
                arcs.push(value);
            }
            value = 0;
        } else if i == bytes.len() - 1 {
            return Err(CertNameError("truncated OID"));
        }
    }
    if arcs.is_empty() {
        return Err(CertNameError("empty OID"));
    }
    Ok(arcs.iter().map(u64::to_string).collect::<Vec<_>>().join("."))
}

/// RabbitMQ's short names for attribute types (`rabbit_cert_info:format_rdn`); others are dotted OIDs.
fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.4" => "SN",
        "2.5.4.42" => "GIVENNAME",
        "2.5.4.43" => "INITIALS",
        "2.5.4.44" => "GENERATIONQUALIFIER",
        COMMON_NAME => "CN",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "TITLE",
        "2.5.4.6" => "C",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.65" => "PSEUDONYM",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAILADDRESS",
        "2.5.4.9" => "STREET",
        "0.9.2342.19200300.100.1.1" => "UID",
        _ => return None,
    })
}

/// A directory string's UTF-8 bytes: UTF8String, PrintableString, IA5String and VisibleString as they are,
/// TeletexString as Latin-1, BMPString as UCS-2 and UniversalString as UCS-4 (as RabbitMQ converts them).
/// Another type is rendered as RFC 4514's `#` and the hex of its DER (RabbitMQ prints an Erlang term).
fn directory_string(tag: u8, value: &[u8]) -> Vec<u8> {
    let from_chars = |chars: &mut dyn Iterator<Item = u32>| -> Vec<u8> {
        chars.map(|c| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER)).collect::<String>().into_bytes()
    };
    match tag {
        0x0c | 0x13 | 0x16 | 0x1a => value.to_vec(),
        0x14 => from_chars(&mut value.iter().map(|&b| u32::from(b))),
        0x1e => from_chars(&mut value.chunks_exact(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))),
        0x1c => from_chars(&mut value.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))),
        _ => {
            let mut out = format!("#{tag:02x}{:02x}", value.len().min(0x7f));
            for b in value {
                out.push_str(&format!("{b:02x}"));
            }
            out.into_bytes()
        }
    }
}

/// RFC 4514 escaping as RabbitMQ does it (`escape_rdn_value`): a leading space or `#` and a trailing
/// space, `"+,;<>\` with a backslash, and every byte below 32 or from 126 up as `\XX`.
fn escape(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.len().saturating_sub(1);
    for (i, &c) in value.iter().enumerate() {
        match c {
            b' ' | b'#' if i == 0 => {
                out.push('\\');
                out.push(char::from(c));
            }
            b' ' if i == last => out.push_str("\\ "),
            b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\' => {
                out.push('\\');
                out.push(char::from(c));
            }
            0..=31 | 126..=255 => out.push_str(&format!("\\{c:02X}")),
            _ => out.push(char::from(c)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair};

    fn cert(entries: &[(DnType, DnValue)]) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in entries {
            params.distinguished_name.push(t.clone(), v.clone());
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.into())
    }

    #[test]
    fn distinguished_name_in_rabbitmq_order() {
        let der = cert(&[
            (DnType::CountryName, DnValue::PrintableString("GB".try_into().unwrap())),
            (DnType::OrganizationName, utf8("Org")),
            (DnType::CommonName, utf8("alice")),
        ]);
        let s = CertSubject::from_der(&der).unwrap();
        assert_eq!(s.distinguished_name, "CN=alice,O=Org,C=GB");
        assert_eq!(s.login_name(CertLoginFrom::DistinguishedName).unwrap(), "CN=alice,O=Org,C=GB");
        assert_eq!(s.login_name(CertLoginFrom::CommonName).unwrap(), "alice");
    }

    #[test]
    fn escapes_and_other_attributes() {
        let der = cert(&[
            (
                DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 25]),
                DnValue::Ia5String("example".try_into().unwrap()),
            ),
            (DnType::OrganizationalUnitName, utf8("R&D, \"east\"")),
            (DnType::CustomDnType(vec![1, 3, 6, 1, 4, 1, 99999, 1]), utf8("x")),
            (DnType::CommonName, utf8("#bob ")),
            (DnType::LocalityName, utf8("Zürich")),
        ]);
        let s = CertSubject::from_der(&der).unwrap();
        assert_eq!(
            s.distinguished_name,
            "L=Z\\C3\\BCrich,CN=\\#bob\\ ,1.3.6.1.4.1.99999.1=x,OU=R&D\\, \\\"east\\\",DC=example"
        );
        assert_eq!(s.common_names, ["#bob "]);
    }

    #[test]
    fn several_or_no_common_names() {
        let s = CertSubject { distinguished_name: "CN=b,CN=a".into(), common_names: vec!["a".into(), "b".into()] };
        assert_eq!(s.login_name(CertLoginFrom::CommonName).unwrap(), "a,b");
        let der = cert(&[(DnType::OrganizationName, utf8("Org"))]);
        assert_eq!(CertSubject::from_der(&der).unwrap().login_name(CertLoginFrom::CommonName), None);
    }

    #[test]
    fn string_types_convert_to_utf8() {
        assert_eq!(directory_string(0x14, b"Z\xfcrich"), "Zürich".as_bytes());
        assert_eq!(directory_string(0x1e, &[0, b'a', 0x03, 0xbb]), "aλ".as_bytes());
        assert_eq!(directory_string(0x1c, &[0, 0, 0, b'a', 0, 1, 0xf6, 0x00]), "a😀".as_bytes());
        assert_eq!(escape(b" a "), "\\ a\\ ");
        assert_eq!(escape(b"a~\x01"), "a\\7E\\01");
        assert_eq!(oid_text(&[0x55, 0x04, 0x03]).unwrap(), "2.5.4.3");
        assert_eq!(oid_text(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]).unwrap(), "1.2.840.113549.1.9.1");
        assert!(oid_text(&[0x86]).is_err());
    }

    #[test]
    fn login_from_parses_rabbitmq_names() {
        assert_eq!("common_name".parse::<CertLoginFrom>().unwrap(), CertLoginFrom::CommonName);
        assert_eq!("distinguished_name".parse::<CertLoginFrom>().unwrap(), CertLoginFrom::DistinguishedName);
        assert!("cn".parse::<CertLoginFrom>().is_err());
    }

    proptest! {
        /// Arbitrary bytes, or a real certificate with bytes flipped or cut, never panic the reader.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), flip in any::<(usize, u8)>()) {
            let _ = CertSubject::from_der(&bytes);
            let mut der = cert(&[(DnType::CommonName, utf8("alice"))]);
            let i = flip.0 % der.len();
            der[i] ^= flip.1;
            let _ = CertSubject::from_der(&der);
            let _ = CertSubject::from_der(&der[..i]);
        }
    }
}
