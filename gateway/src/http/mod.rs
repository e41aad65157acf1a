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

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use crate::broker::BrokerHandle;
pub use crate::config::HttpConfig;

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
    let tls = match &config.tls {
        Some(t) => {
            let c = outpost_broker::tls_server_config(t)
                .map_err(|e| anyhow::anyhow!("http.tls: {e}"))?;
            // The broker's config offers MQTT first; this listener speaks HTTP/1.1 only.
            let mut c = (*c).clone();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(c)))
        }
        None => None,
    };
    let state = sample::Sampler::start(sources, config.ready_spool_fraction, shutdown.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(server::serve(
        listener,
        tls,
        Arc::new(server::Server::new(config, state)),
        shutdown,
    ));
    tracing::info!("status page on {scheme}://{addr}/");
    Ok(addr)
}
