//! The `[[bridge]]` configuration table: types, defaults and validation.
//!
//! Durations are humantime strings ("30s", "5m") or integer seconds; sizes are strings with
//! a binary or decimal unit ("512MiB", "2GB") or integer bytes; `outpost-units` parses both,
//! as it does for the rest of the file. Unknown keys are errors.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::ConfigError;
use crate::rules::TopicRule;

/// One `[[bridge]]` table: a link to one cloud broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Name of the link, used in the spool file name, status and `$SYS` topics.
    pub name: String,
    /// `mqtt://host:port`, `mqtts://host:port`, `ws://host:port/path` or `wss://host:port/path`;
    /// or an array of them (a cluster's nodes, or a primary and a standby).
    pub address: Addresses,
    /// With several addresses: false (default, as Mosquitto's `round_robin false`) treats
    /// the first as the primary and goes back to it once it is reachable again; true moves
    /// on to the next address on a failure and stays there.
    #[serde(default)]
    pub round_robin: bool,
    /// While connected to another address than the primary (with `round_robin = false`):
    /// how often the primary is probed (TCP, and TLS when used; default 60s).
    #[serde(
        default = "default_primary_retry",
        deserialize_with = "outpost_units::duration"
    )]
    pub primary_retry: Duration,
    /// With several addresses: true when they are nodes of one cluster that shares client
    /// sessions (a QoS 2 exchange begun on one node is finished on another); false (default)
    /// when they are independent brokers, each with its own session: on moving to another
    /// address the bridge starts a fresh session there and sends the QoS 2 messages that
    /// the previous broker had not completed as new messages (see docs/clouds.md).
    #[serde(default)]
    pub shared_session: bool,
    /// MQTT version spoken to the cloud: "5.0" (default) or "3.1.1".
    #[serde(default)]
    pub protocol: ProtocolVersion,
    /// Client identifier; defaults to `outpost-{gateway_id}-{name}`. It must stay fixed
    /// across restarts because the cloud session (and QoS 2 state) is keyed on it.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name for the cloud broker.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for the cloud broker.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (a trailing newline is ignored), read at start instead of
    /// an inline `password`: e.g. a systemd credential,
    /// `"$CREDENTIALS_DIRECTORY/cloud-password"` with `LoadCredential=` in the unit.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Keep alive sent in CONNECT (default 60s); also bounds half-open link detection.
    #[serde(
        default = "default_keep_alive",
        deserialize_with = "outpost_units::duration"
    )]
    pub keep_alive: Duration,
    /// Session expiry requested from a 5.0 cloud (default 7 days). The session must outlive
    /// an outage for QoS 2 state to survive on the cloud side.
    #[serde(
        default = "default_session_expiry",
        deserialize_with = "outpost_units::duration"
    )]
    pub session_expiry: Duration,
    /// Highest QoS used towards the cloud (default 2). Set 1 for brokers without QoS 2
    /// (AWS IoT Core); a CONNACK Maximum QoS lowers it too.
    #[serde(default = "default_max_qos")]
    pub max_qos: outpost_mqtt::QoS,
    /// Most unacknowledged messages in flight (default 4096); the cloud's Receive Maximum
    /// lowers it. Below it the bridge sizes the window to the link (`uplink/window.rs`).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Replay rate limit in messages per second for backlog accepted before the current
    /// connection (0 = unlimited, the default).
    #[serde(default)]
    pub replay_rate: u32,
    /// TLS settings for `mqtts://` and `wss://` addresses.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Topic rules (Mosquitto `topic` semantics).
    #[serde(default)]
    pub topics: Vec<TopicRule>,
    /// The on-disk spool.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Reconnect backoff.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// Gateway status (birth and will) announced on the cloud.
    #[serde(default)]
    pub status: StatusConfig,
    /// How often `$SYS/broker/bridge/{name}/...` counters are published locally (default 10s).
    #[serde(
        default = "default_stats_interval",
        deserialize_with = "outpost_units::duration"
    )]
    pub stats_interval: Duration,
}

/// The `address` key: one address, or a list tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(pub Vec<String>);

