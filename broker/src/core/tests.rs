//! The core driven in memory, with a real store in a temporary directory and a fake
//! clock: what a publisher's acknowledgement waits for after routing, session expiry,
//! delayed wills, the write grace of persistence, takeover, message expiry, Receive
//! Maximum and shared subscriptions.
//!
//! The clock is an `Instant` taken once plus offsets the test advances; the core is
//! handed it with every event and woken at each deadline it asks for, as the task in
//! `mod.rs` does with the real one. Nothing sleeps: ten seconds of session expiry take
//! microseconds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use outpost_mqtt::{
    ConnAck, Connect, Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode,
    Subscribe, SubscribeFilter, SubscriptionOptions, Will,
};
use tokio::sync::{mpsc, oneshot};

use super::persist::WRITE_GRACE;
use super::{Accepted, ConnectRequest, Core, CoreEvent, StoreOp};
use crate::message::Message;
use crate::outbound::{Ack, AckKind, DurableResult, Outbound, OutboundRx};
use crate::settings::Settings;
use crate::store::{Store, StoreWriter};

/// A core with persistence on, and what keeps it working while a test runs.
struct Harness {
    core: Core,
    /// When the fake clock started.
    start: Instant,
    /// The fake clock: the time every event is handed to the core with.
    now: Instant,
    /// The queue into the store's writer thread, which the task around the core holds.
    writer: Option<StoreWriter>,
    /// Receives what the core sends itself; kept so that its weak sender stays valid.
    _inbox: mpsc::Receiver<CoreEvent>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(configure: impl FnOnce(&mut Settings)) -> Harness {
        let mut settings = Settings::from_config(&Default::default());
        configure(&mut settings);
        let dir = tempfile::tempdir().expect("temporary directory");
        let (mut store, loaded) =
            Store::open(&dir.path().join("broker.sqlite"), 0).expect("store opens");
        let writer = store.take_writer();
        let (tx, inbox) = mpsc::channel(16);
        let now = Instant::now();
        let core = Core::new(
            Arc::new(settings),
            Vec::new(),
            Some((store, loaded)),
            tx.downgrade(),
            now,
        );
        Harness {
            core,
            start: now,
            now,
            writer,
            _inbox: inbox,
            _dir: dir,
        }
    }

