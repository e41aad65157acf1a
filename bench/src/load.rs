//! The load scenario: N publishers to M subscribers through the broker, bounded in count
//! and time, measured from the first publish to the last delivery.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use outpost_mqtt::{Properties, Protocol, QoS};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::broker::Broker;
use crate::conn;
use crate::flow::Flow;
use crate::payload::HEADER_LEN;
use crate::procfs::{self, PeakRssSampler, ProcSample};
use crate::publisher::{self, PublisherSpec};
use crate::report::{BrokerStats, Latency};
use crate::subscriber;

/// Options of a load run.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Publishing connections.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribing connections; each subscribes to every publisher's topic.
    #[arg(short = 's', long, default_value_t = 1)]
    pub subscribers: usize,
    /// QoS of publications and subscriptions (0, 1 or 2).
    #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Most unacknowledged QoS 1/2 PUBLISH packets per publisher; on 5.0 also the
    /// Receive Maximum each subscriber announces.
    #[arg(long, default_value_t = 20)]
    pub inflight: usize,
    /// Total messages per second over all publishers; 0 means as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Total messages over all publishers (the count bound).
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Longest publishing phase (the time bound), e.g. 10s.
    #[arg(short = 'd', long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// End-to-end window: deliveries (one message to one subscriber) that may be owed at
    /// once over the whole run. It keeps broker queues short, so "as fast as possible"
    /// measures routing rather than queue growth or queue-limit drops.
    #[arg(long, default_value_t = 1000)]
    pub window: u64,
    /// Most PUBLISH packets encoded into one socket write.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// After the last publish, how long the subscribers may see no packet at all before
    /// the deliveries still missing are called lost.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Longest wait for deliveries after the last publish, however busy the broker is.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_limit: Duration,
    /// Subscribers keep persistent sessions (3.1.1 clean session off, 5.0 session expiry
    /// one hour), so a broker with persistence has to keep what it owes them.
    #[arg(long)]
    pub persistent_subscribers: bool,
}

/// One line of results of a load run.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    /// Always "load".
    pub kind: &'static str,
    /// Scenario label given on the command line.
    pub label: String,
    /// Broker name given on the command line.
    pub broker: String,
    /// "3.1.1" or "5".
    pub protocol: String,
    /// Publishers.
    pub publishers: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// Subscribers had persistent sessions.
    pub persistent_subscribers: bool,
    /// QoS.
    pub qos: u8,
    /// Payload bytes.
    pub payload: usize,
    /// Inflight cap per publisher.
    pub inflight: usize,
    /// Target total rate, msg/s; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Messages published (written to sockets).
    pub published: u64,
    /// QoS 1/2 messages acknowledged to publishers.
    pub acked: u64,
    /// Deliveries owed: published times subscribers.
    pub expected: u64,
    /// Distinct messages delivered (summed over subscribers).
    pub delivered: u64,
    /// Deliveries of a message a subscriber already had.
    pub duplicates: u64,
    /// New deliveries that arrived after a later message of the same publisher.
    pub reordered: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// True when the QoS promises delivery (1 and 2), so any loss is a failure.
    pub loss_is_failure: bool,
    /// Seconds from the first publish to the last publish.
    pub publish_s: f64,
    /// Seconds from the first publish to the last new delivery.
    pub deliver_s: f64,
    /// Published messages per second.
    pub publish_rate: f64,
    /// Delivered messages per second.
    pub delivered_rate: f64,
    /// Latency of first deliveries.
    pub latency_us: Latency,
    /// Broker CPU and memory over the measured window.
    pub broker_stats: Option<BrokerStats>,
    /// Deliveries per broker CPU-second: the efficiency figure.
    pub delivered_per_cpu_s: Option<f64>,
    /// CPU seconds the load generator itself used in the window.
    pub client_cpu_s: f64,
    /// Problems seen (connections closed, acks missing, foreign payloads).
    pub errors: Vec<String>,
}

/// The QoS for a wire value already range-checked by clap.
pub fn qos_of(v: u8) -> Result<QoS> {
    match QoS::from_u8(v) {
        Some(q) => Ok(q),
        None => bail!("QoS must be 0, 1 or 2, not {v}"),
    }
}

