//! MQTT over TLS (with and without client certificates) and over WebSocket, on the real
//! binary. TLS peers are Mosquitto's own clients; certificates come from the openssl CLI.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use outpost_mqtt::{Packet, Protocol, QoS};
use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::cli::mosquitto_pub;
use outpost_tests::pki::Pki;
use outpost_tests::ports::reserve_port;
use outpost_tests::raw::{connect_packet, sub_opts};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(5);

/// Runs a mosquitto client with a timeout and returns its output.
fn mosquitto(tool: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("10")
        .arg(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (apt-get install mosquitto-clients)"))
}

#[test]
fn tls_listener_serves_mosquitto_clients() {
    if mosquitto_mode() {
        return;
    }
    let pki = Pki::new(&[("client", "sensor-1")]);
    let tls_port_held = reserve_port();
    let tls_port = tls_port_held.port();
    let broker = Broker::outpost_with_full_config(&format!(
        "[broker]\nlisteners = [{{ bind = \"127.0.0.1:{tls_port}\", tls = {{ cert = \"{}\", key = \"{}\" }} }}, {{ bind = \"127.0.0.1:0\" }}]",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    ));
    let port = tls_port.to_string();
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    let sub = std::thread::spawn({
        let (port, ca) = (port.clone(), ca.to_owned());
        move || {
            mosquitto(
                "mosquitto_sub",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "--cafile",
                    &ca,
                    "-t",
                    "tls/t",
                    "-C",
                    "1",
                    "-W",
                    "8",
                    "-q",
                    "1",
                ],
            )
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    let publ = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca,
            "-t",
            "tls/t",
            "-m",
            "over-tls",
            "-q",
            "1",
        ],
    );
    assert!(
        publ.status.success(),
        "publish over TLS failed: {}\n{}",
        String::from_utf8_lossy(&publ.stderr),
        broker.log()
    );
    let got = sub.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "over-tls",
        "{}",
        broker.log()
    );
}

#[test]
fn tls_listener_with_client_ca_requires_a_client_certificate() {
    if mosquitto_mode() {
        return;
    }
    let pki = Pki::new(&[("client", "sensor-1")]);
    let tls_port_held = reserve_port();
    let tls_port = tls_port_held.port();
    let broker = Broker::outpost_with_full_config(&format!(
        "[broker]\nlisteners = [{{ bind = \"127.0.0.1:{tls_port}\", tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }} }}, {{ bind = \"127.0.0.1:0\" }}]",
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        pki.path("ca.pem").display()
    ));
    let port = tls_port.to_string();
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();
    let without = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca,
            "-t",
            "mtls/t",
            "-m",
            "x",
            "-q",
            "1",
        ],
    );
    assert!(
        !without.status.success(),
        "a client without a certificate was let in"
    );

    let cert = pki.path("client.pem");
    let key = pki.path("client.key");
    let with = mosquitto(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-t",
            "mtls/t",
            "-m",
            "x",
            "-q",
            "1",
        ],
    );
    assert!(
        with.status.success(),
        "client certificate refused: {}\n{}",
        String::from_utf8_lossy(&with.stderr),
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_listener_carries_mqtt_in_binary_frames() {
    if mosquitto_mode() {
        return;
    }
    let ws_port_held = reserve_port();
    let ws_port = ws_port_held.port();
    let broker = Broker::outpost_with_full_config(&format!(
        "[broker]\nlisteners = [{{ bind = \"127.0.0.1:{ws_port}\", websocket = \"/mqtt\" }}, {{ bind = \"127.0.0.1:0\" }}]"
    ));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
        .await
        .unwrap();
    let mut req = format!("ws://127.0.0.1:{ws_port}/mqtt")
        .into_client_request()
        .unwrap();
    // MQTT-6.0.0-3: the client offers the "mqtt" subprotocol and the server must agree.
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("WebSocket handshake");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap()),
        Some("mqtt")
    );

    let send = |p: Packet| {
        let mut b = BytesMut::new();
        outpost_mqtt::encode(&p, Protocol::V3_1_1, &mut b).unwrap();
        Ws::Binary(b.freeze())
    };
    ws.send(send(Packet::Connect(Box::new(connect_packet(
        Protocol::V3_1_1,
        "ws-client",
        true,
    )))))
    .await
    .unwrap();
    ws.send(send(Packet::Subscribe(outpost_mqtt::Subscribe {
        packet_id: 1,
        filters: vec![outpost_mqtt::SubscribeFilter {
            filter: "ws/t".into(),
            options: sub_opts(QoS::AtLeastOnce),
        }],
        properties: Default::default(),
    })))
    .await
    .unwrap();

    // Frames may split or join packets; decode from one buffer.
    let mut buf = BytesMut::new();
    let mut next = async || -> Packet {
        loop {
            if let Some(p) = outpost_mqtt::decode(&mut buf, Protocol::V3_1_1, 1 << 20).unwrap() {
                return p;
            }
            match tokio::time::timeout(WAIT, ws.next()).await {
                Ok(Some(Ok(Ws::Binary(b)))) => buf.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                other => panic!("WebSocket ended: {other:?}"),
            }
        }
    };
    assert!(matches!(next().await, Packet::ConnAck(_)));
    assert!(matches!(next().await, Packet::SubAck(_)));
    mosquitto_pub(broker.port(), "ws/t", "hello-ws", 1, false, false).await;
    match next().await {
        Packet::Publish(p) => {
            assert_eq!(&p.topic[..], "ws/t");
            assert_eq!(&p.payload[..], b"hello-ws");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// A WebSocket frame bigger than `max_packet_size` (plus a little batching room) is
/// refused when its header arrives, before CONNECT, as an oversized packet is on TCP:
/// an unauthenticated client cannot make the broker buffer tens of megabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frame_beyond_max_packet_size_is_refused_at_its_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if mosquitto_mode() {
        return;
    }
    let ws_port_held = reserve_port();
    let ws_port = ws_port_held.port();
    let broker = Broker::outpost_with_full_config(&format!(
        "[broker]\nmax_packet_size = \"4KiB\"\nconnect_timeout = \"60s\"\n\
         listeners = [{{ bind = \"127.0.0.1:{ws_port}\", websocket = \"/mqtt\" }}, {{ bind = \"127.0.0.1:0\" }}]"
    ));
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
        .await
        .unwrap();
    tcp.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    while !reply.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("handshake reply")
            .unwrap();
        assert!(n > 0, "closed during the handshake");
        reply.extend_from_slice(&buf[..n]);
    }
    assert!(reply.starts_with(b"HTTP/1.1 101"), "{reply:?}");
    // A masked binary frame announcing 10 MiB, then only its first kilobyte.
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&(10u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&[0u8; 1024]);
    tcp.write_all(&frame).await.unwrap();
    // The broker ends the connection (a Close frame, then EOF) instead of waiting for
    // the rest; the 60 s connect timeout is far away.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the oversized frame was buffered\n{}",
        broker.log()
    );
}

