//! Decode arbitrary bytes as every protocol version: no panic, and every packet that
//! decodes encodes again (with `encoded_len` exact) and decodes back to itself.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outpost_mqtt::Protocol;
use outpost_mqtt::codec::{decode, encode, encoded_len};

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5] {
        let mut buf = BytesMut::from(data);
        // Each decoded packet consumes at least two bytes, so this ends.
        while let Ok(Some(packet)) = decode(&mut buf, protocol, 1 << 20) {
            let mut wire = BytesMut::new();
            encode(&packet, protocol, &mut wire).expect("a decoded packet encodes");
            assert_eq!(wire.len(), encoded_len(&packet, protocol));
            let again = decode(&mut wire, protocol, usize::MAX)
                .expect("re-encoded packet decodes")
                .expect("re-encoded packet is complete");
            assert_eq!(again, packet);
            assert!(wire.is_empty());
        }
    }
});
