//! `[http]`: where the status page, metrics and health endpoints listen, and who may see
//! them. Plain data for the config file; `crate::http` serves it.

use std::net::SocketAddr;

use outpost_broker::config::{TlsConfig, UserConfig};
use serde::Deserialize;

/// `[http]`: the status page, metrics and health endpoints (off unless the table is present).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on; loopback by default. Any other address needs `[[http.users]]`.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Who may see the pages (HTTP Basic against argon2 PHC hashes, as `[[broker.users]]`;
    /// make one with `outpost passwd`). With users, every path but `/healthz` needs a login.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// `/readyz` counts a bridge whose link is down as ready while its spool is below
    /// this fraction of `spool.max_bytes` (0 means: ready only while connected).
    #[serde(default = "default_ready_spool_fraction")]
    pub ready_spool_fraction: f64,
    /// Open HTTP connections at once (event streams included); more wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTPS with these PEM files, as a broker listener's `tls` (`client_ca` too).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_ready_spool_fraction() -> f64 {
    0.5
}

fn default_max_connections() -> usize {
    32
}

impl HttpConfig {
    /// Checks the table; `Err` is (key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.bind.ip().is_loopback() && self.users.is_empty() {
            return Err((
                "http.bind".into(),
                format!(
                    "{} is reachable from other machines, so the status page needs a login: \
                     add [[http.users]] with name and password_hash (make one with \
                     `outpost passwd`), or bind 127.0.0.1",
                    self.bind
                ),
            ));
        }
        for (i, u) in self.users.iter().enumerate() {
            if !u.password_hash.starts_with('$') {
                return Err((
                    format!("http.users[{i}].password_hash"),
                    "must be a PHC hash string such as \"$argon2id$...\"; create one with \
                     `outpost passwd`"
                        .into(),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.ready_spool_fraction) {
            return Err((
                "http.ready_spool_fraction".into(),
                "must be between 0 and 1, e.g. 0.5".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(("http.max_connections".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HttpConfig, String> {
        let c: HttpConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()
            .map(|()| c)
            .map_err(|(k, m)| format!("{k}: {m}"))
    }

    #[test]
    fn loopback_by_default_and_exposure_needs_users() {
        let c = parse("").unwrap();
        assert!(c.bind.ip().is_loopback());
        assert!(c.users.is_empty());
        let e = parse("bind = \"0.0.0.0:8080\"").unwrap_err();
        assert!(
            e.starts_with("http.bind:") && e.contains("[[http.users]]"),
            "{e}"
        );
        let e = parse("bind = \"[::]:8080\"").unwrap_err();
        assert!(e.starts_with("http.bind:"), "{e}");
        parse(
            "bind = \"0.0.0.0:8080\"\n[[users]]\nname = \"tech\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA\"",
        )
        .unwrap();
        parse("bind = \"[::1]:8080\"").unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("[[users]]\nname = \"a\"\npassword_hash = \"plain\"").unwrap_err();
        assert!(e.starts_with("http.users[0].password_hash"), "{e}");
        let e = parse("ready_spool_fraction = 1.5").unwrap_err();
        assert!(e.starts_with("http.ready_spool_fraction"), "{e}");
        let e = parse("max_connections = 0").unwrap_err();
        assert!(e.starts_with("http.max_connections"), "{e}");
        assert!(parse("nonsense = 1").is_err(), "unknown keys are errors");
    }
}
