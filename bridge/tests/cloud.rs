//! The bridge against a real Mosquitto playing the cloud.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use outpost_bridge::{BridgeHandle, LocalPublish, RejectReason, start};
use outpost_mqtt::QoS;
use tokio::sync::{mpsc, watch};

struct Running {
    bridge: BridgeHandle,
    local: mpsc::Receiver<LocalPublish>,
    _stop: watch::Sender<bool>,
    _state: tempfile::TempDir,
}

async fn run_bridge(cfg: outpost_bridge::BridgeConfig) -> Running {
    let state = tempfile::tempdir().unwrap();
    let (tx, local) = mpsc::channel(4096);
    let (stop, stop_rx) = watch::channel(false);
    let bridge = start(cfg, "gw-1", state.path(), tx, stop_rx)
        .await
        .expect("bridge starts");
    Running {
        bridge,
        local,
        _stop: stop,
        _state: state,
    }
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spooled(b: &BridgeHandle) -> u64 {
    b.stats()
        .spool_messages
        .load(std::sync::atomic::Ordering::Relaxed)
}

const OUT_RULE: &str = r#"topics = [{ pattern = "sensors/#", direction = "out", qos = 2, local_prefix = "outpost/gw-1/", remote_prefix = "plant-7/" }]"#;

async fn offer_all(b: &BridgeHandle, n: usize, qos_of: impl Fn(usize) -> QoS) {
    let mut acks = Vec::new();
    for i in 0..n {
        let qos = qos_of(i);
        let topic = format!("outpost/gw-1/sensors/q{}", qos as u8);
        acks.push(
            b.offer(&topic, &Bytes::from(i.to_string()), qos, false, None)
                .expect("an out rule matches"),
        );
    }
    for a in acks {
        a.await.expect("spool writer answers").expect("committed");
    }
}

/// Every payload 0..total exactly once, on the expected topic, ascending per topic. Mosquitto
/// releases QoS 2 messages on PUBREL, so only per-topic order (MQTT's "ordered topic") can
/// be observed across QoS levels.
fn assert_exactly_once_in_order(
    seen: &[Seen],
    total: usize,
    topic_of: impl Fn(usize) -> &'static str,
) {
    let mut ids: Vec<usize> = seen.iter().map(|s| s.payload.parse().unwrap()).collect();
    let mut per_topic: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for s in seen {
        let i: usize = s.payload.parse().unwrap();
        assert_eq!(s.topic, topic_of(i), "message {i} on the wrong topic");
        per_topic.entry(s.topic.as_str()).or_default().push(i);
    }
    for (topic, list) in &per_topic {
        assert!(
            list.windows(2).all(|w| w[0] < w[1]),
            "{topic}: out of order or duplicated: {list:?}"
        );
    }
    ids.sort_unstable();
    assert_eq!(ids, (0..total).collect::<Vec<_>>(), "exactly once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_then_cloud_back_delivers_all_in_order_without_qos2_duplicates() {
    let mut cloud = Cloud::start("");
    // Park a persistent subscriber session so nothing depends on who reconnects first.
    Subscriber::connect(cloud.port, "counter", "plant-7/#")
        .await
        .disconnect()
        .await;
    cloud.stop();

    let cfg = bridge_config(
        "cloud",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        OUT_RULE,
    );
    let run = run_bridge(cfg).await;
    let (n_qos1, n_qos2) = (400, 200);
    let total = n_qos1 + n_qos2;
    offer_all(&run.bridge, total, |i| {
        if i % 3 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        }
    })
    .await;
    assert!(
        run.bridge
            .offer(
                "elsewhere/x",
                &Bytes::from_static(b"-"),
                QoS::AtLeastOnce,
                false,
                None
            )
            .is_none()
    );
    assert!(!run.bridge.is_connected());
    assert_eq!(spooled(&run.bridge), total as u64);

    cloud.restart();
    let sub = Subscriber::connect(cloud.port, "counter", "plant-7/#").await;
    let seen = sub.wait_for(total, Duration::from_secs(30)).await;
    assert_exactly_once_in_order(&seen, total, |i| {
        if i % 3 == 0 {
            "plant-7/sensors/q2"
        } else {
            "plant-7/sensors/q1"
        }
    });
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&run.bridge) == 0
    })
    .await;
    run.bridge.shutdown().await;
}

