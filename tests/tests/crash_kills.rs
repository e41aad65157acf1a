//! Fault suite (issue #17): SIGKILL the broker at random moments under mixed QoS 1/2
//! traffic from 3.1.1 and 5.0 publishers, with persistent-session subscribers (some
//! online and acknowledging, some offline for periods) and retained messages, restart
//! it after every kill, and check from a ledger that nothing the broker acknowledged was
//! lost, that no QoS 2 message reached a subscriber twice, and that each retained topic
//! holds the last acknowledged value.
//!
//! The publishers and subscribers are raw clients, so the test knows exactly which
//! PUBACK / PUBREC / PUBCOMP arrived before each kill. A message is the broker's from its
//! PUBACK (QoS 1) or its PUBREC (QoS 2: "the receiver ... MUST respond with a PUBREC ...
//! having accepted ownership of the Application Message", 3.1.1 MQTT-4.3.3-2, 5.0
//! MQTT-4.3.3-8).
//!
//! Publishers draw packet ids from a tiny space, most recently freed first, so an id whose
//! QoS 2 exchange has just ended with PUBCOMP is reused by the very next PUBLISH, across
//! kills too (an id is free again once the PUBCOMP is processed: 3.1.1 section 2.3.1, 5.0
//! section 2.2.1), and the broker must take that PUBLISH as new: "After it has sent a
//! PUBCOMP, the receiver MUST treat any subsequent PUBLISH packet that contains that
//! Packet Identifier as being a new Application Message" (5.0 MQTT-4.3.3-12; 3.1.1
//! MQTT-4.3.3-2, "a new publication"). Some kills are fired at the instant a publisher
//! sees a PUBCOMP, the worst moment for that rule (issue #17, breach 2).
//!
//! A run prints its seed, each kill, and at the end what it found: every lost
//! (subscriber, message) pair with the likeliest cause as the wire shows it, every
//! duplicated QoS 2 delivery with the packet ids and DUP flags of its copies, and every
//! protocol violation seen.
//!
//! `OUTPOST_CRASH_SEED=<n>` replays a run; `OUTPOST_CRASH_KILLS=<n>` changes the number
//! of kills (at least 20 by default, the bar); `OUTPOST_CRASH_GRACEFUL=1` stops
//! the broker with SIGTERM instead, to check the test itself (it must then find nothing).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_mqtt::{Packet, Protocol, PubResponse, Publish, QoS, ReasonCode};
use outpost_tests::ledger::{Delivered, Ledger, Rng, Sent, SubSpec, parse_payload, payload};
use outpost_tests::raw::{RawError, connect_packet, publish, sub_opts};
use outpost_tests::{Broker, RawClient, outpost_only};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, sleep, timeout};

/// Kills under traffic (the issue asks for at least 20).
const DEFAULT_KILLS: usize = 30;
/// Packet ids a publisher uses: ids 1..=WINDOW, so each is reused constantly.
const WINDOW: u16 = 3;
/// Messages per publisher at most (keeps every offline queue far below the broker's
/// default `max_queued_messages` of 10,000, so no drop is legitimate).
const MAX_PER_PUBLISHER: u32 = 1500;
/// Least time between two new messages of one publisher.
const SEND_INTERVAL: Duration = Duration::from_millis(5);
/// Bound on the whole test.
const TEST_BUDGET: Duration = Duration::from_secs(85);

/// The publishers: name, protocol, share of QoS 2 messages.
const PUBLISHERS: [(&str, Protocol, f64); 4] = [
    ("ck-p0", Protocol::V3_1_1, 0.3),
    ("ck-p1", Protocol::V3_1_1, 0.8),
    ("ck-p2", Protocol::V5, 0.3),
    ("ck-p3", Protocol::V5, 0.8),
];

