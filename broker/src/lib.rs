//! The local MQTT broker.
//!
//! One task, the [core](core), owns every session, the subscription tree and the retained
//! messages, so routing needs no locks; connection tasks decode and encode on the other
//! cores and talk to it through queues. The in-process API ([`BrokerHandle`]) lets the
//! sensors and the bridge publish and subscribe without a socket, and [`DurableSink`]
//! lets the bridge hold a publisher's acknowledgement until its spool has committed.
//! [`config`] holds the `[broker]` table of `outpost.toml` that [`Settings`] is made from.

#![forbid(unsafe_code)]

mod acl;
pub mod auth;
pub mod config;
mod connection;
mod core;
mod deadlines;
mod events;
#[cfg(debug_assertions)]
mod fault;
pub mod handle;
pub mod limits;
mod listener;
pub mod message;
mod outbound;
mod park;
mod retained;
mod session;
mod settings;
pub mod store;
pub mod subscriptions;
pub mod sys;
mod tls;
mod transport;

use std::sync::Arc;

pub use auth::{Users, hash_password, verify as verify_password};
pub use connection::serve_stream;
pub use handle::{BrokerHandle, LocalSubscription, PublishError, Receipt};
pub use listener::{BoundListener, ListenError, ServingListener, bind_listeners, check_tls};
pub use message::Message;
pub use park::set_memory_trim;
pub use settings::{Settings, SharedSettings};
pub use tls::{TlsError, server_config, server_config as tls_server_config};

/// Why a durable sink refused a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct Rejected {
    /// Human-readable reason, logged and sent as a 5.0 reason string.
    pub reason: String,
    /// The 5.0 PUBACK/PUBREC reason code to answer with (0x97 Quota exceeded for a full
    /// spool, 0x80 for a failure); 3.x publishers get no acknowledgement at all.
    pub code: outpost_mqtt::ReasonCode,
}

impl Rejected {
    /// A refusal for a reason other than a full store.
    pub fn failure(reason: impl Into<String>) -> Rejected {
        Rejected {
            reason: reason.into(),
            code: outpost_mqtt::ReasonCode::UNSPECIFIED_ERROR,
        }
    }
}

/// What a durable sink hands back for a message it took: resolves once the message is
/// committed, or with the reason it was refused.
pub type DurableReceipt = futures_util::future::BoxFuture<'static, Result<(), Rejected>>;

/// Something that must make a message durable before its publisher is acknowledged
/// (the bridge spool). `offer` is called on the core task for every accepted message,
/// so it must be cheap and must not block: return `None` when the sink does not want
/// the message, so messages it does not match are not slowed at all.
pub trait DurableSink: Send + Sync + 'static {
    /// Offers a message; `Some` resolves once it is committed or refused.
    fn offer(&self, msg: &Message) -> Option<DurableReceipt>;

    /// Whether the sink takes messages on `topic` at all, durably or not; asked only for
    /// messages no subscription matched, to tell a 5.0 publisher 0x10 (No matching
    /// subscribers) truthfully.
    fn wants(&self, topic: &str) -> bool;
}

/// Identifies a registered durable sink, so a sink's own downlink publishes can skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkId(pub(crate) usize);

/// Starts the broker core and returns its handle; listeners are attached with
/// [`listener::serve`] through [`Broker::serve`].
pub struct Broker {
    handle: BrokerHandle,
    settings: SharedSettings,
}

impl Broker {
    /// Spawns the core task on the current runtime, with what `store` held restored.
    pub fn start(
        settings: Settings,
        sinks: Vec<Arc<dyn DurableSink>>,
        store: Option<(store::Store, store::Loaded)>,
    ) -> Broker {
        let settings = Arc::new(settings);
        let handle = BrokerHandle::new(core::spawn(settings.clone(), sinks, store));
        Broker {
            handle,
            settings: SharedSettings::new(settings),
        }
    }

    /// The in-process client API.
    pub fn handle(&self) -> BrokerHandle {
        self.handle.clone()
    }

    /// Accepts connections on already bound listeners until each is stopped.
    pub fn serve(&self, listeners: Vec<BoundListener>) -> Vec<ServingListener> {
        listeners
            .into_iter()
            .map(|l| listener::spawn_accept_loop(l, self.handle.clone(), self.settings.clone()))
            .collect()
    }

    /// Applies a reloaded `[broker]` table: users, anonymous access and the other
    /// settings for connections accepted from now on, topic rules at once for every
    /// connected client. The connection counters carry over; `max_connections` and
    /// `max_connections_per_address` keep their start-up values until a restart.
    pub async fn reload(&self, config: &config::BrokerConfig) -> Result<(), PublishError> {
        let old = self.settings.get();
        let mut new = Settings::from_config(config);
        new.connections = old.connections.clone();
        new.deadlines = old.deadlines.clone();
        let new = Arc::new(new);
        self.handle.reload(new.clone()).await?;
        self.settings.set(new);
        Ok(())
    }
}
