//! `outpost-bridge`: the store-and-forward uplink of Outpost.
//!
//! Messages matched by an `out` rule are committed to an SQLite spool (WAL,
//! `synchronous=FULL`, group commit) before the gateway acknowledges them to their
//! publisher, then forwarded to the cloud in accept order and deleted only when the cloud
//! has acknowledged them. QoS 2 keeps persisted packet identifiers and stages so a restart
//! resends PUBREL, never a second PUBLISH. See `README.md` for the `[[bridge]]` table.

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod rules;
pub mod spool;
pub mod stats;
pub mod status;
pub mod uplink;

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use outpost_mqtt::{Properties, QoS};
use tokio::sync::{mpsc, oneshot, watch};

pub use config::BridgeConfig;
pub use error::{BridgeError, ConfigError, RejectReason, Rejected, SpoolError};

use config::Address;
use rules::{RetainMode, Rules};
use spool::{NewMessage, Spool, SpoolOptions};
use stats::BridgeStats;
use status::Status;

/// A message the bridge wants published on the local broker (downlink, mirrored link state,
/// `$SYS` counters).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalPublish {
    /// Local topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS to publish with.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
}

/// Room for unspooled QoS 0 messages waiting for the socket.
const LIVE_QOS0_QUEUE: usize = 1024;

struct Inner {
    name: String,
    rules: Rules,
    spool: Spool,
    spool_qos0: bool,
    stats: Arc<BridgeStats>,
    live0: mpsc::Sender<NewMessage>,
    stop: watch::Sender<bool>,
    uplink: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Handle to a running bridge; cheap to clone and share between connection tasks.
#[derive(Clone)]
pub struct BridgeHandle {
    inner: Arc<Inner>,
}

/// Opens the spool (under `state_dir` unless an explicit path) and starts the uplink task.
pub async fn start(
    config: BridgeConfig,
    gateway_id: &str,
    state_dir: &Path,
    local: mpsc::Sender<LocalPublish>,
    shutdown: watch::Receiver<bool>,
) -> Result<BridgeHandle, BridgeError> {
    config.validate()?;
    let address = Address::parse(&config.address)?;
    let tls = if address.scheme.is_tls() {
        Some(uplink::client_config(
            &config.tls.clone().unwrap_or_default(),
        )?)
    } else {
        None
    };
    let stats = Arc::new(BridgeStats::default());
    let opts = SpoolOptions {
        path: config
            .spool
            .path
            .clone()
            .unwrap_or_else(|| state_dir.join(format!("bridge-{}.sqlite", config.name))),
        max_bytes: config.spool.max_bytes,
        when_full: config.spool.when_full,
    };
    let spool_stats = stats.clone();
    let (spool, _writer) = tokio::task::spawn_blocking(move || Spool::open(opts, spool_stats))
        .await
        .map_err(|_| SpoolError::Closed)??;
    let rules = Rules::new(config.topics.clone());
    let status = Status::new(
        &config.status.prefix,
        gateway_id,
        &config.name,
        SystemTime::now(),
    );
    let (stop, stop_rx) = watch::channel(false);
    forward_shutdown(shutdown, stop.clone());
    let (live0_tx, live0_rx) = mpsc::channel(LIVE_QOS0_QUEUE);
    let ctx = Arc::new(uplink::Ctx {
        name: config.name.clone(),
        protocol: config.protocol.to_protocol(),
        client_id: config.effective_client_id(gateway_id),
        address,
        rules: rules.clone(),
        spool: spool.clone(),
        stats: stats.clone(),
        local: local.clone(),
        status,
        tls,
        config: config.clone(),
    });
    spawn_stats_publisher(ctx.clone(), stop_rx.clone());
    let uplink = tokio::spawn(uplink::run(ctx, stop_rx, live0_rx));
    Ok(BridgeHandle {
        inner: Arc::new(Inner {
            name: config.name.clone(),
            rules,
            spool,
            spool_qos0: config.spool.qos0,
            stats,
            live0: live0_tx,
            stop,
            uplink: Mutex::new(Some(uplink)),
        }),
    })
}

fn forward_shutdown(mut external: watch::Receiver<bool>, stop: watch::Sender<bool>) {
    tokio::spawn(async move {
        loop {
            if *external.borrow_and_update() {
                stop.send_replace(true);
                return;
            }
            tokio::select! {
                r = external.changed() => if r.is_err() { return },
                _ = stop.closed() => return,
            }
        }
    });
}

fn spawn_stats_publisher(ctx: Arc<uplink::Ctx>, mut stop: watch::Receiver<bool>) {
    let every = ctx.config.stats_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = uplink::stop_requested(&mut stop) => return,
            }
            for (key, value) in ctx.stats.snapshot(uplink::now_ms()) {
                let msg = LocalPublish {
                    topic: format!("$SYS/broker/bridge/{}/{key}", ctx.name),
                    payload: Bytes::from(value),
                    qos: QoS::AtMostOnce,
                    retain: true,
                };
                // Counters are refreshed next tick; never block the bridge on them.
                if ctx.local.try_send(msg).is_err() {
                    break;
                }
            }
        }
    });
}

