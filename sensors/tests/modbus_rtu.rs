//! Modbus RTU over a socat pty pair with tokio-modbus's RTU server on the other end.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

fn rtu(port: &std::path::Path, devices: &str) -> String {
    format!(
        "[sensors]\nstats_interval = \"0s\"\nclock = \"trusted\"\n{}",
        devices.replace("PORT", &port.to_string_lossy())
    )
}

#[tokio::test]
async fn coalesced_reads_on_a_serial_line_with_bus_statistics() {
    let pty = PtyPair::new();
    let sim = Sim::default();
    sim.set_holding(3, 0, &[0x4148, 0x0000, 7, 0xFFFF]);
    sim.set_input(3, 10, &[1234]);
    let _srv = rtu_sim(sim.clone(), &pty.b);
    let cfg = rtu(
        &pty.a,
        r#"
[[sensors.modbus]]
name = "meter"
transport = { rtu = { port = "PORT", baud = 19200, parity = "even" } }
unit = 3
every = "100ms"
address_base = 1
points = [
  { name = "power", kind = "holding", address = 1, type = "f32" },
  { name = "count", kind = "holding", address = 3, type = "u16" },
  { name = "neg", kind = "holding", address = 4, type = "i16" },
  { name = "volts", kind = "input", address = 11, scale = 0.1 },
]
"#,
    );
    let mut layer = start(&cfg);
    let p = layer
        .seen_or_wait(T, "outpost/gw/sensors/meter/power", |_| true)
        .await
        .unwrap();
    assert_eq!(p["value"], 12.5, "{p}");
    let n = layer
        .seen_or_wait(T, "outpost/gw/sensors/meter/neg", |_| true)
        .await
        .unwrap();
    assert_eq!(n["value"], -1);
    let v = layer
        .seen_or_wait(T, "outpost/gw/sensors/meter/volts", |_| true)
        .await
        .unwrap();
    assert!((v["value"].as_f64().unwrap() - 123.4).abs() < 1e-9, "{v}");
    layer.drain_for(Duration::from_millis(500)).await;
    let seen = sim.seen();
    let mut shapes: Vec<(u8, u8, u16, u16)> = seen
        .iter()
        .map(|s| (s.unit, s.fc, s.start, s.count))
        .collect();
    shapes.sort();
    shapes.dedup();
    // 1-based addresses 1..=4 are wire addresses 0..=3: one FC3 and one FC4 per cycle.
    assert_eq!(shapes, vec![(3, 3, 0, 4), (3, 4, 10, 1)]);
    let lines = layer.stats.lines();
    let line = &lines[0];
    assert!(line.requests.load(Ordering::Relaxed) >= 4);
    assert!(
        line.bytes_tx.load(Ordering::Relaxed) >= 16,
        "8-byte read requests were counted"
    );
    assert!(line.wire_utilisation() > 0.0 && line.wire_utilisation() < 1.0);
    layer.stop().await;
}

#[tokio::test]
async fn a_dead_unit_does_not_delay_a_live_one_beyond_its_timeout_slot() {
    let pty = PtyPair::new();
    let sim = Sim::default();
    sim.set_holding(1, 0, &[5]);
    sim.set_dead(2, true);
    let _srv = rtu_sim(sim.clone(), &pty.b);
    // Worst case: the dead unit is retried often (short backoff, no quarantine).
    let cfg = rtu(
        &pty.a,
        r#"
[[sensors.modbus]]
name = "live"
transport = { rtu = { port = "PORT", baud = 19200 } }
unit = 1
every = "100ms"
timeout = "300ms"
points = [{ name = "v", kind = "holding", address = 0, report = "every" }]
[[sensors.modbus]]
name = "dead"
transport = { rtu = { port = "PORT", baud = 19200 } }
unit = 2
every = "100ms"
timeout = "150ms"
retries = 0
backoff = "50ms"
max_backoff = "50ms"
quarantine_after = 1000
points = [{ name = "v", kind = "holding", address = 0 }]
"#,
    );
    let mut layer = start(&cfg);
    layer.drain_for(Duration::from_millis(2000)).await;
    let live: Vec<Instant> = layer
        .log
        .iter()
        .filter(|(_, m)| m.topic == "outpost/gw/sensors/live/v")
        .map(|(t, _)| *t)
        .collect();
    // No timings asserted (this machine's load moves them): the property is the order
    // on the wire. Between two polls of the live unit the dead one gets at most one try
    // (one timeout slot), however late the timers fire.
    assert!(live.len() >= 3, "live unit reported {} times", live.len());
    let order: Vec<u8> = sim.seen().iter().map(|s| s.unit).collect();
    let mut dead_run = 0;
    let mut worst_run = 0;
    let mut after_first_live = false;
    for unit in &order {
        if *unit == 1 {
            after_first_live = true;
            dead_run = 0;
        } else if after_first_live {
            dead_run += 1;
            worst_run = worst_run.max(dead_run);
        }
    }
    if let Some(worst) = live.windows(2).map(|w| w[1] - w[0]).max() {
        eprintln!("worst live gap {worst:?} (informative)");
    }
    assert!(
        worst_run <= 1,
        "the dead unit got {worst_run} tries in a row between live polls: {order:?}"
    );
    let dead_tries = sim.seen().iter().filter(|s| s.unit == 2).count();
    assert!(
        dead_tries >= 4,
        "the dead unit was tried {dead_tries} times"
    );
    let st = layer.last("outpost/gw/sensors/dead/status").unwrap();
    assert_eq!(st["status"], "offline");
    assert_eq!(
        layer.last("outpost/gw/sensors/live/status").unwrap()["status"],
        "online"
    );
    assert!(layer.stats.total(|l| &l.timeouts) >= 4);
    layer.stop().await;
}

