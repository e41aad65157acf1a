//! Modbus acquisition: lines built from the config, their schedulers, and write routing.

pub mod health;
pub mod line;
pub mod transport;

use crate::config::{ModbusDevice, SensorsConfig, Transport};
use crate::emit::{Emitter, PointOutput};
use crate::messages::Topics;
use crate::plan::{Limits, Span, plan};
use crate::point::Value;
use crate::report::Policy;
use crate::stats::{Stats, line_name};
use health::{Health, HealthPolicy};
use line::{Line, LineDevice, LinePoint, Scheduled, WriteJob};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use transport::Endpoint;

/// Where writes for a device go.
#[derive(Debug, Clone)]
pub struct WriteRoute {
    /// The line's queue.
    pub tx: mpsc::Sender<WriteJob>,
    /// Device index on the line.
    pub device: usize,
    /// Point name -> (index, writable).
    pub points: HashMap<String, (usize, bool)>,
}

/// One line ready to run: a serial port or a TCP endpoint with its devices.
#[derive(Debug)]
pub struct BuiltLine {
    /// The port path or `host:port` the devices share.
    pub key: String,
    /// The devices' configurations, in config order (a reload compares them).
    pub devices: Vec<ModbusDevice>,
    /// The scheduler.
    pub line: Line,
    /// Its write queue.
    pub writes: mpsc::Receiver<WriteJob>,
    /// Device name -> route, for this line's devices.
    pub routes: HashMap<String, WriteRoute>,
    /// The line's counters (registered in the layer's [`Stats`]).
    pub stats: std::sync::Arc<crate::stats::LineStats>,
}

/// The devices of `config` grouped by the line they share: port path or `host:port`.
pub fn group(config: &SensorsConfig) -> BTreeMap<String, (Endpoint, Vec<ModbusDevice>)> {
    let mut groups: BTreeMap<String, (Endpoint, Vec<ModbusDevice>)> = BTreeMap::new();
    for d in &config.modbus {
        let (key, ep) = match &d.transport {
            Transport::Tcp(t) => (
                format!("{}:{}", t.host, t.port),
                Endpoint::Tcp {
                    host: t.host.clone(),
                    port: t.port,
                },
            ),
            Transport::Rtu(r) => (r.port.clone(), Endpoint::Rtu(r.clone())),
        };
        groups
            .entry(key)
            .or_insert_with(|| (ep, Vec::new()))
            .1
            .push(d.0.clone());
    }
    groups
}

/// Builds one scheduler per serial port and per TCP endpoint.
pub fn build(
    config: &SensorsConfig,
    topics: &Topics,
    emitter: &Emitter,
    stats: &Stats,
) -> Vec<BuiltLine> {
    group(config)
        .into_iter()
        .map(|(key, (ep, devs))| build_line(key, ep, devs, topics, emitter, stats))
        .collect()
}

/// Builds the scheduler of one line and registers its counters.
pub fn build_line(
    key: String,
    ep: Endpoint,
    devs: Vec<ModbusDevice>,
    topics: &Topics,
    emitter: &Emitter,
    stats: &Stats,
) -> BuiltLine {
    let start = Instant::now();
    let baud = match &ep {
        Endpoint::Rtu(r) => r.baud,
        Endpoint::Tcp { .. } => 0,
    };
    let line_stats = stats.line(line_name(&key), baud);
    let (tx, rx) = mpsc::channel(64);
    let mut devices = Vec::new();
    let mut routes = HashMap::new();
    for (i, d) in devs.iter().enumerate() {
        devices.push(build_device(
            d,
            topics,
            start,
            line_stats.device(d.name.clone()),
        ));
        routes.insert(
            d.name.clone(),
            WriteRoute {
                tx: tx.clone(),
                device: i,
                points: d
                    .points
                    .iter()
                    .enumerate()
                    .map(|(j, p)| (p.name.clone(), (j, p.writable)))
                    .collect(),
            },
        );
    }
    // One step of the line's loop is at most one transaction with its retries, each
    // attempt bounded by the device's timeout (and a connect as long).
    let longest = devices
        .iter()
        .map(|d| d.timeout * 2 * d.retries.saturating_add(1))
        .max()
        .unwrap_or_default();
    line_stats.expect_steps_up_to(longest);
    BuiltLine {
        key,
        devices: devs,
        line: Line::new(
            ep,
            devices,
            std::sync::Arc::clone(&line_stats),
            emitter.clone(),
        ),
        writes: rx,
        routes,
        stats: line_stats,
    }
}

