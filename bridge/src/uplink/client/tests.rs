//! The client driven in memory: a spool of rows as a map (stage commits and deletes
//! applied when the client asks, as the driver does), packets from the cloud encoded
//! and fed in, what the client writes decoded back, and a clock that only moves when
//! a test moves it. A link drop is the end of one `Client` and the start of another
//! over the same spool, as the reconnect loop does.
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use outpost_mqtt::PubResponse;

use super::end::may_be_about_a_message;
use super::send::Claims;
use super::timers::GOODBYE_TIMEOUT;
use super::*;
use crate::rules::{Direction, RetainMode, Rules, TopicRule};
use crate::spool::{NewMessage, Stage};
use crate::stats::BridgeStats;
use crate::status::Status;
use outpost_mqtt::{Protocol, QoS};

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
fn qos1_rows_unacknowledged_at_a_drop_go_again_and_acknowledged_ones_do_not() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    for id in 1..=4 {
        spool.add(id, QoS::AtLeastOnce);
    }
    let now = Instant::now();
    let mut link = Link::open(setup(&rules, &stats), &spool, limits(false, false), 0, now);
    let sent = publishes(&link.turn(&mut spool));
    assert_eq!(
        sent.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(
        sent.iter()
            .all(|(_, p)| p.qos == QoS::AtLeastOnce && !p.dup)
    );
    link.receive(&[ack(&sent[0].1), ack(&sent[1].1)]).unwrap();
    link.turn(&mut spool);
    // The link drops: the oldest unanswered row is the one to blame.
    match link.client.handle_drop("connection reset".into()) {
        SessionEnd::Dropped {
            suspect,
            out_through,
            qos2_unanswered,
            ..
        } => {
            assert_eq!(suspect, Some(3));
            assert_eq!(out_through, Some(4));
            assert!(!qos2_unanswered);
        }
        other => panic!("{other:?}"),
    }
    link.apply(&mut spool);
    assert_eq!(spool.rows.keys().copied().collect::<Vec<_>>(), [3, 4]);
    assert_eq!(
        stats.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    let mut link = Link::open(setup(&rules, &stats), &spool, limits(true, false), 0, now);
    let again = publishes(&link.turn(&mut spool));
    assert_eq!(again.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [3, 4]);
    assert!(again.iter().all(|(_, p)| p.qos == QoS::AtLeastOnce));
    link.receive(&[ack(&again[0].1), ack(&again[1].1)]).unwrap();
    assert!(link.turn(&mut spool).is_empty());
    assert!(spool.rows.is_empty(), "acknowledged rows are deleted");
}

/// MQTT-4.4.0-1: on a session the cloud kept, unacknowledged PUBLISHes go again under
/// their original packet identifiers, with DUP set (MQTT-3.3.1-1); on a session it lost,
/// they are new exchanges.
#[test]
fn qos1_rows_cut_by_a_drop_go_again_under_their_ids_with_dup_on_a_kept_session() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    for id in 1..=3 {
        spool.add(id, QoS::AtLeastOnce);
    }
    let now = Instant::now();
    let mut link = Link::open(setup(&rules, &stats), &spool, limits(false, false), 0, now);
    let sent = publishes(&link.turn(&mut spool));
    assert_eq!(sent.len(), 3);
    link.receive(&[ack(&sent[0].1)]).unwrap();
    link.turn(&mut spool);
    let mut unacked = link.client.unacked_qos1();
    unacked.sort_unstable();
    let pid_of = |row: i64| sent.iter().find(|(r, _)| *r == row).unwrap().1.packet_id;
    assert_eq!(
        unacked,
        [(2, pid_of(2).unwrap()), (3, pid_of(3).unwrap())],
        "rows 2 and 3 are out"
    );

    let mut kept = Link::open_resuming(
        setup(&rules, &stats),
        &spool,
        limits(true, false),
        0,
        now,
        unacked.clone(),
    );
    let again = publishes(&kept.turn(&mut spool));
    assert_eq!(again.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [2, 3]);
    for (row, p) in &again {
        assert_eq!(p.packet_id, pid_of(*row), "row {row} keeps its packet id");
        assert!(p.dup, "row {row} is a redelivery");
    }

    let mut lost = Link::open_resuming(
        setup(&rules, &stats),
        &spool,
        limits(false, false),
        0,
        now,
        unacked,
    );
    let fresh = publishes(&lost.turn(&mut spool));
    assert_eq!(fresh.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [2, 3]);
    assert!(
        fresh.iter().all(|(_, p)| !p.dup),
        "a new session: new exchanges"
    );
}