/// `connect_timeout` covers the whole opening, TLS and WebSocket handshakes included: a
/// client that spends most of it before the upgrade has only the rest for its CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_runs_from_accept_across_the_websocket_handshake() {
    if mosquitto_mode() {
        return;
    }
    let ws_port_held = reserve_port();
    let ws_port = ws_port_held.port();
    let broker = Broker::outpost_with_full_config(&format!(
        "[broker]\nconnect_timeout = \"2s\"\n\
         listeners = [{{ bind = \"127.0.0.1:{ws_port}\", websocket = \"/mqtt\" }}, {{ bind = \"127.0.0.1:0\" }}]"
    ));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let req = format!("ws://127.0.0.1:{ws_port}/mqtt")
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("WebSocket handshake within the connect timeout");
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let mut b = BytesMut::new();
    let connect = connect_packet(Protocol::V3_1_1, "ws-late", true);
    outpost_mqtt::encode(
        &Packet::Connect(Box::new(connect)),
        Protocol::V3_1_1,
        &mut b,
    )
    .unwrap();
    let _ = ws.send(Ws::Binary(b.freeze())).await;
    let got = tokio::time::timeout(WAIT, async {
        let mut buf = BytesMut::new();
        while let Some(Ok(m)) = ws.next().await {
            if let Ws::Binary(data) = m {
                buf.extend_from_slice(&data);
                if let Ok(Some(p)) = outpost_mqtt::decode(&mut buf, Protocol::V3_1_1, 1 << 20) {
                    return Some(p);
                }
            }
        }
        None
    })
    .await
    .expect("the connection neither answered nor closed");
    assert!(
        got.is_none(),
        "a CONNECT 2.8 s after accept was served with a 2 s timeout: {got:?}\n{}",
        broker.log()
    );
}

