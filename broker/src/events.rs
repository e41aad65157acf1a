//! Every message between the broker's parts and its core, in one place: what a network
//! connection or the in-process API ([`crate::BrokerHandle`]) tells the core
//! ([`CoreEvent`]), and what the core answers a CONNECT with. The core is the only
//! reader; connections and the handle only send.

use std::sync::Arc;

use outpost_mqtt::{Connect, Disconnect, Packet, QoS};
use tokio::sync::mpsc::OwnedPermit;
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{mpsc, oneshot};

use crate::message::Message;
use crate::outbound::OutboundTx;
use crate::settings::Settings;
use crate::subscriptions::SessionKey;
use crate::{DurableReceipt, DurableSink, SinkId};

/// What connections and the in-process API tell the core.
pub(crate) enum CoreEvent {
    /// A client sent a valid CONNECT and passed authentication.
    Connect(ConnectRequest),
    /// A packet from a connected client.
    Packet {
        /// Session of the sender.
        session: SessionKey,
        /// Connection of the sender (stale ones are ignored).
        conn_id: ConnId,
        /// The packet.
        packet: Packet,
    },
    /// A connection is to end once the core's replies to what it sent so far are out:
    /// after a protocol violation (`reason`: a DISCONNECT with it is queued, 5.0), or
    /// after the client's own DISCONNECT (`None`: a SUBACK for a SUBSCRIBE that came in
    /// the same read still goes out).
    CloseAfterReplies {
        /// Its session.
        session: SessionKey,
        /// The connection.
        conn_id: ConnId,
        /// The DISCONNECT reason (5.0), or `None` to close without one.
        reason: Option<outpost_mqtt::ReasonCode>,
    },
    /// A connection ended.
    Closed {
        /// Its session.
        session: SessionKey,
        /// The connection.
        conn_id: ConnId,
        /// DISCONNECT packet if the client sent one, `None` for an abnormal end.
        disconnect: Option<Disconnect>,
        /// Why the broker closed it, when it did.
        reason: Option<outpost_mqtt::ReasonCode>,
    },
    /// An in-process publish; the reply carries the durable sinks' receipts.
    LocalPublish {
        /// The message.
        msg: Arc<Message>,
        /// Receipts to await before reporting the publish complete.
        done: oneshot::Sender<Vec<DurableReceipt>>,
    },
    /// An in-process subscription.
    LocalSubscribe {
        /// Topic filter (may be `$share/...`).
        filter: String,
        /// Maximum QoS.
        qos: QoS,
        /// Where messages go.
        tx: mpsc::Sender<Arc<Message>>,
        /// The key to unsubscribe with.
        done: oneshot::Sender<SessionKey>,
    },
    /// An in-process subscription was dropped.
    LocalUnsubscribe(SessionKey),
    /// A durable sink refused a client's QoS 2 PUBLISH: that exchange is over (the
    /// client got a failing PUBREC, or, on 3.x, nothing), so its packet id must not
    /// make a resend look like a duplicate.
    Qos2Refused {
        /// Session of the publisher.
        session: SessionKey,
        /// The refused PUBLISH's packet id.
        packet_id: u16,
    },
    /// Adds a durable sink (the bridge registers before listeners open).
    AddSink(Arc<dyn DurableSink>, oneshot::Sender<SinkId>),
    /// New settings from a reloaded config: bounds apply from now on, and every
    /// connected client's topic rules are resolved again.
    Reload(Arc<Settings>, oneshot::Sender<()>),
    /// The statistics `$SYS` publishes, for the gateway's HTTP side (asked once a second).
    Snapshot(oneshot::Sender<crate::sys::SysSnapshot>),
    /// Disconnect everyone and stop.
    Shutdown(oneshot::Sender<()>),
}

/// One network connection of a session, numbered in order from 1: events from a
/// connection that a takeover has replaced carry an older id and are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnId(u64);

impl ConnId {
    /// What a connection holds until the core accepts it; never given to one.
    pub(crate) const UNACCEPTED: ConnId = ConnId(0);
    /// The first connection the core accepts.
    pub(crate) const FIRST: ConnId = ConnId(1);

    /// The id of the connection after this one.
    pub(crate) fn next(self) -> ConnId {
        ConnId(self.0 + 1)
    }
}

impl std::fmt::Display for ConnId {
    /// The number, as the logs show it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Who a connected client is, where that matters to its topic rules.
pub(crate) struct ClientOrigin {
    /// Its user name.
    pub user: Option<Arc<str>>,
    /// The listener with rules of its own it came through.
    pub listener: Option<std::net::SocketAddr>,
}

/// What the core tells a connection it accepted.
pub(crate) struct Accepted {
    /// The session.
    pub session: SessionKey,
    /// The connection's id, for the log and for stale-event checks.
    pub conn_id: ConnId,
}

/// A CONNECT handed to the core.
pub(crate) struct ConnectRequest {
    /// The decoded CONNECT.
    pub connect: Box<Connect>,
    /// Where the client connects from, for the log.
    pub peer: std::net::SocketAddr,
    /// The listener whose own rules apply to the client, if it has any.
    pub listener: Option<std::net::SocketAddr>,
    /// The connection's outbound queue (CONNACK goes out through it).
    pub tx: OutboundTx,
    /// Answered with the session and connection ids, or `None` if refused.
    pub reply: oneshot::Sender<Option<Accepted>>,
}

/// The core's inbox as the network connections use it: the internal pipe, apart from the
/// public in-process API ([`crate::BrokerHandle`]), which wraps the same queue.
#[derive(Clone)]
pub(crate) struct CoreInbox(mpsc::Sender<CoreEvent>);

/// The core has stopped: nothing more can be sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CoreStopped;

impl CoreInbox {
    /// Wraps the sender the core was spawned with.
    pub(crate) fn new(tx: mpsc::Sender<CoreEvent>) -> CoreInbox {
        CoreInbox(tx)
    }

    /// Sends `ev`, waiting for room in the queue.
    pub(crate) async fn send(&self, ev: CoreEvent) -> Result<(), CoreStopped> {
        self.0.send(ev).await.map_err(|_| CoreStopped)
    }

    /// Queues an event without waiting; `Full` hands it back so the caller can wait
    /// for room with [`Self::reserve_owned`] (the connection futures poll, not await).
    // The event comes back by value so the caller boxes it only on the rare full path.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_send(&self, ev: CoreEvent) -> Result<(), TrySendError<CoreEvent>> {
        self.0.try_send(ev)
    }

    /// Waits for room in the core's queue, holding it until the permit is used.
    pub(crate) fn reserve_owned(
        &self,
    ) -> impl std::future::Future<Output = Result<OwnedPermit<CoreEvent>, SendError<()>>> + Send + 'static
    {
        self.0.clone().reserve_owned()
    }
}
