//! The gateway's HTTP side (`[http]`) from outside, against the real binary: `/metrics`
//! counts what really happened and parses with Prometheus's own `promtool`; `/readyz`
//! follows a real cloud Mosquitto going away and the spool filling; exposing the page
//! beyond loopback needs a login; and the status page, open in a real headless Chromium,
//! follows the cloud and a simulated Modbus device live, without a reload.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outpost_tests::broker::{Broker, mosquitto_mode, outpost_bin};
use outpost_tests::chromium::Chromium;
use outpost_tests::cloud::Cloud;
use outpost_tests::http::{get, http_port, metric, promtool_check, wait_metric};
use serde_json::Value;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Bound for what should follow within a few sample periods (the HTTP side samples once a
/// second; the bridge reconnects within 500 ms here).
const FOLLOW: Duration = Duration::from_secs(20);

/// Publishes `count` QoS 1 messages of `size` bytes on `topic` with mosquitto_pub (each
/// acknowledged, so a bridged one is in the spool when this returns).
fn publish(port: u16, topic: &str, count: u32, size: usize) {
    let payload = "x".repeat(size);
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t"])
        .arg(topic)
        .args(["-m", &payload, "--repeat", &count.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The retained `$SYS/broker/{name}` value as a mosquitto_sub sees it.
fn sys_value(port: u16, name: &str) -> Option<f64> {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-C",
            "1",
            "-W",
            "3",
            "-t",
        ])
        .arg(format!("$SYS/broker/{name}"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn http_config(extra: &str) -> String {
    format!(
        "gateway_id = \"gw-http\"\n[broker]\nlisteners = [{{ bind = \"127.0.0.1:0\" }}]\n\
         sys_interval = \"1s\"\n{extra}\n"
    )
}

#[test]
fn metrics_count_what_was_published_agree_with_sys_and_parse_with_promtool() {
    if mosquitto_mode() {
        return; // outpost's own endpoints
    }
    let broker = Broker::outpost_with_full_config(&http_config("[http]\nbind = \"127.0.0.1:0\""));
    let port = http_port(&broker);
    let text = wait_metric(port, "outpost_broker_up", FOLLOW, |v| v == 1.0);
    let received = "outpost_broker_messages_received_total";
    let base = metric(&text, received).expect("messages received");

    publish(broker.port(), "t/http/metrics", 25, 10);
    let text = wait_metric(port, received, FOLLOW, |v| v == base + 25.0);
    // The same counter through $SYS: one source of numbers.
    let deadline = Instant::now() + FOLLOW;
    loop {
        let sys = sys_value(broker.port(), "messages/received");
        if sys == Some(base + 25.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "$SYS/broker/messages/received says {sys:?}, /metrics {}",
            base + 25.0
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        metric(&text, "outpost_broker_received_bytes_total").is_some_and(|b| b >= 250.0),
        "{text}"
    );
    for series in ["process_resident_memory_bytes", "process_open_fds"] {
        assert!(
            metric(&text, series).is_some_and(|v| v > 0.0),
            "{series} missing or zero:\n{text}"
        );
    }
    // CPU time and uptime may still be under one tick or one second on a fast machine.
    for series in ["process_cpu_seconds_total", "outpost_uptime_seconds"] {
        assert!(
            metric(&text, series).is_some_and(|v| v >= 0.0),
            "{series} missing:\n{text}"
        );
    }
    promtool_check(&text);

    let r = get(port, "/metrics", None);
    assert!(
        r.headers.contains("text/plain; version=0.0.4"),
        "{}",
        r.headers
    );
    let h = get(port, "/healthz", None);
    assert_eq!(h.status, 200, "{h:?}");
    let v: Value = serde_json::from_str(&h.body).expect("healthz JSON");
    assert_eq!(v["status"], "alive", "{v}");
    assert_eq!(get(port, "/no-such-page", None).status, 404);
}

#[test]
fn readyz_follows_the_cloud_link_and_the_spool_fraction() {
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::new();
    cloud.start();
    let broker = Broker::outpost_with_full_config(&http_config(&format!(
        r#"[http]
bind = "127.0.0.1:0"
ready_spool_fraction = 0.1
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{port}"
topics = [{{ pattern = "data/#", direction = "out", qos = 1 }}]
reconnect = {{ min = "100ms", max = "500ms" }}
spool = {{ max_bytes = "8KiB" }}
"#,
        port = cloud.port
    )));
    let port = http_port(&broker);
    let connected = "outpost_bridge_connected{bridge=\"cloud\"}";
    let spool = "outpost_bridge_spool_messages{bridge=\"cloud\"}";
    wait_metric(port, connected, FOLLOW, |v| v == 1.0);
    let r = get(port, "/readyz", None);
    assert_eq!(r.status, 200, "{r:?}");

    cloud.stop();
    wait_metric(port, connected, FOLLOW, |v| v == 0.0);
    // Down, but the spool is empty: still ready by the configured fraction.
    let r = get(port, "/readyz", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("link down, but the spool"), "{}", r.body);

    // 10 acknowledged messages of ~130 bytes each take the spool past 10% of 8 KiB.
    publish(broker.port(), "data/a", 10, 100);
    let text = wait_metric(port, spool, FOLLOW, |v| v == 10.0);
    promtool_check(&text);
    assert!(
        metric(&text, "outpost_bridge_spool_bytes{bridge=\"cloud\"}").is_some_and(|b| b >= 1000.0),
        "{text}"
    );
    let deadline = Instant::now() + FOLLOW;
    let r = loop {
        let r = get(port, "/readyz", None);
        if r.status != 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(r.status, 503, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).expect("readyz JSON");
    assert_eq!(v["status"], "not ready", "{v}");
    let bridge = v["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "bridge cloud"))
        .unwrap_or_else(|| panic!("no bridge check in {v}"));
    assert_eq!(bridge["ok"], false, "{v}");
    let detail = bridge["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("link down") && detail.contains("10 messages"),
        "{detail}"
    );
    let broker_check = &v["checks"][0];
    assert_eq!(broker_check["ok"], true, "the broker still serves: {v}");

    // The cloud comes back: the spool drains and the gateway is ready again.
    cloud.start();
    let text = wait_metric(port, spool, FOLLOW, |v| v == 0.0);
    assert_eq!(
        metric(
            &text,
            "outpost_bridge_forwarded_messages_total{bridge=\"cloud\"}"
        ),
        Some(10.0),
        "{text}"
    );
    let deadline = Instant::now() + FOLLOW;
    while get(port, "/readyz", None).status != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready after the spool drained"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `outpost` with `args` and the config `text`; (exit success, stderr+stdout).
fn run_outpost(args: &[&str], text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, text).expect("write config");
    let mut child = Command::new(outpost_bin())
        .arg("--config")
        .arg(&path)
        .args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outpost");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("outpost output");
            panic!(
                "outpost {args:?} still runs after 10 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("outpost output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    )
}

fn password_hash(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(outpost_bin())
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("outpost passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let out = child.wait_with_output().expect("outpost passwd");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[test]
fn beyond_loopback_the_pages_need_a_login() {
    if mosquitto_mode() {
        return;
    }
    // Without a login configured, binding every address is refused by `check` and at start.
    let open = http_config("[http]\nbind = \"0.0.0.0:0\"");
    for args in [&["check"][..], &[][..]] {
        let (ok, out) = run_outpost(args, &open);
        assert!(
            !ok,
            "outpost {args:?} accepted an exposed [http] without users"
        );
        assert!(
            out.contains("http.bind") && out.contains("[[http.users]]"),
            "the error should name the key and the fix: {out}"
        );
    }

    let hash = password_hash("field-tech-7");
    let broker = Broker::outpost_with_full_config(&http_config(&format!(
        "[http]\nbind = \"0.0.0.0:0\"\nusers = [{{ name = \"tech\", password_hash = \"{hash}\" }}]"
    )));
    let port = http_port(&broker);
    for path in ["/", "/metrics", "/readyz", "/events", "/api/status"] {
        let r = get(port, path, None);
        assert_eq!(r.status, 401, "{path} without a login: {r:?}");
        assert!(
            r.headers
                .to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{}",
            r.headers
        );
    }
    assert_eq!(
        get(port, "/metrics", Some(("tech", "wrong"))).status,
        401,
        "a wrong password"
    );
    assert_eq!(
        get(port, "/metrics", Some(("nobody", "field-tech-7"))).status,
        401,
        "an unknown user"
    );
    let r = get(port, "/metrics", Some(("tech", "field-tech-7")));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("outpost_broker_up"), "{}", r.body);
    let page = get(port, "/", Some(("tech", "field-tech-7")));
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>Outpost status</title>"));
    // Liveness reveals nothing and is what a service manager probes: no login.
    assert_eq!(get(port, "/healthz", None).status, 200);
}

/// A Modbus TCP device whose input registers 0-1 hold 21.5 as an f32 and that, once
/// `silent` is set, stops answering (requests hang, as a device that lost power).
#[derive(Clone, Default)]
struct Device {
    silent: Arc<AtomicBool>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl Service for Device {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Answer;

    fn call(&self, req: Self::Request) -> Self::Future {
        if self.silent.load(Ordering::Relaxed) {
            return Box::pin(std::future::pending());
        }
        let out = match req.request {
            Request::ReadInputRegisters(0, 2) => {
                Ok(Some(Response::ReadInputRegisters(vec![0x41AC, 0x0000])))
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        };
        Box::pin(std::future::ready(out))
    }
}

async fn serve_device(device: Device) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio_modbus::server::tcp::Server::new(listener);
    tokio::spawn(async move {
        let on_connected = |stream, peer| {
            let d = device.clone();
            async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, move |_| {
                    Ok(Some(d.clone()))
                })
            }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    addr
}

/// What the page shows of the bridge and the device, read from its DOM.
const PAGE_STATE: &str = r#"(() => {
  const b = document.querySelector('.bridge[data-name="cloud"]');
  const d = document.querySelector('tr.device[data-name="boiler"]');
  return {
    bridge: b ? b.dataset.state : null,
    spool: b ? Number(b.dataset.spool) : -1,
    bridgeText: b ? b.innerText : "",
    device: d ? d.dataset.status : null,
    deviceText: d ? d.innerText : "",
    // null until the page has loaded
    live: (document.getElementById("live") || {}).textContent || null,
    marker: window.__sameDocument || null,
  };
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_chromium_follows_the_cloud_and_the_device_live() {
    if mosquitto_mode() {
        return;
    }
    let device = Device::default();
    let sim = serve_device(device.clone()).await;
    let mut cloud = Cloud::new();
    cloud.start();
    let broker = Broker::outpost_with_full_config(&http_config(&format!(
        r#"[http]
bind = "127.0.0.1:0"
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{cloud}"
topics = [{{ pattern = "data/#", direction = "out", qos = 1 }}]
reconnect = {{ min = "100ms", max = "500ms" }}
[sensors]
clock = "trusted"
[[sensors.modbus]]
name = "boiler"
transport = {{ tcp = {{ host = "127.0.0.1", port = {sim} }} }}
unit = 1
every = "300ms"
timeout = "300ms"
retries = 0
points = [{{ name = "temperature", kind = "input", address = 0, type = "f32", word_order = "big", unit = "°C" }}]
"#,
        cloud = cloud.port,
        sim = sim.port()
    )));
    let port = http_port(&broker);
    let mut page = Chromium::open(&format!("http://127.0.0.1:{port}/")).await;

    let v = page
        .wait_for(
            "the link up and the device online",
            PAGE_STATE,
            FOLLOW,
            |v| v["bridge"] == "up" && v["device"] == "online" && v["live"] == "live",
        )
        .await;
    assert!(
        v["bridgeText"]
            .as_str()
            .unwrap_or_default()
            .contains("link up"),
        "{v}"
    );
    // Anything from here on must arrive over the event stream: a reload would lose this.
    page.eval("window.__sameDocument = 'never reloaded'").await;

    cloud.stop();
    page.wait_for("the link down", PAGE_STATE, FOLLOW, |v| {
        v["bridge"] == "down"
            && v["bridgeText"]
                .as_str()
                .is_some_and(|t| t.contains("link down"))
    })
    .await;
    publish(broker.port(), "data/boiler", 5, 50);
    page.wait_for("5 messages spooled", PAGE_STATE, FOLLOW, |v| {
        v["spool"] == 5
    })
    .await;
    publish(broker.port(), "data/boiler", 7, 50);
    let v = page
        .wait_for("the spool growing to 12", PAGE_STATE, FOLLOW, |v| {
            v["spool"] == 12
        })
        .await;
    assert!(
        v["bridgeText"]
            .as_str()
            .unwrap_or_default()
            .contains("12 msgs"),
        "the spool depth is on the page as text: {v}"
    );

    device.silent.store(true, Ordering::Relaxed);
    let v = page
        .wait_for("the device offline", PAGE_STATE, FOLLOW, |v| {
            v["device"] == "offline" || v["device"] == "quarantined"
        })
        .await;
    let text = v["deviceText"].as_str().unwrap_or_default();
    assert!(
        text.contains("offline") || text.contains("quarantined"),
        "{v}"
    );
    assert!(text.contains("timeout"), "the row says why: {v}");
    assert_eq!(v["marker"], "never reloaded", "the page was reloaded: {v}");

    // The same state in /metrics, and the exposition with bridges and devices parses.
    let text = get(port, "/metrics", None).body;
    assert_eq!(
        metric(
            &text,
            "outpost_sensor_device_status{device=\"boiler\",status=\"online\"}"
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "outpost_sensor_device_poll_failures_total{device=\"boiler\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outpost_bridge_spool_messages{bridge=\"cloud\"}"),
        Some(12.0),
        "{text}"
    );
    promtool_check(&text);

    let png = page.screenshot(420).await;
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "not a PNG"
    );
    if let Some(path) = std::env::var_os("OUTPOST_SCREENSHOT") {
        std::fs::write(&path, &png).expect("write the screenshot");
    }
}

#[test]
fn https_with_the_same_certificate_options_as_the_broker() {
    if mosquitto_mode() {
        return;
    }
    let pki = tempfile::tempdir().expect("tempdir");
    let out = Command::new("openssl")
        .current_dir(pki.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .output()
        .expect("openssl CLI (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = pki.path().join("cert.pem");
    let broker = Broker::outpost_with_full_config(&http_config(&format!(
        "[http]\nbind = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}",
        cert.display(),
        pki.path().join("key.pem").display()
    )));
    let port = http_port(&broker);
    assert!(
        broker.log().contains("status page on https://"),
        "{}",
        broker.log()
    );
    let curl = |url: String, tls: bool| {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ]);
        if tls {
            c.arg("--cacert").arg(&cert);
        }
        let out = c.arg(url).output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        curl(format!("https://127.0.0.1:{port}/healthz"), true),
        "200"
    );
    assert_eq!(
        curl(format!("https://127.0.0.1:{port}/metrics"), true),
        "200"
    );
    // Plain HTTP on the HTTPS port gets no page.
    assert_ne!(
        curl(format!("http://127.0.0.1:{port}/metrics"), false),
        "200"
    );
}

#[test]
fn oversized_garbage_and_idle_connections_are_bounded() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    if mosquitto_mode() {
        return;
    }
    let broker = Broker::outpost_with_full_config(&http_config(
        "[http]\nbind = \"127.0.0.1:0\"\nmax_connections = 4",
    ));
    let port = http_port(&broker);
    let reply = |bytes: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let mut huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend(b"\r\n\r\n");
    let r = reply(&huge);
    assert!(r.starts_with("HTTP/1.1 431"), "a 64 KiB header: {r:.80}");
    let r = reply(b"\x16\x03\x01\x00\xff garbage that is not HTTP\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "garbage: {r:.80}");
    // A connection that never sends a request is closed (hyper's header timeout, 10 s),
    // so idle sockets cannot hold the few connection slots for ever.
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(&mut buf).ok(),
            Some(0),
            "an idle connection stays open"
        );
    }
    // And the server still serves.
    assert_eq!(get(port, "/healthz", None).status, 200);
}

#[test]
fn a_reload_keeps_the_http_listener_and_says_a_change_needs_a_restart() {
    if mosquitto_mode() {
        return;
    }
    let mut broker =
        Broker::outpost_with_full_config(&http_config("[http]\nbind = \"127.0.0.1:0\""));
    let port = http_port(&broker);
    broker.reload_with(&http_config(
        "[http]\nbind = \"127.0.0.1:0\"\nready_spool_fraction = 0.9",
    ));
    let deadline = Instant::now() + FOLLOW;
    while !broker.log().contains("only at the next restart: http") {
        assert!(
            Instant::now() < deadline,
            "the reload did not say that [http] needs a restart:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still served where it was.
    assert_eq!(get(port, "/healthz", None).status, 200);
}