    /// Moves the fake clock to `start + offset`, waking the core at every deadline it
    /// asks for on the way, as the task around it does.
    fn advance_to(&mut self, offset: Duration) {
        let target = self.start + offset;
        assert!(target >= self.now, "the fake clock only moves forward");
        // Bounded: each wake-up handles every timer due by then, and the only timer
        // that comes back ($SYS) comes back one interval later.
        for _ in 0..100_000 {
            match self.core.poll_timeout() {
                Some(at) if at <= target => {
                    self.now = self.now.max(at);
                    self.core.handle_timeout(self.now);
                    self.flush();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("the core asked to be woken more than 100,000 times");
    }

    /// Hands the core one event at the current time, and its outputs on.
    fn event(&mut self, ev: CoreEvent) {
        self.core.handle_event(ev, self.now);
        self.flush();
    }

    /// Sends what the core made, as its task does: store changes to the writer thread,
    /// items to the connections' queues.
    fn flush(&mut self) {
        super::transmit(&mut self.core, self.writer.as_ref());
    }

    /// Routes a message from an in-process publisher at the current time: the receipts
    /// its completion waits for, and whether anything wanted it.
    fn accept(&mut self, msg: &Arc<Message>) -> (Vec<crate::DurableReceipt>, bool) {
        let accepted = self.core.accept(msg, self.now);
        self.flush();
        accepted
    }

    /// Connects a 3.1.1 client; `clean` false makes its session persistent.
    fn connect(&mut self, client_id: &str, clean: bool) -> (Accepted, OutboundRx) {
        self.connect_with(Connect {
            protocol: Protocol::V3_1_1,
            clean_start: clean,
            keep_alive: 60,
            properties: Properties::default(),
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
        })
    }

    /// Connects a 5.0 client with Clean Start off, this Session Expiry Interval and will.
    fn connect_v5(
        &mut self,
        client_id: &str,
        session_expiry: u32,
        will: Option<Will>,
    ) -> (Accepted, OutboundRx) {
        let properties = Properties {
            session_expiry_interval: Some(session_expiry),
            ..Default::default()
        };
        self.connect_with(Connect {
            protocol: Protocol::V5,
            clean_start: false,
            keep_alive: 60,
            properties,
            client_id: client_id.to_owned(),
            will,
            username: None,
            password: None,
        })
    }

    /// Sends a CONNECT through the core's event entry, as a connection task does.
    fn connect_with(&mut self, connect: Connect) -> (Accepted, OutboundRx) {
        let (tx, rx) = crate::outbound::channel(None);
        let (reply, mut answer) = oneshot::channel();
        self.event(CoreEvent::Connect(ConnectRequest {
            connect: Box::new(connect),
            peer: "127.0.0.1:1".parse().expect("address"),
            listener: None,
            tx,
            reply,
        }));
        let accepted = answer
            .try_recv()
            .expect("the core answers a CONNECT at once")
            .expect("connection accepted");
        (accepted, rx)
    }

    /// A packet from a client's connection.
    fn packet(&mut self, who: &Accepted, packet: Packet) {
        self.event(CoreEvent::Packet {
            session: who.session,
            conn_id: who.conn_id,
            packet,
        });
    }

    /// A client publishes `topic` with `qos` and packet id `packet_id`.
    fn publish(&mut self, who: &Accepted, topic: &str, qos: QoS, packet_id: u16) {
        self.publish_with(who, topic, qos, packet_id, Properties::default());
    }

    /// A client publishes `topic` with these PUBLISH properties.
    fn publish_with(
        &mut self,
        who: &Accepted,
        topic: &str,
        qos: QoS,
        packet_id: u16,
        properties: Properties,
    ) {
        self.packet(
            who,
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.into(),
                packet_id: (qos != QoS::AtMostOnce).then_some(packet_id),
                properties,
                payload: Bytes::from_static(b"x"),
            }),
        );
    }

    /// A client acknowledges a QoS 1 delivery.
    fn puback(&mut self, who: &Accepted, packet_id: u16) {
        self.packet(
            who,
            Packet::PubAck(PubResponse {
                packet_id,
                reason: ReasonCode::SUCCESS,
                properties: Properties::default(),
            }),
        );
    }

    /// Delivery rows the store has committed so far (after everything handed to it now).
    async fn deliveries_written(&mut self) -> u64 {
        let store = self.core.store.as_ref().expect("persistence is on");
        let committed = store.receipt();
        self.flush();
        bounded(committed).await.expect("the store commits");
        let store = self.core.store.as_ref().expect("persistence is on");
        store.counters().deliveries_written.load(Ordering::Relaxed)
    }

    /// Whether the session of `client_id` is still held.
    fn holds_session(&self, client_id: &str) -> bool {
        self.core.sessions.key_of(client_id).is_some()
    }

    fn subscribe(&mut self, who: &Accepted, filter: &str, qos: QoS) {
        let subscribe = Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter {
                filter: filter.to_owned(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
            properties: Properties::default(),
        };
        self.core
            .on_packet(who.session, Packet::Subscribe(subscribe), self.now);
        self.flush();
    }

    /// The client's connection drops without DISCONNECT.
    fn drop_connection(&mut self, who: &Accepted) {
        self.event(CoreEvent::Closed {
            session: who.session,
            conn_id: who.conn_id,
            disconnect: None,
            reason: None,
        });
    }
}

/// Awaits something the store's writer thread or a spawned task answers, failing the
/// test instead of hanging it if that never comes. A bound, not a timing: it is met in
/// milliseconds.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("answered within 20 s")
}

/// The topics and packet ids of the PUBLISH packets queued for a connection (taking
/// everything queued).
fn publishes(rx: &OutboundRx) -> Vec<(String, Option<u16>)> {
    rx.take_now()
        .into_iter()
        .filter_map(|item| match item {
            Outbound::Publish {
                delivery,
                packet_id,
                ..
            } => Some((delivery.msg.topic.to_string(), packet_id)),
            Outbound::PublishAfter {
                delivery,
                packet_id,
                ..
            } => Some((delivery.msg.topic.to_string(), Some(packet_id))),
            _ => None,
        })
        .collect()
}

/// The CONNACK queued for a connection (taking everything queued).
fn connack(rx: &OutboundRx) -> ConnAck {
    rx.take_now()
        .into_iter()
        .find_map(|item| match item {
            Outbound::Control(p) => match *p {
                Packet::ConnAck(c) => Some(c),
                _ => None,
            },
            _ => None,
        })
        .expect("a CONNACK was queued")
}

/// A will on `topic` with this Will Delay Interval.
fn will(topic: &str, delay: u32) -> Will {
    let properties = Properties {
        will_delay_interval: Some(delay),
        ..Default::default()
    };
    Will {
        topic: topic.into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties,
    }
}

/// A publisher's acknowledgement that waits for something, split into the wait and the
/// acknowledgement it then sends.
type PendingAck = (
    futures_util::future::BoxFuture<'static, DurableResult>,
    Box<dyn FnOnce(DurableResult) -> Option<Ack> + Send>,
);

/// The acknowledgement queued for a publisher that waits for something (taking
/// everything queued).
fn pending_ack(rx: &OutboundRx) -> PendingAck {
    rx.take_now()
        .into_iter()
        .find_map(|item| match item {
            Outbound::AckAfter { wait, ack } => Some((wait, ack)),
            _ => None,
        })
        .expect("an acknowledgement waiting for a commit or a client was queued")
}

fn message(topic: &str, qos: QoS) -> Arc<Message> {
    Message::new(
        topic.into(),
        Bytes::from_static(b"x"),
        qos,
        false,
        Properties::default(),
        None,
    )
}

#[tokio::test]
async fn a_sys_message_queued_for_an_offline_session_holds_back_no_later_publishers_ack() {
    let mut h = Harness::new(|s| s.queue_qos0 = true);
    let (watcher, _) = h.connect("sys-watcher", false);
    h.subscribe(&watcher, "$SYS/#", QoS::AtMostOnce);
    h.drop_connection(&watcher);

    // $SYS at QoS 0 is queued (and written) for the offline persistent session.
    h.core.publish_sys(h.now);
    h.flush();
    let queued = h
        .core
        .sessions
        .get(watcher.session)
        .map_or(0, |s| s.queued_len());
    assert!(
        queued > 0,
        "the $SYS messages were queued for the offline session"
    );

    // An unrelated QoS 1 message that nobody keeps: its PUBACK has nothing to wait for.
    let (receipts, wanted) = h.accept(&message("plain/topic", QoS::AtLeastOnce));
    assert!(!wanted, "nobody subscribes to the topic");
    assert_eq!(
        receipts.len(),
        0,
        "the acknowledgement of a message nobody keeps waits for no store commit"
    );
}

#[tokio::test]
async fn a_message_queued_for_an_offline_persistent_session_waits_for_the_commit() {
    let mut h = Harness::new(|_| {});
    let (sub, _) = h.connect("keeper", false);
    h.subscribe(&sub, "kept/#", QoS::AtLeastOnce);
    h.drop_connection(&sub);

    let (receipts, wanted) = h.accept(&message("kept/1", QoS::AtLeastOnce));
    assert!(wanted);
    assert_eq!(receipts.len(), 1, "the PUBACK waits for the store's commit");
    for r in receipts {
        r.await.expect("the store commits");
    }
    // The next message, for nobody, waits for nothing.
    let (receipts, _) = h.accept(&message("other", QoS::AtLeastOnce));
    assert_eq!(receipts.len(), 0);
}

#[tokio::test]
async fn retained_messages_sent_on_subscribe_hold_back_no_later_publishers_ack() {
    let mut h = Harness::new(|_| {});
    let mut retained = (*message("state/1", QoS::AtLeastOnce)).clone();
    retained.retain = true;
    let (receipts, _) = h.accept(&Arc::new(retained));
    assert_eq!(receipts.len(), 1, "a retained message waits for its row");

    // A persistent subscriber whose inflight window is full gets the retained message
    // queued, and written, when it subscribes.
    let (sub, _rx) = h.connect("subscriber", false);
    h.core
        .sessions
        .get_mut(sub.session)
        .expect("session")
        .send_quota = 0;
    h.subscribe(&sub, "state/#", QoS::AtLeastOnce);
    let queued = h
        .core
        .sessions
        .get(sub.session)
        .map_or(0, |s| s.queued_len());
    assert_eq!(queued, 1, "the retained message is queued");

    let (receipts, _) = h.accept(&message("other", QoS::AtLeastOnce));
    assert_eq!(receipts.len(), 0);
}

// ---- Session expiry (MQTT 5.0) ----

#[tokio::test]
async fn a_session_with_expiry_10_s_is_kept_until_10_s_pass_and_then_ends_mqtt_3_1_2_23() {
    // No $SYS timer, so the only deadline is the session's.
    let mut h = Harness::new(|s| s.sys_interval = Duration::ZERO);
    let (sleeper, rx) = h.connect_v5("sleeper", 10, None);
    assert!(!connack(&rx).session_present, "a new session");
    h.subscribe(&sleeper, "news/#", QoS::AtLeastOnce);
    h.drop_connection(&sleeper);
    assert_eq!(
        h.core.poll_timeout(),
        Some(h.start + Duration::from_secs(10)),
        "the core asks to be woken when the Session Expiry Interval runs out"
    );
    // MQTT-3.1.2-23: the session state is kept after the connection closes while the
    // Session Expiry Interval has not passed; messages for it are queued meanwhile.
    let _ = h.accept(&message("news/1", QoS::AtLeastOnce));

    h.advance_to(Duration::from_secs(10) - Duration::from_millis(1));
    assert!(h.holds_session("sleeper"), "kept 1 ms before expiry");
    assert_eq!(
        h.core
            .sessions
            .get(sleeper.session)
            .map_or(0, |s| s.queued_len()),
        1,
        "with the message queued for it"
    );

    h.advance_to(Duration::from_secs(10));
    assert!(!h.holds_session("sleeper"), "ended once 10 s have passed");
    assert_eq!(h.core.poll_timeout(), None, "nothing left to wake up for");
    // Coming back finds no session and nothing owed (MQTT-3.2.2-3: Session Present 0).
    let (_, rx) = h.connect_v5("sleeper", 10, None);
    let items = rx.take_now();
    let present = items.iter().any(|i| {
        matches!(i, Outbound::Control(p) if matches!(&**p, Packet::ConnAck(c) if c.session_present))
    });
    assert!(!present, "the expired session is not resumed");
    assert!(
        !items.iter().any(|i| matches!(i, Outbound::Publish { .. })),
        "what was queued for it went with it"
    );
}

#[tokio::test]
async fn a_client_back_before_its_session_expires_resumes_it_and_the_old_deadline_is_void_mqtt_3_1_2_23()
 {
    let mut h = Harness::new(|_| {});
    let (sleeper, _) = h.connect_v5("sleeper", 10, None);
    h.subscribe(&sleeper, "news/#", QoS::AtLeastOnce);
    h.drop_connection(&sleeper);
    let _ = h.accept(&message("news/1", QoS::AtLeastOnce));

    h.advance_to(Duration::from_secs(9));
    let (again, rx) = h.connect_v5("sleeper", 10, None);
    let items = rx.take_now();
    assert!(
        items.iter().any(|i| matches!(i, Outbound::Control(p)
            if matches!(&**p, Packet::ConnAck(c) if c.session_present))),
        "Session Present 1 (MQTT-3.2.2-3)"
    );
    assert!(
        items.iter().any(
            |i| matches!(i, Outbound::Publish { delivery, .. } if &*delivery.msg.topic == "news/1")
        ),
        "the message queued while it was away is delivered"
    );
    // The first disconnect's deadline passes while connected: nothing ends.
    h.advance_to(Duration::from_secs(30));
    assert!(
        h.holds_session("sleeper"),
        "a connected session does not expire"
    );
    // The next disconnect starts a new 10 s.
    h.drop_connection(&again);
    h.advance_to(Duration::from_secs(39));
    assert!(h.holds_session("sleeper"));
    h.advance_to(Duration::from_secs(40));
    assert!(!h.holds_session("sleeper"));
}

// ---- Will Delay Interval (MQTT 5.0) ----

#[tokio::test]
async fn a_delayed_will_is_published_once_the_will_delay_interval_passes_not_before_mqtt_3_1_3_9() {
    let mut h = Harness::new(|_| {});
    let (watcher, watcher_rx) = h.connect("watcher", true);
    h.subscribe(&watcher, "wills/#", QoS::AtMostOnce);
    let (dying, _) = h.connect_v5("dying", 60, Some(will("wills/dying", 5)));
    watcher_rx.take_now();

    h.drop_connection(&dying);
    assert!(publishes(&watcher_rx).is_empty(), "not at the disconnect");
    h.advance_to(Duration::from_secs(5) - Duration::from_millis(1));
    assert!(
        publishes(&watcher_rx).is_empty(),
        "not 1 ms before the delay"
    );
    assert_eq!(h.core.stats.wills, 0);

    h.advance_to(Duration::from_secs(5));
    assert_eq!(
        publishes(&watcher_rx),
        vec![("wills/dying".to_owned(), None)],
        "published once the Will Delay Interval has passed"
    );
    assert_eq!(h.core.stats.wills, 1);
    h.advance_to(Duration::from_secs(120));
    assert!(publishes(&watcher_rx).is_empty(), "and only once");
}

#[tokio::test]
async fn a_delayed_will_is_not_published_if_the_client_reconnects_in_time_mqtt_3_1_3_9() {
    let mut h = Harness::new(|_| {});
    let (watcher, watcher_rx) = h.connect("watcher", true);
    h.subscribe(&watcher, "wills/#", QoS::AtMostOnce);
    let (dying, _) = h.connect_v5("dying", 60, Some(will("wills/dying", 5)));
    watcher_rx.take_now();

    h.drop_connection(&dying);
    h.advance_to(Duration::from_secs(4));
    // MQTT-3.1.3-9: a new connection to the session before the delay has passed means
    // the Server MUST NOT send the will.
    let (_back, _) = h.connect_v5("dying", 60, None);
    h.advance_to(Duration::from_secs(120));
    assert!(
        publishes(&watcher_rx).is_empty(),
        "no will after reconnecting"
    );
    assert_eq!(h.core.stats.wills, 0);
}

#[tokio::test]
async fn a_will_delayed_past_the_session_expiry_is_published_when_the_session_ends_mqtt_3_1_3_9() {
    let mut h = Harness::new(|_| {});
    let (watcher, watcher_rx) = h.connect("watcher", true);
    h.subscribe(&watcher, "wills/#", QoS::AtMostOnce);
    // 3.1.3.2.2: the will waits for the delay or the end of the session, whichever comes
    // first.
    let (dying, _) = h.connect_v5("dying", 10, Some(will("wills/dying", 30)));
    watcher_rx.take_now();

    h.drop_connection(&dying);
    h.advance_to(Duration::from_secs(10) - Duration::from_millis(1));
    assert!(publishes(&watcher_rx).is_empty());
    h.advance_to(Duration::from_secs(10));
    assert_eq!(
        publishes(&watcher_rx),
        vec![("wills/dying".to_owned(), None)]
    );
    assert!(!h.holds_session("dying"));
}

// ---- Persistence: the write grace of deliveries in flight (persist.rs) ----

/// A persistent subscriber on `d/#` at QoS 1 and a publisher, both connected; the
/// publisher's QoS 1 PUBLISH on `d/1` (packet id 7) is handed to the core at the start
/// of the clock. Returns the subscriber, its queue, the packet id it got the message
/// with, and the publisher's queue.
fn one_delivery_in_flight(h: &mut Harness) -> (Accepted, OutboundRx, u16, OutboundRx) {
    let (keeper, keeper_rx) = h.connect("keeper", false);
    h.subscribe(&keeper, "d/#", QoS::AtLeastOnce);
    let (publisher, publisher_rx) = h.connect("publisher", true);
    keeper_rx.take_now();
    publisher_rx.take_now();

    h.publish(&publisher, "d/1", QoS::AtLeastOnce, 7);
    let got = publishes(&keeper_rx);
    assert_eq!(got.len(), 1, "sent straight to the connected subscriber");
    let packet_id = got[0].1.expect("QoS 1 has a packet id");
    (keeper, keeper_rx, packet_id, publisher_rx)
}

#[tokio::test]
async fn a_delivery_acknowledged_within_the_write_grace_is_never_written() {
    let mut h = Harness::new(|_| {});
    let (keeper, _keeper_rx, packet_id, publisher_rx) = one_delivery_in_flight(&mut h);
    let (mut wait, ack) = pending_ack(&publisher_rx);
    assert!(
        (&mut wait).now_or_never().is_none(),
        "the publisher's PUBACK waits while the delivery is neither acknowledged nor written"
    );

    h.advance_to(WRITE_GRACE / 5);
    // Checked before the PUBACK: a row written and deleted again in one commit would
    // not show in the count afterwards.
    assert_eq!(
        h.deliveries_written().await,
        0,
        "not written inside the grace"
    );
    h.packet(
        &keeper,
        Packet::PubAck(PubResponse {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }),
    );
    let outcome = bounded(wait).await;
    let ack = ack(outcome).expect("the publisher is acknowledged");
    assert_eq!((ack.kind, ack.packet_id), (AckKind::PubAck, 7));

    // Well past the grace: nothing was ever written for it.
    h.advance_to(WRITE_GRACE * 10);
    assert_eq!(h.deliveries_written().await, 0);
}

#[tokio::test]
async fn a_delivery_still_unacknowledged_when_the_write_grace_ends_is_written() {
    let mut h = Harness::new(|_| {});
    let (_keeper, _keeper_rx, _, publisher_rx) = one_delivery_in_flight(&mut h);
    let (mut wait, ack) = pending_ack(&publisher_rx);

    h.advance_to(WRITE_GRACE - Duration::from_millis(1));
    assert_eq!(
        h.deliveries_written().await,
        0,
        "not written inside the grace"
    );
    assert!(
        (&mut wait).now_or_never().is_none(),
        "and its publisher is not acknowledged yet"
    );

    h.advance_to(WRITE_GRACE);
    assert_eq!(
        h.deliveries_written().await,
        1,
        "written once the grace has passed"
    );
    // What the broker acknowledges is with a subscriber or on disk: now on disk.
    let ack = ack(bounded(wait).await).expect("the publisher is acknowledged after the write");
    assert_eq!((ack.kind, ack.packet_id), (AckKind::PubAck, 7));
}

// ---- Takeover ----

#[tokio::test]
async fn a_second_connect_with_the_same_client_id_closes_the_first_connection_mqtt_3_1_4_3() {
    let mut h = Harness::new(|_| {});
    let (first, first_rx) = h.connect_v5("twin", 60, None);
    h.subscribe(&first, "t/#", QoS::AtMostOnce);
    first_rx.take_now();

    let (second, second_rx) = h.connect_v5("twin", 60, None);
    // MQTT-3.1.4-3: DISCONNECT with 0x8E (Session taken over) to the existing client,
    // and its connection closed.
    let to_first = first_rx.take_now();
    assert!(
        to_first
            .iter()
            .any(|i| matches!(i, Outbound::Disconnect(r) if *r == ReasonCode::SESSION_TAKEN_OVER)),
        "the first connection is told 0x8E and closed"
    );
    assert_ne!(first.conn_id, second.conn_id);
    assert_eq!(first.session, second.session, "the same session");
    assert!(
        connack(&second_rx).session_present,
        "the second connection resumes it"
    );

    // What the first connection still reports is stale: its PUBLISH is not routed, and
    // its close does not end the session nor disconnect the second one.
    h.publish(&first, "t/stale", QoS::AtMostOnce, 0);
    h.drop_connection(&first);
    let _ = h.accept(&message("t/fresh", QoS::AtMostOnce));
    assert_eq!(
        publishes(&second_rx),
        vec![("t/fresh".to_owned(), None)],
        "the session goes on with the second connection only"
    );
    assert!(publishes(&first_rx).is_empty(), "nothing more to the first");
}

#[tokio::test]
async fn a_takeover_cancels_the_first_connections_delayed_will_mqtt_3_1_3_9() {
    let mut h = Harness::new(|_| {});
    let (watcher, watcher_rx) = h.connect("watcher", true);
    h.subscribe(&watcher, "wills/#", QoS::AtMostOnce);
    let (_first, _) = h.connect_v5("twin", 60, Some(will("wills/twin", 5)));
    watcher_rx.take_now();

    // The takeover ends the first connection without DISCONNECT, but the new one is a
    // connection to the session within the delay.
    let (_second, _) = h.connect_v5("twin", 60, None);
    h.advance_to(Duration::from_secs(60));
    assert!(publishes(&watcher_rx).is_empty());
    assert_eq!(h.core.stats.wills, 0);
}

// ---- Message Expiry Interval (MQTT 5.0) ----

#[tokio::test]
async fn a_queued_message_past_its_expiry_interval_is_not_delivered_mqtt_3_3_2_5() {
    let mut h = Harness::new(|_| {});
    let (reader, _) = h.connect_v5("reader", 3600, None);
    h.subscribe(&reader, "m/#", QoS::AtLeastOnce);
    h.drop_connection(&reader);
    let (publisher, _) = h.connect_v5("publisher", 0, None);
    for (topic, expiry) in [("m/short", 5), ("m/long", 60)] {
        let properties = Properties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        h.publish_with(&publisher, topic, QoS::AtLeastOnce, 1, properties);
    }

    // MQTT-3.3.2-5: once the interval has passed before onward delivery started, the
    // copy for that subscriber is deleted. The clock the expiry counts on is the one the
    // core was handed with the PUBLISH.
    h.advance_to(Duration::from_secs(5));
    let (_, rx) = h.connect_v5("reader", 3600, None);
    let topics: Vec<String> = publishes(&rx).into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, vec!["m/long".to_owned()], "only the unexpired one");
}

