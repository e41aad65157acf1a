//! Serial line sensors: open/reopen with backoff, framing, parsing, publishing.

pub mod csv;
pub mod framing;
pub mod jsonl;
pub mod kv;
pub mod nmea;
pub mod parsed;

use crate::config::{Format, Framing, SerialPoint, SerialSensor};
use crate::emit::{Emitter, PointOutput};
use crate::error::{FrameError, ReadingError, SensorsError};
use crate::messages::{DeviceStatus, SensorMessage, Topics};
use crate::modbus::transport::open_serial;
use crate::point::Value;
use crate::point::{Codec, DataType, Order};
use crate::report::Policy;
use crate::stats::LineStats;
use crate::stop::{Farewell, Stop};
use framing::{Frame, Framer};
use parsed::Parsed;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Parses one frame with the sensor's format.
pub fn parse_frame(cfg: &SerialSensor, frame: &[u8]) -> Parsed {
    let Ok(text) = std::str::from_utf8(frame) else {
        if cfg.format == Format::Kv {
            // The keys that survive the damage name the points this line was carrying.
            let lossy = String::from_utf8_lossy(frame);
            return Parsed::Error {
                fields: kv::keys(&lossy),
                reason: FrameError::NotUtf8,
            };
        }
        return Parsed::error(FrameError::NotUtf8);
    };
    let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    if text.is_empty() {
        return Parsed::Ignored;
    }
    match cfg.format {
        Format::Nmea => nmea::parse(text, cfg.allow_missing_checksum),
        Format::Kv => kv::parse(text),
        Format::Csv => csv::parse(text, &cfg.columns, cfg.separator.unwrap_or(',')),
        Format::Jsonl => jsonl::parse(text),
    }
}

struct Field {
    out: PointOutput,
    codec: Codec,
    updated: Instant,
    /// Takes numbers only: configured with a unit, scale, offset, range or deadband, or
    /// it has given a number before. Text in it then is a fault, not a reading.
    numeric: bool,
}

/// A value as an error message quotes it.
fn quoted(v: &Value) -> String {
    match v {
        Value::Text(t) => format!("{:?}", kv::truncate(t)),
        other => other.to_json().to_string(),
    }
}

/// The running state of one serial sensor.
pub struct SerialTask {
    cfg: SerialSensor,
    topics: Topics,
    emitter: Emitter,
    stats: Arc<LineStats>,
    fields: HashMap<String, Field>,
    status: Option<(DeviceStatus, Option<String>)>,
    /// When a frame that hurt no point was last logged as a warning, and how many
    /// followed unlogged since: a noisy line must not flood the journal.
    frame_warned: Option<Instant>,
    frames_unlogged: u64,
    /// New keys dropped because [`MAX_DISCOVERED_FIELDS`] were already known; the first
    /// one is logged, the rest only counted, so a noisy line cannot flood the journal.
    fields_refused: u64,
}

/// At most one warning per sensor this often for frames that name no point.
const FRAME_WARN_EVERY: Duration = Duration::from_secs(60);

/// Most fields a sensor without `points` discovers on its own. Each one is kept for the
/// life of the task and gets its own (maybe retained) topic, so line noise or a faulty
/// device naming a new key in every frame would otherwise grow memory and the topic
/// space without end; real devices name far fewer keys than this.
pub const MAX_DISCOVERED_FIELDS: usize = 256;

impl std::fmt::Debug for SerialTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialTask")
            .field("name", &self.cfg.name)
            .finish()
    }
}

impl SerialTask {
    /// Builds the task; configured points are created up front, others on first sight.
    pub fn new(cfg: SerialSensor, topics: Topics, emitter: Emitter, stats: Arc<LineStats>) -> Self {
        let mut t = SerialTask {
            cfg,
            topics,
            emitter,
            stats,
            fields: HashMap::new(),
            status: None,
            frame_warned: None,
            frames_unlogged: 0,
            fields_refused: 0,
        };
        let points = t.cfg.points.clone();
        for p in &points {
            let f = t.make_field(Some(p), &p.field);
            t.fields.insert(p.field.clone(), f);
        }
        t
    }

    fn make_field(&self, p: Option<&SerialPoint>, field: &str) -> Field {
        let c = &self.cfg;
        let name = p.map_or(field, SerialPoint::topic_name);
        let policy = Policy::new(
            p.and_then(|p| p.report).unwrap_or(c.report),
            p.and_then(|p| p.deadband),
            p.and_then(|p| p.deadband_percent),
            c.heartbeat_of(p),
        );
        Field {
            out: PointOutput::new(
                self.topics.reading(&c.name, name),
                p.and_then(|p| p.unit.clone()),
                p.and_then(|p| p.qos).unwrap_or(c.qos),
                p.and_then(|p| p.retain).unwrap_or(c.retain),
                p.and_then(|p| p.min),
                p.and_then(|p| p.max),
                policy,
            ),
            codec: Codec {
                scale: p.map_or(1.0, |p| p.scale),
                offset: p.map_or(0.0, |p| p.offset),
                ..Codec::plain(DataType::F64, Order::Abcd)
            },
            updated: Instant::now(),
            numeric: p.is_some_and(SerialPoint::is_numeric),
        }
    }

