//! Outpost sensor layer: Modbus RTU/TCP and serial line acquisition.
//!
//! The layer emits [`SensorMessage`]s; the gateway publishes them in-process. Commands arrive as
//! [`Command`]s from the `.../{device}/{point}/set` topics returned by [`command_filters`].
//! Counters are published through the same channel under `$SYS/broker/sensors/...` every
//! `stats_interval`, and are readable directly through [`Stats`] when using [`run_with_stats`].

#![deny(unsafe_code)]
#![warn(missing_docs)]

// adjtimex(2) has no safe wrapper in the tree (nix lacks it); it and CLOCK_BOOTTIME are
// the crate's only calls into libc, kept in this one module.
#[allow(unsafe_code)]
pub mod clock;
pub mod config;
pub mod emit;
pub mod error;
#[cfg(debug_assertions)]
mod fault;
pub mod messages;
pub mod modbus;
pub mod plan;
pub mod point;
pub mod report;
pub mod serial;
pub mod stats;
pub mod stop;

pub use config::SensorsConfig;
pub use error::{ConfigError, SensorsError};
pub use messages::{Command, SensorMessage};
pub use stats::Stats;
pub use stop::{Farewell, Stop};

use clock::Clock;
use emit::Emitter;
use messages::{Topics, parse_command_payload, write_result_payload};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The topic filter(s) the gateway subscribes to so that writes reach [`run`].
pub fn command_filters(config: &SensorsConfig, gateway_id: &str) -> Vec<String> {
    if config
        .modbus
        .iter()
        .any(|d| d.points.iter().any(|p| p.writable))
    {
        vec![Topics::new(config.prefix(), gateway_id).command_filter()]
    } else {
        Vec::new()
    }
}

/// Starts every line and sensor; returns when `shutdown` turns true (or its sender is dropped).
pub async fn run(
    config: SensorsConfig,
    gateway_id: String,
    out: mpsc::Sender<SensorMessage>,
    commands: mpsc::Receiver<Command>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SensorsError> {
    run_with_stats(
        config,
        gateway_id,
        out,
        commands,
        shutdown,
        Arc::new(Stats::default()),
    )
    .await
}

/// [`run`] with a caller-provided [`Stats`] handle.
pub async fn run_with_stats(
    config: SensorsConfig,
    gateway_id: String,
    out: mpsc::Sender<SensorMessage>,
    commands: mpsc::Receiver<Command>,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<(), SensorsError> {
    // Nobody sends reloads: the receiver just never yields one.
    let (_keep, reloads) = mpsc::channel(1);
    run_with_reload(config, gateway_id, out, commands, shutdown, stats, reloads).await
}

/// A reload request: the new configuration, and where its outcome goes.
pub type Reload = (
    SensorsConfig,
    tokio::sync::oneshot::Sender<Result<ReloadSummary, SensorsError>>,
);

/// [`run_with_stats`] that also applies the configurations sent on `reloads` (see
/// [`SensorLayer::reload`]). When `shutdown` turns true every device leaves a retained
/// `offline` status ("gateway stopping") before this returns.
pub async fn run_with_reload(
    config: SensorsConfig,
    gateway_id: String,
    out: mpsc::Sender<SensorMessage>,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
    mut reloads: mpsc::Receiver<Reload>,
) -> Result<(), SensorsError> {
    let mut layer = SensorLayer::start(config, &gateway_id, out, shutdown.clone(), stats)?;
    let mut commands_open = true;
    let mut reloads_open = true;
    let mut result = Ok(());
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            cmd = commands.recv(), if commands_open => match cmd {
                Some(cmd) => {
                    if let Err(e) = layer.command(&cmd).await {
                        result = Err(e);
                        break;
                    }
                }
                None => commands_open = false,
            },
            reload = reloads.recv(), if reloads_open => match reload {
                Some((config, reply)) => {
                    let outcome = layer.reload(config).await;
                    let _ = reply.send(outcome);
                }
                None => reloads_open = false,
            },
            e = layer.failed() => { result = Err(e); break; }
            changed = shutdown.changed() => if changed.is_err() { break },
        }
    }
    layer.stop(Farewell::gateway_stopping()).await;
    result
}

