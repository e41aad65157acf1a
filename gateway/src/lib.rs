//! Outpost gateway: the local MQTT broker and the wiring of the whole `outpost` binary.
//!
//! - [`config`]: the one TOML file; [`check`]: what `outpost check` adds to parsing it.
//! - [`bridge`]: runs the store-and-forward bridges as durable sinks of the broker.
//! - [`broker`]: the `outpost-broker` crate (listeners, connections, sessions, routing,
//!   retained, wills, `$SYS`), re-exported so `outpost_gateway::broker::...` paths stay.
//! - [`app`]: starts everything from a config and runs until a signal.
//! - [`reload`]: applies a changed config on SIGHUP, keeping what did not change.
//! - [`sensors`]: runs the Modbus/serial layer and publishes its readings in-process.
//! - [`service`]: systemd readiness, watchdog and journal logging.
//! - [`http`]: the status page, `/metrics`, `/healthz` and `/readyz`.

pub mod app;
pub mod bridge;
pub mod check;
pub mod config;
pub mod http;
pub mod import_mosquitto;
pub mod publish_loop;
pub mod reload;
pub mod sensors;
pub mod service;
pub mod warnings;

pub use outpost_broker as broker;
