//! `kill -9` of a process running the bridge while it drains, then a restart: nothing
//! acknowledged is lost and no QoS 2 message arrives twice, up or down. Also checks the will.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn example_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_example).clone()
}

/// `cargo test` builds examples, but a filtered run (`--test crash`) may find a missing or
/// stale one: build it once per test process (a no-op when it is fresh).
fn build_example() -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("examples").join("bridge_run");
    let target = dir.parent().expect("target dir").to_path_buf();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", "outpost-bridge", "--example", "bridge_run"]);
    if dir.file_name().is_some_and(|p| p == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .env("CARGO_TARGET_DIR", target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the bridge_run example failed");
    bin
}

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    history: std::sync::Mutex<Vec<String>>,
}

impl Proc {
    fn spawn(config: &Path, state: &Path, n: usize, first: usize) -> Proc {
        Self::spawn_with(config, state, n, first, false)
    }

    /// Keeps running after `drained` until killed.
    fn spawn_staying(config: &Path, state: &Path) -> Proc {
        Self::spawn_with(config, state, 0, 0, true)
    }

    fn spawn_with(config: &Path, state: &Path, n: usize, first: usize, stay: bool) -> Proc {
        let mut child = Command::new(example_binary())
            .env("BRIDGE_RUN_STAY", if stay { "1" } else { "0" })
            .arg(config)
            .arg(state)
            .arg("gw-crash")
            .arg(n.to_string())
            .arg(first.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bridge_run example is built (cargo test builds examples)");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Proc {
            child,
            lines,
            history: Default::default(),
        }
    }