impl BridgeHandle {
    /// Whether an `out` rule matches `topic`, whatever the message's QoS.
    pub fn wants(&self, topic: &str) -> bool {
        self.inner.rules.map_out(topic).is_some()
    }

    /// Synchronous, cheap: `None` if no `out` rule matches `topic` (the message is not
    /// slowed at all), or for a QoS 0 message when QoS 0 is not spooled (it is sent
    /// best-effort if the link is up). Otherwise queues it for the spool writer and returns
    /// a receiver that resolves after the group commit (Ok) or with `Err(Rejected)`.
    pub fn offer(
        &self,
        topic: &str,
        payload: &Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<&Properties>,
    ) -> Option<oneshot::Receiver<Result<(), Rejected>>> {
        let inner = &self.inner;
        let mapped = inner.rules.map_out(topic)?;
        let qos = (qos as u8).min(mapped.qos);
        let msg = NewMessage {
            topic: mapped.topic,
            payload: payload.clone(),
            qos,
            retain: retain && mapped.retain == RetainMode::Keep,
            props: properties.and_then(spool::encode_properties),
            accepted_ms: uplink::now_ms(),
        };
        if qos == 0 && !inner.spool_qos0 {
            if inner.live0.try_send(msg).is_err() {
                BridgeStats::bump(&inner.stats.dropped_qos0);
            }
            return None;
        }
        Some(inner.spool.append(msg))
    }

    /// Local topic filters the bridge needs the broker to deliver to it (for `out` rules);
    /// informational.
    pub fn local_filters(&self) -> Vec<String> {
        self.inner.rules.local_filters()
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Live counters (also published on `$SYS/broker/bridge/{name}/...`).
    pub fn stats(&self) -> &BridgeStats {
        &self.inner.stats
    }

    /// Messages the bridge set aside as poison (the spool's `dead_letters` table), oldest
    /// first. They stay there until an operator deletes them.
    pub async fn dead_letters(&self) -> Result<Vec<spool::DeadLetter>, SpoolError> {
        self.inner.spool.dead_letters().await
    }

    /// A sign of life for the service watchdog: the spool writer answers (it commits what
    /// was queued before this call; a storage error is still an answer) and the uplink
    /// task has not ended.
    pub async fn alive(&self) -> bool {
        let uplink_running = self
            .inner
            .uplink
            .lock()
            .ok()
            .is_some_and(|g| g.as_ref().is_some_and(|t| !t.is_finished()));
        uplink_running && !matches!(self.inner.spool.flush().await, Err(SpoolError::Closed))
    }

    /// True while the cloud link is up.
    pub fn is_connected(&self) -> bool {
        self.inner.stats.connected.load(Relaxed)
    }

    /// Publishes the clean offline status, disconnects, and waits until every queued
    /// spool write is committed.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let task = self.inner.uplink.lock().ok().and_then(|mut g| g.take());
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::error!(bridge = %self.inner.name, "uplink task failed: {e}");
        }
        if let Err(e) = self.inner.spool.flush().await {
            tracing::error!(bridge = %self.inner.name, "spool flush at shutdown failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}

    #[test]
    fn handle_is_shareable_and_start_is_spawnable() {
        assert_shareable::<BridgeHandle>();
        let config: BridgeConfig = toml::from_str(
            "name = 'x'\naddress = 'mqtt://127.0.0.1:1'\ntopics = [{ pattern = '#' }]\n",
        )
        .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let (_stop, stop_rx) = watch::channel(false);
        let fut = start(config, "gw", Path::new("."), tx, stop_rx);
        assert_send(&fut);
    }
}