impl Addresses {
    /// The addresses as written, in order.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl From<&str> for Addresses {
    fn from(s: &str) -> Addresses {
        Addresses(vec![s.to_owned()])
    }
}

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Addresses;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address string or an array of address strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Addresses, E> {
                Ok(Addresses(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Addresses, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(Addresses(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// MQTT version used towards the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1.
    V3_1_1,
    /// MQTT 5.0.
    #[default]
    V5,
}

impl<'de> Deserialize<'de> for ProtocolVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            F(f64),
            I(i64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::S(s) => s,
            Raw::F(f) => f.to_string(),
            Raw::I(i) => i.to_string(),
        };
        match text.trim() {
            "3.1.1" | "311" | "v3.1.1" | "4" => Ok(ProtocolVersion::V3_1_1),
            "5" | "5.0" | "v5" | "v5.0" => Ok(ProtocolVersion::V5),
            other => Err(serde::de::Error::custom(format!(
                "unknown protocol version {other:?}: expected \"3.1.1\" or \"5.0\""
            ))),
        }
    }
}

impl ProtocolVersion {
    /// The codec's protocol for this version.
    pub fn to_protocol(self) -> outpost_mqtt::Protocol {
        match self {
            ProtocolVersion::V3_1_1 => outpost_mqtt::Protocol::V3_1_1,
            ProtocolVersion::V5 => outpost_mqtt::Protocol::V5,
        }
    }
}

/// TLS client settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of trusted CA certificates; system roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Server name sent in SNI and checked against the certificate (default: address host).
    #[serde(default)]
    pub server_name: Option<String>,
    /// ALPN protocols to offer (e.g. `["x-amzn-mqtt-ca"]` for AWS IoT on port 443).
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Warn (log and stats) when the client certificate expires within this many days
    /// (default 30; 0 turns the warning off).
    #[serde(default)]
    pub warn_expiry_days: Option<u32>,
}

impl TlsConfig {
    /// `warn_expiry_days` with its default.
    pub fn warn_expiry_days(&self) -> u32 {
        self.warn_expiry_days.unwrap_or(30)
    }
}

/// What to do when a new message would take the spool past `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Delete the oldest unsent messages to make room (each one counted as dropped).
    #[default]
    DropOldest,
    /// Refuse the new message: 5.0 publishers get reason 0x97, 3.1.1 ones get no ack.
    RejectNew,
}

/// Spool settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// SQLite file; default `{state_dir}/bridge-{name}.sqlite`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Bound on the spooled data (topic + payload + properties + 32 bytes per row).
    #[serde(
        default = "default_max_bytes",
        deserialize_with = "outpost_units::bytes"
    )]
    pub max_bytes: u64,
    /// Policy when the bound is reached.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Spool QoS 0 messages too (default false: QoS 0 goes up only while the link is up).
    #[serde(default)]
    pub qos0: bool,
    /// A message that was the oldest one in flight when the cloud dropped an established
    /// link this many consecutive times is moved to the dead-letter table (default 3;
    /// 0 never sets a message aside).
    #[serde(default = "default_dead_letter_after")]
    pub dead_letter_after: u32,
    /// Longest a message may wait for others to share its commit, so that a steady stream
    /// writes a few pages per commit rather than per message (default 100ms, at most 5s;
    /// "0s" commits each at once). A client that waits for each PUBACK is not held.
    #[serde(default = "default_commit_window", deserialize_with = "commit_window")]
    pub commit_window: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: None,
            max_bytes: default_max_bytes(),
            when_full: WhenFull::default(),
            qos0: false,
            dead_letter_after: default_dead_letter_after(),
            commit_window: default_commit_window(),
        }
    }
}

