//! How a session ends and what that blames: careful resend after repeated drops, no
//! blame while the status is out, malformed packets and DISCONNECT reasons.
use super::*;

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
