//! Turns the JSON lines of many runs into one Markdown table: per scenario and metric, the
//! median over repeated runs for each broker and the ratio between them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;

use crate::startup::median;

/// Options of the table command.
#[derive(Debug, Clone, Args)]
pub struct TableArgs {
    /// JSON-lines files written by the other commands.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The broker being judged (numerator of the ratio).
    #[arg(long, default_value = "outpost")]
    pub candidate: String,
    /// The reference broker (denominator of the ratio).
    #[arg(long, default_value = "mosquitto")]
    pub baseline: String,
}

/// Which direction is better for a metric, and what the issue asks of it.
#[derive(Clone, Copy)]
enum Goal {
    /// Higher is better; the candidate should reach this multiple of the baseline.
    HigherBy(f64),
    /// Lower is better than the baseline.
    Lower,
    /// The candidate's value must not exceed this.
    AtMost(f64),
    /// Must be zero (loss where the QoS promises delivery).
    Zero,
    /// Reported for context only.
    Info,
}

/// How one metric is pulled from a run and summarised over runs.
struct Metric {
    name: &'static str,
    pick: fn(&Value) -> Option<f64>,
    /// Loss is summarised by its worst run, everything else by the median.
    worst: bool,
    goal: Goal,
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn metrics_for(run: &Value) -> Vec<Metric> {
    let kind = run.get("kind").and_then(Value::as_str).unwrap_or("");
    let fixed_rate = run.get("rate").is_some_and(|r| !r.is_null());
    let qos = num(run, &["qos"]).unwrap_or(0.0);
    match kind {
        "load" if fixed_rate => vec![
            Metric {
                name: "p50 latency (µs)",
                pick: |v| num(v, &["latency_us", "p50"]),
                worst: false,
                goal: Goal::Info,
            },
            Metric {
                name: "p99 latency (µs)",
                pick: |v| num(v, &["latency_us", "p99"]),
                worst: false,
                goal: Goal::Lower,
            },
            Metric {
                name: "broker CPU (s)",
                pick: |v| num(v, &["broker_stats", "cpu_s"]),
                worst: false,
                goal: Goal::Info,
            },
        ],
        "load" => vec![
            Metric {
                name: "delivered / broker CPU-s",
                pick: |v| num(v, &["delivered_per_cpu_s"]),
                worst: false,
                goal: Goal::HigherBy(1.5),
            },
            Metric {
                name: "delivered msg/s",
                pick: |v| num(v, &["delivered_rate"]),
                worst: false,
                goal: Goal::Info,
            },
            Metric {
                name: "lost (worst run)",
                pick: |v| num(v, &["lost"]),
                worst: true,
                goal: if qos > 0.0 { Goal::Zero } else { Goal::Info },
            },
        ],
        "idle" => vec![
            Metric {
                name: "bytes per idle client",
                pick: |v| num(v, &["bytes_per_client"]),
                worst: false,
                goal: Goal::AtMost(1024.0),
            },
            Metric {
                name: "broker RSS with clients (KiB)",
                pick: |v| num(v, &["rss_during_kib"]),
                worst: false,
                goal: Goal::Lower,
            },
        ],
        "handshake" => vec![
            Metric {
                name: "connections / broker CPU-s",
                pick: |v| num(v, &["per_cpu_s"]),
                worst: false,
                goal: Goal::HigherBy(1.0),
            },
            Metric {
                name: "resumed (% of connections)",
                pick: |v| {
                    let n = num(v, &["connections"])?;
                    (n > 0.0).then(|| num(v, &["resumed"]).unwrap_or(0.0) * 100.0 / n)
                },
                worst: false,
                goal: Goal::Info,
            },
            Metric {
                name: "connections/s",
                pick: |v| num(v, &["rate"]),
                worst: false,
                goal: Goal::Info,
            },
        ],
        "startup" => vec![
            Metric {
                name: "exec to CONNACK (ms)",
                pick: |v| num(v, &["median_ms"]),
                worst: false,
                goal: Goal::Lower,
            },
            Metric {
                name: "binary size (KiB)",
                pick: |v| num(v, &["binary_bytes"]).map(|b| b / 1024.0),
                worst: false,
                goal: Goal::Info,
            },
            Metric {
                name: "RSS when ready (KiB)",
                pick: |v| num(v, &["rss_ready_kib"]),
                worst: false,
                goal: Goal::Lower,
            },
        ],
        _ => vec![],
    }
}

/// Reads the files and prints the table to stdout.
pub fn run(args: &TableArgs) -> Result<()> {
    let mut runs = Vec::new();
    for f in &args.files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", f.display(), i + 1))?;
            runs.push(v);
        }
    }
    print!("{}", render(&runs, &args.candidate, &args.baseline));
    Ok(())
}

