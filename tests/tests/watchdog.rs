//! The systemd watchdog is fed from the work, not from a timer: without systemd, this test
//! plays the service manager (its own `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`),
//! sees `READY=1` and regular `WATCHDOG=1` pings while the broker core is healthy, then
//! wedges the core with the debug-only fault (`OUTPOST_DEBUG_WEDGE_TOPIC`, compiled into
//! debug builds only) and sees the pings stop while the process is still running, which
//! is what makes systemd's `WatchdogSec=` restart the service.
//!
//! The gateway runs two worker threads here on purpose: with one, a wedged core would
//! also stop a free-running timer task, and the test could not tell the two apart.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outpost_tests::{outpost_bin, outpost_only, ports::reserve_port};

/// Datagrams received from the gateway, with their arrival time.
fn collect(sock: UnixDatagram) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if tx.send((Instant::now(), msg)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Messages that arrive within `d`.
fn gather(rx: &mpsc::Receiver<(Instant, String)>, d: Duration) -> Vec<String> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((_, m)) => out.push(m),
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("notify socket closed"),
        }
    }
    out
}

fn pings(msgs: &[String]) -> usize {
    msgs.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

/// MQTT 3.1.1 CONNECT, then a QoS 1 PUBLISH on `topic`, over a plain socket.
fn publish_qos1(port: u16, topic: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let id = b"wedger";
    let mut connect = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id);
    let mut pkt = vec![0x10, connect.len() as u8];
    pkt.extend_from_slice(&connect);
    let mut publish = Vec::new();
    publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&[0x00, 0x01]);
    publish.extend_from_slice(b"wedge");
    pkt.push(0x32);
    pkt.push(publish.len() as u8);
    pkt.extend_from_slice(&publish);
    s.write_all(&pkt).expect("send");
    s
}

/// Starts the gateway under a fake service manager listening on `sock_path`; extra
/// config lines and fault in `extra` and `fault`.
fn start_supervised(
    dir: &std::path::Path,
    sock_path: &std::path::Path,
    port: u16,
    extra: &str,
    fault: &[(&str, &str)],
) -> std::process::Child {
    let config = dir.join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "worker_threads = 2\nstate_dir = \"{}\"\n[broker]\nlisteners = [{{ bind = \"127.0.0.1:{port}\" }}]\n{extra}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    // `exec` keeps the shell's pid, so WATCHDOG_PID names the gateway as systemd would.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
        .arg(outpost_bin())
        .arg(&config)
        .env("NOTIFY_SOCKET", sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in fault {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start outpost")
}

/// Waits for READY=1 (10 s at most).
fn wait_ready(rx: &mpsc::Receiver<(Instant, String)>, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut start = Vec::new();
    while !start
        .iter()
        .any(|m: &String| m.lines().any(|l| l == "READY=1"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, m)) => start.push(m),
            Err(_) => {
                let _ = child.kill();
                panic!("no READY=1 within 10 s: {start:?}");
            }
        }
    }
}

/// A sensor poller that stops going round its loop (a debug-only fault wedges every line
/// task) stops the pings too, once it has been silent longer than any healthy step of it
/// can take (a heartbeat, its longest transaction, 10 s of slack): about 15 s here.
#[test]
fn watchdog_pings_stop_when_a_sensor_poller_is_wedged() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let rx = collect(sock);
    let port_held = reserve_port();
    let port = port_held.port();
    // Nothing listens on this port: the poller keeps failing to connect, and keeps going
    // round its loop, which is alive for the watchdog.
    let dead_held = reserve_port();
    let dead = dead_held.port();
    let sensors = format!(
        "[[sensors.modbus]]\nname = \"probe\"\ntransport = {{ tcp = {{ host = \"127.0.0.1\", port = {dead} }} }}\n\
         unit = 1\ntimeout = \"100ms\"\nretries = 0\n\
         points = [{{ name = \"p\", kind = \"holding\", address = 0, type = \"u16\", every = \"1s\" }}]\n"
    );
    let mut child = start_supervised(dir.path(), &sock_path, port, &sensors, &[]);
    wait_ready(&rx, &mut child);
    // Healthy for longer than the quiet limit: a failing device is not a wedged poller.
    let healthy = gather(&rx, Duration::from_secs(17));
    let _ = child.kill();
    let _ = child.wait();
    let n = pings(&healthy);
    assert!(
        n >= 100,
        "only {n} WATCHDOG=1 in 17 s with a failing device: pings must go on"
    );

    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let rx = collect(sock);
    let mut child = start_supervised(
        dir.path(),
        &sock_path,
        port,
        &sensors,
        &[("OUTPOST_FAULT", "wedge-sensor-lines")],
    );
    wait_ready(&rx, &mut child);
    // Within the quiet limit the core answers and the pings go on; past it they stop.
    let early = gather(&rx, Duration::from_secs(2));
    let _ = gather(&rx, Duration::from_secs(15));
    let late = gather(&rx, Duration::from_secs(2));
    let still_running = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "the gateway exited instead of wedging");
    assert!(
        pings(&early) >= 5,
        "no pings before the poller's quiet limit: {early:?}"
    );
    assert_eq!(
        pings(&late),
        0,
        "WATCHDOG=1 kept coming while the sensor poller was wedged: {late:?}"
    );
}

#[test]
fn watchdog_pings_only_while_the_core_answers() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let rx = collect(sock);
    let port_held = reserve_port();
    let port = port_held.port();
    let mut child = start_supervised(
        dir.path(),
        &sock_path,
        port,
        "",
        &[("OUTPOST_DEBUG_WEDGE_TOPIC", "debug/wedge")],
    );
    wait_ready(&rx, &mut child);

    // Healthy: a ping every ~100 ms (a quarter of WATCHDOG_USEC).
    let healthy = gather(&rx, Duration::from_secs(2));
    let n = pings(&healthy);
    assert!(
        n >= 5,
        "only {n} WATCHDOG=1 in 2 s while healthy: {healthy:?}"
    );
    assert!(
        healthy
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with("STATUS=clients "))),
        "no STATUS= line with the client count: {healthy:?}"
    );

    // Wedge the core; the process keeps running but must stop feeding the watchdog.
    let _conn = publish_qos1(port, "debug/wedge");
    let _ = gather(&rx, Duration::from_millis(600));
    let wedged = gather(&rx, Duration::from_secs(2));
    let still_running = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "the gateway exited instead of wedging");
    assert_eq!(
        pings(&wedged),
        0,
        "WATCHDOG=1 kept coming while the core was wedged: {wedged:?}"
    );
}
