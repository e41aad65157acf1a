//! The `outpost` CLI and configuration: `outpost check`, refusal of bad configs at start,
//! the secure default listener and graceful shutdown. Outpost-specific (skipped when the
//! suite validates itself against Mosquitto), except graceful shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_tests::broker::parse_listening_port;
use outpost_tests::{Broker, V4Client, outpost_bin, outpost_only};

const GOOD: &str = "[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\nmax_keepalive = 60\n";
const BOGUS: &str = "[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\nbogus = 1\n";

/// "line 3" in prose, or the `file:3:col` form that editors and CI annotators jump to.
fn names_line_3(text: &str, file: &str) -> bool {
    text.contains("line 3") || text.contains(&format!("{file}:3:"))
}

fn run_check(file: &str, body: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, body).unwrap();
    let out = Command::new(outpost_bin())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env("STATE_DIRECTORY", dir.path())
        .output()
        .expect("run outpost check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_accepts_a_good_config() {
    outpost_only!();
    let (ok, text) = run_check("good.toml", GOOD);
    assert!(ok, "outpost check refused a good config: {text}");
}

#[test]
fn check_rejects_unknown_key_naming_file_line_and_key() {
    outpost_only!();
    let (ok, text) = run_check("bad.toml", BOGUS);
    assert!(!ok, "outpost check accepted an unknown key: {text}");
    assert!(
        text.contains("bad.toml"),
        "error must name the file: {text}"
    );
    assert!(
        names_line_3(&text, "bad.toml"),
        "error must name line 3: {text}"
    );
    assert!(text.contains("bogus"), "error must name the key: {text}");
}

#[test]
fn check_rejects_a_wrong_type_with_its_line() {
    outpost_only!();
    let body = "[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\nmax_keepalive = \"soon\"\n";
    let (ok, text) = run_check("type.toml", body);
    assert!(!ok, "a string for max_keepalive was accepted: {text}");
    assert!(
        names_line_3(&text, "type.toml"),
        "error must name file and line 3: {text}"
    );
    assert!(text.contains("max_keepalive"), "{text}");
}

#[test]
fn check_rejects_a_qos_above_2_at_the_value_for_sensors_and_bridge_rules() {
    outpost_only!();
    // The QoS is read once, where the file names it: the sensors and the bridge get a QoS,
    // never a number to fall back from.
    let sensors = "[sensors]\n[[sensors.modbus]]\nname = \"boiler\"\n\
        transport = { tcp = { host = \"127.0.0.1\", port = 1502 } }\nunit = 1\n\
        points = [{ name = \"t\", kind = \"input\", address = 0, type = \"u16\", qos = 3 }]\n";
    let bridge = "[[bridge]]\nname = \"cloud\"\naddress = \"mqtt://127.0.0.1:1883\"\n\
        topics = [{ pattern = \"a/#\", direction = \"out\", qos = 3 }]\n";
    for (file, body, line, key) in [
        (
            "sensors.toml",
            sensors,
            6,
            "sensors.modbus[0].points[0].qos",
        ),
        ("bridge.toml", bridge, 4, "bridge[0].topics[0].qos"),
    ] {
        let (ok, text) = run_check(file, body);
        assert!(!ok, "QoS 3 was accepted in {file}: {text}");
        assert!(
            text.contains(&format!("{file}:{line}:")),
            "error must name {file} and line {line}: {text}"
        );
        assert!(text.contains(key), "error must name the key {key}: {text}");
        assert!(
            text.contains("0, 1 or 2"),
            "error must say what is allowed: {text}"
        );
    }
}

#[test]
fn check_rejects_a_commit_window_over_five_seconds_for_the_broker_and_a_spool() {
    outpost_only!();
    // Every acknowledgement of a steady stream would wait that long.
    let broker = "[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\ncommit_window = \"10s\"\n";
    let bridge = "[[bridge]]\nname = \"cloud\"\naddress = \"mqtt://127.0.0.1:1883\"\n\
        topics = [{ pattern = \"a/#\", direction = \"out\", qos = 1 }]\n\
        [bridge.spool]\ncommit_window = \"1h\"\n";
    for (file, body, line, key) in [
        ("broker.toml", broker, 3, "broker.commit_window"),
        ("spool.toml", bridge, 6, "bridge[0].spool.commit_window"),
    ] {
        let (ok, text) = run_check(file, body);
        assert!(!ok, "the window was accepted in {file}: {text}");
        assert!(
            text.contains(&format!("{file}:{line}:")),
            "error must name {file} and line {line}: {text}"
        );
        assert!(text.contains(key), "error must name the key {key}: {text}");
        assert!(
            text.contains("at most 5s"),
            "error must say the bound: {text}"
        );
    }
    let ok_body = broker.replace("10s", "250ms");
    let (ok, text) = run_check("fine.toml", &ok_body);
    assert!(ok, "250ms was refused: {text}");
}