#[tokio::test]
async fn a_queued_message_inside_its_expiry_interval_is_delivered_mqtt_3_3_2_5() {
    let mut h = Harness::new(|_| {});
    let (reader, _) = h.connect_v5("reader", 3600, None);
    h.subscribe(&reader, "m/#", QoS::AtLeastOnce);
    h.drop_connection(&reader);
    let (publisher, _) = h.connect_v5("publisher", 0, None);
    let properties = Properties {
        message_expiry_interval: Some(5),
        ..Default::default()
    };
    h.publish_with(&publisher, "m/short", QoS::AtLeastOnce, 1, properties);

    h.advance_to(Duration::from_secs(5) - Duration::from_millis(1));
    let (_, rx) = h.connect_v5("reader", 3600, None);
    let topics: Vec<String> = publishes(&rx).into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, vec!["m/short".to_owned()], "1 ms before it expires");
}

// ---- Receive Maximum (MQTT 5.0) ----

#[tokio::test]
async fn no_more_unacknowledged_qos_1_publishes_than_the_clients_receive_maximum_mqtt_3_3_4_9() {
    let mut h = Harness::new(|_| {});
    let (reader, rx) = h.connect_with(Connect {
        protocol: Protocol::V5,
        clean_start: true,
        keep_alive: 60,
        properties: Properties {
            receive_maximum: Some(2),
            ..Default::default()
        },
        client_id: "reader".to_owned(),
        will: None,
        username: None,
        password: None,
    });
    h.subscribe(&reader, "rm/#", QoS::AtLeastOnce);
    rx.take_now();
    for i in 0..5 {
        let _ = h.accept(&message(&format!("rm/{i}"), QoS::AtLeastOnce));
    }
    let first = publishes(&rx);
    assert_eq!(
        first.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["rm/0", "rm/1"],
        "two in flight, the rest held back"
    );
    // Each PUBACK frees one slot for the next message held back, in order.
    h.puback(&reader, first[0].1.expect("packet id"));
    let next = publishes(&rx);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].0, "rm/2");
    h.puback(&reader, first[1].1.expect("packet id"));
    h.puback(&reader, next[0].1.expect("packet id"));
    let rest: Vec<String> = publishes(&rx).into_iter().map(|(t, _)| t).collect();
    assert_eq!(rest, ["rm/3", "rm/4"]);
}