/// Which line or sensor a task runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum UnitKey {
    /// A Modbus line: its port path or `host:port`.
    Modbus(String),
    /// A serial line sensor, by name.
    Serial(String),
}

impl UnitKey {
    /// The port path, `host:port` or sensor name.
    fn raw(&self) -> &str {
        match self {
            UnitKey::Modbus(k) | UnitKey::Serial(k) => k,
        }
    }
}

impl std::fmt::Display for UnitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnitKey::Modbus(k) => write!(f, "modbus line {k}"),
            UnitKey::Serial(n) => write!(f, "serial sensor {n}"),
        }
    }
}

/// What a unit runs, compared on reload.
#[derive(Debug, Clone, PartialEq)]
enum UnitConfig {
    Modbus(modbus::transport::Endpoint, Vec<config::ModbusDevice>),
    Serial(config::SerialSensor),
}

impl UnitConfig {
    fn devices(&self) -> Vec<String> {
        match self {
            UnitConfig::Modbus(_, ds) => ds.iter().map(|d| d.name.clone()).collect(),
            UnitConfig::Serial(s) => vec![s.name.clone()],
        }
    }
}

fn units_of(config: &SensorsConfig) -> BTreeMap<UnitKey, UnitConfig> {
    let mut units: BTreeMap<UnitKey, UnitConfig> = modbus::group(config)
        .into_iter()
        .map(|(k, (ep, ds))| (UnitKey::Modbus(k), UnitConfig::Modbus(ep, ds)))
        .collect();
    for s in &config.serial {
        units.insert(
            UnitKey::Serial(s.name.clone()),
            UnitConfig::Serial(s.0.clone()),
        );
    }
    units
}

struct Unit {
    config: UnitConfig,
    stop: watch::Sender<Option<Farewell>>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<stats::LineStats>,
}

/// What a reload changed, by line (`modbus line HOST:PORT`, `serial sensor NAME`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Lines new in the configuration.
    pub started: Vec<String>,
    /// Lines whose configuration changed: stopped, then started with the new one.
    pub restarted: Vec<String>,
    /// Lines no longer in the configuration.
    pub stopped: Vec<String>,
    /// Devices removed; their retained status and readings were cleared.
    pub removed_devices: Vec<String>,
    /// Lines left running untouched.
    pub unchanged: usize,
}

