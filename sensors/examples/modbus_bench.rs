//! Modbus TCP load test: N simulated devices (in a child process) polled by the sensor layer.
//!
//! `cargo run --release -p outpost-sensors --example modbus_bench -- [devices] [points] [seconds]`
//! (defaults 500, 30, 10). Every point is reported every poll (`report = "every"`), so
//! messages/s is points/s; CPU is this process's user+system time (the simulator runs in a
//! separate process and is not counted).

use std::future::{Ready, ready};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

#[derive(Clone)]
struct Device(Instant);

impl Service for Device {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let t = self.0.elapsed().as_millis() as u16;
        ready(match req.request {
            Request::ReadHoldingRegisters(a, n) => Ok(Some(Response::ReadHoldingRegisters(
                (0..n).map(|i| a.wrapping_add(i).wrapping_add(t)).collect(),
            ))),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

async fn simulate(devices: usize) {
    let mut out = std::io::stdout();
    let start = Instant::now();
    for _ in 0..devices {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        writeln!(out, "{}", listener.local_addr().expect("addr").port()).expect("stdout");
        let server = tokio_modbus::server::tcp::Server::new(listener);
        tokio::spawn(async move {
            let on_connected = |stream, addr| async move {
                tokio_modbus::server::tcp::accept_tcp_connection(stream, addr, move |_| {
                    Ok(Some(Device(start)))
                })
            };
            let _ = server.serve(&on_connected, |_| {}).await;
        });
    }
    writeln!(out, "ready").expect("stdout");
    out.flush().expect("stdout");
    // Serve until the parent closes our stdin.
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
}

fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data, fully written by getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--sim") {
        simulate(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(500)).await;
        return;
    }
    let devices: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(500);
    let points: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);

    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args(["--sim", &devices.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn simulator");
    let mut ports = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("read");
        if line == "ready" {
            break;
        }
        ports.push(line.parse::<u16>().expect("port"));
    }

    // A third of the points are f32 (two registers), the rest u16: one coalesced read per device.
    let mut cfg = String::from("[sensors]\nstats_interval = \"0s\"\nclock = \"trusted\"\n");
    for (i, port) in ports.iter().enumerate() {
        cfg.push_str(&format!("[[sensors.modbus]]\nname = \"d{i}\"\ntransport = {{ tcp = {{ host = \"127.0.0.1\", port = {port} }} }}\nevery = \"1s\"\nreport = \"every\"\npoints = [\n"));
        let mut addr = 0;
        for p in 0..points {
            let ty = if p % 3 == 0 { "f32" } else { "u16" };
            cfg.push_str(&format!("{{ name = \"p{p}\", kind = \"holding\", address = {addr}, type = \"{ty}\", scale = 0.1, unit = \"V\" }},\n"));
            addr += if ty == "f32" { 2 } else { 1 };
        }
        cfg.push_str("]\n");
    }
    #[derive(serde::Deserialize)]
    struct Root {
        sensors: outpost_sensors::SensorsConfig,
    }
    let config = toml::from_str::<Root>(&cfg).expect("config").sensors;
    let (tx, mut rx) = mpsc::channel(65_536);
    let (_cmd_tx, cmd_rx) = mpsc::channel(1);
    let (sd_tx, sd_rx) = watch::channel(false);
    let stats = Arc::new(outpost_sensors::Stats::default());
    let layer = tokio::spawn(outpost_sensors::run_with_stats(
        config,
        "bench".into(),
        tx,
        cmd_rx,
        sd_rx,
        Arc::clone(&stats),
    ));

    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if !m.topic.ends_with("/status") {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await; // connect and settle
    let (n0, cpu0, t0) = (
        count.load(std::sync::atomic::Ordering::Relaxed),
        cpu_time(),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (n1, cpu1, wall) = (
        count.load(std::sync::atomic::Ordering::Relaxed),
        cpu_time(),
        t0.elapsed(),
    );
    let rate = (n1 - n0) as f64 / wall.as_secs_f64();
    let cores = (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64();
    let errors = stats.total(|l| &l.timeouts) + stats.total(|l| &l.transport_errors);
    println!(
        "devices={devices} points/device={points} window={:.1}s",
        wall.as_secs_f64()
    );
    println!(
        "readings/s={rate:.0} cpu={cores:.3} cores requests={} errors={errors}",
        stats.total(|l| &l.requests)
    );
    let _ = sd_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), layer).await;
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}
