//! One task samples every counter once a second; requests and event streams read the
//! latest sample, so the HTTP side costs the broker one snapshot request a second however
//! many people look.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use outpost_broker::sys::SysSnapshot;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::Sources;
use crate::warnings::{self, Warning};

/// How often the counters are read.
const PERIOD: Duration = Duration::from_secs(1);
/// Samples kept for the page's charts: one hour at one a second.
const HISTORY: usize = 3600;
/// Rates are taken over this many samples, so one busy second does not make the page jump.
const RATE_WINDOW: usize = 10;
/// Status events an event-stream subscriber may have unsent before it misses some.
const SUBSCRIBER_QUEUE: usize = 4;
/// How long the broker core has to answer a snapshot before it counts as not accepting.
const CORE_ANSWER: Duration = Duration::from_secs(2);

/// Everything the page, `/metrics` and `/readyz` show, taken at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Wall-clock time of the sample (unix milliseconds).
    pub time_ms: i64,
    /// The gateway's id.
    pub gateway_id: String,
    /// The software version.
    pub version: &'static str,
    /// Seconds since the gateway started.
    pub uptime_s: u64,
    /// Whether the kernel says the wall clock is synchronised (`None`: cannot tell).
    pub clock_synchronised: Option<bool>,
    /// The broker.
    pub broker: BrokerSample,
    /// Each bridge, in config order.
    pub bridges: Vec<BridgeSample>,
    /// Each sensor device.
    pub devices: Vec<DeviceSample>,
    /// Each sensor line (serial port or TCP endpoint).
    pub lines: Vec<LineSample>,
    /// The process.
    pub process: ProcessSample,
    /// The last warnings and errors logged.
    pub warnings: Vec<Warning>,
    /// The broker's `$SYS` statistics; `None` when the core did not answer in time.
    #[serde(skip)]
    pub sys: Option<SysSnapshot>,
}

/// The broker at a glance.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BrokerSample {
    /// The core answered the snapshot request.
    pub accepting: bool,
    /// Listener addresses.
    pub listeners: Vec<String>,
    /// Network clients connected.
    pub clients_connected: u64,
    /// Sessions kept (connected or persistent).
    pub sessions: u64,
    /// Subscriptions.
    pub subscriptions: u64,
    /// Retained messages.
    pub retained: u64,
    /// Messages received in all.
    pub messages_received: u64,
    /// Deliveries sent in all.
    pub messages_sent: u64,
    /// Messages received per second, recent average.
    pub rate_in: f64,
    /// Deliveries sent per second, recent average.
    pub rate_out: f64,
}

