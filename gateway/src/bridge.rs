//! Runs the store-and-forward bridges inside the gateway.
//!
//! Each bridge becomes a durable sink of the broker (so PUBACK/PUBREC to a LAN publisher
//! wait for its spool commit), and what it receives from the cloud, its link state and
//! its counters are published locally through the in-process API.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use futures_util::FutureExt;
use outpost_bridge::{BridgeConfig, BridgeHandle, LocalPublish};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::broker::{BrokerHandle, DurableReceipt, DurableSink, Message, Rejected, SinkId};
use crate::publish_loop::{Outgoing, Source, publish_in_order};

/// Local publishes waiting from one bridge (downlink, status, counters).
const DOWNLINK_QUEUE: usize = 1024;

/// The bridges the gateway runs now, shared with the watchdog and the status line; a
/// reload replaces the list.
#[derive(Clone, Default)]
pub struct BridgeSet(Arc<RwLock<Vec<BridgeHandle>>>);

impl BridgeSet {
    /// The running bridges at this moment.
    pub fn snapshot(&self) -> Vec<BridgeHandle> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, handles: Vec<BridgeHandle>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = handles;
    }
}

/// A bridge seen as a durable sink. It stays registered with the broker for the life
/// of the process under one [`SinkId`]; a removed bridge leaves it empty (it then takes
/// nothing) and a bridge added again under the same name fills it.
struct Sink(RwLock<Option<BridgeHandle>>);

impl Sink {
    fn current(&self) -> Option<BridgeHandle> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, h: Option<BridgeHandle>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = h;
    }
}

impl DurableSink for Sink {
    fn wants(&self, topic: &str) -> bool {
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().is_some_and(|b| b.wants(topic))
    }

    fn offer(&self, msg: &Message) -> Option<DurableReceipt> {
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        let bridge = guard.as_ref()?;
        let props = (!msg.properties.is_empty()).then_some(&msg.properties);
        let rx = bridge.offer(&msg.topic, &msg.payload, msg.qos, msg.retain, props)?;
        Some(
            rx.map(|r| match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Rejected {
                    code: e.reason_code(),
                    reason: e.to_string(),
                }),
                Err(_) => Err(Rejected::failure(
                    "the bridge spool stopped before committing",
                )),
            })
            .boxed(),
        )
    }
}

/// One configured bridge name.
struct Slot {
    name: String,
    sink: Arc<Sink>,
    id: SinkId,
    /// The `[[bridge]]` table it runs on, as written in the file; `None` once removed.
    config: Option<BridgeConfig>,
}

/// Starts, changes and stops the bridges as the configuration says.
pub struct Bridges {
    slots: Vec<Slot>,
    running: BridgeSet,
    gateway_id: String,
    state_dir: PathBuf,
    broker: BrokerHandle,
    shutdown: watch::Receiver<bool>,
}

/// What a reload did to the bridges, for the log.
#[derive(Debug, Default)]
pub struct BridgeChanges {
    /// Names started.
    pub added: Vec<String>,
    /// Names reconnected with new settings.
    pub changed: Vec<String>,
    /// Names stopped (their spool files stay).
    pub removed: Vec<String>,
    /// `bridge.key` settings that keep their old value until a restart.
    pub need_restart: Vec<String>,
    /// Bridges that could not be started or changed, with why.
    pub failed: Vec<String>,
}

impl Bridges {
    /// Starts every configured bridge and registers it with the broker. Call before the
    /// listeners serve clients, so nothing a bridge rule matches is accepted unspooled.
    pub async fn start(
        configs: &[BridgeConfig],
        gateway_id: &str,
        state_dir: &Path,
        broker: &BrokerHandle,
        shutdown: watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
    ) -> anyhow::Result<Bridges> {
        let mut bridges = Bridges {
            slots: Vec::new(),
            running: BridgeSet::default(),
            gateway_id: gateway_id.to_owned(),
            state_dir: state_dir.to_owned(),
            broker: broker.clone(),
            shutdown,
        };
        for c in configs {
            bridges.add(c, tasks).await?;
        }
        bridges.publish_set();
        Ok(bridges)
    }