/// Reconnect backoff: exponential with full jitter, between `min` and `max`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    /// First backoff ceiling (default 1s).
    #[serde(
        default = "default_backoff_min",
        deserialize_with = "outpost_units::duration"
    )]
    pub min: Duration,
    /// Largest backoff ceiling (default 60s).
    #[serde(
        default = "default_backoff_max",
        deserialize_with = "outpost_units::duration"
    )]
    pub max: Duration,
    /// Bound on connect + CONNACK (default 10s).
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "outpost_units::duration"
    )]
    pub connect_timeout: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            min: default_backoff_min(),
            max: default_backoff_max(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

/// Gateway status announced on the cloud.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Publish birth, will and clean offline (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Topic prefix: the status topic is `{prefix}/{gateway_id}/status` (default "outpost").
    #[serde(default = "default_status_prefix")]
    pub prefix: String,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            enabled: true,
            prefix: default_status_prefix(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_status_prefix() -> String {
    "outpost".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(60)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_primary_retry() -> Duration {
    Duration::from_secs(60)
}
fn default_max_qos() -> outpost_mqtt::QoS {
    outpost_mqtt::QoS::ExactlyOnce
}
fn default_max_inflight() -> u16 {
    4096
}
fn default_commit_window() -> Duration {
    outpost_sqlite::commit_window::DEFAULT_WINDOW
}

/// A duration of at most [`outpost_sqlite::commit_window::MAX_WINDOW`].
fn commit_window<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let w = outpost_units::duration(d)?;
    let max = outpost_sqlite::commit_window::MAX_WINDOW;
    if w > max {
        return Err(serde::de::Error::custom(format_args!(
            "a commit window of {w:?} would hold every acknowledgement that long; \
             use at most {max:?} (or \"0s\" to commit each message at once)"
        )));
    }
    Ok(w)
}

fn default_dead_letter_after() -> u32 {
    3
}
fn default_max_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_backoff_min() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_stats_interval() -> Duration {
    Duration::from_secs(10)
}

/// Transport scheme of the cloud address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain TCP.
    Mqtt,
    /// TLS over TCP.
    Mqtts,
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl Scheme {
    /// True when the transport is wrapped in TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Mqtts | Scheme::Wss)
    }
}

/// A parsed cloud address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Transport.
    pub scheme: Scheme,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path for WebSocket (default "/mqtt").
    pub path: String,
}

impl Address {
    /// Parse `scheme://host[:port][/path]`.
    pub fn parse(s: &str) -> Result<Address, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid(format!("address {s:?}: {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("missing scheme"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => Scheme::Mqtt,
            "mqtts" | "ssl" | "tls" => Scheme::Mqtts,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/mqtt".to_string()),
        };
        let default_port = match scheme {
            Scheme::Mqtt => 1883,
            Scheme::Mqtts => 8883,
            Scheme::Ws => 80,
            Scheme::Wss => 443,
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("garbage after ']'")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        Ok(Address {
            scheme,
            host,
            port,
            path,
        })
    }
}

impl BridgeConfig {
    /// Check everything that can be checked without I/O; called by `start` and usable by
    /// `outpost check`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at().map_err(|(_, e)| e)
    }

    /// As [`validate`](Self::validate), with the key (inside this bridge's table, e.g.
    /// `topics[2].pattern`) the error is about, so the gateway can point at its line.
    pub fn validate_at(&self) -> Result<(), (String, ConfigError)> {
        let invalid = |key: &str, m: String| {
            Err((
                key.to_owned(),
                ConfigError::Invalid(format!("bridge {:?}: {m}", self.name)),
            ))
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid(
                "name",
                "name must be non-empty and use only [A-Za-z0-9_-] (it names the spool file)"
                    .into(),
            );
        }
        if self.password.is_some() && self.password_file.is_some() {
            return invalid(
                "password_file",
                "password and password_file exclude each other; keep one".into(),
            );
        }
        let addrs = self.addresses().map_err(|e| ("address".to_owned(), e))?;
        // One TLS setting serves every address: they must all use TLS or none.
        let tls_count = addrs.iter().filter(|a| a.scheme.is_tls()).count();
        if tls_count != 0 && tls_count != addrs.len() {
            return invalid(
                "address",
                "mixes TLS (mqtts://, wss://) and plain addresses; use one kind".into(),
            );
        }
        if tls_count != 0 {
            if let Some(tls) = &self.tls
                && tls.cert_file.is_some() != tls.key_file.is_some()
            {
                let key = if tls.cert_file.is_some() {
                    "tls.cert_file"
                } else {
                    "tls.key_file"
                };
                return invalid(
                    key,
                    "tls.cert_file and tls.key_file go together; give both or neither".into(),
                );
            }
        } else if self.tls.is_some() {
            return invalid(
                "tls",
                "tls settings given for a non-TLS address; use mqtts:// or remove [bridge.tls]"
                    .into(),
            );
        }
        if self.primary_retry.is_zero() {
            return invalid("primary_retry", "must be above zero, e.g. \"60s\"".into());
        }
        if self.max_inflight == 0 {
            return invalid("max_inflight", "max_inflight must be at least 1".into());
        }
        if self.keep_alive.as_secs() > u64::from(u16::MAX) {
            return invalid("keep_alive", "keep_alive above 65535s".into());
        }
        if self.reconnect.min.is_zero() || self.reconnect.min > self.reconnect.max {
            return invalid(
                "reconnect.min",
                "reconnect.min must be > 0 and <= reconnect.max".into(),
            );
        }
        if self.spool.max_bytes < 4096 {
            return invalid("spool.max_bytes", "spool.max_bytes below 4KiB".into());
        }
        if self.spool.dead_letter_after == 1 {
            // One loss proves nothing: any outage with a message in flight would set it aside.
            return invalid(
                "spool.dead_letter_after",
                "spool.dead_letter_after must be 0 (never) or at least 2".into(),
            );
        }
        if self.stats_interval.is_zero() {
            return invalid("stats_interval", "stats_interval must be > 0".into());
        }
        if self.topics.is_empty() {
            return invalid(
                "topics",
                "no topics: a bridge needs at least one rule".into(),
            );
        }
        for (i, rule) in self.topics.iter().enumerate() {
            if let Err(e) = rule.validate() {
                return invalid(&format!("topics[{i}]"), e.to_string());
            }
        }
        if self.status.prefix.contains(['+', '#']) {
            return invalid("status.prefix", "status.prefix contains a wildcard".into());
        }
        Ok(())
    }