/// A renewed certificate (here: one from another CA, so the difference shows) is served
/// to new TLS connections after `systemctl reload`; the TLS client connected before the
/// reload keeps its session and still receives.
#[test]
fn a_renewed_certificate_is_served_after_reload_without_dropping_tls_clients() {
    if mosquitto_mode() {
        return;
    }
    let (old, new) = (
        Pki::new(&[("client", "sensor-1")]),
        Pki::new(&[("client", "sensor-1")]),
    );
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (
        live.path().join("server.pem"),
        live.path().join("server.key"),
    );
    std::fs::copy(old.path("server.pem"), &cert).unwrap();
    std::fs::copy(old.path("server.key"), &key).unwrap();
    let tls_port_held = reserve_port();
    let tls_port = tls_port_held.port();
    let config = format!(
        "[broker]\nlisteners = [{{ bind = \"127.0.0.1:{tls_port}\", tls = {{ cert = \"{}\", key = \"{}\" }} }}, {{ bind = \"127.0.0.1:0\" }}]",
        cert.display(),
        key.display()
    );
    let mut broker = Broker::outpost_with_full_config(&config);
    let port = tls_port.to_string();
    let pub_with = |ca: &Path, msg: &str| {
        mosquitto(
            "mosquitto_pub",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "--cafile",
                ca.to_str().unwrap(),
                "-t",
                "rot/t",
                "-m",
                msg,
                "-q",
                "1",
            ],
        )
    };
    // A subscriber over TLS with the old CA, connected across the reload.
    let sub = std::thread::spawn({
        let (port, ca) = (port.clone(), old.path("ca.pem"));
        move || {
            mosquitto(
                "mosquitto_sub",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "--cafile",
                    ca.to_str().unwrap(),
                    "-t",
                    "rot/t",
                    "-C",
                    "1",
                    "-W",
                    "9",
                    "-q",
                    "1",
                ],
            )
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !pub_with(&new.path("ca.pem"), "too early").status.success(),
        "the new CA was trusted before the certificate changed"
    );

    std::fs::copy(new.path("server.pem"), &cert).unwrap();
    std::fs::copy(new.path("server.key"), &key).unwrap();
    broker.reload_with(&config);
    assert!(
        broker.wait_for_log("TLS files read again", 1, WAIT),
        "{}",
        broker.log()
    );
    let renewed = pub_with(&new.path("ca.pem"), "renewed");
    assert!(
        renewed.status.success(),
        "the renewed certificate is not served: {}\n{}",
        String::from_utf8_lossy(&renewed.stderr),
        broker.log()
    );
    assert!(
        !pub_with(&old.path("ca.pem"), "stale").status.success(),
        "the old certificate is still served to new connections"
    );
    let got = sub.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "renewed",
        "the TLS client connected before the reload lost its session: {}",
        broker.log()
    );
}

/// mTLS names the user (`use_identity_as_username`, as Mosquitto's): a client with a
/// certificate the listener's CA signed logs in as its Common Name without a password,
/// whatever user name it sends, and that name's topic rules apply to it.
#[test]
fn the_client_certificate_names_the_user_on_an_identity_listener() {
    if mosquitto_mode() {
        return;
    }
    let pki = Pki::new(&[("client", "sensor-1")]);
    let tls_port_held = reserve_port();
    let tls_port = tls_port_held.port();
    let broker = Broker::outpost_with_full_config(&format!(
        r#"[broker]
allow_anonymous = true
listeners = [
  {{ bind = "127.0.0.1:0" }},
  {{ bind = "127.0.0.1:{tls_port}", use_identity_as_username = true, allow_anonymous = false,
     tls = {{ cert = "{}", key = "{}", client_ca = "{}" }},
     acl = [{{ user = "sensor-1", topic = "plant/%u/#", access = "write" }}] }},
]
"#,
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        pki.path("ca.pem").display()
    ));
    let sub = std::thread::spawn({
        let port = broker.port().to_string();
        move || {
            mosquitto(
                "mosquitto_sub",
                &["-p", &port, "-t", "#", "-v", "-W", "4", "-q", "1"],
            )
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    let port = tls_port.to_string();
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    for (topic, user) in [
        ("plant/sensor-1/t", None),
        ("plant/other/t", None),
        ("plant/sensor-1/u", Some("admin")),
    ] {
        let mut args = vec![
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-t",
            topic,
            "-m",
            topic,
            "-q",
            "1",
        ];
        if let Some(u) = user {
            args.extend(["-u", u]);
        }
        let out = mosquitto("mosquitto_pub", &args);
        assert!(
            out.status.success(),
            "{topic}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            broker.log()
        );
    }
    let got = sub.join().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&got.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    // plant/other/t is outside sensor-1's rule: acknowledged (3.1.1) and not delivered.
    assert_eq!(
        lines,
        [
            "plant/sensor-1/t plant/sensor-1/t",
            "plant/sensor-1/u plant/sensor-1/u"
        ],
        "{}",
        broker.log()
    );
    let log = broker.log();
    assert!(log.contains("user=\"sensor-1\""), "{log}");
    assert!(
        !log.contains("user=\"admin\""),
        "the sent user name was used: {log}"
    );
}
