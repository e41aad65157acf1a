//! Device status on shutdown, with the real `outpost` binary: a Modbus TCP device
//! simulated with tokio-modbus's server is polled (one point writable, so the command
//! subscription is live), a rumqttc client watches the retained status, and SIGTERM
//! must leave it `offline` ("gateway stopping") before the broker stops: the watcher
//! receives it live, and a restart of the persistent broker replays it retained.

use std::time::{Duration, Instant};

use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::modbus::serve;
use outpost_tests::{V4Client, WAIT};
use rumqttc::QoS;

const STATUS: &str = "outpost/gw-01/sensors/boiler/status";

fn status_of(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_the_retained_device_status_offline() {
    if mosquitto_mode() {
        return; // the sensor layer is Outpost's own
    }
    let (device_port, _device) = serve().await;
    let broker_part = "gateway_id = \"gw-01\"\n[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\npersistence = true\n";
    let config = format!(
        r#"{broker_part}[sensors]
clock = "trusted"
[[sensors.modbus]]
name = "boiler"
transport = {{ tcp = {{ host = "127.0.0.1", port = {device_port} }} }}
unit = 1
every = "200ms"
points = [
  {{ name = "level", kind = "holding", address = 0, type = "u16" }},
  {{ name = "setpoint", kind = "holding", address = 10, type = "u16", writable = true }},
]
"#
    );
    let mut broker = Broker::outpost_with_full_config(&config);

    let (mut watcher, _) = V4Client::connect(broker.port(), "status-watcher", |_| {}).await;
    watcher
        .client
        .subscribe(STATUS, QoS::AtLeastOnce)
        .await
        .unwrap();
    let online = watcher
        .wait_for(WAIT, |p| match p {
            rumqttc::Packet::Publish(p) if status_of(&p.payload)["status"] == "online" => Some(()),
            _ => None,
        })
        .await;
    assert!(
        online.is_some(),
        "the device never went online:\n{}",
        broker.log()
    );

    let sent = Instant::now();
    let exit = tokio::task::block_in_place(|| broker.stop_gracefully()).expect("outpost ran");
    eprintln!("outpost exited {:?} after SIGTERM", sent.elapsed());
    assert!(exit.success(), "{exit:?}\n{}", broker.log());

    // The watcher saw the device go offline before the broker closed its connection.
    let mut last = None;
    while let Some(p) = watcher.next_publish(Duration::from_secs(2)).await {
        last = Some(status_of(&p.payload));
    }
    let last = last.unwrap_or_else(|| panic!("no status after SIGTERM:\n{}", broker.log()));
    assert_eq!(last["status"], "offline", "{last}");
    assert_eq!(last["reason"], "gateway stopping", "{last}");

    // Restarted without the device (so nothing can publish its status again), the
    // persistent broker replays what the stop left.
    let config_file = broker.state_dir().join("outpost.toml");
    assert!(
        config_file.exists(),
        "the harness keeps its config in the state directory"
    );
    std::fs::write(&config_file, broker_part).unwrap();
    broker.restart();
    let (mut late, _) = V4Client::connect(broker.port(), "late-reader", |_| {}).await;
    late.client
        .subscribe(STATUS, QoS::AtLeastOnce)
        .await
        .unwrap();
    let kept = late.expect_publish(WAIT).await;
    assert!(kept.retain);
    let kept = status_of(&kept.payload);
    assert_eq!(kept["status"], "offline", "{kept}");
    assert_eq!(kept["reason"], "gateway stopping", "{kept}");
    assert!(kept["error"].is_null(), "{kept}");
}
