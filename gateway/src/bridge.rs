//! Runs the store-and-forward bridges inside the gateway.
//!
//! Each bridge becomes a durable sink of the broker (so PUBACK/PUBREC to a LAN publisher
//! wait for its spool commit), and what it receives from the cloud, its link state and
//! its counters are published locally through the in-process API.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use futures_util::FutureExt;
use outpost_bridge::{BridgeConfig, BridgeHandle, LocalPublish};
use outpost_mqtt::Properties;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::warn;

use crate::broker::{BrokerHandle, DurableReceipt, DurableSink, Message, Rejected, SinkId};

/// Local publishes waiting from one bridge (downlink, status, counters).
const DOWNLINK_QUEUE: usize = 1024;
/// Downlink publishes awaiting another bridge's commit at once.
const MAX_UNCOMMITTED: usize = 1024;

/// A bridge seen as a durable sink.
struct Sink(BridgeHandle);

impl DurableSink for Sink {
    fn wants(&self, topic: &str) -> bool {
        self.0.wants(topic)
    }

    fn offer(&self, msg: &Message) -> Option<DurableReceipt> {
        let props = (!msg.properties.is_empty()).then_some(&msg.properties);
        let rx = self
            .0
            .offer(&msg.topic, &msg.payload, msg.qos, msg.retain, props)?;
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

/// Starts every configured bridge and registers it with the broker. Call before the
/// listeners serve clients, so nothing a bridge rule matches is accepted unspooled.
pub async fn start(
    configs: &[BridgeConfig],
    gateway_id: &str,
    state_dir: &Path,
    broker: &BrokerHandle,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Vec<BridgeHandle>> {
    let mut handles = Vec::with_capacity(configs.len());
    for c in configs {
        let (tx, rx) = mpsc::channel(DOWNLINK_QUEUE);
        let handle = outpost_bridge::start(c.clone(), gateway_id, state_dir, tx, shutdown.clone())
            .await
            .with_context(|| format!("starting bridge {:?}", c.name))?;
        let id = broker
            .add_durable_sink(Arc::new(Sink(handle.clone())))
            .await
            .context("registering the bridge with the broker")?;
        tasks.spawn(publish_local(rx, broker.clone(), id));
        handles.push(handle);
    }
    Ok(handles)
}

/// Publishes what a bridge hands to the local broker, in order; the message is not
/// offered back to the bridge it came from.
async fn publish_local(mut rx: mpsc::Receiver<LocalPublish>, broker: BrokerHandle, me: SinkId) {
    let mut commits = JoinSet::new();
    while let Some(m) = rx.recv().await {
        let accepted = broker
            .publish_accepted_skipping(
                &m.topic,
                m.payload,
                m.qos,
                m.retain,
                Properties::default(),
                Some(me),
            )
            .await;
        match accepted {
            Ok(r) if r.is_final() => {}
            Ok(r) => {
                let topic = m.topic;
                commits.spawn(async move {
                    if let Err(e) = r.durable().await {
                        warn!(%topic, error = %e, "downlink message not stored by another bridge");
                    }
                });
                while commits.len() >= MAX_UNCOMMITTED {
                    commits.join_next().await;
                }
            }
            Err(e) => warn!(topic = %m.topic, error = %e, "bridge message not published locally"),
        }
        while commits.try_join_next().is_some() {}
    }
}