/// The persistent subscribers: name, protocol, filter, QoS, offline at times.
const SUBSCRIBERS: [(&str, Protocol, &str, QoS, bool); 4] = [
    ("ck-s0", Protocol::V3_1_1, "ck/#", QoS::ExactlyOnce, false),
    ("ck-s1", Protocol::V5, "ck/m/#", QoS::ExactlyOnce, true),
    (
        "ck-s2",
        Protocol::V3_1_1,
        "ck/+/ck-p3/#",
        QoS::ExactlyOnce,
        true,
    ),
    ("ck-s3", Protocol::V5, "ck/r/#", QoS::AtLeastOnce, true),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Publishers send new messages; the broker is killed at a random moment.
    Traffic,
    /// No new messages: publishers finish every open exchange, subscribers all online.
    Finish,
    /// After the final restart: subscribers read everything they are owed.
    Drain,
    /// Tasks exit.
    Done,
}

/// One broker incarnation, announced to every client task.
#[derive(Debug, Clone, Copy)]
struct Epoch {
    n: u32,
    port: u16,
    phase: Phase,
}

/// A task's report for an epoch.
#[derive(Debug)]
enum Report {
    /// Connected and resent what MQTT-4.4.0-1 requires (or chose to stay offline).
    Ready(usize, u32),
    /// Finish/Drain work done.
    Done(usize, u32),
}

/// The broker, shared so a publisher can kill it the instant it sees a PUBCOMP.
struct Killer {
    broker: Mutex<Broker>,
    /// A kill is wanted at the next PUBCOMP any publisher receives.
    armed: AtomicBool,
    fired: Notify,
    /// `OUTPOST_CRASH_GRACEFUL=1`: SIGTERM instead of SIGKILL, which validates the test
    /// itself (a graceful stop must lose nothing, so any finding then is the test's).
    graceful: bool,
}

impl Killer {
    fn kill(&self) {
        let mut b = self.broker.lock().unwrap();
        if self.graceful {
            tokio::task::block_in_place(|| b.stop_gracefully());
        } else {
            b.kill9();
        }
    }
}

type Shared = Arc<Mutex<Ledger>>;

async fn next_epoch(rx: &mut watch::Receiver<Epoch>, seen: u32) -> Epoch {
    loop {
        let e = *rx.borrow_and_update();
        if e.n > seen || e.phase == Phase::Done {
            return e;
        }
        if rx.changed().await.is_err() {
            return Epoch {
                n: u32::MAX,
                port: 0,
                phase: Phase::Done,
            };
        }
    }
}

/// A CONNECT resuming the client's session: clean session 0 (3.1.1) / clean start 0 and a
/// session expiry (5.0), so the session survives the connection (3.1.1 MQTT-3.1.2-4;
/// 5.0 sections 3.1.2.4 and 3.1.2.11.2).
fn resume(protocol: Protocol, id: &str) -> outpost_mqtt::Connect {
    let mut c = connect_packet(protocol, id, false);
    if protocol.is_v5() {
        c.properties.session_expiry_interval = Some(3600);
    }
    c
}

/// Connect or report why not (the broker may be killed between announce and connect).
async fn try_connect(
    port: u16,
    protocol: Protocol,
    id: &str,
) -> Result<(RawClient, outpost_mqtt::ConnAck), String> {
    let c = resume(protocol, id);
    let stream = timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await;
    if !matches!(stream, Ok(Ok(_))) {
        return Err(format!("{id}: tcp connect to {port} failed"));
    }
    drop(stream);
    let mut raw = RawClient::tcp(port, protocol).await;
    raw.send(&Packet::Connect(Box::new(c))).await;
    match raw.recv(Duration::from_secs(5)).await {
        Ok(Packet::ConnAck(ack)) if ack.reason == ReasonCode::SUCCESS => Ok((raw, ack)),
        other => Err(format!("{id}: expected CONNACK 0x00, got {other:?}")),
    }
}

/// One message of a publisher not yet completed.
#[derive(Debug, Clone)]
struct Flight {
    id: u16,
    seq: u32,
    topic: String,
    qos: QoS,
    retain: bool,
    /// PUBREC received: the second half of the QoS 2 exchange is open.
    rec: bool,
}

struct Publisher {
    idx: usize,
    name: &'static str,
    protocol: Protocol,
    qos2: f64,
    rng: Rng,
    next_seq: u32,
    /// Open exchanges in the order first sent.
    flights: Vec<Flight>,
    /// Free packet ids, the most recently freed last (taken first).
    free: Vec<u16>,
    /// Connections made so far (the current one's number).
    conn: u32,
    /// Per packet id: the connection on which its last QoS 2 exchange ended with PUBCOMP,
    /// until a new QoS 2 PUBLISH uses the id.
    completed_on: BTreeMap<u16, u32>,
    ledger: Shared,
    killer: Arc<Killer>,
}

