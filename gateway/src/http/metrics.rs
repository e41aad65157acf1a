//! `/metrics` in the Prometheus text exposition format (version 0.0.4), from a sample.
//!
//! Names follow the Prometheus conventions: a unit suffix in base units (`_bytes`,
//! `_seconds`), `_total` on counters only, and one family with a label where the same
//! quantity is split (dropped messages by `reason`).

use std::fmt::Write as _;

use super::sample::Sample;

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn value(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"");
                escape(&mut self.text, val);
                self.text.push('"');
            }
            self.text.push('}');
        }
        if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
            let _ = writeln!(self.text, " {}", v as i64);
        } else {
            let _ = writeln!(self.text, " {v}");
        }
    }

    /// A family with one unlabelled value.
    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.value(name, &[], v);
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn flag(x: bool) -> f64 {
    if x { 1.0 } else { 0.0 }
}

/// Renders every metric of a sample.
pub fn render(s: &Sample) -> String {
    let mut o = Out {
        text: String::with_capacity(8192),
    };
    o.family(
        "outpost_info",
        "gauge",
        "Always 1; the labels say which gateway and version.",
    );
    o.value(
        "outpost_info",
        &[("gateway_id", &s.gateway_id), ("version", s.version)],
        1.0,
    );
    o.one(
        "outpost_uptime_seconds",
        "gauge",
        "Seconds since the gateway started.",
        s.uptime_s as f64,
    );
    if let Some(sync) = s.clock_synchronised {
        o.one(
            "outpost_clock_synchronised",
            "gauge",
            "1 when the kernel says the wall clock is synchronised (readings carry timestamps).",
            flag(sync),
        );
    }
    broker(&mut o, s);
    bridges(&mut o, s);
    sensors(&mut o, s);
    let p = &s.process;
    if let Some(v) = p.rss_bytes {
        o.one(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            v as f64,
        );
    }
    if let Some(v) = p.open_fds {
        o.one(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            v as f64,
        );
    }
    if let Some(v) = p.cpu_seconds {
        o.one(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            v,
        );
    }
    o.text
}

fn broker(o: &mut Out, s: &Sample) {
    o.one(
        "outpost_broker_up",
        "gauge",
        "1 when the broker core answered the last statistics request.",
        flag(s.broker.accepting),
    );
    let Some(sys) = &s.sys else {
        return;
    };
    let st = &sys.stats;
    let gauges: [(&str, &str, u64); 6] = [
        (
            "outpost_broker_clients_connected",
            "Network clients connected.",
            sys.clients_connected,
        ),
        (
            "outpost_broker_sessions",
            "Sessions kept, connected or persistent.",
            sys.clients_total,
        ),
        (
            "outpost_broker_subscriptions",
            "Subscriptions.",
            sys.subscriptions,
        ),
        (
            "outpost_broker_retained_messages",
            "Retained messages kept.",
            sys.retained_messages,
        ),
        (
            "outpost_broker_retained_bytes",
            "Bytes of retained messages kept.",
            sys.retained_bytes,
        ),
        (
            "outpost_broker_store_refusing",
            "1 while the broker store cannot write and refuses what it would keep.",
            u64::from(sys.store_refusing),
        ),
    ];
    for (name, help, v) in gauges {
        o.one(name, "gauge", help, v as f64);
    }
    let counters: [(&str, &str, u64); 10] = [
        (
            "outpost_broker_messages_received_total",
            "Application messages accepted from any publisher.",
            st.messages_received,
        ),
        (
            "outpost_broker_messages_sent_total",
            "Deliveries handed to subscribers.",
            st.messages_sent,
        ),
        (
            "outpost_broker_received_bytes_total",
            "Payload bytes accepted.",
            st.bytes_received,
        ),
        (
            "outpost_broker_local_publishes_total",
            "In-process publishes (sensors, bridge downlink).",
            st.local_publishes,
        ),
        (
            "outpost_broker_connects_total",
            "Successful CONNECTs.",
            st.connects,
        ),
        ("outpost_broker_wills_total", "Wills published.", st.wills),
        (
            "outpost_broker_store_failed_writes_total",
            "Broker store batches that could not be written.",
            sys.store_failed_writes,
        ),
        (
            "outpost_broker_store_messages_written_total",
            "Deliveries to persistent sessions written to the store.",
            sys.store_messages_written,
        ),
        (
            "outpost_broker_store_commits_total",
            "Transactions the broker store committed (broker.commit_window sets how many \
             messages share one).",
            sys.store_commits,
        ),
        (
            "outpost_broker_store_refused_messages_total",
            "Messages the broker store refused (full disk or broker.max_store_size).",
            sys.store_refused,
        ),
    ];
    for (name, help, v) in counters {
        o.one(name, "counter", help, v as f64);
    }
    let name = "outpost_broker_messages_dropped_total";
    o.family(name, "counter", "Messages the broker dropped, by reason.");
    for (reason, v) in [
        ("queue_full", st.dropped_queue_full),
        ("slow_client", st.dropped_slow_client),
        ("too_large", st.dropped_too_large),
        ("local", st.dropped_local),
    ] {
        o.value(name, &[("reason", reason)], v as f64);
    }
    let name = "outpost_broker_limit_refusals_total";
    o.family(
        name,
        "counter",
        "What the configured bounds (broker.max_*) refused, by limit.",
    );
    for (limit, v) in [
        ("topic_levels", st.limits.topic_levels),
        ("sessions", st.limits.sessions),
        ("subscriptions", st.limits.subscriptions),
        ("retained", st.limits.retained),
        ("queued_bytes", st.limits.queued_bytes),
        ("connections", sys.refused_connections),
        (
            "connections_per_address",
            sys.refused_connections_per_address,
        ),
        ("connect_size", sys.connect_too_large),
        ("packet_size", sys.packet_too_large),
        ("packet_timeout", sys.packet_timeouts),
    ] {
        o.value(name, &[("limit", limit)], v as f64);
    }
}

