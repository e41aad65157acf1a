//! Counters for `$SYS`: requests, errors by kind, bus utilisation per line.

use crate::messages::{DeviceStatus, SensorMessage};
use bytes::Bytes;
use serde_json::json;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
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
    /// When the line's task last went round its loop (ms since `started`).
    last_beat_ms: AtomicU64,
    /// Longest a healthy task may go between beats (ms): its heartbeat plus the longest
    /// single step it can take (a transaction with its retries, a reopen backoff).
    quiet_limit_ms: AtomicU64,
    /// The devices polled on this line (they go when the line is removed).
    devices: Mutex<Vec<Arc<DeviceStats>>>,
}

/// How often, at least, a line's task goes round its loop and shows it is alive, also
/// when nothing is due: the watchdog takes a line silent for longer than its
/// [`LineStats::expect_steps_up_to`] allows as wedged.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

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
            last_beat_ms: AtomicU64::new(0),
            quiet_limit_ms: AtomicU64::new(ms(HEARTBEAT * 2 + Duration::from_secs(30))),
            devices: Mutex::new(Vec::new()),
        }
    }

    /// Registers a device polled on this line and returns its counters.
    pub fn device(&self, name: impl Into<String>) -> Arc<DeviceStats> {
        let d = Arc::new(DeviceStats::new(name.into(), self.name.clone()));
        if let Ok(mut v) = self.devices.lock() {
            v.push(Arc::clone(&d));
        }
        d
    }

    /// The line's task is alive: it went round its loop.
    pub fn beat(&self) {
        self.last_beat_ms
            .store(ms(self.started.elapsed()), Ordering::Relaxed);
    }

    /// The longest single step the line's task can take between beats (one transaction
    /// with all its retries, or one reopen backoff); the watchdog allows that, a
    /// heartbeat and 10 s of slack before it calls the line wedged.
    pub fn expect_steps_up_to(&self, step: Duration) {
        let limit = HEARTBEAT + step + Duration::from_secs(10);
        self.quiet_limit_ms.store(ms(limit), Ordering::Relaxed);
    }

    /// True when the task has not gone round its loop for longer than it ever should.
    pub fn is_stale(&self) -> bool {
        let now = ms(self.started.elapsed());
        let last = self.last_beat_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) > self.quiet_limit_ms.load(Ordering::Relaxed)
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

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Counters and state of one device, as its line's scheduler sees it.
#[derive(Debug)]
pub struct DeviceStats {
    /// Device name (a topic level).
    pub name: String,
    /// The line it is polled on.
    pub line: String,
    /// Polls the device answered (with data or an exception).
    pub polls: AtomicU64,
    /// Polls that failed after their retries.
    pub failures: AtomicU64,
    /// Nanoseconds spent in polls (with retries), answered or not.
    pub poll_ns: AtomicU64,
    status: AtomicU8,
    /// Milliseconds after `started` of the last good reading, plus one (0: never).
    last_reading_ms: AtomicU64,
    started: Instant,
    /// The error of the last failing poll; written only when the status changes.
    last_error: Mutex<Option<String>>,
}

impl DeviceStats {
    fn new(name: String, line: String) -> Self {
        DeviceStats {
            name,
            line,
            polls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            poll_ns: AtomicU64::new(0),
            status: AtomicU8::new(0),
            last_reading_ms: AtomicU64::new(0),
            started: Instant::now(),
            last_error: Mutex::new(None),
        }
    }

    /// Records one poll: how long it took and whether the device answered.
    pub fn record_poll(&self, took: Duration, answered: bool) {
        LineStats::add_time(&self.poll_ns, took);
        if answered {
            self.polls.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The device returned data.
    pub fn reading(&self) {
        self.last_reading_ms
            .store(ms(self.started.elapsed()) + 1, Ordering::Relaxed);
    }

    /// The device's status changed (as published on its status topic).
    pub fn set_status(&self, status: DeviceStatus, error: Option<&str>) {
        let code = match status {
            DeviceStatus::Online => 1,
            DeviceStatus::Offline => 2,
            DeviceStatus::Quarantined => 3,
        };
        self.status.store(code, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = error.map(str::to_owned);
        }
    }

    /// The last published status; `None` before the first poll.
    pub fn status(&self) -> Option<DeviceStatus> {
        match self.status.load(Ordering::Relaxed) {
            1 => Some(DeviceStatus::Online),
            2 => Some(DeviceStatus::Offline),
            3 => Some(DeviceStatus::Quarantined),
            _ => None,
        }
    }

    /// The error that made the device offline or quarantined.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// How long ago the last good reading came; `None` if none yet.
    pub fn last_reading_age(&self) -> Option<Duration> {
        let at = self.last_reading_ms.load(Ordering::Relaxed);
        (at != 0).then(|| {
            self.started
                .elapsed()
                .saturating_sub(Duration::from_millis(at - 1))
        })
    }
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

    /// Unregisters a line that stopped for good (a reload removed or replaced it), so
    /// the watchdog does not take its silence for a wedged task.
    pub fn remove(&self, line: &Arc<LineStats>) {
        if let Ok(mut v) = self.lines.lock() {
            v.retain(|l| !Arc::ptr_eq(l, line));
        }
    }

    /// Every device of every registered line.
    pub fn devices(&self) -> Vec<Arc<DeviceStats>> {
        self.lines()
            .iter()
            .flat_map(|l| l.devices.lock().map(|v| v.clone()).unwrap_or_default())
            .collect()
    }

    /// A snapshot of every line's counters.
    pub fn lines(&self) -> Vec<Arc<LineStats>> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Lines whose task has stopped going round its loop (wedged, or ended): what the
    /// systemd watchdog must not be fed over.
    pub fn stale_lines(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter(|l| l.is_stale())
            .map(|l| l.name.clone())
            .collect()
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
            qos: outpost_mqtt::QoS::AtMostOnce,
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

#[cfg(test)]
mod liveness_tests {
    use super::*;

    #[test]
    fn a_line_is_stale_only_past_its_quiet_limit() {
        let l = LineStats::new("l", 0);
        l.beat();
        assert!(!l.is_stale(), "just beat");
        // A limit of a few milliseconds: HEARTBEAT and slack are part of every limit, so
        // set the field directly for the test.
        l.quiet_limit_ms.store(5, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(30));
        assert!(l.is_stale(), "silent past its limit");
        l.beat();
        assert!(!l.is_stale(), "alive again");
        let s = Stats::default();
        let a = s.line("a", 0);
        let b = s.line("b", 9600);
        a.beat();
        b.beat();
        b.quiet_limit_ms.store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.stale_lines(), vec!["b".to_owned()]);
    }

    #[test]
    fn the_quiet_limit_covers_a_heartbeat_the_longest_step_and_slack() {
        let l = LineStats::new("l", 0);
        l.expect_steps_up_to(Duration::from_secs(12));
        assert_eq!(
            l.quiet_limit_ms.load(Ordering::Relaxed),
            ms(HEARTBEAT + Duration::from_secs(22))
        );
    }
}
