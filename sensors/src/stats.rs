//! Counters for `$SYS`: requests, errors by kind, bus utilisation per line.

use crate::publish::SensorMessage;
use bytes::Bytes;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counters of one Modbus line (a serial port or a TCP endpoint) or serial sensor.
#[derive(Debug)]
pub struct LineStats {
    /// Line name used in `$SYS` topics.
    pub name: String,
    /// Baud rate for serial lines (0 for TCP).
    pub baud: u32,
    /// Requests sent.
    pub requests: AtomicU64,
    /// Requests answered with data.
    pub responses: AtomicU64,
    /// Requests that timed out.
    pub timeouts: AtomicU64,
    /// Modbus exception responses.
    pub exceptions: AtomicU64,
    /// CRC errors, garbage, short frames, I/O errors, connection failures.
    pub transport_errors: AtomicU64,
    /// NaN or out-of-range values, unparsable lines.
    pub value_errors: AtomicU64,
    /// Nanoseconds the line spent in transactions.
    pub busy_ns: AtomicU64,
    /// Nanoseconds the bytes sent and received take at the configured baud.
    pub wire_ns: AtomicU64,
    /// Bytes written.
    pub bytes_tx: AtomicU64,
    /// Bytes read.
    pub bytes_rx: AtomicU64,
    started: Instant,
}

impl LineStats {
    /// Fresh counters.
    pub fn new(name: impl Into<String>, baud: u32) -> Self {
        LineStats {
            name: name.into(),
            baud,
            requests: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            exceptions: AtomicU64::new(0),
            transport_errors: AtomicU64::new(0),
            value_errors: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            wire_ns: AtomicU64::new(0),
            bytes_tx: AtomicU64::new(0),
            bytes_rx: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a duration to a nanosecond counter.
    pub fn add_time(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Fraction of wall time spent in transactions since start.
    pub fn utilisation(&self) -> f64 {
        let wall = self.started.elapsed().as_nanos().max(1) as f64;
        self.busy_ns.load(Ordering::Relaxed) as f64 / wall
    }

    /// Fraction of wall time the bytes need at the configured baud (serial lines).
    pub fn wire_utilisation(&self) -> f64 {
        let wall = self.started.elapsed().as_nanos().max(1) as f64;
        self.wire_ns.load(Ordering::Relaxed) as f64 / wall
    }

    fn to_json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "requests": g(&self.requests),
            "responses": g(&self.responses),
            "errors": {
                "timeout": g(&self.timeouts),
                "exception": g(&self.exceptions),
                "transport": g(&self.transport_errors),
                "value": g(&self.value_errors),
            },
            "utilisation": round4(self.utilisation()),
            "wire_utilisation": round4(self.wire_utilisation()),
            "baud": self.baud,
            "bytes_tx": g(&self.bytes_tx),
            "bytes_rx": g(&self.bytes_rx),
        })
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// All counters of the sensor layer, shareable with the gateway.
#[derive(Debug, Default)]
pub struct Stats {
    lines: Mutex<Vec<Arc<LineStats>>>,
}

impl Stats {
    /// Registers a line and returns its counters.
    pub fn line(&self, name: impl Into<String>, baud: u32) -> Arc<LineStats> {
        let l = Arc::new(LineStats::new(name, baud));
        if let Ok(mut v) = self.lines.lock() {
            v.push(Arc::clone(&l));
        }
        l
    }

    /// A snapshot of every line's counters.
    pub fn lines(&self) -> Vec<Arc<LineStats>> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Sum of one counter over all lines.
    pub fn total(&self, pick: impl Fn(&LineStats) -> &AtomicU64) -> u64 {
        self.lines()
            .iter()
            .map(|l| pick(l).load(Ordering::Relaxed))
            .sum()
    }

    /// `$SYS/broker/sensors/...` messages: totals as plain numbers, one JSON document per line.
    pub fn messages(&self) -> Vec<SensorMessage> {
        let msg = |topic: String, payload: String| SensorMessage {
            topic,
            payload: Bytes::from(payload),
            qos: 0,
            retain: true,
        };
        let mut out = vec![
            msg(
                "$SYS/broker/sensors/requests".into(),
                self.total(|l| &l.requests).to_string(),
            ),
            msg(
                "$SYS/broker/sensors/errors/timeout".into(),
                self.total(|l| &l.timeouts).to_string(),
            ),
            msg(
                "$SYS/broker/sensors/errors/exception".into(),
                self.total(|l| &l.exceptions).to_string(),
            ),
            msg(
                "$SYS/broker/sensors/errors/transport".into(),
                self.total(|l| &l.transport_errors).to_string(),
            ),
            msg(
                "$SYS/broker/sensors/errors/value".into(),
                self.total(|l| &l.value_errors).to_string(),
            ),
        ];
        for l in self.lines() {
            out.push(msg(
                format!("$SYS/broker/sensors/lines/{}", l.name),
                l.to_json().to_string(),
            ));
        }
        out
    }
}

/// Makes a port path or address usable as one topic level (`/dev/ttyUSB0` -> `dev-ttyUSB0`).
pub fn line_name(raw: &str) -> String {
    raw.trim_start_matches('/')
        .chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#' | '\0') {
                '-'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_messages() {
        let s = Stats::default();
        let a = s.line(line_name("/dev/ttyUSB0"), 9600);
        let b = s.line("tcp-127.0.0.1:502", 0);
        LineStats::bump(&a.requests);
        LineStats::bump(&b.requests);
        LineStats::bump(&b.timeouts);
        assert_eq!(s.total(|l| &l.requests), 2);
        let msgs = s.messages();
        let req = msgs
            .iter()
            .find(|m| m.topic == "$SYS/broker/sensors/requests")
            .unwrap();
        assert_eq!(&req.payload[..], b"2");
        assert!(
            msgs.iter()
                .any(|m| m.topic == "$SYS/broker/sensors/lines/dev-ttyUSB0")
        );
        let t = msgs
            .iter()
            .find(|m| m.topic == "$SYS/broker/sensors/errors/timeout")
            .unwrap();
        assert_eq!(&t.payload[..], b"1");
    }
}
