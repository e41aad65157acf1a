//! One client connection through the whole broker, without a socket: a fresh broker
//! core (`Broker::start`, no store, no sinks) and a connection task
//! (`Broker::serve_stream`, the path the TLS and WebSocket listeners take after their
//! handshake) on one end of an in-memory duplex stream, arbitrary bytes written into the
//! other end. That runs the handshake (CONNECT first, authentication), the
//! per-connection state machine (`broker/src/net/connection/state.rs`: decoding, topic
//! aliases, Receive Maximum, ack ordering, Maximum Packet Size on the way out) and the
//! core's handling of what it forwards (sessions, subscriptions, routing back to the same
//! client, retained messages, wills, close).
//!
//! It must not panic, and the connection must end once the client has sent everything
//! and closed its side (within an hour of the paused clock, which covers the connect
//! timeout, keep alive and the linger after close).
//!
//! Input: byte 0 picks what goes first: `b0 % 4 == 0` nothing (the bytes carry their
//! own CONNECT), else a valid CONNECT of protocol `b0 % 4 - 1` (3.1, 3.1.1, 5.0) and
//! variant `(b0 >> 2) % CONNECT_VARIANTS` (see `src/lib.rs`). Byte 1 is the size of each
//! write (0: all at once). The rest is what the client sends.

#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use outpost_gateway::broker::{Broker, Settings};
use outpost_gateway::config::BrokerConfig;
use outpost_mqtt::Packet;
use outpost_mqtt_fuzz::{PROTOCOLS, connect, wire};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long (on the paused clock) a connection may take to end after the client closed.
const BOUND: Duration = Duration::from_secs(3600);

fn settings() -> Settings {
    let mut s = Settings::from_config(&BrokerConfig::default());
    s.allow_anonymous = true;
    // No `$SYS` timer: it would keep the paused clock busy for nothing.
    s.sys_interval = Duration::ZERO;
    // Small limits, so the fuzzer reaches them.
    s.max_packet_size = 4096;
    s.receive_maximum = 4;
    s.topic_alias_maximum = 4;
    s.max_inflight = 4;
    s.max_queued_messages = 8;
    s
}

fuzz_target!(|data: &[u8]| {
    let (head, rest) = data.split_at(data.len().min(2));
    let b0 = head.first().copied().unwrap_or(0);
    let chunk = head.get(1).copied().map_or(0, usize::from);
    let mut stream = Vec::with_capacity(rest.len() + 64);
    if b0 % 4 != 0 {
        let protocol = PROTOCOLS[usize::from(b0 % 4) - 1];
        let c = connect(protocol, usize::from(b0 >> 2));
        stream.extend(wire(&Packet::Connect(Box::new(c)), protocol));
    }
    stream.extend_from_slice(rest);
    let chunk = if chunk == 0 {
        stream.len().max(1)
    } else {
        chunk
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let settings = settings();
        let broker = Broker::start(settings.clone(), Vec::new(), None);
        let handle = broker.handle();
        let (client, server) = tokio::io::duplex(16 * 1024);
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 40000));
        let connect_by = Instant::now() + settings.connect_timeout;
        let conn =
            tokio::spawn(broker.serve_stream(server, peer, Arc::new(settings), connect_by, None));
        let (mut rd, mut wr) = tokio::io::split(client);
        // Read everything the broker sends, so it never blocks on a full pipe.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let writer = async {
            for part in stream.chunks(chunk) {
                if wr.write_all(part).await.is_err() {
                    return;
                }
                // Let the connection and the core run between writes.
                tokio::task::yield_now().await;
            }
            let _ = wr.shutdown().await;
        };
        let _ = tokio::time::timeout(BOUND, writer).await;
        match tokio::time::timeout(BOUND, conn).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            Err(_) => panic!("the connection did not end within {BOUND:?} after the client closed"),
        }
        handle.shutdown().await;
        reader.abort();
    });
});
