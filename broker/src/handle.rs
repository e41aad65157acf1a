//! The in-process client API used by the sensors and the bridge.
//!
//! In-process publishers skip the socket and the codec entirely; their publish completes
//! when the broker has accepted the message and every durable sink that wants it has
//! committed it, which is the same promise a PUBACK makes to a network client.

use std::sync::Arc;

use bytes::Bytes;
use outpost_mqtt::{Properties, QoS};
use tokio::sync::{mpsc, oneshot};

use super::events::{CoreEvent, CoreInbox};
use super::message::Message;
use super::subscriptions::SessionKey;
use super::{Rejected, SinkId};

/// Deliveries an in-process subscriber may have pending before new ones are dropped.
const LOCAL_SUBSCRIPTION_CAPACITY: usize = 4096;

/// Why an in-process publish did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The topic name is not valid for publishing.
    #[error("invalid topic name `{topic}`: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The broker is shutting down.
    #[error("the broker has stopped")]
    Stopped,
    /// A durable sink (the bridge spool) refused the message.
    #[error("not stored: {0}")]
    Rejected(#[from] Rejected),
}

fn invalid(topic: &str, e: outpost_mqtt::topic::TopicError) -> PublishError {
    PublishError::InvalidTopic {
        topic: topic.to_owned(),
        reason: e.to_string(),
    }
}

/// A cheap, cloneable handle to the broker core: the in-process API the gateway's sensors
/// and bridges use.
#[derive(Clone)]
pub struct BrokerHandle {
    inbox: CoreInbox,
}

impl BrokerHandle {
    pub(crate) fn new(inbox: CoreInbox) -> BrokerHandle {
        BrokerHandle { inbox }
    }

    /// The core's inbox, for the listeners' connections.
    pub(crate) fn inbox(&self) -> CoreInbox {
        self.inbox.clone()
    }

    async fn send(&self, ev: CoreEvent) -> Result<(), PublishError> {
        self.inbox.send(ev).await.map_err(|_| PublishError::Stopped)
    }

    /// Publishes a message and resolves once the broker has accepted it (and, for
    /// messages a bridge rule matches, once the bridge spool has committed it).
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Properties,
    ) -> Result<(), PublishError> {
        self.publish_accepted(topic, payload, qos, retain, properties)
            .await?
            .durable()
            .await
    }

    /// Publishes a message and resolves as soon as the broker has routed it, returning
    /// a receipt that resolves once it is durable. Publishers with many messages in
    /// flight (the sensors) use this to keep accept order without waiting for each
    /// commit in turn.
    pub async fn publish_accepted(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Properties,
    ) -> Result<Receipt, PublishError> {
        self.publish_accepted_skipping(topic, payload, qos, retain, properties, None)
            .await
    }

    /// [`Self::publish_accepted`] for a durable sink's own downlink: the message is not
    /// offered back to `skip`.
    pub async fn publish_accepted_skipping(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Properties,
        skip: Option<super::SinkId>,
    ) -> Result<Receipt, PublishError> {
        outpost_mqtt::topic::validate_topic_name(topic).map_err(|e| invalid(topic, e))?;
        let mut msg = Message::new(topic.into(), payload, qos, retain, properties, None);
        if let Some(SinkId(i)) = skip
            && let Some(m) = Arc::get_mut(&mut msg)
        {
            m.skip_sink = Some(i);
        }
        let (done, receipts) = oneshot::channel();
        self.send(CoreEvent::LocalPublish { msg, done }).await?;
        let receipts = receipts.await.map_err(|_| PublishError::Stopped)?;
        Ok(Receipt { receipts })
    }

    /// Subscribes in-process; messages arrive on the returned subscription until it is
    /// dropped. A subscriber that falls more than a few thousand messages behind loses
    /// the newest ones (counted in `$SYS`), so the core never waits on it.
    pub async fn subscribe(
        &self,
        filter: &str,
        qos: QoS,
    ) -> Result<LocalSubscription, PublishError> {
        outpost_mqtt::topic::validate_topic_filter(filter).map_err(|e| invalid(filter, e))?;
        let (tx, rx) = mpsc::channel(LOCAL_SUBSCRIPTION_CAPACITY);
        let (done, key) = oneshot::channel();
        self.send(CoreEvent::LocalSubscribe {
            filter: filter.to_owned(),
            qos,
            tx,
            done,
        })
        .await?;
        let key = key.await.map_err(|_| PublishError::Stopped)?;
        Ok(LocalSubscription {
            rx,
            key,
            core: self.inbox.clone(),
        })
    }

    /// Registers a durable sink; see [`super::DurableSink`]. Register before serving
    /// clients, so no message that should be spooled is accepted without it.
    pub async fn add_durable_sink(
        &self,
        sink: Arc<dyn super::DurableSink>,
    ) -> Result<SinkId, PublishError> {
        let (done, id) = oneshot::channel();
        self.send(CoreEvent::AddSink(sink, done)).await?;
        id.await.map_err(|_| PublishError::Stopped)
    }

    /// Hands reloaded settings to the core; returns once it applied them.
    pub(crate) async fn reload(&self, settings: Arc<crate::Settings>) -> Result<(), PublishError> {
        let (done, wait) = oneshot::channel();
        self.send(CoreEvent::Reload(settings, done)).await?;
        wait.await.map_err(|_| PublishError::Stopped)
    }

    /// The broker's statistics, as `$SYS` publishes them; `Stopped` once the core is gone.
    pub async fn snapshot(&self) -> Result<crate::sys::SysSnapshot, PublishError> {
        let (done, snap) = oneshot::channel();
        self.send(CoreEvent::Snapshot(done)).await?;
        snap.await.map_err(|_| PublishError::Stopped)
    }

    /// Disconnects every client (5.0 clients get reason 0x8B) and stops the core.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.send(CoreEvent::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// Proof that the broker accepted a message; await [`Receipt::durable`] for the
/// durable sinks' commits.
#[must_use = "await durable() to know the message is committed"]
pub struct Receipt {
    receipts: Vec<super::DurableReceipt>,
}

impl Receipt {
    /// True when no durable sink took the message (nothing to wait for).
    pub fn is_final(&self) -> bool {
        self.receipts.is_empty()
    }

    /// Resolves once every durable sink that took the message has committed it.
    pub async fn durable(self) -> Result<(), PublishError> {
        for r in self.receipts {
            r.await?;
        }
        Ok(())
    }
}

/// An in-process subscription; dropping it unsubscribes.
pub struct LocalSubscription {
    rx: mpsc::Receiver<Arc<Message>>,
    key: SessionKey,
    core: CoreInbox,
}

impl LocalSubscription {
    /// The next message, or `None` once the broker has stopped.
    pub async fn recv(&mut self) -> Option<Arc<Message>> {
        self.rx.recv().await
    }
}

impl Drop for LocalSubscription {
    fn drop(&mut self) {
        let _ = self.core.try_send(CoreEvent::LocalUnsubscribe(self.key));
    }
}
