//! The broker's network side: everything between a socket and the core's inbox.
//!
//! - [`listener`]: binding and accepting (TCP, TLS, WebSocket plain or over TLS), one
//!   task per connection;
//! - [`tls`]: the rustls server configuration and client-certificate names;
//! - [`transport`]: the byte pipe under a connection (plain TCP through readiness, TLS
//!   and WebSocket through `AsyncRead`), as poll functions;
//! - [`connection`]: the per-connection task (handshake, the connected phase's driver,
//!   the protocol state, close);
//! - [`park`]: the lot where idle plain-TCP sockets wait outside tokio;
//! - [`deadlines`]: keep-alive and close deadlines of every connection, one sweeper.
//!
//! What these share at run time lives here too: a broker's [`Runtime`] (its
//! deadlines, and through them the parked-socket lot) and each connection's
//! [`ConnContext`]. [`Settings`] stays plain data resolved from the config file; the
//! runtime is made once per broker and outlives every reload.

pub(crate) mod connection;
mod deadlines;
pub(crate) mod listener;
pub(crate) mod park;
pub(crate) mod tls;
mod transport;

use std::sync::Arc;

use crate::settings::Settings;
use deadlines::Deadlines;

/// The run-time objects of one broker's connections (made by [`crate::Broker::start`],
/// kept across reloads).
#[derive(Clone, Debug)]
pub(crate) struct Runtime {
    /// Keep-alive and close deadlines of this broker's connections.
    deadlines: Arc<Deadlines>,
}

impl Runtime {
    /// A fresh runtime; its sweeper task starts with the first deadline.
    pub(crate) fn new() -> Runtime {
        Runtime {
            deadlines: Deadlines::new(),
        }
    }

    /// What connections served with `settings` run with.
    pub(crate) fn context(&self, settings: Arc<Settings>) -> Arc<ConnContext> {
        Arc::new(ConnContext {
            settings,
            deadlines: self.deadlines.clone(),
        })
    }

    /// The context of the next connection a listener accepts: `cached` while it was made
    /// from these same `settings` (one allocation per listener and reload, not per
    /// client), a new one after a reload replaced them.
    pub(crate) fn context_for(
        &self,
        cached: &mut Option<Arc<ConnContext>>,
        settings: Arc<Settings>,
    ) -> Arc<ConnContext> {
        match cached {
            Some(c) if Arc::ptr_eq(&c.settings, &settings) => c.clone(),
            _ => cached.insert(self.context(settings)).clone(),
        }
    }
}

/// What a connection is served with: the settings it was accepted with and its broker's
/// runtime, behind one pointer so that a connection's task and parked state hold a
/// single `Arc` for both.
#[derive(Debug)]
pub(crate) struct ConnContext {
    /// The connection's settings (its listener's copy, as of its accept).
    pub(crate) settings: Arc<Settings>,
    /// Keep-alive and close deadlines of the broker's connections.
    pub(crate) deadlines: Arc<Deadlines>,
}