#[test]
fn qos2_publish_and_pubrel_wait_for_their_stage_to_be_durable() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    spool.add(1, QoS::ExactlyOnce);
    let now = Instant::now();
    let mut link = Link::open(setup(&rules, &stats), &spool, limits(false, false), 0, now);
    // Power fails before "published" is durable: nothing went out, the row is new.
    let (wire, updates) = link.turn_without_commit(&mut spool);
    assert!(
        wire.is_empty(),
        "PUBLISH before its stage was durable: {wire:?}"
    );
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].stage, Stage::Published);
    assert_eq!(spool.row(1).stage, Stage::New);

    let mut link = Link::open(setup(&rules, &stats), &spool, limits(false, false), 0, now);
    let sent = publishes(&link.turn(&mut spool));
    assert_eq!(sent.len(), 1);
    let pid = sent[0].1.packet_id.unwrap();
    assert_eq!((sent[0].1.qos, sent[0].1.dup), (QoS::ExactlyOnce, false));
    assert_eq!(spool.row(1).stage, Stage::Published);
    assert_eq!(spool.row(1).packet_id, Some(pid));
    // PUBREC: the PUBREL waits for "released" to be durable.
    link.receive(&[Packet::PubRec(PubResponse::new(pid))])
        .unwrap();
    let (wire, updates) = link.turn_without_commit(&mut spool);
    assert!(
        wire.is_empty(),
        "PUBREL before its stage was durable: {wire:?}"
    );
    assert_eq!(updates[0].stage, Stage::Released);
    // Power failed there: the next session resends the PUBLISH (DUP, same id), which
    // the cloud deduplicates.
    let mut link = Link::open(setup(&rules, &stats), &spool, limits(true, false), 0, now);
    let again = link.turn(&mut spool);
    assert_eq!(again.len(), 1);
    let Packet::Publish(p) = &again[0] else {
        panic!("{again:?}")
    };
    assert_eq!(
        (p.packet_id, p.dup, p.qos),
        (Some(pid), true, QoS::ExactlyOnce)
    );
    link.receive(&[Packet::PubRec(PubResponse::new(pid))])
        .unwrap();
    assert_eq!(
        link.turn(&mut spool),
        [Packet::PubRel(PubResponse::new(pid))]
    );
    assert_eq!(spool.row(1).stage, Stage::Released);
    link.receive(&[Packet::PubComp(PubResponse::new(pid))])
        .unwrap();
    link.turn(&mut spool);
    assert!(spool.rows.is_empty());
}

/// Two QoS 2 rows out when the link drops: row 1 had its PUBREC (and PUBREL went),
/// row 2 had no answer.
fn qos2_exchanges_cut_by_a_drop(rules: &Rules, stats: &BridgeStats) -> (Spool, u16, u16) {
    let mut spool = Spool::default();
    spool.add(1, QoS::ExactlyOnce);
    spool.add(2, QoS::ExactlyOnce);
    let now = Instant::now();
    let mut link = Link::open(setup(rules, stats), &spool, limits(false, false), 0, now);
    let sent = publishes(&link.turn(&mut spool));
    assert_eq!(sent.len(), 2);
    let (p1, p2) = (sent[0].1.packet_id.unwrap(), sent[1].1.packet_id.unwrap());
    link.receive(&[Packet::PubRec(PubResponse::new(p1))])
        .unwrap();
    assert_eq!(
        link.turn(&mut spool),
        [Packet::PubRel(PubResponse::new(p1))]
    );
    match link.client.handle_drop("connection reset".into()) {
        SessionEnd::Dropped {
            suspect,
            qos2_unanswered,
            ..
        } => {
            // Row 1's PUBLISH was accepted (PUBREC): only row 2 can be to blame.
            assert_eq!(suspect, Some(2));
            // The cloud answered a QoS 2 PUBLISH in this session: it has QoS 2.
            assert!(!qos2_unanswered);
        }
        other => panic!("{other:?}"),
    }
    link.apply(&mut spool);
    assert_eq!(spool.row(1).stage, Stage::Released);
    assert_eq!(spool.row(2).stage, Stage::Published);
    (spool, p1, p2)
}

