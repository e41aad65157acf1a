//! A real RabbitMQ (Debian's `rabbitmq-server` with its MQTT plugin) playing a cloud that
//! is not Mosquitto: MQTT 3.1.1 only (3.10), no QoS 2 (a QoS 2 PUBLISH is answered with
//! PUBACK), sessions as durable queues.
//!
//! Each instance is its own node (own name, data directory, Erlang cookie) with its own
//! `epmd` on a free loopback port, so it neither needs nor disturbs a system RabbitMQ,
//! and every process it starts is stopped by PID.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::broker::free_port;

/// RabbitMQ takes 10–20 s to boot on a loaded 2-core machine.
const BOOT: Duration = Duration::from_secs(120);
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// One RabbitMQ node listening for MQTT on 127.0.0.1:`port`.
pub struct Rabbit {
    dir: tempfile::TempDir,
    /// The MQTT port on 127.0.0.1.
    pub port: u16,
    epmd_port: u16,
    dist_port: u16,
    name: String,
    epmd: Option<Child>,
    node: Option<Child>,
}

impl Rabbit {
    /// Prepares a node (config, data directory, its own epmd) without starting it.
    pub fn new() -> Rabbit {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let (epmd_port, dist_port) = (free_port(), free_port());
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
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
        std::fs::write(dir.path().join("enabled_plugins"), "[rabbitmq_mqtt].\n")
            .expect("write enabled_plugins");
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd (installed with rabbitmq-server)");
        Rabbit {
            name: format!("outpost-test-{}-{port}@localhost", std::process::id()),
            dir,
            port,
            epmd_port,
            dist_port,
            epmd: Some(epmd),
            node: None,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("rabbit.log")
    }

    /// Starts the node (with the data it had, after [`Rabbit::stop`]) and waits until MQTT
    /// answers.
    pub fn start(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("rabbit log");
        let node = Command::new(SERVER)
            .env("HOME", d)
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // Exec the Erlang VM in place of the wrapper script, so the PID we hold is
            // the node's and SIGTERM stops it cleanly.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server");
        self.node = Some(node);
        let deadline = Instant::now() + BOOT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(node) = self.node.as_mut()
                && let Ok(Some(status)) = node.try_wait()
            {
                panic!("rabbitmq-server exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ did not listen within {BOOT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM: a clean stop; durable queues and their persistent messages stay on disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.node.take() {
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

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The directory subscribers may write their output to.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Default for Rabbit {
    fn default() -> Rabbit {
        Rabbit::new()
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        for child in [self.node.take(), self.epmd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
