//! A client that sends without reading what it is owed. Every PINGREQ is owed a PINGRESP
//! (MQTT-3.12.4-1) and every UNSUBSCRIBE an UNSUBACK (MQTT-3.10.4-4); a broker that keeps
//! reading such a client keeps the replies in memory until the client reads, without
//! bound. Outpost stops reading it once a bounded amount waits to be written, so the
//! client's sends block in TCP's flow control, and it owes nothing it then loses: once the
//! client reads, every reply arrives.

use std::time::Duration;

use bytes::BytesMut;
use outpost_mqtt::{Connect, Packet, Properties, Protocol, Unsubscribe, codec};
use outpost_tests::Broker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The most the client may get into the broker's side before its sends block: the
/// broker's write buffer (256 KiB) and its replies queued in memory, plus what the
/// kernel buffers on both sides of a loopback connection (up to `tcp_rmem`'s 6 MiB for
/// the broker's receive buffer and `tcp_wmem`'s 4 MiB for the client's send buffer).
const BOUND: usize = 24 << 20;
/// Where the client gives up sending: a broker that reads without bound takes it all.
const GIVE_UP: usize = 40 << 20;
/// No progress for this long means the sends are blocked (a bound, not a timing: the
/// broker drains a socket in microseconds while it reads).
const BLOCKED: Duration = Duration::from_secs(3);

fn encode(packet: &Packet, protocol: Protocol) -> BytesMut {
    let mut buf = BytesMut::new();
    codec::encode(packet, protocol, &mut buf).expect("encodes");
    buf
}

/// Connects with keep-alive off (the test sends for as long as it likes), sends `packet`
/// over and over without reading until the sends block or [`GIVE_UP`] bytes are out, and
/// returns how many were sent, then reads until one reply per packet sent has come.
async fn flood_without_reading(protocol: Protocol, client_id: &str, packet: &Packet) {
    let broker = Broker::start("");
    let mut stream = TcpStream::connect(("127.0.0.1", broker.port()))
        .await
        .expect("connects");
    let connect = Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: true,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
    }));
    stream
        .write_all(&encode(&connect, protocol))
        .await
        .expect("CONNECT sent");
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let connack = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = codec::decode(&mut rbuf, protocol, 1 << 20).expect("decodes") {
                return p;
            }
            assert_ne!(
                stream.read_buf(&mut rbuf).await.expect("reads"),
                0,
                "closed"
            );
        }
    })
    .await
    .expect("CONNACK in time");
    assert!(
        matches!(connack, Packet::ConnAck(ref c) if c.reason.0 == 0),
        "{connack:?}"
    );

    let one = encode(packet, protocol);
    let chunk: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4096).collect();
    let mut sent = 0usize;
    let mut at = 0usize;
    let blocked = loop {
        if sent >= GIVE_UP {
            break false;
        }
        match timeout(BLOCKED, stream.writable()).await {
            Err(_) => break true,
            Ok(r) => r.expect("socket usable"),
        }
        match stream.try_write(&chunk[at..]) {
            Ok(n) => {
                sent += n;
                at = (at + n) % chunk.len();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("send failed after {sent} bytes: {e}"),
        }
    };
    let rss = broker
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        });
    eprintln!("{client_id}: {sent} bytes sent before the sends blocked; broker {rss:?}");
    assert!(
        blocked && sent <= BOUND,
        "the broker kept reading a client that does not read: {sent} bytes taken \
         (bound {BOUND}; blocked: {blocked})"
    );

    // Nothing owed is lost: the client now reads, and every packet it got in is
    // answered, in order, by the one reply it is owed. (A packet cut at the end of the
    // last send is completed first.)
    let whole = sent / one.len();
    let rest = sent % one.len();
    if rest > 0 {
        stream
            .write_all(&one[rest..])
            .await
            .expect("the last packet completed");
    }
    let expected = whole + usize::from(rest > 0);
    let mut replies = 0usize;
    timeout(Duration::from_secs(60), async {
        while replies < expected {
            while let Some(p) = codec::decode(&mut rbuf, protocol, 1 << 20).expect("decodes") {
                match (&p, packet) {
                    (Packet::PingResp, Packet::PingReq) => {}
                    (Packet::UnsubAck(_), Packet::Unsubscribe(_)) => {}
                    _ => panic!("unexpected reply {p:?} after {replies}"),
                }
                replies += 1;
            }
            if replies < expected {
                let n = stream.read_buf(&mut rbuf).await.expect("reads");
                assert_ne!(n, 0, "closed after {replies} of {expected} replies");
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {replies} of {expected} replies came"));
    assert_eq!(replies, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_pingreqs_without_reading_is_read_no_further_and_gets_every_pingresp_mqtt_3_12_4_1()
 {
    flood_without_reading(Protocol::V3_1_1, "bp-ping", &Packet::PingReq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_unsubscribes_without_reading_is_read_no_further_and_gets_every_unsuback_mqtt_3_10_4_4()
 {
    let unsubscribe = Packet::Unsubscribe(Unsubscribe {
        packet_id: 7,
        filters: vec!["a".to_owned()],
        properties: Properties::default(),
    });
    flood_without_reading(Protocol::V5, "bp-unsub", &unsubscribe).await;
}
