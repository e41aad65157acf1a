//! Live reload: SIGHUP (`systemctl reload outpost`) reads the configuration file again
//! and applies the difference, keeping what did not change.
//!
//! | section | on reload |
//! |---|---|
//! | `[log] level` | applied at once (unless `RUST_LOG` is set) |
//! | users, `allow_anonymous`, ACL, other `[broker]` bounds | new logins use them; topic rules change at once for connected clients |
//! | `[[broker.listeners]]` | added ones open, removed ones stop accepting, changed ones are rebound; TLS files of unchanged ones are read again (a renewed certificate) |
//! | `[[bridge]]` | added ones start, changed ones reconnect with their spool intact, removed ones stop and keep their spool file |
//! | `[sensors]` | lines whose settings changed restart, new ones start, removed devices' retained status is cleared; the others keep polling |
//! | `gateway_id`, `state_dir`, `topic_prefix`, `worker_threads`, `broker.persistence`, `broker.max_store_size`, `broker.commit_window`, `broker.max_connections*`, `[http]` | logged as needing a restart; the old value stays |
//!
//! A file that does not parse or validate changes nothing: the error (file, line,
//! column, key) is logged and the gateway keeps running on the configuration it has.

use std::path::PathBuf;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::bridge::Bridges;
use crate::broker::{Broker, ServingListener, bind_listeners, check_tls};
use crate::config::Config;
use crate::service;

/// The parts of a running gateway that a reload changes.
pub struct Running {
    config: Config,
    path: Option<PathBuf>,
    broker: Broker,
    listeners: Vec<ServingListener>,
    bridges: Bridges,
    sensor_lines: service::SensorLines,
    sensor_devices: service::SensorDevices,
    /// Stops the sensor layer, before the bridges so its devices' offline status still
    /// goes up to the cloud.
    sensors_stop: watch::Sender<bool>,
    /// The sensor layer's own tasks.
    sensor_tasks: JoinSet<()>,
    /// Applies a changed `[sensors]` line by line; `None` while no sensor is configured.
    sensors: Option<crate::sensors::SensorsReload>,
}

impl Running {
    /// Wraps what `app::run` started and starts the sensor layer.
    pub async fn start(
        config: Config,
        path: Option<PathBuf>,
        broker: Broker,
        listeners: Vec<ServingListener>,
        bridges: Bridges,
    ) -> Running {
        let (sensors_stop, _) = watch::channel(false);
        let mut running = Running {
            config,
            path,
            broker,
            listeners,
            bridges,
            sensor_lines: service::SensorLines::default(),
            sensor_devices: service::SensorDevices::default(),
            sensors_stop,
            sensor_tasks: JoinSet::new(),
            sensors: None,
        };
        let config = running.config.clone();
        running.start_sensors(&config).await;
        running
    }

    /// Stops the sensor layer (each device's retained status becomes offline) and waits
    /// a moment for it; the first step of a shutdown.
    pub async fn stop_sensors(&mut self) {
        self.sensors_stop.send_replace(true);
        let tasks = &mut self.sensor_tasks;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }

    /// The sensor layer's counters, kept current across reloads.
    pub fn sensor_lines(&self) -> service::SensorLines {
        self.sensor_lines.clone()
    }

    /// The configured sensor devices, kept current across reloads.
    pub fn sensor_devices(&self) -> service::SensorDevices {
        self.sensor_devices.clone()
    }

    async fn start_sensors(&mut self, config: &Config) {
        self.sensor_devices
            .set(service::SensorDevices::of(&config.sensors()));
        let started = crate::sensors::spawn_reloadable(
            config.sensors(),
            config.gateway_id(),
            self.broker.handle(),
            self.sensors_stop.subscribe(),
            &mut self.sensor_tasks,
        )
        .await;
        let (stats, reload) = started.unzip();
        self.sensor_lines.set(stats);
        self.sensors = reload;
    }

