//! The one loop that publishes the gateway's own messages into the local broker: sensor
//! readings, and what a bridge brings down from the cloud. Messages are published in the
//! order they arrive (a link's order is a contract, DESIGN.md "Order"); when a bridge
//! must commit one to its spool, that commit is awaited beside the loop, up to
//! [`MAX_UNCOMMITTED`] at once, so a slow spool slows the source instead of growing
//! memory, and a failed commit is logged with the topic.

use bytes::Bytes;
use outpost_mqtt::{Properties, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

use crate::broker::{BrokerHandle, SinkId};

/// Publishes awaiting their durable commit at once.
pub const MAX_UNCOMMITTED: usize = 1024;

/// One message for the local broker.
pub struct Outgoing {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS to publish with.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
}

/// What the log calls the messages of one source.
pub struct Source {
    /// The durable sink that must not get its own messages back (a bridge's downlink).
    pub skip: Option<SinkId>,
    /// Logged when a durable sink could not commit one ("sensor reading", ...).
    pub not_stored: &'static str,
    /// Logged when the broker refused one.
    pub not_published: &'static str,
}

/// Publishes everything `rx` yields, in order, until it closes.
pub async fn publish_in_order<T: Into<Outgoing>>(
    mut rx: mpsc::Receiver<T>,
    broker: BrokerHandle,
    source: Source,
) {
    let mut commits = JoinSet::new();
    while let Some(m) = rx.recv().await {
        let m: Outgoing = m.into();
        let accepted = broker
            .publish_accepted_skipping(
                &m.topic,
                m.payload,
                m.qos,
                m.retain,
                Properties::default(),
                source.skip,
            )
            .await;
        match accepted {
            Ok(r) if r.is_final() => {}
            Ok(r) => {
                let (topic, what) = (m.topic, source.not_stored);
                commits.spawn(async move {
                    if let Err(e) = r.durable().await {
                        warn!(%topic, error = %e, "{what}");
                    }
                });
                while commits.len() >= MAX_UNCOMMITTED {
                    commits.join_next().await;
                }
            }
            Err(e) => warn!(topic = %m.topic, error = %e, "{}", source.not_published),
        }
        while commits.try_join_next().is_some() {}
    }
}
