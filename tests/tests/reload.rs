//! Live reload (`kill -HUP`, what `systemctl reload outpost` sends): the real binary
//! re-reads its file and applies the difference without dropping what did not change
//! (DESIGN.md, Contracts: "Reload keeps what did not change").

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outpost_tests::broker::{Broker, mosquitto_mode, password_hash};
use outpost_tests::cloud::{Cloud, CloudSubscriber};
use outpost_tests::ports::reserve_port;
use outpost_tests::{V4Client, WAIT};
use rumqttc::QoS;

/// The line a successful reload ends with (`reloaded FILE: what changed`).
const RELOADED: &str = "outpost_gateway::reload: reloaded ";

fn listener(bind: &str) -> String {
    format!("{{ bind = \"{bind}\" }}")
}

fn wait_log(b: &Broker, needle: &str, times: usize) {
    let ok = tokio::task::block_in_place(|| b.wait_for_log(needle, times, WAIT * 2));
    assert!(ok, "no `{needle}` (x{times}) in the log:\n{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_changes_nothing_and_says_where() {
    if mosquitto_mode() {
        return;
    }
    let good = format!(
        "[broker]\nlisteners = [{}]\nallow_anonymous = true\n",
        listener("127.0.0.1:0")
    );
    let mut b = Broker::outpost_with_full_config(&good);
    let (mut sub, _) = V4Client::connect(b.port(), "broken-sub", |_| {}).await;
    sub.client
        .subscribe("broken/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;

    // A value error on line 4 and a syntax error: each is refused with its position,
    // and the gateway neither exits (SIGHUP's default action) nor changes anything.
    b.reload_with(&format!("{good}max_keepalive = \"soon\"\n"));
    wait_log(&b, "reload failed", 1);
    b.reload_with(&format!("{good}[bridge\n"));
    wait_log(&b, "reload failed", 2);
    assert!(b.is_running(), "SIGHUP killed the gateway:\n{}", b.log());
    let log = b.log();
    assert!(log.contains("outpost.toml:4:"), "no file:line in:\n{log}");
    assert!(log.contains("max_keepalive"), "no key in:\n{log}");

    let (mut publ, _) = V4Client::connect(b.port(), "broken-pub", |_| {}).await;
    publ.client
        .publish("broken/t", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    publ.expect_publish_done().await;
    assert_eq!(&sub.expect_publish(WAIT).await.payload[..], b"after");
    assert!(sub.closed.is_none(), "subscriber dropped: {:?}", sub.closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_users_and_changes_topic_rules_of_connected_clients() {
    if mosquitto_mode() {
        return;
    }
    let alice = password_hash("alice-pw");
    let bob = password_hash("bob-pw");
    let config = |users: &str, acl: &str| {
        format!(
            "[broker]\nlisteners = [{}]\nusers = [{users}]\nacl = [{acl}]\n",
            listener("127.0.0.1:0")
        )
    };
    let alice_user = format!("{{ name = \"alice\", password_hash = \"{alice}\" }}");
    let bob_user = format!("{{ name = \"bob\", password_hash = \"{bob}\" }}");
    let mut b = Broker::outpost_with_full_config(&config(
        &alice_user,
        "{ user = \"alice\", topic = \"data/#\", access = \"readwrite\" }",
    ));
    let port = b.port();
    let (bob_before, ack) = V4Client::try_connect(port, "bob-1", |o| {
        o.set_credentials("bob", "bob-pw");
    })
    .await;
    assert!(ack.is_err(), "bob logged in before he was configured");
    drop(bob_before);
    let (mut reader, _) = V4Client::connect(port, "alice-reader", |o| {
        o.set_credentials("alice", "alice-pw");
    })
    .await;
    reader
        .client
        .subscribe("data/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    reader.expect_suback().await;

    // Alice may now read only data/public/#; bob may write data/#.
    b.reload_with(&config(
        &format!("{alice_user}, {bob_user}"),
        "{ user = \"alice\", topic = \"data/public/#\", access = \"read\" }, \
         { user = \"bob\", topic = \"data/#\", access = \"write\" }",
    ));
    wait_log(&b, RELOADED, 1);
    let (mut writer, _) = V4Client::connect(port, "bob-2", |o| {
        o.set_credentials("bob", "bob-pw");
    })
    .await;
    for t in ["data/secret/x", "data/public/x"] {
        writer
            .client
            .publish(t, QoS::AtLeastOnce, false, t)
            .await
            .unwrap();
        writer.expect_publish_done().await;
    }
    // The connected reader kept its connection and its subscription, and from now on
    // gets only what its new rules allow.
    let got = reader.publishes_during(Duration::from_secs(1)).await;
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, ["data/public/x"], "log:\n{}", b.log());
    assert!(
        reader.closed.is_none(),
        "reader dropped: {:?}",
        reader.closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_changed_and_removed_without_touching_the_others() {
    if mosquitto_mode() {
        return;
    }
    let extra_held = reserve_port();
    let extra = extra_held.port();
    let first = format!(
        "[broker]\nallow_anonymous = true\nlisteners = [{}]\n",
        listener("127.0.0.1:0")
    );
    let mut b = Broker::outpost_with_full_config(&first);
    let main_port = b.port();
    let (mut sub, _) = V4Client::connect(main_port, "lst-sub", |_| {}).await;
    sub.client
        .subscribe("lst/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    // The first listener's bind stays "127.0.0.1:0": unchanged, so it keeps its port.
    let with_extra = format!(
        "[broker]\nallow_anonymous = true\nlisteners = [{}, {}]\n",
        listener("127.0.0.1:0"),
        listener(&format!("127.0.0.1:{extra}"))
    );
    b.reload_with(&with_extra);
    wait_log(&b, RELOADED, 1);
    let (mut p2, _) = V4Client::connect(extra, "lst-pub-extra", |_| {}).await;
    p2.client
        .publish("lst/a", QoS::AtLeastOnce, false, "via the added listener")
        .await
        .unwrap();
    p2.expect_publish_done().await;
    assert_eq!(
        &sub.expect_publish(WAIT).await.payload[..],
        b"via the added listener"
    );

    // Removed again: the port no longer accepts; the first listener's client is untouched.
    b.reload_with(&first);
    wait_log(&b, RELOADED, 2);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", extra)).is_err(),
        "the removed listener still accepts"
    );
    let (mut p1, _) = V4Client::connect(main_port, "lst-pub-main", |_| {}).await;
    p1.client
        .publish("lst/b", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    p1.expect_publish_done().await;
    assert_eq!(&sub.expect_publish(WAIT).await.payload[..], b"still here");
    assert!(
        sub.closed.is_none(),
        "client of an unchanged listener dropped: {:?}",
        sub.closed
    );
}

/// The issue's "reload under load": a steady QoS 1 stream through the broker (to a local
/// subscriber) and through a bridge (to a real Mosquitto), with three reloads in the
/// middle: one changes the bridge (it reconnects), one adds a listener and the log
/// level, one changes nothing. Every acknowledged message arrives at both ends, in order
/// at the cloud, and no client of the unchanged listener is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_a_qos1_stream_through_broker_and_bridge_loses_nothing() {
    if mosquitto_mode() {
        return;
    }
    const N: usize = 3000;
    let mut cloud = Cloud::new();
    cloud.start();
    let collector = CloudSubscriber::start(&cloud, "collector", "up/#", N, 90);
    let extra_held = reserve_port();
    let extra = extra_held.port();
    let config = |keep_alive: &str, listeners: &str, level: &str| {
        format!(
            r#"gateway_id = "gw-reload"
[log]
level = "{level}"
[broker]
allow_anonymous = true
listeners = [{listeners}]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{port}"
keep_alive = "{keep_alive}"
topics = [{{ pattern = "load/#", direction = "out", qos = 1, remote_prefix = "up/" }}]
reconnect = {{ min = "100ms", max = "500ms" }}
"#,
            port = cloud.port
        )
    };
    let one = listener("127.0.0.1:0");
    let two = format!("{one}, {}", listener(&format!("127.0.0.1:{extra}")));
    let mut b = Broker::outpost_with_full_config(&config("60s", &one, "info"));
    let port = b.port();
    let (mut local, _) = V4Client::connect(port, "reload-local-sub", |_| {}).await;
    local
        .client
        .subscribe("load/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    local.expect_suback().await;
    wait_log(&b, "connected to the cloud", 1);

    let publisher = tokio::spawn(async move {
        let (mut p, _) = V4Client::connect(port, "reload-pub", |o| {
            o.set_inflight(50);
        })
        .await;
        for i in 0..N {
            p.client
                .publish("load/seq", QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
        let mut acked = 0;
        while acked < N {
            let got = p
                .wait_for(WAIT * 2, |pk| {
                    matches!(pk, rumqttc::Packet::PubAck(_)).then_some(())
                })
                .await;
            if got.is_none() {
                break;
            }
            acked += 1;
        }
        (acked, p.closed.clone())
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    b.reload_with(&config("30s", &one, "info"));
    wait_log(&b, "bridge cloud reconnected with new settings", 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.reload_with(&config("30s", &two, "debug"));
    wait_log(&b, RELOADED, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.reload_with(&config("30s", &two, "debug"));
    wait_log(&b, RELOADED, 3);

    let (acked, pub_closed) = publisher.await.unwrap();
    assert_eq!(
        acked, N,
        "publisher got {acked} of {N} PUBACKs ({pub_closed:?})"
    );
    assert!(pub_closed.is_none(), "publisher dropped: {pub_closed:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = BTreeSet::new();
    while seen.len() < N && Instant::now() < deadline {
        match local.next_publish(Duration::from_secs(2)).await {
            Some(p) => {
                seen.insert(
                    String::from_utf8_lossy(&p.payload)
                        .parse::<usize>()
                        .unwrap(),
                );
            }
            None if local.closed.is_some() => break,
            None => {}
        }
    }
    assert_eq!(seen.len(), N, "local subscriber got {} of {N}", seen.len());
    assert!(
        local.closed.is_none(),
        "local subscriber dropped: {:?}",
        local.closed
    );

    let lines = tokio::task::block_in_place(|| collector.wait());
    let mut at_cloud = Vec::new();
    for l in &lines {
        if let Some(("up/load/seq", v)) = l.split_once(' ') {
            at_cloud.push(v.parse::<usize>().unwrap());
        }
    }
    let distinct: BTreeSet<usize> = at_cloud.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        N,
        "the cloud got {} of {N}:\n{}",
        distinct.len(),
        b.log()
    );
    // Order per link: first arrivals never go backwards (a QoS 1 resend may repeat one).
    let mut first_seen = BTreeSet::new();
    let mut last = None;
    for v in at_cloud {
        if first_seen.insert(v) {
            assert!(
                last.is_none_or(|l| v > l),
                "order broken at {v} after {last:?}"
            );
            last = Some(v);
        }
    }
    let log = b.log();
    assert!(log.contains("listener tcp://127.0.0.1:"), "{log}");
    assert!(b.is_running());
}

/// Sensors on reload: a removed device's retained status is cleared; the device on an
/// unchanged line keeps polling without a restart (no "offline" between two readings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_clears_a_removed_device_and_leaves_unchanged_lines_polling() {
    if mosquitto_mode() {
        return;
    }
    let (boiler_port, _boiler) = outpost_tests::modbus::serve().await;
    let (pump_port, _pump) = outpost_tests::modbus::serve().await;
    let device = |name: &str, port: u16| {
        format!(
            r#"[[sensors.modbus]]
name = "{name}"
transport = {{ tcp = {{ host = "127.0.0.1", port = {port} }} }}
unit = 1
every = "200ms"
points = [{{ name = "level", kind = "holding", address = 0, type = "u16", deadband = 0 }}]
"#
        )
    };
    let head = "gateway_id = \"gw-r\"\n[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\n[sensors]\nclock = \"trusted\"\n";
    let both = format!(
        "{head}{}{}",
        device("boiler", boiler_port),
        device("pump", pump_port)
    );
    let mut b = Broker::outpost_with_full_config(&both);
    let (mut watch, _) = V4Client::connect(b.port(), "sensor-watch", |_| {}).await;
    watch
        .client
        .subscribe("outpost/gw-r/sensors/+/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    watch.expect_suback().await;
    let mut online = BTreeSet::new();
    let deadline = Instant::now() + WAIT * 2;
    while online.len() < 2 && Instant::now() < deadline {
        if let Some(p) = watch.next_publish(Duration::from_secs(1)).await
            && String::from_utf8_lossy(&p.payload).contains("\"online\"")
        {
            online.insert(p.topic.clone());
        }
    }
    assert_eq!(online.len(), 2, "devices not online:\n{}", b.log());

    b.reload_with(&format!("{head}{}", device("boiler", boiler_port)));
    wait_log(&b, RELOADED, 1);
    let log = b.log();
    assert!(log.contains("sensor lines stopped"), "{log}");
    let after = watch.publishes_during(Duration::from_secs(2)).await;
    let pump: Vec<_> = after
        .iter()
        .filter(|p| p.topic == "outpost/gw-r/sensors/pump/status")
        .collect();
    assert!(
        pump.iter().any(|p| p.payload.is_empty()),
        "the removed device's retained status was not cleared: {pump:?}"
    );
    assert!(
        !after
            .iter()
            .any(|p| p.topic == "outpost/gw-r/sensors/boiler/status"),
        "the unchanged device's status changed: {after:?}"
    );
    // A new subscriber finds no retained status for the removed device.
    let (mut late, _) = V4Client::connect(b.port(), "sensor-late", |_| {}).await;
    late.client
        .subscribe("outpost/gw-r/sensors/pump/status", QoS::AtLeastOnce)
        .await
        .unwrap();
    late.expect_suback().await;
    assert!(
        late.publishes_during(Duration::from_millis(700))
            .await
            .is_empty(),
        "a retained status is left for the removed device"
    );
}
