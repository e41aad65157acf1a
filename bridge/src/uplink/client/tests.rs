//! The client driven in memory: a spool of rows as a map (stage commits and deletes
//! applied when the client asks, as the driver does), packets from the cloud encoded
//! and fed in, what the client writes decoded back, and a clock that only moves when
//! a test moves it. A link drop is the end of one `Client` and the start of another
//! over the same spool, as the reconnect loop does.
//!
//! The harness and the timers' tests (replay rate, keep alive, goodbye) are here; the
//! rest by concern in `tests/`.
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use outpost_mqtt::{Protocol, PubResponse, QoS};

use super::end::may_be_about_a_message;
use super::send::Claims;
use super::timers::GOODBYE_TIMEOUT;
use super::*;
use crate::rules::{Direction, RetainMode, Rules, TopicRule};
use crate::spool::{NewMessage, Stage};
use crate::stats::BridgeStats;
use crate::status::Status;

mod downlink;
mod drops;
mod qos2;
mod send;

/// One `in` rule taking every command under `gw-01/cmd/` to `cmd/`, retain kept.
fn in_rules() -> Rules {
    Rules::new(vec![TopicRule {
        pattern: "#".into(),
        direction: Direction::In,
        qos: QoS::ExactlyOnce,
        local_prefix: "cmd/".into(),
        remote_prefix: "gw-01/cmd/".into(),
        retain: RetainMode::Keep,
    }])
}

/// A command from the cloud on `gw-01/cmd/valve` (packet id `pid` unless QoS 0).
fn command(qos: QoS, pid: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: ByteString::from("gw-01/cmd/valve"),
        packet_id: (qos != QoS::AtMostOnce).then_some(pid),
        properties: Properties::default(),
        payload: Bytes::from_static(b"open"),
    }
}

const NOW_MS: i64 = 1_800_000_000_000;

/// Nothing is claimed for dropping in these tests (drop-oldest has its own).
struct NoClaims;

impl Claims for NoClaims {
    fn claimed(&self, _: i64, _: Stage) -> bool {
        false
    }
    fn take(&mut self, _: i64) {}
    fn pass(&mut self, _: i64) {}
}

/// The spool as far as the client can tell: rows by id.
#[derive(Default)]
struct Spool {
    rows: BTreeMap<i64, StoredMessage>,
    incoming: HashSet<u16>,
}

impl Spool {
    fn add(&mut self, id: i64, qos: QoS) {
        self.rows.insert(
            id,
            StoredMessage {
                id,
                topic: format!("site/boiler/{id}"),
                payload: Bytes::from(format!("reading {id}")),
                qos,
                retain: false,
                properties: Properties::default(),
                accepted_ms: NOW_MS - 1_000,
                packet_id: None,
                stage: Stage::New,
            },
        );
    }

    fn in_progress(&self) -> Vec<StoredMessage> {
        self.rows
            .values()
            .filter(|r| r.stage != Stage::New)
            .cloned()
            .collect()
    }

    fn row(&self, id: i64) -> &StoredMessage {
        &self.rows[&id]
    }
}

/// One connection to the cloud: the client and the bytes it wrote since the last look.
struct Link<'a> {
    client: Client<'a>,
    now: Instant,
}

impl<'a> Link<'a> {
    /// A new session over `spool`, as the driver opens it.
    fn open(
        setup: Setup<'a>,
        spool: &Spool,
        limits: Limits,
        careful_through: i64,
        now: Instant,
    ) -> Self {
        Link::open_resuming(setup, spool, limits, careful_through, now, Vec::new())
    }

    /// [`Link::open`] after a connection that left the QoS 1 rows `unacked` without
    /// PUBACK, as the driver carries them from one connection to the next.
    fn open_resuming(
        setup: Setup<'a>,
        spool: &Spool,
        limits: Limits,
        careful_through: i64,
        now: Instant,
        unacked: Vec<(i64, u16)>,
    ) -> Self {
        let incoming = if limits.session_present {
            spool.incoming.iter().copied().collect()
        } else {
            Vec::new()
        };
        let mut client = Client::new(setup, limits, careful_through, now, NOW_MS);
        client.resume_qos1(unacked);
        client.start(&spool.in_progress(), incoming, now).unwrap();
        client.handle_rows(spool.rows.values().cloned().collect(), true);
        Link { client, now }
    }

    /// One turn of the driver: fill the window, let the spool apply what the client
    /// asks (deletes first, then stages), and return what went on the wire.
    fn turn(&mut self, spool: &mut Spool) -> Vec<Packet> {
        self.client.fill(self.now, NOW_MS, &mut NoClaims).unwrap();
        self.client.pump_downlink().unwrap();
        self.apply(spool);
        self.wire()
    }

