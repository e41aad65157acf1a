//! Rows into the window and their acknowledgements: QoS 1 across drops, the drop-oldest
//! fence, and the downlink's QoS 2 on the receiving side.
use super::*;

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
    let rules = in_rules();
    let stats = BridgeStats::default();
    let mut spool = Spool::default();
    let now = Instant::now();
    let mut link = Link::open(setup(&rules, &stats), &spool, limits(false, false), 0, now);
    let wire = link.turn(&mut spool);
    assert!(
        matches!(wire.as_slice(), [Packet::Subscribe(_)]),
        "{wire:?}"
    );
    let command = command(QoS::ExactlyOnce, 7);
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