    /// Applies `[sensors]`: lines whose settings changed restart, new ones start,
    /// removed devices' retained status is cleared, the rest keep polling untouched.
    async fn reload_sensors(
        &mut self,
        config: &Config,
        summary: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let Some(layer) = &self.sensors else {
            let sensors = config.sensors();
            if !sensors.modbus.is_empty() || !sensors.serial.is_empty() {
                self.start_sensors(config).await;
                summary.push("sensor layer started".to_owned());
            }
            return Ok(());
        };
        let r = layer.reload(config.sensors()).await?;
        self.sensor_devices
            .set(service::SensorDevices::of(&config.sensors()));
        for (what, names) in [
            ("started", &r.started),
            ("restarted", &r.restarted),
            ("stopped", &r.stopped),
            ("removed (status cleared)", &r.removed_devices),
        ] {
            if !names.is_empty() {
                summary.push(format!("sensor lines {what}: {}", names.join(", ")));
            }
        }
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The bridges.
    pub fn bridges(&self) -> &Bridges {
        &self.bridges
    }

    /// The listeners as `tcp://127.0.0.1:1883`.
    pub fn listener_urls(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|l| format!("{}://{}", l.transport(), l.local_addr))
            .collect()
    }

    /// `serving MQTT on tcp://127.0.0.1:1883, ...` for systemd's status line.
    pub fn serving_line(&self) -> String {
        format!("serving MQTT on {}", self.listener_urls().join(", "))
    }

    /// Reads the file again and applies it, telling systemd (`RELOADING=1`, then
    /// `READY=1`). Errors are logged; the gateway keeps running either way.
    pub async fn reload(&mut self, tasks: &mut JoinSet<()>) {
        service::notify_reloading();
        info!("reload requested");
        let status = match self.try_reload(tasks).await {
            Ok(()) => self.serving_line(),
            Err(e) => {
                error!("reload failed, still running on the previous configuration: {e:#}");
                format!("reload failed: {e:#}")
            }
        };
        service::notify_ready(&status);
    }