    /// Like [`Link::turn`], but the stage commit it asks for never becomes durable
    /// (the gateway loses power): returns what went on the wire before that.
    fn turn_without_commit(&mut self, spool: &mut Spool) -> (Vec<Packet>, Vec<StageUpdate>) {
        self.client.fill(self.now, NOW_MS, &mut NoClaims).unwrap();
        for id in self.client.poll_acked() {
            spool.rows.remove(&id);
        }
        let updates = self.client.poll_commit().unwrap_or_default();
        (self.wire(), updates)
    }

    fn apply(&mut self, spool: &mut Spool) {
        for id in self.client.poll_acked() {
            spool.rows.remove(&id);
        }
        if let Some(updates) = self.client.poll_commit() {
            for u in updates {
                let row = spool.rows.get_mut(&u.id).expect("stage for a spooled row");
                row.stage = u.stage;
                row.packet_id = Some(u.packet_id);
            }
            self.client.handle_stages_committed(self.now).unwrap();
        }
        if let Some(ops) = self.client.poll_incoming_commit() {
            for op in ops {
                match op {
                    IncomingOp::Add(id) => spool.incoming.insert(id),
                    IncomingOp::Remove(id) => spool.incoming.remove(&id),
                };
            }
            self.client.handle_incoming_committed().unwrap();
        }
    }

    /// Decodes what the client wrote since the last look; like the driver, tells the
    /// client it went out only when there was something.
    fn wire(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        let buf = self.client.poll_transmit();
        while let Some(p) = decode(buf, Protocol::V5, MAX_INCOMING_PACKET).unwrap() {
            out.push(p);
        }
        assert!(buf.is_empty(), "a partial packet was written");
        if !out.is_empty() {
            self.client.handle_flushed(self.now);
        }
        out
    }

    /// The clock moves to `now` and the client's timers due by then fire; what went on
    /// the wire.
    fn tick(&mut self, now: Instant) -> Result<Vec<Packet>, SessionEnd> {
        self.now = now;
        self.client.handle_timeout(now)?;
        Ok(self.wire())
    }

    /// The cloud sends `packets`.
    fn receive(&mut self, packets: &[Packet]) -> Result<(), SessionEnd> {
        let mut rbuf = BytesMut::new();
        for p in packets {
            encode(p, Protocol::V5, &mut rbuf).unwrap();
        }
        while self.client.handle_next(&mut rbuf, self.now)? {}
        Ok(())
    }
}

fn limits(session_present: bool, moved: bool) -> Limits {
    Limits {
        window: 16,
        max_qos: QoS::ExactlyOnce,
        max_packet: 1 << 20,
        retain_available: true,
        keep_alive: Duration::from_secs(60),
        session_present,
        moved,
        topic_alias_max: 0,
    }
}

fn setup<'a>(rules: &'a Rules, stats: &'a BridgeStats) -> Setup<'a> {
    Setup {
        name: "cloud",
        protocol: Protocol::V5,
        rules,
        status: None,
        replay_rate: 0,
        stats,
    }
}

/// The PUBLISHes among `packets`, by the row their payload names.
fn publishes(packets: &[Packet]) -> Vec<(i64, Publish)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => {
                let text = std::str::from_utf8(&p.payload).unwrap();
                let row = text.strip_prefix("reading ").unwrap().parse().unwrap();
                Some((row, p.clone()))
            }
            _ => None,
        })
        .collect()
}

fn ack(p: &Publish) -> Packet {
    Packet::PubAck(PubResponse::new(p.packet_id.unwrap()))
}

#[test]
fn a_backlog_from_before_the_session_goes_at_the_replay_rate_on_the_given_clock() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    for id in 1..=3 {
        spool.add(id, QoS::AtLeastOnce); // accepted before the session started
    }
    let mut s = setup(&rules, &stats);
    s.replay_rate = 2; // one every 500 ms
    let t0 = Instant::now();
    let mut link = Link::open(s, &spool, limits(false, false), 0, t0);
    let rows = |wire: &[Packet]| publishes(wire).iter().map(|(r, _)| *r).collect::<Vec<_>>();
    assert_eq!(rows(&link.turn(&mut spool)), [1]);
    assert_eq!(
        link.client.poll_timeout(),
        Some(t0 + Duration::from_millis(500))
    );
    link.now = t0 + Duration::from_millis(499);
    assert!(link.turn(&mut spool).is_empty(), "too early");
    assert!(
        link.tick(t0 + Duration::from_millis(500))
            .unwrap()
            .is_empty()
    );
    assert_eq!(rows(&link.turn(&mut spool)), [2]);
    assert!(
        link.tick(t0 + Duration::from_millis(1_000))
            .unwrap()
            .is_empty()
    );
    assert_eq!(rows(&link.turn(&mut spool)), [3]);
}

