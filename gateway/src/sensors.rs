//! Runs the sensor layer inside the gateway: its readings are published through the
//! broker's in-process API, and `.../set` messages from the broker reach it as commands.

use outpost_mqtt::QoS;
use std::sync::Arc;

use outpost_sensors::stats::Stats;
use outpost_sensors::{Command, Reload, ReloadSummary, SensorMessage, SensorsConfig};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::error;

use crate::broker::BrokerHandle;
use crate::publish_loop::{Outgoing, Source, publish_in_order};

/// Readings waiting to be published; a full queue slows the pollers, never drops.
const READINGS_QUEUE: usize = 4096;
/// Commands waiting for the sensor layer.
const COMMANDS_QUEUE: usize = 256;

/// Starts the sensor layer if the config has any sensors.
/// Returns the sensor layer's counters (the watchdog reads each line's sign of life
/// there), or `None` when there are no sensors.
pub async fn spawn(
    config: SensorsConfig,
    gateway_id: String,
    broker: BrokerHandle,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Option<Arc<Stats>> {
    let filters = outpost_sensors::command_filters(&config, &gateway_id);
    start(config, gateway_id, filters, broker, shutdown, tasks)
        .await
        .map(|(stats, _)| stats)
}

/// Sends new `[sensors]` configurations to the running layer.
#[derive(Debug, Clone)]
pub struct SensorsReload(mpsc::Sender<Reload>);

impl SensorsReload {
    /// Applies `config`: unchanged lines keep running, changed ones restart, removed
    /// devices' retained status is cleared (see `SensorLayer::reload`). An invalid
    /// config changes nothing.
    pub async fn reload(&self, config: SensorsConfig) -> anyhow::Result<ReloadSummary> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send((config, tx))
            .await
            .map_err(|_| anyhow::anyhow!("the sensor layer has stopped"))?;
        Ok(rx
            .await
            .map_err(|_| anyhow::anyhow!("the sensor layer stopped during the reload"))??)
    }
}

/// [`spawn`] for a gateway that reloads: also returns the handle that applies new
/// sensor configurations. Commands are subscribed whether or not a point is writable
/// now, since a reload may add one (a write to a read-only point then gets a result
/// saying so instead of no answer).
pub async fn spawn_reloadable(
    config: SensorsConfig,
    gateway_id: String,
    broker: BrokerHandle,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Option<(Arc<Stats>, SensorsReload)> {
    let prefix = config.prefix().to_string();
    let filters = vec![format!("{prefix}/{gateway_id}/sensors/+/+/set")];
    start(config, gateway_id, filters, broker, shutdown, tasks).await
}

async fn start(
    config: SensorsConfig,
    gateway_id: String,
    filters: Vec<String>,
    broker: BrokerHandle,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> Option<(Arc<Stats>, SensorsReload)> {
    if config.modbus.is_empty() && config.serial.is_empty() {
        return None;
    }
    let stats = Arc::new(Stats::default());
    let (out_tx, out_rx) = mpsc::channel(READINGS_QUEUE);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMANDS_QUEUE);
    let (reload_tx, reload_rx) = mpsc::channel(1);
    for filter in filters {
        match broker.subscribe(&filter, QoS::AtLeastOnce).await {
            Ok(sub) => {
                tasks.spawn(forward_commands(sub, cmd_tx.clone()));
            }
            Err(e) => error!(%filter, error = %e, "cannot subscribe to sensor commands"),
        }
    }
    drop(cmd_tx);
    tasks.spawn(publish_in_order(
        out_rx,
        broker,
        Source {
            skip: None,
            not_stored: "sensor reading not stored for the uplink",
            not_published: "sensor reading not published",
        },
    ));
    let run_stats = Arc::clone(&stats);
    tasks.spawn(async move {
        let run = outpost_sensors::run_with_reload(
            config, gateway_id, out_tx, cmd_rx, shutdown, run_stats, reload_rx,
        );
        if let Err(e) = run.await {
            error!(error = %e, "sensor layer stopped");
        }
    });
    Some((stats, SensorsReload(reload_tx)))
}

/// Forwards `.../set` messages to the layer until the layer stops: it must end with the
/// layer, not with the broker, or a gateway with a writable point waits out its whole
/// shutdown grace period for this task before it stops the broker.
async fn forward_commands(mut sub: crate::broker::LocalSubscription, tx: mpsc::Sender<Command>) {
    loop {
        let msg = tokio::select! {
            msg = sub.recv() => msg,
            () = tx.closed() => return,
        };
        let Some(msg) = msg else { return };
        let cmd = Command {
            topic: msg.topic.to_string(),
            payload: msg.payload.clone(),
        };
        if tx.send(cmd).await.is_err() {
            return;
        }
    }
}

impl From<SensorMessage> for Outgoing {
    fn from(m: SensorMessage) -> Outgoing {
        Outgoing {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
        }
    }
}
