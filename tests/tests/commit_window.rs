//! The commit window (`broker.commit_window`, `bridge.spool.commit_window`): a steady
//! stream of messages shares SQLite commits, so an SD card is written a few pages per
//! commit rather than per message, and still every acknowledged message is on disk
//! before its PUBACK leaves (MQTT-4.3.2-2 and DESIGN.md "Contracts": an acknowledgement
//! leaves only after what it promises is committed).
//!
//! The paced publisher is rumqttc, which keeps publishing without waiting for each
//! PUBACK, as a site's sensors do. Outpost's own storage: outpost only.

use std::time::Duration;

use outpost_tests::cloud::{Cloud, CloudSubscriber, by_topic};
use outpost_tests::{Broker, V4Client, WAIT, outpost_only};
use rumqttc::{Packet, QoS};

/// Messages in each paced run, and their spacing (100 a second).
const N: usize = 200;
const EVERY: Duration = Duration::from_millis(10);

/// Publishes `N` QoS 1 messages "0".."N-1" on `topic`, one every `EVERY` without waiting
/// for acknowledgements, and returns once all `N` PUBACKs arrived.
async fn paced_publish(port: u16, id: &str, topic: &str) {
    let (mut c, _) = V4Client::connect(port, id, |o| {
        o.set_inflight(100);
    })
    .await;
    let client = c.client.clone();
    let topic = topic.to_owned();
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        for i in 0..N {
            tick.tick().await;
            client
                .publish(&topic, QoS::AtLeastOnce, false, i.to_string())
                .await
                .expect("queue a publish");
        }
    });
    let mut acked = 0;
    while acked < N {
        let got = c
            .wait_for(WAIT, |p| matches!(p, Packet::PubAck(_)).then_some(()))
            .await;
        assert!(
            got.is_some(),
            "{acked} of {N} PUBACKs arrived (closed: {:?})",
            c.closed
        );
        acked += 1;
    }
    sender.await.unwrap();
}

/// One `$SYS` value, read with mosquitto_sub (retained, republished every second).
async fn sys(port: u16, topic: &str) -> u64 {
    let out = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-C", "1", "-W", "5", "-t", topic])
        .output()
        .await
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{topic}: {text:?}"))
}

/// Reads `$SYS` until `topic` shows at least `at_least` (it is published every second).
async fn sys_at_least(port: u16, topic: &str, at_least: u64) -> u64 {
    let mut v = 0;
    for _ in 0..10 {
        v = sys(port, topic).await;
        if v >= at_least {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    v
}

fn bridge_config(cloud: &Cloud, window: &str) -> String {
    format!(
        r#"gateway_id = "gw-cw"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
sys_interval = "1s"
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{port}"
topics = [{{ pattern = "cw/#", direction = "out", qos = 1, remote_prefix = "up/" }}]
reconnect = {{ min = "100ms", max = "500ms" }}
stats_interval = "1s"
[bridge.spool]
commit_window = "{window}"
"#,
        port = cloud.port
    )
}

/// Spool commits for `N` paced messages with `window`, the cloud down; then the gateway is
/// killed the moment the last PUBACK arrived, started again with the cloud up, and every
/// acknowledged message must reach the cloud.
async fn spool_run(window: &str) -> u64 {
    let mut cloud = Cloud::down_with_collector();
    let mut broker = Broker::outpost_with_full_config(&bridge_config(&cloud, window));
    let port = broker.port();
    paced_publish(port, "cw-pub", "cw/meter").await;
    let spooled = sys_at_least(port, "$SYS/broker/bridge/cloud/spooled", N as u64).await;
    assert_eq!(spooled, N as u64, "spooled\n{}", broker.log());
    let commits = sys(port, "$SYS/broker/bridge/cloud/spool/commits").await;
    broker.kill9();
    broker.restart();
    cloud.start();
    let got = CloudSubscriber::start(&cloud, "collector", "up/#", N, 20).wait();
    assert_eq!(
        by_topic(&got).get("up/cw/meter"),
        Some(&(0..N as u32).collect::<Vec<_>>()),
        "every acknowledged message, once, in order\n{}",
        broker.log()
    );
    commits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_shares_spool_commits_and_loses_nothing_acknowledged() {
    outpost_only!();
    // Without a window nearly every message of a 100-a-second stream is a commit of its
    // own (a page written and synced); with 250 ms about 25 share one.
    let alone = spool_run("0s").await;
    let shared = spool_run("250ms").await;
    eprintln!("spool commits for {N} messages: {alone} with 0s, {shared} with 250ms");
    assert!(alone as usize >= N / 2, "{alone} commits with no window");
    assert!(
        shared as usize <= N / 5,
        "{shared} commits with a 250 ms window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_session_s_messages_share_store_commits_and_survive_a_kill() {
    outpost_only!();
    let state = tempfile::tempdir().unwrap();
    let mut broker = Broker::outpost_with_state_dir(
        "sys_interval = \"1s\"\ncommit_window = \"250ms\"\n",
        state.path(),
    );
    let port = broker.port();
    // A persistent session with its QoS 1 subscription, then offline: every message is
    // kept for it, and each PUBACK waits for its row (MQTT-3.1.2-4/-5).
    let (mut keeper, _) = V4Client::connect(port, "cw-keeper", |o| {
        o.set_clean_session(false);
    })
    .await;
    keeper
        .client
        .subscribe("cw/store/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    keeper.expect_suback().await;
    keeper.disconnect().await;

    let before = sys(port, "$SYS/broker/store/commits").await;
    paced_publish(port, "cw-store-pub", "cw/store/meter").await;
    let written = sys_at_least(port, "$SYS/broker/store/messages_written", N as u64).await;
    assert_eq!(written, N as u64, "rows written\n{}", broker.log());
    let commits = sys(port, "$SYS/broker/store/commits").await - before;
    eprintln!("store commits for {N} messages kept for an offline session: {commits}");
    assert!(
        commits as usize <= N / 5,
        "{commits} commits with a 250 ms window"
    );

    broker.kill9();
    broker.restart();
    let (mut keeper, _) = V4Client::connect(broker.port(), "cw-keeper", |o| {
        o.set_clean_session(false);
    })
    .await;
    let got = keeper.expect_publishes(N, WAIT).await;
    let payloads: Vec<u32> = got
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).parse().unwrap())
        .collect();
    assert_eq!(payloads, (0..N as u32).collect::<Vec<_>>(), "all, in order");
    assert!(got.iter().all(|p| p.qos == QoS::AtLeastOnce));
}