async fn spool_full_case(
    when_full: &str,
) -> (
    Vec<Result<(), outpost_bridge::Rejected>>,
    Vec<Seen>,
    BridgeHandle,
) {
    let mut cloud = Cloud::start("");
    let client = format!("full-{when_full}");
    Subscriber::connect(cloud.port, &client, "plant-7/#")
        .await
        .disconnect()
        .await;
    cloud.stop();
    let extra = format!("{OUT_RULE}\n[spool]\nmax_bytes = \"4KiB\"\nwhen_full = \"{when_full}\"\n");
    let run = run_bridge(bridge_config(
        "full",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        &extra,
    ))
    .await;
    // Each message accounts for 500 + 18 (topic) + 32 bytes: seven fit in 4 KiB.
    let mut results = Vec::new();
    for i in 0..12usize {
        let payload = Bytes::from(format!("{i:0>500}"));
        let rx = run
            .bridge
            .offer(
                "outpost/gw-1/sensors/q1",
                &payload,
                QoS::AtLeastOnce,
                false,
                None,
            )
            .unwrap();
        results.push(rx.await.unwrap());
    }
    cloud.restart();
    let sub = Subscriber::connect(cloud.port, &client, "plant-7/#").await;
    let seen = sub.wait_for(7, Duration::from_secs(20)).await;
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&run.bridge) == 0
    })
    .await;
    (results, seen, run.bridge)
}

