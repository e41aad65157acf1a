//! Modbus RTU over a socat pty pair: requests per poll cycle with coalescing, and bus
//! utilisation against the theoretical wire time at the configured baud.
//!
//! `cargo run --release -p outpost-sensors --example rtu_bench -- [baud] [seconds]` (defaults 9600, 10).
//! A pty transfers instantly, so `utilisation` (measured) is what the gateway spends; the
//! `wire_utilisation` is what the same bytes and 3.5-character gaps need on a real RS-485 line.

use std::future::{Ready, ready};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_serial::SerialPortBuilderExt;

type Seen = Arc<std::sync::Mutex<std::collections::HashMap<(u8, u8, u16, u16), u64>>>;

#[derive(Clone)]
struct Bus(Arc<AtomicU64>, Seen);

impl Service for Bus {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.0.fetch_add(1, Ordering::Relaxed);
        let shape = match &req.request {
            Request::ReadHoldingRegisters(a, n) => (3, *a, *n),
            Request::ReadInputRegisters(a, n) => (4, *a, *n),
            Request::ReadCoils(a, n) => (1, *a, *n),
            _ => (0, 0, 0),
        };
        if let Ok(mut m) = self.1.lock() {
            *m.entry((req.slave, shape.0, shape.1, shape.2)).or_default() += 1;
        }
        ready(match req.request {
            Request::ReadHoldingRegisters(a, n) => Ok(Some(Response::ReadHoldingRegisters(
                (0..n).map(|i| a.wrapping_add(i)).collect(),
            ))),
            Request::ReadInputRegisters(a, n) => Ok(Some(Response::ReadInputRegisters(
                (0..n).map(|i| a.wrapping_add(i)).collect(),
            ))),
            Request::ReadCoils(_, n) => Ok(Some(Response::ReadCoils(vec![true; n as usize]))),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

struct Socat(std::process::Child);
impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// A typical energy meter map: voltages/currents/powers as f32 in 0..=35 (with unused gaps),
// energy counters as u64 at 100.., status coils; three meters on the line.
const POINTS: &str = r#"
  { name = "v1", kind = "input", address = 0, type = "f32" }, { name = "v2", kind = "input", address = 2, type = "f32" },
  { name = "v3", kind = "input", address = 4, type = "f32" }, { name = "i1", kind = "input", address = 6, type = "f32" },
  { name = "i2", kind = "input", address = 8, type = "f32" }, { name = "i3", kind = "input", address = 10, type = "f32" },
  { name = "p1", kind = "input", address = 12, type = "f32" }, { name = "p2", kind = "input", address = 14, type = "f32" },
  { name = "p3", kind = "input", address = 16, type = "f32" }, { name = "pf", kind = "input", address = 30, type = "f32" },
  { name = "hz", kind = "input", address = 34, type = "f32" },
  { name = "e_imp", kind = "holding", address = 100, type = "u64" }, { name = "e_exp", kind = "holding", address = 104, type = "u64" },
  { name = "alarm", kind = "coil", address = 0 }, { name = "relay", kind = "coil", address = 1 },
"#;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let baud: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(9600);
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let _socat = Socat(
        Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(a.exists() && b.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let served = Arc::new(AtomicU64::new(0));
    let port = tokio_serial::new(b.to_string_lossy(), baud)
        .open_native_async()
        .expect("pty");
    let seen: Seen = Arc::default();
    let bus = Bus(Arc::clone(&served), Arc::clone(&seen));
    tokio::spawn(async move {
        tokio_modbus::server::rtu::Server::new(port)
            .serve_forever(bus)
            .await
    });

    let mut cfg = String::from("[sensors]\nstats_interval = \"0s\"\n");
    for unit in 1..=3 {
        cfg.push_str(&format!(
            "[[sensors.modbus]]\nname = \"meter{unit}\"\nunit = {unit}\nevery = \"1s\"\nmax_gap = 16\ntransport = {{ rtu = {{ port = \"{}\", baud = {baud}, parity = \"even\" }} }}\npoints = [{POINTS}]\n",
            a.display()
        ));
    }
    #[derive(serde::Deserialize)]
    struct Root {
        sensors: outpost_sensors::SensorsConfig,
    }
    let config = toml::from_str::<Root>(&cfg).expect("config").sensors;
    let npoints: usize = config.modbus.iter().map(|d| d.points.len()).sum();
    let (tx, mut rx) = mpsc::channel(4096);
    let (_cmd, cmd_rx) = mpsc::channel(1);
    let (sd, sd_rx) = watch::channel(false);
    let stats = Arc::new(outpost_sensors::Stats::default());
    let layer = tokio::spawn(outpost_sensors::run_with_stats(
        config,
        "bench".into(),
        tx,
        cmd_rx,
        sd_rx,
        Arc::clone(&stats),
    ));
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let line = &stats.lines()[0];
    let requests = line.requests.load(Ordering::Relaxed);
    let shapes = seen.lock().map(|m| m.clone()).unwrap_or_default();
    let cycles = shapes.values().copied().max().unwrap_or(1);
    let mut distinct: Vec<_> = shapes.keys().copied().collect();
    distinct.sort();
    println!(
        "baud={baud} devices=3 points={npoints} requests={requests} served={} cycles={cycles} window={seconds}s",
        served.load(Ordering::Relaxed)
    );
    println!(
        "requests/cycle={:.2} distinct reads (unit, fc, start, count)={distinct:?}",
        requests as f64 / cycles as f64
    );
    println!(
        "bytes_tx={} bytes_rx={} utilisation={:.4} wire_utilisation={:.4} (theoretical wire time at {baud} baud, 11 bits/char, excl. 3.5-char gaps)",
        line.bytes_tx.load(Ordering::Relaxed),
        line.bytes_rx.load(Ordering::Relaxed),
        line.utilisation(),
        line.wire_utilisation()
    );
    let _ = sd.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), layer).await;
}
