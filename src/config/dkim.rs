//! `[[dkim]]`: DKIM keys, per sender domain. The keys are read and checked here, so that a key
//! that cannot be used fails at start, naming its entry; the signing itself is `crate::dkim`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::enums::by_name;

/// A DKIM signature algorithm (RFC 6376, RFC 8463).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", remote = "Self")]
pub enum DkimAlgorithm {
    #[default]
    RsaSha256,
    Ed25519Sha256,
}
by_name!(DkimAlgorithm);

impl DkimAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

/// The headers signed unless an entry says otherwise: those a receiver shows or that change
/// how the message reads. A header the message lacks is signed as absent, so that it cannot be
/// added later.
pub const DEFAULT_SIGNED_HEADERS: [&str; 9] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Reply-To",
];

/// The smallest RSA key accepted: RFC 8301 requires 1024 bits at least and recommends 2048;
/// receivers such as Gmail treat shorter keys as no signature.
pub const MIN_RSA_BITS: usize = 2048;

/// One `[[dkim]]` entry: a key that signs the mail of one sender domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DkimEntry {
    /// The sender domain (`d=`): a job whose From address is in this domain is signed.
    pub domain: String,
    /// The selector (`s=`): the key's record is `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// The private key, PEM: PKCS#8 (RSA or Ed25519) or PKCS#1 (RSA).
    pub key_file: PathBuf,
    /// `rsa-sha256` (the default) or `ed25519-sha256`; must match the key.
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// The headers to sign (`h=`).
    #[serde(default = "default_headers")]
    pub headers: Vec<String>,
}

fn default_headers() -> Vec<String> {
    DEFAULT_SIGNED_HEADERS.map(String::from).to_vec()
}

impl DkimEntry {
    /// The key of entry `index` in errors: `dkim[0].key_file`.
    pub fn key(index: usize, field: &str) -> String {
        format!("dkim[{index}].{field}")
    }

    /// Checks the names; normalises the domain to lower case. The key file is read by
    /// `crate::dkim::Signers::new`, also at start.
    pub fn validate(&mut self, index: usize) -> Result<(), ConfigError> {
        let domain = self
            .domain
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if !is_dns_name(&domain) {
            return Err(ConfigError::new(
                Self::key(index, "domain"),
                format!(
                    "`{}` is not a domain name (letters, digits, hyphens, dots; an IDN in its \
                     xn-- form)",
                    self.domain
                ),
            ));
        }
        self.domain = domain;
        if !is_dns_name(&self.selector) {
            return Err(ConfigError::new(
                Self::key(index, "selector"),
                format!(
                    "`{}` is not a selector (letters, digits, hyphens, dots)",
                    self.selector
                ),
            ));
        }
        if self.headers.is_empty() {
            return Err(ConfigError::new(
                Self::key(index, "headers"),
                "is empty: at least From must be signed (RFC 6376 5.4)",
            ));
        }
        for name in &self.headers {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(ConfigError::new(
                    Self::key(index, "headers"),
                    format!("`{name}` is not a header name"),
                ));
            }
        }
        if !self.headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
            return Err(ConfigError::new(
                Self::key(index, "headers"),
                "must include From (RFC 6376 5.4)",
            ));
        }
        Ok(())
    }
}

/// Labels of letters, digits and hyphens, not starting or ending with a hyphen, joined by dots.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Checks every entry, and that no two name the same selector of one domain (they would publish
/// two keys at one DNS name). Two entries for one domain sign twice: RSA and Ed25519, as RFC 8463
/// recommends, or an old and a new key while rotating.
pub fn validate_all(entries: &mut [DkimEntry]) -> Result<(), ConfigError> {
    for (index, entry) in entries.iter_mut().enumerate() {
        entry.validate(index)?;
    }
    for (index, entry) in entries.iter().enumerate() {
        if let Some(first) = entries[..index].iter().position(|e| {
            e.domain == entry.domain && e.selector.eq_ignore_ascii_case(&entry.selector)
        }) {
            return Err(ConfigError::new(
                DkimEntry::key(index, "selector"),
                format!(
                    "dkim[{first}] already uses the selector {} for {}: each key needs its own \
                     selector (its own DNS record)",
                    entry.selector, entry.domain
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(domain: &str, selector: &str) -> DkimEntry {
        DkimEntry {
            domain: domain.into(),
            selector: selector.into(),
            key_file: "k.pem".into(),
            algorithm: DkimAlgorithm::RsaSha256,
            headers: default_headers(),
        }
    }

    #[test]
    fn names_are_checked_and_each_error_names_its_entry() {
        let mut ok = [entry("Example.COM.", "s2026")];
        validate_all(&mut ok).expect("valid");
        assert_eq!(ok[0].domain, "example.com", "normalised");

        let cases = [
            (entry("exa mple.com", "s"), "dkim[0].domain"),
            (entry("example.com", "bad_selector"), "dkim[0].selector"),
            (
                DkimEntry {
                    headers: vec!["Subject".into()],
                    ..entry("example.com", "s")
                },
                "dkim[0].headers",
            ),
            (
                DkimEntry {
                    headers: vec!["From:".into()],
                    ..entry("example.com", "s")
                },
                "dkim[0].headers",
            ),
        ];
        for (bad, key) in cases {
            let error = validate_all(&mut [bad]).expect_err("invalid");
            assert_eq!(error.key, key, "{error}");
        }
    }

    #[test]
    fn one_selector_per_key() {
        let rsa = entry("example.com", "rsa");
        let ed = DkimEntry {
            algorithm: DkimAlgorithm::Ed25519Sha256,
            ..entry("example.com", "ed")
        };
        validate_all(&mut [rsa.clone(), ed]).expect("RSA and Ed25519 for one domain");
        validate_all(&mut [rsa.clone(), entry("example.com", "rsa2")]).expect("a rotation");
        let error = validate_all(&mut [rsa.clone(), entry("EXAMPLE.com", "RSA")])
            .expect_err("one selector twice");
        assert_eq!(error.key, "dkim[1].selector");
        assert!(error.message.contains("dkim[0]"), "{error}");
    }
}
