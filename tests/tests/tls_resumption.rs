//! TLS session resumption on the real binary's TLS listener: a rustls client that keeps a
//! session cache makes a full handshake once and resumed ones afterwards, on TLS 1.3
//! (stateless tickets), TLS 1.2 with tickets (RFC 5077) and TLS 1.2 with session IDs (the
//! broker's bounded cache). Each connection carries a real CONNECT/CONNACK exchange.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use outpost_mqtt::{Disconnect, Packet, Properties, Protocol, ReasonCode, codec};
use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::pki::Pki;
use outpost_tests::ports::reserve_port;
use outpost_tests::raw::connect_packet;
use rustls::client::{Resumption, Tls12Resumption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ProtocolVersion, StreamOwned};

const WAIT: Duration = Duration::from_secs(5);

fn tls_broker(pki: &Pki) -> (Broker, u16) {
    let port_held = reserve_port();
    let port = port_held.port();
    let broker = Broker::outpost_with_full_config(&format!(
        "[broker]\nlisteners = [{{ bind = \"127.0.0.1:{port}\", tls = {{ cert = \"{}\", key = \"{}\" }} }}, {{ bind = \"127.0.0.1:0\" }}]",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    ));
    (broker, port)
}

/// A client trusting the test CA, speaking only `version`, with `resumption`.
fn client(
    pki: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
    resumption: Resumption,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.resumption = resumption;
    Arc::new(config)
}

/// One TLS connection doing CONNECT, CONNACK (success) and DISCONNECT; returns how the
/// handshake went and the version spoken.
fn mqtt_session(
    config: &Arc<ClientConfig>,
    port: u16,
    client_id: &str,
) -> (HandshakeKind, ProtocolVersion) {
    let sock = TcpStream::connect(("127.0.0.1", port)).expect("connect to the TLS listener");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_write_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = StreamOwned::new(conn, sock);

    let mut out = BytesMut::new();
    let connect = Packet::Connect(Box::new(connect_packet(Protocol::V3_1_1, client_id, true)));
    codec::encode(&connect, Protocol::V3_1_1, &mut out).unwrap();
    tls.write_all(&out).expect("TLS handshake and CONNECT");
    assert!(!tls.conn.is_handshaking(), "handshake finished before data");
    let kind = tls
        .conn
        .handshake_kind()
        .expect("handshake kind after the handshake");
    let version = tls.conn.protocol_version().expect("negotiated version");

    // Read to the CONNACK: TLS 1.3 tickets arrive before it, so the cache holds them after.
    let mut rbuf = BytesMut::new();
    let started = Instant::now();
    let packet = loop {
        if let Some(p) = codec::decode(&mut rbuf, Protocol::V3_1_1, 1 << 20).unwrap() {
            break p;
        }
        assert!(started.elapsed() < WAIT, "no CONNACK within {WAIT:?}");
        let mut chunk = [0u8; 1024];
        let n = tls.read(&mut chunk).expect("reading the CONNACK");
        assert!(n > 0, "broker closed the TLS connection before CONNACK");
        rbuf.extend_from_slice(&chunk[..n]);
    };
    match packet {
        Packet::ConnAck(a) => assert!(!a.reason.is_error(), "CONNACK refused: {:?}", a.reason),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    out.clear();
    let disconnect = Packet::Disconnect(Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: Properties::default(),
    });
    codec::encode(&disconnect, Protocol::V3_1_1, &mut out).unwrap();
    let _ = tls.write_all(&out);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    (kind, version)
}

#[test]
fn tls13_client_resumes_with_a_ticket() {
    if mosquitto_mode() {
        return;
    }
    let pki = Pki::new(&[]);
    let (broker, port) = tls_broker(&pki);
    let config = client(
        &pki,
        &rustls::version::TLS13,
        Resumption::in_memory_sessions(8),
    );
    let first = mqtt_session(&config, port, "resume-13");
    assert_eq!(
        first,
        (HandshakeKind::Full, ProtocolVersion::TLSv1_3),
        "{}",
        broker.log()
    );
    for round in 0..3 {
        let again = mqtt_session(&config, port, "resume-13");
        assert_eq!(
            again,
            (HandshakeKind::Resumed, ProtocolVersion::TLSv1_3),
            "reconnection {round} did not resume\n{}",
            broker.log()
        );
    }
}

#[test]
fn tls12_client_resumes_with_a_ticket_and_with_a_session_id() {
    if mosquitto_mode() {
        return;
    }
    let pki = Pki::new(&[]);
    let (broker, port) = tls_broker(&pki);
    for (how, tls12) in [
        ("ticket", Tls12Resumption::SessionIdOrTickets),
        ("session ID", Tls12Resumption::SessionIdOnly),
    ] {
        let config = client(
            &pki,
            &rustls::version::TLS12,
            Resumption::in_memory_sessions(8).tls12_resumption(tls12),
        );
        let first = mqtt_session(&config, port, "resume-12");
        assert_eq!(
            first,
            (HandshakeKind::Full, ProtocolVersion::TLSv1_2),
            "{how}: {}",
            broker.log()
        );
        let again = mqtt_session(&config, port, "resume-12");
        assert_eq!(
            again,
            (HandshakeKind::Resumed, ProtocolVersion::TLSv1_2),
            "TLS 1.2 resumption by {how} failed\n{}",
            broker.log()
        );
    }
}

/// TLS 1.3 tickets are stateless: a returning client resumes however many other clients
/// came in between, where a server-side cache of tickets would have evicted its entry.
#[test]
fn tls13_ticket_survives_many_other_clients() {
    if mosquitto_mode() {
        return;
    }
    let pki = Pki::new(&[]);
    let (broker, port) = tls_broker(&pki);
    let returning = client(
        &pki,
        &rustls::version::TLS13,
        Resumption::in_memory_sessions(8),
    );
    assert_eq!(
        mqtt_session(&returning, port, "returning").0,
        HandshakeKind::Full
    );
    // Each full TLS 1.3 handshake is sent two tickets; with a stateful cache these would
    // need 2 × 300 entries, beyond the broker's cache of 512 sessions.
    let crowd = client(&pki, &rustls::version::TLS13, Resumption::disabled());
    for i in 0..300 {
        assert_eq!(
            mqtt_session(&crowd, port, &format!("crowd-{i}")).0,
            HandshakeKind::Full,
            "a client without a cache cannot resume"
        );
    }
    assert_eq!(
        mqtt_session(&returning, port, "returning").0,
        HandshakeKind::Resumed,
        "{}",
        broker.log()
    );
}
