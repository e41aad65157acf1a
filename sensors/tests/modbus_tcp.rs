//! Modbus TCP against tokio-modbus's server: types and orders, coalescing, report by exception,
//! exceptions, write-back, quarantine and recovery.

mod common;

use common::*;
use serde_json::Value as Json;
use std::time::Duration;
use tokio_modbus::{ExceptionCode, Request};

const T: Duration = Duration::from_secs(5);

fn device(addr: std::net::SocketAddr, extra: &str, points: &str) -> String {
    let timeout = if extra.contains("timeout") {
        ""
    } else {
        "timeout = \"300ms\""
    };
    format!(
        "[sensors]\nstats_interval = \"0s\"\nclock = \"trusted\"\n[[sensors.modbus]]\nname = \"dev\"\ntransport = {{ tcp = {{ host = \"127.0.0.1\", port = {} }} }}\nunit = 1\n{timeout}\n{extra}\npoints = [\n{points}\n]\n",
        addr.port()
    )
}

fn topic(point: &str) -> String {
    format!("outpost/gw/sensors/dev/{point}")
}

#[tokio::test]
async fn every_type_and_order_decodes() {
    let sim = Sim::default();
    // f32 1.5 in the four orders.
    sim.set_holding(1, 0, &[0x3FC0, 0x0000]);
    sim.set_holding(1, 2, &[0x0000, 0x3FC0]);
    sim.set_holding(1, 4, &[0xC03F, 0x0000]);
    sim.set_holding(1, 6, &[0x0000, 0xC03F]);
    // u64 0x0102030405060708 in the four 64-bit orders.
    sim.set_holding(1, 10, &[0x0102, 0x0304, 0x0506, 0x0708]);
    sim.set_holding(1, 14, &[0x0708, 0x0506, 0x0304, 0x0102]);
    sim.set_holding(1, 18, &[0x0201, 0x0403, 0x0605, 0x0807]);
    sim.set_holding(1, 22, &[0x0807, 0x0605, 0x0403, 0x0201]);
    // i16 -2, u16 65535, i32 -100000 (CDAB), u32 3e9, i64 -1, f64 -2.5, string "OUTPOST", bit 4 of 0x0010.
    sim.set_holding(1, 30, &[0xFFFE, 0xFFFF]);
    let i32v = (-100_000i32) as u32;
    sim.set_holding(1, 32, &[(i32v & 0xFFFF) as u16, (i32v >> 16) as u16]);
    sim.set_holding(
        1,
        34,
        &[
            (3_000_000_000u32 >> 16) as u16,
            (3_000_000_000u32 & 0xFFFF) as u16,
        ],
    );
    sim.set_holding(1, 36, &[0xFFFF; 4]);
    sim.set_holding(1, 40, &[0xC004, 0, 0, 0]);
    sim.set_holding(1, 44, &[0x4F55, 0x5450, 0x4F53, 0x5400]);
    sim.set_holding(1, 48, &[0x0010]);
    sim.set_input(1, 0, &[650]);
    sim.bank(1, |b| {
        b.coils.insert(3, true);
        b.discrete.insert(7, true);
    });
    let srv = tcp_sim(sim.clone()).await;
    let points = r#"
{ name = "f_abcd", kind = "holding", address = 0, type = "f32", word_order = "ABCD" },
{ name = "f_cdab", kind = "holding", address = 2, type = "f32", word_order = "CDAB" },
{ name = "f_badc", kind = "holding", address = 4, type = "f32", word_order = "BADC" },
{ name = "f_dcba", kind = "holding", address = 6, type = "f32", word_order = "DCBA" },
{ name = "u64_abcdefgh", kind = "holding", address = 10, type = "u64", word_order = "ABCDEFGH" },
{ name = "u64_ghefcdab", kind = "holding", address = 14, type = "u64", word_order = "GHEFCDAB" },
{ name = "i64_badcfehg", kind = "holding", address = 18, type = "i64", word_order = "BADCFEHG" },
{ name = "u64_hgfedcba", kind = "holding", address = 22, type = "u64", word_order = "little", byte_order = "little" },
{ name = "i16", kind = "holding", address = 30, type = "i16" },
{ name = "u16", kind = "holding", address = 31, type = "u16" },
{ name = "i32", kind = "holding", address = 32, type = "i32", word_order = "little" },
{ name = "u32", kind = "holding", address = 34, type = "u32" },
{ name = "i64", kind = "holding", address = 36, type = "i64" },
{ name = "f64", kind = "holding", address = 40, type = "f64" },
{ name = "text", kind = "holding", address = 44, type = "string", length = 4 },
{ name = "flag", kind = "holding", address = 48, type = "bit", bit = 4 },
{ name = "temp", kind = "input", address = 0, type = "i16", scale = 0.1, offset = -40.0, unit = "°C" },
{ name = "coil", kind = "coil", address = 3 },
{ name = "di", kind = "discrete", address = 7 },
"#;
    let mut layer = start(&device(srv.addr, "every = \"100ms\"", points));
    let expect: Vec<(&str, Json)> = vec![
        ("f_abcd", 1.5.into()),
        ("f_cdab", 1.5.into()),
        ("f_badc", 1.5.into()),
        ("f_dcba", 1.5.into()),
        ("u64_abcdefgh", 0x0102_0304_0506_0708u64.into()),
        ("u64_ghefcdab", 0x0102_0304_0506_0708u64.into()),
        ("i64_badcfehg", 0x0102_0304_0506_0708i64.into()),
        ("u64_hgfedcba", 0x0102_0304_0506_0708u64.into()),
        ("i16", (-2).into()),
        ("u16", 65535.into()),
        ("i32", (-100_000).into()),
        ("u32", 3_000_000_000u64.into()),
        ("i64", (-1).into()),
        ("f64", (-2.5).into()),
        ("text", "OUTPOST".into()),
        ("flag", true.into()),
        ("coil", true.into()),
        ("di", true.into()),
    ];
    for (name, value) in &expect {
        let j = layer
            .seen_or_wait(T, &topic(name), |_| true)
            .await
            .unwrap_or_else(|| panic!("no reading for {name}"));
        assert_eq!(j["quality"], "good", "{name}: {j}");
        assert_eq!(&j["value"], value, "{name}: {j}");
        assert!(
            j["ts"].as_str().is_some(),
            "{name}: trusted clock stamps readings"
        );
    }
    let t = layer
        .seen_or_wait(T, &topic("temp"), |_| true)
        .await
        .unwrap();
    assert!((t["value"].as_f64().unwrap() - 25.0).abs() < 1e-9, "{t}");
    assert_eq!(t["unit"], "°C");
    layer.stop().await;
}

