//! Wrappers around Mosquitto's `mosquitto_pub` and `mosquitto_sub`, real third-party clients.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;

/// A message as printed by mosquitto_sub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliMessage {
    /// Topic.
    pub topic: String,
    /// QoS of the delivery.
    pub qos: u8,
    /// Retain flag of the delivery.
    pub retain: bool,
    /// Payload as text.
    pub payload: String,
}

fn require(tool: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: run scripts/test.sh or apt-get install mosquitto-clients"
    );
}

/// Publish one message with mosquitto_pub; `v5` selects MQTT 5.0. Panics on failure.
pub async fn mosquitto_pub(port: u16, topic: &str, payload: &str, qos: u8, retain: bool, v5: bool) {
    require("mosquitto_pub");
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "-m",
        payload,
    ])
    .args(["-q", &qos.to_string()])
    .kill_on_drop(true);
    if retain {
        cmd.arg("-r");
    }
    if v5 {
        cmd.args(["-V", "mqttv5"]);
    }
    let out = timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("mosquitto_pub timed out")
        .expect("run mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running mosquitto_sub that has received its SUBACK.
pub struct MosquittoSub {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

/// Prefix of message lines (no `@` or `%`: both are -F escapes).
const MARK: &str = "MSG| ";

impl MosquittoSub {
    /// Subscribe to `filter` at `qos`, exit after `count` messages or `wait_secs` seconds.
    /// Returns once the broker has acknowledged the subscription.
    pub async fn start(
        port: u16,
        filter: &str,
        qos: u8,
        count: usize,
        wait_secs: u32,
        v5: bool,
    ) -> MosquittoSub {
        require("mosquitto_sub");
        // stdbuf: mosquitto_sub block-buffers stdout into a pipe, hiding the SUBACK line.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub"]);
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            filter,
            "-d",
        ])
        .args(["-q", &qos.to_string(), "-C", &count.to_string()])
        .args(["-W", &wait_secs.to_string()])
        .args(["-F", &format!("{MARK}%q %r %t %p")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        if v5 {
            cmd.args(["-V", "mqttv5"]);
        }
        let mut child = cmd.spawn().expect("spawn mosquitto_sub");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = timeout(Duration::from_secs(5), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("received SUBACK") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "mosquitto_sub got no SUBACK");
        MosquittoSub { child, lines }
    }

    /// Wait for the process to finish (count reached or -W expired) and return the messages.
    pub async fn messages(mut self) -> Vec<CliMessage> {
        let mut out = Vec::new();
        let read = timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if let Some(rest) = line.strip_prefix(MARK) {
                    let mut parts = rest.splitn(4, ' ');
                    let qos = parts.next().and_then(|q| q.parse().ok()).unwrap_or(255);
                    let retain = parts.next() == Some("1");
                    let topic = parts.next().unwrap_or_default().to_string();
                    let payload = parts.next().unwrap_or_default().to_string();
                    out.push(CliMessage {
                        topic,
                        qos,
                        retain,
                        payload,
                    });
                }
            }
        })
        .await;
        assert!(read.is_ok(), "mosquitto_sub did not finish");
        let _ = timeout(Duration::from_secs(5), self.child.wait()).await;
        out
    }
}