fn bridges(o: &mut Out, s: &Sample) {
    if s.bridges.is_empty() {
        return;
    }
    type Pick = fn(&super::sample::BridgeSample) -> f64;
    let families: [(&str, &str, &str, Pick); 14] = [
        (
            "outpost_bridge_connected",
            "gauge",
            "1 while the link to the cloud broker is up.",
            |b| flag(b.connected),
        ),
        (
            "outpost_bridge_spool_messages",
            "gauge",
            "Messages waiting in the spool.",
            |b| b.spool_messages as f64,
        ),
        (
            "outpost_bridge_spool_bytes",
            "gauge",
            "Bytes waiting in the spool.",
            |b| b.spool_bytes as f64,
        ),
        (
            "outpost_bridge_spool_max_bytes",
            "gauge",
            "The spool's bound (spool.max_bytes).",
            |b| b.spool_max_bytes as f64,
        ),
        (
            "outpost_bridge_spool_oldest_age_seconds",
            "gauge",
            "Age of the oldest message in the spool (0 when empty).",
            |b| b.oldest_age_s,
        ),
        (
            "outpost_bridge_dead_letters",
            "gauge",
            "Messages in the spool's dead-letter table.",
            |b| b.dead_letters as f64,
        ),
        (
            "outpost_bridge_spooled_messages_total",
            "counter",
            "Messages taken into the spool.",
            |b| b.spooled as f64,
        ),
        (
            "outpost_bridge_spool_commits_total",
            "counter",
            "Transactions the spool committed; spooled messages over commits is the messages \
             per commit (spool.commit_window), which sets the flash written per message.",
            |b| b.spool_commits as f64,
        ),
        (
            "outpost_bridge_forwarded_messages_total",
            "counter",
            "Messages acknowledged by (or, at QoS 0, written to) the cloud broker.",
            |b| b.forwarded as f64,
        ),
        (
            "outpost_bridge_reconnects_total",
            "counter",
            "Successful connections after the first.",
            |b| b.reconnects as f64,
        ),
        (
            "outpost_bridge_connect_failures_total",
            "counter",
            "Connection attempts that failed.",
            |b| b.connect_failures as f64,
        ),
        (
            "outpost_bridge_inflight_window_messages",
            "gauge",
            "Messages the bridge may have unacknowledged towards the cloud now (sized to the link).",
            |b| b.inflight_window as f64,
        ),
        (
            "outpost_bridge_spool_quarantined_total",
            "counter",
            "Spool files set aside as corrupt.",
            |b| b.quarantined as f64,
        ),
        (
            "outpost_bridge_link_changed_timestamp_seconds",
            "gauge",
            "When the link last went up or down (unix time; 0 before the first attempt).",
            |b| b.since_ms as f64 / 1000.0,
        ),
    ];
    for (name, kind, help, pick) in families {
        o.family(name, kind, help);
        for br in &s.bridges {
            o.value(name, &[("bridge", &br.name)], pick(br));
        }
    }
    if s.bridges.iter().any(|b| b.cert_not_after_s.is_some()) {
        let name = "outpost_bridge_client_cert_expiry_timestamp_seconds";
        o.family(
            name,
            "gauge",
            "When the bridge's TLS client certificate expires (unix time, its notAfter).",
        );
        for br in &s.bridges {
            if let Some(t) = br.cert_not_after_s {
                o.value(name, &[("bridge", &br.name)], t as f64);
            }
        }
    }
    let name = "outpost_bridge_dropped_messages_total";
    o.family(
        name,
        "counter",
        "Messages the bridge dropped, by reason (poison: moved to the dead-letter table).",
    );
    for br in &s.bridges {
        for (reason, v) in &br.dropped {
            o.value(name, &[("bridge", &br.name), ("reason", reason)], *v as f64);
        }
    }
    let name = "outpost_bridge_rejected_messages_total";
    o.family(
        name,
        "counter",
        "Messages the spool refused to take, by reason.",
    );
    for br in &s.bridges {
        for (reason, v) in &br.rejected {
            o.value(name, &[("bridge", &br.name), ("reason", reason)], *v as f64);
        }
    }
}