#[test]
fn after_a_wait_the_replay_rate_sends_the_credit_of_up_to_a_tenth_of_a_second_in_one_batch() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    for id in 1..=2_000 {
        spool.add(id, QoS::AtLeastOnce); // accepted before the session started
    }
    let mut s = setup(&rules, &stats);
    s.replay_rate = 300;
    let t0 = Instant::now();
    // A window far above what the rate lets out, so only the rate paces.
    let wide = Limits {
        window: 1_000,
        ..limits(false, false)
    };
    let mut link = Link::open(s, &spool, wide, 0, t0);
    let turn = |link: &mut Link, spool: &mut Spool| {
        let batch = publishes(&link.turn(spool));
        let acks: Vec<Packet> = batch.iter().map(|(_, p)| ack(p)).collect();
        link.receive(&acks).unwrap();
        link.apply(spool);
        batch.len()
    };
    assert_eq!(turn(&mut link, &mut spool), 1, "the first goes at once");
    // The sender was held for 100 ms (a commit, a slow cloud): what the rate allowed
    // meanwhile goes now, in one batch, rather than one message per turn.
    link.now = t0 + Duration::from_millis(100);
    let batch = turn(&mut link, &mut spool);
    assert!(
        (29..=31).contains(&batch),
        "{batch} sent after a 100 ms wait at 300/s"
    );
    // A long wait earns no more than a tenth of a second's credit.
    link.now = t0 + Duration::from_secs(5);
    let batch = turn(&mut link, &mut spool);
    assert!(
        (30..=32).contains(&batch),
        "{batch} sent after a 4.9 s wait at 300/s"
    );
    // Over a whole second of turns every 10 ms the rate holds: 300, plus at most the
    // credit already counted above.
    let mut second = 0;
    for ms in (10..=1_000).step_by(10) {
        link.now = t0 + Duration::from_secs(5) + Duration::from_millis(ms);
        second += turn(&mut link, &mut spool);
    }
    assert!(
        (290..=301).contains(&second),
        "{second} sent in the second after"
    );
}

/// Keep alive of the [`limits`] the tests use.
const KA: Duration = Duration::from_secs(60);
const MS: Duration = Duration::from_millis(1);

/// A link over an empty spool, without status messages or subscriptions: nothing goes
/// on the wire unless the keep-alive sends it.
fn quiet_link<'a>(rules: &'a Rules, stats: &'a BridgeStats, start: Instant) -> Link<'a> {
    let mut link = Link::open(
        setup(rules, stats),
        &Spool::default(),
        limits(false, false),
        0,
        start,
    );
    assert!(link.wire().is_empty());
    link
}

#[test]
fn a_pingreq_goes_after_one_keep_alive_of_silence_and_not_before() {
    // MQTT-3.1.2-23 (3.1.1; MQTT-3.1.2-20 in 5.0): with nothing else to send within the
    // Keep Alive interval, the client MUST send a PINGREQ.
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let start = Instant::now();
    let mut link = quiet_link(&rules, &stats, start);
    assert_eq!(link.client.poll_timeout(), Some(start + KA));
    assert!(link.tick(start + KA / 2).unwrap().is_empty());
    assert!(
        link.tick(start + KA - MS).unwrap().is_empty(),
        "no PINGREQ before the link was quiet one keep alive"
    );
    assert_eq!(link.tick(start + KA).unwrap(), [Packet::PingReq]);
    // One PINGREQ out at a time.
    assert!(link.tick(start + KA + KA / 4).unwrap().is_empty());
}

#[test]
fn a_link_whose_pingresp_does_not_come_is_closed_after_one_and_a_half_keep_alive() {
    // A client that gets no PINGRESP in a reasonable time after its PINGREQ should close
    // the connection (3.1.2.10); the time taken is the server's own for a silent client,
    // one and a half Keep Alive intervals without a packet (MQTT-3.1.2-24 in 3.1.1,
    // MQTT-3.1.2-22 in 5.0).
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let start = Instant::now();
    let mut link = quiet_link(&rules, &stats, start);
    assert_eq!(link.tick(start + KA).unwrap(), [Packet::PingReq]);
    assert!(link.tick(start + KA + KA / 2 - MS).unwrap().is_empty());
    match link.tick(start + KA + KA / 2) {
        Err(SessionEnd::Lost(why)) => assert!(why.contains("keep alive"), "{why}"),
        other => panic!("the link stays up without PINGRESP: {other:?}"),
    }

    // The same, answered: the link stays, and the next PINGREQ is one keep alive after
    // the last one went.
    let mut link = quiet_link(&rules, &stats, start);
    assert_eq!(link.tick(start + KA).unwrap(), [Packet::PingReq]);
    link.now = start + KA + Duration::from_secs(1);
    link.receive(&[Packet::PingResp]).unwrap();
    // What the driver sleeps until.
    assert_eq!(link.client.poll_timeout(), Some(start + 2 * KA));
    assert!(link.tick(start + KA + KA / 2).unwrap().is_empty());
    assert!(link.tick(start + 2 * KA - MS).unwrap().is_empty());
    assert_eq!(link.tick(start + 2 * KA).unwrap(), [Packet::PingReq]);

    // Any packet from the cloud is a sign of life, not only PINGRESP: a slow PUBACK
    // after the PINGREQ keeps the link for one and a half keep alive from then.
    let mut spool = Spool::default();
    spool.add(1, QoS::AtLeastOnce);
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(false, false),
        0,
        start,
    );
    let sent = publishes(&link.turn(&mut spool));
    assert_eq!(link.tick(start + KA).unwrap(), [Packet::PingReq]);
    let answered = start + KA + Duration::from_secs(1);
    link.now = answered;
    link.receive(&[ack(&sent[0].1)]).unwrap();
    assert!(link.tick(start + KA + KA / 2).is_ok());
    assert!(link.tick(answered + KA + KA / 2 - MS).is_ok());
    assert!(matches!(
        link.tick(answered + KA + KA / 2),
        Err(SessionEnd::Lost(_))
    ));
}