#[tokio::test]
async fn adjacent_points_are_read_in_one_request() {
    let sim = Sim::default();
    let srv = tcp_sim(sim.clone()).await;
    // Holding 0..=7 (with a 2-register hole at 4..5, inside max_gap), holding 100 (too far), input 0..=3, coils 0 and 5.
    let points = r#"
{ name = "a", kind = "holding", address = 0, type = "u32" },
{ name = "b", kind = "holding", address = 2, type = "u16" },
{ name = "c", kind = "holding", address = 3, type = "u16" },
{ name = "d", kind = "holding", address = 6, type = "u32" },
{ name = "far", kind = "holding", address = 100 },
{ name = "i", kind = "input", address = 0, type = "f64" },
{ name = "c0", kind = "coil", address = 0 },
{ name = "c5", kind = "coil", address = 5 },
"#;
    let mut layer = start(&device(srv.addr, "every = \"200ms\"\nmax_gap = 4", points));
    layer.drain_for(Duration::from_millis(1100)).await;
    layer.stop().await;
    let seen = sim.seen();
    let mut shapes: Vec<(u8, u16, u16)> = seen.iter().map(|s| (s.fc, s.start, s.count)).collect();
    let cycles = seen.iter().filter(|s| s.fc == 3 && s.start == 0).count();
    assert!(cycles >= 3, "polled {cycles} cycles");
    shapes.sort();
    shapes.dedup();
    assert_eq!(
        shapes,
        vec![(1, 0, 6), (3, 0, 8), (3, 100, 1), (4, 0, 4)],
        "exact request plan"
    );
    // Four requests per cycle, no more.
    assert!(
        seen.len() <= cycles * 4 + 4,
        "{} requests for {cycles} cycles",
        seen.len()
    );
}

