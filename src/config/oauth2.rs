//! `[smtp.oauth2]` (and `oauth2` of a `relays.list` entry): where the XOAUTH2 access token comes
//! from. Either a file that something else keeps fresh, or the OAuth2 client-credentials flow.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::smtp::read_secret_file;
use super::{ConfigError, Secret};

/// The token source of one relay. Exactly one of `token_file` and `token_url` is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuth2Config {
    /// A file holding the current access token (trailing newline ignored), kept fresh by an
    /// agent or sidecar. Read at start, and again whenever it changes. Default unset.
    pub token_file: Option<PathBuf>,
    /// The token endpoint of the client-credentials flow (`https://`; `http://` only to a
    /// loopback address). Default unset.
    pub token_url: Option<String>,
    /// The client (application) id, with `token_url`. Default unset.
    pub client_id: Option<String>,
    /// The client secret, with `token_url`. Prefer `client_secret_file`. Default unset.
    pub client_secret: Option<Secret>,
    /// File holding the client secret; trailing newline ignored. Read while loading.
    /// Default unset.
    pub client_secret_file: Option<PathBuf>,
    /// The scope asked for, e.g. `https://outlook.office365.com/.default`. Default unset (none
    /// sent).
    pub scope: Option<String>,
}

impl OAuth2Config {
    /// Reads the client secret file and checks that the token source is complete and usable,
    /// naming keys under `section` (`smtp.oauth2`, `relays.list[1].oauth2`).
    pub(super) fn validate(&mut self, section: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{section}.{field}");
        match (&self.token_file, &self.token_url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    key("token_url"),
                    format!(
                        "set either {} or {}, not both",
                        key("token_file"),
                        key("token_url")
                    ),
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    key("token_file"),
                    format!(
                        "XOAUTH2 needs a token: set {} or {} (with client_id and \
                         client_secret_file)",
                        key("token_file"),
                        key("token_url")
                    ),
                ));
            }
            (Some(file), None) => {
                // Something else writes it; it must hold a token by the time the worker
                // starts, so that a wrong path fails here and not at the first send.
                let text = std::fs::read_to_string(file).map_err(|e| {
                    ConfigError::new(
                        key("token_file"),
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
                if text.trim().is_empty() {
                    return Err(ConfigError::new(
                        key("token_file"),
                        format!("{} is empty: it must hold the access token", file.display()),
                    ));
                }
                for field in ["client_id", "client_secret", "client_secret_file", "scope"] {
                    if self.is_set(field) {
                        return Err(ConfigError::new(
                            key(field),
                            format!("is for {}; {} is set", key("token_url"), key("token_file")),
                        ));
                    }
                }
            }
            (None, Some(url)) => {
                check_token_url(url)
                    .map_err(|message| ConfigError::new(key("token_url"), message))?;
                if self
                    .client_id
                    .as_deref()
                    .is_none_or(|id| id.trim().is_empty())
                {
                    return Err(ConfigError::new(
                        key("client_id"),
                        format!("{} is set, so a client id is needed", key("token_url")),
                    ));
                }
                read_secret_file(
                    &mut self.client_secret,
                    self.client_secret_file.as_deref(),
                    &key("client_secret"),
                    &key("client_secret_file"),
                )?;
                if self.client_secret.is_none() {
                    return Err(ConfigError::new(
                        key("client_secret_file"),
                        format!("{} is set, so a client secret is needed", key("token_url")),
                    ));
                }
            }
        }
        Ok(())
    }

    fn is_set(&self, field: &str) -> bool {
        match field {
            "client_id" => self.client_id.is_some(),
            "client_secret" => self.client_secret.is_some(),
            "client_secret_file" => self.client_secret_file.is_some(),
            "scope" => self.scope.is_some(),
            _ => false,
        }
    }
}

/// A token endpoint must be HTTPS: the client secret goes in the request. Plain HTTP is allowed
/// to a loopback address only (a local agent, the tests).
fn check_token_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "`{url}` is plain HTTP: the client secret would travel in clear; use https:// \
                     (http:// is allowed to a loopback address only)"
                ))
            }
        }
        other => Err(format!("`{url}`: the scheme must be https, not {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> OAuth2Config {
        OAuth2Config {
            token_url: Some("https://login.example/token".into()),
            client_id: Some("app".into()),
            client_secret: Some(Secret::new("s")),
            ..OAuth2Config::default()
        }
    }

    #[test]
    fn each_incomplete_source_names_its_key() {
        type Break = fn(&mut OAuth2Config);
        let cases: [(Break, &str); 6] = [
            (|c| c.token_url = None, "smtp.oauth2.token_file"),
            (
                |c| c.token_file = Some("/nonexistent/token".into()),
                "smtp.oauth2.token_url",
            ),
            (|c| c.client_id = None, "smtp.oauth2.client_id"),
            (|c| c.client_secret = None, "smtp.oauth2.client_secret_file"),
            (
                |c| c.token_url = Some("http://login.example/token".into()),
                "smtp.oauth2.token_url",
            ),
            (
                |c| c.client_secret_file = Some("/nonexistent/secret".into()),
                "smtp.oauth2.client_secret_file",
            ),
        ];
        assert!(endpoint().validate("smtp.oauth2").is_ok());
        for (break_it, key) in cases {
            let mut config = endpoint();
            break_it(&mut config);
            assert_eq!(config.validate("smtp.oauth2").expect_err(key).key, key);
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(check_token_url("http://127.0.0.1:8080/token").is_ok());
        assert!(check_token_url("http://localhost/token").is_ok());
        assert!(check_token_url("http://[::1]/token").is_ok());
        assert!(check_token_url("http://10.0.0.1/token").is_err());
        assert!(check_token_url("ftp://login.example/").is_err());
    }

    #[test]
    fn a_token_file_must_hold_a_token() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        let mut config = OAuth2Config {
            token_file: Some(path.clone()),
            ..OAuth2Config::default()
        };
        let missing = config
            .validate("relays.list[1].oauth2")
            .expect_err("missing");
        assert_eq!(missing.key, "relays.list[1].oauth2.token_file");
        std::fs::write(&path, "\n").expect("write");
        assert!(
            config
                .validate("smtp.oauth2")
                .expect_err("empty")
                .message
                .contains("empty")
        );
        std::fs::write(&path, "ya29.token\n").expect("write");
        config.validate("smtp.oauth2").expect("a token");
        config.scope = Some("x".into());
        assert_eq!(
            config.validate("smtp.oauth2").expect_err("scope").key,
            "smtp.oauth2.scope"
        );
    }
}
