//! Startup: time from exec to the first CONNACK, and the size of the binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use outpost_mqtt::Protocol;
use serde::Serialize;

use crate::broker::{self, Broker};

/// Options of a startup run.
#[derive(Debug, Clone, Args)]
pub struct StartupArgs {
    /// Times to start the broker.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Binary whose size to report; defaults to the broker command's program.
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// One line of results of a startup run.
#[derive(Debug, Serialize)]
pub struct StartupReport {
    /// Always "startup".
    pub kind: &'static str,
    /// Scenario label.
    pub label: String,
    /// Broker name.
    pub broker: String,
    /// Each run's exec-to-CONNACK time, ms.
    pub runs_ms: Vec<f64>,
    /// Median of `runs_ms`.
    pub median_ms: f64,
    /// The binary measured.
    pub binary: Option<String>,
    /// Its size in bytes.
    pub binary_bytes: Option<u64>,
    /// Broker RSS right after the first CONNACK, KiB (median).
    pub rss_ready_kib: u64,
}

/// Starts the broker `args.runs` times, timing each start.
pub async fn run(
    args: &StartupArgs,
    cmd: &[String],
    addr: SocketAddr,
    protocol: Protocol,
    label: &str,
    broker_name: &str,
) -> Result<StartupReport> {
    if cmd.is_empty() {
        bail!("startup needs the broker command after --");
    }
    let mut runs_ms = Vec::with_capacity(args.runs);
    let mut rss = Vec::with_capacity(args.runs);
    for _ in 0..args.runs.max(1) {
        let start = Instant::now();
        let mut b = Broker::spawn(cmd, None)?;
        broker::wait_ready(addr, protocol, Some(&mut b), Duration::from_secs(10)).await?;
        runs_ms.push((start.elapsed().as_secs_f64() * 1e4).round() / 10.0);
        rss.push(crate::procfs::rss_kib(b.pid()).unwrap_or(0) as f64);
        b.stop(Duration::from_secs(2));
        // The port must be free again before the next start.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let binary = args.binary.clone().or_else(|| resolve_program(&cmd[0]));
    let binary_bytes = binary
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.len());
    Ok(StartupReport {
        kind: "startup",
        label: label.to_owned(),
        broker: broker_name.to_owned(),
        median_ms: median(&runs_ms),
        runs_ms,
        binary: binary.map(|p| p.display().to_string()),
        binary_bytes,
        rss_ready_kib: median(&rss) as u64,
    })
}

/// The file `program` runs: itself if it has a slash, else the first match on PATH.
fn resolve_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| Path::is_file(p))
    })
}

/// Median of a list (mean of the middle two for an even count); 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if !v.len().is_multiple_of(2) {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// A human summary of a startup run.
pub fn describe(r: &StartupReport) -> String {
    format!(
        "[{}] {}: exec to CONNACK median {:.1} ms over {:?}; binary {} ({} bytes); RSS when ready {} KiB",
        r.broker,
        r.label,
        r.median_ms,
        r.runs_ms,
        r.binary.as_deref().unwrap_or("?"),
        r.binary_bytes.map_or("?".into(), |b| b.to_string()),
        r.rss_ready_kib
    )
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