#[test]
fn qos2_resumes_with_pubrel_after_pubrec_and_with_publish_dup_before_it() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let (mut spool, p1, p2) = qos2_exchanges_cut_by_a_drop(&rules, &stats);
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(true, false),
        0,
        Instant::now(),
    );
    let wire = link.turn(&mut spool);
    // MQTT-4.3.3: once PUBREL was sent the PUBLISH is never sent again; unacknowledged
    // PUBLISH and PUBREL are resent under their original identifiers (MQTT-4.4.0-1).
    assert_eq!(wire.len(), 2, "{wire:?}");
    assert_eq!(wire[0], Packet::PubRel(PubResponse::new(p1)));
    let Packet::Publish(p) = &wire[1] else {
        panic!("{wire:?}")
    };
    assert_eq!(
        (p.packet_id, p.dup, p.qos),
        (Some(p2), true, QoS::ExactlyOnce)
    );
    assert_eq!(p.payload, "reading 2");
    link.receive(&[
        Packet::PubComp(PubResponse::new(p1)),
        Packet::PubRec(PubResponse::new(p2)),
    ])
    .unwrap();
    assert_eq!(
        link.turn(&mut spool),
        [Packet::PubRel(PubResponse::new(p2))]
    );
    link.receive(&[Packet::PubComp(PubResponse::new(p2))])
        .unwrap();
    assert!(link.turn(&mut spool).is_empty());
    assert!(spool.rows.is_empty());
    assert_eq!(
        stats.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn qos2_rows_go_as_new_exchanges_at_another_broker() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let (mut spool, _, _) = qos2_exchanges_cut_by_a_drop(&rules, &stats);
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(false, true),
        0,
        Instant::now(),
    );
    // The new broker never saw either: no PUBREL, and each PUBLISH starts an exchange
    // (DUP 0, MQTT-4.3.3-2) whose stage is made durable before it goes.
    let (wire, updates) = link.turn_without_commit(&mut spool);
    assert!(wire.is_empty(), "{wire:?}");
    assert_eq!(updates.len(), 2);
    assert!(updates.iter().all(|u| u.stage == Stage::Published));
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(false, true),
        0,
        Instant::now(),
    );
    let wire = link.turn(&mut spool);
    assert!(
        !wire.iter().any(|p| matches!(p, Packet::PubRel(_))),
        "{wire:?}"
    );
    let sent = publishes(&wire);
    assert_eq!(sent.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [1, 2]);
    assert!(
        sent.iter()
            .all(|(_, p)| p.qos == QoS::ExactlyOnce && !p.dup)
    );
    for (row, p) in &sent {
        assert_eq!(spool.row(*row).packet_id, p.packet_id);
    }
}

#[test]
fn qos2_in_flight_is_sent_as_qos1_once_the_cloud_takes_no_qos2() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let (mut spool, p1, _) = qos2_exchanges_cut_by_a_drop(&rules, &stats);
    let mut limits = limits(true, false);
    limits.max_qos = QoS::AtLeastOnce;
    let mut link = Link::open(setup(&rules, &stats), &spool, limits, 0, Instant::now());
    let wire = link.turn(&mut spool);
    // Row 1 is past PUBREC: only its PUBREL is due. Row 2 goes as QoS 1.
    assert_eq!(wire[0], Packet::PubRel(PubResponse::new(p1)));
    let sent = publishes(&wire);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, 2);
    assert_eq!(sent[0].1.qos, QoS::AtLeastOnce);
}

