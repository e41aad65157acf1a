//! Result pieces shared by the modes, and the one-line human summaries.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::load::LoadReport;

/// Broker CPU and memory over a measured window, from /proc.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerStats {
    /// The broker's PID.
    pub pid: u32,
    /// User + system CPU seconds the broker used in the window.
    pub cpu_s: f64,
    /// RSS when the window opened, KiB.
    pub rss_before_kib: u64,
    /// Highest RSS sampled (every 50 ms) in the window, KiB.
    pub peak_rss_kib: u64,
    /// VmHWM at the end: the peak over the broker's whole life, KiB.
    pub hwm_kib: u64,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Percentiles of a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        if h.is_empty() {
            return Latency {
                count: 0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                max: 0.0,
            };
        }
        Latency {
            count: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            max: us(h.max()),
        }
    }
}

/// A human summary of a load run.
pub fn describe_load(r: &LoadReport) -> String {
    let mut s = format!(
        "[{}] {} {}→{} QoS{} {}B MQTT {}{}: published {} ({:.0}/s), delivered {}/{} ({:.0}/s), lost {}, dup {}, reordered {}\n  latency µs p50 {} p90 {} p99 {} max {}",
        r.broker,
        r.label,
        r.publishers,
        r.subscribers,
        r.qos,
        r.payload,
        r.protocol,
        r.rate
            .map(|x| format!(" at {x:.0} msg/s"))
            .unwrap_or_default(),
        r.published,
        r.publish_rate,
        r.delivered,
        r.expected,
        r.delivered_rate,
        r.lost,
        r.duplicates,
        r.reordered,
        r.latency_us.p50,
        r.latency_us.p90,
        r.latency_us.p99,
        r.latency_us.max,
    );
    if let Some(b) = &r.broker_stats {
        s += &format!(
            "\n  broker CPU {:.2} s, {:.0} delivered per CPU-s, peak RSS {} KiB (HWM {} KiB); bench CPU {:.2} s",
            b.cpu_s,
            r.delivered_per_cpu_s.unwrap_or(0.0),
            b.peak_rss_kib,
            b.hwm_kib,
            r.client_cpu_s
        );
    }
    if r.loss_is_failure && r.lost > 0 {
        s += "\n  FAIL: messages lost at a QoS that promises delivery";
    }
    for e in &r.errors {
        s += &format!("\n  error: {e}");
    }
    s
}
