//! Property tests: round trips, arbitrary input, split streams, bounded allocation.

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

use super::strategies::{PROTOCOLS, normalise, packet, protocol};
use crate::codec::{decode, encode, encoded_len};
use crate::packet::{Packet, Protocol};

fn packet_for_protocol() -> impl Strategy<Value = (Protocol, Packet)> {
    protocol().prop_flat_map(|p| (Just(p), packet(p)))
}

fn stream_for_protocol() -> impl Strategy<Value = (Protocol, Vec<Packet>)> {
    protocol().prop_flat_map(|p| (Just(p), vec(packet(p), 1..5)))
}

/// Decode every complete packet in `buf`, failing the test on a decode error.
fn drain(buf: &mut BytesMut, protocol: Protocol, out: &mut Vec<Packet>) {
    while let Some(p) = decode(buf, protocol, usize::MAX).expect("valid stream decodes") {
        out.push(p);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decode_of_encode_is_identity((protocol, packet) in packet_for_protocol()) {
        let mut buf = BytesMut::new();
        encode(&packet, protocol, &mut buf).expect("valid packet encodes");
        prop_assert_eq!(buf.len(), encoded_len(&packet, protocol));
        let decoded = decode(&mut buf, protocol, usize::MAX).expect("decodes").expect("complete");
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, normalise(&packet, protocol));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..300)) {
        for protocol in PROTOCOLS {
            let mut buf = BytesMut::from(&bytes[..]);
            let capacity = buf.capacity();
            for _ in 0..bytes.len() + 1 {
                match decode(&mut buf, protocol, 1 << 16) {
                    Ok(Some(p)) => {
                        // Whatever decodes must encode again, to the same packet.
                        let mut again = BytesMut::new();
                        encode(&p, protocol, &mut again).expect("decoded packet encodes");
                        let back = decode(&mut again, protocol, usize::MAX).unwrap().unwrap();
                        prop_assert_eq!(back, p);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            // The decoder never grows the caller's buffer.
            prop_assert!(buf.capacity() <= capacity);
        }
    }

    // Bytes that start like a real packet reach deeper into the decoders than noise does.
    #[test]
    fn mutated_packets_never_panic((protocol, packet) in packet_for_protocol(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut buf = BytesMut::new();
        encode(&packet, protocol, &mut buf).unwrap();
        for (at, byte) in flips {
            let i = at.index(buf.len());
            buf[i] = byte;
        }
        if let Ok(Some(p)) = decode(&mut buf, protocol, usize::MAX) {
            let mut again = BytesMut::new();
            encode(&p, protocol, &mut again).expect("decoded packet encodes");
            prop_assert_eq!(decode(&mut again, protocol, usize::MAX).unwrap().unwrap(), p);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn stream_split_at_every_point_gives_the_same_packets((protocol, packets) in stream_for_protocol()) {
        let mut wire = BytesMut::new();
        for p in &packets {
            encode(p, protocol, &mut wire).unwrap();
        }
        let expected: Vec<Packet> = packets.iter().map(|p| normalise(p, protocol)).collect();
        for split in 0..=wire.len() {
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            drain(&mut buf, protocol, &mut got);
            buf.extend_from_slice(&wire[split..]);
            drain(&mut buf, protocol, &mut got);
            prop_assert!(buf.is_empty());
            prop_assert_eq!(&got, &expected, "split at {}", split);
        }
    }
}

// A length from the wire is never trusted: announcing up to 256 MiB with a few bytes in
// hand neither allocates nor reserves; the decoder waits or refuses.
#[test]
fn huge_announced_lengths_do_not_reserve() {
    for first in [0x10u8, 0x30, 0x82, 0x90, 0xA2] {
        let mut buf = BytesMut::from(&[first, 0xFF, 0xFF, 0xFF, 0x7F, 0, 4][..]);
        let capacity = buf.capacity();
        assert_eq!(decode(&mut buf, Protocol::V5, usize::MAX), Ok(None));
        assert_eq!(buf.capacity(), capacity);
        assert_eq!(buf.len(), 7);
        assert!(decode(&mut buf, Protocol::V5, 1 << 20).is_err());
    }
}

// Strings announcing 65,535 bytes inside a short packet fail as truncated.
#[test]
fn huge_inner_lengths_are_truncated() {
    let cases: [&[u8]; 4] = [
        &[0x30, 3, 0xFF, 0xFF, b'a'],
        &[0x10, 6, 0, 4, b'M', b'Q', b'T', b'T'],
        &[0x82, 6, 0, 1, 0, 0xFF, 0xFF, 0],
        &[0x30, 5, 0, 1, b't', 0xFF, 0x7F],
    ];
    for bytes in cases {
        let mut buf = BytesMut::from(bytes);
        let e = decode(&mut buf, Protocol::V5, usize::MAX).unwrap_err();
        assert_eq!(e, crate::error::DecodeError::Truncated, "{bytes:?}");
    }
}