#[test]
fn traffic_both_ways_puts_the_pingreq_off() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    spool.add(1, QoS::AtLeastOnce);
    let start = Instant::now();
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(false, false),
        0,
        start,
    );
    let sent = publishes(&link.turn(&mut spool));
    assert_eq!(sent.len(), 1);
    // In at 30 s: we have sent nothing since the start, so a PINGREQ stays due at one
    // keep alive (MQTT-3.1.2-23 is about the interval between the packets we send).
    link.now = start + Duration::from_secs(30);
    link.receive(&[ack(&sent[0].1)]).unwrap();
    assert_eq!(link.client.poll_timeout(), Some(start + KA));
    // Out at 45 s: both ways had traffic since 30 s.
    link.now = start + Duration::from_secs(45);
    link.client.handle_live_qos0(NewMessage {
        topic: "site/boiler/live".into(),
        payload: Bytes::from_static(b"21.5"),
        qos: QoS::AtMostOnce,
        retain: false,
        props: None,
        accepted_ms: NOW_MS,
    });
    assert_eq!(link.wire().len(), 1);
    let due = start + Duration::from_secs(30) + KA;
    assert_eq!(link.client.poll_timeout(), Some(due));
    assert!(
        link.tick(start + KA).unwrap().is_empty(),
        "a PINGREQ at the old deadline"
    );
    assert!(link.tick(due - MS).unwrap().is_empty());
    assert_eq!(link.tick(due).unwrap(), [Packet::PingReq]);
    // The cloud spoke last at 30 s: it is given up on one and a half keep alive after.
    let dead = start + Duration::from_secs(30) + KA + KA / 2;
    assert!(link.tick(dead - MS).is_ok());
    assert!(matches!(link.tick(dead), Err(SessionEnd::Lost(_))));
}

#[test]
fn the_goodbye_waits_so_long_for_the_offline_status_to_be_acknowledged() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let status = Status::new("outpost", "gw-01", "cloud", std::time::UNIX_EPOCH);
    let mut spool = Spool::default();
    let mut s = setup(&rules, &stats);
    s.status = Some(&status);
    let start = Instant::now();
    let mut link = Link::open(s, &spool, limits(false, false), 0, start);
    let wire = link.turn(&mut spool);
    let Packet::Publish(birth) = &wire[0] else {
        panic!("{wire:?}")
    };
    link.receive(&[ack(birth)]).unwrap();
    // Shutdown just before a PINGREQ would be due: the goodbye's deadline rules now.
    let bye = start + KA - MS;
    link.now = bye;
    assert!(link.client.handle_shutdown(bye).unwrap());
    assert!(matches!(&link.wire()[..], [Packet::Publish(p)] if p.topic == birth.topic));
    assert!(link.client.goodbye_pending());
    // Writing more during the wait does not move the deadline.
    link.now = bye + Duration::from_secs(1);
    link.client.handle_live_qos0(NewMessage {
        topic: "site/boiler/live".into(),
        payload: Bytes::from_static(b"21.5"),
        qos: QoS::AtMostOnce,
        retain: false,
        props: None,
        accepted_ms: NOW_MS,
    });
    assert_eq!(link.wire().len(), 1);
    assert!(link.tick(bye + GOODBYE_TIMEOUT - MS).unwrap().is_empty());
    assert!(link.client.goodbye_pending());
    assert!(link.tick(bye + GOODBYE_TIMEOUT).unwrap().is_empty());
    assert!(
        !link.client.goodbye_pending(),
        "the goodbye waits past its time"
    );
}
