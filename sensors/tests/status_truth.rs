//! Device status that tells the truth: what a stop leaves in the retained status, a
//! reload that removes one device, and a Modbus TCP peer that closes the connection.
//! Devices are tokio-modbus servers on loopback; a serial sensor reads a socat pty.

mod common;

use common::*;
use outpost_sensors::{Farewell, SensorLayer, SensorMessage, Stats};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

const T: Duration = Duration::from_secs(5);

fn tcp_device(name: &str, addr: std::net::SocketAddr, unit: u8, retain: bool) -> String {
    format!(
        "[[sensors.modbus]]\nname = \"{name}\"\ntransport = {{ tcp = {{ host = \"127.0.0.1\", port = {} }} }}\nunit = {unit}\nevery = \"100ms\"\ntimeout = \"300ms\"\nretries = 0\nbackoff = \"100ms\"\npoints = [{{ name = \"v\", kind = \"holding\", address = 0, retain = {retain} }}]\n",
        addr.port()
    )
}

const HEAD: &str = "[sensors]\nstats_interval = \"0s\"\nclock = \"trusted\"\n";

/// Collects messages until `pred` holds for one, up to `within`.
async fn wait_for(
    rx: &mut mpsc::Receiver<SensorMessage>,
    log: &mut Vec<SensorMessage>,
    within: Duration,
    mut pred: impl FnMut(&SensorMessage) -> bool,
) -> Option<SensorMessage> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        log.push(m.clone());
        if pred(&m) {
            return Some(m);
        }
    }
}

fn json(m: &SensorMessage) -> Json {
    serde_json::from_slice(&m.payload).unwrap_or(Json::Null)
}

fn status_topic(device: &str) -> String {
    format!("outpost/gw/sensors/{device}/status")
}

