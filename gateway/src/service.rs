//! systemd integration: readiness, status, watchdog and journal logging.
//!
//! Uses the pure-Rust `sd-notify` and `tracing-journald` (DESIGN.md, "Dependency
//! decisions"); both are no-ops when not started by systemd.

use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use outpost_bridge::BridgeHandle;
use outpost_mqtt::{Properties, QoS};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::broker::{BrokerHandle, LocalSubscription};

/// Sets up logging: the journal when started by systemd (`JOURNAL_STREAM` set),
/// otherwise human-readable lines on stderr. `RUST_LOG` overrides `level`.
pub fn init_logging(level: &str) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_wins = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    if !env_wins {
        let _ = LOG_FILTER.set(handle);
    }
    // The status page shows the last warnings; its layer keeps a few.
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(crate::warnings::Layer);
    // No field prefix: tracing fields become journal fields as they are named
    // (`device` → `DEVICE=`), so `journalctl -u outpost BRIDGE=cloud` or `DEVICE=boiler`
    // works; the default would be `F_BRIDGE=`.
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer().map(|l| l.with_field_prefix(None))
    {
        let _ = registry.with(journald).try_init();
        return;
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .try_init();
}

type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The log filter a reload may replace; unset when `RUST_LOG` decides.
static LOG_FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

/// Applies a reloaded `[log] level`. `Ok(false)` when `RUST_LOG` is set (it wins, as at
/// start); an invalid filter changes nothing.
pub fn set_log_level(level: &str) -> Result<bool, String> {
    let Some(handle) = LOG_FILTER.get() else {
        return Ok(false);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    handle
        .reload(filter)
        .map(|()| true)
        .map_err(|e| format!("cannot change the log level: {e}"))
}

/// Tells systemd a reload started (`RELOADING=1` with the monotonic time systemd 253+
/// asks for); [`notify_ready`] ends it.
pub fn notify_reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0);
    let usec = format!("MONOTONIC_USEC={now}");
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Reloading,
        sd_notify::NotifyState::Custom(&usec),
    ]);
}

/// Tells systemd the service is ready, with a status line.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// The running sensor layer's counters, replaced when a reload restarts the layer.
#[derive(Clone, Default)]
pub struct SensorLines(
    std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<outpost_sensors::stats::Stats>>>>,
);

