//! Regenerates the committed seed corpora from the crate's own encoder:
//!
//! ```sh
//! cd mqtt/fuzz && cargo +nightly run --bin make_seeds
//! ```
//!
//! - `seeds/decode/`: one small valid packet of every type for 3.1, 3.1.1 and 5.0, a
//!   whole session per version, and edge cases (varint boundaries, the largest remaining
//!   length, properties).
//! - `seeds/connection/`: inputs of the `connection` target (see its header): a CONNECT
//!   variant selector, a chunk size, then what a client sends in a session.

use std::fs;
use std::path::Path;

use bytes::Bytes;
use outpost_mqtt::{Packet, Properties, Protocol, Publish, QoS};
use outpost_mqtt_fuzz::{
    CONNECT_VARIANTS, PROTOCOLS, connect, every_packet, session_stream, tag, wire,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(format!("{name}.bin")), bytes).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let decode = root.join("decode");
    let connection = root.join("connection");
    for dir in [&decode, &connection] {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).expect("create seed dir");
    }

    for protocol in PROTOCOLS {
        let t = tag(protocol);
        for (name, packet) in every_packet(protocol) {
            write(&decode, &format!("{t}_{name}"), &wire(&packet, protocol));
        }
        let mut session = wire(&Packet::Connect(Box::new(connect(protocol, 0))), protocol);
        session.extend(session_stream(protocol));
        write(&decode, &format!("{t}_session"), &session);
    }

    // Varint edges of the fixed header (section 1.5.5): the largest remaining length a
    // packet may announce (268,435,455, truncated here), a five-byte varint (malformed),
    // and a non-minimal encoding of 0.
    write(&decode, "edge_max_remaining_len", &[0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x03, b'a', b'/', b'b']);
    write(&decode, "edge_varint_5_bytes", &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
    write(&decode, "edge_varint_non_minimal", &[0xC0, 0x80, 0x00]);
    write(&decode, "edge_reserved_type_0", &[0x00, 0x00]);
    write(&decode, "edge_reserved_type_15", &[0xF0, 0x00]);
    write(&decode, "edge_bad_flags_subscribe", &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x00]);
    write(&decode, "edge_connect_bad_name", &[0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'X', 0x04, 0x02, 0x00, 0x00, 0x00, 0x00]);
    write(&decode, "edge_connect_level_6", &[0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x00, 0x00, 0x00]);

    // Remaining lengths across the one/two/three-byte varint boundaries (127/128,
    // 16,383/16,384), and a property length of two bytes, in 5.0 so properties count.
    let publish = |payload_len: usize, user_props: usize| {
        let mut properties = Properties::default();
        for i in 0..user_props {
            properties.user_properties.push((format!("k{i:02}"), "vvvv".into()));
        }
        properties.subscription_identifiers = vec![1, 268_435_455];
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t".into(),
            packet_id: Some(0xFFFF),
            properties,
            payload: Bytes::from(vec![b'x'; payload_len]),
        })
    };
    let remaining = |p: &Packet| {
        let n = outpost_mqtt::encoded_len(p, Protocol::V5);
        // Fixed header: one type byte and the remaining length's varint.
        n - 1 - if n - 1 <= 128 { 1 } else if n - 1 <= 16_385 { 2 } else { 3 }
    };
    let overhead = remaining(&publish(0, 0));
    for target in [127usize, 128, 16_383, 16_384] {
        let p = publish(target - overhead, 0);
        assert_eq!(remaining(&p), target);
        write(&decode, &format!("edge_v5_remaining_len_{target}"), &wire(&p, Protocol::V5));
    }
    write(&decode, "edge_v5_props_len_2_bytes", &wire(&publish(0, 13), Protocol::V5));

    // The connection target: byte 0 picks the CONNECT (0 mod 4: none, the stream
    // carries its own), byte 1 the chunk size (0: one write).
    for (pi, protocol) in PROTOCOLS.into_iter().enumerate() {
        let t = tag(protocol);
        for variant in 0..CONNECT_VARIANTS {
            let mut input = vec![(pi as u8 + 1) | ((variant as u8) << 2), 0];
            input.extend(session_stream(protocol));
            write(&connection, &format!("{t}_variant{variant}"), &input);
        }
        let mut raw = vec![0u8, 1];
        raw.extend(wire(&Packet::Connect(Box::new(connect(protocol, 2))), protocol));
        raw.extend(session_stream(protocol));
        write(&connection, &format!("{t}_raw_bytewise"), &raw);
    }
}