#[tokio::test]
async fn deadband_and_heartbeat() {
    let sim = Sim::default();
    sim.set_holding(1, 0, &[100]);
    let srv = tcp_sim(sim.clone()).await;
    let points =
        r#"{ name = "level", kind = "holding", address = 0, deadband = 5.0, heartbeat = "600ms" }"#;
    let mut layer = start(&device(srv.addr, "every = \"50ms\"", points));
    let first = layer.wait_json(T, &topic("level"), |_| true).await.unwrap();
    assert_eq!(first["value"], 100);
    // Within the deadband: nothing for a while (well under the heartbeat).
    sim.set_holding(1, 0, &[103]);
    let quiet = layer
        .wait_json(Duration::from_millis(350), &topic("level"), |_| true)
        .await;
    assert!(
        quiet.is_none(),
        "change inside the deadband was reported: {quiet:?}"
    );
    sim.set_holding(1, 0, &[106]);
    let moved = layer.wait_json(T, &topic("level"), |_| true).await.unwrap();
    assert_eq!(moved["value"], 106);
    // Steady value: the heartbeat still reports it, about every 600 ms.
    let t0 = std::time::Instant::now();
    let hb = layer.wait_json(T, &topic("level"), |_| true).await.unwrap();
    let waited = t0.elapsed();
    assert_eq!(hb["value"], 106);
    assert!(
        waited >= Duration::from_millis(400) && waited <= Duration::from_millis(1200),
        "heartbeat after {waited:?}"
    );
    layer.stop().await;
}

#[tokio::test]
async fn every_poll_mode_reports_each_poll() {
    let sim = Sim::default();
    let srv = tcp_sim(sim.clone()).await;
    let points = r#"{ name = "v", kind = "holding", address = 0, report = "every" }"#;
    let mut layer = start(&device(srv.addr, "every = \"50ms\"", points));
    layer.drain_for(Duration::from_millis(600)).await;
    let n = layer
        .log
        .iter()
        .filter(|(_, m)| m.topic == topic("v"))
        .count();
    assert!(n >= 6, "only {n} reports in 600ms at 50ms polls");
    layer.stop().await;
}

#[tokio::test]
async fn exceptions_mark_points_bad_and_coalesced_reads_split() {
    let sim = Sim::default();
    sim.set_holding(1, 0, &[11]);
    sim.set_holding(1, 2, &[22]);
    sim.bank(1, |b| {
        b.faults.insert(1, ExceptionCode::IllegalDataAddress);
        b.faults.insert(50, ExceptionCode::ServerDeviceFailure);
    });
    let srv = tcp_sim(sim.clone()).await;
    let points = r#"
{ name = "a", kind = "holding", address = 0 },
{ name = "b", kind = "holding", address = 2 },
{ name = "broken", kind = "holding", address = 50 },
{ name = "nan", kind = "holding", address = 60, type = "f32" },
{ name = "ranged", kind = "holding", address = 70, max = 10.0 },
"#;
    sim.set_holding(1, 60, &[0x7FC0, 0]);
    sim.set_holding(1, 70, &[11]);
    let mut layer = start(&device(srv.addr, "every = \"100ms\"", points));
    let broken = layer
        .wait_json(T, &topic("broken"), |_| true)
        .await
        .unwrap();
    assert_eq!(broken["quality"], "bad");
    assert!(
        broken["reason"]
            .as_str()
            .unwrap()
            .contains("Server device failure"),
        "{broken}"
    );
    assert!(broken["value"].is_null());
    // The read 0..=2 spans the faulty hole at 1: the poller splits it and a/b come good.
    let a = layer
        .wait_json(T, &topic("a"), |j| j["quality"] == "good")
        .await
        .unwrap();
    assert_eq!(a["value"], 11);
    let b = layer
        .wait_json(T, &topic("b"), |j| j["quality"] == "good")
        .await
        .unwrap();
    assert_eq!(b["value"], 22);
    let nan = layer
        .seen_or_wait(T, &topic("nan"), |_| true)
        .await
        .unwrap();
    assert_eq!(
        (nan["quality"].as_str(), nan["reason"].as_str()),
        (Some("bad"), Some("not a number"))
    );
    let r = layer
        .seen_or_wait(T, &topic("ranged"), |_| true)
        .await
        .unwrap();
    assert_eq!(r["quality"], "bad");
    assert!(
        r["reason"].as_str().unwrap().starts_with("out of range"),
        "{r}"
    );
    // An exception is an answer: the device stays online.
    let status = layer.last("outpost/gw/sensors/dev/status").unwrap();
    assert_eq!(status["status"], "online");
    assert!(layer.stats.total(|l| &l.exceptions) >= 2);
    layer.stop().await;
}

