//! Idle connections: how much broker memory each connected but silent client costs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::Args;
use outpost_mqtt::{Packet, Properties, Protocol, Publish, QoS};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::conn::{self, Connection};
use crate::procfs;

/// Options of an idle run.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Clients to connect.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub clients: usize,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Give every client one subscription (its own topic) as well.
    #[arg(long)]
    pub subscribe: bool,
    /// Keep alive each client announces, seconds (no PINGREQ is sent, so keep the hold shorter).
    #[arg(long, default_value_t = 120)]
    pub keep_alive: u16,
    /// How long all clients stay connected; RSS is sampled throughout.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Pause before each RSS reading so the broker settles.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Loopback source addresses to spread the clients over (127.0.0.1 up to
    /// 127.0.0.N): one source address has only the ephemeral port range (about 28,000
    /// ports) towards one broker port.
    #[arg(long, default_value_t = 1)]
    pub sources: u8,
    /// After the hold, every client publishes this many QoS 1 messages (to a topic
    /// nobody subscribes to) and waits for their PUBACKs; then all idle again for
    /// `--rest` and RSS is read once more: does the memory of a burst come back?
    #[arg(long, default_value_t = 0)]
    pub burst: u32,
    /// Payload of each burst message, bytes.
    #[arg(long, default_value_t = 64)]
    pub burst_payload: usize,
    /// How long the clients idle after the burst before RSS is read.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    pub rest: Duration,
    /// Longest time allowed to connect all clients.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

/// One line of results of an idle run.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    /// Always "idle".
    pub kind: &'static str,
    /// Scenario label.
    pub label: String,
    /// Broker name.
    pub broker: String,
    /// "3.1.1" or "5".
    pub protocol: String,
    /// Clients connected.
    pub clients: usize,
    /// Whether each client also held one subscription.
    pub subscribed: bool,
    /// Seconds to connect them all.
    pub connect_s: f64,
    /// Broker RSS before any client, KiB.
    pub rss_before_kib: u64,
    /// Broker RSS with all clients connected (highest sample during the hold), KiB.
    pub rss_during_kib: u64,
    /// Broker RSS at the end of the hold (the clients at rest), KiB.
    pub rss_rest_kib: u64,
    /// (rest - before) / clients, bytes.
    pub bytes_per_client_rest: f64,
    /// Highest broker RSS during the burst, KiB (0 without `--burst`).
    pub rss_burst_kib: u64,
    /// Broker RSS after the burst and `--rest`, all clients still connected, KiB.
    pub rss_after_burst_kib: u64,
    /// (after burst - before) / clients, bytes.
    pub bytes_per_client_after_burst: f64,
    /// Messages published in the burst (all acknowledged).
    pub burst_messages: u64,
    /// Broker RSS after all disconnected and the settle pause, KiB.
    pub rss_after_kib: u64,
    /// VmHWM at the end, KiB.
    pub hwm_kib: u64,
    /// (during - before) / clients, bytes.
    pub bytes_per_client: f64,
    /// Broker CPU seconds to accept and hold the clients.
    pub broker_cpu_s: f64,
}

