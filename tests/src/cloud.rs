//! A real Mosquitto playing the cloud broker for bridge tests, and a persistent
//! `mosquitto_sub` collecting what reaches it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use outpost_mqtt::{Packet, Protocol, PubResponse, QoS};

use crate::ports::{ReservedPort, reserve_port};
use crate::raw::{RawClient, connect_packet, publish};

const WAIT: Duration = Duration::from_secs(10);

/// A real Mosquitto playing the cloud, with persistence so its sessions survive restarts.
pub struct Cloud {
    dir: tempfile::TempDir,
    /// The cloud's TCP port on 127.0.0.1.
    pub port: u16,
    /// Keeps `port` this cloud's while it is down, so the bridge under test never reaches
    /// another test's broker there.
    _reserved: ReservedPort,
    child: Option<Child>,
}

impl Cloud {
    /// Prepares the cloud's config without starting it.
    pub fn new() -> Cloud {
        Cloud::with_limits("max_queued_messages 0\nmax_inflight_messages 0\n")
    }

    /// Like [`Cloud::new`], with Mosquitto's queue and in-flight settings given.
    pub fn with_limits(limits: &str) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to its own user and must write its database.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let reserved = reserve_port();
        let port = reserved.port();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n{limits}",
                dir.path().display()
            ),
        )
        .unwrap();
        Cloud {
            dir,
            port,
            _reserved: reserved,
            child: None,
        }
    }

    /// A cloud that has a persistent `collector` session on `up/#` and is now down: what
    /// the bridge forwards once it is back waits there for the collector.
    pub fn down_with_collector() -> Cloud {
        let mut cloud = Cloud::new();
        cloud.start();
        CloudSubscriber::register(&cloud, "collector", "up/#");
        cloud.stop();
        cloud
    }

    /// Starts Mosquitto and waits until it listens.
    pub fn start(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "cloud mosquitto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the node dies at once; what it had not saved is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: Mosquitto saves its database (sessions, queued messages) on the way out.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Default for Cloud {
    fn default() -> Cloud {
        Cloud::new()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A persistent QoS 2 session at the cloud that collects what the bridge forwards.
pub struct CloudSubscriber {
    /// The `mosquitto_sub` process.
    pub child: Child,
    out: PathBuf,
}

impl CloudSubscriber {
    /// Subscribes `filter` as client `id` with clean session off, so the cloud queues for
    /// it while it is away; exits after `count` messages or `secs` seconds.
    pub fn start(
        cloud: &Cloud,
        id: &str,
        filter: &str,
        count: usize,
        secs: u32,
    ) -> CloudSubscriber {
        CloudSubscriber::start_at(cloud.port, cloud.dir.path(), id, filter, count, secs)
    }

    /// Like [`CloudSubscriber::start`], for any broker on 127.0.0.1:`port`; its output
    /// goes to a file in `dir`.
    pub fn start_at(
        port: u16,
        dir: &std::path::Path,
        id: &str,
        filter: &str,
        count: usize,
        secs: u32,
    ) -> CloudSubscriber {
        let out = dir.join(format!("{id}.out"));
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-i",
                id,
                "-c",
                "-q",
                "2",
            ])
            .args([
                "-t",
                filter,
                "-v",
                "-C",
                &count.to_string(),
                "-W",
                &secs.to_string(),
            ])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        CloudSubscriber { child, out }
    }

    /// Registers the persistent session and leaves.
    pub fn register(cloud: &Cloud, id: &str, filter: &str) {
        let mut s = CloudSubscriber::start(cloud, id, filter, 1, 1);
        let _ = s.child.wait();
    }

    /// What it printed so far (`topic payload` lines).
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits for it to exit and returns its lines.
    pub fn wait(mut self) -> Vec<String> {
        let _ = self.child.wait();
        self.lines()
    }
}

/// Publishes `n` messages on `topic` with payloads "0".."n-1" from a raw 3.1.1 client and
/// waits for every acknowledgement (PUBACK, or PUBREC/PUBREL/PUBCOMP), keeping up to 50
/// in flight.
pub async fn publish_acked(port: u16, client: &str, topic: &str, qos: QoS, n: u16) {
    let (mut c, _) = RawClient::connect(port, connect_packet(Protocol::V3_1_1, client, true)).await;
    let (mut next, mut done, mut inflight) = (0u16, 0u16, 0u16);
    while done < n {
        while next < n && inflight < 50 {
            c.send(&Packet::Publish(publish(
                topic,
                qos,
                Some(next + 1),
                next.to_string().as_bytes(),
            )))
            .await;
            next += 1;
            inflight += 1;
        }
        match c.expect_packet(WAIT).await {
            Packet::PubAck(_) | Packet::PubComp(_) => {
                done += 1;
                inflight -= 1;
            }
            Packet::PubRec(r) => c.send(&Packet::PubRel(PubResponse::new(r.packet_id))).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    c.disconnect().await;
}

/// Numeric payloads per topic, in arrival order, from `topic payload` lines.
pub fn by_topic(lines: &[String]) -> HashMap<String, Vec<u32>> {
    let mut m: HashMap<String, Vec<u32>> = HashMap::new();
    for l in lines {
        if let Some((t, p)) = l.split_once(' ') {
            m.entry(t.to_owned())
                .or_default()
                .push(p.parse().unwrap_or(u32::MAX));
        }
    }
    m
}