// ---- Shared subscriptions (MQTT 5.0, 4.8.2) ----

#[tokio::test]
async fn a_shared_subscription_gives_each_message_to_one_member_in_turn_and_skips_offline_ones() {
    let mut h = Harness::new(|_| {});
    let (a, a_rx) = h.connect_v5("member-a", 3600, None);
    let (b, b_rx) = h.connect_v5("member-b", 3600, None);
    h.subscribe(&a, "$share/workers/jobs/#", QoS::AtLeastOnce);
    h.subscribe(&b, "$share/workers/jobs/#", QoS::AtLeastOnce);
    a_rx.take_now();
    b_rx.take_now();

    for i in 0..4 {
        let _ = h.accept(&message(&format!("jobs/{i}"), QoS::AtLeastOnce));
    }
    let to_a: Vec<String> = publishes(&a_rx).into_iter().map(|(t, _)| t).collect();
    let to_b: Vec<String> = publishes(&b_rx).into_iter().map(|(t, _)| t).collect();
    assert_eq!(to_a.len(), 2, "to a: {to_a:?}, to b: {to_b:?}");
    assert_eq!(to_b.len(), 2, "to a: {to_a:?}, to b: {to_b:?}");
    let mut all: Vec<String> = to_a.iter().chain(&to_b).cloned().collect();
    all.sort();
    assert_eq!(all, ["jobs/0", "jobs/1", "jobs/2", "jobs/3"], "each once");

    // A member whose connection dropped (its session kept) is passed over while another
    // is connected.
    h.drop_connection(&b);
    for i in 4..6 {
        let _ = h.accept(&message(&format!("jobs/{i}"), QoS::AtLeastOnce));
    }
    let to_a: Vec<String> = publishes(&a_rx).into_iter().map(|(t, _)| t).collect();
    assert_eq!(to_a, ["jobs/4", "jobs/5"]);
    assert_eq!(
        h.core.sessions.get(b.session).map_or(0, |s| s.queued_len()),
        0,
        "nothing queued for the offline member"
    );
}

