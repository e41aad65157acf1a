//! The durable hand-off contract (DESIGN.md, "Acked means durable"): a PUBACK for a
//! message a durable sink takes is only sent after the sink commits, acknowledgements
//! stay in PUBLISH order (MQTT-4.6.0-2), and messages no sink wants are not held back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use outpost_gateway::broker::{Broker, DurableReceipt, DurableSink, Message, Rejected, Settings};
use outpost_gateway::config::BrokerConfig;
use outpost_mqtt::{Connect, Packet, Properties, Protocol, Publish, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

type Pending = Vec<(String, oneshot::Sender<Result<(), Rejected>>)>;

/// A sink that takes topics under `spool/` and commits only when the test says so.
#[derive(Default)]
struct HeldSink {
    pending: Mutex<Pending>,
}

impl DurableSink for HeldSink {
    fn wants(&self, topic: &str) -> bool {
        topic.starts_with("spool/")
    }

    fn offer(&self, msg: &Message) -> Option<DurableReceipt> {
        if !msg.topic.starts_with("spool/") {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap()
            .push((msg.topic.to_string(), tx));
        Some(Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(Rejected::failure("sink dropped")))
        }))
    }
}

async fn start(sink: Arc<HeldSink>) -> std::net::SocketAddr {
    let mut cfg: BrokerConfig = toml::from_str("listeners = [{ bind = \"127.0.0.1:0\" }]").unwrap();
    cfg.sys_interval = Duration::ZERO;
    let listeners = outpost_gateway::broker::bind_listeners(&cfg.listeners)
        .await
        .unwrap();
    let addr = listeners[0].local_addr;
    let broker = Broker::start(
        Settings::from_config(&cfg),
        vec![sink as Arc<dyn DurableSink>],
        None,
    );
    broker.serve(listeners);
    std::mem::forget(broker);
    addr
}

struct Raw {
    s: TcpStream,
    buf: BytesMut,
    protocol: Protocol,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr, protocol: Protocol) -> Raw {
        let mut r = Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            protocol,
        };
        r.send(Packet::Connect(Box::new(Connect {
            protocol,
            clean_start: true,
            keep_alive: 30,
            properties: Properties::default(),
            client_id: "durable-test".into(),
            will: None,
            username: None,
            password: None,
        })))
        .await;
        assert!(
            matches!(r.recv().await, Some(Packet::ConnAck(c)) if c.reason == ReasonCode::SUCCESS)
        );
        r
    }

    async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        outpost_mqtt::encode(&p, self.protocol, &mut b).unwrap();
        self.s.write_all(&b).await.unwrap();
    }

    async fn publish(&mut self, topic: &str, id: u16) {
        self.send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(id),
            properties: Properties::default(),
            payload: Bytes::from_static(b"x"),
        }))
        .await;
    }

    /// Next packet within `wait`, or `None`.
    async fn recv_within(&mut self, wait: Duration) -> Option<Packet> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some(p) =
                    outpost_mqtt::decode(&mut self.buf, self.protocol, 1 << 20).unwrap()
                {
                    return Some(p);
                }
                if self.s.read_buf(&mut self.buf).await.unwrap() == 0 {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(Duration::from_secs(5)).await
    }
}

fn puback_id(p: Option<Packet>) -> (u16, ReasonCode) {
    match p {
        Some(Packet::PubAck(a)) => (a.packet_id, a.reason),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn puback_waits_for_commit_and_keeps_publish_order() {
    let sink = Arc::new(HeldSink::default());
    let addr = start(sink.clone()).await;
    let mut c = Raw::connect(addr, Protocol::V3_1_1).await;

    // Not bridged: acknowledged at once.
    c.publish("local/a", 1).await;
    assert_eq!(puback_id(c.recv().await).0, 1);

    // Bridged, then not bridged: neither ack may leave before the commit.
    c.publish("spool/a", 2).await;
    c.publish("local/b", 3).await;
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_none(),
        "an acknowledgement left before the sink committed"
    );
    let (topic, commit) = sink.pending.lock().unwrap().remove(0);
    assert_eq!(topic, "spool/a");
    commit.send(Ok(())).unwrap();
    assert_eq!(puback_id(c.recv().await).0, 2);
    assert_eq!(puback_id(c.recv().await).0, 3);
}

#[tokio::test]
async fn refused_message_gets_quota_exceeded_on_v5_and_no_ack_on_v311() {
    let sink = Arc::new(HeldSink::default());
    let addr = start(sink.clone()).await;

    let mut v5 = Raw::connect(addr, Protocol::V5).await;
    v5.publish("spool/full", 7).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, commit) = sink.pending.lock().unwrap().remove(0);
    commit
        .send(Err(Rejected {
            reason: "spool full".into(),
            code: ReasonCode::QUOTA_EXCEEDED,
        }))
        .unwrap();
    assert_eq!(puback_id(v5.recv().await), (7, ReasonCode::QUOTA_EXCEEDED));
    drop(v5);

    let mut v3 = Raw::connect(addr, Protocol::V3_1_1).await;
    v3.publish("spool/full", 8).await;
    v3.publish("local/after", 9).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, commit) = sink.pending.lock().unwrap().remove(0);
    commit
        .send(Err(Rejected {
            reason: "spool full".into(),
            code: ReasonCode::QUOTA_EXCEEDED,
        }))
        .unwrap();
    // 3.1.1 cannot say no: the refused message is left unacknowledged (the client will
    // resend it), and the next one is acknowledged.
    assert_eq!(puback_id(v3.recv().await).0, 9);
}

/// The in-process API used by the sensors and the bridge: `publish` resolves only once
/// every durable sink that took the message has committed it, and a local subscriber
/// receives it like any other.
#[tokio::test]
async fn in_process_publish_completes_after_commit_and_reaches_local_subscribers() {
    let sink = Arc::new(HeldSink::default());
    let cfg: BrokerConfig = toml::from_str("sys_interval = \"0s\"").unwrap();
    let broker = Broker::start(
        Settings::from_config(&cfg),
        vec![sink.clone() as Arc<dyn DurableSink>],
        None,
    );
    let handle = broker.handle();
    let mut sub = handle.subscribe("spool/#", QoS::AtLeastOnce).await.unwrap();

    let publishing = tokio::spawn({
        let handle = handle.clone();
        async move {
            handle
                .publish(
                    "spool/reading",
                    Bytes::from_static(b"21.5"),
                    QoS::AtLeastOnce,
                    false,
                    Properties::default(),
                )
                .await
        }
    });
    let got = tokio::time::timeout(Duration::from_secs(5), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.payload[..], b"21.5");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !publishing.is_finished(),
        "publish completed before the sink committed"
    );
    let (_, commit) = sink.pending.lock().unwrap().remove(0);
    commit.send(Ok(())).unwrap();
    tokio::time::timeout(Duration::from_secs(5), publishing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Invalid topics are refused before they reach the core.
    let err = handle
        .publish(
            "bad/+/topic",
            Bytes::new(),
            QoS::AtMostOnce,
            false,
            Properties::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad/+/topic"), "{err}");
}