/// One bridge.
#[derive(Debug, Clone, Serialize)]
pub struct BridgeSample {
    /// Its name.
    pub name: String,
    /// The cloud link is up.
    pub connected: bool,
    /// When the link last went up or down (unix ms; 0 before the first attempt).
    pub since_ms: i64,
    /// The last reason the link failed.
    pub last_error: Option<String>,
    /// Messages in the spool.
    pub spool_messages: u64,
    /// Bytes in the spool.
    pub spool_bytes: u64,
    /// `spool.max_bytes`.
    pub spool_max_bytes: u64,
    /// Age of the oldest spooled message in seconds (0 when empty).
    pub oldest_age_s: f64,
    /// Messages forwarded per second, recent average.
    pub drain_rate: f64,
    /// Seconds to empty the spool at the drain rate; `None` when nothing drains.
    pub time_to_empty_s: Option<f64>,
    /// Messages in the dead-letter table.
    pub dead_letters: u64,
    /// Messages taken into the spool in all.
    pub spooled: u64,
    /// Transactions the spool committed in all.
    pub spool_commits: u64,
    /// Messages forwarded in all.
    pub forwarded: u64,
    /// Messages dropped, by reason.
    pub dropped: Vec<(&'static str, u64)>,
    /// Offers refused, by reason.
    pub rejected: Vec<(&'static str, u64)>,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Messages the bridge may have unacknowledged now (the window sized to the link).
    pub inflight_window: u64,
    /// Spool files set aside as corrupt.
    pub quarantined: u64,
    /// The cloud address of the current (or last) session.
    pub address: String,
    /// notAfter of the TLS client certificate (unix seconds), when there is one.
    pub cert_not_after_s: Option<i64>,
    /// Whole days until it expires (negative once expired).
    pub cert_expires_in_days: Option<i64>,
    /// `tls.warn_expiry_days`: the page warns from this many days before.
    pub cert_warn_days: u32,
}

/// One sensor device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSample {
    /// Its name.
    pub name: String,
    /// The line it is polled on.
    pub line: String,
    /// online, offline, quarantined, or unknown before the first poll.
    pub status: &'static str,
    /// Why it is offline or quarantined.
    pub error: Option<String>,
    /// Seconds since the last good reading.
    pub last_reading_age_s: Option<f64>,
    /// Polls answered.
    pub polls: u64,
    /// Polls failed after their retries.
    pub failures: u64,
    /// Seconds spent polling, answered or not.
    pub poll_seconds: f64,
}

/// One sensor line.
#[derive(Debug, Clone, Serialize)]
pub struct LineSample {
    /// Its name.
    pub name: String,
    /// Requests sent.
    pub requests: u64,
    /// Requests answered with data.
    pub responses: u64,
    /// Errors by kind.
    pub errors: Vec<(&'static str, u64)>,
    /// Seconds spent in transactions.
    pub busy_seconds: f64,
}

/// The gateway process, from /proc/self.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ProcessSample {
    /// Resident memory in bytes.
    pub rss_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// User and system CPU time in seconds.
    pub cpu_seconds: Option<f64>,
}

/// One point of the charts.
#[derive(Debug, Clone, Serialize)]
struct Point {
    t: i64,
    rate_in: f64,
    rate_out: f64,
    /// Spool depth (messages) of each bridge, in config order.
    spool: Vec<u64>,
}

/// What the request handlers read.
pub struct State {
    latest: watch::Receiver<Arc<Sample>>,
    history: Mutex<VecDeque<Point>>,
    subscribers: Mutex<Vec<mpsc::Sender<Bytes>>>,
    /// `/readyz`: a bridge whose link is down is still ready below this spool fraction.
    pub ready_spool_fraction: f64,
    /// When the sampler last finished a round, to tell a stalled sampler in `/healthz`.
    last_round: Mutex<Instant>,
}

impl State {
    /// The latest sample.
    pub fn latest(&self) -> Arc<Sample> {
        self.latest.borrow().clone()
    }

    /// Time since the sampler last finished a round.
    pub fn sample_age(&self) -> Duration {
        self.last_round
            .lock()
            .map_or(Duration::MAX, |t| t.elapsed())
    }

    /// The charts' history as JSON: `[{t, rate_in, rate_out, spool: [...]}, ...]`.
    pub fn history_json(&self) -> Bytes {
        let h = self.history.lock().map(|h| h.clone()).unwrap_or_default();
        Bytes::from(serde_json::to_vec(&h).unwrap_or_default())
    }

