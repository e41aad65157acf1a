//! Starting, stopping and killing the broker under test (the real `outpost` binary, or a
//! real Mosquitto when `OUTPOST_TEST_BROKER=mosquitto` validates the tests themselves).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::ports::reserve_port;

/// How long a broker may take to announce its listener.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Which broker the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The `outpost` binary of this workspace (the default).
    Outpost,
    /// A real Mosquitto 2.x, to prove that the tests encode the standard, not outpost.
    Mosquitto,
}

/// The broker selected by `OUTPOST_TEST_BROKER` (`mosquitto`, or anything else for outpost).
pub fn broker_kind() -> BrokerKind {
    match std::env::var("OUTPOST_TEST_BROKER").as_deref() {
        Ok("mosquitto") => BrokerKind::Mosquitto,
        _ => BrokerKind::Outpost,
    }
}

/// True when the suite validates itself against Mosquitto; outpost-only tests return early.
pub fn mosquitto_mode() -> bool {
    broker_kind() == BrokerKind::Mosquitto
}

/// Return early from a test that checks outpost-specific behaviour (its CLI, its config).
#[macro_export]
macro_rules! outpost_only {
    () => {
        if $crate::mosquitto_mode() {
            eprintln!("outpost-specific test: skipped in mosquitto mode");
            return;
        }
    };
}

/// Path of the `outpost` binary: `OUTPOST_BIN`, or `<target>/<profile>/outpost` built once.
pub fn outpost_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("OUTPOST_BIN") {
            return PathBuf::from(bin);
        }
        build_outpost()
    })
    .clone()
}

/// Build the gateway into the target dir this test executable lives in, so the suite
/// always runs the current sources (cargo makes this a no-op when nothing changed).
fn build_outpost() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<test-exe>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "outpost-gateway", "--bin", "outpost"])
        .env("CARGO_TARGET_DIR", &target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().expect("run cargo build for outpost");
    assert!(
        out.status.success(),
        "cargo build -p outpost-gateway failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join("outpost");
    assert!(
        bin.exists(),
        "built outpost but {} is missing",
        bin.display()
    );
    bin
}

/// Remove ANSI colour sequences so log lines can be parsed whatever the subscriber does.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c2 in chars.by_ref() {
                    if c2.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The port of a `listening transport=tcp addr=127.0.0.1:PORT` log line.
pub fn parse_listening_port(line: &str) -> Option<u16> {
    let line = strip_ansi(line);
    if !line.contains("listening") || !line.contains("transport=tcp") {
        return None;
    }
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))?;
    let addr = addr.trim_matches('"');
    addr.strip_prefix("127.0.0.1:")?.parse().ok()
}

/// A `[broker]` table on an ephemeral loopback port, plus `broker_lines`.
fn broker_table(broker_lines: &str) -> String {
    format!(
        "[broker]\nlisteners = [{{ bind = \"127.0.0.1:0\" }}]\n{}\n",
        broker_lines.trim()
    )
}

