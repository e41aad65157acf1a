//! Clouds without QoS 2, played by a real Mosquitto with `max_qos 1`: towards a 5.0
//! client it says so in CONNACK (Maximum QoS 1); a 3.1.1 client that publishes QoS 2 is
//! disconnected, as RabbitMQ and AWS IoT Core do. Either way the bridge forwards QoS 2
//! traffic as QoS 1, in order, losing nothing, and its status topic still works.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_mqtt::QoS;
use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::cloud::{Cloud, CloudSubscriber, publish_acked};

const WAIT: Duration = Duration::from_secs(20);

/// A Mosquitto without QoS 2, down, with a persistent `collector` session on `up/#`.
fn cloud_without_qos2() -> Cloud {
    let mut cloud =
        Cloud::with_limits("max_queued_messages 0\nmax_inflight_messages 0\nmax_qos 1\n");
    cloud.start();
    CloudSubscriber::register(&cloud, "collector", "up/#");
    cloud.stop();
    cloud
}

fn config(cloud: &Cloud, protocol: &str) -> String {
    format!(
        r#"gateway_id = "gw-q"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{port}"
protocol = "{protocol}"
topics = [{{ pattern = "q2/#", direction = "out", qos = 2, remote_prefix = "up/" }}]
reconnect = {{ min = "100ms", max = "500ms" }}
"#,
        port = cloud.port
    )
}

/// Payloads of `up/q2/valve` in arrival order.
fn payloads(lines: &[String]) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("up/q2/valve "))
        .map(|p| p.parse().unwrap_or(u32::MAX))
        .collect()
}

fn retained_status(cloud: &Cloud) -> String {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &cloud.port.to_string()])
        .args(["-t", "outpost/gw-q/status", "-C", "1", "-W", "5"])
        .output()
        .expect("mosquitto_sub");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn all_arrive_as_qos1(protocol: &str, log_says: &str) {
    let mut cloud = cloud_without_qos2();
    let broker = Broker::outpost_with_full_config(&config(&cloud, protocol));
    let n = 300u16;
    publish_acked(broker.port(), "pub", "q2/valve", QoS::ExactlyOnce, n).await;
    cloud.start();
    let sub = CloudSubscriber::start(&cloud, "collector", "up/#", 100_000, 30);
    let deadline = Instant::now() + WAIT;
    loop {
        let got = payloads(&sub.lines());
        let mut distinct = got.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() >= usize::from(n) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} arrived\n{}",
            distinct.len(),
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = payloads(&sub.lines());
    // Order kept; at least once (QoS 1), nothing lost.
    let mut first_seen = Vec::new();
    for p in got {
        if !first_seen.contains(&p) {
            first_seen.push(p);
        }
    }
    assert_eq!(first_seen, (0..u32::from(n)).collect::<Vec<_>>());
    let log = broker.log();
    assert!(log.contains(log_says), "{log}");
    assert!(
        !log.contains("poison message: "),
        "a message was set aside\n{log}"
    );
    assert!(
        retained_status(&cloud).contains("online"),
        "no birth on the cloud\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5_0_cloud_granting_qos_1_in_connack_gets_qos2_traffic_as_qos1() {
    if mosquitto_mode() {
        return;
    }
    all_arrive_as_qos1("5.0", "cloud CONNACK says Maximum QoS 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_cloud_that_drops_the_link_on_qos2_gets_qos2_traffic_as_qos1() {
    if mosquitto_mode() {
        return;
    }
    all_arrive_as_qos1("3.1.1", "it has no QoS 2").await;
}