    /// Subscribes to the status events (one JSON document a second); `None` when
    /// `max` subscribers are already there.
    pub fn subscribe(&self, max: usize) -> Option<mpsc::Receiver<Bytes>> {
        let mut subs = self.subscribers.lock().ok()?;
        subs.retain(|s| !s.is_closed());
        if subs.len() >= max {
            return None;
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        // The first event goes out at once, not a second later.
        let _ = tx.try_send(sse_event(&self.latest()));
        subs.push(tx);
        Some(rx)
    }
}

/// A status event in the `text/event-stream` format.
fn sse_event(s: &Sample) -> Bytes {
    let json = serde_json::to_string(s).unwrap_or_default();
    // JSON from serde_json has no raw newlines, so it fits on one `data:` line.
    Bytes::from(format!("event: status\ndata: {json}\n\n"))
}

/// When, messages received and sent, and each bridge's forwarded count by name.
type Counts = (Instant, u64, u64, Vec<(String, u64)>);

/// Takes the samples.
pub struct Sampler {
    sources: Sources,
    started: Instant,
    gateway_id: String,
    listeners: Vec<String>,
    /// Recent (time, received, sent, forwarded per bridge) for the rates.
    recent: VecDeque<Counts>,
}

impl Sampler {
    /// Starts the sampling task; returns the state the handlers read.
    pub fn start(
        sources: Sources,
        ready_spool_fraction: f64,
        mut shutdown: watch::Receiver<bool>,
    ) -> Arc<State> {
        let mut sampler = Sampler {
            gateway_id: sources.gateway_id.clone(),
            listeners: sources.listeners.clone(),
            sources,
            started: Instant::now(),
            recent: VecDeque::with_capacity(RATE_WINDOW + 1),
        };
        let first = Arc::new(sampler.empty());
        let (tx, rx) = watch::channel(first);
        let state = Arc::new(State {
            latest: rx,
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            subscribers: Mutex::new(Vec::new()),
            ready_spool_fraction,
            last_round: Mutex::new(Instant::now()),
        });
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let sample = Arc::new(sampler.take().await);
                sampler.record(&st, &sample);
                let _ = tx.send(Arc::clone(&sample));
                if let Ok(mut t) = st.last_round.lock() {
                    *t = Instant::now();
                }
            }
        });
        state
    }

    fn empty(&self) -> Sample {
        Sample {
            time_ms: now_ms(),
            gateway_id: self.gateway_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: 0,
            clock_synchronised: None,
            broker: BrokerSample {
                listeners: self.listeners.clone(),
                ..BrokerSample::default()
            },
            bridges: Vec::new(),
            devices: Vec::new(),
            lines: Vec::new(),
            process: ProcessSample::default(),
            warnings: Vec::new(),
            sys: None,
        }
    }

    async fn take(&mut self) -> Sample {
        let sys = tokio::time::timeout(CORE_ANSWER, self.sources.broker.snapshot())
            .await
            .ok()
            .and_then(Result::ok);
        let now = Instant::now();
        let now_ms = now_ms();
        let (received, sent) = sys.as_ref().map_or((0, 0), |s| {
            (s.stats.messages_received, s.stats.messages_sent)
        });
        let running = self.sources.bridges.snapshot();
        let forwarded: Vec<(String, u64)> = running
            .iter()
            .map(|b| (b.name().to_owned(), b.stats().forwarded.load(Relaxed)))
            .collect();
        self.recent.push_back((now, received, sent, forwarded));
        while self.recent.len() > RATE_WINDOW {
            self.recent.pop_front();
        }
        let (t0, r0, s0, f0) = self
            .recent
            .front()
            .cloned()
            .unwrap_or((now, 0, 0, Vec::new()));
        let dt = now.duration_since(t0).as_secs_f64();
        let rate = |a: u64, b: u64| {
            if dt > 0.0 {
                a.saturating_sub(b) as f64 / dt
            } else {
                0.0
            }
        };
        let broker = BrokerSample {
            accepting: sys.is_some(),
            listeners: self.listeners.clone(),
            clients_connected: sys.as_ref().map_or(0, |s| s.clients_connected),
            sessions: sys.as_ref().map_or(0, |s| s.clients_total),
            subscriptions: sys.as_ref().map_or(0, |s| s.subscriptions),
            retained: sys.as_ref().map_or(0, |s| s.retained_messages),
            messages_received: received,
            messages_sent: sent,
            rate_in: rate(received, r0),
            rate_out: rate(sent, s0),
        };
        let bridges = running
            .iter()
            .map(|b| {
                let st = b.stats();
                let g = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
                let oldest = st.oldest_accepted_ms.load(Relaxed);
                let spool_messages = g(&st.spool_messages);
                let forwarded = g(&st.forwarded);
                // A bridge a reload added has no earlier count: no rate yet.
                let before = f0
                    .iter()
                    .find(|(n, _)| n == b.name())
                    .map_or(forwarded, |(_, f)| *f);
                let drain_rate = rate(forwarded, before);
                BridgeSample {
                    name: b.name().to_owned(),
                    connected: st.connected.load(Relaxed),
                    since_ms: st.link_changed_ms.load(Relaxed),
                    last_error: st.last_error(),
                    spool_messages,
                    spool_bytes: g(&st.spool_bytes),
                    spool_max_bytes: b.config().spool.max_bytes,
                    oldest_age_s: if oldest == 0 {
                        0.0
                    } else {
                        (now_ms - oldest).max(0) as f64 / 1000.0
                    },
                    drain_rate,
                    time_to_empty_s: (drain_rate > 0.0).then(|| spool_messages as f64 / drain_rate),
                    dead_letters: g(&st.dead_letters),
                    spooled: g(&st.spooled),
                    spool_commits: g(&st.spool_commits),
                    forwarded,
                    dropped: vec![
                        ("spool_full", g(&st.dropped_spool_full)),
                        ("too_large", g(&st.dropped_too_large)),
                        ("expired", g(&st.dropped_expired)),
                        ("qos0", g(&st.dropped_qos0)),
                        ("refused", g(&st.dropped_refused)),
                        ("poison", g(&st.dropped_poison)),
                    ],
                    rejected: vec![
                        ("spool_full", g(&st.rejected_full)),
                        ("storage", g(&st.rejected_storage)),
                    ],
                    address: st.address(),
                    cert_not_after_s: Some(st.cert_not_after.load(Relaxed)).filter(|t| *t != 0),
                    cert_expires_in_days: st.cert_expires_in_days(now_ms),
                    cert_warn_days: b.config().tls.unwrap_or_default().warn_expiry_days(),
                    reconnects: g(&st.reconnects),
                    connect_failures: g(&st.connect_failures),
                    inflight_window: g(&st.inflight_window),
                    quarantined: g(&st.quarantined),
                }
            })
            .collect();
        let (devices, lines) = self.sensors();
        Sample {
            time_ms: now_ms,
            gateway_id: self.gateway_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            clock_synchronised: outpost_sensors::clock::read_kernel_clock()
                .map(outpost_sensors::clock::is_synchronised),
            broker,
            bridges,
            devices,
            lines,
            process: process(),
            warnings: warnings::recent(),
            sys,
        }
    }

    fn sensors(&self) -> (Vec<DeviceSample>, Vec<LineSample>) {
        let Some(stats) = self.sources.sensors.get() else {
            return (Vec::new(), Vec::new());
        };
        let devices = stats
            .devices()
            .iter()
            .map(|d| DeviceSample {
                name: d.name.clone(),
                line: d.line.clone(),
                status: d.status().map_or("unknown", |s| s.as_str()),
                error: d.last_error(),
                last_reading_age_s: d.last_reading_age().map(|a| a.as_secs_f64()),
                polls: d.polls.load(Relaxed),
                failures: d.failures.load(Relaxed),
                poll_seconds: d.poll_ns.load(Relaxed) as f64 / 1e9,
            })
            .collect();
        let lines = stats
            .lines()
            .iter()
            .map(|l| {
                let g = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
                LineSample {
                    name: l.name.clone(),
                    requests: g(&l.requests),
                    responses: g(&l.responses),
                    errors: vec![
                        ("timeout", g(&l.timeouts)),
                        ("exception", g(&l.exceptions)),
                        ("transport", g(&l.transport_errors)),
                        ("value", g(&l.value_errors)),
                    ],
                    busy_seconds: g(&l.busy_ns) as f64 / 1e9,
                }
            })
            .collect();
        (devices, lines)
    }

    fn record(&self, state: &State, s: &Arc<Sample>) {
        if let Ok(mut h) = state.history.lock() {
            if h.len() >= HISTORY {
                h.pop_front();
            }
            h.push_back(Point {
                t: s.time_ms,
                rate_in: round2(s.broker.rate_in),
                rate_out: round2(s.broker.rate_out),
                spool: s.bridges.iter().map(|b| b.spool_messages).collect(),
            });
        }
        let Ok(mut subs) = state.subscribers.lock() else {
            return;
        };
        subs.retain(|s| !s.is_closed());
        if subs.is_empty() {
            // Nobody is looking: no JSON to build.
            return;
        }
        let event = sse_event(s);
        for sub in subs.iter() {
            // A subscriber that cannot take it misses one update, which the next replaces.
            let _ = sub.try_send(event.clone());
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Resident memory, open descriptors and CPU time of this process.
fn process() -> ProcessSample {
    let rss_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count().saturating_sub(1) as u64); // less the one read_dir holds
    let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) in parentheses;
            // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
            let rest = s.get(s.rfind(')')? + 2..)?;
            let f: Vec<&str> = rest.split(' ').collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / 100.0)
        });
    ProcessSample {
        rss_bytes,
        open_fds,
        cpu_seconds,
    }
}

