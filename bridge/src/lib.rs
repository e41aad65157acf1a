//! `outpost-bridge`: the store-and-forward uplink of Outpost.
//!
//! Messages matched by an `out` rule are committed to an SQLite spool (WAL,
//! `synchronous=FULL`, group commit) before the gateway acknowledges them to their
//! publisher, then forwarded to the cloud in accept order and deleted only when the cloud
//! has acknowledged them. QoS 2 keeps persisted packet identifiers and stages so a restart
//! resends PUBREL, never a second PUBLISH. See `README.md` for the `[[bridge]]` table.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod clock;
pub mod config;
pub mod error;
pub mod rules;
pub mod spool;
pub mod stats;
pub mod status;
pub mod uplink;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use outpost_mqtt::{Properties, QoS};
use tokio::sync::{mpsc, oneshot, watch};

pub use config::BridgeConfig;
pub use error::{BridgeError, ConfigError, RejectReason, Rejected, SpoolError};

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
    /// Replaced by [`BridgeHandle::reconfigure`]; read once per offered message.
    rules: RwLock<Rules>,
    spool: Spool,
    spool_qos0: AtomicBool,
    stats: Arc<BridgeStats>,
    live0: mpsc::Sender<NewMessage>,
    /// The bridge's own stop: set by [`BridgeHandle::shutdown`] or the gateway's shutdown.
    stop: watch::Sender<bool>,
    /// The running uplink; a reconfigure stops it and starts another on the same spool.
    link: Mutex<Option<Link>>,
    /// What the running uplink was started from.
    config: Mutex<BridgeConfig>,
    gateway_id: String,
    local: mpsc::Sender<LocalPublish>,
}

/// One uplink task and the signal that stops just it.
struct Link {
    task: tokio::task::JoinHandle<uplink::Carry>,
    stop: watch::Sender<bool>,
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
    let addresses = config.addresses()?;
    let tls = if addresses[0].scheme.is_tls() {
        Some(uplink::client_config(
            &config.tls.clone().unwrap_or_default(),
        )?)
    } else {
        None
    };
    let cert_expiry = match &config.tls {
        Some(tls) if addresses[0].scheme.is_tls() => uplink::client_cert_not_after(tls)?,
        _ => None,
    };
    let stats = Arc::new(BridgeStats::default());
    stats
        .cert_not_after
        .store(cert_expiry.as_ref().map_or(0, |c| c.0), Relaxed);
    let opts = SpoolOptions {
        path: config
            .spool
            .path
            .clone()
            .unwrap_or_else(|| state_dir.join(format!("bridge-{}.sqlite", config.name))),
        max_bytes: config.spool.max_bytes,
        when_full: config.spool.when_full,
        commit_window: config.spool.commit_window,
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
        addresses,
        rules: rules.clone(),
        spool: spool.clone(),
        stats: stats.clone(),
        local: local.clone(),
        status,
        tls,
        qos2_refusals: Default::default(),
        cert_expiry: cert_expiry.clone(),
        config: config.clone(),
    });
    spawn_stats_publisher(ctx.clone(), stop_rx.clone());
    let careful = spool.careful_through_at_open();
    let link = spawn_link(ctx, &stop_rx, live0_rx, careful);
    Ok(BridgeHandle {
        inner: Arc::new(Inner {
            name: config.name.clone(),
            rules: RwLock::new(rules),
            spool,
            spool_qos0: AtomicBool::new(config.spool.qos0),
            stats,
            live0: live0_tx,
            stop,
            link: Mutex::new(Some(link)),
            config: Mutex::new(config),
            gateway_id: gateway_id.to_owned(),
            local,
        }),
    })
}

