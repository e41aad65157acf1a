//! Test helpers: a real Mosquitto as the cloud (ephemeral loopback port, killed by PID on
//! drop), a rumqttc subscriber that counts arrivals, and bridge config builders.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_bridge::BridgeConfig;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn mosquitto_bin() -> String {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// A Mosquitto broker playing the cloud. `persistence` keeps sessions across `restart`.
pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl Cloud {
    /// Start with `extra` config lines appended (listeners beyond the first, TLS, max_qos).
    pub fn start(extra: &str) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to its own user; it must write its database here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nlog_dest stderr\n{extra}\n",
            dir.path().display()
        );
        std::fs::write(&conf, text).unwrap();
        let mut cloud = Cloud {
            dir,
            port,
            conf,
            child: None,
        };
        cloud.spawn();
        cloud
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto runs");
        self.child = Some(child);
        wait_port(self.port);
    }

    /// SIGTERM (Mosquitto saves its sessions), wait for exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("port {port} never opened");
}

/// One message seen by the subscriber.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
}

/// A rumqttc subscriber on the cloud; collects every PUBLISH it receives.
pub struct Subscriber {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
    client: AsyncClient,
}

impl Subscriber {
    /// Connect with a persistent session (`id` fixed), subscribe `filter` at QoS 2 and
    /// wait for the SUBACK.
    pub async fn connect(port: u16, id: &str, filter: &str) -> Subscriber {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(opts, 1000);
        client.subscribe(filter, QoS::ExactlyOnce).await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Wait for SUBACK here so callers know the subscription exists.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no SUBACK from mosquitto");
            match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => record(&seen, &p),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscriber: {e}"),
                Err(_) => panic!("subscriber: no event"),
            }
        }
        let task = tokio::spawn(pump(events, seen.clone()));
        Subscriber { seen, task, client }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait until `n` messages arrived (or time out), then a little longer to catch extras.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.snapshot()
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

fn record(seen: &Arc<Mutex<Vec<Seen>>>, p: &rumqttc::Publish) {
    seen.lock().unwrap().push(Seen {
        topic: p.topic.clone(),
        payload: String::from_utf8_lossy(&p.payload).into_owned(),
        qos: p.qos,
        retain: p.retain,
    });
}

async fn pump(mut events: EventLoop, seen: Arc<Mutex<Vec<Seen>>>) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => record(&seen, &p),
            Ok(_) => {}
            // The cloud restarts in some tests: keep polling, rumqttc reconnects.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Bridge logs on stderr when RUST_LOG is set (shown for failing tests).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A bridge config for `port`, with extra TOML lines.
pub fn bridge_config(name: &str, address: &str, extra: &str) -> BridgeConfig {
    init_logs();
    let text = format!(
        "name = \"{name}\"\naddress = \"{address}\"\nkeep_alive = \"5s\"\nstats_interval = \"1s\"\n{extra}\n"
    );
    let mut cfg: BridgeConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    cfg.reconnect.min = Duration::from_millis(100);
    cfg.reconnect.max = Duration::from_millis(400);
    cfg.reconnect.connect_timeout = Duration::from_secs(3);
    cfg
}

/// Count payloads: payload -> number of arrivals.
pub fn tally(seen: &[Seen]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for s in seen {
        *m.entry(s.payload.clone()).or_insert(0) += 1;
    }
    m
}

/// Publish one message on the cloud with rumqttc and wait for its acknowledgement.
pub async fn cloud_publish(port: u16, topic: &str, payload: &str, qos: QoS, retain: bool) {
    let opts = MqttOptions::new(format!("pub-{}", free_port()), "127.0.0.1", port);
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .publish(topic, qos, retain, payload.as_bytes().to_vec())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "publish not acknowledged");
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)))) => break,
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))) if qos == QoS::AtMostOnce => {
                break;
            }
            Ok(Ok(_)) => {}
            other => panic!("publisher: {other:?}"),
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
}

/// A TCP proxy in front of the cloud that can silently swallow traffic (both ways, or only
/// what the bridge sends) while keeping the sockets open: a half-open link, as a dead
/// cellular modem produces.
pub struct Blackhole {
    pub port: u16,
    pub swallow: Arc<std::sync::atomic::AtomicBool>,
    pub swallow_up: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(upstream: u16) -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let swallow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swallow_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (both, up_only) = (swallow.clone(), swallow_up.clone());
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pipe(dr, uw, vec![both.clone(), up_only.clone()]));
                tokio::spawn(pipe(ur, dw, vec![both.clone()]));
            }
        });
        Blackhole {
            port,
            swallow,
            swallow_up,
            task,
        }
    }

    pub fn set_swallow(&self, on: bool) {
        self.swallow.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Swallow only what the bridge sends to the cloud.
    pub fn set_swallow_up(&self, on: bool) {
        self.swallow_up
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    swallow: Vec<Arc<std::sync::atomic::AtomicBool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if swallow
            .iter()
            .any(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A proxy in front of the cloud that forwards everything but closes each connection 100 ms
/// after the first PUBACK it passes to the bridge (nothing more reaches the bridge): a cloud
/// that acknowledges a message and then disconnects the client for it (as brokers do for
/// policy violations).
pub struct CloseAfterFirstPuback {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl CloseAfterFirstPuback {
    pub async fn start(upstream: u16) -> CloseAfterFirstPuback {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pipe(dr, uw, Vec::new()));
                tokio::spawn(forward_until_puback(ur, dw));
            }
        });
        CloseAfterFirstPuback { port, task }
    }
}

impl Drop for CloseAfterFirstPuback {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Length of the first complete MQTT packet in `buf`, if there is one.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 2 + i + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

async fn forward_until_puback(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        while let Some(n) = frame_len(&buf) {
            let frame: Vec<u8> = buf.drain(..n).collect();
            if to.write_all(&frame).await.is_err() {
                return;
            }
            if frame[0] & 0xf0 == 0x40 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = to.shutdown().await;
                return;
            }
        }
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
