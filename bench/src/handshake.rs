//! Handshakes: a loop of fresh TLS connections, each doing CONNECT, CONNACK and
//! DISCONNECT, so the broker's CPU per connection is mostly the TLS handshake.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use outpost_mqtt::{Properties, Protocol};
use rustls::HandshakeKind;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::broker::Broker;
use crate::conn::{self, Stream, TlsClient};
use crate::procfs;

/// Options of a handshake run.
#[derive(Debug, Clone, Args)]
pub struct HandshakeArgs {
    /// Connections to make (the count bound).
    #[arg(short = 'n', long, default_value_t = 2000)]
    pub connections: usize,
    /// Connections in progress at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Longest run (the time bound), e.g. 60s.
    #[arg(short = 'd', long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Keep a client session cache across connections (TLS 1.3 tickets, TLS 1.2 session
    /// IDs or tickets), so every connection after the first offers resumption.
    #[arg(long)]
    pub resume: bool,
}

/// One line of results of a handshake run.
#[derive(Debug, Serialize)]
pub struct HandshakeReport {
    /// Always "handshake".
    pub kind: &'static str,
    /// Scenario label given on the command line.
    pub label: String,
    /// Broker name given on the command line.
    pub broker: String,
    /// "3.1.1" or "5".
    pub protocol: String,
    /// The client offered resumption.
    pub resume: bool,
    /// Connections completed (CONNACK received).
    pub connections: u64,
    /// Of those, full handshakes.
    pub full: u64,
    /// Of those, resumed handshakes.
    pub resumed: u64,
    /// TLS version of the last connection.
    pub tls_version: String,
    /// Cipher suite of the last connection.
    pub cipher_suite: String,
    /// Key exchange group of the last full handshake.
    pub kx_group: String,
    /// Wall seconds of the measured loop.
    pub elapsed_s: f64,
    /// Connections per wall second.
    pub rate: f64,
    /// Broker CPU seconds over the loop.
    pub broker_cpu_s: f64,
    /// Connections per broker CPU-second: the efficiency figure.
    pub per_cpu_s: f64,
    /// CPU seconds the bench itself used.
    pub client_cpu_s: f64,
    /// Failed connections, with the first error.
    pub failed: u64,
    /// First errors seen.
    pub errors: Vec<String>,
}

struct One {
    kind: Option<HandshakeKind>,
    version: String,
    suite: String,
    group: Option<String>,
}

async fn one(addr: SocketAddr, protocol: Protocol, tls: &TlsClient, id: &str) -> Result<One> {
    let stream = Stream::open(addr, Some(tls)).await?;
    let (kind, version, suite, group) = {
        let st = stream.tls_state().expect("a TLS stream");
        (
            st.handshake_kind(),
            st.protocol_version()
                .map_or_else(String::new, |v| format!("{v:?}")),
            st.negotiated_cipher_suite()
                .map_or_else(String::new, |s| format!("{:?}", s.suite())),
            st.negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name())),
        )
    };
    let mut c = conn::connect_on(stream, protocol, id, 30, true, Properties::default()).await?;
    c.disconnect().await;
    Ok(One {
        kind,
        version,
        suite,
        group,
    })
}

/// Makes `args.connections` TLS connections to the broker and counts its CPU for them.
pub async fn run(
    args: &HandshakeArgs,
    addr: SocketAddr,
    protocol: Protocol,
    broker: &mut Broker,
    label: &str,
    broker_name: &str,
) -> Result<HandshakeReport> {
    let Some(base) = conn::tls() else {
        bail!("handshake mode needs --tls-ca (and a TLS listener at --addr)");
    };
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    // Its own client config: the process-wide one keeps a session cache, and a run of
    // full handshakes must offer none.
    let tls = TlsClient::new(&base.ca, &base.server_name_text, args.resume)?;
    let tag = format!("{:x}", std::process::id());
    if args.resume {
        // Prime the cache so the first measured connections can already resume: a TLS 1.3
        // ticket is used once, and each connection in flight takes one.
        for i in 0..args.concurrency.max(1) {
            one(addr, protocol, &tls, &format!("hs-{tag}-prime{i}")).await?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = broker.pid();
    let before = procfs::sample(pid)?;
    let cpu0 = procfs::self_cpu_s();
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut set = JoinSet::new();
    let (mut next, mut done, mut failed) = (0usize, 0u64, 0u64);
    let (mut full, mut resumed) = (0u64, 0u64);
    let mut errors = Vec::new();
    let (mut version, mut suite, mut group) = (String::new(), String::new(), String::new());
    loop {
        while next < args.connections
            && set.len() < args.concurrency.max(1)
            && Instant::now() < deadline
        {
            let (tls, id) = (tls.clone(), format!("hs-{tag}-{next}"));
            set.spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), one(addr, protocol, &tls, &id))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("connection timed out after 10 s")))
            });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(o))) => {
                done += 1;
                match o.kind {
                    Some(HandshakeKind::Resumed) => resumed += 1,
                    _ => full += 1,
                }
                version = o.version;
                suite = o.suite;
                if let Some(g) = o.group {
                    group = g;
                }
            }
            Some(Ok(Err(e))) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{e:#}"));
                }
            }
            Some(Err(e)) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("task: {e}"));
                }
            }
            None => break,
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    // The broker handles the last DISCONNECT and close after the client is done.
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.check_alive()?;
    let after = procfs::sample(pid)?;
    let client_cpu_s = procfs::self_cpu_s() - cpu0;
    let broker_cpu_s = after.cpu_s - before.cpu_s;
    Ok(HandshakeReport {
        kind: "handshake",
        label: label.to_owned(),
        broker: broker_name.to_owned(),
        protocol: crate::load::protocol_name(protocol).to_owned(),
        resume: args.resume,
        connections: done,
        full,
        resumed,
        tls_version: version,
        cipher_suite: suite,
        kx_group: group,
        elapsed_s,
        rate: if elapsed_s > 0.0 {
            done as f64 / elapsed_s
        } else {
            0.0
        },
        broker_cpu_s,
        per_cpu_s: if broker_cpu_s > 0.0 {
            done as f64 / broker_cpu_s
        } else {
            0.0
        },
        client_cpu_s,
        failed,
        errors,
    })
}

/// The one-line human summary.
pub fn describe(r: &HandshakeReport) -> String {
    format!(
        "[{}] {} {} TLS connections ({} full, {} resumed, {} failed; {} {} {}) in {:.2} s: {:.0}/s, broker CPU {:.3} s = {:.0} per broker CPU-second",
        r.label,
        r.broker,
        r.connections,
        r.full,
        r.resumed,
        r.failed,
        r.tls_version,
        r.cipher_suite,
        r.kx_group,
        r.elapsed_s,
        r.rate,
        r.broker_cpu_s,
        r.per_cpu_s
    )
}
