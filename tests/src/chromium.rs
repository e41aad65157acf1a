//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: open a page,
//! evaluate JavaScript in it, take a screenshot. Every wait is bounded.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// How long Chromium may take to start and to answer one command.
const WAIT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page open; killed on drop.
pub struct Chromium {
    child: Option<Child>,
    _profile: tempfile::TempDir,
    ws: WebSocketStream<TcpStream>,
    session: String,
    next_id: u64,
}

impl Chromium {
    /// Starts Chromium and opens `url` in a new page.
    pub async fn open(url: &str) -> Chromium {
        let profile = tempfile::tempdir().expect("tempdir");
        let bin = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| {
                Command::new("sh")
                    .args(["-c", &format!("command -v {b}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("chromium is missing: apt-get install chromium (or run scripts/test.sh)");
        let child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let mut child = Some(child);
        let port_file: PathBuf = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + WAIT;
        // Chromium writes the port it took and the browser target's path once it listens.
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(p), Some(path)) = (lines.next(), lines.next())
                    && let Ok(p) = p.trim().parse::<u16>()
                {
                    break (p, path.trim().to_owned());
                }
            }
            if Instant::now() > deadline {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!(
                    "chromium did not write {} within {WAIT:?}",
                    port_file.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to chromium's DevTools port");
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}{path}"), stream)
                .await
                .expect("DevTools WebSocket handshake");
        let mut c = Chromium {
            child,
            _profile: profile,
            ws,
            session: String::new(),
            next_id: 1,
        };
        let target = c.call("Target.createTarget", json!({ "url": url })).await;
        let target_id = target["targetId"].as_str().expect("targetId").to_owned();
        let attached = c
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await;
        c.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        c
    }

    /// Sends a DevTools command (to the page once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = Value::String(self.session.clone());
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to chromium");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method} within {WAIT:?}"));
            let Some(Ok(Message::Text(text))) = next else {
                if matches!(next, None | Some(Err(_))) {
                    panic!("DevTools connection closed while waiting for {method}");
                }
                continue;
            };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
            // Events and other replies are not needed here.
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {r}"
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` every 200 ms until `ok` accepts its value, for up to
    /// `wait`; returns the value, or panics with the last one and `what`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        wait: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + wait;
        loop {
            let v = self.eval(expression).await;
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {wait:?}; it shows: {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A PNG of the whole page at a phone's width.
    pub async fn screenshot(&mut self, width: u32) -> Vec<u8> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": 900, "deviceScaleFactor": 2, "mobile": true }),
        )
        .await;
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let data = r["data"].as_str().expect("screenshot data");
        use base64ct::Encoding;
        base64ct::Base64::decode_vec(data).expect("screenshot is base64")
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
