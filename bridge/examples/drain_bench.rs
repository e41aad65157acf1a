//! Drain rate of a spooled backlog against Mosquitto's QoS 1 accept rate.
//!
//! Starts a Mosquitto on a free loopback port, measures how fast a pipelined in-memory
//! QoS 1 publisher gets N messages acknowledged, then spools N messages, starts the bridge
//! and measures how fast it drains them.
//!
//! Like for like: both clients speak MQTT 3.1.1 (no Receive Maximum, so both windows are
//! exactly WINDOW: the bridge's is `max_inflight = WINDOW`), publish QoS 1 with the same
//! 26-byte topic and 64-byte payload, and are timed the same way: from the first PUBLISH
//! on an established connection until the last message is done (for the bridge: its row
//! deleted from the spool, which is later than its PUBACK). Opening the spool (an
//! integrity check and a count over the whole file) and connecting are start-up costs,
//! not drain rate: they are reported beside it, and the end-to-end rate with them.
//!
//! `cargo run --profile profiling -p outpost-bridge --example drain_bench -- [N] [WINDOW]`
//! (`DRAIN_COMMIT_WINDOW=0s` sets the draining bridge's `spool.commit_window`)

use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use outpost_bridge::config::WhenFull;
use outpost_bridge::spool::{NewMessage, Spool, SpoolOptions};
use outpost_bridge::stats::BridgeStats;
use outpost_bridge::{BridgeConfig, start};
use outpost_mqtt::codec::{decode, encode, encode_publish};
use outpost_mqtt::{Connect, Packet, Properties, Protocol, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOPIC: &str = "plant-7/sensors/bench/temp";

struct Broker(std::process::Child);
impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn reference_publisher(
    port: u16,
    n: usize,
    window: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let mut w = BytesMut::new();
    let connect = Connect {
        protocol: Protocol::V3_1_1,
        clean_start: true,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: "reference".into(),
        will: None,
        username: None,
        password: None,
    };
    encode(
        &Packet::Connect(Box::new(connect)),
        Protocol::V3_1_1,
        &mut w,
    )?;
    s.write_all(&w).await?;
    w.clear();
    let mut r = BytesMut::with_capacity(1 << 16);
    loop {
        s.read_buf(&mut r).await?;
        if let Some(Packet::ConnAck(_)) = decode(&mut r, Protocol::V3_1_1, 1 << 20)? {
            break;
        }
    }
    let payload = Bytes::from(vec![0x5a; 64]);
    let topic = ByteString::from_static(TOPIC);
    let start = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    let mut inflight: VecDeque<u16> = VecDeque::new();
    while acked < n {
        while sent < n && inflight.len() < window {
            let pid = (sent % 65_000) as u16 + 1;
            let p = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: Some(pid),
                properties: Properties::default(),
                payload: payload.clone(),
            };
            encode_publish(&p, Protocol::V3_1_1, &mut w)?;
            inflight.push_back(pid);
            sent += 1;
        }
        if !w.is_empty() {
            s.write_all(&w).await?;
            w.clear();
        }
        if s.read_buf(&mut r).await? == 0 {
            return Err("mosquitto closed the reference connection".into());
        }
        while let Some(p) = decode(&mut r, Protocol::V3_1_1, 1 << 20)? {
            if let Packet::PubAck(_) = p {
                inflight.pop_front();
                acked += 1;
            }
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(1_000_000), |s| s.parse())?;
    let window: u16 = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let dir = tempfile::tempdir_in(".")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )?;
    let _broker = Broker(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            return Err("mosquitto did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reference = reference_publisher(port, n, window.into()).await?;
    println!(
        "mosquitto QoS 1 accept rate (pipelined client, window {window}): {reference:.0} msgs/s"
    );

    let path = dir.path().join("backlog.sqlite");
    let fill_start = Instant::now();
    {
        let (spool, thread) = Spool::open(
            SpoolOptions {
                path: path.clone(),
                max_bytes: u64::MAX / 2,
                when_full: WhenFull::RejectNew,
                commit_window: outpost_sqlite::commit_window::DEFAULT_WINDOW,
            },
            Arc::new(BridgeStats::default()),
        )?;
        let payload = Bytes::from(vec![0x5a; 64]);
        let mut pending = VecDeque::new();
        for i in 0..n {
            pending.push_back(spool.append(NewMessage {
                topic: TOPIC.into(),
                payload: payload.clone(),
                qos: QoS::AtLeastOnce,
                retain: false,
                props: None,
                accepted_ms: i as i64,
            }));
            if pending.len() >= 8192
                && let Some(rx) = pending.pop_front()
            {
                rx.await?.map_err(|e| e.to_string())?;
            }
        }
        for rx in pending {
            rx.await?.map_err(|e| e.to_string())?;
        }
        drop(spool);
        tokio::task::spawn_blocking(move || thread.join()).await?;
    }
    println!(
        "spooled backlog of {n} in {:.2}s",
        fill_start.elapsed().as_secs_f64()
    );

    let config: BridgeConfig = toml::from_str(&format!(
        "name = \"bench\"\naddress = \"mqtt://127.0.0.1:{port}\"\nprotocol = \"3.1.1\"\nmax_inflight = {window}\n\
         topics = [{{ pattern = \"#\", direction = \"out\", qos = 1 }}]\n[spool]\npath = \"{}\"\n{}[status]\nenabled = false\n",
        path.display(),
        // DRAIN_COMMIT_WINDOW=0s measures the drain without the spool's commit window.
        std::env::var("DRAIN_COMMIT_WINDOW")
            .map(|w| format!("commit_window = \"{w}\"\n"))
            .unwrap_or_default()
    ))?;
    let (local, mut local_rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while local_rx.recv().await.is_some() {} });
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let bridge = start(config, "bench", dir.path(), local, stop_rx).await?;
    let opened = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    // The link is up once the first row leaves the window; polled finely so the start-up
    // part is not overstated.
    let mut first_ack = None;
    while bridge.stats().spool_messages.load(Relaxed) > 0 {
        if Instant::now() > deadline {
            return Err("drain did not finish in 10 minutes".into());
        }
        if first_ack.is_none() && bridge.stats().forwarded.load(Relaxed) > 0 {
            first_ack = Some(Instant::now());
        }
        let poll = if first_ack.is_some() { 5 } else { 1 };
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
    let total = t0.elapsed();
    let linked = first_ack.map_or(total, |at| at - t0);
    let drain = n as f64 / (total - linked).as_secs_f64();
    let forwarded = bridge.stats().forwarded.load(Relaxed);
    println!(
        "bridge start-up: spool opened in {:.0} ms, first PUBACK after {:.0} ms",
        opened.as_secs_f64() * 1e3,
        linked.as_secs_f64() * 1e3
    );
    println!(
        "bridge drain of {n} spooled messages: {drain:.0} msgs/s from the first PUBACK to an \
         empty spool ({:.0} msgs/s counting start-up; forwarded {forwarded})",
        n as f64 / total.as_secs_f64()
    );
    // The machine is shared: measure the reference again and compare with the mean.
    let reference_after = reference_publisher(port, n, window.into()).await?;
    println!("mosquitto QoS 1 accept rate, measured again: {reference_after:.0} msgs/s");
    let mean = (reference + reference_after) / 2.0;
    println!("drain / mean accept rate: {:.0}%", 100.0 * drain / mean);
    bridge.shutdown().await;
    Ok(())
}