impl Publisher {
    fn violation(&self, what: String) {
        self.ledger
            .lock()
            .unwrap()
            .violation(format!("{}: {what}", self.name));
    }

    async fn run(mut self, mut rx: watch::Receiver<Epoch>, report: mpsc::UnboundedSender<Report>) {
        let mut seen = 0u32;
        let mut ever = false;
        loop {
            let e = next_epoch(&mut rx, seen).await;
            if e.phase == Phase::Done {
                return;
            }
            if e.phase == Phase::Drain {
                seen = e.n;
                let _ = report.send(Report::Ready(self.idx, e.n));
                let _ = report.send(Report::Done(self.idx, e.n));
                continue;
            }
            seen = e.n;
            let conn = try_connect(e.port, self.protocol, self.name).await;
            let mut raw = match conn {
                Ok((raw, ack)) => {
                    if ever && !ack.session_present {
                        // The broker must keep the session (3.1.1 MQTT-3.2.2-2, 5.0
                        // MQTT-3.2.2-3: Session Present 1 when it has the session).
                        self.violation(format!("session lost at epoch {}", e.n));
                    }
                    raw
                }
                Err(why) => {
                    self.violation(why);
                    let _ = report.send(Report::Ready(self.idx, e.n));
                    continue;
                }
            };
            ever = true;
            self.conn += 1;
            // MQTT-4.4.0-1: "When a Client reconnects with CleanSession set to 0, both the
            // Client and Server MUST re-send any unacknowledged PUBLISH Packets (where QoS >
            // 0) and PUBREL Packets using their original Packet Identifiers" (5.0 4.4: the
            // same, with Clean Start 0). A PUBLISH is resent with DUP=1 (MQTT-3.3.1-1); once
            // PUBREC was seen only the PUBREL is: "MUST NOT re-send the PUBLISH once it has
            // sent the corresponding PUBREL packet" (3.1.1 MQTT-4.3.3-1, 5.0 MQTT-4.3.3-6).
            for f in self.flights.clone() {
                self.ledger.lock().unwrap().resent(self.idx as u32, f.seq);
                if f.rec {
                    raw.send(&Packet::PubRel(PubResponse::new(f.id))).await;
                } else {
                    let mut p = self.packet(&f);
                    p.dup = true;
                    raw.send(&Packet::Publish(p)).await;
                }
            }
            let _ = report.send(Report::Ready(self.idx, e.n));
            let finish = e.phase == Phase::Finish;
            let mut done_sent = false;
            let mut next_send = Instant::now();
            loop {
                if rx.has_changed().unwrap_or(true) {
                    break;
                }
                if finish && self.flights.is_empty() && !done_sent {
                    let _ = report.send(Report::Done(self.idx, e.n));
                    done_sent = true;
                }
                let can_send = !finish
                    && self.next_seq < MAX_PER_PUBLISHER
                    && self.flights.len() < usize::from(WINDOW);
                let now = Instant::now();
                if can_send && now >= next_send {
                    self.send_new(&mut raw, e.n).await;
                    // Paced, so traffic lasts through every kill of the run.
                    next_send = now + SEND_INTERVAL;
                    continue;
                }
                let wait = if can_send {
                    next_send.saturating_duration_since(now)
                } else {
                    Duration::from_millis(100)
                };
                match raw.recv(wait).await {
                    Ok(p) => {
                        if !self.on_packet(&mut raw, p).await {
                            break;
                        }
                    }
                    Err(RawError::Timeout) => {}
                    Err(RawError::Closed) => break,
                    Err(RawError::Decode(d)) => {
                        self.violation(format!("undecodable packet: {d:?}"));
                        break;
                    }
                }
            }
            if finish && !done_sent {
                self.violation(format!(
                    "exchanges still open at the end of the finish: {:?}",
                    self.flights
                ));
                let _ = report.send(Report::Done(self.idx, e.n));
            }
        }
    }