#[test]
fn check_rejects_durations_past_their_bound_naming_file_line_key_and_bound() {
    outpost_only!();
    // Each is added to an Instant (a connection's deadline, the next $SYS time): past
    // what the clock holds, that panicked the accept task or the core instead.
    let huge = "9223372036854775807";
    for (key, value, bound) in [
        ("connect_timeout", huge, "at most 1h"),
        ("packet_timeout", huge, "at most 1h"),
        ("sys_interval", huge, "at most 1day"),
        ("sys_interval", "\"2days\"", "at most 1day"),
        ("max_session_expiry", huge, "at most 136years"),
    ] {
        let file = format!("{key}.toml");
        let body =
            format!("[broker]\nlisteners = [{{ bind = \"127.0.0.1:0\" }}]\n{key} = {value}\n");
        let (ok, text) = run_check(&file, &body);
        assert!(!ok, "{key} = {value} was accepted: {text}");
        assert!(
            text.contains(&format!("{file}:3:")),
            "error must name {file} and line 3: {text}"
        );
        assert!(
            text.contains(&format!("broker.{key}")),
            "error must name the key broker.{key}: {text}"
        );
        assert!(
            text.contains(bound),
            "error must say the bound ({bound}): {text}"
        );
    }
    let fine = "[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\n\
        connect_timeout = \"1h\"\npacket_timeout = \"1h\"\nsys_interval = \"1day\"\n";
    let (ok, text) = run_check("bounds.toml", fine);
    assert!(ok, "the bounds themselves were refused: {text}");
}

#[test]
fn check_rejects_a_missing_file_naming_it() {
    outpost_only!();
    let out = Command::new(outpost_bin())
        .args(["check", "--config", "/nonexistent/outpost-missing.toml"])
        .output()
        .expect("run outpost check");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outpost-missing.toml"));
}

#[test]
fn start_with_bad_config_refuses_and_exits() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("start-bad.toml");
    std::fs::write(&path, BOGUS).unwrap();
    let mut child = Command::new(outpost_bin())
        .arg("--config")
        .arg(&path)
        .env("STATE_DIRECTORY", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outpost");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("outpost kept running with an invalid config");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("bogus") && err.contains("start-bad.toml"),
        "{err}"
    );
}

#[test]
fn no_config_listens_on_loopback_1883_only() {
    outpost_only!();
    // Only when 1883 is free on every interface: never disturb a broker on this machine.
    if std::net::TcpListener::bind("0.0.0.0:1883").is_err() {
        eprintln!("port 1883 is in use: default-listener test skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(outpost_bin())
        .current_dir(dir.path())
        .env("STATE_DIRECTORY", dir.path())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outpost");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    let mut port = None;
    while Instant::now() < deadline && port.is_none() {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            port = parse_listening_port(&line);
            lines.push(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        port,
        Some(1883),
        "default must listen on 127.0.0.1:1883; log:\n{}",
        lines.join("\n")
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("addr=0.0.0.0") || l.contains("addr=[::]")),
        "default must not listen beyond loopback:\n{}",
        lines.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_broker_cleanly() {
    let mut broker = Broker::start("");
    let (_c, _) = V4Client::connect(broker.port(), "cfg-term", |_| {}).await;
    let status =
        tokio::task::block_in_place(|| broker.stop_gracefully()).expect("broker was running");
    assert!(
        status.success(),
        "SIGTERM exit status {status:?}; log:\n{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_same_state_dir_serves_again() {
    let mut broker = Broker::start("");
    let first = broker.port();
    assert!(first > 0);
    tokio::task::block_in_place(|| broker.restart());
    outpost_tests::assert_broker_serves(broker.port(), "cfg-restart").await;
}
