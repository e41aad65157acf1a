//! `kill -9` of a process running the bridge while it drains, then a restart: nothing
//! acknowledged is lost and no QoS 2 message arrives twice. Also checks the will.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn example_binary() -> PathBuf {
    // `cargo test` builds examples; a filtered run (`--test crash`) may not, so build it.
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("examples").join("bridge_run");
    if !bin.exists() {
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
    }
    bin
}

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(config: &Path, state: &Path, n: usize, first: usize) -> Proc {
        let mut child = Command::new(example_binary())
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
        Proc { child, lines }
    }

    fn expect_line(&self, prefix: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return,
                Ok(_) => {}
                Err(_) => panic!("bridge_run never printed {prefix:?}"),
            }
        }
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