fn numbers(seen: &[Seen]) -> Vec<usize> {
    seen.iter().map(|s| s.payload.parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_reject_new_refuses_with_quota_exceeded_and_keeps_the_accepted() {
    let (results, seen, bridge) = spool_full_case("reject-new").await;
    assert!(results[..7].iter().all(Result::is_ok), "{results:?}");
    for r in &results[7..] {
        let e = r.as_ref().expect_err("refused once full");
        assert_eq!(e.reason, RejectReason::SpoolFull);
        assert_eq!(e.reason_code().0, 0x97);
    }
    assert_eq!(
        numbers(&seen),
        (0..7).collect::<Vec<_>>(),
        "exactly the accepted ones arrive"
    );
    let stats = bridge.stats();
    assert_eq!(
        stats
            .rejected_full
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    assert_eq!(
        stats
            .dropped_spool_full
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_drop_oldest_counts_every_dropped_message() {
    let (results, seen, bridge) = spool_full_case("drop-oldest").await;
    assert!(
        results.iter().all(Result::is_ok),
        "drop-oldest accepts new messages"
    );
    assert_eq!(
        numbers(&seen),
        (5..12).collect::<Vec<_>>(),
        "the newest seven arrive"
    );
    assert_eq!(
        bridge
            .stats()
            .dropped_spool_full
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
    bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn birth_on_connect_clean_offline_on_shutdown_and_local_mirror() {
    let cloud = Cloud::start("");
    let watch = Subscriber::connect(cloud.port, "status-watch", "outpost/gw-1/status").await;
    let mut run = run_bridge(bridge_config(
        "status",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        OUT_RULE,
    ))
    .await;
    let seen = watch.wait_for(1, Duration::from_secs(10)).await;
    let birth: serde_json::Value = serde_json::from_str(&seen[0].payload).unwrap();
    assert_eq!(birth["state"], "online");
    assert_eq!(birth["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        birth["boot_time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    // The link state and counters are mirrored on the local broker, retained.
    let mut local = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let has = |local: &[LocalPublish], topic: &str, payload: Option<&[u8]>| {
        local
            .iter()
            .any(|m| m.topic == topic && payload.is_none_or(|p| &m.payload[..] == p))
    };
    while std::time::Instant::now() < deadline
        && !(has(&local, "$SYS/broker/bridge/status/spool/messages", None)
            && has(
                &local,
                "$SYS/broker/bridge/status/state",
                Some(b"connected"),
            ))
    {
        if let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(200), run.local.recv()).await
        {
            local.push(m);
        }
    }
    let connected = local
        .iter()
        .find(|m| m.topic == "$SYS/broker/bridge/status/state" && &m.payload[..] == b"connected");
    assert!(
        connected.is_some_and(|m| m.retain),
        "link state mirrored: {local:?}"
    );
    assert!(
        local
            .iter()
            .any(|m| m.topic == "$SYS/broker/bridge/status/spool/messages")
    );

    run.bridge.shutdown().await;
    let seen = watch.wait_for(2, Duration::from_secs(10)).await;
    let offline: serde_json::Value = serde_json::from_str(&seen[1].payload).unwrap();
    assert_eq!(
        (offline["state"].as_str(), offline["reason"].as_str()),
        (Some("offline"), Some("clean"))
    );
    // A late subscriber gets the retained clean offline, not the will.
    let late = Subscriber::connect(cloud.port, "late", "outpost/gw-1/status").await;
    let seen = late.wait_for(1, Duration::from_secs(10)).await;
    assert!(
        seen[0].retain && seen[0].payload.contains("clean"),
        "{:?}",
        seen[0]
    );
    assert_eq!(seen.len(), 1, "no will after a clean disconnect");
}

async fn next_downlink(
    local: &mut mpsc::Receiver<LocalPublish>,
) -> Result<LocalPublish, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = local.recv().await.expect("bridge alive");
            if !m.topic.starts_with("$SYS/") {
                return m;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_in_rules_map_prefixes_and_keep_retain() {
    let cloud = Cloud::start("");
    cloud_publish(
        cloud.port,
        "cloud/gw-1/cmd/setpoint",
        "21.5",
        rumqttc::QoS::AtLeastOnce,
        true,
    )
    .await;
    let extra = r#"topics = [
      { pattern = "cmd/#", direction = "in", qos = 1, local_prefix = "local/", remote_prefix = "cloud/gw-1/" },
      { pattern = "sensors/#", direction = "out", qos = 1 },
    ]"#;
    let mut run = run_bridge(bridge_config(
        "down",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        extra,
    ))
    .await;
    let retained = next_downlink(&mut run.local)
        .await
        .expect("retained command delivered");
    assert_eq!(retained.topic, "local/cmd/setpoint");
    assert_eq!(&retained.payload[..], b"21.5");
    assert!(retained.retain, "retain as published");
    cloud_publish(
        cloud.port,
        "cloud/gw-1/other",
        "ignored",
        rumqttc::QoS::AtLeastOnce,
        false,
    )
    .await;
    cloud_publish(
        cloud.port,
        "cloud/gw-1/cmd/reboot",
        "now",
        rumqttc::QoS::ExactlyOnce,
        false,
    )
    .await;
    let live = next_downlink(&mut run.local)
        .await
        .expect("live command delivered");
    assert_eq!(
        (live.topic.as_str(), &live.payload[..], live.retain),
        ("local/cmd/reboot", &b"now"[..], false)
    );
    assert_eq!(live.qos, QoS::AtLeastOnce, "rule QoS caps the delivery");
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_is_downgraded_when_the_cloud_allows_only_qos1() {
    let cloud = Cloud::start("max_qos 1");
    for (i, protocol) in ["5.0", "3.1.1"].iter().enumerate() {
        let sub = Subscriber::connect(cloud.port, &format!("maxqos-{i}"), "plant-7/#").await;
        // 5.0 learns it from CONNACK Maximum QoS; 3.1.1 has no such field, so config says it.
        let extra = format!(
            "protocol = \"{protocol}\"\n{}{OUT_RULE}",
            if i == 1 { "max_qos = 1\n" } else { "" }
        );
        let run = run_bridge(bridge_config(
            &format!("maxqos{i}"),
            &format!("mqtt://127.0.0.1:{}", cloud.port),
            &extra,
        ))
        .await;
        offer_all(&run.bridge, 30, |_| QoS::ExactlyOnce).await;
        let seen = sub.wait_for(30, Duration::from_secs(15)).await;
        assert_eq!(
            numbers(&seen),
            (0..30).collect::<Vec<_>>(),
            "protocol {protocol}"
        );
        assert!(seen.iter().all(|s| s.qos == rumqttc::QoS::AtLeastOnce));
        wait_until("spool drained", Duration::from_secs(10), || {
            spooled(&run.bridge) == 0
        })
        .await;
        assert!(run.bridge.is_connected(), "not kicked by the cloud");
        assert_eq!(
            run.bridge
                .stats()
                .reconnects
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        run.bridge.shutdown().await;
        sub.disconnect().await;
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_against_require_certificate() {
    assert!(
        have("openssl"),
        "openssl CLI needed to make test certificates"
    );
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=outpost-test-ca",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "gw-1")] {
        openssl(
            d,
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            ]
            .concat(),
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    // Mosquitto started as root drops to its own user: it must be able to read these.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let tls_port = free_port();
    let p = |f: &str| d.join(f).display().to_string();
    let cloud = Cloud::start(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        p("ca.crt"),
        p("server.crt"),
        p("server.key")
    ));
    wait_port(tls_port);
    let sub = Subscriber::connect(cloud.port, "tls-counter", "plant-7/#").await;

    // Without a client certificate the cloud refuses us: nothing goes up, nothing is lost.
    let no_cert = format!("{OUT_RULE}\n[tls]\nca_file = \"{}\"\n", p("ca.crt"));
    let refused = run_bridge(bridge_config(
        "tls-nocert",
        &format!("mqtts://127.0.0.1:{tls_port}"),
        &no_cert,
    ))
    .await;
    offer_all(&refused.bridge, 3, |_| QoS::AtLeastOnce).await;
    wait_until("a refused attempt", Duration::from_secs(10), || {
        refused
            .bridge
            .stats()
            .connect_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await;
    assert!(!refused.bridge.is_connected());
    assert_eq!(spooled(&refused.bridge), 3, "kept in the spool");
    refused.bridge.shutdown().await;

    let with_cert = format!(
        "{OUT_RULE}\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nserver_name = \"localhost\"\n",
        p("ca.crt"),
        p("client.crt"),
        p("client.key")
    );
    let run = run_bridge(bridge_config(
        "tls",
        &format!("mqtts://127.0.0.1:{tls_port}"),
        &with_cert,
    ))
    .await;
    offer_all(&run.bridge, 20, |i| {
        if i % 2 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        }
    })
    .await;
    let seen = sub.wait_for(20, Duration::from_secs(15)).await;
    let mut got = numbers(&seen);
    got.sort_unstable();
    assert_eq!(got, (0..20).collect::<Vec<_>>(), "{}", cloud.log());
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_transport() {
    let ws_port = free_port();
    let cloud = Cloud::start(&format!(
        "listener {ws_port} 127.0.0.1\nprotocol websockets\n"
    ));
    wait_port(ws_port);
    let sub = Subscriber::connect(cloud.port, "ws-counter", "plant-7/#").await;
    let run = run_bridge(bridge_config(
        "ws",
        &format!("ws://127.0.0.1:{ws_port}/mqtt"),
        OUT_RULE,
    ))
    .await;
    offer_all(&run.bridge, 50, |i| {
        if i % 2 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        }
    })
    .await;
    let seen = sub.wait_for(50, Duration::from_secs(15)).await;
    let mut got = numbers(&seen);
    got.sort_unstable();
    assert_eq!(got, (0..50).collect::<Vec<_>>(), "{}", cloud.log());
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&run.bridge) == 0
    })
    .await;
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_link_is_detected_and_lost_acks_are_retried() {
    let cloud = Cloud::start("");
    let sub = Subscriber::connect(cloud.port, "halfopen-counter", "plant-7/#").await;
    let proxy = Blackhole::start(cloud.port).await;
    let mut cfg = bridge_config(
        "halfopen",
        &format!("mqtt://127.0.0.1:{}", proxy.port),
        OUT_RULE,
    );
    cfg.keep_alive = Duration::from_secs(1);
    let run = run_bridge(cfg).await;
    wait_until("connected", Duration::from_secs(10), || {
        run.bridge.is_connected()
    })
    .await;

    // The link goes silent: packets vanish, no FIN, no RST.
    proxy.set_swallow(true);
    offer_all(&run.bridge, 30, |i| {
        if i % 3 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        }
    })
    .await;
    wait_until("half-open link detected", Duration::from_secs(10), || {
        !run.bridge.is_connected()
    })
    .await;
    assert_eq!(
        spooled(&run.bridge),
        30,
        "unacknowledged messages stay spooled"
    );
    proxy.set_swallow(false);

    let seen = sub.wait_for(30, Duration::from_secs(15)).await;
    let counts = tally(&seen);
    for i in 0..30 {
        let n = counts.get(&i.to_string()).copied().unwrap_or(0);
        assert!(n >= 1, "message {i} never arrived");
        if i % 3 == 0 {
            assert_eq!(n, 1, "QoS 2 message {i} duplicated");
        }
    }
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&run.bridge) == 0
    })
    .await;
    assert!(
        run.bridge
            .stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_is_spooled_only_when_configured() {
    // QoS 0 reaches the parked subscriber session only if the cloud queues it.
    let mut cloud = Cloud::start("queue_qos0_messages true");
    Subscriber::connect(cloud.port, "qos0-counter", "plant-7/#")
        .await
        .disconnect()
        .await;
    cloud.stop();
    let rule = r#"topics = [{ pattern = "sensors/#", direction = "out", qos = 2, local_prefix = "outpost/gw-1/", remote_prefix = "plant-7/" }]"#;
    let addr = format!("mqtt://127.0.0.1:{}", cloud.port);
    let spooling = run_bridge(bridge_config(
        "q0spool",
        &addr,
        &format!("{rule}\n[spool]\nqos0 = true\n"),
    ))
    .await;
    let live_only = run_bridge(bridge_config("q0live", &addr, rule)).await;
    for i in 0..5 {
        let payload = Bytes::from(format!("spooled-{i}"));
        let rx = spooling.bridge.offer(
            "outpost/gw-1/sensors/q0",
            &payload,
            QoS::AtMostOnce,
            false,
            None,
        );
        rx.expect("QoS 0 goes through the spool")
            .await
            .unwrap()
            .unwrap();
        let payload = Bytes::from(format!("live-{i}"));
        let none = live_only.bridge.offer(
            "outpost/gw-1/sensors/q0",
            &payload,
            QoS::AtMostOnce,
            false,
            None,
        );
        assert!(none.is_none(), "unspooled QoS 0 is not waited for");
    }
    assert_eq!(spooled(&spooling.bridge), 5);
    assert_eq!(spooled(&live_only.bridge), 0);
    cloud.restart();
    let sub = Subscriber::connect(cloud.port, "qos0-counter", "plant-7/#").await;
    wait_until("both links up", Duration::from_secs(10), || {
        spooling.bridge.is_connected() && live_only.bridge.is_connected()
    })
    .await;
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&spooling.bridge) == 0
    })
    .await;
    let seen = sub.wait_for(5, Duration::from_secs(10)).await;
    let mut got: Vec<_> = seen.iter().map(|s| s.payload.clone()).collect();
    got.sort();
    assert_eq!(
        got,
        (0..5).map(|i| format!("spooled-{i}")).collect::<Vec<_>>()
    );
    let dropped = live_only
        .bridge
        .stats()
        .dropped_qos0
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        dropped, 5,
        "QoS 0 offered while the link was down is counted as dropped"
    );
    spooling.bridge.shutdown().await;
    live_only.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_offered_after_the_spool_drained_empty_still_go_up() {
    let cloud = Cloud::start("");
    let sub = Subscriber::connect(cloud.port, "refill-counter", "plant-7/#").await;
    let run = run_bridge(bridge_config(
        "refill",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        OUT_RULE,
    ))
    .await;
    wait_until("connected", Duration::from_secs(10), || {
        run.bridge.is_connected()
    })
    .await;
    offer_all(&run.bridge, 5, |_| QoS::AtLeastOnce).await;
    sub.wait_for(5, Duration::from_secs(10)).await;
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&run.bridge) == 0
    })
    .await;
    // The table is empty now: SQLite would hand out row id 1 again, behind the uplink's cursor.
    tokio::time::sleep(Duration::from_millis(200)).await;
    offer_all(&run.bridge, 5, |_| QoS::AtLeastOnce).await;
    let seen = sub.wait_for(10, Duration::from_secs(10)).await;
    assert_eq!(
        seen.len(),
        10,
        "second batch after an empty spool: {seen:?}"
    );
    run.bridge.shutdown().await;
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// Offer `payloads` in order on `topic` at QoS 1 and wait for every commit.
async fn offer_payloads(b: &BridgeHandle, topic: &str, payloads: &[String]) {
    offer_payloads_at(b, topic, payloads, QoS::AtLeastOnce).await;
}

async fn offer_payloads_at(b: &BridgeHandle, topic: &str, payloads: &[String], qos: QoS) {
    let mut acks = Vec::new();
    for p in payloads {
        acks.push(
            b.offer(topic, &Bytes::from(p.clone()), qos, false, None)
                .expect("an out rule matches"),
        );
    }
    for a in acks {
        a.await.expect("spool writer answers").expect("committed");
    }
}

const CLOUD_MAX_PACKET: usize = 2048;

/// Ten normal messages, one the cloud cannot take (larger than its max_packet_size), ten more.
fn with_poison_in_the_middle() -> (Vec<String>, String) {
    let poison = format!("POISON-{}", "x".repeat(2 * CLOUD_MAX_PACKET));
    let mut all: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    all.push(poison.clone());
    all.extend((10..20).map(|i| i.to_string()));
    (all, poison)
}

/// A 3.1.1 link (the cloud cannot announce its Maximum Packet Size) with a message the
/// cloud disconnects us for, between normal ones. Returns what arrived.
async fn poison_case(name: &str, qos: QoS) -> Vec<usize> {
    let mut cloud = Cloud::start(&format!("max_packet_size {CLOUD_MAX_PACKET}"));
    let client = format!("{name}-counter");
    Subscriber::connect(cloud.port, &client, "plant-7/#")
        .await
        .disconnect()
        .await;
    cloud.stop();
    let run = run_bridge(bridge_config(
        name,
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        &format!("protocol = \"3.1.1\"\n{OUT_RULE}"),
    ))
    .await;
    let (all, poison) = with_poison_in_the_middle();
    let topic = format!("outpost/gw-1/sensors/q{}", qos as u8);
    offer_payloads_at(&run.bridge, &topic, &all, qos).await;
    assert_eq!(spooled(&run.bridge), 21);

    cloud.restart();
    let sub = Subscriber::connect(cloud.port, &client, "plant-7/#").await;
    wait_until("spool drained", Duration::from_secs(30), || {
        spooled(&run.bridge) == 0
    })
    .await;
    let seen = sub.wait_for(20, Duration::from_secs(5)).await;
    let stats = run.bridge.stats();
    assert_eq!(load(&stats.dropped_poison), 1, "{}", cloud.log());
    assert_eq!(load(&stats.dead_letters), 1);
    assert_eq!(load(&stats.forwarded), 20, "nothing else lost");
    assert!(
        load(&stats.reconnects) >= 3,
        "the cloud dropped the link at least three times before the message was set aside"
    );
    for other in [
        &stats.dropped_spool_full,
        &stats.dropped_too_large,
        &stats.dropped_refused,
        &stats.dropped_expired,
    ] {
        assert_eq!(load(other), 0);
    }
    let dead = run.bridge.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].topic, format!("plant-7/sensors/q{}", qos as u8));
    assert_eq!(
        &dead[0].payload[..],
        poison.as_bytes(),
        "kept byte for byte"
    );
    assert_eq!((dead[0].reason.as_str(), dead[0].strikes), ("poison", 3));
    let snapshot = stats.snapshot(0);
    assert!(snapshot.contains(&("dropped/poison", "1".to_string())));
    assert!(snapshot.contains(&("spool/dead_letters", "1".to_string())));
    assert!(run.bridge.is_connected(), "the link stays up afterwards");
    run.bridge.shutdown().await;
    numbers(&seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_qos2_message_is_dead_lettered_and_the_rest_arrive_exactly_once_in_order() {
    let arrived = poison_case("poison2", QoS::ExactlyOnce).await;
    assert_eq!(arrived, (0..20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_qos1_message_is_dead_lettered_and_the_rest_arrive_in_order() {
    let arrived = poison_case("poison1", QoS::AtLeastOnce).await;
    // Mosquitto drops us without sending the PUBACKs of what it took before the poison, so
    // those are sent again (QoS 1 is at least once); first arrivals are complete and in order.
    let mut first = Vec::new();
    for n in &arrived {
        if !first.contains(n) {
            first.push(*n);
        }
    }
    assert_eq!(first, (0..20).collect::<Vec<_>>(), "{arrived:?}");
    assert!(
        arrived.iter().filter(|n| **n >= 10).count() == 10,
        "nothing behind the poison is sent twice: {arrived:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_is_down_never_dead_letters_anything() {
    let mut cloud = Cloud::start("");
    let run = run_bridge(bridge_config(
        "down",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        OUT_RULE,
    ))
    .await;
    wait_until("connected", Duration::from_secs(10), || {
        run.bridge.is_connected()
    })
    .await;
    cloud.stop();
    offer_all(&run.bridge, 10, |_| QoS::AtLeastOnce).await;
    wait_until("several refused attempts", Duration::from_secs(15), || {
        load(&run.bridge.stats().connect_failures) >= 5
    })
    .await;
    assert_eq!(spooled(&run.bridge), 10, "all kept");
    assert_eq!(load(&run.bridge.stats().dropped_poison), 0);
    assert!(run.bridge.dead_letters().await.unwrap().is_empty());
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_above_a_5_0_clouds_maximum_packet_size_is_counted_too_large_without_reconnects() {
    let cloud = Cloud::start(&format!("max_packet_size {CLOUD_MAX_PACKET}"));
    let sub = Subscriber::connect(cloud.port, "toolarge-counter", "plant-7/#").await;
    let run = run_bridge(bridge_config(
        "toolarge",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        OUT_RULE,
    ))
    .await;
    let (all, _) = with_poison_in_the_middle();
    offer_payloads(&run.bridge, "outpost/gw-1/sensors/q1", &all).await;
    let seen = sub.wait_for(20, Duration::from_secs(15)).await;
    assert_eq!(numbers(&seen), (0..20).collect::<Vec<_>>());
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&run.bridge) == 0
    })
    .await;
    let stats = run.bridge.stats();
    assert_eq!(load(&stats.dropped_too_large), 1);
    assert_eq!(load(&stats.forwarded), 20);
    assert_eq!(
        load(&stats.reconnects),
        0,
        "known before sending: never sent"
    );
    assert_eq!(load(&stats.dropped_poison), 0);
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_and_pubrec_error_codes_are_counted_refused_and_the_rest_goes_on() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let acl = cloud_dir.path().join("acl");
    // Anonymous clients may write plant-7/ok/# only (and the status topic).
    std::fs::write(
        &acl,
        "topic readwrite outpost/#\ntopic read plant-7/#\ntopic write plant-7/ok/#\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(cloud_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&acl, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Mosquitto 2.0 disconnects a client after a refusal when max_queued_messages is 0.
    let cloud = Cloud::start(&format!(
        "acl_file {}\nmax_queued_messages 1000",
        acl.display()
    ));
    let sub = Subscriber::connect(cloud.port, "refused-counter", "plant-7/#").await;
    let rule = r##"topics = [{ pattern = "#", direction = "out", qos = 2, local_prefix = "outpost/gw-1/", remote_prefix = "plant-7/" }]"##;
    let run = run_bridge(bridge_config(
        "refused",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        rule,
    ))
    .await;
    let mut acks = Vec::new();
    for i in 0..12usize {
        // Every third is denied, alternating QoS 1 (PUBACK 0x87) and QoS 2 (PUBREC 0x87).
        let (topic, qos) = match i % 3 {
            0 if i % 2 == 0 => ("outpost/gw-1/denied/x", QoS::AtLeastOnce),
            0 => ("outpost/gw-1/denied/x", QoS::ExactlyOnce),
            1 => ("outpost/gw-1/ok/q1", QoS::AtLeastOnce),
            _ => ("outpost/gw-1/ok/q2", QoS::ExactlyOnce),
        };
        acks.push(
            run.bridge
                .offer(topic, &Bytes::from(i.to_string()), qos, false, None)
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    let allowed: Vec<usize> = (0..12).filter(|i| i % 3 != 0).collect();
    let seen = sub.wait_for(allowed.len(), Duration::from_secs(15)).await;
    let mut got = numbers(&seen);
    got.sort_unstable();
    assert_eq!(got, allowed, "{}", cloud.log());
    wait_until("spool drained", Duration::from_secs(10), || {
        spooled(&run.bridge) == 0
    })
    .await;
    let stats = run.bridge.stats();
    assert_eq!(load(&stats.dropped_refused), 4, "{}", cloud.log());
    assert_eq!(load(&stats.forwarded), allowed.len() as u64);
    assert_eq!(load(&stats.reconnects), 0);
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_never_counts_a_message_both_dropped_and_forwarded() {
    let mut cloud = Cloud::start("");
    Subscriber::connect(cloud.port, "fence-counter", "plant-7/#")
        .await
        .disconnect()
        .await;
    cloud.stop();
    // A slow replay keeps the backlog in the uplink's queue while new messages push the
    // spool past its bound, so drop-oldest hits rows the uplink already read.
    let extra = format!(
        "replay_rate = 4\n{OUT_RULE}\n[spool]\nmax_bytes = \"4KiB\"\nwhen_full = \"drop-oldest\"\n"
    );
    let run = run_bridge(bridge_config(
        "fence",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        &extra,
    ))
    .await;
    // 500 + 18 (topic) + 32 bytes each: seven fit in 4 KiB.
    let payload = |i: usize| format!("{i:0>500}");
    let backlog: Vec<String> = (0..7).map(payload).collect();
    offer_payloads(&run.bridge, "outpost/gw-1/sensors/q1", &backlog).await;
    cloud.restart();
    let sub = Subscriber::connect(cloud.port, "fence-counter", "plant-7/#").await;
    wait_until("connected", Duration::from_secs(10), || {
        run.bridge.is_connected()
    })
    .await;
    let fresh: Vec<String> = (7..12).map(payload).collect();
    offer_payloads(&run.bridge, "outpost/gw-1/sensors/q1", &fresh).await;
    wait_until("spool drained", Duration::from_secs(20), || {
        spooled(&run.bridge) == 0
    })
    .await;
    let seen = sub.wait_for(12, Duration::from_secs(1)).await;
    let arrived = numbers(&seen);
    let stats = run.bridge.stats();
    let (forwarded, dropped) = (load(&stats.forwarded), load(&stats.dropped_spool_full));
    // One per new message, less any room an acknowledgement freed first; at most two rows
    // go up before the new ones arrive, so rows the uplink had already read are dropped.
    assert!((3..=5).contains(&dropped), "dropped {dropped}");
    assert!(
        arrived.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate: {arrived:?}"
    );
    assert_eq!(
        forwarded as usize,
        arrived.len(),
        "forwarded counts what arrived"
    );
    assert_eq!(
        arrived.len() + dropped as usize,
        12,
        "each message counted once, dropped or forwarded: arrived {arrived:?}"
    );
    assert!(
        (7..12).all(|i| arrived.contains(&i)),
        "the newest are kept: {arrived:?}"
    );
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_disconnects_us_for_our_status_message_never_dead_letters_data() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let acl = cloud_dir.path().join("acl");
    // The status topic is forbidden; Mosquitto (max_queued_messages 0) then acknowledges
    // the birth with 0x87 and disconnects us, every session, like clouds that disconnect
    // clients publishing outside their policy.
    std::fs::write(&acl, "topic readwrite plant-7/#\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(cloud_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&acl, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cloud = Cloud::start(&format!("acl_file {}", acl.display()));
    let run = run_bridge(bridge_config(
        "badstatus",
        &format!("mqtt://127.0.0.1:{}", cloud.port),
        OUT_RULE,
    ))
    .await;
    offer_all(&run.bridge, 5, |_| QoS::AtLeastOnce).await;
    wait_until("many dropped sessions", Duration::from_secs(20), || {
        load(&run.bridge.stats().reconnects) >= 6
    })
    .await;
    let stats = run.bridge.stats();
    assert_eq!(load(&stats.dropped_poison), 0, "{}", cloud.log());
    assert!(run.bridge.dead_letters().await.unwrap().is_empty());
    assert_eq!(
        load(&stats.forwarded) + spooled(&run.bridge),
        5,
        "every message forwarded or still spooled"
    );
    run.bridge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_acks_our_status_then_disconnects_never_dead_letters_data() {
    let cloud = Cloud::start("");
    // Every session: the birth is acknowledged, then the link is closed.
    let proxy = CloseAfterFirstPuback::start(cloud.port).await;
    let run = run_bridge(bridge_config(
        "ackclose",
        &format!("mqtt://127.0.0.1:{}", proxy.port),
        OUT_RULE,
    ))
    .await;
    offer_all(&run.bridge, 5, |_| QoS::AtLeastOnce).await;
    wait_until("many dropped sessions", Duration::from_secs(20), || {
        load(&run.bridge.stats().reconnects) >= 6
    })
    .await;
    let stats = run.bridge.stats();
    assert_eq!(
        load(&stats.dropped_poison),
        0,
        "a message was blamed for the cloud's dislike of our status"
    );
    assert!(run.bridge.dead_letters().await.unwrap().is_empty());
    assert_eq!(spooled(&run.bridge), 5, "nothing acknowledged, all kept");
    run.bridge.shutdown().await;
}