impl SensorLines {
    /// The current layer's counters, if sensors run.
    pub fn get(&self) -> Option<std::sync::Arc<outpost_sensors::stats::Stats>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces them.
    pub fn set(&self, s: Option<std::sync::Arc<outpost_sensors::stats::Stats>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

/// The names of the configured sensor devices, kept current across reloads: the status
/// line counts only these, so a LAN client publishing `{base}/<anything>/status` cannot
/// grow the supervisor's memory.
#[derive(Clone, Default)]
pub struct SensorDevices(std::sync::Arc<std::sync::RwLock<std::collections::BTreeSet<String>>>);

impl SensorDevices {
    /// The devices of a `[sensors]` section.
    pub fn of(sensors: &outpost_sensors::SensorsConfig) -> std::collections::BTreeSet<String> {
        sensors
            .modbus
            .iter()
            .map(|d| d.name.clone())
            .chain(sensors.serial.iter().map(|s| s.name.clone()))
            .collect()
    }

    /// The current set.
    pub fn get(&self) -> std::collections::BTreeSet<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces it.
    pub fn set(&self, names: std::collections::BTreeSet<String>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = names;
    }
}

/// Topic of the watchdog's round trip through the broker core. Wildcard subscriptions of
/// clients never match a `$` topic, and no bridge rule takes it.
const PROBE_TOPIC: &str = "$outpost/watchdog";
/// How often the status line is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// What the watchdog checks and the status line reports.
pub struct Watched {
    /// The broker core: the watchdog is fed only after a message went through it.
    pub broker: BrokerHandle,
    /// The bridges: their spool writers must answer and their uplink tasks run.
    pub bridges: crate::bridge::BridgeSet,
    /// The sensor layer's lines: each task must keep going round its loop.
    pub sensor_lines: SensorLines,
    /// `{prefix}/{gateway_id}/sensors`, when sensors are configured.
    pub sensors_base: Option<String>,
    /// The configured sensor devices: the only ones the status line counts.
    pub sensor_devices: SensorDevices,
}

/// Feeds the systemd watchdog (when `WATCHDOG_USEC` is set for this process) only while
/// the work is alive, and keeps `STATUS=` current. Each round publishes a message to a
/// private topic through the broker core and waits for it to come back on an in-process
/// subscription, then asks every bridge's spool writer for a commit and checks its
/// uplink task. Only when all of that answered within the round is `WATCHDOG=1` sent: a
/// wedged core (or spool writer) stops the pings and systemd restarts the service after
/// `WatchdogSec`. Does nothing when not started by systemd (no `NOTIFY_SOCKET`).
pub async fn spawn_supervisor(w: Watched) -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
    // A quarter of the interval: one slow round does not trip it, two wedged ones do.
    let every = watchdog.map_or(STATUS_EVERY, |d| (d / 4).min(STATUS_EVERY));
    let mut probe = match w.broker.subscribe(PROBE_TOPIC, QoS::AtMostOnce).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "watchdog: cannot subscribe to its probe topic");
            return None;
        }
    };
    let mut clients = w
        .broker
        .subscribe("$SYS/broker/clients/connected", QoS::AtMostOnce)
        .await
        .ok();
    let mut sensors = match &w.sensors_base {
        Some(base) => w
            .broker
            .subscribe(&format!("{base}/+/status"), QoS::AtMostOnce)
            .await
            .ok(),
        None => None,
    };
    Some(tokio::spawn(async move {
        let mut view = StatusView::default();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        let mut healthy = true;
        loop {
            tick.tick().await;
            seq += 1;
            let check = tokio::time::timeout(every, round_trip(&w, &mut probe, seq));
            let (ok, why) = match check.await {
                Ok(Ok(())) => (true, String::new()),
                Ok(Err(why)) => (false, why),
                Err(_) => (
                    false,
                    "the broker core or a spool writer did not answer in time".into(),
                ),
            };
            if let Some(c) = &mut clients {
                while let Some(m) = drain(c) {
                    view.clients = String::from_utf8_lossy(&m.payload).into_owned();
                }
            }
            if let Some(s) = &mut sensors {
                let configured = w.sensor_devices.get();
                view.keep_only(&configured);
                while let Some(m) = drain(s) {
                    view.sensor_seen(&m.topic, &m.payload, &configured);
                }
            }
            let status = view.line(&w.bridges.snapshot());
            if ok {
                if !healthy {
                    tracing::warn!("watchdog: the broker core and spools answer again");
                }
                healthy = true;
                let mut states = vec![sd_notify::NotifyState::Status(&status)];
                if watchdog.is_some() {
                    states.push(sd_notify::NotifyState::Watchdog);
                }
                let _ = sd_notify::notify(&states);
            } else if healthy {
                healthy = false;
                // Once per episode: a wedged part stays wedged until systemd restarts us.
                tracing::error!(
                    reason = %why,
                    "watchdog: the broker core, a spool writer or a sensor poller did not \
                     answer; not feeding the watchdog"
                );
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
                    "not responding: broker core, spool writer or sensor poller wedged",
                )]);
            }
        }
    }))
}

/// One message through the core and back, then every bridge's sign of life.
async fn round_trip(w: &Watched, probe: &mut LocalSubscription, seq: u64) -> Result<(), String> {
    let payload = Bytes::from(seq.to_string());
    w.broker
        .publish(
            PROBE_TOPIC,
            payload.clone(),
            QoS::AtMostOnce,
            false,
            Properties::default(),
        )
        .await
        .map_err(|e| format!("the broker core refused the probe: {e}"))?;
    // Older probes that came back late are skipped.
    loop {
        let m = probe
            .recv()
            .await
            .ok_or_else(|| "the probe subscription ended".to_owned())?;
        if m.payload == payload {
            break;
        }
    }
    for b in w.bridges.snapshot() {
        if !b.alive().await {
            return Err(format!("bridge {} did not answer", b.name()));
        }
    }
    if let Some(stale) = w
        .sensor_lines
        .get()
        .map(|s| s.stale_lines())
        .filter(|l| !l.is_empty())
    {
        return Err(format!(
            "the poller of sensor line {} stopped going round its loop",
            stale.join(", ")
        ));
    }
    Ok(())
}

fn drain(sub: &mut LocalSubscription) -> Option<std::sync::Arc<crate::broker::Message>> {
    sub.recv().now_or_never().flatten()
}

/// The pieces of the status line.
#[derive(Default)]
struct StatusView {
    clients: String,
    /// device -> online; configured devices only, so at most as many as the config names.
    sensors: std::collections::BTreeMap<String, bool>,
}

