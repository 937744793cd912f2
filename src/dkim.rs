//! DKIM signing (RFC 6376; Ed25519 by RFC 8463), per sender domain, with the keys of `[[dkim]]`.
//! A message is signed once it is built, before it goes to a relay: each key of the From
//! domain adds one `DKIM-Signature` header, relaxed/relaxed. mail-auth does the canonicalisation
//! and the signing, on aws-lc-rs (whose RSA is constant-time; the pure-Rust `rsa` crate carries
//! RUSTSEC-2023-0071).

use std::collections::HashMap;

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls_pki_types::PrivateKeyDer;

use crate::config::{ConfigError, DkimAlgorithm, DkimEntry, MIN_RSA_BITS, pem};

/// One key, ready to sign.
struct Signer {
    signer: DkimSigner<DkimKey, Done>,
    /// For the log: `selector` and algorithm.
    selector: String,
}

/// The signers of every configured domain.
pub struct Signers {
    by_domain: HashMap<String, Vec<Signer>>,
}

/// A key read from its file, with what its DNS record publishes.
struct LoadedKey {
    key: DkimKey,
    /// The `p=` of its record: the SubjectPublicKeyInfo (RSA) or the raw key (Ed25519).
    public: Vec<u8>,
}

impl Signers {
    /// Reads and checks every key (entries already validated). An error names the entry's key.
    pub fn new(entries: &[DkimEntry]) -> Result<Self, ConfigError> {
        let mut by_domain: HashMap<String, Vec<Signer>> = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            let loaded = load_key(index, entry)?;
            let signer = DkimSigner::from_key(loaded.key)
                .domain(entry.domain.clone())
                .selector(entry.selector.clone())
                .headers(entry.headers.iter().cloned())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            by_domain
                .entry(entry.domain.clone())
                .or_default()
                .push(Signer {
                    signer,
                    selector: format!("{} ({})", entry.selector, entry.algorithm.name()),
                });
        }
        Ok(Self { by_domain })
    }

    /// Signs `message` with every key of `from_domain` (lower case), adding their headers at
    /// its top; a domain without a key leaves it as it is. An error (the crypto library
    /// failed) leaves the message unsigned.
    pub fn sign(&self, from_domain: &str, message: &mut Vec<u8>) -> Result<(), String> {
        let Some(signers) = self.by_domain.get(from_domain) else {
            return Ok(());
        };
        let mut headers = Vec::with_capacity(signers.len() * 512);
        for signer in signers {
            let signature = signer.signer.sign(message).map_err(|e| {
                format!(
                    "DKIM signing for {from_domain} with {} failed: {e}",
                    signer.selector
                )
            })?;
            signature.write_header(&mut headers);
        }
        message.splice(0..0, headers);
        Ok(())
    }
}

/// The DNS TXT record that publishes the key of `entry`: its name and its value.
pub fn record(index: usize, entry: &DkimEntry) -> Result<(String, String), ConfigError> {
    let loaded = load_key(index, entry)?;
    let k = match entry.algorithm {
        DkimAlgorithm::RsaSha256 => "rsa",
        DkimAlgorithm::Ed25519Sha256 => "ed25519",
    };
    let p = base64::engine::general_purpose::STANDARD.encode(&loaded.public);
    Ok((
        format!("{}._domainkey.{}", entry.selector, entry.domain),
        format!("v=DKIM1; k={k}; p={p}"),
    ))
}