/// Waits until every device in `devices` has said `online`.
async fn all_online(
    rx: &mut mpsc::Receiver<SensorMessage>,
    log: &mut Vec<SensorMessage>,
    devices: &[&str],
) {
    let mut pending: Vec<String> = devices.iter().map(|d| status_topic(d)).collect();
    while !pending.is_empty() {
        let m = wait_for(rx, log, T, |m| {
            pending.contains(&m.topic) && json(m)["status"] == "online"
        })
        .await
        .unwrap_or_else(|| panic!("never online: {pending:?}; saw {log:#?}"));
        pending.retain(|t| *t != m.topic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_leaves_every_device_offline_with_the_reason() {
    let sim = Sim::default();
    sim.set_holding(1, 0, &[7]);
    sim.set_holding(2, 0, &[8]);
    let a = tcp_sim(sim.clone()).await;
    let b = tcp_sim(sim.clone()).await;
    let pty = PtyPair::new();
    let cfg = format!(
        "{HEAD}{}{}[[sensors.serial]]\nname = \"meter\"\nport = \"{}\"\nformat = \"kv\"\n",
        tcp_device("boiler", a.addr, 1, true),
        tcp_device("pump", b.addr, 2, false),
        pty.a.display()
    );
    let mut layer = start(&cfg);
    let mut log = Vec::new();
    all_online(&mut layer.rx, &mut log, &["boiler", "pump", "meter"]).await;

    let stopping = Instant::now();
    layer.shutdown.send(true).unwrap();
    // Everything the layer publishes until it has gone: its channel then closes.
    let finished = tokio::time::timeout(T, async {
        while let Some(m) = layer.rx.recv().await {
            log.push(m);
        }
    })
    .await;
    assert!(finished.is_ok(), "the layer did not stop within {T:?}");
    layer.task.await.unwrap().unwrap();
    eprintln!("layer stopped in {:?}", stopping.elapsed());

    let last: HashMap<&str, &SensorMessage> = log.iter().map(|m| (m.topic.as_str(), m)).collect();
    for device in ["boiler", "pump", "meter"] {
        let m = last[status_topic(device).as_str()];
        let j = json(m);
        assert!(m.retain, "{device}: the status is retained");
        assert_eq!(j["status"], "offline", "{device}: {j}");
        assert_eq!(j["reason"], "gateway stopping", "{device}: {j}");
        assert!(j["error"].is_null(), "a clean stop is no fault: {j}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_clears_a_removed_device_and_leaves_unchanged_lines_alone() {
    let sim = Sim::default();
    for unit in 1..=3 {
        sim.set_holding(unit, 0, &[u16::from(unit) * 10]);
    }
    let line1 = tcp_sim(sim.clone()).await;
    let line2 = tcp_sim(sim.clone()).await;
    let keep1 = tcp_device("kiln", line1.addr, 1, false);
    let keep2 = tcp_device("fan", line2.addr, 2, false);
    let gone = tcp_device("press", line2.addr, 3, true);
    let (tx, mut rx) = mpsc::channel(1024);
    let (sd_tx, sd_rx) = watch::channel(false);
    let mut layer = SensorLayer::start(
        parse_config(&format!("{HEAD}{keep1}{keep2}{gone}")),
        "gw",
        tx,
        sd_rx,
        Arc::new(Stats::default()),
    )
    .unwrap();
    let mut log = Vec::new();
    all_online(&mut rx, &mut log, &["kiln", "fan", "press"]).await;
    wait_for(&mut rx, &mut log, T, |m| {
        m.topic == "outpost/gw/sensors/press/v" && json(m)["quality"] == "good"
    })
    .await
    .expect("a retained reading of press");

    // A broken new config changes nothing.
    let broken = parse_config(&format!("{HEAD}{keep1}"));
    let mut broken = broken;
    broken.topic_prefix = Some("bad/+/prefix".into());
    assert!(layer.reload(broken).await.is_err());

    let summary = layer
        .reload(parse_config(&format!("{HEAD}{keep1}{keep2}")))
        .await
        .unwrap();
    assert_eq!(summary.removed_devices, vec!["press".to_string()]);
    assert_eq!(
        summary.restarted,
        vec![format!("modbus line {}", line2.addr)]
    );
    assert_eq!(summary.unchanged, 1, "{summary:?}");

    // The removed device's retained status and retained reading are removed (zero-byte
    // retained publishes); the device that shares its line restarts and comes back.
    let mark = log.len();
    wait_for(&mut rx, &mut log, T, |m| {
        m.topic == status_topic("fan") && json(m)["status"] == "online"
    })
    .await
    .expect("fan back online after its line restarted");
    let after: Vec<&SensorMessage> = log[mark..].iter().collect();
    let cleared = |topic: &str| {
        after
            .iter()
            .any(|m| m.topic == topic && m.retain && m.payload.is_empty())
    };
    assert!(cleared(&status_topic("press")), "{after:#?}");
    assert!(cleared("outpost/gw/sensors/press/v"), "{after:#?}");
    let fan_restart = after
        .iter()
        .find(|m| m.topic == status_topic("fan"))
        .map(|m| json(m))
        .unwrap();
    assert_eq!(fan_restart["status"], "offline");
    assert_eq!(
        fan_restart["reason"],
        "restarting with a changed configuration"
    );
    // The unchanged line was not touched: no status of kiln since the reload.
    assert!(
        !after.iter().any(|m| m.topic == status_topic("kiln")),
        "{after:#?}"
    );
    // Nothing of press comes after its clearing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mark = log.len();
    wait_for(&mut rx, &mut log, Duration::from_millis(300), |_| false).await;
    assert!(
        !log[mark..].iter().any(|m| m.topic.contains("/press/")),
        "press still publishes: {:#?}",
        &log[mark..]
    );

    layer.stop(Farewell::gateway_stopping()).await;
    drop(sd_tx);
    while let Some(m) = rx.recv().await {
        log.push(m);
    }
    let last: HashMap<&str, &SensorMessage> = log.iter().map(|m| (m.topic.as_str(), m)).collect();
    for device in ["kiln", "fan"] {
        let j = json(last[status_topic(device).as_str()]);
        assert_eq!(
            (j["status"].as_str(), j["reason"].as_str()),
            (Some("offline"), Some("gateway stopping")),
            "{device}: {j}"
        );
    }
    assert!(last[status_topic("press").as_str()].payload.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_closes_the_connection_is_named_as_such() {
    let sim = Sim::default();
    sim.set_holding(1, 0, &[5]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let device = tokio::spawn(async move {
        let on_connected = |stream, peer| {
            let sim = sim.clone();
            async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, move |_| {
                    Ok(Some(sim.clone()))
                })
            }
        };
        // The abort drops every connection the server holds: the device hangs up.
        let _ = server
            .serve_until(&on_connected, |_| {}, async {
                let _ = close_rx.await;
            })
            .await;
    });
    let mut layer = start(&format!("{HEAD}{}", tcp_device("boiler", addr, 1, false)));
    let mut log = Vec::new();
    all_online(&mut layer.rx, &mut log, &["boiler"]).await;
    close_tx.send(()).unwrap();
    device.await.unwrap();
    let off = wait_for(&mut layer.rx, &mut log, T, |m| {
        m.topic == status_topic("boiler") && json(m)["status"] == "offline"
    })
    .await
    .expect("offline after the device hung up");
    assert_eq!(json(&off)["error"], "connection closed by device");
    let reading = wait_for(&mut layer.rx, &mut log, T, |m| {
        m.topic == "outpost/gw/sensors/boiler/v" && json(m)["quality"] == "bad"
    })
    .await
    .map(|m| json(&m))
    .expect("the point goes bad");
    assert_eq!(reading["reason"], "connection closed by device");
    layer.stop().await;
}