    fn packet(&self, f: &Flight) -> Publish {
        let mut p = publish(
            &f.topic,
            f.qos,
            Some(f.id),
            payload(self.idx as u32, f.seq).as_bytes(),
        );
        p.retain = f.retain;
        p
    }

    async fn send_new(&mut self, raw: &mut RawClient, epoch: u32) {
        let id = self.free.pop().expect("a free id when below the window");
        let seq = self.next_seq;
        self.next_seq += 1;
        let qos = if self.rng.chance(self.qos2) {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        // One retained message in flight per topic at most, so "the last acknowledged"
        // is well defined even when a resend follows a later message.
        let retain = !self.flights.iter().any(|f| f.retain) && self.rng.chance(0.25);
        let topic = if retain {
            format!("ck/r/{}", self.name)
        } else {
            format!("ck/m/{}/{}", self.name, seq % 4)
        };
        let reuses =
            qos == QoS::ExactlyOnce && self.completed_on.remove(&id).is_some_and(|c| c < self.conn);
        self.ledger.lock().unwrap().sent(
            self.idx as u32,
            seq,
            Sent {
                topic: topic.clone(),
                qos,
                retain,
                acked: false,
                packet_id: id,
                epoch,
                reuses_completed_id: reuses,
                refused: None,
                resends: 0,
            },
        );
        let f = Flight {
            id,
            seq,
            topic,
            qos,
            retain,
            rec: false,
        };
        let p = self.packet(&f);
        self.flights.push(f);
        raw.send(&Packet::Publish(p)).await;
    }

    fn end_flight(&mut self, id: u16) -> Option<Flight> {
        let i = self.flights.iter().position(|f| f.id == id)?;
        let f = self.flights.remove(i);
        self.free.push(id);
        Some(f)
    }

    /// Handles one packet; false when the connection is over.
    async fn on_packet(&mut self, raw: &mut RawClient, p: Packet) -> bool {
        let v5 = self.protocol.is_v5();
        match p {
            Packet::PubAck(r) => {
                let Some(f) = self.flights.iter().find(|f| f.id == r.packet_id).cloned() else {
                    self.violation(format!("PUBACK for unknown id {}", r.packet_id));
                    return true;
                };
                if f.qos != QoS::AtLeastOnce {
                    // 3.1.1 MQTT-4.8.0-1 / 5.0 4.13: an acknowledgement of the wrong kind.
                    self.violation(format!("PUBACK for QoS 2 p{}/{}", self.idx, f.seq));
                    return true;
                }
                self.end_flight(r.packet_id);
                let mut l = self.ledger.lock().unwrap();
                if v5 && r.reason.is_error() {
                    l.refused(self.idx as u32, f.seq, r.reason.0);
                } else {
                    l.acked(self.idx as u32, f.seq);
                }
            }
            Packet::PubRec(r) => {
                let Some(f) = self.flights.iter_mut().find(|f| f.id == r.packet_id) else {
                    self.violation(format!("PUBREC for unknown id {}", r.packet_id));
                    return true;
                };
                if f.qos != QoS::ExactlyOnce {
                    let seq = f.seq;
                    self.violation(format!("PUBREC for QoS 1 p{}/{seq}", self.idx));
                    return true;
                }
                let seq = f.seq;
                if v5 && r.reason.is_error() {
                    // A failing PUBREC ends the exchange (5.0 MQTT-4.3.3-4: no PUBREL).
                    self.end_flight(r.packet_id);
                    self.ledger
                        .lock()
                        .unwrap()
                        .refused(self.idx as u32, seq, r.reason.0);
                    return true;
                }
                f.rec = true;
                self.ledger.lock().unwrap().acked(self.idx as u32, seq);
                // 3.1.1 MQTT-4.3.3-1 / 5.0 MQTT-4.3.3-4: "MUST send a PUBREL packet when it
                // receives a PUBREC packet from the receiver".
                raw.send(&Packet::PubRel(PubResponse::new(r.packet_id)))
                    .await;
            }
            Packet::PubComp(r) => {
                let Some(f) = self.flights.iter().find(|f| f.id == r.packet_id) else {
                    self.violation(format!("PUBCOMP for unknown id {}", r.packet_id));
                    return true;
                };
                if f.qos != QoS::ExactlyOnce || !f.rec {
                    let seq = f.seq;
                    self.violation(format!("PUBCOMP before PUBREC for p{}/{seq}", self.idx));
                    return true;
                }
                self.end_flight(r.packet_id);
                self.completed_on.insert(r.packet_id, self.conn);
                if self.killer.armed.swap(false, Ordering::SeqCst) {
                    // The worst moment for breach 2 of issue #17: the PUBCOMP is out, the
                    // deletion of the incoming packet id may not be committed yet.
                    self.killer.kill();
                    self.killer.fired.notify_one();
                    return false;
                }
            }
            Packet::Disconnect(_) => return false,
            _ => {}
        }
        true
    }
}

struct Subscriber {
    idx: usize,
    name: &'static str,
    protocol: Protocol,
    filter: &'static str,
    qos: QoS,
    flaky: bool,
    rng: Rng,
    subscribed: bool,
    /// QoS 2 packet ids received and not yet released (PUBREL), with what they carried.
    awaiting_rel: BTreeMap<u16, (u32, u32)>,
    ledger: Shared,
}

enum Presence {
    Online,
    Offline,
    DropAfter(Duration, bool),
}

impl Subscriber {
    fn violation(&self, what: String) {
        self.ledger
            .lock()
            .unwrap()
            .violation(format!("{}: {what}", self.name));
    }