// ---- Outputs: what the core hands its task, in order ----

/// Everything the core has for the store's writer now, in order.
fn store_ops(h: &mut Harness) -> Vec<StoreOp> {
    std::iter::from_fn(|| h.core.poll_store_op()).collect()
}

/// Sends everything the core has for connections now, as its task does: how many items
/// went to each connection, in the order the core hands them out.
fn send_transmits(h: &mut Harness) -> Vec<usize> {
    let mut sent = Vec::new();
    while let Some(t) = h.core.poll_transmit() {
        sent.push(t.items().count());
        t.send();
    }
    super::spawn_releases(&mut h.core);
    sent
}

/// The store id of a client's session.
fn store_id(h: &Harness, who: &Accepted) -> u32 {
    h.core
        .sessions
        .get(who.session)
        .and_then(|s| s.store_id)
        .expect("a persistent session has a store id")
        .get()
}

/// Splits `[PutDelivery, Sync]`, checking the delivery row: for session `sid`, on
/// `topic`, with `packet_id` (`None`: queued, not sent yet).
fn delivery_then_sync(
    ops: Vec<StoreOp>,
    sid: u32,
    topic: &str,
    packet_id: Option<u16>,
) -> oneshot::Sender<bool> {
    let kinds: Vec<&str> = ops.iter().map(op_kind).collect();
    assert_eq!(
        kinds,
        ["PutDelivery", "Sync"],
        "exactly these, in this order"
    );
    let mut ops = ops.into_iter();
    match ops.next() {
        Some(StoreOp::PutDelivery {
            session,
            msg,
            qos,
            packet_id: p,
            ..
        }) => {
            assert_eq!(session, sid, "the row belongs to the subscriber's session");
            assert_eq!(&*msg.topic, topic);
            assert_eq!(qos, QoS::AtLeastOnce);
            assert_eq!(p, packet_id);
        }
        _ => unreachable!("checked above"),
    }
    match ops.next() {
        Some(StoreOp::Sync(committed)) => committed,
        _ => unreachable!("checked above"),
    }
}