fn sensors(o: &mut Out, s: &Sample) {
    if !s.devices.is_empty() {
        let name = "outpost_sensor_device_up";
        o.family(
            name,
            "gauge",
            "1 while the device answers (status online); 0 offline, quarantined or not yet polled.",
        );
        for d in &s.devices {
            o.value(
                name,
                &[("device", &d.name), ("line", &d.line)],
                flag(d.status == "online"),
            );
        }
        // A state set: one series per state, 1 for the current one, so a state change
        // does not start a new series.
        let name = "outpost_sensor_device_status";
        o.family(
            name,
            "gauge",
            "1 for the device's current status (online, offline, quarantined, unknown), else 0.",
        );
        for d in &s.devices {
            for st in ["online", "offline", "quarantined", "unknown"] {
                o.value(
                    name,
                    &[("device", &d.name), ("status", st)],
                    flag(d.status == st),
                );
            }
        }
        let name = "outpost_sensor_device_poll_failures_total";
        o.family(name, "counter", "Polls that failed after their retries.");
        for d in &s.devices {
            o.value(name, &[("device", &d.name)], d.failures as f64);
        }
        let name = "outpost_sensor_device_poll_duration_seconds";
        o.family(
            name,
            "summary",
            "Time spent per poll, retries included, answered or not.",
        );
        for d in &s.devices {
            o.value(
                &format!("{name}_sum"),
                &[("device", &d.name)],
                d.poll_seconds,
            );
            o.value(
                &format!("{name}_count"),
                &[("device", &d.name)],
                (d.polls + d.failures) as f64,
            );
        }
        let name = "outpost_sensor_device_last_reading_age_seconds";
        o.family(
            name,
            "gauge",
            "Seconds since the device last returned data (absent before the first).",
        );
        for d in &s.devices {
            if let Some(age) = d.last_reading_age_s {
                o.value(name, &[("device", &d.name)], age);
            }
        }
    }
    if !s.lines.is_empty() {
        let name = "outpost_sensor_line_requests_total";
        o.family(name, "counter", "Requests sent on the line.");
        for l in &s.lines {
            o.value(name, &[("line", &l.name)], l.requests as f64);
        }
        let name = "outpost_sensor_line_responses_total";
        o.family(name, "counter", "Requests answered with data.");
        for l in &s.lines {
            o.value(name, &[("line", &l.name)], l.responses as f64);
        }
        let name = "outpost_sensor_line_errors_total";
        o.family(name, "counter", "Failed requests on the line, by kind.");
        for l in &s.lines {
            for (kind, v) in &l.errors {
                o.value(name, &[("line", &l.name), ("kind", kind)], *v as f64);
            }
        }
        let name = "outpost_sensor_line_busy_seconds_total";
        o.family(name, "counter", "Seconds the line spent in transactions.");
        for l in &s.lines {
            o.value(name, &[("line", &l.name)], l.busy_seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        escape(&mut s, "a\"b\\c\nd");
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }
}