    async fn run(mut self, mut rx: watch::Receiver<Epoch>, report: mpsc::UnboundedSender<Report>) {
        let mut seen = 0u32;
        loop {
            let e = next_epoch(&mut rx, seen).await;
            if e.phase == Phase::Done {
                return;
            }
            seen = e.n;
            let presence = if e.phase != Phase::Traffic || !self.subscribed || !self.flaky {
                Presence::Online
            } else {
                match self.rng.range(0, 3) {
                    0 | 1 => Presence::Online,
                    2 => Presence::Offline,
                    _ => Presence::DropAfter(
                        Duration::from_millis(self.rng.range(10, 300)),
                        self.rng.chance(0.5),
                    ),
                }
            };
            if matches!(presence, Presence::Offline) {
                let _ = report.send(Report::Ready(self.idx, e.n));
                continue;
            }
            let mut raw = match try_connect(e.port, self.protocol, self.name).await {
                Ok((raw, ack)) => {
                    if self.subscribed && !ack.session_present {
                        self.violation(format!("session lost at epoch {}", e.n));
                        self.subscribed = false;
                        // With no session on the server the client discards its own
                        // session state (3.1.1 section 3.2.2.2, 5.0 section 3.2.2.1.1).
                        self.awaiting_rel.clear();
                    }
                    raw
                }
                Err(why) => {
                    self.violation(why);
                    let _ = report.send(Report::Ready(self.idx, e.n));
                    if e.phase == Phase::Drain {
                        let _ = report.send(Report::Done(self.idx, e.n));
                    }
                    continue;
                }
            };
            if !self.subscribed {
                let code = raw
                    .subscribe(1, self.filter, sub_opts(self.qos), Default::default())
                    .await;
                assert_eq!(code.0, self.qos as u8, "{}: SUBACK", self.name);
                self.subscribed = true;
            }
            let _ = report.send(Report::Ready(self.idx, e.n));
            let drop_at = match presence {
                Presence::DropAfter(d, _) => Some(Instant::now() + d),
                _ => None,
            };
            // Drain: read until nothing more comes for a while (bounded).
            let drain = e.phase == Phase::Drain;
            let drain_deadline = Instant::now() + Duration::from_secs(20);
            let quiet = Duration::from_millis(1500);
            loop {
                if !drain && rx.has_changed().unwrap_or(true) {
                    break;
                }
                if drop_at.is_some_and(|t| Instant::now() >= t) {
                    if let Presence::DropAfter(_, true) = presence {
                        raw.disconnect().await;
                    }
                    break;
                }
                if drain && Instant::now() >= drain_deadline {
                    self.violation("still receiving after 20 s of drain".into());
                    break;
                }
                let wait = if drain {
                    quiet
                } else {
                    Duration::from_millis(50)
                };
                match raw.recv(wait).await {
                    Ok(p) => self.on_packet(&mut raw, p).await,
                    Err(RawError::Timeout) if drain => break,
                    Err(RawError::Timeout) => {}
                    Err(RawError::Closed) => {
                        if drain {
                            self.violation("connection closed during drain".into());
                        }
                        break;
                    }
                    Err(RawError::Decode(d)) => {
                        self.violation(format!("undecodable packet: {d:?}"));
                        break;
                    }
                }
            }
            if drain {
                raw.disconnect().await;
                let _ = report.send(Report::Done(self.idx, e.n));
            }
        }
    }