fn op_kind(op: &StoreOp) -> &'static str {
    match op {
        StoreOp::PutSession { .. } => "PutSession",
        StoreOp::DropSession(_) => "DropSession",
        StoreOp::PutSub { .. } => "PutSub",
        StoreOp::DropSub { .. } => "DropSub",
        StoreOp::PutDelivery { .. } => "PutDelivery",
        StoreOp::SetPacketId { .. } => "SetPacketId",
        StoreOp::Released(_) => "Released",
        StoreOp::DropDelivery(_) => "DropDelivery",
        StoreOp::PutQos2 { .. } => "PutQos2",
        StoreOp::DropQos2 { .. } => "DropQos2",
        StoreOp::PutRetained(_) => "PutRetained",
        StoreOp::DropRetained(_) => "DropRetained",
        StoreOp::Group(_) => "Group",
        StoreOp::Sync(_) => "Sync",
    }
}

#[tokio::test]
async fn a_qos_1_publish_for_an_offline_persistent_session_yields_its_row_then_a_sync_and_the_puback_waits_for_that_sync()
 {
    let mut h = Harness::new(|s| s.sys_interval = Duration::ZERO);
    let (keeper, _) = h.connect("keeper", false);
    h.subscribe(&keeper, "kept/#", QoS::AtLeastOnce);
    h.drop_connection(&keeper);
    let sid = store_id(&h, &keeper);
    let (publisher, publisher_rx) = h.connect("publisher", true);
    publisher_rx.take_now();

    for (packet_id, committed) in [(7, true), (8, false)] {
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "kept/1".into(),
            packet_id: Some(packet_id),
            properties: Properties::default(),
            payload: Bytes::from_static(b"x"),
        });
        // Handed to the core without the harness sending its outputs on.
        h.core.handle_event(
            CoreEvent::Packet {
                session: publisher.session,
                conn_id: publisher.conn_id,
                packet: publish,
            },
            h.now,
        );
        // The message is queued for the offline session and its row written (no packet
        // id: it has not gone out yet), then a sync whose answer says it is on disk.
        let sync = delivery_then_sync(store_ops(&mut h), sid, "kept/1", None);
        // One thing for a connection: the publisher's PUBACK, held back until then.
        assert_eq!(
            send_transmits(&mut h),
            [1],
            "only the publisher's acknowledgement"
        );
        let (mut wait, ack) = pending_ack(&publisher_rx);
        assert!(
            (&mut wait).now_or_never().is_none(),
            "the PUBACK waits while the row is not committed"
        );

        let _ = sync.send(committed);
        let outcome = (&mut wait)
            .now_or_never()
            .expect("the PUBACK is free once the sync is answered");
        match ack(outcome) {
            Some(ack) => {
                assert!(committed, "acknowledged although the row was not committed");
                assert_eq!((ack.kind, ack.packet_id), (AckKind::PubAck, packet_id));
            }
            // 3.1.1 cannot say no: the client is left to send it again.
            None => assert!(!committed, "not acknowledged although committed"),
        }
    }
}

