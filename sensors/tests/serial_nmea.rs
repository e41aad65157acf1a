//! A serial line sensor over a socat pty pair: NMEA (with bad checksums), other formats, replug.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_serial::SerialPortBuilderExt;

const T: Duration = Duration::from_secs(5);

fn sensor(port: &std::path::Path, body: &str) -> String {
    format!(
        "[sensors]\nstats_interval = \"0s\"\nclock = \"trusted\"\n[[sensors.serial]]\nname = \"gps\"\nport = \"{}\"\nbaud = 9600\nreopen_backoff = \"100ms\"\nmax_reopen_backoff = \"200ms\"\n{body}\n",
        port.display()
    )
}

fn feeder(path: &std::path::Path) -> tokio_serial::SerialStream {
    tokio_serial::new(path.to_string_lossy(), 9600)
        .open_native_async()
        .unwrap()
}

#[tokio::test]
async fn nmea_positions_and_bad_checksums() {
    let pty = PtyPair::new();
    let mut layer = start(&sensor(&pty.a, "format = \"nmea\""));
    let status = layer
        .wait_json(T, "outpost/gw/sensors/gps/status", |_| true)
        .await
        .unwrap();
    assert_eq!(status["status"], "online");
    let mut tx = feeder(&pty.b);
    tx.write_all(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n$GPGSV,1,1,00*79\r\n").await.unwrap();
    tx.write_all(b"$GPRMC,123519,A,4807.038,N,01131.000,W,022.4,084.4,230394,003.1,W*78\r\n")
        .await
        .unwrap();
    let lat = layer
        .seen_or_wait(T, "outpost/gw/sensors/gps/latitude", |_| true)
        .await
        .unwrap();
    assert!(
        (lat["value"].as_f64().unwrap() - 48.1173).abs() < 1e-4,
        "{lat}"
    );
    assert_eq!(lat["quality"], "good");
    let fix = layer
        .seen_or_wait(T, "outpost/gw/sensors/gps/fix_quality", |_| true)
        .await
        .unwrap();
    assert_eq!(fix["value"], 1);
    let sats = layer
        .seen_or_wait(T, "outpost/gw/sensors/gps/satellites", |_| true)
        .await
        .unwrap();
    assert_eq!(sats["value"], 8);
    let speed = layer
        .seen_or_wait(T, "outpost/gw/sensors/gps/speed_knots", |_| true)
        .await
        .unwrap();
    assert_eq!(speed["value"], 22.4);
    let lon = layer
        .seen_or_wait(T, "outpost/gw/sensors/gps/longitude", |j| {
            j["value"].as_f64().is_some_and(|v| v < 0.0)
        })
        .await
        .unwrap();
    assert!(
        (lon["value"].as_f64().unwrap() + 11.5166).abs() < 1e-3,
        "{lon}"
    );
    // A corrupted GGA (checksum 48 instead of 47): its fields go bad, nothing panics.
    tx.write_all(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48\r\n")
        .await
        .unwrap();
    let bad = layer
        .wait_json(T, "outpost/gw/sensors/gps/altitude", |_| true)
        .await
        .unwrap();
    assert_eq!(bad["quality"], "bad");
    assert!(
        bad["reason"].as_str().unwrap().starts_with("bad checksum"),
        "{bad}"
    );
    // Line noise and an unterminated giant line do not stop the sensor.
    tx.write_all(b"\xff\xfe garbage\r\n").await.unwrap();
    tx.write_all(&[b'x'; 3000]).await.unwrap();
    tx.write_all(b"\r\n$GPGGA,123520,4807.038,N,01131.000,E,1,09,0.9,546.0,M,46.9,M,,*")
        .await
        .unwrap();
    let line = b"GPGGA,123520,4807.038,N,01131.000,E,1,09,0.9,546.0,M,46.9,M,,";
    let cs = line.iter().fold(0u8, |a, b| a ^ b);
    tx.write_all(format!("{cs:02X}\r\n").as_bytes())
        .await
        .unwrap();
    let good = layer
        .wait_json(T, "outpost/gw/sensors/gps/altitude", |j| {
            j["quality"] == "good"
        })
        .await
        .unwrap();
    assert_eq!(good["value"], 546.0);
    layer.stop().await;
}

#[tokio::test]
async fn unplugged_adapter_is_reopened_and_status_says_so() {
    let mut pty = PtyPair::new();
    let mut layer = start(&sensor(
        &pty.a,
        "format = \"kv\"\npoints = [{ field = \"t\", name = \"temperature\", unit = \"°C\", scale = 0.1 }]",
    ));
    layer
        .wait_json(T, "outpost/gw/sensors/gps/status", |j| {
            j["status"] == "online"
        })
        .await
        .unwrap();
    {
        let mut tx = feeder(&pty.b);
        tx.write_all(b"t=215 ignored=1\n").await.unwrap();
        let t = layer
            .wait_json(T, "outpost/gw/sensors/gps/temperature", |_| true)
            .await
            .unwrap();
        assert!((t["value"].as_f64().unwrap() - 21.5).abs() < 1e-9);
        assert_eq!(t["unit"], "°C");
        assert!(
            layer
                .log
                .iter()
                .all(|(_, m)| !m.topic.ends_with("/ignored")),
            "unlisted fields stay private when points are listed"
        );
    }
    pty.stop();
    let off = layer
        .wait_json(T, "outpost/gw/sensors/gps/status", |j| {
            j["status"] == "offline"
        })
        .await
        .unwrap();
    assert!(off["error"].as_str().is_some(), "{off}");
    let t = layer
        .seen_or_wait(T, "outpost/gw/sensors/gps/temperature", |j| {
            j["quality"] == "bad"
        })
        .await
        .unwrap();
    assert_eq!(t["reason"], "device disconnected");
    pty.start();
    layer
        .wait_json(T, "outpost/gw/sensors/gps/status", |j| {
            j["status"] == "online"
        })
        .await
        .expect("reopened after replug");
    let mut tx = feeder(&pty.b);
    tx.write_all(b"t=220\n").await.unwrap();
    let t = layer
        .wait_json(T, "outpost/gw/sensors/gps/temperature", |j| {
            j["quality"] == "good"
        })
        .await
        .unwrap();
    assert!((t["value"].as_f64().unwrap() - 22.0).abs() < 1e-9);
    layer.stop().await;
}

#[tokio::test]
async fn csv_and_json_lines_and_staleness() {
    let pty = PtyPair::new();
    let cfg = format!(
        "[sensors]\nstats_interval = \"0s\"\nclock = \"trusted\"\n[[sensors.serial]]\nname = \"probe\"\nport = \"{}\"\nformat = \"csv\"\ncolumns = [\"t\", \"rh\"]\nstale_after = \"300ms\"\n",
        pty.a.display()
    );
    let mut layer = start(&cfg);
    layer
        .wait_json(T, "outpost/gw/sensors/probe/status", |j| {
            j["status"] == "online"
        })
        .await
        .unwrap();
    let mut tx = feeder(&pty.b);
    tx.write_all(b"21.5,40\n").await.unwrap();
    let rh = layer
        .seen_or_wait(T, "outpost/gw/sensors/probe/rh", |_| true)
        .await
        .unwrap();
    assert_eq!(rh["value"], 40);
    tx.write_all(b"1,2,3\n").await.unwrap();
    let bad = layer
        .wait_json(T, "outpost/gw/sensors/probe/t", |j| j["quality"] == "bad")
        .await
        .unwrap();
    assert!(
        bad["reason"]
            .as_str()
            .unwrap()
            .contains("expected 2 columns"),
        "{bad}"
    );
    tx.write_all(b"22.0,41\n").await.unwrap();
    layer
        .wait_json(T, "outpost/gw/sensors/probe/t", |j| j["quality"] == "good")
        .await
        .unwrap();
    let stale = layer
        .wait_json(T, "outpost/gw/sensors/probe/t", |j| j["quality"] == "stale")
        .await
        .unwrap();
    assert_eq!(stale["value"], 22.0, "stale keeps the last value");
    layer.stop().await;
    drop(tx);

    let pty = PtyPair::new();
    let cfg = format!(
        "[sensors]\nstats_interval = \"0s\"\n[[sensors.serial]]\nname = \"j\"\nport = \"{}\"\nformat = \"jsonl\"\n",
        pty.a.display()
    );
    let mut layer = start(&cfg);
    layer
        .wait_json(T, "outpost/gw/sensors/j/status", |j| {
            j["status"] == "online"
        })
        .await
        .unwrap();
    let mut tx = feeder(&pty.b);
    tx.write_all(b"{\"env\": {\"co2\": 415}, \"ok\": true}\n")
        .await
        .unwrap();
    let co2 = layer
        .seen_or_wait(T, "outpost/gw/sensors/j/env.co2", |_| true)
        .await
        .unwrap();
    assert_eq!(co2["value"], 415);
    layer.stop().await;
}
