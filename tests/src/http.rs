//! The gateway's HTTP side from outside: its port (from the log), requests with `curl`
//! (a client nobody here wrote), Prometheus text read back, and `promtool` (Debian's
//! `prometheus` package) as the exposition-format parser.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::broker::Broker;

/// The port of the `status page on http(s)://ADDR:PORT/` log line, waiting up to 10 s.
pub fn http_port(b: &Broker) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = b.log();
        if let Some(port) = log.lines().find_map(|l| {
            let rest = l.split("status page on ").nth(1)?;
            let rest = rest
                .strip_prefix("http://")
                .or_else(|| rest.strip_prefix("https://"))?;
            let addr = rest.split('/').next()?;
            addr.rsplit(':').next()?.parse().ok()
        }) {
            return port;
        }
        assert!(
            Instant::now() < deadline,
            "outpost did not log `status page on http://...`; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, one per line as curl prints them.
    pub headers: String,
    /// Body as text.
    pub body: String,
}

/// GET `http://127.0.0.1:{port}{path}` with curl, optionally with HTTP Basic credentials.
pub fn get(port: u16, path: &str, login: Option<(&str, &str)>) -> Reply {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = dir.path().join("head");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "-o", "-", "-D"])
        .arg(&head)
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"));
    if let Some((user, password)) = login {
        cmd.args(["-u", &format!("{user}:{password}")]);
    }
    let out = cmd
        .output()
        .expect("run curl (apt-get install curl, or run scripts/test.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Reply {
        status: code.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&head).unwrap_or_default(),
        body: body.to_owned(),
    }
}

/// The value of the sample `series` (the name with its labels exactly as exposed, e.g.
/// `outpost_bridge_spool_messages{bridge="cloud"}`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Polls `/metrics` until `series` satisfies `ok`, for up to `wait`; the last text.
pub fn wait_metric(port: u16, series: &str, wait: Duration, ok: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + wait;
    loop {
        let r = get(port, "/metrics", None);
        if metric(&r.body, series).is_some_and(&ok) {
            return r.body;
        }
        assert!(
            Instant::now() < deadline,
            "{series} did not reach the expected value within {wait:?}; last /metrics:\n{}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `promtool check metrics` on `text`: the exposition must parse, and promtool's lint
/// (names, units, `_total` on counters only) must have nothing to say.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: apt-get install prometheus (or run scripts/test.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