#[tokio::test]
async fn shutdown_disconnects_everyone_writes_the_deliveries_still_in_their_grace_and_stops() {
    let mut h = Harness::new(|s| s.sys_interval = Duration::ZERO);
    let (keeper, keeper_rx, packet_id, publisher_rx) = one_delivery_in_flight(&mut h);
    let sid = store_id(&h, &keeper);
    let (mut wait, ack) = pending_ack(&publisher_rx);
    assert!(
        store_ops(&mut h).is_empty(),
        "inside the write grace the delivery is not written"
    );

    let (done, mut told) = oneshot::channel();
    h.core.handle_event(CoreEvent::Shutdown(done), h.now);
    // The final flush: the delivery still unacknowledged is written now, with its packet
    // id, and a sync follows whose answer frees its publisher.
    let sync = delivery_then_sync(store_ops(&mut h), sid, "d/1", Some(packet_id));
    assert_eq!(
        send_transmits(&mut h),
        [1, 1],
        "one item for each of the two connections"
    );
    for rx in [&keeper_rx, &publisher_rx] {
        let items = rx.take_now();
        assert!(
            matches!(items[..], [Outbound::Disconnect(r)] if r == ReasonCode::SERVER_SHUTTING_DOWN),
            "each client is told 0x8B and closed"
        );
    }

    let stopped = h.core.poll_stopped().expect("the core has stopped");
    assert!(h.core.poll_stopped().is_none(), "and says so once");
    // Nothing more is handled: a late PUBLISH makes no output.
    h.core.handle_event(
        CoreEvent::Packet {
            session: keeper.session,
            conn_id: keeper.conn_id,
            packet: Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "d/2".into(),
                packet_id: Some(9),
                properties: Properties::default(),
                payload: Bytes::from_static(b"x"),
            }),
        },
        h.now,
    );
    assert!(store_ops(&mut h).is_empty() && send_transmits(&mut h).is_empty());

    // The publisher waited on the delivery; it is freed by the final commit, not before.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!((&mut wait).now_or_never().is_none());
    let _ = sync.send(true);
    let ack = ack(bounded(wait).await).expect("acknowledged after the final commit");
    assert_eq!((ack.kind, ack.packet_id), (AckKind::PubAck, 7));
    // The task answers whoever asked once the writer is done.
    let _ = stopped.send(());
    assert!(told.try_recv().is_ok());
}

#[tokio::test]
async fn a_connect_is_answered_only_after_its_connack_is_queued() {
    let mut h = Harness::new(|s| s.sys_interval = Duration::ZERO);
    // Accepted, and refused (3.1.1 needs Clean Session for an empty client id,
    // MQTT-3.1.3-8): the connection takes its CONNACK from its queue once answered
    // (`connection/mod.rs`), so the answer must come last.
    for (client_id, accepted) in [("first", true), ("", false)] {
        let (tx, rx) = crate::outbound::channel(None);
        let (reply, mut answer) = oneshot::channel();
        let connect = Connect {
            protocol: Protocol::V3_1_1,
            clean_start: false,
            keep_alive: 60,
            properties: Properties::default(),
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
        };
        h.core.handle_event(
            CoreEvent::Connect(ConnectRequest {
                connect: Box::new(connect),
                peer: "127.0.0.1:1".parse().expect("address"),
                listener: None,
                tx,
                reply,
            }),
            h.now,
        );
        assert!(answer.try_recv().is_err(), "not answered while handling it");
        let t = h
            .core
            .poll_transmit()
            .expect("something for the connection");
        assert!(
            t.answers_connect(),
            "the answer goes with the connection's items"
        );
        assert!(
            matches!(t.items().next(), Some(Outbound::Control(p)) if matches!(**p, Packet::ConnAck(_))),
            "its CONNACK first"
        );
        t.send();
        assert!(h.core.poll_transmit().is_none(), "nothing else");
        assert!(
            matches!(rx.take_now().first(), Some(Outbound::Control(p)) if matches!(**p, Packet::ConnAck(_))),
            "the CONNACK is queued once the connection hears back"
        );
        let got = answer.try_recv().expect("answered");
        assert_eq!(got.is_some(), accepted);
    }
}

#[tokio::test]
async fn qos_0_messages_a_slow_client_has_no_room_for_are_counted_as_dropped_not_sent() {
    let mut h = Harness::new(|s| s.sys_interval = Duration::ZERO);
    let (reader, _reader_rx) = h.connect("reader", true);
    h.subscribe(&reader, "big/#", QoS::AtMostOnce);
    let sent_before = h.core.stats.messages_sent;
    // 1 MiB each, never read: the 8 MiB backlog (QOS0_BACKLOG_LIMIT) holds 7 of them
    // with their overhead, and refuses the rest.
    let payload = Bytes::from(vec![0u8; 1 << 20]);
    for i in 0..10 {
        let msg = Message::new(
            format!("big/{i}").into(),
            payload.clone(),
            QoS::AtMostOnce,
            false,
            Properties::default(),
            None,
        );
        let _ = h.accept(&msg);
    }
    let dropped = h.core.stats.dropped_slow_client;
    let sent = h.core.stats.messages_sent - sent_before;
    assert_eq!(sent + dropped, 10, "each counted once");
    assert_eq!(
        dropped,
        10 - (crate::outbound::QOS0_BACKLOG_LIMIT as u64 >> 20) + 1,
        "those past the backlog are counted as dropped"
    );
}

#[tokio::test]
async fn an_in_process_publish_is_answered_after_its_deliveries_are_queued_and_a_local_subscribe_after_it_is_made()
 {
    let mut h = Harness::new(|s| s.sys_interval = Duration::ZERO);
    let (sub, rx) = h.connect("subscriber", true);
    h.subscribe(&sub, "t", QoS::AtMostOnce);
    rx.take_now();

    let (done, mut answer) = oneshot::channel();
    h.core.handle_event(
        CoreEvent::LocalPublish {
            msg: message("t", QoS::AtMostOnce),
            done,
        },
        h.now,
    );
    assert!(answer.try_recv().is_err(), "not answered while handling it");
    assert!(
        publishes(&rx).is_empty(),
        "nothing queued while handling it"
    );
    let t = h.core.poll_transmit().expect("the subscriber's delivery");
    t.send();
    assert!(h.core.poll_transmit().is_none(), "nothing else");
    assert!(
        answer.try_recv().is_err(),
        "not answered before the replies"
    );
    h.core.poll_reply().expect("the publish's answer").send();
    assert!(h.core.poll_reply().is_none(), "one answer per event");
    assert_eq!(
        answer.try_recv().expect("answered").len(),
        0,
        "no durable sink, so no receipt to wait for"
    );
    assert_eq!(publishes(&rx), vec![("t".to_owned(), None)]);

    // Answers come out in the order their events came.
    let (local_tx, mut local_rx) = mpsc::channel(4);
    let (subscribed, mut key) = oneshot::channel();
    h.core.handle_event(
        CoreEvent::LocalSubscribe {
            filter: "t".to_owned(),
            qos: QoS::AtMostOnce,
            tx: local_tx,
            done: subscribed,
        },
        h.now,
    );
    let (snapshot, mut stats) = oneshot::channel();
    h.core.handle_event(CoreEvent::Snapshot(snapshot), h.now);
    assert!(key.try_recv().is_err() && stats.try_recv().is_err());
    h.core.poll_reply().expect("the subscribe's answer").send();
    assert!(key.try_recv().is_ok(), "the subscription's key first");
    assert!(stats.try_recv().is_err(), "the snapshot after it");
    h.core.poll_reply().expect("the snapshot").send();
    let stats = stats.try_recv().expect("the snapshot's answer");
    assert_eq!(
        stats.stats.local_publishes, 1,
        "the publish above was counted"
    );

    // The subscription is in place once answered: the next publish reaches it.
    h.accept(&message("t", QoS::AtMostOnce));
    assert_eq!(
        &*local_rx
            .try_recv()
            .expect("delivered to the local subscriber")
            .topic,
        "t"
    );
}