/// An argon2 hash of `password` made by the real `outpost passwd` (stdin, not a
/// terminal), for `users = [...]` in a test config.
pub fn password_hash(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(outpost_bin())
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outpost passwd");
    if let Some(mut stdin) = child.stdin.take() {
        writeln!(stdin, "{password}").expect("write the password");
    }
    let out = child.wait_with_output().expect("outpost passwd");
    assert!(
        out.status.success(),
        "outpost passwd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A running broker with its own state directory; killed (SIGKILL) on drop.
pub struct Broker {
    kind: BrokerKind,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    child: Option<Child>,
    port: u16,
    log: Arc<Mutex<String>>,
    /// `OUTPOST_FAULT` for the next start only (a restart runs without it).
    fault: Option<String>,
    /// A state directory of the test's own (a small file system), instead of `dir`.
    state: Option<PathBuf>,
}

impl Broker {
    /// Start the broker under test. `broker_lines` are extra `key = value` lines for the
    /// `[broker]` table (e.g. `max_keepalive = 10`); in mosquitto mode each known key is
    /// translated to its Mosquitto equivalent.
    pub fn start(broker_lines: &str) -> Broker {
        match broker_kind() {
            BrokerKind::Outpost => Self::outpost(broker_lines),
            BrokerKind::Mosquitto => Self::mosquitto(broker_lines),
        }
    }

    /// Start outpost with `[broker]` on an ephemeral loopback port plus `broker_lines`.
    pub fn outpost(broker_lines: &str) -> Broker {
        Self::outpost_with_full_config(&broker_table(broker_lines))
    }

    /// Start outpost with a complete config file (the caller owns every section).
    pub fn outpost_with_full_config(config: &str) -> Broker {
        Self::outpost_custom(config, None, None)
    }

    /// Start outpost (a debug build) with a test fault point armed for this run only,
    /// e.g. `abort-after:pubcomp` (see `broker/src/fault.rs`).
    pub fn outpost_with_fault(broker_lines: &str, fault: &str) -> Broker {
        Self::outpost_custom(&broker_table(broker_lines), Some(fault.to_owned()), None)
    }

    /// Start outpost with its state (broker store, spools) in `state`, a directory the
    /// test owns (e.g. a small tmpfs to fill up).
    pub fn outpost_with_state_dir(broker_lines: &str, state: &Path) -> Broker {
        Self::outpost_custom(&broker_table(broker_lines), None, Some(state.to_owned()))
    }

    /// Start outpost with the complete config `config`, a fault point for its first run,
    /// and a state directory of the test's own.
    fn outpost_custom(config: &str, fault: Option<String>, state: Option<PathBuf>) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("outpost.toml");
        std::fs::write(&config_path, config).expect("write outpost.toml");
        let mut b = Broker {
            kind: BrokerKind::Outpost,
            dir,
            config_path,
            child: None,
            port: 0,
            log: Arc::new(Mutex::new(String::new())),
            fault,
            state,
        };
        b.spawn();
        b
    }

    /// Waits up to `wait` for the broker to exit by itself (a fault point), then reaps it;
    /// true if it did.
    pub fn wait_exit(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while let Some(child) = self.child.as_mut() {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Start a real Mosquitto with a config equivalent to `broker_lines`.
    pub fn mosquitto(broker_lines: &str) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("mosquitto.conf");
        let mut conf = String::from(
            "allow_anonymous true\npersistence false\nlog_type all\n\
             # One copy per matching subscription: the default (false) delivers overlapping\n\
             # 3.1.1 subscriptions once at the first match's QoS, against MQTT-3.3.5-1.\n\
             allow_duplicate_messages true\n",
        );
        for line in broker_lines
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            conf.push_str(&mosquitto_equivalent(line));
            conf.push('\n');
        }
        std::fs::write(&config_path, conf).expect("write mosquitto.conf");
        let mut b = Broker {
            kind: BrokerKind::Mosquitto,
            dir,
            config_path,
            child: None,
            port: 0,
            log: Arc::new(Mutex::new(String::new())),
            fault: None,
            state: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        match self.kind {
            BrokerKind::Outpost => self.spawn_outpost(),
            BrokerKind::Mosquitto => self.spawn_mosquitto(),
        }
    }

    fn spawn_outpost(&mut self) {
        let mut cmd = Command::new(outpost_bin());
        match self.fault.take() {
            Some(f) => cmd.env("OUTPOST_FAULT", f),
            None => cmd.env_remove("OUTPOST_FAULT"),
        };
        let mut child = cmd
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "STATE_DIRECTORY",
                self.state.as_deref().unwrap_or(self.dir.path()),
            )
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        let (tx, rx) = std_mpsc::channel::<u16>();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || drain_log(stderr, log, Some(tx)));
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(port) => self.port = port,
            Err(e) => {
                // Disconnected: stderr closed, so outpost exited (e.g. a refused config);
                // give it a moment to be reaped so the status is reported.
                if e == std_mpsc::RecvTimeoutError::Disconnected {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                self.kill9();
                let what = match status {
                    Some(s) => format!("outpost exited ({s}) before listening"),
                    None => format!(
                        "outpost did not log `listening transport=tcp addr=127.0.0.1:PORT` within {START_TIMEOUT:?}"
                    ),
                };
                panic!("{what}; stderr:\n{}", self.log());
            }
        }
    }

    fn spawn_mosquitto(&mut self) {
        // Held until Mosquitto listens, so no other test's server takes the port first.
        let reserved = reserve_port();
        let port = reserved.port();
        let mut conf = std::fs::read_to_string(&self.config_path).expect("read mosquitto.conf");
        // Listener line first so a restart may pick a new port.
        conf = conf
            .lines()
            .filter(|l| !l.starts_with("listener "))
            .collect::<Vec<_>>()
            .join("\n");
        conf = format!("listener {port} 127.0.0.1\n{conf}\n");
        std::fs::write(&self.config_path, conf).expect("write mosquitto.conf");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto (apt-get install mosquitto)");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || drain_log(stderr, log, None));
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "mosquitto did not listen on {port}; stderr:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.port = port;
    }

    /// The broker process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The TCP port the broker listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Which broker this is.
    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// The broker's state directory (`STATE_DIRECTORY`).
    pub fn state_dir(&self) -> &Path {
        self.state.as_deref().unwrap_or(self.dir.path())
    }

    /// Everything the broker wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Replaces the config file with `config` and sends SIGHUP (what `systemctl reload`
    /// does); returns at once, see [`Broker::wait_for_log`].
    pub fn reload_with(&mut self, config: &str) {
        std::fs::write(&self.config_path, config).expect("write the new config");
        self.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// Sends `sig` to the broker process.
    pub fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `wait` for the log to contain `needle` at least `times` times.
    pub fn wait_for_log(&self, needle: &str, times: usize, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if self.log().matches(needle).count() >= times {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The config file the broker runs on.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Kill the broker with SIGKILL and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to 10 s (SIGKILL after that); returns the exit status.
    pub fn stop_gracefully(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start again with the same config and state directory (the port may change).
    pub fn restart(&mut self) {
        self.kill9();
        self.log
            .lock()
            .map(|mut l| l.push_str("---- restart ----\n"))
            .ok();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- broker stderr ----\n{}", self.log());
        }
    }
}

fn drain_log(stderr: impl Read, log: Arc<Mutex<String>>, port_tx: Option<std_mpsc::Sender<u16>>) {
    let mut port_tx = port_tx;
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(tx) = &port_tx
            && let Some(port) = parse_listening_port(&line)
        {
            let _ = tx.send(port);
            port_tx = None;
        }
        if let Ok(mut l) = log.lock() {
            l.push_str(&strip_ansi(&line));
            l.push('\n');
        }
    }
}

/// The Mosquitto config line for one outpost `[broker]` line.
fn mosquitto_equivalent(line: &str) -> String {
    let (key, value) = line
        .split_once('=')
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
        .unwrap_or_else(|| panic!("not a key = value line: {line}"));
    match key {
        "max_keepalive" => format!("max_keepalive {value}"),
        "max_packet_size" => format!("max_packet_size {value}"),
        // Mosquitto announces max_inflight_messages as its Receive Maximum.
        "receive_maximum" => format!("max_inflight_messages {value}"),
        "max_inflight" => format!("max_inflight_messages {value}"),
        "sys_interval" => format!("sys_interval {}", value.trim_end_matches('s')),
        // No Mosquitto equivalent: the CONNECT timeout is outpost's own.
        "connect_timeout" => String::new(),
        other => panic!("no mosquitto equivalent for outpost key `{other}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_line() {
        let l = "2026-01-01T00:00:00Z  INFO outpost_gateway::listener: listening transport=tcp addr=127.0.0.1:41234";
        assert_eq!(parse_listening_port(l), Some(41234));
        let colored = "\u{1b}[32m INFO\u{1b}[0m listening \u{1b}[3mtransport\u{1b}[0m\u{1b}[2m=\u{1b}[0mtcp \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:5000";
        assert_eq!(parse_listening_port(colored), Some(5000));
        assert_eq!(
            parse_listening_port("listening transport=ws addr=127.0.0.1:1"),
            None
        );
    }
}
