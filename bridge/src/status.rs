//! Gateway status messages: the retained birth published after each connect, the will that
//! says "offline (unexpected)", and the clean "offline" sent before a deliberate disconnect.

use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;

/// Why the gateway is offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OfflineReason {
    /// The link dropped without a goodbye (published by the cloud as our will).
    Unexpected,
    /// The gateway disconnected on purpose.
    Clean,
}

#[derive(Serialize)]
struct Online<'a> {
    state: &'static str,
    gateway_id: &'a str,
    bridge: &'a str,
    version: &'static str,
    boot_time: String,
}

#[derive(Serialize)]
struct Offline<'a> {
    state: &'static str,
    gateway_id: &'a str,
    bridge: &'a str,
    reason: OfflineReason,
}

/// Builds the status topic and payloads of one bridge.
#[derive(Debug, Clone)]
pub struct Status {
    /// `{prefix}/{gateway_id}/status`.
    pub topic: String,
    gateway_id: String,
    bridge: String,
    boot_time: SystemTime,
}

impl Status {
    /// Status for `gateway_id` under `prefix`, announcing `boot_time`.
    pub fn new(prefix: &str, gateway_id: &str, bridge: &str, boot_time: SystemTime) -> Self {
        let prefix = prefix.trim_end_matches('/');
        let topic = if prefix.is_empty() {
            format!("{gateway_id}/status")
        } else {
            format!("{prefix}/{gateway_id}/status")
        };
        Status {
            topic,
            gateway_id: gateway_id.to_string(),
            bridge: bridge.to_string(),
            boot_time,
        }
    }

    /// The birth payload: online, software version, boot time (RFC 3339).
    pub fn birth(&self) -> Bytes {
        let body = Online {
            state: "online",
            gateway_id: &self.gateway_id,
            bridge: &self.bridge,
            version: env!("CARGO_PKG_VERSION"),
            boot_time: humantime::format_rfc3339_seconds(self.boot_time).to_string(),
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The offline payload (will or clean shutdown).
    pub fn offline(&self, reason: OfflineReason) -> Bytes {
        let body = Offline {
            state: "offline",
            gateway_id: &self.gateway_id,
            bridge: &self.bridge,
            reason,
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_with_the_documented_fields() {
        let boot = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let s = Status::new("outpost/", "gw-01", "cloud", boot);
        assert_eq!(s.topic, "outpost/gw-01/status");
        let birth: serde_json::Value = serde_json::from_slice(&s.birth()).unwrap();
        assert_eq!(birth["state"], "online");
        assert_eq!(birth["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(birth["boot_time"], "2023-11-14T22:13:20Z");
        let will: serde_json::Value =
            serde_json::from_slice(&s.offline(OfflineReason::Unexpected)).unwrap();
        assert_eq!(
            (will["state"].as_str(), will["reason"].as_str()),
            (Some("offline"), Some("unexpected"))
        );
        let clean: serde_json::Value =
            serde_json::from_slice(&s.offline(OfflineReason::Clean)).unwrap();
        assert_eq!(clean["reason"], "clean");
    }
}
