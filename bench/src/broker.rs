//! The broker under test: spawned from a command line (and killed by PID on drop) or
//! attached to by PID, so /proc can be sampled either way.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use outpost_mqtt::Protocol;

use crate::conn;

/// A broker process the bench measures.
pub struct Broker {
    pid: u32,
    child: Option<Child>,
}

impl Broker {
    /// Starts `cmd` (program and arguments) with output discarded, or appended to `log`.
    pub fn spawn(cmd: &[String], log: Option<&std::path::Path>) -> Result<Broker> {
        let (program, args) = cmd.split_first().context("empty broker command")?;
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null());
        match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening broker log {}", path.display()))?;
                command.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning broker {cmd:?}"))?;
        Ok(Broker {
            pid: child.id(),
            child: Some(child),
        })
    }

    /// Attaches to a running broker; it is left running on drop.
    pub fn attach(pid: u32) -> Result<Broker> {
        if !std::path::Path::new(&format!("/proc/{pid}/stat")).exists() {
            bail!("no process with PID {pid}");
        }
        Ok(Broker { pid, child: None })
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails if a spawned broker has already exited (a bad config, a port in use).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("broker (PID {}) exited early: {status}", self.pid);
        }
        Ok(())
    }

    /// Stops a spawned broker: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(self.pid as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// Waits until the broker at `addr` answers a CONNECT with a CONNACK; returns how long
/// that took. Polls every millisecond so it can also time startup.
pub async fn wait_ready(
    addr: SocketAddr,
    protocol: Protocol,
    broker: Option<&mut Broker>,
    limit: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let mut broker = broker;
    let mut last_err = None;
    while start.elapsed() < limit {
        if let Some(b) = broker.as_deref_mut() {
            b.check_alive()?;
        }
        match conn::connect(
            addr,
            protocol,
            "outpost-bench-ready",
            30,
            Duration::from_secs(2),
        )
        .await
        {
            Ok(mut c) => {
                let elapsed = start.elapsed();
                c.disconnect().await;
                return Ok(elapsed);
            }
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bail!("broker at {addr} not accepting MQTT connections after {limit:?}: {last_err:?}")
}
