//! Codec tests: spec byte vectors, rejected inputs, and property tests.

mod errors;
mod properties;
mod roundtrip;
mod strategies;
mod vectors;

use bytes::BytesMut;

use crate::codec::{decode, encode, encoded_len};
use crate::error::DecodeError;
use crate::packet::{Packet, Protocol};

/// Decode exactly one packet that fills `bytes`.
fn decode_one(bytes: &[u8], protocol: Protocol) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, protocol, usize::MAX)?.expect("complete packet");
    assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    Ok(packet)
}

/// Encode `packet`, checking `encoded_len` agrees.
fn encode_vec(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, protocol, &mut buf).expect("encodes");
    assert_eq!(
        buf.len(),
        encoded_len(packet, protocol),
        "encoded_len of {packet:?}"
    );
    buf.to_vec()
}

/// Prefix a body with a fixed header (remaining length below 128).
fn framed(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![first, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A length-prefixed string field.
fn s(text: &str) -> Vec<u8> {
    let mut v = (text.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(text.as_bytes());
    v
}