    async fn try_reload(&mut self, tasks: &mut JoinSet<()>) -> anyhow::Result<()> {
        let Some(path) = self.path.clone() else {
            // The TLS files of the default's listeners (none) aside, there is nothing to read.
            info!("running on the embedded default configuration: nothing to reload");
            return Ok(());
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let new = Config::parse(&text, &path)?;

        // Everything that can fail without side effects is checked before anything
        // changes: a bad file must leave the gateway exactly as it was.
        if new.log.level != self.config.log.level {
            tracing_subscriber::EnvFilter::try_new(&new.log.level)
                .with_context(|| format!("log.level {:?} is not a valid filter", new.log.level))?;
        }
        for l in &new.broker.listeners {
            check_tls(l).with_context(|| format!("listener {}", l.bind))?;
        }
        let restart = needs_restart(&self.config, &new);

        // Listeners: open the added ones first, so a port in use fails the reload
        // before anything else changed.
        let added: Vec<_> = new
            .broker
            .listeners
            .iter()
            .filter(|c| !self.listeners.iter().any(|l| l.config.bind == c.bind))
            .cloned()
            .collect();
        let bound = bind_listeners(&added)
            .await
            .context("opening the new listeners")?;

        // From here on the new file is applied.
        self.broker
            .reload(&new.broker)
            .await
            .context("the broker core stopped")?;
        let mut summary = Vec::new();
        let mut kept = Vec::new();
        for l in std::mem::take(&mut self.listeners) {
            match new
                .broker
                .listeners
                .iter()
                .find(|c| c.bind == l.config.bind)
            {
                None => {
                    summary.push(format!("listener {} removed", l.local_addr));
                    l.stop().await;
                }
                Some(c) if c.same_socket(&l.config) => {
                    let mut l = l;
                    l.config = c.clone();
                    match l.reload_tls() {
                        Ok(true) => {
                            summary.push(format!("listener {}: TLS files read again", l.local_addr))
                        }
                        Ok(false) => {}
                        Err(e) => warn!(addr = %l.local_addr, "keeping the old certificate: {e:#}"),
                    }
                    kept.push(l);
                }
                Some(c) => {
                    // Changed in place: the socket must be released before it is bound
                    // again. If the new settings cannot be bound, the old ones are.
                    let old = l.config.clone();
                    let addr = l.local_addr;
                    l.stop().await;
                    let rebound = match bind_listeners(std::slice::from_ref(c)).await {
                        Ok(b) => {
                            summary.push(format!("listener {addr} changed"));
                            b
                        }
                        Err(e) => {
                            error!(%addr, "cannot apply the changed listener, keeping the old one: {e:#}");
                            bind_listeners(std::slice::from_ref(&old))
                                .await
                                .unwrap_or_default()
                        }
                    };
                    kept.extend(self.broker.serve(rebound));
                }
            }
        }
        for l in self.broker.serve(bound) {
            summary.push(format!(
                "listener {}://{} added",
                l.transport(),
                l.local_addr
            ));
            kept.push(l);
        }
        // Keep the file's order, for the status line and the log.
        kept.sort_by_key(|l| {
            new.broker
                .listeners
                .iter()
                .position(|c| c.bind == l.config.bind)
                .unwrap_or(usize::MAX)
        });
        self.listeners = kept;

        let changes = self.bridges.apply(&new.bridge, tasks).await;
        for n in &changes.added {
            summary.push(format!("bridge {n} added"));
        }
        for n in &changes.changed {
            summary.push(format!("bridge {n} reconnected with new settings"));
        }
        for n in &changes.removed {
            summary.push(format!("bridge {n} removed (its spool file stays)"));
        }
        for f in &changes.failed {
            error!("bridge {f}");
        }

        if let Err(e) = self
            .reload_sensors(&keep_restart_only(new.clone(), &self.config), &mut summary)
            .await
        {
            error!("sensors: {e:#}");
        }

        if new.log.level != self.config.log.level {
            match service::set_log_level(&new.log.level) {
                Ok(true) => summary.push(format!("log level {:?}", new.log.level)),
                Ok(false) => warn!("RUST_LOG is set; it keeps deciding the log level"),
                Err(e) => warn!("{e}"),
            }
        }
        let mut restart = restart;
        restart.extend(changes.need_restart);
        if !restart.is_empty() {
            warn!(
                "changed settings that take effect only at the next restart: {}",
                restart.join(", ")
            );
        }
        self.config = keep_restart_only(new, &self.config);
        if summary.is_empty() {
            summary.push("nothing changed".to_owned());
        }
        info!("reloaded {}: {}", path.display(), summary.join("; "));
        Ok(())
    }
}

/// Settings that are read once at start, by name, when the new file changes them.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |changed: bool, key: &str| {
        if changed {
            out.push(key.to_owned());
        }
    };
    check(old.gateway_id != new.gateway_id, "gateway_id");
    check(old.state_dir != new.state_dir, "state_dir");
    check(old.topic_prefix != new.topic_prefix, "topic_prefix");
    check(old.worker_threads != new.worker_threads, "worker_threads");
    check(
        old.broker.persistence != new.broker.persistence,
        "broker.persistence",
    );
    check(
        old.broker.max_store_size != new.broker.max_store_size,
        "broker.max_store_size",
    );
    check(
        old.broker.commit_window != new.broker.commit_window,
        "broker.commit_window",
    );
    check(
        old.broker.max_connections != new.broker.max_connections,
        "broker.max_connections",
    );
    check(
        old.broker.max_connections_per_address != new.broker.max_connections_per_address,
        "broker.max_connections_per_address",
    );
    check(old.http != new.http, "http");
    out
}

/// The config now in force: the new file, except for what only a restart applies.
fn keep_restart_only(mut new: Config, old: &Config) -> Config {
    new.gateway_id = old.gateway_id.clone();
    new.state_dir = old.state_dir.clone();
    new.topic_prefix = old.topic_prefix.clone();
    new.worker_threads = old.worker_threads;
    new.broker.persistence = old.broker.persistence;
    new.broker.max_store_size = old.broker.max_store_size;
    new.broker.commit_window = old.broker.commit_window;
    new.broker.max_connections = old.broker.max_connections;
    new.broker.max_connections_per_address = old.broker.max_connections_per_address;
    new.http = old.http.clone();
    new
}