// ---- Timers: one will and one expiry per session (timers.rs) ----

#[tokio::test]
async fn a_client_reconnecting_in_a_loop_keeps_at_most_one_will_and_one_expiry_timer_mqtt_3_1_2_23_mqtt_3_1_3_9()
 {
    let mut h = Harness::new(|s| s.sys_interval = Duration::ZERO);
    let (watcher, watcher_rx) = h.connect("watcher", true);
    h.subscribe(&watcher, "wills/#", QoS::AtMostOnce);
    assert_eq!(h.core.timers.len(), 0, "nothing pending without $SYS");

    // Each disconnect sets a will (60 s) and a session expiry (1 h); each reconnect makes
    // them void. Before, both stayed queued until due: two entries per reconnect.
    let mut clock = Duration::ZERO;
    for i in 0..10_000 {
        let (looper, _) = h.connect_v5("looper", 3600, Some(will("wills/looper", 60)));
        assert_eq!(h.core.timers.len(), 0, "connected again ({i})");
        h.drop_connection(&looper);
        assert_eq!(h.core.timers.len(), 2, "one will and one expiry ({i})");
        clock += Duration::from_millis(1);
        h.advance_to(clock);
    }
    assert!(
        publishes(&watcher_rx).is_empty(),
        "every will was cancelled"
    );

    // The last disconnect's will and expiry still come when due.
    let last = clock - Duration::from_millis(1);
    h.advance_to(last + Duration::from_secs(60) - Duration::from_millis(1));
    assert!(publishes(&watcher_rx).is_empty(), "not before the delay");
    h.advance_to(last + Duration::from_secs(60));
    // MQTT-3.1.3-9: published once the Will Delay Interval has passed.
    assert_eq!(
        publishes(&watcher_rx),
        vec![("wills/looper".to_owned(), None)]
    );
    assert_eq!(h.core.stats.wills, 1);
    // MQTT-3.1.2-23: the session is kept for its Session Expiry Interval, then ended.
    h.advance_to(last + Duration::from_secs(3600) - Duration::from_millis(1));
    assert!(h.holds_session("looper"));
    h.advance_to(last + Duration::from_secs(3600));
    assert!(!h.holds_session("looper"));
    assert_eq!(h.core.timers.len(), 0);
}

#[tokio::test]
async fn a_sys_interval_past_what_the_clock_holds_is_never_due_rather_than_a_panic() {
    // Config validation bounds sys_interval; the core must not panic without it either.
    let mut h = Harness::new(|s| s.sys_interval = Duration::MAX);
    assert_eq!(h.core.poll_timeout(), None, "no $SYS publication is due");
    h.advance_to(Duration::from_secs(3600));
    assert_eq!(h.core.timers.len(), 0);
}

// ---- Retained messages that expire leave the store as well as memory ----

/// A retained QoS 0 message on `topic` that expires `secs` after `now`.
fn retained_expiring(topic: &str, secs: u32, now: Instant) -> Arc<Message> {
    Message::new_at(
        topic.into(),
        Bytes::from_static(b"x"),
        QoS::AtMostOnce,
        true,
        Properties {
            message_expiry_interval: Some(secs),
            ..Default::default()
        },
        None,
        now,
    )
}

/// The retained-message changes among `ops`, as "Kind topic".
fn retained_changes(ops: &[StoreOp]) -> Vec<String> {
    ops.iter()
        .filter_map(|op| match op {
            StoreOp::PutRetained(m) => Some(format!("PutRetained {}", m.topic)),
            StoreOp::DropRetained(t) => Some(format!("DropRetained {t}")),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_retained_message_that_expires_leaves_the_store_too_so_the_file_stays_within_the_limits_mqtt_3_3_2_5()
 {
    let mut h = Harness::new(|s| {
        s.sys_interval = Duration::ZERO;
        s.max_retained_messages = 1;
    });
    let _ = h.core.accept(&retained_expiring("gone/a", 1, h.now), h.now);
    assert_eq!(retained_changes(&store_ops(&mut h)), ["PutRetained gone/a"]);

    // The store is full of a message that has expired: the new one takes its place, and
    // the expired row goes first.
    h.advance_to(Duration::from_secs(2));
    let _ = h.core.accept(&retained_expiring("gone/b", 1, h.now), h.now);
    assert_eq!(
        retained_changes(&store_ops(&mut h)),
        ["DropRetained gone/a", "PutRetained gone/b"]
    );

    // A subscribe that finds a retained message expired drops its row as well.
    h.advance_to(Duration::from_secs(4));
    let (sub, _sub_rx) = h.connect("retained-reader", true);
    let _ = store_ops(&mut h);
    let subscribe = Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: "gone/#".to_owned(),
            options: SubscriptionOptions::default(),
        }],
        properties: Properties::default(),
    };
    h.core
        .on_packet(sub.session, Packet::Subscribe(subscribe), h.now);
    assert_eq!(
        retained_changes(&store_ops(&mut h)),
        ["DropRetained gone/b"]
    );
    assert_eq!(h.core.retained.len(), 0);
}
