//! Answers to the in-process API ([`crate::BrokerHandle`]). The core decides them while it
//! handles an event and hands them out through [`super::Core::poll_reply`]; the task sends
//! them after the batch's other outputs, so an in-process publisher hears back only once
//! its message's deliveries are queued and its store changes are on their way.

use tokio::sync::oneshot;

use crate::subscriptions::SessionKey;
use crate::sys::SysSnapshot;
use crate::{DurableReceipt, SinkId};

/// One answer, with the channel it goes back on.
pub(crate) enum Reply {
    /// A local publish was routed; the durable sinks' receipts to wait for.
    Published(oneshot::Sender<Vec<DurableReceipt>>, Vec<DurableReceipt>),
    /// A local subscription was made; the key to unsubscribe with.
    Subscribed(oneshot::Sender<SessionKey>, SessionKey),
    /// A durable sink was added under this id.
    SinkAdded(oneshot::Sender<SinkId>, SinkId),
    /// Reloaded settings apply from now on.
    Reloaded(oneshot::Sender<()>),
    /// The statistics as of the event.
    Snapshot(oneshot::Sender<SysSnapshot>, Box<SysSnapshot>),
}

impl Reply {
    /// Sends the answer; one whose asker has gone is dropped (it no longer waits).
    pub(crate) fn send(self) {
        match self {
            Reply::Published(to, receipts) => drop(to.send(receipts)),
            Reply::Subscribed(to, key) => drop(to.send(key)),
            Reply::SinkAdded(to, id) => drop(to.send(id)),
            Reply::Reloaded(to) => drop(to.send(())),
            Reply::Snapshot(to, snapshot) => drop(to.send(*snapshot)),
        }
    }
}