fn build_device(
    d: &ModbusDevice,
    topics: &Topics,
    start: Instant,
    stats: std::sync::Arc<crate::stats::DeviceStats>,
) -> LineDevice {
    let base = u32::from(d.address_base);
    let points: Vec<LinePoint> = d
        .points
        .iter()
        .map(|p| {
            let policy = Policy::new(
                p.report.unwrap_or(d.report),
                p.deadband,
                p.deadband_percent,
                d.heartbeat_of(p),
            );
            LinePoint {
                name: p.name.clone(),
                area: p.kind,
                // validate() guarantees the address fits after removing the base.
                start: (p.address.saturating_sub(base)).min(65_535) as u16,
                codec: p.codec(),
                writable: p.writable,
                write_function: p.write_function,
                out: PointOutput::new(
                    topics.reading(&d.name, &p.name),
                    p.unit.clone(),
                    p.qos.unwrap_or(d.qos),
                    p.retain.unwrap_or(d.retain),
                    p.min,
                    p.max,
                    policy,
                ),
            }
        })
        .collect();
    // Plan per poll interval so a fast point never drags slow ones along.
    let mut by_every: BTreeMap<Duration, Vec<Span>> = BTreeMap::new();
    for (i, (p, lp)) in d.points.iter().zip(&points).enumerate() {
        by_every.entry(d.every_of(p)).or_default().push(Span {
            point: i,
            area: lp.area,
            start: lp.start,
            count: p.count(),
        });
    }
    let limits = Limits {
        max_gap: d.max_gap,
        max_registers: d.max_registers,
        max_bits: d.max_bits,
    };
    let mut reads = Vec::new();
    for (every, spans) in by_every {
        for read in plan(&spans, limits) {
            reads.push(Scheduled {
                read,
                every,
                next_due: start,
            });
        }
    }
    let health = Health::new(HealthPolicy {
        backoff: d.backoff(),
        max_backoff: d.max_backoff(),
        quarantine_after: d.quarantine_after,
        quarantine: d.quarantine(),
    });
    let result_topics = d
        .points
        .iter()
        .map(|p| topics.write_result(&d.name, &p.name))
        .collect();
    LineDevice {
        name: d.name.clone(),
        unit: d.unit,
        timeout: d.timeout(),
        retries: d.retries,
        points,
        reads,
        health,
        status_topic: topics.status(&d.name),
        result_topics,
        served: 0,
        stats,
    }
}

/// Why a command could not be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No such device.
    UnknownDevice,
    /// No such point.
    UnknownPoint,
    /// The point is read-only.
    NotWritable,
    /// The line's queue is full or gone.
    Busy,
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteError::UnknownDevice => "unknown device",
            RouteError::UnknownPoint => "unknown point",
            RouteError::NotWritable => "point is not writable",
            RouteError::Busy => "write queue full",
        })
    }
}

/// Queues a write for a device point.
pub fn route_write(
    routes: &HashMap<String, WriteRoute>,
    device: &str,
    point: &str,
    value: Value,
    id: Option<serde_json::Value>,
) -> Result<(), RouteError> {
    let r = routes.get(device).ok_or(RouteError::UnknownDevice)?;
    let &(idx, writable) = r.points.get(point).ok_or(RouteError::UnknownPoint)?;
    if !writable {
        return Err(RouteError::NotWritable);
    }
    r.tx.try_send(WriteJob {
        device: r.device,
        point: idx,
        value,
        id,
    })
    .map_err(|_| RouteError::Busy)
}
