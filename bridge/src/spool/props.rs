//! Compact binary form of the 5.0 PUBLISH properties worth carrying across the spool.
//!
//! Only properties that belong to the application message are kept (payload format,
//! expiry, content type, response topic, correlation data, user properties); topic alias
//! and subscription identifiers are per-connection and never forwarded.

use bytes::Bytes;
use outpost_mqtt::Properties;

const PAYLOAD_FORMAT: u8 = 0x01;
const EXPIRY: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION: u8 = 0x09;
const USER: u8 = 0x26;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Encode the forwardable subset; `None` when there is nothing to keep.
pub fn encode(p: &Properties) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(v) = p.payload_format_indicator {
        out.extend_from_slice(&[PAYLOAD_FORMAT, v]);
    }
    if let Some(v) = p.message_expiry_interval {
        out.push(EXPIRY);
        out.extend_from_slice(&v.to_be_bytes());
    }
    if let Some(v) = &p.content_type {
        out.push(CONTENT_TYPE);
        put_bytes(&mut out, v.as_bytes());
    }
    if let Some(v) = &p.response_topic {
        out.push(RESPONSE_TOPIC);
        put_bytes(&mut out, v.as_bytes());
    }
    if let Some(v) = &p.correlation_data {
        out.push(CORRELATION);
        put_bytes(&mut out, v);
    }
    for (k, v) in &p.user_properties {
        out.push(USER);
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    (!out.is_empty()).then_some(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// Decode what [`encode`] wrote; `None` for bytes it did not write (a damaged row).
pub fn decode(buf: &[u8]) -> Option<Properties> {
    let mut p = Properties::default();
    let mut r = Reader(buf);
    while let Some(tag) = r.u8() {
        match tag {
            PAYLOAD_FORMAT => p.payload_format_indicator = Some(r.u8()?),
            EXPIRY => p.message_expiry_interval = Some(r.u32()?),
            CONTENT_TYPE => p.content_type = Some(r.string()?),
            RESPONSE_TOPIC => p.response_topic = Some(r.string()?),
            CORRELATION => p.correlation_data = Some(Bytes::copy_from_slice(r.bytes()?)),
            USER => {
                let k = r.string()?;
                let v = r.string()?;
                p.user_properties.push((k, v));
            }
            _ => return None,
        }
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_message_properties_only() {
        let p = Properties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(3600),
            content_type: Some("application/json".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            topic_alias: Some(3),
            subscription_identifiers: vec![7],
            ..Properties::default()
        };
        let back = decode(&encode(&p).unwrap()).unwrap();
        let expected = Properties {
            topic_alias: None,
            subscription_identifiers: vec![],
            ..p
        };
        assert_eq!(back, expected);
        assert!(encode(&Properties::default()).is_none());
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64u8 {
            let junk: Vec<u8> = (0..len)
                .map(|i| i.wrapping_mul(37).wrapping_add(len))
                .collect();
            let _ = decode(&junk);
        }
        assert!(decode(&[CONTENT_TYPE, 0, 0, 0, 9, b'a']).is_none());
    }
}