/// One readiness check.
#[derive(Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// It passed.
    pub ok: bool,
    /// Why.
    pub detail: String,
}

/// `/readyz`: the broker accepts, and each bridge is connected or its spool is below the
/// configured fraction of its bound.
pub fn readiness(s: &Sample, fraction: f64, sample_age: Duration) -> Vec<Check> {
    let mut checks = Vec::with_capacity(1 + s.bridges.len());
    checks.push(if sample_age > PERIOD * 5 {
        Check {
            name: "broker".into(),
            ok: false,
            detail: format!(
                "no fresh statistics for {}s: the gateway is stalled",
                sample_age.as_secs()
            ),
        }
    } else if s.broker.accepting {
        Check {
            name: "broker".into(),
            ok: true,
            detail: format!(
                "accepting on {} ({} clients connected)",
                s.broker.listeners.join(", "),
                s.broker.clients_connected
            ),
        }
    } else {
        Check {
            name: "broker".into(),
            ok: false,
            detail: "the broker core did not answer within 2s".into(),
        }
    });
    for b in &s.bridges {
        let limit = (b.spool_max_bytes as f64 * fraction) as u64;
        let pct = |x: u64| x as f64 * 100.0 / b.spool_max_bytes.max(1) as f64;
        let (ok, detail) = if b.connected {
            (true, "connected".to_owned())
        } else if b.spool_bytes < limit {
            (
                true,
                format!(
                    "link down, but the spool ({} bytes, {:.1}% of spool.max_bytes) is below \
                     the {:.1}% allowed (http.ready_spool_fraction)",
                    b.spool_bytes,
                    pct(b.spool_bytes),
                    fraction * 100.0
                ),
            )
        } else {
            (
                false,
                format!(
                    "link down ({}) and the spool ({} messages, {} bytes, {:.1}% of \
                     spool.max_bytes) is not below the {:.1}% allowed \
                     (http.ready_spool_fraction)",
                    b.last_error.as_deref().unwrap_or("not connected yet"),
                    b.spool_messages,
                    b.spool_bytes,
                    pct(b.spool_bytes),
                    fraction * 100.0
                ),
            )
        };
        checks.push(Check {
            name: format!("bridge {}", b.name),
            ok,
            detail,
        });
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(connected: bool, spool_bytes: u64) -> BridgeSample {
        BridgeSample {
            name: "cloud".into(),
            connected,
            since_ms: 0,
            last_error: Some("cannot connect: refused".into()),
            spool_messages: spool_bytes / 100,
            spool_bytes,
            spool_max_bytes: 1000,
            oldest_age_s: 0.0,
            drain_rate: 0.0,
            time_to_empty_s: None,
            dead_letters: 0,
            spooled: 0,
            spool_commits: 0,
            forwarded: 0,
            dropped: Vec::new(),
            rejected: Vec::new(),
            reconnects: 0,
            connect_failures: 0,
            inflight_window: 0,
            quarantined: 0,
            address: "mqtt://127.0.0.1:1883".into(),
            cert_not_after_s: None,
            cert_expires_in_days: None,
            cert_warn_days: 30,
        }
    }

    fn sample(accepting: bool, bridges: Vec<BridgeSample>) -> Sample {
        Sample {
            time_ms: 0,
            gateway_id: "gw".into(),
            version: "0",
            uptime_s: 0,
            clock_synchronised: None,
            broker: BrokerSample {
                accepting,
                ..BrokerSample::default()
            },
            bridges,
            devices: Vec::new(),
            lines: Vec::new(),
            process: ProcessSample::default(),
            warnings: Vec::new(),
            sys: None,
        }
    }

    fn ok(checks: &[Check]) -> Vec<bool> {
        checks.iter().map(|c| c.ok).collect()
    }

    #[test]
    fn a_bridge_is_ready_connected_or_below_the_spool_fraction() {
        let fresh = Duration::from_secs(1);
        let s = sample(true, vec![bridge(true, 900)]);
        assert_eq!(ok(&readiness(&s, 0.5, fresh)), [true, true]);
        let s = sample(true, vec![bridge(false, 499)]);
        assert_eq!(ok(&readiness(&s, 0.5, fresh)), [true, true]);
        let s = sample(true, vec![bridge(false, 500)]);
        let c = readiness(&s, 0.5, fresh);
        assert_eq!(ok(&c), [true, false]);
        assert!(
            c[1].detail.contains("cannot connect: refused"),
            "{}",
            c[1].detail
        );
        // Fraction 0: ready only while connected, even with an empty spool.
        let s = sample(true, vec![bridge(false, 0)]);
        assert_eq!(ok(&readiness(&s, 0.0, fresh)), [true, false]);
    }

    #[test]
    fn the_broker_must_answer_and_the_sample_be_fresh() {
        let s = sample(false, Vec::new());
        assert_eq!(ok(&readiness(&s, 0.5, Duration::from_secs(1))), [false]);
        let s = sample(true, Vec::new());
        assert_eq!(ok(&readiness(&s, 0.5, Duration::from_secs(60))), [false]);
    }
}