impl StatusView {
    /// Records a device's status message. Any LAN client may publish to a status topic,
    /// so a name that is not configured is ignored rather than remembered forever.
    fn sensor_seen(
        &mut self,
        topic: &str,
        payload: &[u8],
        configured: &std::collections::BTreeSet<String>,
    ) {
        let Some(device) = topic.rsplit('/').nth(1) else {
            return;
        };
        if !configured.contains(device) {
            return;
        }
        let online = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| {
                v.get("status")
                    .and_then(|s| s.as_str())
                    .map(|s| s == "online")
            })
            .unwrap_or(false);
        self.sensors.insert(device.to_owned(), online);
    }

    /// Forgets devices a reload removed.
    fn keep_only(&mut self, configured: &std::collections::BTreeSet<String>) {
        self.sensors.retain(|d, _| configured.contains(d));
    }

    /// e.g. `clients 3; uplink cloud: connected, spool 0; sensors 2/2 online`.
    fn line(&self, bridges: &[BridgeHandle]) -> String {
        let mut parts = vec![format!(
            "clients {}",
            if self.clients.is_empty() {
                "0"
            } else {
                &self.clients
            }
        )];
        for b in bridges {
            let st = b.stats();
            parts.push(format!(
                "uplink {}: {}, spool {}",
                b.name(),
                if b.is_connected() {
                    "connected"
                } else {
                    "disconnected"
                },
                st.spool_messages.load(std::sync::atomic::Ordering::Relaxed)
            ));
        }
        if !self.sensors.is_empty() {
            let online = self.sensors.values().filter(|o| **o).count();
            parts.push(format!("sensors {online}/{} online", self.sensors.len()));
        }
        parts.join("; ")
    }
}

/// Debug builds only: `OUTPOST_DEBUG_WEDGE_TOPIC=t` registers a durable sink that blocks
/// the broker core's thread forever when a message on topic `t` arrives. The watchdog test
/// (`tests/tests/watchdog.rs`) uses it to prove the pings stop when the core is wedged.
/// Release builds do not contain it.
#[cfg(debug_assertions)]
pub async fn install_debug_wedge(broker: &BrokerHandle) {
    struct Wedge(String);
    impl crate::broker::DurableSink for Wedge {
        fn wants(&self, topic: &str) -> bool {
            topic == self.0
        }
        fn offer(&self, msg: &crate::broker::Message) -> Option<crate::broker::DurableReceipt> {
            if *msg.topic == *self.0 {
                tracing::error!("debug fault: wedging the broker core");
                loop {
                    std::thread::park();
                }
            }
            None
        }
    }
    if let Some(t) = std::env::var_os("OUTPOST_DEBUG_WEDGE_TOPIC") {
        let t = t.to_string_lossy().into_owned();
        let _ = broker.add_durable_sink(std::sync::Arc::new(Wedge(t))).await;
    }
}

/// Raises the open-file soft limit to the hard limit: every client is a descriptor, and
/// the common soft default (1024) would refuse a LAN of sensors long before memory does.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn online() -> &'static [u8] {
        br#"{"status":"online","error":null}"#
    }

    #[test]
    fn the_status_view_remembers_only_configured_devices() {
        let configured: BTreeSet<String> = ["boiler".to_owned()].into();
        let mut view = StatusView::default();
        view.sensor_seen("outpost/gw/sensors/boiler/status", online(), &configured);
        // Any LAN client may publish under the status wildcard; none of it is kept.
        for i in 0..1000 {
            let topic = format!("outpost/gw/sensors/rogue{i}/status");
            view.sensor_seen(&topic, online(), &configured);
        }
        assert_eq!(view.sensors.len(), 1);
        assert_eq!(view.line(&[]), "clients 0; sensors 1/1 online");
    }

    #[test]
    fn a_device_a_reload_removed_leaves_the_status_view() {
        let both: BTreeSet<String> = ["boiler".to_owned(), "meter".to_owned()].into();
        let mut view = StatusView::default();
        view.sensor_seen("outpost/gw/sensors/boiler/status", online(), &both);
        view.sensor_seen("outpost/gw/sensors/meter/status", online(), &both);
        assert_eq!(view.line(&[]), "clients 0; sensors 2/2 online");
        view.keep_only(&["meter".to_owned()].into());
        assert_eq!(view.line(&[]), "clients 0; sensors 1/1 online");
    }

    #[test]
    fn the_configured_devices_are_the_modbus_and_serial_names() {
        let sensors: outpost_sensors::SensorsConfig =
            toml::from_str("[[serial]]\nname = \"meter\"\nport = \"/dev/null\"\nformat = \"kv\"\n")
                .unwrap();
        assert_eq!(SensorDevices::of(&sensors), ["meter".to_owned()].into());
    }
}