/// How long stopping lines get to leave their status before they are aborted.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The running sensor layer: each Modbus line and serial sensor is a task of its own that
/// can be stopped, restarted or added while the others keep polling.
pub struct SensorLayer {
    config: SensorsConfig,
    gateway_id: String,
    topics: Topics,
    emitter: Emitter,
    stats: Arc<Stats>,
    gateway: watch::Receiver<bool>,
    units: BTreeMap<UnitKey, Unit>,
    routes: HashMap<String, modbus::WriteRoute>,
    failures_tx: mpsc::UnboundedSender<(UnitKey, SensorsError)>,
    failures: mpsc::UnboundedReceiver<(UnitKey, SensorsError)>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for SensorLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SensorLayer")
            .field("units", &self.units.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SensorLayer {
    /// Validates `config` and starts every line and sensor; they stop when `gateway`
    /// turns true, or one by one through [`SensorLayer::reload`].
    pub fn start(
        config: SensorsConfig,
        gateway_id: &str,
        out: mpsc::Sender<SensorMessage>,
        gateway: watch::Receiver<bool>,
        stats: Arc<Stats>,
    ) -> Result<SensorLayer, SensorsError> {
        config.validate()?;
        let topics = Topics::new(config.prefix(), gateway_id);
        let clock = Clock::start(config.clock, gateway.clone());
        let (failures_tx, failures) = mpsc::unbounded_channel();
        let mut layer = SensorLayer {
            topics,
            emitter: Emitter::new(out, clock),
            stats,
            gateway,
            units: BTreeMap::new(),
            routes: HashMap::new(),
            failures_tx,
            failures,
            ticker: None,
            gateway_id: gateway_id.to_string(),
            config: SensorsConfig::default(),
        };
        for (key, unit) in units_of(&config) {
            layer.spawn_unit(key, unit);
        }
        layer.ticker = layer.spawn_ticker(&config);
        tracing::info!(
            modbus = config.modbus.len(),
            serial = config.serial.len(),
            "sensor layer started"
        );
        layer.config = config;
        Ok(layer)
    }

    fn spawn_ticker(&self, config: &SensorsConfig) -> Option<tokio::task::JoinHandle<()>> {
        let every = config.stats_every()?;
        let stats = Arc::clone(&self.stats);
        let emitter = self.emitter.clone();
        let mut sd = self.gateway.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sd.changed() => return,
                }
                for m in stats.messages() {
                    if emitter.send(m).await.is_err() {
                        return;
                    }
                }
            }
        }))
    }

    fn spawn_unit(&mut self, key: UnitKey, config: UnitConfig) {
        let (stop_tx, stop_rx) = watch::channel(None);
        let stop = Stop::with_unit(self.gateway.clone(), stop_rx);
        let failures = self.failures_tx.clone();
        let (run, line_stats): (_, Arc<stats::LineStats>) = match &config {
            UnitConfig::Modbus(ep, devices) => {
                let built = modbus::build_line(
                    key.raw().to_string(),
                    ep.clone(),
                    devices.clone(),
                    &self.topics,
                    &self.emitter,
                    &self.stats,
                );
                self.routes.extend(built.routes);
                let run: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                    Box::pin(built.line.run(built.writes, stop));
                (run, built.stats)
            }
            UnitConfig::Serial(s) => {
                let line_stats = self.stats.line(stats::line_name(&s.port), s.baud);
                let task = serial::SerialTask::new(
                    s.clone(),
                    self.topics.clone(),
                    self.emitter.clone(),
                    Arc::clone(&line_stats),
                );
                let run: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                    Box::pin(task.run(stop));
                (run, line_stats)
            }
        };
        let name = key.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = run.await {
                let _ = failures.send((name, e));
            }
        });
        self.units.insert(
            key,
            Unit {
                config,
                stop: stop_tx,
                task,
                stats: line_stats,
            },
        );
    }

    /// Waits until a line fails for good (the gateway closed the message channel).
    pub async fn failed(&mut self) -> SensorsError {
        match self.failures.recv().await {
            Some((key, e)) => {
                tracing::error!(line = %key, error = %e, "sensor line stopped");
                e
            }
            // The layer holds a sender itself, so this cannot happen; wait forever then.
            None => std::future::pending().await,
        }
    }

    /// Routes a command from a `.../{point}/set` topic to its line.
    pub async fn command(&self, cmd: &Command) -> Result<(), SensorsError> {
        handle_command(cmd, &self.topics, &self.routes, &self.emitter).await
    }

    /// Stops the given units with `farewell`, waiting (bounded) until their devices have
    /// left their status.
    async fn stop_units(&mut self, keys: &[UnitKey], farewell: &Farewell) {
        let mut stopping = Vec::new();
        for key in keys {
            if let Some(unit) = self.units.remove(key) {
                unit.stop.send_replace(Some(farewell.clone()));
                for device in unit.config.devices() {
                    self.routes.remove(&device);
                }
                self.stats.remove(&unit.stats);
                stopping.push(unit.task);
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for mut task in stopping {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!("a sensor line did not stop in {STOP_GRACE:?}; aborting it");
                task.abort();
            }
        }
    }

    /// Applies a new configuration: lines whose devices did not change keep running
    /// untouched; a changed line restarts (its devices say `offline`, "restarting with a
    /// changed configuration", until their first poll); a removed device's retained
    /// status and readings are cleared; new lines start. An invalid configuration
    /// changes nothing and is returned as the error.
    pub async fn reload(&mut self, config: SensorsConfig) -> Result<ReloadSummary, SensorsError> {
        config.validate()?;
        let new_units = units_of(&config);
        let topics = Topics::new(config.prefix(), &self.gateway_id);
        let moved = config.prefix() != self.config.prefix();
        let kept_devices: BTreeSet<String> = if moved {
            // Every old topic is gone: clear them all.
            BTreeSet::new()
        } else {
            new_units.values().flat_map(UnitConfig::devices).collect()
        };
        let mut summary = ReloadSummary::default();
        let mut to_stop = Vec::new();
        let mut removed = BTreeSet::new();
        for (key, unit) in &self.units {
            let changed = match new_units.get(key) {
                None => {
                    summary.stopped.push(key.to_string());
                    true
                }
                Some(c) if moved || *c != unit.config => {
                    summary.restarted.push(key.to_string());
                    true
                }
                Some(_) => false,
            };
            if changed {
                to_stop.push(key.clone());
                removed.extend(
                    unit.config
                        .devices()
                        .into_iter()
                        .filter(|d| !kept_devices.contains(d)),
                );
            }
        }
        summary.removed_devices = removed.iter().cloned().collect();
        self.stop_units(&to_stop, &Farewell::Reload { removed })
            .await;
        self.topics = topics;
        for (key, unit) in new_units {
            if self.units.contains_key(&key) {
                summary.unchanged += 1;
                continue;
            }
            if !summary.restarted.contains(&key.to_string()) {
                summary.started.push(key.to_string());
            }
            self.spawn_unit(key, unit);
        }
        if config.stats_interval != self.config.stats_interval {
            if let Some(t) = self.ticker.take() {
                t.abort();
            }
            self.ticker = self.spawn_ticker(&config);
        }
        if config.clock != self.config.clock {
            tracing::warn!("sensors.clock changes at the next start, not on reload");
        }
        tracing::info!(
            started = summary.started.len(),
            restarted = summary.restarted.len(),
            stopped = summary.stopped.len(),
            unchanged = summary.unchanged,
            "sensor configuration reloaded"
        );
        self.config = config;
        Ok(summary)
    }

    /// Stops every line and sensor; each device leaves its status as `farewell` says
    /// (bounded: a line that does not stop in time is aborted).
    pub async fn stop(mut self, farewell: Farewell) {
        let keys: Vec<UnitKey> = self.units.keys().cloned().collect();
        self.stop_units(&keys, &farewell).await;
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}

async fn handle_command(
    cmd: &Command,
    topics: &Topics,
    routes: &HashMap<String, modbus::WriteRoute>,
    emitter: &Emitter,
) -> Result<(), SensorsError> {
    let Some((device, point)) = topics.parse_command(&cmd.topic) else {
        tracing::debug!(topic = %cmd.topic, "ignoring command on an unknown topic");
        return Ok(());
    };
    let (error, id) = match parse_command_payload(&cmd.payload) {
        Ok((value, id)) => match modbus::route_write(routes, device, point, value, id.clone()) {
            Ok(()) => return Ok(()),
            Err(e) => (e.to_string(), id),
        },
        Err(e) => (e.to_string(), None),
    };
    tracing::info!(device, point, %error, "write refused");
    emitter
        .send(SensorMessage {
            topic: topics.write_result(device, point),
            payload: write_result_payload(Err(&error), id.as_ref(), &emitter.clock),
            qos: outpost_mqtt::QoS::AtLeastOnce,
            retain: false,
        })
        .await
}
