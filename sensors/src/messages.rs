//! The messages the layer publishes: topics and JSON payloads of readings, device status
//! and write results (`emit.rs` decides when; the gateway publishes them).

use crate::clock::Clock;
use crate::error::CommandError;
use crate::point::Value;
use crate::report::Quality;
use bytes::Bytes;
use serde_json::{Map, Value as Json, json};

/// A message the layer wants published (the gateway publishes it in-process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensorMessage {
    /// Topic name.
    pub topic: String,
    /// Payload (JSON for readings and status).
    pub payload: Bytes,
    /// QoS.
    pub qos: outpost_mqtt::QoS,
    /// Retain flag.
    pub retain: bool,
}

/// A command routed to the layer from a `.../{point}/set` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The topic the command was published on.
    pub topic: String,
    /// Payload: a JSON value, `{"value": ..., "id": ...}`, or plain text.
    pub payload: Bytes,
}

/// Builds the topic names of one gateway.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// Topics under `{prefix}/{gateway_id}/sensors`.
    pub fn new(prefix: &str, gateway_id: &str) -> Self {
        Topics {
            base: format!("{prefix}/{gateway_id}/sensors"),
        }
    }
    /// `{base}/{device}/{point}`.
    pub fn reading(&self, device: &str, point: &str) -> String {
        format!("{}/{device}/{point}", self.base)
    }
    /// `{base}/{device}/status`.
    pub fn status(&self, device: &str) -> String {
        format!("{}/{device}/status", self.base)
    }
    /// `{base}/{device}/{point}/set/result`.
    pub fn write_result(&self, device: &str, point: &str) -> String {
        format!("{}/{device}/{point}/set/result", self.base)
    }
    /// The filter that delivers commands.
    pub fn command_filter(&self) -> String {
        format!("{}/+/+/set", self.base)
    }
    /// Splits a command topic into (device, point).
    pub fn parse_command<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic.strip_prefix(self.base.as_str())?.strip_prefix('/')?;
        let rest = rest.strip_suffix("/set")?;
        let (device, point) = rest.split_once('/')?;
        (!device.is_empty() && !point.is_empty() && !point.contains('/')).then_some((device, point))
    }
}

/// Device status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Answering.
    Online,
    /// Failing; retried with backoff.
    Offline,
    /// Failing repeatedly; probed rarely.
    Quarantined,
}

impl DeviceStatus {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Online => "online",
            DeviceStatus::Offline => "offline",
            DeviceStatus::Quarantined => "quarantined",
        }
    }
}

fn stamp(obj: &mut Map<String, Json>, clock: &Clock) {
    match clock.now() {
        Some(t) => {
            obj.insert(
                "ts".into(),
                Json::String(humantime::format_rfc3339_millis(t).to_string()),
            );
        }
        None => {
            // A Pi without RTC boots in 1970 or at the last shutdown time: say so instead of guessing.
            obj.insert("ts".into(), Json::Null);
            obj.insert("clock".into(), Json::String("unsynchronised".into()));
            if let Some(ms) = crate::clock::uptime_ms() {
                obj.insert("uptime_ms".into(), Json::from(ms));
            }
        }
    }
}

/// JSON payload of a reading.
pub fn reading_payload(
    value: Option<&Value>,
    unit: Option<&str>,
    quality: &Quality,
    clock: &Clock,
) -> Bytes {
    let mut obj = Map::new();
    obj.insert("value".into(), value.map_or(Json::Null, Value::to_json));
    if let Some(u) = unit {
        obj.insert("unit".into(), Json::String(u.into()));
    }
    stamp(&mut obj, clock);
    match quality {
        Quality::Good => {
            obj.insert("quality".into(), "good".into());
        }
        Quality::Stale => {
            obj.insert("quality".into(), "stale".into());
        }
        Quality::Bad(reason) => {
            obj.insert("quality".into(), "bad".into());
            obj.insert("reason".into(), Json::String(reason.clone()));
        }
    }
    Bytes::from(Json::Object(obj).to_string())
}

/// JSON payload of a device status.
pub fn status_payload(status: DeviceStatus, error: Option<&str>, clock: &Clock) -> Bytes {
    let mut obj = Map::new();
    obj.insert("status".into(), status.as_str().into());
    obj.insert(
        "error".into(),
        error.map_or(Json::Null, |e| Json::String(e.into())),
    );
    stamp(&mut obj, clock);
    Bytes::from(Json::Object(obj).to_string())
}

/// JSON payload of the retained status a device leaves when it stops without a fault:
/// `offline` with the reason (e.g. "gateway stopping") and no error.
pub fn stopped_payload(reason: &str, clock: &Clock) -> Bytes {
    let mut obj = Map::new();
    obj.insert("status".into(), DeviceStatus::Offline.as_str().into());
    obj.insert("error".into(), Json::Null);
    obj.insert("reason".into(), Json::String(reason.into()));
    stamp(&mut obj, clock);
    Bytes::from(Json::Object(obj).to_string())
}