    async fn on_packet(&mut self, raw: &mut RawClient, p: Packet) {
        match p {
            Packet::Publish(p) => {
                let Some((publisher, seq)) = parse_payload(&p.payload) else {
                    self.violation(format!("foreign payload on {}", p.topic));
                    return;
                };
                let d = Delivered {
                    publisher,
                    seq,
                    qos: p.qos,
                    dup: p.dup,
                    packet_id: p.packet_id.unwrap_or(0),
                };
                match p.qos {
                    QoS::AtMostOnce => {
                        self.violation(format!("QoS 0 delivery of p{publisher}/{seq}"));
                        self.ledger.lock().unwrap().delivered(self.name, d);
                    }
                    QoS::AtLeastOnce => {
                        self.ledger.lock().unwrap().delivered(self.name, d);
                        raw.puback(p.packet_id.unwrap_or(0)).await;
                    }
                    QoS::ExactlyOnce => {
                        let id = p.packet_id.unwrap_or(0);
                        match self.awaiting_rel.get(&id) {
                            // 3.1.1 MQTT-4.3.3-2 / 5.0 MQTT-4.3.3-10: "Until it has
                            // received the corresponding PUBREL packet, the receiver MUST
                            // acknowledge any subsequent PUBLISH packet with the same
                            // Packet Identifier by sending a PUBREC. It MUST NOT cause
                            // duplicate messages to be delivered to any onward recipients".
                            Some(&(pp, ps)) => {
                                if (pp, ps) != (publisher, seq) {
                                    // The broker reused an id this client still holds at
                                    // the PUBREL stage: it forgot the exchange, and the new
                                    // message cannot be told from a resend.
                                    let mut l = self.ledger.lock().unwrap();
                                    l.violation(format!(
                                        "{}: packet id {id} reused for p{publisher}/{seq} while p{pp}/{ps} awaits PUBREL (MQTT-4.4.0-1: the server must resend the PUBREL)",
                                        self.name
                                    ));
                                    l.taken_for_resend(self.name, publisher, seq);
                                } else if !p.dup {
                                    self.violation(format!(
                                        "QoS 2 resend of p{publisher}/{seq} without DUP (MQTT-3.3.1-1)"
                                    ));
                                }
                            }
                            None => {
                                self.awaiting_rel.insert(id, (publisher, seq));
                                self.ledger.lock().unwrap().delivered(self.name, d);
                            }
                        }
                        raw.send(&Packet::PubRec(PubResponse::new(id))).await;
                    }
                }
            }
            Packet::PubRel(r) => {
                self.awaiting_rel.remove(&r.packet_id);
                // 3.1.1 MQTT-4.3.3-2 / 5.0 MQTT-4.3.3-11: "MUST respond to a PUBREL packet by
                // sending a PUBCOMP packet containing the same Packet Identifier".
                raw.send(&Packet::PubComp(PubResponse::new(r.packet_id)))
                    .await;
            }
            _ => {}
        }
    }
}

/// The reports of the client tasks, kept until asked for.
struct Reports {
    rx: mpsc::UnboundedReceiver<Report>,
    /// (done, task, epoch) received so far.
    seen: std::collections::HashSet<(bool, usize, u32)>,
}

impl Reports {
    /// Wait for a report (Ready, or Done when `done`) from every task in `who` for epoch
    /// `n`; false if one is missing after `within`.
    async fn gather(
        &mut self,
        who: std::ops::Range<usize>,
        n: u32,
        done: bool,
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if who.clone().all(|i| self.seen.contains(&(done, i, n))) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.rx.recv()).await {
                Ok(Some(Report::Ready(i, e))) => {
                    self.seen.insert((false, i, e));
                }
                Ok(Some(Report::Done(i, e))) => {
                    self.seen.insert((true, i, e));
                }
                Ok(None) | Err(_) => return false,
            }
        }
    }
}

