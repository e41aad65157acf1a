//! The core driven in memory, with a real store in a temporary directory: what a
//! publisher's acknowledgement waits for after routing.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use outpost_mqtt::{
    Connect, Packet, Properties, Protocol, QoS, Subscribe, SubscribeFilter, SubscriptionOptions,
};
use tokio::sync::{mpsc, oneshot};

use super::{Accepted, ConnectRequest, Core, CoreEvent};
use crate::message::Message;
use crate::outbound::OutboundRx;
use crate::settings::Settings;
use crate::store::Store;

/// A core with persistence on, and what keeps it working while a test runs.
struct Harness {
    core: Core,
    /// The fake clock: the time every event is handed to the core with.
    now: Instant,
    /// Receives what the core sends itself; kept so that its weak sender stays valid.
    _inbox: mpsc::Receiver<CoreEvent>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(configure: impl FnOnce(&mut Settings)) -> Harness {
        let mut settings = Settings::from_config(&Default::default());
        configure(&mut settings);
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(&dir.path().join("broker.sqlite"), 0).expect("store opens");
        let (tx, inbox) = mpsc::channel(16);
        let now = Instant::now();
        let core = Core::new(
            Arc::new(settings),
            Vec::new(),
            Some(store),
            tx.downgrade(),
            now,
        );
        Harness {
            core,
            now,
            _inbox: inbox,
            _dir: dir,
        }
    }

    /// Connects a 3.1.1 client; `clean` false makes its session persistent.
    fn connect(&mut self, client_id: &str, clean: bool) -> (Accepted, OutboundRx) {
        let (tx, rx) = crate::outbound::channel(None);
        let (reply, mut answer) = oneshot::channel();
        self.core.on_connect(
            ConnectRequest {
                connect: Box::new(Connect {
                    protocol: Protocol::V3_1_1,
                    clean_start: clean,
                    keep_alive: 60,
                    properties: Properties::default(),
                    client_id: client_id.to_owned(),
                    will: None,
                    username: None,
                    password: None,
                }),
                peer: "127.0.0.1:1".parse().expect("address"),
                listener: None,
                tx,
                reply,
            },
            self.now,
        );
        let accepted = answer
            .try_recv()
            .expect("the core answers a CONNECT at once")
            .expect("connection accepted");
        (accepted, rx)
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
    }

    /// The client's connection drops without DISCONNECT.
    fn drop_connection(&mut self, who: &Accepted) {
        self.core
            .on_closed(who.session, who.conn_id, None, None, self.now);
    }
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
    let (receipts, wanted) = h
        .core
        .accept(&message("plain/topic", QoS::AtLeastOnce), h.now);
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

    let (receipts, wanted) = h.core.accept(&message("kept/1", QoS::AtLeastOnce), h.now);
    assert!(wanted);
    assert_eq!(receipts.len(), 1, "the PUBACK waits for the store's commit");
    for r in receipts {
        r.await.expect("the store commits");
    }
    // The next message, for nobody, waits for nothing.
    let (receipts, _) = h.core.accept(&message("other", QoS::AtLeastOnce), h.now);
    assert_eq!(receipts.len(), 0);
}

#[tokio::test]
async fn retained_messages_sent_on_subscribe_hold_back_no_later_publishers_ack() {
    let mut h = Harness::new(|_| {});
    let mut retained = (*message("state/1", QoS::AtLeastOnce)).clone();
    retained.retain = true;
    let (receipts, _) = h.core.accept(&Arc::new(retained), h.now);
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

    let (receipts, _) = h.core.accept(&message("other", QoS::AtLeastOnce), h.now);
    assert_eq!(receipts.len(), 0);
}
