//! A 3.1.1 publisher whose acknowledgements wait for a durable sink's commit. 3.x has no
//! Receive Maximum, so nothing in the protocol stops it from sending without end while
//! its PUBACKs are held; each publish it gets in costs the broker the message, its place
//! in the sink's queue and the held acknowledgement. The broker stops reading it once
//! `REPLIES_BACKLOG` (4,096) are owed, so its writes block, and once the commits come every
//! publish gets its PUBACK, in order (MQTT-4.6.0-2), none lost.
//!
//! Driven over an in-memory pipe through `Broker::serve_stream` (the path TLS and
//! WebSocket connections take after their handshake), with a sink whose commits the test
//! releases.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use outpost_broker::config::BrokerConfig;
use outpost_broker::{Broker, DurableReceipt, DurableSink, Message, Settings};
use outpost_mqtt::{Connect, Packet, Properties, Protocol, Publish, QoS, codec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::timeout;

/// Publishes the client tries to send: more than the backlog bound by far, and no more
/// than there are packet identifiers, so none is reused while unacknowledged.
const PUBLISHES: usize = 60_000;
/// The most the client may get written before its writes block: the broker's bound
/// (4,096), what the 64 KiB pipe and the connection's read buffer hold (about 3,200 of
/// these 23-byte packets) and slack.
const BOUND: usize = 10_000;
/// No write progress for this long means the writes are blocked (a bound, not a timing:
/// the broker takes a publish in microseconds while it reads).
const BLOCKED: Duration = Duration::from_secs(2);

/// A sink that takes every message and commits only once the test says so.
struct HeldSink {
    committed: watch::Receiver<bool>,
    offered: AtomicUsize,
}

impl DurableSink for HeldSink {
    fn offer(&self, _msg: &Message) -> Option<DurableReceipt> {
        self.offered.fetch_add(1, Ordering::Relaxed);
        let mut committed = self.committed.clone();
        Some(
            async move {
                // The sender lives as long as the test; a closed channel also ends it.
                let _ = committed.wait_for(|c| *c).await;
                Ok(())
            }
            .boxed(),
        )
    }

    fn wants(&self, _topic: &str) -> bool {
        true
    }
}

fn wire(packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    codec::encode(packet, Protocol::V3_1_1, &mut buf).expect("encodes");
    buf
}

fn publish(packet_id: u16) -> BytesMut {
    wire(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: Some(packet_id),
        properties: Properties::default(),
        payload: Bytes::from_static(b"0123456789abcdef"),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_publisher_whose_acks_wait_for_a_commit_is_read_no_further_past_the_backlog_and_loses_nothing()
 {
    let (commit, committed) = watch::channel(false);
    let sink = Arc::new(HeldSink {
        committed,
        offered: AtomicUsize::new(0),
    });
    let mut settings = Settings::from_config(&BrokerConfig::default());
    settings.allow_anonymous = true;
    settings.sys_interval = Duration::ZERO;
    let settings = Arc::new(settings);
    let broker = Broker::start((*settings).clone(), vec![sink.clone()], None);
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
    tokio::spawn(broker.serve_stream(
        server,
        peer,
        settings,
        Instant::now() + Duration::from_secs(30),
        None,
    ));
    let (mut rd, mut wr) = tokio::io::split(client);

    wr.write_all(&wire(&Packet::Connect(Box::new(Connect {
        protocol: Protocol::V3_1_1,
        clean_start: true,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: "backlog".to_owned(),
        will: None,
        username: None,
        password: None,
    }))))
    .await
    .expect("CONNECT written");
    let mut rbuf = BytesMut::new();
    let connack = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = codec::decode(&mut rbuf, Protocol::V3_1_1, 1 << 20).expect("decodes") {
                return p;
            }
            assert_ne!(rd.read_buf(&mut rbuf).await.expect("reads"), 0, "closed");
        }
    })
    .await
    .expect("CONNACK in time");
    assert!(
        matches!(connack, Packet::ConnAck(ref c) if c.reason.0 == 0),
        "{connack:?}"
    );

    // No commit comes: the client writes until its writes block. One `write` at a time,
    // so a write the timeout gives up on has written nothing, and the packet it was
    // part of is finished later from where it stopped.
    let mut written = 0usize;
    let mut packet = publish(1);
    let mut at = 0usize;
    while written < PUBLISHES {
        match timeout(BLOCKED, wr.write(&packet[at..])).await {
            Ok(r) => at += r.expect("written"),
            Err(_) => break,
        }
        if at == packet.len() {
            written += 1;
            let id = u16::try_from(written + 1).unwrap_or(u16::MAX);
            packet = publish(id);
            at = 0;
        }
    }
    let offered = sink.offered.load(Ordering::Relaxed);
    eprintln!("{written} publishes written before the writes blocked; {offered} reached the sink");
    assert!(
        written <= BOUND,
        "the broker kept reading a 3.1.1 publisher whose {written} acknowledgements wait \
         for a commit (bound {BOUND})"
    );

    // The commits come: every publish gets its PUBACK, in order, and the rest of the
    // publishes go through as well.
    commit.send(true).expect("the sink listens");
    let reader = tokio::spawn(async move {
        let mut next = 1u32;
        while (next as usize) <= PUBLISHES {
            while let Some(p) =
                codec::decode(&mut rbuf, Protocol::V3_1_1, 1 << 20).expect("decodes")
            {
                match p {
                    Packet::PubAck(a) => {
                        assert_eq!(u32::from(a.packet_id), next, "PUBACKs in order");
                        next += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            if (next as usize) <= PUBLISHES {
                let n = rd.read_buf(&mut rbuf).await.expect("reads");
                assert_ne!(n, 0, "closed after {} PUBACKs", next - 1);
            }
        }
        next - 1
    });
    while written < PUBLISHES {
        wr.write_all(&packet[at..]).await.expect("written");
        written += 1;
        let id = u16::try_from(written + 1).unwrap_or(u16::MAX);
        packet = publish(id);
        at = 0;
    }
    let acked = timeout(Duration::from_secs(120), reader)
        .await
        .expect("every PUBACK within the bound")
        .expect("the reader ends");
    assert_eq!(acked as usize, PUBLISHES);
    assert_eq!(sink.offered.load(Ordering::Relaxed), PUBLISHES);
}