/// Splits a TXT value into the quoted strings of a zone file line: 255 bytes at most each.
pub fn quoted_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads the key of entry `index` and checks it against the entry's algorithm and, for RSA,
/// its size.
fn load_key(index: usize, entry: &DkimEntry) -> Result<LoadedKey, ConfigError> {
    let key_name = DkimEntry::key(index, "key_file");
    let bad = |message: String| ConfigError::new(key_name.clone(), message);
    let (_, der) = pem::read_private_key(&entry.key_file).map_err(&bad)?;
    let path = entry.key_file.display();
    let (is_rsa, is_ed25519) = kind_of(&der);
    match entry.algorithm {
        DkimAlgorithm::RsaSha256 => {
            if !is_rsa {
                return Err(bad(format!(
                    "{path} is not an RSA key{}, but dkim[{index}].algorithm is rsa-sha256",
                    if is_ed25519 { " (it is Ed25519)" } else { "" }
                )));
            }
            let pair = match &der {
                PrivateKeyDer::Pkcs1(pkcs1) => RsaKeyPair::from_der(pkcs1.secret_pkcs1_der()),
                PrivateKeyDer::Pkcs8(pkcs8) => RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()),
                _ => return Err(bad(format!("{path} is not an RSA key"))),
            }
            .map_err(|e| {
                // The library takes 2048 to 8192 bits.
                if e.to_string().contains("TooSmall") {
                    bad(format!(
                        "{path} is an RSA key of fewer than {MIN_RSA_BITS} bits: too weak \
                         (receivers ignore short keys)"
                    ))
                } else {
                    bad(format!("{path}: the RSA key is not usable: {e}"))
                }
            })?;
            let bits = pair.public_modulus_len() * 8;
            if bits < MIN_RSA_BITS {
                return Err(bad(format!(
                    "{path} is an RSA key of {bits} bits: too weak, at least {MIN_RSA_BITS} are \
                     needed (receivers ignore shorter keys)"
                )));
            }
            let public = pair
                .public_key()
                .as_der()
                .map_err(|e| bad(format!("{path}: cannot encode its public key: {e}")))?
                .as_ref()
                .to_vec();
            let key = RsaKey::<Sha256>::from_key_der(der.clone_key())
                .map_err(|e| bad(format!("{path}: the RSA key is not usable: {e}")))?;
            Ok(LoadedKey {
                key: key.into(),
                public,
            })
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let PrivateKeyDer::Pkcs8(pkcs8) = &der else {
                return Err(bad(format!(
                    "{path} is not an Ed25519 key (PKCS#8, `BEGIN PRIVATE KEY`), but \
                     dkim[{index}].algorithm is ed25519-sha256"
                )));
            };
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8.secret_pkcs8_der())
                .map_err(|_| {
                    bad(format!(
                        "{path} is not an Ed25519 key{}, but dkim[{index}].algorithm is \
                         ed25519-sha256",
                        if is_rsa { " (it is RSA)" } else { "" }
                    ))
                })?;
            let public = pair.public_key().as_ref().to_vec();
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                .map_err(|e| bad(format!("{path}: the Ed25519 key is not usable: {e}")))?;
            Ok(LoadedKey {
                key: key.into(),
                public,
            })
        }
    }
}

/// The OIDs of the two key types in a PKCS#8 `AlgorithmIdentifier`, DER-encoded.
const RSA_ENCRYPTION_OID: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// Whether a key is RSA, and whether it is Ed25519, from its encoding: the algorithm's OID,
/// which opens a PKCS#8 document, so that a key the library refuses (an RSA key too small)
/// is still named for what it is.
fn kind_of(der: &PrivateKeyDer<'_>) -> (bool, bool) {
    match der {
        PrivateKeyDer::Pkcs1(_) => (true, false),
        PrivateKeyDer::Pkcs8(pkcs8) => {
            let head = &pkcs8.secret_pkcs8_der()[..pkcs8.secret_pkcs8_der().len().min(32)];
            let has = |oid: &[u8]| head.windows(oid.len()).any(|w| w == oid);
            (has(RSA_ENCRYPTION_OID), has(ED25519_OID))
        }
        _ => (false, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_txt_value_is_split_into_strings_of_255_bytes() {
        let value = "a".repeat(300);
        let quoted = quoted_strings(&value);
        assert_eq!(
            quoted,
            format!("\"{}\" \"{}\"", "a".repeat(255), "a".repeat(45))
        );
    }
}