/// Connects `args.clients` idle clients and measures broker memory around them.
pub async fn run(
    args: &IdleArgs,
    addr: SocketAddr,
    protocol: Protocol,
    broker: &mut Broker,
    label: &str,
    broker_name: &str,
) -> Result<IdleReport> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let pid = broker.pid();
    tokio::time::sleep(args.settle).await;
    let before = procfs::sample(pid)?;

    let start = Instant::now();
    let mut conns: Vec<Connection> = Vec::with_capacity(args.clients);
    let mut set = JoinSet::new();
    let mut next = 0usize;
    let per_client = Duration::from_secs(30);
    let run_tag = format!("{:x}", std::process::id());
    while conns.len() < args.clients {
        if start.elapsed() > args.connect_timeout {
            bail!(
                "only {} of {} clients connected within {:?}",
                conns.len(),
                args.clients,
                args.connect_timeout
            );
        }
        while next < args.clients && set.len() < args.concurrency.max(1) {
            let id = format!("idle-{run_tag}-{next}");
            let (subscribe, keep_alive) = (args.subscribe, args.keep_alive);
            let source = source_addr(next, args.sources);
            set.spawn(async move {
                let mut c = if let Some(ip) = source {
                    connect_from(ip, addr, protocol, &id, keep_alive, per_client).await?
                } else {
                    conn::connect(addr, protocol, &id, keep_alive, per_client).await?
                };
                if subscribe {
                    c.subscribe(&format!("idle/{id}"), QoS::AtLeastOnce, per_client)
                        .await?;
                }
                anyhow::Ok(c)
            });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(c))) => conns.push(c),
            Some(Ok(Err(e))) => bail!("client {} failed: {e:#}", conns.len()),
            Some(Err(e)) => bail!("connect task failed: {e}"),
            None => break,
        }
    }
    let connect_s = start.elapsed().as_secs_f64();

    tokio::time::sleep(args.settle).await;
    let mut during = procfs::rss_kib(pid).unwrap_or(0);
    let hold_end = Instant::now() + args.hold;
    while Instant::now() < hold_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        broker.check_alive()?;
        during = during.max(procfs::rss_kib(pid).unwrap_or(0));
    }
    let held = procfs::sample(pid)?;
    let rest = held.rss_kib;

    let (mut burst_peak, mut after_burst) = (0, 0);
    if args.burst > 0 {
        let mut set = JoinSet::new();
        for (i, mut c) in conns.into_iter().enumerate() {
            let (n, size) = (args.burst, args.burst_payload);
            set.spawn(async move {
                burst(&mut c, i, n, size, per_client).await?;
                anyhow::Ok(c)
            });
        }
        conns = Vec::with_capacity(args.clients);
        let mut sampler = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                joined = set.join_next() => match joined {
                    Some(Ok(Ok(c))) => conns.push(c),
                    Some(Ok(Err(e))) => bail!("burst failed: {e:#}"),
                    Some(Err(e)) => bail!("burst task failed: {e}"),
                    None => break,
                },
                _ = sampler.tick() => {
                    burst_peak = burst_peak.max(procfs::rss_kib(pid).unwrap_or(0));
                }
            }
        }
        burst_peak = burst_peak.max(procfs::rss_kib(pid).unwrap_or(0));
        let rest_end = Instant::now() + args.rest;
        while Instant::now() < rest_end {
            tokio::time::sleep(Duration::from_millis(200)).await;
            broker.check_alive()?;
        }
        after_burst = procfs::rss_kib(pid).unwrap_or(0);
    }

    let mut closing = JoinSet::new();
    for mut c in conns {
        closing.spawn(async move { c.disconnect().await });
    }
    while closing.join_next().await.is_some() {}
    tokio::time::sleep(args.settle).await;
    let after = procfs::sample(pid)?;

    Ok(IdleReport {
        kind: "idle",
        label: label.to_owned(),
        broker: broker_name.to_owned(),
        protocol: crate::load::protocol_name(protocol).to_owned(),
        clients: args.clients,
        subscribed: args.subscribe,
        connect_s,
        rss_before_kib: before.rss_kib,
        rss_during_kib: during,
        rss_rest_kib: rest,
        bytes_per_client_rest: per_client_bytes(rest, before.rss_kib, args.clients),
        rss_burst_kib: burst_peak,
        rss_after_burst_kib: after_burst,
        bytes_per_client_after_burst: per_client_bytes(after_burst, before.rss_kib, args.clients),
        burst_messages: u64::from(args.burst) * args.clients as u64,
        rss_after_kib: after.rss_kib,
        hwm_kib: after.hwm_kib,
        bytes_per_client: during.saturating_sub(before.rss_kib) as f64 * 1024.0
            / args.clients as f64,
        broker_cpu_s: held.cpu_s - before.cpu_s,
    })
}

fn per_client_bytes(kib: u64, before_kib: u64, clients: usize) -> f64 {
    kib.saturating_sub(before_kib) as f64 * 1024.0 / clients as f64
}

/// The loopback source address of client `i` when spreading over `sources` addresses;
/// `None` leaves the choice to the kernel.
fn source_addr(i: usize, sources: u8) -> Option<IpAddr> {
    (sources > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % sources as usize) as u8)))
}

async fn connect_from(
    ip: IpAddr,
    addr: SocketAddr,
    protocol: Protocol,
    id: &str,
    keep_alive: u16,
    limit: Duration,
) -> Result<Connection> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    let stream = tokio::time::timeout(limit, socket.connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("TCP connect from {ip} timed out"))??;
    stream.set_nodelay(true)?;
    tokio::time::timeout(
        limit,
        conn::connect_on(
            conn::Stream::Tcp(stream),
            protocol,
            id,
            keep_alive,
            true,
            Properties::default(),
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("CONNECT as {id} timed out"))?
}

/// Publishes `n` QoS 1 messages and waits for every PUBACK.
async fn burst(c: &mut Connection, i: usize, n: u32, size: usize, limit: Duration) -> Result<()> {
    let payload = Bytes::from(vec![b'x'; size]);
    for k in 0..n {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("idle/burst/{i}").into(),
            packet_id: Some(u16::try_from(k % 60_000 + 1).unwrap_or(1)),
            properties: Properties::default(),
            payload: payload.clone(),
        });
        c.send(&p).await?;
    }
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(limit, c.read_packet()).await {
            Ok(Ok(Packet::PubAck(_))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("{} of {n} PUBACKs within {limit:?}", acked),
        }
    }
    Ok(())
}

/// A human summary of an idle run.
pub fn describe(r: &IdleReport) -> String {
    format!(
        "[{}] {} {} idle clients (MQTT {}{}) connected in {:.2} s: broker RSS {} KiB before, {} KiB during (peak), {} KiB at rest, {} KiB burst peak, {} KiB after burst, {} KiB after disconnect; {:.0} bytes per client (peak), {:.0} at rest, {:.0} after burst",
        r.broker,
        r.label,
        r.clients,
        r.protocol,
        if r.subscribed {
            ", one subscription each"
        } else {
            ""
        },
        r.connect_s,
        r.rss_before_kib,
        r.rss_during_kib,
        r.rss_rest_kib,
        r.rss_burst_kib,
        r.rss_after_burst_kib,
        r.rss_after_kib,
        r.bytes_per_client,
        r.bytes_per_client_rest,
        r.bytes_per_client_after_burst
    )
}