    /// Turns one parsed frame into messages.
    pub fn handle(&mut self, parsed: Parsed, now: Instant) -> Vec<SensorMessage> {
        let clock = self.emitter.clock.clone();
        let mut msgs = Vec::new();
        match parsed {
            Parsed::Ignored => {}
            Parsed::Fields(fields) => {
                for (name, result) in fields {
                    if !self.fields.contains_key(&name) {
                        // Unconfigured fields are published only when no points are listed, and only if they are valid topic levels.
                        if !self.cfg.points.is_empty()
                            || name.is_empty()
                            || name.contains(['/', '+', '#', '\0'])
                            || name == "status"
                        {
                            continue;
                        }
                        if self.fields.len() >= MAX_DISCOVERED_FIELDS {
                            self.refuse_field(&name);
                            continue;
                        }
                        let f = self.make_field(None, &name);
                        self.fields.insert(name.clone(), f);
                    }
                    let Some(f) = self.fields.get_mut(&name) else {
                        continue;
                    };
                    let result = result.map_err(ReadingError::from).and_then(|v| {
                        let number = v.as_f64().is_some() && !matches!(v, Value::Bool(_));
                        if f.numeric && !number {
                            return Err(ReadingError::NotANumber(quoted(&v)));
                        }
                        f.numeric |= number;
                        Ok(f.codec.apply_scale(v)?)
                    });
                    if result.is_err() {
                        LineStats::bump(&self.stats.value_errors);
                    }
                    f.updated = now;
                    msgs.extend(f.out.observe(result, now, &clock));
                }
            }
            Parsed::Error { fields, reason } => {
                LineStats::bump(&self.stats.value_errors);
                if fields.is_empty() {
                    self.warn_frame(&reason, now);
                } else {
                    tracing::debug!(device = %self.cfg.name, %reason, "bad frame");
                }
                // Only the points the frame was carrying are hurt: one garbled line must not
                // flap every point of the sensor. A frame that names none touches none; its
                // points go stale (`stale_after`) if good frames stop coming.
                for (name, f) in &mut self.fields {
                    if fields.contains(name) {
                        msgs.extend(f.out.observe(Err(reason.clone().into()), now, &clock));
                    }
                }
            }
        }
        msgs
    }

    /// Counts a key dropped at the discovery cap; warns on the first, telling the user how
    /// to choose the fields instead.
    fn refuse_field(&mut self, name: &str) {
        self.fields_refused += 1;
        if self.fields_refused > 1 {
            return;
        }
        let device = self.cfg.name.as_str();
        tracing::warn!(
            device,
            "device {device} has sent more than {MAX_DISCOVERED_FIELDS} distinct field names \
             (the latest: {:?}); new ones are ignored from now on. To choose which fields \
             are published, list them as `points` in its [[sensors.serial]] section; if the \
             names look like noise, check the port's `baud`, `format` and `framing`",
            kv::truncate(name)
        );
    }

    /// How many new field names were ignored because the discovery cap was reached.
    pub fn fields_refused(&self) -> u64 {
        self.fields_refused
    }

    fn warn_frame(&mut self, reason: &FrameError, now: Instant) {
        if self
            .frame_warned
            .is_some_and(|t| now.duration_since(t) < FRAME_WARN_EVERY)
        {
            self.frames_unlogged += 1;
            return;
        }
        let device = self.cfg.name.as_str();
        let more = std::mem::take(&mut self.frames_unlogged);
        tracing::warn!(
            device,
            "device {device} sent an unusable frame: {reason} ({more} more since the last warning)"
        );
        self.frame_warned = Some(now);
    }

    fn check_stale(&mut self, now: Instant) -> Vec<SensorMessage> {
        let Some(limit) = self.cfg.stale_after.map(|d| d.0) else {
            return Vec::new();
        };
        let clock = self.emitter.clock.clone();
        self.fields
            .values_mut()
            .filter(|f| now.duration_since(f.updated) >= limit)
            .filter_map(|f| f.out.mark_stale(now, &clock))
            .collect()
    }

    async fn set_status(
        &mut self,
        status: DeviceStatus,
        error: Option<String>,
    ) -> Result<(), SensorsError> {
        let next = (status, error);
        if self.status.as_ref() == Some(&next) {
            return Ok(());
        }
        crate::emit::log_status(&self.cfg.name, status, next.1.as_deref(), 0);
        self.emitter
            .status(
                &self.topics.status(&self.cfg.name),
                status,
                next.1.as_deref(),
            )
            .await?;
        self.status = Some(next);
        Ok(())
    }