    /// The parsed addresses, primary first; an empty list is an error.
    pub fn addresses(&self) -> Result<Vec<Address>, ConfigError> {
        if self.address.0.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "bridge {:?}: address: the list is empty; give at least one broker address",
                self.name
            )));
        }
        self.address
            .0
            .iter()
            .map(|a| {
                Address::parse(a)
                    .map_err(|e| ConfigError::Invalid(format!("bridge {:?}: {e}", self.name)))
            })
            .collect()
    }

    /// The client id used on the cloud.
    pub fn effective_client_id(&self, gateway_id: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("outpost-{gateway_id}-{}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<BridgeConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn full_table_parses_with_units() {
        let c = parse(
            r#"
            name = "cloud"
            address = "mqtts://broker.example.com:8883"
            protocol = "3.1.1"
            keep_alive = "30s"
            max_qos = 1
            topics = [
              { pattern = "sensors/#", direction = "out", qos = 1, local_prefix = "outpost/gw-01/", remote_prefix = "plant-7/" },
              { pattern = "cmd/#", direction = "in", qos = 1 },
            ]
            [tls]
            ca_file = "/etc/ca.pem"
            alpn = ["x-amzn-mqtt-ca"]
            [spool]
            max_bytes = "512MiB"
            when_full = "reject-new"
            qos0 = true
            dead_letter_after = 5
            [reconnect]
            min = "500ms"
            max = 30
            "#,
        )
        .expect("parses");
        assert_eq!(c.protocol, ProtocolVersion::V3_1_1);
        assert_eq!(c.keep_alive, Duration::from_secs(30));
        assert_eq!(c.spool.max_bytes, 512 << 20);
        assert_eq!(c.spool.when_full, WhenFull::RejectNew);
        assert_eq!(c.spool.dead_letter_after, 5);
        assert_eq!(c.reconnect.min, Duration::from_millis(500));
        assert_eq!(c.reconnect.max, Duration::from_secs(30));
        assert_eq!(c.topics.len(), 2);
        c.validate().expect("valid");
        assert_eq!(c.effective_client_id("gw-01"), "outpost-gw-01-cloud");
    }

    #[test]
    fn design_sample_parses_as_an_array_of_tables() {
        #[derive(Deserialize)]
        struct Top {
            bridge: Vec<BridgeConfig>,
        }
        let top: Top = toml::from_str(
            r#"
            [[bridge]]
            name = "cloud"
            address = "mqtts://broker.example.com:8883"
            topics = [
              { pattern = "sensors/#", direction = "out", qos = 1, local_prefix = "outpost/gw-01/", remote_prefix = "plant-7/" },
              { pattern = "cmd/#", direction = "in", qos = 1 },
            ]
            [bridge.spool]
            max_bytes = "512MiB"
            when_full = "drop-oldest"
            "#,
        )
        .expect("parses");
        let b = &top.bridge[0];
        b.validate().expect("valid");
        assert_eq!(b.spool.when_full, WhenFull::DropOldest);
        assert_eq!(b.spool.dead_letter_after, 3);
        assert_eq!(b.protocol, ProtocolVersion::V5);
        assert_eq!(b.keep_alive, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = parse("name='a'\naddress='mqtt://h'\nbogus=1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn protocol_as_float_and_bad_value() {
        let c = parse("name='a'\naddress='mqtt://h'\nprotocol=5.0\n").unwrap();
        assert_eq!(c.protocol, ProtocolVersion::V5);
        assert!(parse("name='a'\naddress='mqtt://h'\nprotocol='4.0'\n").is_err());
    }

    #[test]
    fn addresses() {
        let a = Address::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!(
            (a.scheme, a.host.as_str(), a.port),
            (Scheme::Mqtt, "127.0.0.1", 1884)
        );
        let a = Address::parse("wss://[::1]/ws").unwrap();
        assert_eq!(
            (a.scheme, a.host.as_str(), a.port, a.path.as_str()),
            (Scheme::Wss, "::1", 443, "/ws")
        );
        assert!(Address::parse("http://x").is_err());
        assert!(Address::parse("mqtt://:1883").is_err());
        assert!(Address::parse("mqtt://h:99999").is_err());
    }

    #[test]
    fn every_block_in_docs_clouds_md_is_a_valid_bridge() {
        #[derive(Deserialize)]
        struct Top {
            bridge: Vec<BridgeConfig>,
        }
        let doc = include_str!("../../docs/clouds.md");
        let mut blocks = 0;
        for block in doc.split("```toml\n").skip(1) {
            let text = block.split("```").next().unwrap_or_default();
            let top: Top = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            for b in &top.bridge {
                b.validate().unwrap_or_else(|e| panic!("{e}\n{text}"));
            }
            blocks += 1;
        }
        assert_eq!(
            blocks, 6,
            "one block per cloud and one for several addresses"
        );
    }

    #[test]
    fn address_is_a_string_or_a_list() {
        let one = parse("name='a'\naddress='mqtt://h'\n").unwrap();
        assert_eq!(one.address.as_slice(), ["mqtt://h"]);
        assert!(!one.round_robin);
        assert_eq!(one.primary_retry, Duration::from_secs(60));
        let two = parse(
            "name='a'\naddress=['mqtt://a:1', 'mqtt://b:2']\nround_robin=true\nprimary_retry='5s'\n\
             topics=[{pattern='x/#'}]\n",
        )
        .unwrap();
        two.validate().unwrap();
        let parsed = two.addresses().unwrap();
        assert_eq!((parsed[1].host.as_str(), parsed[1].port), ("b", 2));
        assert!(two.round_robin);
        assert_eq!(two.primary_retry, Duration::from_secs(5));

        let err = parse("name='a'\naddress=5\n").unwrap_err().to_string();
        assert!(
            err.contains("address") && err.contains("array of address strings"),
            "{err}"
        );
        let err = parse("name='a'\naddress=['mqtt://h', 5]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("address"), "{err}");
        let empty = parse("name='a'\naddress=[]\ntopics=[{pattern='x/#'}]\n").unwrap();
        let err = empty.validate().unwrap_err().to_string();
        assert!(err.contains("address") && err.contains("empty"), "{err}");
        let bad = parse("name='a'\naddress=['mqtt://h', 'http://x']\ntopics=[{pattern='x/#'}]\n")
            .unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("http://x"));
        let mixed =
            parse("name='a'\naddress=['mqtt://h', 'mqtts://x']\ntopics=[{pattern='x/#'}]\n")
                .unwrap();
        assert!(
            mixed
                .validate()
                .unwrap_err()
                .to_string()
                .contains("mixes TLS")
        );
    }

    #[test]
    fn validation_catches_mistakes() {
        let base = "name='a'\naddress='mqtt://h'\ntopics=[{pattern='x/#', direction='out'}]\n";
        parse(base).unwrap().validate().unwrap();
        let no_rules = parse("name='a'\naddress='mqtt://h'\n").unwrap();
        assert!(no_rules.validate().is_err());
        let tls_on_plain = parse(&format!("{base}[tls]\nca_file='x'\n")).unwrap();
        assert!(tls_on_plain.validate().is_err());
        let bad_name = parse(&base.replace("name='a'", "name='a/b'")).unwrap();
        assert!(bad_name.validate().is_err());
        let hair_trigger = parse(&format!("{base}[spool]\ndead_letter_after=1\n")).unwrap();
        assert!(hair_trigger.validate().is_err());
        let never = parse(&format!("{base}[spool]\ndead_letter_after=0\n")).unwrap();
        never.validate().unwrap();
    }
}
