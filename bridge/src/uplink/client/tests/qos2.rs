//! QoS 2 on the send side: stages made durable before what waits for them, exchanges
//! resumed (or started anew) after a drop, and the birth behind resumed exchanges.
use super::*;

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
