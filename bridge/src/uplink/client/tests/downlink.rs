//! The receiving side's protocol limits: what the cloud may not send us, and that a
//! breach closes only the link.
use super::*;

/// A link past its first turn (SUBSCRIBE, and the spool's rows up), with the rows that
/// went up.
fn downlink_link<'a>(
    rules: &'a Rules,
    stats: &'a BridgeStats,
    spool: &mut Spool,
) -> (Link<'a>, Vec<i64>) {
    let mut link = Link::open(
        setup(rules, stats),
        spool,
        limits(false, false),
        0,
        Instant::now(),
    );
    let sent = publishes(&link.turn(spool));
    (link, sent.into_iter().map(|(row, _)| row).collect())
}

/// The DISCONNECT the client wrote before giving up the link, and why it gave up.
fn ended_with(link: &mut Link<'_>, end: Result<(), SessionEnd>) -> (ReasonCode, String) {
    let Err(SessionEnd::Lost(why)) = end else {
        panic!("the link stays up: {end:?}")
    };
    assert!(link.client.farewell(), "no DISCONNECT to flush");
    match link.wire().as_slice() {
        [Packet::Disconnect(d)] => (d.reason, why),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_topic_alias_we_never_allowed_ends_the_link_with_0x94_mqtt_3_1_2_27() {
    // MQTT-3.1.2-27: our CONNECT has no Topic Alias Maximum, so the cloud MUST NOT send
    // any Topic Alias (MQTT-3.3.2-11: none above the maximum we sent; MQTT-3.3.2-8: never
    // 0). One that does gets DISCONNECT 0x94 (Topic Alias invalid), and its empty topic
    // is not mapped through the `in` rules.
    let (rules, stats) = (in_rules(), BridgeStats::default());
    let mut spool = Spool::default();
    spool.add(1, QoS::AtLeastOnce);
    // The row goes up and has no PUBACK yet when the cloud misbehaves.
    let (mut link, sent) = downlink_link(&rules, &stats, &mut spool);
    assert_eq!(sent, [1]);
    let mut aliased = command(QoS::AtLeastOnce, 5);
    aliased.topic = ByteString::new();
    aliased.properties.topic_alias = Some(1);
    let end = link.receive(&[Packet::Publish(aliased)]);
    let (reason, why) = ended_with(&mut link, end);
    assert_eq!(reason, ReasonCode::TOPIC_ALIAS_INVALID);
    assert!(why.contains("Topic Alias 1"), "{why}");
    assert!(link.client.poll_delivery().is_none(), "delivered");
    // Losing the link loses nothing: the row stays spooled and goes up on the next one.
    assert!(spool.rows.contains_key(&1));
    let (mut next, again) = downlink_link(&rules, &stats, &mut spool);
    assert_eq!(again, [1]);
    next.receive(&[Packet::Publish(command(QoS::AtLeastOnce, 6))])
        .unwrap();
    assert!(next.client.poll_delivery().is_some());
}

#[test]
fn more_open_downlink_exchanges_than_our_receive_maximum_end_the_link_with_0x93() {
    // MQTT-3.3.4-9: the cloud MUST NOT send more than our Receive Maximum of QoS 1 and 2
    // PUBLISHes it has not had PUBACK or PUBCOMP for; one more gets DISCONNECT 0x93
    // (section 3.3.4) instead of more state.
    let (rules, stats) = (in_rules(), BridgeStats::default());
    let mut spool = Spool::default();
    let (mut link, _) = downlink_link(&rules, &stats, &mut spool);
    for pid in 1..=RECEIVE_MAXIMUM {
        link.receive(&[Packet::Publish(command(QoS::ExactlyOnce, pid))])
            .unwrap();
        // PUBREC goes out; the exchange stays open until PUBCOMP.
        assert_eq!(
            link.turn(&mut spool),
            [Packet::PubRec(PubResponse::new(pid))]
        );
    }
    // A repeat of an open exchange opens none.
    let mut dup = command(QoS::ExactlyOnce, 1);
    dup.dup = true;
    link.receive(&[Packet::Publish(dup)]).unwrap();
    assert_eq!(link.turn(&mut spool), [Packet::PubRec(PubResponse::new(1))]);
    // QoS 0 takes no slot.
    link.receive(&[Packet::Publish(command(QoS::AtMostOnce, 0))])
        .unwrap();
    let end = link.receive(&[Packet::Publish(command(QoS::AtLeastOnce, 999))]);
    let (reason, why) = ended_with(&mut link, end);
    assert_eq!(reason, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
    assert!(why.contains("Receive Maximum"), "{why}");
}

#[test]
fn downlink_answered_promptly_never_reaches_the_receive_maximum() {
    // Exchanges the bridge completed give their slot back (MQTT-3.3.4-9 counts only
    // PUBLISHes without PUBACK or PUBCOMP), so a long busy downlink is never refused.
    let (rules, stats) = (in_rules(), BridgeStats::default());
    let mut spool = Spool::default();
    let (mut link, _) = downlink_link(&rules, &stats, &mut spool);
    let total = 4 * u32::from(RECEIVE_MAXIMUM);
    for n in 0..total {
        let pid = (n % 1000 + 1) as u16;
        link.receive(&[Packet::Publish(command(QoS::AtLeastOnce, pid))])
            .unwrap();
        assert_eq!(link.wire(), [Packet::PubAck(PubResponse::new(pid))]);
        link.receive(&[Packet::Publish(command(QoS::ExactlyOnce, pid))])
            .unwrap();
        assert_eq!(
            link.turn(&mut spool),
            [Packet::PubRec(PubResponse::new(pid))]
        );
        link.receive(&[Packet::PubRel(PubResponse::new(pid))])
            .unwrap();
        assert_eq!(
            link.turn(&mut spool),
            [Packet::PubComp(PubResponse::new(pid))]
        );
    }
    let mut delivered = 0;
    while link.client.poll_delivery().is_some() {
        delivered += 1;
    }
    assert_eq!(delivered, 2 * total);
}
