//! A ledger for crash tests: what each publisher sent, which of it the broker
//! acknowledged, and what each subscriber received, so that "nothing acknowledged is
//! lost, and no QoS 2 message is delivered twice" can be checked after any number of
//! kills. Also a small seeded random generator, so a failing run can be replayed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use outpost_mqtt::QoS;

/// A seeded pseudo-random generator (SplitMix64): reproducible from the printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The seed from `var` in the environment, else one from the clock.
    pub fn seed_from_env(var: &str) -> u64 {
        if let Some(s) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
            return s;
        }
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(17, |d| d.as_nanos() as u64)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// An independent generator derived from this one (one per task).
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}

/// The payload that identifies a message: publisher index and sequence number.
pub fn payload(publisher: u32, seq: u32) -> String {
    format!("p{publisher}/{seq}")
}

/// The (publisher, seq) of a payload made by [`payload`].
pub fn parse_payload(bytes: &[u8]) -> Option<(u32, u32)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let (p, seq) = s.strip_prefix('p')?.split_once('/')?;
    Some((p.parse().ok()?, seq.parse().ok()?))
}

/// One message a publisher sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Topic name.
    pub topic: String,
    /// Publish QoS.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// The broker took it: PUBACK (QoS 1) or PUBREC (QoS 2) below 0x80.
    pub acked: bool,
    /// Packet identifier it was sent with.
    pub packet_id: u16,
    /// Broker incarnation (restart count) it was first sent in.
    pub epoch: u32,
    /// It reused, as the first new PUBLISH after a reconnect, a packet id whose QoS 2
    /// exchange had ended with PUBCOMP on the previous connection (the case of issue #17).
    pub reuses_completed_id: bool,
    /// The broker refused it (5.0 reason code >= 0x80); not the broker's to keep.
    pub refused: Option<u8>,
    /// Times the publisher resent it after a reconnect (PUBLISH with DUP=1, or PUBREL).
    pub resends: u32,
}

/// One message a subscriber received (counted once per PUBLISH it delivered onward:
/// a QoS 2 resend with a packet id still awaiting PUBREL is not delivered again).
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    /// Publisher index.
    pub publisher: u32,
    /// Sequence number.
    pub seq: u32,
    /// QoS of the PUBLISH as received.
    pub qos: QoS,
    /// DUP flag of the PUBLISH as received.
    pub dup: bool,
    /// Packet identifier of the PUBLISH as received (0 for QoS 0).
    pub packet_id: u16,
}

/// A persistent subscriber the ledger checks.
#[derive(Debug, Clone)]
pub struct SubSpec {
    /// Client id (also the key of its deliveries).
    pub name: String,
    /// Its one topic filter.
    pub filter: String,
    /// The QoS it subscribed with (granted as asked; checked on SUBACK).
    pub qos: QoS,
}

/// Everything sent, acknowledged and received during a run.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Per (publisher, seq).
    pub sent: BTreeMap<(u32, u32), Sent>,
    /// Per subscriber name, in arrival order.
    pub delivered: BTreeMap<String, Vec<Delivered>>,
    /// Protocol observations that break a MUST (wrong-kind acks, lost sessions, ...).
    pub violations: Vec<String>,
    /// (subscriber, publisher, seq): a new message the subscriber had to take for a
    /// resend, because the broker sent it with a QoS 2 packet id still awaiting PUBREL.
    pub taken_for_resend: Vec<(String, u32, u32)>,
}

/// What [`Ledger::check`] found.
#[derive(Debug, Default)]
pub struct Findings {
    /// (subscriber, publisher, seq): acknowledged, matching, never delivered.
    pub lost: Vec<(String, u32, u32)>,
    /// (subscriber, publisher, seq, copies): a QoS 2 delivery that arrived more than once.
    pub duplicated: Vec<(String, u32, u32, usize)>,
    /// (subscriber, payload): a delivery of something never published to its filter.
    pub unexpected: Vec<(String, u32, u32)>,
    /// Acknowledged messages checked (over all subscribers).
    pub checked: usize,
}

impl Findings {
    /// True when nothing was found.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.unexpected.is_empty()
    }
}

impl Ledger {
    /// Record a message about to be sent for the first time.
    pub fn sent(&mut self, publisher: u32, seq: u32, s: Sent) {
        self.sent.insert((publisher, seq), s);
    }

    /// The broker acknowledged (publisher, seq).
    pub fn acked(&mut self, publisher: u32, seq: u32) {
        if let Some(s) = self.sent.get_mut(&(publisher, seq)) {
            s.acked = true;
        }
    }

    /// The publisher resent (publisher, seq) after a reconnect.
    pub fn resent(&mut self, publisher: u32, seq: u32) {
        if let Some(s) = self.sent.get_mut(&(publisher, seq)) {
            s.resends += 1;
        }
    }