/// The Markdown table for `runs`.
pub fn render(runs: &[Value], candidate: &str, baseline: &str) -> String {
    // Scenario labels in order of first appearance; runs grouped by (label, broker).
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for r in runs {
        let label = r
            .get("label")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let broker = r
            .get("broker")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        if !order.contains(&label) {
            order.push(label.clone());
        }
        groups.entry((label, broker)).or_default().push(r);
    }
    let mut out = format!(
        "| Scenario | Metric | {candidate} | {baseline} | {candidate}/{baseline} | Target | Runs |\n|---|---|---:|---:|---:|---|---:|\n"
    );
    for label in &order {
        let cand = groups.get(&(label.clone(), candidate.to_owned()));
        let base = groups.get(&(label.clone(), baseline.to_owned()));
        let Some(sample) = cand.or(base).and_then(|g| g.first()) else {
            continue;
        };
        let n = |g: Option<&Vec<&Value>>| g.map_or(0, Vec::len);
        for m in metrics_for(sample) {
            let summarise = |g: Option<&Vec<&Value>>| -> Option<f64> {
                let xs: Vec<f64> = g?.iter().filter_map(|v| (m.pick)(v)).collect();
                if xs.is_empty() {
                    None
                } else if m.worst {
                    xs.into_iter().reduce(f64::max)
                } else {
                    Some(median(&xs))
                }
            };
            let (c, b) = (summarise(cand), summarise(base));
            let ratio = match (c, b) {
                (Some(c), Some(b)) if b != 0.0 => Some(c / b),
                _ => None,
            };
            out += &format!(
                "| {label} | {} | {} | {} | {} | {} | {}/{} |\n",
                m.name,
                fmt(c),
                fmt(b),
                ratio.map_or("—".into(), |r| format!("{r:.2}×")),
                judge(m.goal, c, ratio),
                n(cand),
                n(base),
            );
        }
    }
    out
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x.abs() >= 1000.0 => group_thousands(x.round() as i64),
        Some(x) if x.fract() == 0.0 || x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn judge(goal: Goal, cand: Option<f64>, ratio: Option<f64>) -> String {
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    match goal {
        Goal::HigherBy(k) => match ratio {
            Some(r) => format!("≥{k}× ({})", verdict(r >= k)),
            None => format!("≥{k}×"),
        },
        Goal::Lower => match ratio {
            Some(r) => format!("<1× ({})", verdict(r < 1.0)),
            None => "<1×".into(),
        },
        Goal::AtMost(max) => match cand {
            Some(c) => format!("≤{max:.0} ({})", verdict(c <= max)),
            None => format!("≤{max:.0}"),
        },
        Goal::Zero => match cand {
            Some(c) => format!("0 ({})", verdict(c == 0.0)),
            None => "0".into(),
        },
        Goal::Info => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn medians_ratios_and_verdicts() {
        let runs = vec![
            json!({"kind":"load","label":"1→1 QoS1","broker":"outpost","qos":1,"rate":null,"delivered_per_cpu_s":300.0,"delivered_rate":10.0,"lost":0}),
            json!({"kind":"load","label":"1→1 QoS1","broker":"outpost","qos":1,"rate":null,"delivered_per_cpu_s":100.0,"delivered_rate":10.0,"lost":2}),
            json!({"kind":"load","label":"1→1 QoS1","broker":"outpost","qos":1,"rate":null,"delivered_per_cpu_s":200.0,"delivered_rate":10.0,"lost":0}),
            json!({"kind":"load","label":"1→1 QoS1","broker":"mosquitto","qos":1,"rate":null,"delivered_per_cpu_s":100.0,"delivered_rate":20.0,"lost":0}),
        ];
        let t = render(&runs, "outpost", "mosquitto");
        assert!(
            t.contains(
                "| 1→1 QoS1 | delivered / broker CPU-s | 200 | 100 | 2.00× | ≥1.5× (met) | 3/1 |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| 1→1 QoS1 | delivered msg/s | 10 | 20 | 0.50× |"),
            "{t}"
        );
        assert!(
            t.contains("| 1→1 QoS1 | lost (worst run) | 2 | 0 | — | 0 (missed) | 3/1 |"),
            "{t}"
        );
    }

    #[test]
    fn missing_broker_shows_dash() {
        let runs = vec![
            json!({"kind":"idle","label":"idle 1000","broker":"mosquitto","bytes_per_client":5000.0,"rss_during_kib":9000}),
        ];
        let t = render(&runs, "outpost", "mosquitto");
        assert!(
            t.contains("| idle 1000 | bytes per idle client | — | 5,000 | — | ≤1024 | 0/1 |"),
            "{t}"
        );
    }

    #[test]
    fn thousands() {
        assert_eq!(group_thousands(1234567), "1,234,567");
        assert_eq!(group_thousands(-1000), "-1,000");
        assert_eq!(group_thousands(999), "999");
    }
}