#[tokio::test]
async fn write_back_with_function_codes_5_6_15_16() {
    let sim = Sim::default();
    let srv = tcp_sim(sim.clone()).await;
    let points = r#"
{ name = "pump", kind = "coil", address = 1, writable = true },
{ name = "valve", kind = "coil", address = 2, writable = true, write_function = 15 },
{ name = "setpoint", kind = "holding", address = 10, scale = 0.1, writable = true, max = 100.0 },
{ name = "limit", kind = "holding", address = 11, writable = true, write_function = 16 },
{ name = "target", kind = "holding", address = 20, type = "f32", word_order = "CDAB", writable = true },
{ name = "readonly", kind = "holding", address = 30 },
"#;
    let mut layer = start(&device(srv.addr, "every = \"100ms\"", points));
    layer
        .wait_json(T, &topic("setpoint"), |_| true)
        .await
        .unwrap();
    let set = |p: &str| format!("outpost/gw/sensors/dev/{p}/set");
    let result = |p: &str| format!("outpost/gw/sensors/dev/{p}/set/result");
    layer.command(&set("pump"), "true").await;
    layer
        .command(&set("valve"), r#"{"value": "on", "id": 7}"#)
        .await;
    layer.command(&set("setpoint"), "21.5").await;
    // An integer register rounds; the result says what was written, not what was asked.
    layer.command(&set("limit"), "299.6").await;
    layer.command(&set("target"), "-3.25").await;
    for p in ["pump", "valve", "setpoint", "limit", "target"] {
        let r = layer
            .wait_json(T, &result(p), |_| true)
            .await
            .unwrap_or_else(|| panic!("no result for {p}"));
        assert_eq!(r["ok"], true, "{p}: {r}");
        if p == "valve" {
            assert_eq!(r["id"], 7);
        }
        if p == "limit" {
            assert_eq!(r["value"].as_f64(), Some(300.0), "{r}");
        }
    }
    let writes: Vec<Request<'static>> = sim.writes().into_iter().map(|(_, r)| r).collect();
    assert!(
        writes.contains(&Request::WriteSingleCoil(1, true)),
        "{writes:?}"
    );
    assert!(
        writes.contains(&Request::WriteMultipleCoils(2, vec![true].into())),
        "{writes:?}"
    );
    assert!(
        writes.contains(&Request::WriteSingleRegister(10, 215)),
        "{writes:?}"
    );
    assert!(
        writes.contains(&Request::WriteMultipleRegisters(11, vec![300].into())),
        "{writes:?}"
    );
    // -3.25f32 = 0xC0500000, CDAB puts the low word first.
    assert!(
        writes.contains(&Request::WriteMultipleRegisters(
            20,
            vec![0x0000, 0xC050].into()
        )),
        "{writes:?}"
    );
    // The written value is read back and reported.
    let sp = layer
        .wait_json(T, &topic("setpoint"), |j| {
            j["value"].as_f64().is_some_and(|v| (v - 21.5).abs() < 1e-9)
        })
        .await;
    assert!(sp.is_some(), "new setpoint was not reported");
    // Refusals: read-only, out of range, garbage, unknown point.
    layer.command(&set("readonly"), "1").await;
    let r = layer
        .wait_json(T, &result("readonly"), |_| true)
        .await
        .unwrap();
    assert_eq!(
        (r["ok"].as_bool(), r["error"].as_str()),
        (Some(false), Some("point is not writable"))
    );
    layer.command(&set("setpoint"), "150").await;
    let r = layer
        .wait_json(T, &result("setpoint"), |_| true)
        .await
        .unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("out of range"), "{r}");
    layer.command(&set("pump"), "maybe").await;
    let r = layer.wait_json(T, &result("pump"), |_| true).await.unwrap();
    assert_eq!(r["ok"], false);
    layer.command(&set("nosuch"), "1").await;
    let r = layer
        .wait_json(T, &result("nosuch"), |_| true)
        .await
        .unwrap();
    assert_eq!(r["error"], "unknown point");
    let writes_after = sim.writes().len();
    assert_eq!(writes_after, 5, "refused writes must not reach the device");
    layer.stop().await;
}

#[tokio::test]
async fn failing_device_backs_off_is_quarantined_and_recovers() {
    let sim = Sim::default();
    sim.set_holding(1, 0, &[42]);
    sim.set_dead(1, true);
    let srv = tcp_sim(sim.clone()).await;
    let extra = "every = \"50ms\"\ntimeout = \"100ms\"\nretries = 0\nbackoff = \"50ms\"\nmax_backoff = \"100ms\"\nquarantine_after = 3\nquarantine = \"700ms\"";
    let mut layer = start(&device(
        srv.addr,
        extra,
        r#"{ name = "v", kind = "holding", address = 0 }"#,
    ));
    let status = "outpost/gw/sensors/dev/status";
    let off = layer.wait_json(T, status, |_| true).await.unwrap();
    assert_eq!(off["status"], "offline");
    assert_eq!(off["error"], "timeout");
    let bad = layer.seen_or_wait(T, &topic("v"), |_| true).await.unwrap();
    assert_eq!(
        (bad["quality"].as_str(), bad["reason"].as_str()),
        (Some("bad"), Some("timeout"))
    );
    layer
        .wait_json(T, status, |j| j["status"] == "quarantined")
        .await
        .expect("quarantined");
    let q_at = std::time::Instant::now();
    let before = sim.seen().len();
    // Quarantine: at most one probe in 500ms.
    layer.drain_for(Duration::from_millis(500)).await;
    let probes = sim.seen().len() - before;
    assert!(
        probes <= 1,
        "{probes} requests to a quarantined device within 500ms"
    );
    sim.set_dead(1, false);
    let on = layer
        .wait_json(T, status, |j| j["status"] == "online")
        .await
        .expect("recovers");
    // Online means no current error: the retained status must not keep naming the old one.
    assert!(on["error"].is_null(), "{on}");
    assert!(q_at.elapsed() >= Duration::from_millis(500));
    let good = layer
        .wait_json(T, &topic("v"), |j| j["quality"] == "good")
        .await
        .unwrap();
    assert_eq!(good["value"], 42);
    layer.stop().await;
}