/// JSON payload of a write result.
pub fn write_result_payload(
    result: Result<&Value, &dyn std::fmt::Display>,
    id: Option<&Json>,
    clock: &Clock,
) -> Bytes {
    let mut obj = match result {
        Ok(v) => json!({"ok": true, "value": v.to_json()}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    if let Json::Object(map) = &mut obj {
        if let Some(id) = id {
            map.insert("id".into(), id.clone());
        }
        stamp(map, clock);
    }
    Bytes::from(obj.to_string())
}

/// Parses a command payload into (value, correlation id).
pub fn parse_command_payload(payload: &[u8]) -> Result<(Value, Option<Json>), CommandError> {
    let text = std::str::from_utf8(payload).map_err(|_| CommandError::NotUtf8)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(CommandError::Empty);
    }
    let json: Json = match serde_json::from_str(text) {
        Ok(j) => j,
        Err(_) => return Ok((Value::Text(text.to_string()), None)),
    };
    let (v, id) = match json {
        Json::Object(mut m) => {
            let v = m.remove("value").ok_or(CommandError::NoValueKey)?;
            (v, m.remove("id"))
        }
        other => (other, None),
    };
    let value = match v {
        Json::Bool(b) => Value::Bool(b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::Int(i),
            (None, Some(u), _) => Value::UInt(u),
            (_, _, Some(f)) => Value::Float(f),
            _ => return Err(CommandError::UnrepresentableNumber),
        },
        Json::String(s) => Value::Text(s),
        _ => return Err(CommandError::BadValueType),
    };
    Ok((value, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        let t = Topics::new("outpost", "gw-01");
        assert_eq!(
            t.reading("boiler", "temp"),
            "outpost/gw-01/sensors/boiler/temp"
        );
        assert_eq!(t.status("boiler"), "outpost/gw-01/sensors/boiler/status");
        assert_eq!(t.command_filter(), "outpost/gw-01/sensors/+/+/set");
        assert_eq!(
            t.parse_command("outpost/gw-01/sensors/boiler/sp/set"),
            Some(("boiler", "sp"))
        );
        assert_eq!(
            t.parse_command("outpost/gw-01/sensors/boiler/sp/set/result"),
            None
        );
        assert_eq!(t.parse_command("outpost/gw-02/sensors/boiler/sp/set"), None);
        assert_eq!(t.parse_command("outpost/gw-01/sensors//sp/set"), None);
    }

    #[test]
    fn payloads() {
        let synced = Clock::fixed(true);
        let p = reading_payload(
            Some(&Value::Float(21.5)),
            Some("°C"),
            &Quality::Good,
            &synced,
        );
        let j: Json = serde_json::from_slice(&p).unwrap();
        assert_eq!(j["value"], 21.5);
        assert_eq!(j["unit"], "°C");
        assert_eq!(j["quality"], "good");
        assert!(j["ts"].as_str().unwrap().ends_with('Z'));
        let unsynced = Clock::fixed(false);
        let p = reading_payload(None, None, &Quality::Bad("timeout".into()), &unsynced);
        let j: Json = serde_json::from_slice(&p).unwrap();
        assert_eq!(j["quality"], "bad");
        assert_eq!(j["reason"], "timeout");
        assert!(j["ts"].is_null());
        assert_eq!(j["clock"], "unsynchronised");
        assert!(j["uptime_ms"].as_u64().is_some());
    }

    #[test]
    fn command_payloads() {
        assert_eq!(
            parse_command_payload(b"21.5").unwrap().0,
            Value::Float(21.5)
        );
        assert_eq!(parse_command_payload(b"true").unwrap().0, Value::Bool(true));
        assert_eq!(parse_command_payload(b" 7 ").unwrap().0, Value::Int(7));
        let (v, id) = parse_command_payload(br#"{"value": 3, "id": "abc"}"#).unwrap();
        assert_eq!(v, Value::Int(3));
        assert_eq!(id, Some(Json::String("abc".into())));
        assert_eq!(
            parse_command_payload(b"on").unwrap().0,
            Value::Text("on".into())
        );
        assert_eq!(
            parse_command_payload(b"{}").unwrap_err(),
            CommandError::NoValueKey
        );
        assert_eq!(
            parse_command_payload(b"[1]").unwrap_err().to_string(),
            "value must be a number, boolean or string"
        );
        assert_eq!(
            parse_command_payload(&[0xff]).unwrap_err(),
            CommandError::NotUtf8
        );
        assert_eq!(
            parse_command_payload(b" ").unwrap_err(),
            CommandError::Empty
        );
    }
}