    /// Runs until told to stop: opens the port, reads frames, reopens with backoff when it
    /// goes away; on a stop, leaves the retained status as the stop's [`Farewell`] says.
    pub async fn run(mut self, mut stop: Stop) -> Result<(), SensorsError> {
        let farewell = self.serve(&mut stop).await?;
        tracing::debug!(device = %self.cfg.name, ?farewell, "device stopped");
        let status = self.topics.status(&self.cfg.name);
        let retained: Vec<String> = self
            .fields
            .values()
            .filter(|f| f.out.retain)
            .map(|f| f.out.topic.clone())
            .collect();
        self.emitter
            .farewell(
                &farewell,
                &self.cfg.name,
                &status,
                retained.iter().map(String::as_str),
            )
            .await
    }

    async fn serve(&mut self, stop: &mut Stop) -> Result<Farewell, SensorsError> {
        let first = self
            .cfg
            .reopen_backoff
            .map_or(Duration::from_secs(1), |d| d.0);
        let max = self
            .cfg
            .max_reopen_backoff
            .map_or(Duration::from_secs(30), |d| d.0);
        let mut backoff = first;
        let limit = match self.cfg.framing {
            Framing::Fixed => self.cfg.frame_length.unwrap_or(1),
            Framing::Lines => self.cfg.frame_length.unwrap_or(1024),
        };
        let mut framer = Framer::new(self.cfg.framing, limit);
        // Also the heartbeat: the loop goes round at least this often when the device is
        // quiet, so the watchdog can tell a quiet line from a wedged task.
        let tick_every = self
            .cfg
            .stale_after
            .map_or(Duration::from_secs(3600), |d| {
                (d.0 / 2).max(Duration::from_millis(10))
            })
            .min(crate::stats::HEARTBEAT);
        self.stats.expect_steps_up_to(max);
        loop {
            if let Some(f) = stop.requested() {
                return Ok(f);
            }
            self.stats.beat();
            #[cfg(debug_assertions)]
            if crate::fault::wedge_lines() {
                std::future::pending::<()>().await;
            }
            let line = self.cfg.line();
            match open_serial(&line) {
                Err(e) => {
                    LineStats::bump(&self.stats.transport_errors);
                    self.set_status(
                        DeviceStatus::Offline,
                        // No retry delay in the error: the status (and the warning) then
                        // changes once per outage, not at every reopen attempt.
                        Some(format!("cannot open {}: {e}", self.cfg.port)),
                    )
                    .await?;
                }
                Ok(mut port) => {
                    backoff = first;
                    framer.reset();
                    self.set_status(DeviceStatus::Online, None).await?;
                    let mut buf = vec![0u8; 1024];
                    let mut tick = tokio::time::interval(tick_every);
                    let reason = loop {
                        self.stats.beat();
                        tokio::select! {
                            r = port.read(&mut buf) => match r {
                                Ok(0) => break "port closed".to_string(),
                                Ok(n) => {
                                    self.stats.bytes_rx.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                                    LineStats::add_time(&self.stats.wire_ns, line.wire_time(n as u64));
                                    let now = Instant::now();
                                    for frame in framer.push(&buf[..n]) {
                                        let parsed = match frame {
                                            Frame::Data(d) => parse_frame(&self.cfg, &d),
                                            Frame::TooLong => Parsed::error(FrameError::TooLong(limit)),
                                        };
                                        for m in self.handle(parsed, now) {
                                            self.emitter.send(m).await?;
                                        }
                                    }
                                }
                                Err(e) => break format!("port lost: {e}"),
                            },
                            _ = tick.tick() => {
                                for m in self.check_stale(Instant::now()) {
                                    self.emitter.send(m).await?;
                                }
                            }
                            f = stop.wait() => return Ok(f),
                        }
                    };
                    LineStats::bump(&self.stats.transport_errors);
                    self.set_status(DeviceStatus::Offline, Some(reason)).await?;
                    let now = Instant::now();
                    let clock = self.emitter.clock.clone();
                    let mut msgs = Vec::new();
                    for f in self.fields.values_mut() {
                        msgs.extend(f.out.observe(Err(ReadingError::Disconnected), now, &clock));
                    }
                    for m in msgs {
                        self.emitter.send(m).await?;
                    }
                }
            }
            tracing::debug!(device = %self.cfg.name, "reopening {} in {backoff:?}", self.cfg.port);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                f = stop.wait() => return Ok(f),
            }
            backoff = backoff.saturating_mul(2).min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use serde_json::Value as Json;
    use tokio::sync::mpsc;

    fn task(points: &str) -> SerialTask {
        let src = format!(
            "name = \"meter\"\nport = \"/dev/null\"\nformat = \"kv\"\nreport = \"every\"\npoints = [{points}]\n"
        );
        let cfg: SerialSensor = toml::from_str(&src).unwrap();
        let (tx, _rx) = mpsc::channel(16);
        SerialTask::new(
            cfg,
            Topics::new("outpost", "gw"),
            Emitter::new(tx, Clock::fixed(true)),
            Arc::new(LineStats::new("meter", 9600)),
        )
    }

    /// (point, quality, value or reason) of each message one frame yields.
    fn feed(t: &mut SerialTask, frame: &[u8]) -> Vec<(String, String, Json)> {
        let parsed = parse_frame(&t.cfg, frame);
        let mut out: Vec<_> = t
            .handle(parsed, Instant::now())
            .into_iter()
            .map(|m| {
                let j: Json = serde_json::from_slice(&m.payload).unwrap();
                let point = m.topic.rsplit('/').next().unwrap().to_string();
                let q = j["quality"].as_str().unwrap().to_string();
                let v = if q == "good" {
                    j["value"].clone()
                } else {
                    j["reason"].clone()
                };
                (point, q, v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn r(point: &str, q: &str, v: Json) -> (String, String, Json) {
        (point.into(), q.into(), v)
    }

    #[test]
    fn text_in_a_numeric_field_is_bad_not_good() {
        let mut t = task(r#"{ field = "temp", unit = "°C" }, { field = "mode" }"#);
        assert_eq!(
            feed(&mut t, b"temp=21.5 mode=auto"),
            vec![
                r("mode", "good", "auto".into()),
                r("temp", "good", 21.5.into())
            ]
        );
        assert_eq!(
            feed(&mut t, b"temp=abc mode=auto"),
            vec![
                r("mode", "good", "auto".into()),
                r("temp", "bad", "not a number: \"abc\"".into())
            ]
        );
        // A field with no unit, range or scale is numeric once it has given a number.
        let mut learned = task("");
        assert_eq!(
            feed(&mut learned, b"hum=40"),
            vec![r("hum", "good", 40.into())]
        );
        assert_eq!(
            feed(&mut learned, b"hum=high"),
            vec![r("hum", "bad", "not a number: \"high\"".into())]
        );
        assert_eq!(
            feed(&mut learned, b"hum=41"),
            vec![r("hum", "good", 41.into())]
        );
    }

    #[test]
    fn a_garbled_line_hurts_only_the_points_it_carried() {
        let mut t = task("");
        assert_eq!(
            feed(&mut t, b"temp=21.5 hum=40"),
            vec![r("hum", "good", 40.into()), r("temp", "good", 21.5.into())]
        );
        // A line that names no point touches none (it is counted and logged).
        assert_eq!(feed(&mut t, b"#### noise ####"), vec![]);
        assert_eq!(
            t.stats
                .value_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // A damaged line hurts the points it was carrying, not the others.
        assert_eq!(
            feed(&mut t, b"temp=2\xff.5"),
            vec![r("temp", "bad", "frame is not UTF-8 text".into())]
        );
        assert_eq!(
            feed(&mut t, b"hum="),
            vec![r("hum", "bad", "empty value".into())]
        );
        assert_eq!(
            feed(&mut t, b"temp=22 hum=42"),
            vec![r("hum", "good", 42.into()), r("temp", "good", 22.into())]
        );
    }

    #[test]
    fn discovered_fields_stop_at_the_cap_and_known_ones_still_update() {
        let mut t = task("");
        for i in 0..MAX_DISCOVERED_FIELDS + 10 {
            let line = format!("k{i}={i}");
            let got = feed(&mut t, line.as_bytes());
            if i < MAX_DISCOVERED_FIELDS {
                assert_eq!(got, vec![r(&format!("k{i}"), "good", i.into())]);
            } else {
                assert_eq!(got, vec![], "key {i} beyond the cap was published");
            }
        }
        assert_eq!(t.fields.len(), MAX_DISCOVERED_FIELDS);
        assert_eq!(t.fields_refused(), 10);
        // A line mixing a known key and a new one updates the known one only.
        assert_eq!(
            feed(&mut t, b"k0=99 fresh=1"),
            vec![r("k0", "good", 99.into())]
        );
        assert_eq!(t.fields.len(), MAX_DISCOVERED_FIELDS);
        assert_eq!(t.fields_refused(), 11);
    }

    #[test]
    fn the_overlong_line_message_names_the_configured_limit() {
        let reason = FrameError::TooLong(64).to_string();
        assert!(reason.contains("frame_length = 64 bytes"), "{reason}");
    }
}