#[tokio::test]
async fn garbage_and_crc_errors_mark_the_point_bad_and_polling_continues() {
    let pty = PtyPair::new();
    // A broken slave: answers every request with a frame whose CRC is wrong, then with noise.
    let b = pty.b.clone();
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&requests);
    let responder = tokio::spawn(async move {
        use tokio_serial::SerialPortBuilderExt;
        let mut port = tokio_serial::new(b.to_string_lossy(), 9600)
            .open_native_async()
            .unwrap();
        let mut buf = [0u8; 256];
        loop {
            let Ok(n) = port.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            let k = counter.fetch_add(1, Ordering::Relaxed);
            let reply: &[u8] = if k.is_multiple_of(2) {
                &[0x01, 0x03, 0x02, 0x00, 0x2A, 0xDE, 0xAD]
            } else {
                &[0x55, 0xFF, 0x00]
            };
            let _ = port.write_all(reply).await;
        }
    });
    let cfg = rtu(
        &pty.a,
        r#"
[[sensors.modbus]]
name = "noisy"
transport = { rtu = { port = "PORT", baud = 38400 } }
every = "100ms"
timeout = "150ms"
retries = 1
backoff = "50ms"
max_backoff = "100ms"
points = [{ name = "v", kind = "holding", address = 0 }]
"#,
    );
    let mut layer = start(&cfg);
    let bad = layer
        .wait_json(T, "outpost/gw/sensors/noisy/v", |_| true)
        .await
        .unwrap();
    assert_eq!(bad["quality"], "bad");
    let reason = bad["reason"].as_str().unwrap();
    assert!(
        reason == "timeout" || reason.starts_with("transport error"),
        "{reason}"
    );
    layer.drain_for(Duration::from_millis(800)).await;
    assert!(
        requests.load(Ordering::Relaxed) >= 4,
        "the poller carried on"
    );
    assert!(!layer.task.is_finished());
    layer.stop().await;
    responder.abort();
}

#[tokio::test]
async fn write_back_over_rtu() {
    let pty = PtyPair::new();
    let sim = Sim::default();
    let _srv = rtu_sim(sim.clone(), &pty.b);
    let cfg = rtu(
        &pty.a,
        r#"
[[sensors.modbus]]
name = "vfd"
transport = { rtu = { port = "PORT", baud = 19200 } }
unit = 5
every = "200ms"
points = [
  { name = "run", kind = "coil", address = 0, writable = true },
  { name = "speed", kind = "holding", address = 1, type = "u16", scale = 0.01, unit = "Hz", writable = true },
  { name = "ramp", kind = "holding", address = 2, type = "u32", writable = true },
]
"#,
    );
    let mut layer = start(&cfg);
    layer
        .seen_or_wait(T, "outpost/gw/sensors/vfd/speed", |_| true)
        .await
        .unwrap();
    layer.command("outpost/gw/sensors/vfd/run/set", "1").await;
    layer
        .command("outpost/gw/sensors/vfd/speed/set", "{\"value\": 50.0}")
        .await;
    layer
        .command("outpost/gw/sensors/vfd/ramp/set", "70000")
        .await;
    for p in ["run", "speed", "ramp"] {
        let r = layer
            .wait_json(T, &format!("outpost/gw/sensors/vfd/{p}/set/result"), |_| {
                true
            })
            .await
            .unwrap();
        assert_eq!(r["ok"], true, "{p}: {r}");
    }
    let writes: Vec<_> = sim
        .writes()
        .into_iter()
        .map(|(u, r)| (u, summary(&r)))
        .collect();
    assert_eq!(
        writes,
        vec![(5, (5, 0, 1)), (5, (6, 1, 1)), (5, (16, 2, 2))]
    );
    assert_eq!(
        sim.bank(5, |b| (
            b.holding.get(&1).copied(),
            b.holding.get(&2).copied(),
            b.holding.get(&3).copied()
        )),
        (Some(5000), Some(1), Some(4464))
    );
    let speed = layer
        .wait_json(T, "outpost/gw/sensors/vfd/speed", |j| j["value"] == 50.0)
        .await;
    assert!(speed.is_some(), "written speed read back");
    layer.stop().await;
}
