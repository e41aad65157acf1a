//! Idle connections: how much broker memory each connected but silent client costs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use outpost_mqtt::{Protocol, QoS};
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
            set.spawn(async move {
                let mut c = conn::connect(addr, protocol, &id, keep_alive, per_client).await?;
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
        rss_after_kib: after.rss_kib,
        hwm_kib: after.hwm_kib,
        bytes_per_client: during.saturating_sub(before.rss_kib) as f64 * 1024.0
            / args.clients as f64,
        broker_cpu_s: held.cpu_s - before.cpu_s,
    })
}

/// A human summary of an idle run.
pub fn describe(r: &IdleReport) -> String {
    format!(
        "[{}] {} {} idle clients (MQTT {}{}) connected in {:.2} s: broker RSS {} KiB before, {} KiB during, {} KiB after; {:.0} bytes per client",
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
        r.rss_after_kib,
        r.bytes_per_client
    )
}