/// Every retained message under `ck/r/#`, as a new clean-session subscriber sees it.
async fn retained_now(port: u16) -> BTreeMap<String, (u32, u32)> {
    let (mut c, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "ck-ret", true)).await;
    c.subscribe(1, "ck/r/#", sub_opts(QoS::AtLeastOnce), Default::default())
        .await;
    let mut got = BTreeMap::new();
    while let Ok(p) = c.recv(Duration::from_millis(800)).await {
        if let Packet::Publish(p) = p {
            assert!(
                p.retain,
                "a retained message on subscribe has RETAIN=1 (MQTT-3.3.1-8)"
            );
            if let Some(id) = p.packet_id {
                c.puback(id).await;
            }
            if let Some(k) = parse_payload(&p.payload) {
                got.insert(p.topic.to_string(), k);
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_over_random_kill_9s_under_mixed_qos_traffic() {
    outpost_only!();
    let started = Instant::now();
    let seed = Rng::seed_from_env("OUTPOST_CRASH_SEED");
    let kills: usize = std::env::var("OUTPOST_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_KILLS);
    eprintln!("crash_kills: seed {seed} (replay with OUTPOST_CRASH_SEED={seed}), {kills} kills");
    let mut rng = Rng::new(seed);

    let broker = Broker::start("");
    let port = broker.port();
    let killer = Arc::new(Killer {
        broker: Mutex::new(broker),
        armed: AtomicBool::new(false),
        fired: Notify::new(),
        graceful: std::env::var("OUTPOST_CRASH_GRACEFUL").is_ok_and(|v| v == "1"),
    });
    let ledger: Shared = Arc::new(Mutex::new(Ledger::default()));
    let (epoch_tx, epoch_rx) = watch::channel(Epoch {
        n: 1,
        port,
        phase: Phase::Traffic,
    });
    let (report_tx, rx) = mpsc::unbounded_channel();
    let mut reports = Reports {
        rx,
        seen: Default::default(),
    };
    let mut handles = Vec::new();
    // Subscribers first, so they subscribe before any traffic (task indices 0..4).
    let subs: Vec<SubSpec> = SUBSCRIBERS
        .iter()
        .map(|&(name, _, filter, qos, _)| SubSpec {
            name: name.into(),
            filter: filter.into(),
            qos,
        })
        .collect();
    for (i, &(name, protocol, filter, qos, flaky)) in SUBSCRIBERS.iter().enumerate() {
        let s = Subscriber {
            idx: i,
            name,
            protocol,
            filter,
            qos,
            flaky,
            rng: rng.fork(),
            subscribed: false,
            awaiting_rel: BTreeMap::new(),
            ledger: Arc::clone(&ledger),
        };
        handles.push(tokio::spawn(s.run(epoch_rx.clone(), report_tx.clone())));
    }
    let n_subs = SUBSCRIBERS.len();
    let tasks = n_subs + PUBLISHERS.len();
    // Epoch 1 starts with the subscribers alone: subscriptions exist before traffic.
    assert!(
        reports
            .gather(0..n_subs, 1, false, Duration::from_secs(10))
            .await,
        "subscribers did not connect"
    );
    // Publishers join at epoch 2 (the same broker, announced again: subscribers resume
    // their sessions once without a kill, which is a check of its own).
    let mut n = 2u32;
    epoch_tx.send_replace(Epoch {
        n,
        port,
        phase: Phase::Traffic,
    });
    for (i, &(name, protocol, qos2)) in PUBLISHERS.iter().enumerate() {
        let p = Publisher {
            idx: n_subs + i,
            name,
            protocol,
            qos2,
            rng: rng.fork(),
            next_seq: 0,
            flights: Vec::new(),
            free: (1..=WINDOW).rev().collect(),
            conn: 0,
            completed_on: BTreeMap::new(),
            ledger: Arc::clone(&ledger),
            killer: Arc::clone(&killer),
        };
        handles.push(tokio::spawn(p.run(epoch_rx.clone(), report_tx.clone())));
    }

    let mut at_pubcomp = 0usize;
    let mut fallback = 0usize;
    for k in 1..=kills {
        assert!(
            started.elapsed() < TEST_BUDGET,
            "time budget spent after {} kills",
            k - 1
        );
        if !reports
            .gather(0..tasks, n, false, Duration::from_secs(10))
            .await
        {
            ledger.lock().unwrap().violation(format!(
                "not every client reconnected within 10 s at epoch {n}"
            ));
        }
        let delay = rng.range(20, 400);
        sleep(Duration::from_millis(delay)).await;
        let how = if rng.chance(0.4) {
            killer.armed.store(true, Ordering::SeqCst);
            if timeout(Duration::from_millis(500), killer.fired.notified())
                .await
                .is_ok()
            {
                at_pubcomp += 1;
                "at a PUBCOMP"
            } else if killer.armed.swap(false, Ordering::SeqCst) {
                fallback += 1;
                killer.kill();
                "no PUBCOMP in 500 ms: now"
            } else {
                // A publisher claimed it just as the wait ended.
                killer.fired.notified().await;
                at_pubcomp += 1;
                "at a PUBCOMP"
            }
        } else {
            killer.kill();
            "now"
        };
        let (sent, acked) = {
            let l = ledger.lock().unwrap();
            (l.sent.len(), l.sent.values().filter(|s| s.acked).count())
        };
        eprintln!(
            "kill {k:2}/{kills}: {delay:3} ms into epoch {n}, {how}; sent {sent}, acknowledged {acked}"
        );
        let port = tokio::task::block_in_place(|| {
            let mut b = killer.broker.lock().unwrap();
            b.restart();
            b.port()
        });
        n += 1;
        epoch_tx.send_replace(Epoch {
            n,
            port,
            phase: if k == kills {
                Phase::Finish
            } else {
                Phase::Traffic
            },
        });
    }

    // Finish: every open exchange completes on the last incarnation.
    assert!(
        reports
            .gather(0..tasks, n, false, Duration::from_secs(10))
            .await,
        "clients did not reconnect for the finish"
    );
    if !reports
        .gather(n_subs..tasks, n, true, Duration::from_secs(15))
        .await
    {
        ledger
            .lock()
            .unwrap()
            .violation("publishers could not complete their exchanges within 15 s".into());
    }
    // The final restart, again by SIGKILL, then drain every persistent subscriber.
    let port = tokio::task::block_in_place(|| {
        killer.kill();
        let mut b = killer.broker.lock().unwrap();
        b.restart();
        b.port()
    });
    n += 1;
    epoch_tx.send_replace(Epoch {
        n,
        port,
        phase: Phase::Drain,
    });
    if !reports
        .gather(0..tasks, n, true, Duration::from_secs(25))
        .await
    {
        ledger
            .lock()
            .unwrap()
            .violation("subscribers did not finish draining within 25 s".into());
    }
    let retained = retained_now(port).await;
    epoch_tx.send_replace(Epoch {
        n: n + 1,
        port,
        phase: Phase::Done,
    });
    for h in handles {
        let _ = timeout(Duration::from_secs(5), h).await;
    }

    let l = ledger.lock().unwrap();
    let findings = l.check(&subs);
    let retained_problems = l.check_retained(&retained);
    eprintln!(
        "crash_kills: seed {seed}: {kills} kills ({at_pubcomp} at a PUBCOMP, {fallback} fallback), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    eprint!("{}", l.describe(&findings, 300));
    eprintln!(
        "retained: {} topics held a value, {} problems",
        retained.len(),
        retained_problems.len()
    );
    for r in &retained_problems {
        eprintln!("  RETAINED: {r}");
    }
    assert!(
        findings.is_clean() && retained_problems.is_empty() && l.violations.is_empty(),
        "seed {seed}: acknowledged messages lost or duplicated after kill -9 (see above)"
    );
}
