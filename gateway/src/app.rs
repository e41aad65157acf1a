//! Starts the gateway from a config, runs it until SIGINT or SIGTERM, and applies a new
//! config on SIGHUP (`systemctl reload outpost`).

use std::path::PathBuf;

use anyhow::Context;
use tracing::info;

use crate::bridge::Bridges;
use crate::broker::store::Store;
use crate::broker::{Broker, Settings, bind_listeners};
use crate::config::Config;
use crate::reload::Running;
use crate::service;

/// Runs the gateway until a termination signal. `path` is the file a reload reads
/// again (`None` runs the embedded default, which a reload keeps).
pub async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Before anything listens: a SIGTERM during start-up must still mean a clean stop,
    // not the default action (death without the bridges' clean offline status), and a
    // SIGHUP from logrotate must not kill the gateway (its default action).
    let mut signals = Signals::install().context("installing signal handlers")?;
    let state_dir = config.state_dir();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    let gateway_id = config.gateway_id();
    let listeners = bind_listeners(&config.broker.listeners)
        .await
        .context("starting the broker")?;
    let store = if config.broker.persistence {
        let path = state_dir.join("broker.sqlite");
        // Opening reads every kept message back, which may take a moment on a large file;
        // it blocks nothing else that is running yet.
        Some(
            Store::open_windowed(
                &path,
                config.broker.max_store_size.0,
                config.broker.commit_window,
            )
            .context("opening the broker store")?,
        )
    } else {
        None
    };
    let broker = Broker::start(Settings::from_config(&config.broker), Vec::new(), store);

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // Bridges first: a message a bridge rule matches must never be accepted before its
    // spool is registered.
    let bridges = Bridges::start(
        &config.bridge,
        &gateway_id,
        &state_dir,
        &broker.handle(),
        shutdown_rx.clone(),
        &mut tasks,
    )
    .await?;
    #[cfg(debug_assertions)]
    service::install_debug_wedge(&broker.handle()).await;
    let listeners = broker.serve(listeners);
    let mut running = Running::start(config, path, broker, listeners, bridges).await;
    // [http]: the status page, /metrics, /healthz, /readyz (gateway/src/http/).
    crate::http::start_if_configured(&running, shutdown_rx.clone()).await?;
    info!(gateway_id = %gateway_id, state_dir = %state_dir.display(), "outpost {} running", env!("CARGO_PKG_VERSION"));
    service::notify_ready(&running.serving_line());
    let sensors = running.config().sensors();
    let supervisor = service::spawn_supervisor(service::Watched {
        broker: running.broker().handle(),
        bridges: running.bridges().running(),
        sensor_lines: running.sensor_lines(),
        sensor_devices: running.sensor_devices(),
        sensors_base: (!sensors.modbus.is_empty() || !sensors.serial.is_empty()).then(|| {
            format!(
                "{}/{gateway_id}/sensors",
                sensors
                    .topic_prefix
                    .as_deref()
                    .unwrap_or(&running.config().topic_prefix)
            )
        }),
    })
    .await;

    while let Signal::Reload = signals.next().await {
        running.reload(&mut tasks).await;
    }
    info!("shutting down");
    service::notify_stopping();
    if let Some(s) = supervisor {
        s.abort();
    }
    // Sensors first: each device's retained offline status goes through the bridges
    // while they still run. Then the bridges publish their clean offline status and
    // flush their spools.
    running.stop_sensors().await;
    running.bridges().shutdown().await;
    let _ = shutdown_tx.send(true);
    // Give the downlink tasks a moment, then stop the broker.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    running.broker().handle().shutdown().await;
    // Nothing offers the spools more now. Their rows' second copy (the checkpoint's) is
    // written at this stop, not left in the WAL for the next start.
    running.bridges().checkpoint_spools().await;
    // Let writers flush the DISCONNECTs before the runtime goes away.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    Ok(())
}

/// What a signal asks for.
enum Signal {
    Stop,
    Reload,
}

/// SIGINT, SIGTERM and SIGHUP, registered up front.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
