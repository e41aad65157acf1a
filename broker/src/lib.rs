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
mod core;
mod events;
#[cfg(debug_assertions)]
mod fault;
pub mod handle;
pub mod limits;
pub mod message;
mod net;
mod outbound;
mod retained;
mod session;
mod settings;
mod sink;
pub mod store;
pub mod subscriptions;
pub mod sys;

use std::sync::Arc;

pub use auth::{Users, hash_password, verify as verify_password};
pub use handle::{BrokerHandle, LocalSubscription, PublishError, Receipt};
pub use message::Message;
pub use net::listener::{BoundListener, ListenError, ServingListener, bind_listeners, check_tls};
pub use net::park::set_memory_trim;
pub use net::tls::{TlsError, server_config, server_config as tls_server_config};
pub use settings::{Settings, SharedSettings};
pub use sink::{DurableReceipt, DurableSink, Rejected, SinkId};

/// Starts the broker core and returns its handle; listeners are attached through
/// [`Broker::serve`] (`net::listener::spawn_accept_loop`).
pub struct Broker {
    handle: BrokerHandle,
    settings: SharedSettings,
    runtime: net::Runtime,
}

impl Broker {
    /// Spawns the core task on the current runtime, with what `store` held restored.
    pub fn start(
        settings: Settings,
        sinks: Vec<Arc<dyn DurableSink>>,
        store: Option<(store::Store, store::Loaded)>,
    ) -> Broker {
        let settings = Arc::new(settings);
        let handle = BrokerHandle::new(events::CoreInbox::new(core::spawn(
            settings.clone(),
            sinks,
            store,
        )));
        Broker {
            handle,
            settings: SharedSettings::new(settings),
            runtime: net::Runtime::new(),
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
            .map(|l| {
                net::listener::spawn_accept_loop(
                    l,
                    self.handle.inbox(),
                    self.settings.clone(),
                    self.runtime.clone(),
                )
            })
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
        let new = Arc::new(new);
        self.handle.reload(new.clone()).await?;
        self.settings.set(new);
        Ok(())
    }

    /// Serves one client connection over any byte stream (what the TLS and WebSocket
    /// listeners do after their handshake; the connection fuzz target drives it over an
    /// in-memory pipe), with this broker's keep-alive deadlines. `connect_by` is when the
    /// CONNECT must have arrived; `identity` is the client certificate's Common Name, for
    /// `use_identity_as_username`. Spawn the returned future as the connection's task.
    pub fn serve_stream<S>(
        &self,
        stream: S,
        peer: std::net::SocketAddr,
        settings: Arc<Settings>,
        connect_by: std::time::Instant,
        identity: Option<String>,
    ) -> impl std::future::Future<Output = ()> + Send + use<S>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        net::connection::serve_stream(
            stream,
            peer,
            self.handle.inbox(),
            self.runtime.context(settings),
            connect_by,
            identity,
        )
    }
}
