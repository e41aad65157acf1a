//! The HTTP side of the gateway: a live status page for a person on site, `/metrics` for
//! Prometheus, and `/healthz` and `/readyz` for a fleet manager or a load balancer.
//!
//! Everything shown comes from the counters `$SYS` reads (the broker core's statistics
//! through [`crate::broker::BrokerHandle::snapshot`], the bridges' `BridgeStats`, the
//! sensor layer's `Stats`), sampled once a second by one task; requests only read the
//! latest sample, so a scraper or a browser never reaches the broker's hot path.

mod metrics;
mod sample;
mod server;
pub mod warnings;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use outpost_broker::config::UserConfig;
use serde::Deserialize;
use tokio::sync::watch;

use crate::broker::BrokerHandle;

/// `[http]`: the status page, metrics and health endpoints (off unless the table is present).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on; loopback by default. Any other address needs `[[http.users]]`.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Who may see the pages (HTTP Basic against argon2 PHC hashes, as `[[broker.users]]`;
    /// make one with `outpost passwd`). With users, every path but `/healthz` needs a login.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// `/readyz` counts a bridge whose link is down as ready while its spool is below
    /// this fraction of `spool.max_bytes` (0 means: ready only while connected).
    #[serde(default = "default_ready_spool_fraction")]
    pub ready_spool_fraction: f64,
    /// Open HTTP connections at once (event streams included); more wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_ready_spool_fraction() -> f64 {
    0.5
}

fn default_max_connections() -> usize {
    32
}

impl HttpConfig {
    /// Checks the table; `Err` is (key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.bind.ip().is_loopback() && self.users.is_empty() {
            return Err((
                "http.bind".into(),
                format!(
                    "{} is reachable from other machines, so the status page needs a login: \
                     add [[http.users]] with name and password_hash (make one with \
                     `outpost passwd`), or bind 127.0.0.1",
                    self.bind
                ),
            ));
        }
        for (i, u) in self.users.iter().enumerate() {
            if !u.password_hash.starts_with('$') {
                return Err((
                    format!("http.users[{i}].password_hash"),
                    "must be a PHC hash string such as \"$argon2id$...\"; create one with \
                     `outpost passwd`"
                        .into(),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.ready_spool_fraction) {
            return Err((
                "http.ready_spool_fraction".into(),
                "must be between 0 and 1, e.g. 0.5".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(("http.max_connections".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

/// What the HTTP side reads: the same handles and counters the rest of the gateway uses.
pub struct Sources {
    /// Gateway id shown on the page.
    pub gateway_id: String,
    /// The broker's listeners, as `tcp://127.0.0.1:1883`.
    pub listeners: Vec<String>,
    /// The broker core.
    pub broker: BrokerHandle,
    /// The running bridges (a reload changes the set).
    pub bridges: crate::bridge::BridgeSet,
    /// The sensor layer's counters, if sensors run (a reload replaces them).
    pub sensors: crate::service::SensorLines,
}

/// Starts `[http]` if the config has it (after the broker serves, so `/readyz` can say so).
/// A reload does not change it (`[http]` is applied at the next start).
pub async fn start_if_configured(
    running: &crate::reload::Running,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let config = running.config();
    let Some(http) = &config.http else {
        return Ok(());
    };
    let sources = Sources {
        gateway_id: config.gateway_id(),
        listeners: running.listener_urls(),
        broker: running.broker().handle(),
        bridges: running.bridges().running(),
        sensors: running.sensor_lines(),
    };
    spawn(http, sources, shutdown).await.map(|_| ())
}

/// Binds `[http]` and serves it until `shutdown`; a bind failure is a start-up error.
pub async fn spawn(
    config: &HttpConfig,
    sources: Sources,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {} (http.bind): is another program using it?",
                config.bind
            )
        })?;
    let addr = listener.local_addr().context("reading the HTTP address")?;
    let state = sample::Sampler::start(sources, config.ready_spool_fraction, shutdown.clone());
    tokio::spawn(server::serve(
        listener,
        Arc::new(server::Server::new(config, state)),
        shutdown,
    ));
    tracing::info!("status page on http://{addr}/");
    Ok(addr)
}