#[test]
fn after_repeated_drops_rows_go_one_at_a_time_behind_a_ping() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    for id in 1..=8 {
        spool.add(id, QoS::AtLeastOnce);
    }
    // Rows through 3 were out at the drops that made the link careful.
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(true, false),
        3,
        Instant::now(),
    );
    let mut order = Vec::new();
    for _ in 0..20 {
        let wire = link.turn(&mut spool);
        let sent = publishes(&wire);
        if sent.len() > 1 {
            // Past the careful rows the window opens again (behind one last barrier,
            // so nothing before is still in question).
            assert!(sent[0].0 > 3, "{sent:?}");
            assert!(order.iter().eq([1, 2, 3].iter()), "{order:?}");
            order.extend(sent.iter().map(|(r, _)| *r));
            break;
        }
        match (wire.as_slice(), sent.first()) {
            ([Packet::PingReq], None) => link.receive(&[Packet::PingResp]).unwrap(),
            (_, Some((row, p))) => {
                assert_eq!(wire.len(), 1, "alone on the wire: {wire:?}");
                // Nothing else goes while it is out.
                assert!(link.turn(&mut spool).is_empty());
                order.push(*row);
                link.receive(&[ack(p)]).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(order, [1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn a_drop_with_the_status_unacknowledged_blames_no_row() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let status = Status::new("outpost", "gw-01", "cloud", std::time::UNIX_EPOCH);
    let mut spool = Spool::default();
    spool.add(1, QoS::AtLeastOnce);
    let mut s = setup(&rules, &stats);
    s.status = Some(&status);
    let mut link = Link::open(s, &spool, limits(false, false), 0, Instant::now());
    let wire = link.turn(&mut spool);
    let Packet::Publish(birth) = &wire[0] else {
        panic!("{wire:?}")
    };
    assert_eq!(birth.topic, "outpost/gw-01/status");
    assert_eq!(publishes(&wire[1..]).len(), 1);
    match link.client.handle_drop("reset".into()) {
        SessionEnd::Dropped { suspect, .. } => assert_eq!(suspect, None),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_birth_waits_behind_resumed_qos2_exchanges_and_for_a_free_slot() {
    // The cloud counts resumed QoS 2 exchanges against its Receive Maximum until
    // PUBCOMP: a birth sent first would exceed it (Mosquitto answers 0x97).
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let status = Status::new("outpost", "gw-01", "cloud", std::time::UNIX_EPOCH);
    let (mut spool, p1, p2) = qos2_exchanges_cut_by_a_drop(&rules, &stats);
    spool.add(3, QoS::AtLeastOnce);
    let mut s = setup(&rules, &stats);
    s.status = Some(&status);
    let mut limits = limits(true, false);
    limits.window = 2; // the cloud's Receive Maximum
    let mut link = Link::open(s, &spool, limits, 0, Instant::now());
    let is_birth =
        |p: &Packet| matches!(p, Packet::Publish(p) if p.topic == "outpost/gw-01/status");
    let wire = link.turn(&mut spool);
    assert_eq!(wire[0], Packet::PubRel(PubResponse::new(p1)));
    assert!(matches!(&wire[1], Packet::Publish(p) if p.packet_id == Some(p2) && p.dup));
    assert_eq!(wire.len(), 2, "the window is full: {wire:?}");
    link.receive(&[Packet::PubComp(PubResponse::new(p1))])
        .unwrap();
    // A slot is free: the birth takes it, before row 3.
    let wire = link.turn(&mut spool);
    assert_eq!(wire.len(), 1, "{wire:?}");
    assert!(is_birth(&wire[0]), "{wire:?}");
    let Packet::Publish(birth) = &wire[0] else {
        unreachable!()
    };
    link.receive(&[ack(birth)]).unwrap();
    let sent = publishes(&link.turn(&mut spool));
    assert_eq!(sent.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [3]);
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
fn rows_drop_oldest_claimed_are_passed_over_and_the_rest_taken() {
    #[derive(Default)]
    struct Fence {
        claimed: HashSet<i64>,
        taken: Vec<i64>,
        passed: Vec<i64>,
    }
    impl Claims for Fence {
        fn claimed(&self, id: i64, stage: Stage) -> bool {
            stage == Stage::New && self.claimed.contains(&id)
        }
        fn take(&mut self, id: i64) {
            self.taken.push(id);
        }
        fn pass(&mut self, id: i64) {
            self.passed.push(id);
        }
    }
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let mut spool = Spool::default();
    for id in 1..=3 {
        spool.add(id, QoS::AtLeastOnce);
    }
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(false, false),
        0,
        Instant::now(),
    );
    let mut fence = Fence {
        claimed: HashSet::from([2]),
        ..Default::default()
    };
    link.client.fill(link.now, NOW_MS, &mut fence).unwrap();
    let sent = publishes(&link.wire());
    assert_eq!(sent.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [1, 3]);
    assert_eq!((fence.taken, fence.passed), (vec![1, 3], vec![2]));
}

#[test]
fn downlink_qos2_is_delivered_once_and_answered_after_its_id_is_durable() {
    let rules = Rules::new(vec![TopicRule {
        pattern: "#".into(),
        direction: Direction::In,
        qos: QoS::ExactlyOnce,
        local_prefix: "cmd/".into(),
        remote_prefix: "gw-01/cmd/".into(),
        retain: RetainMode::Keep,
    }]);
    let stats = BridgeStats::default();
    let mut spool = Spool::default();
    let now = Instant::now();
    let mut link = Link::open(setup(&rules, &stats), &spool, limits(false, false), 0, now);
    let wire = link.turn(&mut spool);
    assert!(
        matches!(wire.as_slice(), [Packet::Subscribe(_)]),
        "{wire:?}"
    );
    let command = Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: ByteString::from("gw-01/cmd/valve"),
        packet_id: Some(7),
        properties: Properties::default(),
        payload: Bytes::from_static(b"open"),
    };
    link.receive(&[Packet::Publish(command.clone())]).unwrap();
    let delivered = link.client.poll_delivery().expect("delivered locally");
    assert_eq!(
        (delivered.topic.as_str(), &delivered.payload[..]),
        ("cmd/valve", &b"open"[..])
    );
    // PUBREC only once id 7 is remembered durably.
    link.client.pump_downlink().unwrap();
    assert!(link.wire().is_empty());
    let ops = link.client.poll_incoming_commit().unwrap();
    assert_eq!(ops, [IncomingOp::Add(7)]);
    spool.incoming.insert(7);
    link.client.handle_incoming_committed().unwrap();
    assert_eq!(link.wire(), [Packet::PubRec(PubResponse::new(7))]);
    // The link drops before PUBREL; the cloud resends the PUBLISH (DUP) in the same
    // session: answered, not delivered again.
    let mut link = Link::open(setup(&rules, &stats), &spool, limits(true, false), 0, now);
    link.turn(&mut spool);
    let mut dup = command;
    dup.dup = true;
    link.receive(&[Packet::Publish(dup)]).unwrap();
    assert!(link.client.poll_delivery().is_none(), "delivered twice");
    assert_eq!(link.turn(&mut spool), [Packet::PubRec(PubResponse::new(7))]);
    link.receive(&[Packet::PubRel(PubResponse::new(7))])
        .unwrap();
    assert_eq!(
        link.turn(&mut spool),
        [Packet::PubComp(PubResponse::new(7))]
    );
    assert!(spool.incoming.is_empty());
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

#[test]
fn a_malformed_packet_ends_the_session_with_a_disconnect_saying_so() {
    let (rules, stats) = (Rules::default(), BridgeStats::default());
    let spool = Spool::default();
    let mut link = Link::open(
        setup(&rules, &stats),
        &spool,
        limits(false, false),
        0,
        Instant::now(),
    );
    // A PUBACK whose remaining length runs past its end of the varint.
    let mut rbuf = BytesMut::from(&[0x40u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
    assert!(matches!(
        link.client.handle_next(&mut rbuf, link.now),
        Err(SessionEnd::Lost(_))
    ));
    assert!(link.client.farewell());
    assert!(matches!(link.wire().as_slice(), [Packet::Disconnect(_)]));
}

#[test]
fn only_message_level_disconnect_reasons_can_blame_a_message() {
    for about_a_message in [
        ReasonCode::PACKET_TOO_LARGE,
        ReasonCode::PAYLOAD_FORMAT_INVALID,
        ReasonCode::TOPIC_NAME_INVALID,
        ReasonCode::NOT_AUTHORIZED,
        ReasonCode::MALFORMED_PACKET,
        ReasonCode::UNSPECIFIED_ERROR,
        ReasonCode(0xFE),
    ] {
        assert!(
            may_be_about_a_message(about_a_message),
            "{about_a_message:?}"
        );
    }
    for about_the_link in [
        ReasonCode::SESSION_TAKEN_OVER,
        ReasonCode::SERVER_SHUTTING_DOWN,
        ReasonCode::SERVER_BUSY,
        ReasonCode::KEEP_ALIVE_TIMEOUT,
        ReasonCode::MESSAGE_RATE_TOO_HIGH,
        ReasonCode::NORMAL_DISCONNECTION,
    ] {
        assert!(
            !may_be_about_a_message(about_the_link),
            "{about_the_link:?}"
        );
    }
}