    /// The broker refused (publisher, seq) with a 5.0 reason code.
    pub fn refused(&mut self, publisher: u32, seq: u32, code: u8) {
        if let Some(s) = self.sent.get_mut(&(publisher, seq)) {
            s.refused = Some(code);
        }
    }

    /// `sub` delivered a message onward.
    pub fn delivered(&mut self, sub: &str, d: Delivered) {
        self.delivered.entry(sub.to_string()).or_default().push(d);
    }

    /// `sub` received (publisher, seq) with a packet id it holds awaiting PUBREL, so it
    /// acknowledged it as a resend and did not deliver it (MQTT-4.3.3-2).
    pub fn taken_for_resend(&mut self, sub: &str, publisher: u32, seq: u32) {
        self.taken_for_resend
            .push((sub.to_string(), publisher, seq));
    }

    /// A protocol violation seen on the wire.
    pub fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    /// Every acknowledged message whose topic matches a subscriber's filter reached it at
    /// least once, and a message both sides handled at QoS 2 exactly once.
    pub fn check(&self, subs: &[SubSpec]) -> Findings {
        let mut f = Findings::default();
        for sub in subs {
            let mut copies: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            for d in self.delivered.get(&sub.name).into_iter().flatten() {
                *copies.entry((d.publisher, d.seq)).or_default() += 1;
                let known = self.sent.get(&(d.publisher, d.seq));
                if !known.is_some_and(|s| outpost_mqtt::topic::matches(&sub.filter, &s.topic)) {
                    f.unexpected.push((sub.name.clone(), d.publisher, d.seq));
                }
            }
            for (&(p, seq), s) in &self.sent {
                if !outpost_mqtt::topic::matches(&sub.filter, &s.topic) {
                    continue;
                }
                let n = copies.get(&(p, seq)).copied().unwrap_or(0);
                if s.acked {
                    f.checked += 1;
                    if n == 0 {
                        f.lost.push((sub.name.clone(), p, seq));
                    }
                }
                // Delivered at the lower of the published and the granted QoS (3.1.1 and
                // 5.0 section 3.8.4).
                if s.qos.min(sub.qos) == QoS::ExactlyOnce && n > 1 {
                    f.duplicated.push((sub.name.clone(), p, seq, n));
                }
            }
        }
        f
    }

    /// The retained value per topic after the run: the last acknowledged retained message
    /// to that topic, or a later one that was also published. `got` maps topic to the
    /// (publisher, seq) a new subscriber received with RETAIN=1. Returns the mismatches.
    pub fn check_retained(&self, got: &BTreeMap<String, (u32, u32)>) -> Vec<String> {
        let mut out = Vec::new();
        let mut last_acked: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for (&key, s) in &self.sent {
            if s.retain && s.acked {
                let e = last_acked.entry(s.topic.as_str()).or_insert(key);
                if key.1 > e.1 {
                    *e = key;
                }
            }
        }
        for (topic, &(p, seq)) in &last_acked {
            match got.get(*topic) {
                None => out.push(format!(
                    "{topic}: no retained message; the last acknowledged was p{p}/{seq}"
                )),
                Some(&(gp, gseq)) => {
                    let published = self
                        .sent
                        .get(&(gp, gseq))
                        .is_some_and(|s| s.retain && s.topic == *topic);
                    if !published || gp != p || gseq < seq {
                        out.push(format!(
                            "{topic}: retained p{gp}/{gseq}, but the last acknowledged was p{p}/{seq}"
                        ));
                    }
                }
            }
        }
        for (topic, (gp, gseq)) in got {
            if !last_acked.contains_key(topic.as_str())
                && !self
                    .sent
                    .get(&(*gp, *gseq))
                    .is_some_and(|s| s.retain && &s.topic == topic)
            {
                out.push(format!(
                    "{topic}: retained p{gp}/{gseq} was never published"
                ));
            }
        }
        out
    }

