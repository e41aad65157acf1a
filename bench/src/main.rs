//! `outpost-bench`: the load generator and measurement harness for Outpost and Mosquitto.
//!
//! Every mode either spawns the broker from the command line given after `--` (and kills
//! it by PID when done) or attaches to one with `--broker-pid`, so its CPU time and memory
//! come from /proc. Each run prints a human summary on stderr and one JSON line on stdout
//! (also appended to `--json FILE`); `table` turns those lines into the comparison table.

mod broker;
mod conn;
mod flow;
mod handshake;
mod idle;
mod load;
mod payload;
mod procfs;
mod publisher;
mod report;
mod seqtrack;
mod startup;
mod subscriber;
mod table;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use outpost_mqtt::Protocol;
use serde::Serialize;

use crate::broker::Broker;

/// Load generator and side-by-side benchmarks for MQTT brokers.
#[derive(Debug, Parser)]
#[command(name = "outpost-bench", version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// N publishers to M subscribers: rates, loss, latency, broker CPU and RSS.
    Load {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: load::LoadArgs,
    },
    /// Connect many idle clients and measure broker RSS before, during and after.
    Idle {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: idle::IdleArgs,
    },
    /// Fresh TLS connections (CONNECT, CONNACK, DISCONNECT) per broker CPU-second, full
    /// or resumed handshakes; needs --tls-ca.
    Handshake {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: handshake::HandshakeArgs,
    },
    /// Time from exec to the first CONNACK, and the binary's size.
    Startup {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: startup::StartupArgs,
    },
    /// Print the Markdown comparison table from JSON-lines result files.
    Table(table::TableArgs),
}

/// Options every measuring mode shares.
#[derive(Debug, Args)]
struct Common {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: SocketAddr,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1", value_parser = conn::parse_protocol)]
    protocol: Protocol,
    /// Scenario label for the results table.
    #[arg(long, default_value = "run")]
    label: String,
    /// Broker name for the results table.
    #[arg(long, default_value = "broker")]
    broker_name: String,
    /// Measure an already running broker instead of spawning one.
    #[arg(long, conflicts_with = "broker_cmd")]
    broker_pid: Option<u32>,
    /// Append the spawned broker's stdout and stderr here (default: discarded).
    #[arg(long)]
    broker_log: Option<PathBuf>,
    /// Also append the JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Worker threads of the load generator; 1 uses a single-threaded runtime and leaves
    /// the other cores to the broker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Connect over TLS, trusting the CA certificates in this PEM file (every mode).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the server certificate must carry.
    #[arg(long, default_value = "127.0.0.1")]
    tls_server_name: String,
    /// The broker command line, after `--`.
    #[arg(last = true)]
    broker_cmd: Vec<String>,
}

impl Common {
    /// Switches every connection to TLS when --tls-ca is given.
    fn setup_tls(&self) -> Result<()> {
        if let Some(ca) = &self.tls_ca {
            conn::use_tls(conn::TlsClient::new(ca, &self.tls_server_name, true)?)?;
        }
        Ok(())
    }

    fn runtime(&self) -> Result<tokio::runtime::Runtime> {
        self.setup_tls()?;
        let rt = if self.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(self.threads)
                .enable_all()
                .build()?
        };
        Ok(rt)
    }

    /// Spawns or attaches to the broker and waits until it answers CONNECT.
    async fn broker(&self) -> Result<Option<Broker>> {
        let mut broker = match (self.broker_pid, self.broker_cmd.is_empty()) {
            (Some(pid), _) => Some(Broker::attach(pid)?),
            (None, false) => Some(Broker::spawn(&self.broker_cmd, self.broker_log.as_deref())?),
            (None, true) => None,
        };
        broker::wait_ready(
            self.addr,
            self.protocol,
            broker.as_mut(),
            Duration::from_secs(15),
        )
        .await?;
        Ok(broker)
    }

    fn emit<T: Serialize>(&self, human: &str, report: &T) -> Result<()> {
        eprintln!("{human}");
        let line = serde_json::to_string(report)?;
        println!("{line}");
        if let Some(path) = &self.json {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Mode::Load { common, args } => {
            // Publishers, subscribers and the broker's own sockets, with room to spare.
            procfs::raise_nofile((args.publishers + args.subscribers) as u64 * 2 + 256)?;
            common.runtime()?.block_on(async {
                let mut broker = common.broker().await?;
                let report = load::run(
                    &args,
                    common.addr,
                    common.protocol,
                    broker.as_mut(),
                    &common.label,
                    &common.broker_name,
                )
                .await?;
                common.emit(&report::describe_load(&report), &report)?;
                if report.loss_is_failure && report.lost > 0 {
                    bail!("{} messages lost at QoS {}", report.lost, report.qos);
                }
                Ok(())
            })
        }
        Mode::Idle { common, args } => {
            // The spawned broker inherits this limit, so it can accept them all too.
            let want = args.clients as u64 + 512;
            let got = procfs::raise_nofile(want)?;
            if got < want {
                bail!(
                    "open-file limit is {got}, {want} needed for {} clients: raise the hard limit (ulimit -Hn)",
                    args.clients
                );
            }
            common.runtime()?.block_on(async {
                let Some(mut broker) = common.broker().await? else {
                    bail!(
                        "idle mode needs a broker to measure: a command after -- or --broker-pid"
                    );
                };
                let report = idle::run(
                    &args,
                    common.addr,
                    common.protocol,
                    &mut broker,
                    &common.label,
                    &common.broker_name,
                )
                .await?;
                common.emit(&idle::describe(&report), &report)
            })
        }
        Mode::Handshake { common, args } => {
            procfs::raise_nofile(args.concurrency as u64 * 2 + 256)?;
            common.runtime()?.block_on(async {
                let Some(mut broker) = common.broker().await? else {
                    bail!(
                        "handshake mode needs a broker to measure: a command after -- or --broker-pid"
                    );
                };
                let report = handshake::run(
                    &args,
                    common.addr,
                    common.protocol,
                    &mut broker,
                    &common.label,
                    &common.broker_name,
                )
                .await?;
                common.emit(&handshake::describe(&report), &report)?;
                if report.failed > 0 {
                    bail!("{} connections failed: {:?}", report.failed, report.errors);
                }
                Ok(())
            })
        }
        Mode::Startup { common, args } => common.runtime()?.block_on(async {
            let report = startup::run(
                &args,
                &common.broker_cmd,
                common.addr,
                common.protocol,
                &common.label,
                &common.broker_name,
            )
            .await?;
            common.emit(&startup::describe(&report), &report)
        }),
        Mode::Table(args) => table::run(&args),
    }
}