    /// The running bridges, kept current across reloads.
    pub fn running(&self) -> BridgeSet {
        self.running.clone()
    }

    async fn add(&mut self, c: &BridgeConfig, tasks: &mut JoinSet<()>) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel(DOWNLINK_QUEUE);
        let handle = outpost_bridge::start(
            c.clone(),
            &self.gateway_id,
            &self.state_dir,
            tx,
            self.shutdown.clone(),
        )
        .await
        .with_context(|| format!("starting bridge {:?}", c.name))?;
        let id = match self.slot(&c.name) {
            Some(slot) => {
                slot.sink.set(Some(handle));
                slot.config = Some(c.clone());
                slot.id
            }
            None => {
                let sink = Arc::new(Sink(RwLock::new(Some(handle))));
                let id = self
                    .broker
                    .add_durable_sink(sink.clone())
                    .await
                    .context("registering the bridge with the broker")?;
                self.slots.push(Slot {
                    name: c.name.clone(),
                    sink,
                    id,
                    config: Some(c.clone()),
                });
                id
            }
        };
        tasks.spawn(publish_in_order(
            rx,
            self.broker.clone(),
            Source {
                // Not offered back to the bridge it came from.
                skip: Some(id),
                not_stored: "downlink message not stored by another bridge",
                not_published: "bridge message not published locally",
            },
        ));
        Ok(())
    }

    fn slot(&mut self, name: &str) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.name == name)
    }

    fn publish_set(&self) {
        self.running
            .set(self.slots.iter().filter_map(|s| s.sink.current()).collect());
    }

    /// Applies a reloaded list of `[[bridge]]` tables: new names start, changed ones
    /// reconnect with their spool intact, unchanged ones are not touched, removed ones
    /// stop and keep their spool file (a bridge added back later finds its backlog).
    pub async fn apply(
        &mut self,
        configs: &[BridgeConfig],
        tasks: &mut JoinSet<()>,
    ) -> BridgeChanges {
        let mut out = BridgeChanges::default();
        for i in 0..self.slots.len() {
            let Some(old) = self.slots[i].config.clone() else {
                continue;
            };
            if configs.iter().any(|c| c.name == old.name) {
                continue;
            }
            if let Some(h) = self.slots[i].sink.current() {
                // Out of the broker's offers first, so nothing new is handed to a bridge
                // that is stopping; its spool commits what it already took.
                self.slots[i].sink.set(None);
                h.shutdown().await;
            }
            self.slots[i].config = None;
            out.removed.push(old.name);
        }
        for c in configs {
            let existing = self
                .slots
                .iter()
                .find(|s| s.config.as_ref().is_some_and(|o| o.name == c.name));
            match existing {
                None => match self.add(c, tasks).await {
                    Ok(()) => out.added.push(c.name.clone()),
                    Err(e) => out.failed.push(format!("{}: {e:#}", c.name)),
                },
                Some(slot) if slot.config.as_ref() == Some(c) => {}
                Some(slot) => {
                    let Some(h) = slot.sink.current() else {
                        continue;
                    };
                    match h.reconfigure(c.clone()).await {
                        Ok(keys) => {
                            out.need_restart
                                .extend(keys.iter().map(|k| format!("bridge {}: {k}", c.name)));
                            if let Some(slot) = self.slot(&c.name) {
                                slot.config = Some(c.clone());
                            }
                            out.changed.push(c.name.clone());
                        }
                        Err(e) => out.failed.push(format!("{}: {e}", c.name)),
                    }
                }
            }
        }
        self.publish_set();
        out
    }

    /// Publishes every bridge's clean offline status and flushes the spools.
    pub async fn shutdown(&self) {
        for b in self.running.snapshot() {
            b.shutdown().await;
        }
    }

    /// Folds every spool's WAL into its file: after the broker stopped, the last writes.
    pub async fn checkpoint_spools(&self) {
        for b in self.running.snapshot() {
            b.checkpoint().await;
        }
    }
}

impl From<LocalPublish> for Outgoing {
    fn from(m: LocalPublish) -> Outgoing {
        Outgoing {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos,
            retain: m.retain,
        }
    }
}
