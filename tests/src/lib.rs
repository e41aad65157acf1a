//! Harness for Outpost's end-to-end tests: the real broker binary (or Mosquitto, to
//! validate the tests), rumqttc clients, a raw packet client and the Mosquitto CLI tools.
//!
//! Environment:
//! - `OUTPOST_BIN=/path/to/outpost` runs that binary; otherwise the harness runs
//!   `cargo build -p outpost-gateway --bin outpost` once per test binary into the same
//!   target dir and uses `<target>/<profile>/outpost`.
//! - `OUTPOST_TEST_BROKER=mosquitto` runs every test against a real Mosquitto 2 with an
//!   equivalent config instead, which shows the tests encode the standard rather than
//!   outpost's reading of it; outpost-only tests (CLI, config) return early there.

pub mod broker;
pub mod chromium;
pub mod cli;
pub mod clients;
pub mod cloud;
pub mod http;
pub mod ledger;
pub mod modbus;
pub mod netlink;
pub mod pki;
pub mod ports;
pub mod rabbit;
pub mod raw;

pub use broker::{Broker, BrokerKind, broker_kind, mosquitto_mode, outpost_bin};
pub use clients::{V4Client, V5Client};
pub use raw::RawClient;

use std::time::Duration;

/// Bound for things that should happen promptly on loopback (generous: the test machine
/// has two cores shared with compilers; only failures ever wait this long).
pub const WAIT: Duration = Duration::from_secs(5);

/// Wait used to assert that something does NOT happen.
pub const QUIET: Duration = Duration::from_millis(500);

/// A topic unique to the calling test, so a shared prefix never collides.
pub fn topic(test: &str, leaf: &str) -> String {
    format!("t/{test}/{leaf}")
}

/// Assert that the broker still routes messages between two fresh clients: used after a
/// bad connection to prove that only that connection was affected.
pub async fn assert_broker_serves(port: u16, tag: &str) {
    let t = topic(tag, "alive");
    let (mut sub, _) = V4Client::connect(port, &format!("{tag}-alive-sub"), |_| {}).await;
    sub.client
        .subscribe(t.as_str(), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("queue subscribe");
    sub.expect_suback().await;
    let (mut publ, _) = V4Client::connect(port, &format!("{tag}-alive-pub"), |_| {}).await;
    publ.client
        .publish(t.as_str(), rumqttc::QoS::AtLeastOnce, false, "still alive")
        .await
        .expect("queue publish");
    publ.expect_publish_done().await;
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(
        &p.payload[..],
        b"still alive",
        "broker stopped routing after a bad connection"
    );
}