    /// Wait (bounded) for a new line starting with `prefix`; every line read is kept.
    fn wait_line(&self, prefix: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.starts_with(prefix);
                    self.history.lock().unwrap().push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    fn expect_line(&self, prefix: &str, timeout: Duration) {
        assert!(
            self.wait_line(prefix, timeout),
            "bridge_run never printed {prefix:?}"
        );
    }

    /// Lines read so far that start with `prefix`.
    fn printed(&self, prefix: &str) -> usize {
        self.history
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_draining_then_restart_loses_nothing_and_never_duplicates_qos2() {
    let cloud = Cloud::start("");
    let sub = Subscriber::connect(cloud.port, "crash-counter", "up/#").await;
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("bridge.toml");
    // A small window and a slow replay keep the first process draining long enough to be
    // killed mid-stream, with QoS 2 exchanges in flight.
    std::fs::write(
        &config,
        format!(
            r#"name = "crash"
address = "mqtt://127.0.0.1:{}"
keep_alive = "5s"
max_inflight = 4
topics = [{{ pattern = "sensors/#", direction = "out", qos = 2, remote_prefix = "up/" }}]
[reconnect]
min = "100ms"
max = "400ms"
"#,
            cloud.port
        ),
    )
    .unwrap();
    let total = 3000;
    let first = Proc::spawn(&config, state.path(), total, 0);
    first.expect_line("spooled", Duration::from_secs(30));
    // Kill while draining: some messages are up, most are still spooled.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sub.count() < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.kill9();
    let at_kill = sub.count();
    let spool = rusqlite::Connection::open(state.path().join("bridge-crash.sqlite")).unwrap();
    let (left, qos2_in_flight): (i64, i64) = spool
        .query_row(
            "SELECT count(*), coalesce(sum(stage > 0), 0) FROM messages",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    drop(spool);
    assert!(left > 0, "rows remain spooled after the kill");
    assert!(
        at_kill < total,
        "the drain finished before the kill ({at_kill}); test proves nothing"
    );

    // The cloud published our will: offline, unexpected.
    let status = Subscriber::connect(cloud.port, "status-watch", "outpost/gw-crash/status").await;
    let seen = status.wait_for(1, Duration::from_secs(10)).await;
    let last = seen.last().expect("a retained status");
    assert!(last.retain, "status is retained");
    assert!(
        last.payload.contains("\"offline\"") && last.payload.contains("unexpected"),
        "{}",
        last.payload
    );

    let second = Proc::spawn(&config, state.path(), 0, total);
    second.expect_line("drained", Duration::from_secs(60));
    drop(second);
    let seen = sub.wait_for(total, Duration::from_secs(10)).await;
    let counts = tally(&seen);
    let mut qos1_dups = 0;
    for i in 0..total {
        let n = counts.get(&i.to_string()).copied().unwrap_or(0);
        assert!(
            n >= 1,
            "message {i} lost (acknowledged to its publisher, never arrived)"
        );
        if i % 3 == 0 {
            assert_eq!(n, 1, "QoS 2 message {i} arrived {n} times");
        } else {
            qos1_dups += n - 1;
        }
    }
    assert_eq!(counts.len(), total, "nothing unexpected arrived");
    eprintln!(
        "killed after {at_kill} arrivals with {left} rows spooled ({qos2_in_flight} QoS 2 mid-exchange); \
         QoS 1 duplicates after restart: {qos1_dups}"
    );
}

/// Unreleased downlink QoS 2 ids the bridge has committed (empty if there is no table).
fn incoming_ids(spool: &Path, bridge: &str) -> Vec<i64> {
    let Ok(conn) = rusqlite::Connection::open(spool) else {
        return Vec::new();
    };
    let _ = conn.busy_timeout(Duration::from_secs(2));
    let Ok(mut st) = conn.prepare("SELECT packet_id FROM incoming_qos2 WHERE bridge = ?1") else {
        return Vec::new();
    };
    st.query_map([bridge], |r| r.get(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_before_pubrec_got_out_does_not_deliver_a_downlink_qos2_message_twice() {
    let cloud = Cloud::start("");
    // The bridge reaches the cloud through a proxy that can swallow what the bridge sends:
    // the cloud then never sees our PUBREC and, after our restart, resends the PUBLISH.
    let proxy = Blackhole::start(cloud.port).await;
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("bridge.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "down2"
address = "mqtt://127.0.0.1:{}"
keep_alive = "5s"
topics = [{{ pattern = "cmd/#", direction = "in", qos = 2, remote_prefix = "cloud/gw/" }}]
[reconnect]
min = "100ms"
max = "400ms"
"#,
            proxy.port
        ),
    )
    .unwrap();
    let spool = state.path().join("bridge-down2.sqlite");
    let first = Proc::spawn_staying(&config, state.path());
    first.expect_line("drained", Duration::from_secs(30));
    // A command that comes through proves the downlink subscription is in place.
    let mut live = false;
    for i in 0..20 {
        let warm = format!("warm-{i}");
        cloud_publish(
            cloud.port,
            "cloud/gw/cmd/warm",
            &warm,
            rumqttc::QoS::AtLeastOnce,
            false,
        )
        .await;
        if first.wait_line(
            &format!("local cmd/warm {warm}"),
            Duration::from_millis(500),
        ) {
            live = true;
            break;
        }
    }
    assert!(live, "the downlink subscription never became live");

    proxy.set_swallow_up(true);
    cloud_publish(
        cloud.port,
        "cloud/gw/cmd/valve",
        "open-once",
        rumqttc::QoS::ExactlyOnce,
        false,
    )
    .await;
    first.expect_line("local cmd/valve open-once", Duration::from_secs(10));
    // Its packet id is committed before the (swallowed) PUBREC is written.
    wait_for(
        "the received QoS 2 id to be committed",
        Duration::from_secs(10),
        || incoming_ids(&spool, "down2").len() == 1,
    )
    .await;
    first.kill9();
    proxy.set_swallow_up(false);

    let second = Proc::spawn_staying(&config, state.path());
    second.expect_line("drained", Duration::from_secs(30));
    // The cloud resends the PUBLISH (DUP); PUBREC, PUBREL and PUBCOMP follow and the id is
    // released: proof that the resend happened and was answered.
    wait_for(
        "the resent QoS 2 exchange to complete",
        Duration::from_secs(10),
        || incoming_ids(&spool, "down2").is_empty(),
    )
    .await;
    second.wait_line("local cmd/valve", Duration::from_millis(500));
    assert_eq!(
        second.printed("local cmd/valve open-once"),
        0,
        "the resent QoS 2 command was delivered locally a second time"
    );
    // The link goes on: the next QoS 2 command is delivered, once.
    cloud_publish(
        cloud.port,
        "cloud/gw/cmd/valve",
        "close",
        rumqttc::QoS::ExactlyOnce,
        false,
    )
    .await;
    second.expect_line("local cmd/valve close", Duration::from_secs(10));
    second.wait_line("local cmd/valve", Duration::from_millis(300));
    assert_eq!(second.printed("local cmd/valve close"), 1);
    assert_eq!(second.printed("local cmd/valve open-once"), 0);
}
