//! Test support: a Modbus device simulator (tokio-modbus server), socat pty pairs, a message collector.
#![allow(dead_code)]

use bytes::Bytes;
use outpost_sensors::{Command, SensorMessage, SensorsConfig};
use serde_json::Value as Json;
use std::collections::{HashMap, HashSet};
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Register areas of one simulated unit.
#[derive(Debug, Default, Clone)]
pub struct Bank {
    pub coils: HashMap<u16, bool>,
    pub discrete: HashMap<u16, bool>,
    pub input: HashMap<u16, u16>,
    pub holding: HashMap<u16, u16>,
    /// Addresses (in any area) whose read or write fails with this exception.
    pub faults: HashMap<u16, ExceptionCode>,
}

/// One request the simulator saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub unit: u8,
    pub fc: u8,
    pub start: u16,
    pub count: u16,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct SimState {
    pub units: HashMap<u8, Bank>,
    /// Units that never answer.
    pub dead: HashSet<u8>,
    pub seen: Vec<Seen>,
    pub writes: Vec<(u8, Request<'static>)>,
}

/// A simulated set of Modbus units, shared by TCP and RTU servers.
#[derive(Debug, Clone, Default)]
pub struct Sim(pub Arc<Mutex<SimState>>);

impl Sim {
    pub fn with<R>(&self, f: impl FnOnce(&mut SimState) -> R) -> R {
        f(&mut self.0.lock().unwrap())
    }
    pub fn bank<R>(&self, unit: u8, f: impl FnOnce(&mut Bank) -> R) -> R {
        self.with(|s| f(s.units.entry(unit).or_default()))
    }
    pub fn set_holding(&self, unit: u8, start: u16, regs: &[u16]) {
        self.bank(unit, |b| {
            for (i, r) in regs.iter().enumerate() {
                b.holding.insert(start + i as u16, *r);
            }
        });
    }
    pub fn set_input(&self, unit: u8, start: u16, regs: &[u16]) {
        self.bank(unit, |b| {
            for (i, r) in regs.iter().enumerate() {
                b.input.insert(start + i as u16, *r);
            }
        });
    }
    pub fn set_dead(&self, unit: u8, dead: bool) {
        self.with(|s| {
            if dead {
                s.dead.insert(unit);
            } else {
                s.dead.remove(&unit);
            }
        });
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }
    pub fn writes(&self) -> Vec<(u8, Request<'static>)> {
        self.with(|s| s.writes.clone())
    }

    fn handle(&self, unit: u8, req: Request<'static>) -> Result<Option<Response>, ExceptionCode> {
        let mut s = self.0.lock().unwrap();
        let (fc, start, count) = summary(&req);
        s.seen.push(Seen {
            unit,
            fc,
            start,
            count,
            at: Instant::now(),
        });
        if s.dead.contains(&unit) {
            return Ok(None);
        }
        let is_write = matches!(fc, 5 | 6 | 15 | 16);
        if is_write {
            s.writes.push((unit, req.clone()));
        }
        let bank = s.units.entry(unit).or_default();
        for a in start..start.saturating_add(count) {
            if let Some(e) = bank.faults.get(&a) {
                return Err(*e);
            }
        }
        let regs = |m: &HashMap<u16, u16>| {
            (start..start + count)
                .map(|a| m.get(&a).copied().unwrap_or(0))
                .collect::<Vec<_>>()
        };
        let bits = |m: &HashMap<u16, bool>| {
            (start..start + count)
                .map(|a| m.get(&a).copied().unwrap_or(false))
                .collect::<Vec<_>>()
        };
        let resp = match req {
            Request::ReadCoils(..) => Response::ReadCoils(bits(&bank.coils)),
            Request::ReadDiscreteInputs(..) => Response::ReadDiscreteInputs(bits(&bank.discrete)),
            Request::ReadInputRegisters(..) => Response::ReadInputRegisters(regs(&bank.input)),
            Request::ReadHoldingRegisters(..) => {
                Response::ReadHoldingRegisters(regs(&bank.holding))
            }
            Request::WriteSingleCoil(a, v) => {
                bank.coils.insert(a, v);
                Response::WriteSingleCoil(a, v)
            }
            Request::WriteMultipleCoils(a, v) => {
                for (i, b) in v.iter().enumerate() {
                    bank.coils.insert(a + i as u16, *b);
                }
                Response::WriteMultipleCoils(a, v.len() as u16)
            }
            Request::WriteSingleRegister(a, v) => {
                bank.holding.insert(a, v);
                Response::WriteSingleRegister(a, v)
            }
            Request::WriteMultipleRegisters(a, v) => {
                for (i, r) in v.iter().enumerate() {
                    bank.holding.insert(a + i as u16, *r);
                }
                Response::WriteMultipleRegisters(a, v.len() as u16)
            }
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        Ok(Some(resp))
    }
}

pub fn summary(req: &Request<'_>) -> (u8, u16, u16) {
    match req {
        Request::ReadCoils(a, n) => (1, *a, *n),
        Request::ReadDiscreteInputs(a, n) => (2, *a, *n),
        Request::ReadHoldingRegisters(a, n) => (3, *a, *n),
        Request::ReadInputRegisters(a, n) => (4, *a, *n),
        Request::WriteSingleCoil(a, _) => (5, *a, 1),
        Request::WriteSingleRegister(a, _) => (6, *a, 1),
        Request::WriteMultipleCoils(a, v) => (15, *a, v.len() as u16),
        Request::WriteMultipleRegisters(a, v) => (16, *a, v.len() as u16),
        _ => (0, 0, 0),
    }
}

impl Service for Sim {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(self.handle(req.slave, req.request))
    }
}

/// Serves the simulator on an ephemeral loopback TCP port until dropped.
pub struct TcpSim {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn tcp_sim(sim: Sim) -> TcpSim {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let task = tokio::spawn(async move {
        let on_connected = |stream, socket_addr| {
            let sim = sim.clone();
            async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, socket_addr, move |_| {
                    Ok(Some(sim.clone()))
                })
            }
        };
        let _ = server.serve(&on_connected, |_err| {}).await;
    });
    TcpSim { addr, task }
}