    /// A human-readable account of the findings, each lost or duplicated message with
    /// how it was sent.
    pub fn describe(&self, f: &Findings, limit: usize) -> String {
        let mut s = String::new();
        let acked = self.sent.values().filter(|s| s.acked).count();
        let refused = self.sent.values().filter(|s| s.refused.is_some()).count();
        let _ = writeln!(
            s,
            "sent {} messages, {} acknowledged, {} refused; {} (subscriber, message) pairs checked",
            self.sent.len(),
            acked,
            refused,
            f.checked
        );
        let _ = writeln!(
            s,
            "lost: {}, duplicated QoS 2: {}, unexpected: {}, protocol violations: {}",
            f.lost.len(),
            f.duplicated.len(),
            f.unexpected.len(),
            self.violations.len()
        );
        let by_qos = |qos: QoS| {
            f.lost
                .iter()
                .filter(|(_, p, q)| self.sent.get(&(*p, *q)).is_some_and(|s| s.qos == qos))
                .count()
        };
        // Why each loss happened, as far as the wire shows it.
        let delivered_anywhere: std::collections::BTreeSet<(u32, u32)> = self
            .delivered
            .values()
            .flatten()
            .map(|d| (d.publisher, d.seq))
            .collect();
        let cause = |sub: &str, p: u32, q: u32| -> &'static str {
            let m = &self.sent[&(p, q)];
            if self
                .taken_for_resend
                .iter()
                .any(|(s2, p2, q2)| s2 == sub && *p2 == p && *q2 == q)
            {
                "outbound: sent with a packet id the subscriber still held awaiting PUBREL"
            } else if delivered_anywhere.contains(&(p, q)) && m.resends > 0 {
                "outbound: delivered to another subscriber, never to this one; the publisher resent it after a kill"
            } else if delivered_anywhere.contains(&(p, q)) {
                "outbound: delivered to another subscriber, never to this one"
            } else if m.reuses_completed_id {
                "inbound: never routed; its packet id had completed (PUBCOMP) before a kill"
            } else if m.resends > 0 {
                "inbound: never routed; resent with DUP=1 after a kill and taken as a duplicate"
            } else {
                "inbound: never routed to any subscriber"
            }
        };
        let mut causes: BTreeMap<&'static str, usize> = BTreeMap::new();
        for (sub, p, q) in &f.lost {
            *causes.entry(cause(sub, *p, *q)).or_default() += 1;
        }
        if !f.lost.is_empty() {
            let _ = writeln!(
                s,
                "lost by QoS: QoS 1 {}, QoS 2 {}; distinct messages lost: {}",
                by_qos(QoS::AtLeastOnce),
                by_qos(QoS::ExactlyOnce),
                f.lost
                    .iter()
                    .map(|(_, p, q)| (p, q))
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            );
            for (c, n) in &causes {
                let _ = writeln!(s, "  {n:4} x {c}");
            }
        }
        for (sub, p, q) in f.lost.iter().take(limit) {
            let m = &self.sent[&(*p, *q)];
            let _ = writeln!(
                s,
                "  LOST for {sub}: p{p}/{q} topic={} qos={:?} retain={} packet_id={} epoch={} resends={} [{}]",
                m.topic,
                m.qos,
                m.retain,
                m.packet_id,
                m.epoch,
                m.resends,
                cause(sub, *p, *q)
            );
        }
        for (sub, p, q, n) in f.duplicated.iter().take(limit) {
            let m = &self.sent[&(*p, *q)];
            let copies: Vec<String> = self
                .delivered
                .get(sub)
                .into_iter()
                .flatten()
                .filter(|d| d.publisher == *p && d.seq == *q)
                .map(|d| format!("id {} dup={}", d.packet_id, u8::from(d.dup)))
                .collect();
            let _ = writeln!(
                s,
                "  DUPLICATE for {sub}: p{p}/{q} x{n} topic={} epoch={} publisher_resends={}; received as [{}]",
                m.topic,
                m.epoch,
                m.resends,
                copies.join(", ")
            );
        }
        for (sub, p, q) in f.unexpected.iter().take(limit) {
            let _ = writeln!(s, "  UNEXPECTED for {sub}: p{p}/{q}");
        }
        for v in self.violations.iter().take(limit) {
            let _ = writeln!(s, "  VIOLATION: {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        assert_eq!(parse_payload(payload(3, 1234).as_bytes()), Some((3, 1234)));
        assert_eq!(parse_payload(b"x"), None);
    }

    #[test]
    fn finds_lost_and_duplicated() {
        let mut l = Ledger::default();
        let s = |topic: &str, qos| Sent {
            topic: topic.into(),
            qos,
            retain: false,
            acked: true,
            packet_id: 1,
            epoch: 0,
            reuses_completed_id: false,
            refused: None,
            resends: 0,
        };
        l.sent(0, 1, s("a/b", QoS::ExactlyOnce));
        l.sent(0, 2, s("a/b", QoS::ExactlyOnce));
        l.sent(0, 3, s("c", QoS::AtLeastOnce));
        let d = |seq| Delivered {
            publisher: 0,
            seq,
            qos: QoS::ExactlyOnce,
            dup: false,
            packet_id: 1,
        };
        l.delivered("s", d(1));
        l.delivered("s", d(1));
        let subs = [SubSpec {
            name: "s".into(),
            filter: "a/#".into(),
            qos: QoS::ExactlyOnce,
        }];
        let f = l.check(&subs);
        assert_eq!(f.lost, vec![("s".to_string(), 0, 2)]);
        assert_eq!(f.duplicated, vec![("s".to_string(), 0, 1, 2)]);
        assert!(f.unexpected.is_empty());
    }
}