/// Starts an uplink task that stops with the bridge or on its own signal.
fn spawn_link(
    ctx: Arc<uplink::Ctx>,
    bridge_stop: &watch::Receiver<bool>,
    live0: mpsc::Receiver<NewMessage>,
    careful_through: i64,
) -> Link {
    let (stop, stop_rx) = watch::channel(false);
    forward_shutdown(bridge_stop.clone(), stop.clone());
    let task = tokio::spawn(uplink::run(ctx, stop_rx, live0, careful_through));
    Link { task, stop }
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
            for (key, value) in ctx.stats.snapshot(clock::now_ms()) {
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
        read(&self.inner.rules).map_out(topic).is_some()
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
        let mapped = read(&inner.rules).map_out(topic)?;
        let qos = qos.min(mapped.qos);
        let msg = NewMessage {
            topic: mapped.topic,
            payload: payload.clone(),
            qos,
            retain: retain && mapped.retain == RetainMode::Keep,
            props: properties.and_then(spool::encode_properties),
            accepted_ms: clock::now_ms(),
        };
        if qos == QoS::AtMostOnce && !inner.spool_qos0.load(Relaxed) {
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
        read(&self.inner.rules).local_filters()
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
            .link
            .lock()
            .ok()
            .is_some_and(|g| g.as_ref().is_some_and(|l| !l.task.is_finished()));
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
        let link = self.inner.link.lock().ok().and_then(|mut g| g.take());
        if let Some(link) = link
            && let Err(e) = link.task.await
        {
            tracing::error!(bridge = %self.inner.name, "uplink task failed: {e}");
        }
        if let Err(e) = self.inner.spool.flush().await {
            tracing::error!(bridge = %self.inner.name, "spool flush at shutdown failed: {e}");
        }
    }

    /// Folds the spool's WAL into its file; call last on a clean stop, once the broker
    /// offers nothing more.
    pub async fn checkpoint(&self) {
        if let Err(e) = self.inner.spool.checkpoint().await {
            tracing::warn!(bridge = %self.inner.name, "spool checkpoint at the stop failed: {e}");
        }
    }

    /// Applies a changed `[[bridge]]` table (same name) without touching the spool:
    /// the uplink publishes its clean offline status, disconnects, and a new one
    /// connects with the new settings and sends what the spool holds, in order. Messages
    /// offered meanwhile go to the spool as always, so nothing is refused or lost. Spool
    /// settings other than `qos0` keep their start-up values until a restart (returned
    /// as the keys that need one). On a bad new table nothing changes.
    pub async fn reconfigure(
        &self,
        config: BridgeConfig,
    ) -> Result<Vec<&'static str>, BridgeError> {
        config.validate()?;
        let inner = &self.inner;
        let addresses = config.addresses()?;
        let tls = if addresses[0].scheme.is_tls() {
            Some(uplink::client_config(
                &config.tls.clone().unwrap_or_default(),
            )?)
        } else {
            None
        };
        let cert_expiry = match &config.tls {
            Some(tls) if addresses[0].scheme.is_tls() => uplink::client_cert_not_after(tls)?,
            _ => None,
        };
        let mut needs_restart = Vec::new();
        let old = lock(&inner.config).clone();
        let mut config = config;
        if config.spool.path != old.spool.path {
            needs_restart.push("spool.path");
        }
        if config.spool.max_bytes != old.spool.max_bytes {
            needs_restart.push("spool.max_bytes");
        }
        if config.spool.when_full != old.spool.when_full {
            needs_restart.push("spool.when_full");
        }
        if config.spool.commit_window != old.spool.commit_window {
            needs_restart.push("spool.commit_window");
        }
        if config.stats_interval != old.stats_interval {
            needs_restart.push("stats_interval");
        }
        config.spool.path = old.spool.path.clone();
        config.spool.max_bytes = old.spool.max_bytes;
        config.spool.when_full = old.spool.when_full;
        config.spool.commit_window = old.spool.commit_window;
        config.stats_interval = old.stats_interval;

        // Stop the running link first: two links with one client id would take the cloud
        // session from each other.
        let link = lock(&inner.link).take();
        let carry = match link {
            Some(link) => {
                link.stop.send_replace(true);
                link.task.await.ok()
            }
            None => None,
        };
        let Some(carry) = carry else {
            // The uplink task panicked or was already taken by a shutdown: nothing to
            // restart (the watchdog sees the dead uplink through `alive`).
            return Err(BridgeError::Stopped);
        };
        let rules = Rules::new(config.topics.clone());
        *inner.rules.write().unwrap_or_else(|e| e.into_inner()) = rules.clone();
        inner.spool_qos0.store(config.spool.qos0, Relaxed);
        inner
            .stats
            .cert_not_after
            .store(cert_expiry.as_ref().map_or(0, |c| c.0), Relaxed);
        let ctx = Arc::new(uplink::Ctx {
            name: config.name.clone(),
            protocol: config.protocol.to_protocol(),
            client_id: config.effective_client_id(&inner.gateway_id),
            addresses,
            rules,
            spool: inner.spool.clone(),
            stats: inner.stats.clone(),
            local: inner.local.clone(),
            status: Status::new(
                &config.status.prefix,
                &inner.gateway_id,
                &config.name,
                SystemTime::now(),
            ),
            tls,
            qos2_refusals: Default::default(),
            cert_expiry: cert_expiry.clone(),
            config: config.clone(),
        });
        let bridge_stop = inner.stop.subscribe();
        *lock(&inner.link) = Some(spawn_link(
            ctx,
            &bridge_stop,
            carry.live0,
            carry.careful_through,
        ));
        *lock(&inner.config) = config;
        tracing::info!(bridge = %inner.name, "bridge reconfigured; the link reconnects with its spool intact");
        Ok(needs_restart)
    }

    /// The table the bridge runs on now.
    pub fn config(&self) -> BridgeConfig {
        lock(&self.inner.config).clone()
    }
}

fn read(rules: &RwLock<Rules>) -> std::sync::RwLockReadGuard<'_, Rules> {
    // Poisoning only means a panic while a whole value was being swapped in.
    rules.read().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