/// A socat pty pair; socat is killed by PID on drop.
pub struct PtyPair {
    pub dir: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
    child: Option<Child>,
}

impl PtyPair {
    pub fn new() -> PtyPair {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let mut p = PtyPair {
            dir,
            a,
            b,
            child: None,
        };
        p.start();
        p
    }

    /// Starts socat (again) with the same link names, as a replugged adapter would reappear.
    pub fn start(&mut self) {
        let _ = std::fs::remove_file(&self.a);
        let _ = std::fs::remove_file(&self.b);
        let child = Proc::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", self.a.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.b.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(self.a.exists() && self.b.exists()) {
            assert!(
                Instant::now() < deadline,
                "socat did not create the pty links"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills socat, as if the adapter were unplugged.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves the simulator as RTU slaves on a serial port until dropped.
pub fn rtu_sim(sim: Sim, port: &Path) -> tokio::task::JoinHandle<()> {
    use tokio_serial::SerialPortBuilderExt;
    let serial = tokio_serial::new(port.to_string_lossy(), 9600)
        .open_native_async()
        .unwrap();
    let server = tokio_modbus::server::rtu::Server::new(serial);
    tokio::spawn(async move {
        let _ = server.serve_forever(sim).await;
    })
}

/// A running sensor layer with its channels.
pub struct Layer {
    pub rx: mpsc::Receiver<SensorMessage>,
    pub cmd: mpsc::Sender<Command>,
    pub shutdown: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Result<(), outpost_sensors::SensorsError>>,
    pub stats: Arc<outpost_sensors::Stats>,
    /// Every message received so far.
    pub log: Vec<(Instant, SensorMessage)>,
}

pub fn parse_config(toml_src: &str) -> SensorsConfig {
    #[derive(serde::Deserialize)]
    struct Root {
        sensors: SensorsConfig,
    }
    let root: Root = toml::from_str(toml_src).unwrap_or_else(|e| panic!("config: {e}"));
    root.sensors.validate().unwrap();
    root.sensors
}

pub fn start(toml_src: &str) -> Layer {
    let config = parse_config(toml_src);
    let (tx, rx) = mpsc::channel(1024);
    let (cmd, cmd_rx) = mpsc::channel(16);
    let (shutdown, sd_rx) = watch::channel(false);
    let stats = Arc::new(outpost_sensors::Stats::default());
    let task = tokio::spawn(outpost_sensors::run_with_stats(
        config,
        "gw".into(),
        tx,
        cmd_rx,
        sd_rx,
        Arc::clone(&stats),
    ));
    Layer {
        rx,
        cmd,
        shutdown,
        task,
        stats,
        log: Vec::new(),
    }
}

impl Layer {
    /// Waits for a message matching `pred`, up to `within`.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&SensorMessage) -> bool,
    ) -> Option<SensorMessage> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            self.log.push((Instant::now(), m.clone()));
            if pred(&m) {
                return Some(m);
            }
        }
    }

    /// Waits for a reading on `topic` whose JSON satisfies `pred`.
    pub async fn wait_json(
        &mut self,
        within: Duration,
        topic: &str,
        mut pred: impl FnMut(&Json) -> bool,
    ) -> Option<Json> {
        let m = self
            .wait_for(within, |m| {
                m.topic == topic
                    && serde_json::from_slice::<Json>(&m.payload)
                        .map(|j| pred(&j))
                        .unwrap_or(false)
            })
            .await?;
        serde_json::from_slice(&m.payload).ok()
    }

    /// The first logged reading on `topic` matching `pred`, or the next one to arrive.
    pub async fn seen_or_wait(
        &mut self,
        within: Duration,
        topic: &str,
        mut pred: impl FnMut(&Json) -> bool,
    ) -> Option<Json> {
        let hit = self
            .log
            .iter()
            .filter(|(_, m)| m.topic == topic)
            .filter_map(|(_, m)| serde_json::from_slice::<Json>(&m.payload).ok())
            .find(|j| pred(j));
        match hit {
            Some(j) => Some(j),
            None => self.wait_json(within, topic, pred).await,
        }
    }

    /// Collects everything for `d`.
    pub async fn drain_for(&mut self, d: Duration) {
        let _ = self.wait_for(d, |_| false).await;
    }

    pub async fn command(&self, topic: &str, payload: &str) {
        self.cmd
            .send(Command {
                topic: topic.into(),
                payload: Bytes::from(payload.to_string()),
            })
            .await
            .unwrap();
    }

    /// Last JSON seen on a topic.
    pub fn last(&self, topic: &str) -> Option<Json> {
        self.log
            .iter()
            .rev()
            .find(|(_, m)| m.topic == topic)
            .and_then(|(_, m)| serde_json::from_slice(&m.payload).ok())
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let r = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("layer stops promptly");
        r.unwrap().unwrap();
    }
}