/// Runs one load scenario against the broker at `addr`.
pub async fn run(
    args: &LoadArgs,
    addr: SocketAddr,
    protocol: Protocol,
    broker: Option<&mut Broker>,
    label: &str,
    broker_name: &str,
) -> Result<LoadReport> {
    if args.publishers == 0 || args.publishers > u16::MAX as usize {
        bail!("--publishers must be 1..=65535");
    }
    if args.payload < HEADER_LEN {
        bail!("--payload must be at least {HEADER_LEN} bytes");
    }
    let qos = qos_of(args.qos)?;
    let setup_limit = Duration::from_secs(10);
    let run_id = format!("{:x}", std::process::id() as u64 ^ nanos_now());
    let prefix = format!("bench/{run_id}");

    // On 5.0 a subscriber announces the same receive window the broker is given for 3.1.1
    // (`--inflight`); without it the broker may send 65,535 unacknowledged messages.
    let sub_props = Properties {
        receive_maximum: Some(args.inflight.clamp(1, 65535) as u16),
        session_expiry_interval: args.persistent_subscribers.then_some(3600),
        ..Properties::default()
    };
    let mut subs = Vec::with_capacity(args.subscribers);
    for j in 0..args.subscribers {
        let id = format!("ob-{run_id}-s{j}");
        let mut c = conn::connect_with(
            addr,
            protocol,
            &id,
            60,
            !args.persistent_subscribers,
            sub_props.clone(),
            setup_limit,
        )
        .await?;
        c.subscribe(&format!("{prefix}/#"), qos, setup_limit)
            .await?;
        subs.push(c);
    }
    let mut pubs = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        pubs.push(
            conn::connect(
                addr,
                protocol,
                &format!("ob-{run_id}-p{i}"),
                60,
                setup_limit,
            )
            .await?,
        );
    }

    let wakers: Vec<Arc<Notify>> = (0..args.publishers)
        .map(|_| Arc::new(Notify::new()))
        .collect();
    let flow = Arc::new(Flow::new(
        args.subscribers as u64,
        args.window,
        wakers.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sub_tasks = Vec::with_capacity(subs.len());
    for c in subs {
        let hist = subscriber::new_histogram()?;
        sub_tasks.push(tokio::spawn(subscriber::run(
            c,
            qos,
            args.publishers,
            flow.clone(),
            hist,
            stop_rx.clone(),
        )));
    }

    let broker_pid = broker.as_ref().map(|b| b.pid());
    let before: Option<ProcSample> = broker_pid.map(procfs::sample).transpose()?;
    let sampler = broker_pid.map(|pid| PeakRssSampler::start(pid, Duration::from_millis(50)));
    let client_cpu0 = procfs::self_cpu_s();
    let t0_ns = flow.now_ns();
    let start = Instant::now();
    let deadline = start + args.duration;
    let per_pub = args.messages / args.publishers as u64;
    let extra = args.messages % args.publishers as u64;
    let rate = (args.rate > 0.0).then_some(args.rate);
    let mut pub_tasks = Vec::with_capacity(pubs.len());
    for (i, c) in pubs.into_iter().enumerate() {
        let spec = PublisherSpec {
            index: i as u16,
            topic: format!("{prefix}/{i}"),
            qos,
            payload_len: args.payload,
            messages: per_pub + u64::from((i as u64) < extra),
            rate: rate.map(|r| r / args.publishers as f64),
            inflight: args.inflight,
            batch: args.batch.max(1),
            deadline,
            ack_timeout: args.drain_timeout,
        };
        pub_tasks.push(tokio::spawn(publisher::run(
            c,
            spec,
            flow.clone(),
            wakers[i].clone(),
        )));
    }

    let mut errors = Vec::new();
    let mut published = 0;
    let mut acked = 0;
    let mut last_send_ns = t0_ns;
    for t in pub_tasks {
        match t.await {
            Ok(r) => {
                published += r.sent;
                acked += r.acked;
                last_send_ns = last_send_ns.max(r.last_send_ns);
                if r.refused > 0 {
                    errors.push(format!("{} publishes refused by the broker", r.refused));
                }
                errors.extend(r.error);
            }
            Err(e) => errors.push(format!("publisher task failed: {e}")),
        }
    }

    let expected = published * args.subscribers as u64;
    let drain_start = Instant::now();
    // Progress is any packet reaching a subscriber, not only new messages: a broker busy
    // with a backlog of acknowledgements is slow, not stuck.
    let mut last_progress = (Instant::now(), flow.activity());
    // The run ends when every delivery has arrived and every QoS 2 exchange is complete,
    // so the broker's CPU for the last acknowledgements falls inside the window.
    while (flow.delivered() < expected || flow.awaiting_pubrel() > 0)
        && drain_start.elapsed() < args.drain_limit
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let a = flow.activity();
        if a != last_progress.1 {
            last_progress = (Instant::now(), a);
        } else if last_progress.0.elapsed() >= args.drain_timeout {
            break;
        }
    }
    // Let the broker take the subscribers' last acknowledgements inside the window.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after: Option<ProcSample> = broker_pid.map(procfs::sample).transpose()?;
    let client_cpu_s = procfs::self_cpu_s() - client_cpu0;
    let peak = sampler.map(PeakRssSampler::finish);
    let _ = stop_tx.send(true);

    let mut latency = subscriber::new_histogram()?;
    let (mut delivered, mut duplicates, mut reordered) = (0, 0, 0);
    let mut last_new_ns = t0_ns;
    let mut sub_publishes = Vec::new();
    for t in sub_tasks {
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(r)) => {
                for tr in &r.trackers {
                    delivered += tr.unique;
                    duplicates += tr.duplicates;
                    reordered += tr.reordered;
                }
                let _ = latency.add(&r.latency);
                sub_publishes.push(r.publishes);
                last_new_ns = last_new_ns.max(r.last_new_ns);
                if r.foreign > 0 {
                    errors.push(format!("{} payloads without a bench header", r.foreign));
                }
                if r.awaiting_pubrel > 0 {
                    errors.push(format!(
                        "a subscriber still awaits PUBREL for {} QoS 2 deliveries",
                        r.awaiting_pubrel
                    ));
                }
                if r.wrong_qos > 0 {
                    errors.push(format!("{} deliveries at another QoS", r.wrong_qos));
                }
                errors.extend(r.error);
            }
            Ok(Err(e)) => errors.push(format!("subscriber task failed: {e}")),
            Err(_) => errors.push("subscriber did not stop within 5 s".into()),
        }
    }

    if expected > delivered {
        errors.push(format!(
            "PUBLISH packets received per subscriber: {sub_publishes:?}"
        ));
    }
    let publish_s = ns_to_s(last_send_ns.saturating_sub(t0_ns));
    let deliver_s = ns_to_s(last_new_ns.saturating_sub(t0_ns));
    let broker_stats = match (before, after) {
        (Some(b), Some(a)) => Some(BrokerStats {
            pid: broker_pid.unwrap_or(0),
            cpu_s: a.cpu_s - b.cpu_s,
            rss_before_kib: b.rss_kib,
            peak_rss_kib: peak.unwrap_or(a.rss_kib).max(a.rss_kib),
            hwm_kib: a.hwm_kib,
        }),
        _ => None,
    };
    let delivered_per_cpu_s = broker_stats
        .as_ref()
        .filter(|s| s.cpu_s > 0.0)
        .map(|s| delivered as f64 / s.cpu_s);
    Ok(LoadReport {
        kind: "load",
        label: label.to_owned(),
        broker: broker_name.to_owned(),
        protocol: protocol_name(protocol).to_owned(),
        publishers: args.publishers,
        subscribers: args.subscribers,
        persistent_subscribers: args.persistent_subscribers,
        qos: args.qos,
        payload: args.payload,
        inflight: args.inflight,
        rate,
        published,
        acked,
        expected,
        delivered,
        duplicates,
        reordered,
        lost: expected.saturating_sub(delivered),
        loss_is_failure: qos != QoS::AtMostOnce,
        publish_s,
        deliver_s,
        publish_rate: rate_of(published, publish_s),
        delivered_rate: rate_of(delivered, deliver_s),
        latency_us: Latency::from_histogram(&latency),
        broker_stats,
        delivered_per_cpu_s,
        client_cpu_s,
        errors,
    })
}

/// "3.1.1", "3.1" or "5".
pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::V3_1 => "3.1",
        Protocol::V3_1_1 => "3.1.1",
        Protocol::V5 => "5",
    }
}

fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn rate_of(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

fn nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