#[tokio::test]
async fn connection_refused_is_reported_not_fatal() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut layer = start(&device(
        addr,
        "every = \"100ms\"\nbackoff = \"100ms\"",
        r#"{ name = "v", kind = "holding", address = 0 }"#,
    ));
    let st = layer
        .wait_json(T, "outpost/gw/sensors/dev/status", |_| true)
        .await
        .unwrap();
    assert_eq!(st["status"], "offline");
    assert!(
        st["error"].as_str().unwrap().starts_with("connect failed"),
        "{st}"
    );
    layer.stop().await;
}

#[tokio::test]
async fn sys_counters_are_published_through_the_output() {
    let sim = Sim::default();
    let srv = tcp_sim(sim.clone()).await;
    let cfg = device(
        srv.addr,
        "every = \"50ms\"",
        r#"{ name = "v", kind = "holding", address = 0 }"#,
    )
    .replace("stats_interval = \"0s\"", "stats_interval = \"300ms\"");
    let mut layer = start(&cfg);
    let req = layer
        .wait_for(T, |m| {
            m.topic == "$SYS/broker/sensors/requests"
                && std::str::from_utf8(&m.payload)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
        })
        .await
        .expect("request counter");
    assert!(req.retain);
    let line_topic = format!("$SYS/broker/sensors/lines/127.0.0.1:{}", srv.addr.port());
    let line = layer
        .seen_or_wait(T, &line_topic, |_| true)
        .await
        .expect("per-line counters");
    assert!(line["requests"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["errors"]["timeout"], 0);
    let u = line["utilisation"].as_f64().unwrap();
    assert!(u > 0.0 && u < 1.0, "{line}");
    layer.stop().await;
}

#[tokio::test]
async fn timestamps_follow_the_kernel_clock_state() {
    let sim = Sim::default();
    let srv = tcp_sim(sim.clone()).await;
    let cfg = device(
        srv.addr,
        "every = \"100ms\"",
        r#"{ name = "v", kind = "holding", address = 0 }"#,
    )
    .replace("clock = \"trusted\"", "clock = \"auto\"");
    let mut layer = start(&cfg);
    let j = layer.seen_or_wait(T, &topic("v"), |_| true).await.unwrap();
    let synced = outpost_sensors::clock::read_kernel_clock()
        .is_some_and(outpost_sensors::clock::is_synchronised);
    if synced {
        assert!(j["ts"].as_str().is_some_and(|t| t.starts_with("20")), "{j}");
    } else {
        assert!(
            j["ts"].is_null(),
            "an unsynchronised clock must not stamp a date: {j}"
        );
        assert_eq!(j["clock"], "unsynchronised");
        assert!(j["uptime_ms"].as_u64().is_some_and(|ms| ms > 0), "{j}");
    }
    layer.stop().await;
}

#[tokio::test]
async fn run_refuses_an_invalid_config() {
    let src = "[sensors]\n[[sensors.modbus]]\nname = \"a\"\ntransport = { tcp = { host = \"h\" } }\n[[sensors.serial]]\nname = \"a\"\nport = \"/dev/null\"\nformat = \"kv\"\n";
    #[derive(serde::Deserialize)]
    struct Root {
        sensors: outpost_sensors::SensorsConfig,
    }
    let config = toml::from_str::<Root>(src).unwrap().sensors;
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let (_c, crx) = tokio::sync::mpsc::channel(1);
    let (_s, srx) = tokio::sync::watch::channel(false);
    let err = outpost_sensors::run(config, "gw".into(), tx, crx, srx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("sensors.serial[0].name"), "{err}");
}
