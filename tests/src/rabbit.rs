//! A real RabbitMQ (Debian's `rabbitmq-server` with its MQTT plugin) playing a cloud that
//! is not Mosquitto: MQTT 3.1.1 only (3.10), no QoS 2 (a QoS 2 PUBLISH is answered with
//! PUBACK), sessions as durable queues; alone ([`Rabbit`]) or as a cluster of nodes that
//! share client ids and sessions ([`RabbitCluster`]).
//!
//! Every node has its own name and data directory; the nodes of a test share one Erlang
//! cookie and their own `epmd` on a free loopback port, so a test neither needs nor
//! disturbs a system RabbitMQ, and every process it starts is stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;

/// RabbitMQ takes 10–20 s to boot on a loaded 2-core machine.
const BOOT: Duration = Duration::from_secs(120);
const BIN: &str = "/usr/lib/rabbitmq/bin";

/// One node's identity and ports.
struct Node {
    name: String,
    port: u16,
    dist_port: u16,
    child: Option<Child>,
}

/// What the nodes of one test share: a directory (the cookie lives in it, as `HOME`) and
/// an `epmd`.
struct Shared {
    dir: tempfile::TempDir,
    epmd_port: u16,
    epmd: Option<Child>,
}

impl Shared {
    fn new() -> Shared {
        assert!(
            Path::new(BIN).join("rabbitmq-server").exists(),
            "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("enabled_plugins"), "[rabbitmq_mqtt].\n")
            .expect("write enabled_plugins");
        let epmd_port = free_port();
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd (installed with rabbitmq-server)");
        Shared {
            dir,
            epmd_port,
            epmd: Some(epmd),
        }
    }

    fn node(&self, tag: &str) -> Node {
        let port = free_port();
        let node = Node {
            name: format!("outpost-test-{}-{tag}-{port}@localhost", std::process::id()),
            port,
            dist_port: free_port(),
            child: None,
        };
        std::fs::write(
            self.conf(&node),
            format!(
                "listeners.tcp = none\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{port}\n\
                 mqtt.allow_anonymous = true\n\
                 loopback_users = none\n\
                 log.console = true\n\
                 log.file = false\n"
            ),
        )
        .expect("write rabbitmq.conf");
        node
    }

    fn conf(&self, node: &Node) -> PathBuf {
        self.dir.path().join(format!("{}.conf", node.port))
    }

    fn log_path(&self, node: &Node) -> PathBuf {
        self.dir.path().join(format!("{}.log", node.port))
    }

    /// The environment every RabbitMQ command of these nodes runs with.
    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("HOME", self.dir.path())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
    }

    fn spawn(&self, node: &mut Node) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(node))
            .expect("rabbit log");
        let mut cmd = Command::new(Path::new(BIN).join("rabbitmq-server"));
        self.env(&mut cmd)
            .env("RABBITMQ_CONFIG_FILE", self.conf(node))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env(
                "RABBITMQ_MNESIA_BASE",
                d.join(format!("mnesia-{}", node.port)),
            )
            .env("RABBITMQ_LOG_BASE", d.join(format!("log-{}", node.port)))
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            // Exec the Erlang VM in place of the wrapper script, so the PID we hold is
            // the node's and SIGTERM stops it cleanly.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        node.child = Some(cmd.spawn().expect("rabbitmq-server"));
    }

    /// Waits until every node in `nodes` answers MQTT.
    fn wait_up(&self, nodes: &mut [Node]) {
        let deadline = Instant::now() + BOOT;
        for node in nodes.iter_mut() {
            while std::net::TcpStream::connect(("127.0.0.1", node.port)).is_err() {
                if let Some(c) = node.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    panic!("rabbitmq-server exited ({status}):\n{}", self.log(node));
                }
                assert!(
                    Instant::now() < deadline,
                    "RabbitMQ did not listen within {BOOT:?}:\n{}",
                    self.log(node)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `rabbitmqctl -n NODE ARGS`, which must succeed.
    fn ctl(&self, node: &Node, args: &[&str]) {
        let mut cmd = Command::new(Path::new(BIN).join("rabbitmqctl"));
        let out = self
            .env(&mut cmd)
            .arg("-n")
            .arg(&node.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {}: {}{}",
            node.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log(&self, node: &Node) -> String {
        std::fs::read_to_string(self.log_path(node)).unwrap_or_default()
    }

    fn stop(node: &mut Node) {
        if let Some(mut c) = node.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }
    }

    fn kill9(node: &mut Node) {
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(mut c) = self.epmd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One RabbitMQ node listening for MQTT on 127.0.0.1:`port`.
pub struct Rabbit {
    node: Node,
    /// The MQTT port on 127.0.0.1.
    pub port: u16,
    // Dropped after the node (fields drop in order), so epmd outlives it.
    shared: Shared,
}

impl Rabbit {
    /// Prepares a node (config, data directory, its own epmd) without starting it.
    pub fn new() -> Rabbit {
        let shared = Shared::new();
        let node = shared.node("single");
        Rabbit {
            port: node.port,
            node,
            shared,
        }
    }

    /// Starts the node (with the data it had, after [`Rabbit::stop`]) and waits until MQTT
    /// answers.
    pub fn start(&mut self) {
        self.shared.spawn(&mut self.node);
        self.shared.wait_up(std::slice::from_mut(&mut self.node));
    }

    /// SIGTERM: a clean stop; durable queues and their persistent messages stay on disk.
    pub fn stop(&mut self) {
        Shared::stop(&mut self.node);
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        self.shared.log(&self.node)
    }

    /// The directory subscribers may write their output to.
    pub fn dir(&self) -> &Path {
        self.shared.dir.path()
    }
}

impl Default for Rabbit {
    fn default() -> Rabbit {
        Rabbit::new()
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        Shared::kill9(&mut self.node);
    }
}

/// A cluster of RabbitMQ nodes, each with its own MQTT port; MQTT client ids and sessions
/// are cluster-wide (client-id tracking needs a majority of the nodes up).
pub struct RabbitCluster {
    nodes: Vec<Node>,
    shared: Shared,
}

impl RabbitCluster {
    /// Starts `n` nodes and joins the others to the first; returns once all answer MQTT.
    pub fn start(n: usize) -> RabbitCluster {
        let shared = Shared::new();
        let mut nodes: Vec<Node> = (0..n).map(|i| shared.node(&format!("n{i}"))).collect();
        for node in nodes.iter_mut() {
            shared.spawn(node);
        }
        shared.wait_up(&mut nodes);
        let first = nodes[0].name.clone();
        for node in &nodes[1..] {
            shared.ctl(node, &["stop_app"]);
            shared.ctl(node, &["join_cluster", &first]);
            shared.ctl(node, &["start_app"]);
        }
        shared.wait_up(&mut nodes);
        RabbitCluster { nodes, shared }
    }

    /// Node `i`'s MQTT port on 127.0.0.1.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// SIGKILL node `i`: it dies at once and its clients' connections break.
    pub fn kill9(&mut self, i: usize) {
        Shared::kill9(&mut self.nodes[i]);
    }

    /// Every node's log so far.
    pub fn log(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {}\n{}", n.name, self.shared.log(n)))
            .collect()
    }

    /// The directory subscribers may write their output to.
    pub fn dir(&self) -> &Path {
        self.shared.dir.path()
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            Shared::kill9(node);
        }
    }
}
