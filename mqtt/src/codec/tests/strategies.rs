//! Proptest generators of packets that are valid for a given protocol version, and the
//! normalisation that says what a 3.x round trip keeps.

use bytes::Bytes;
use bytestring::ByteString;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;
use proptest::sample::select;

use crate::codec::{connack_reason, connack_return_code, suback_return_code};
use crate::packet::*;
use crate::properties::Properties;
use crate::reason::ReasonCode;

pub(super) const PROTOCOLS: [Protocol; 3] = [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5];

pub(super) fn protocol() -> impl Strategy<Value = Protocol> {
    select(PROTOCOLS.to_vec())
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 /+#$é€😀]{0,12}"
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..16).prop_map(Bytes::from)
}

pub(super) fn topic_name() -> impl Strategy<Value = String> {
    "[$]?[a-z0-9é]{0,4}(/[a-zA-Z0-9 é]{0,4}){0,4}".prop_filter("non-empty", |t| !t.is_empty())
}

pub(super) fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_owned()), "[a-z0-9]{0,4}"];
    (of("[a-z]{1,4}"), vec(level, 1..5), any::<bool>()).prop_map(|(share, levels, hash)| {
        let mut f = levels.join("/");
        if hash {
            f.push_str("/#");
        }
        if f.is_empty() {
            f.push('x');
        }
        match share {
            Some(group) => format!("$share/{group}/{f}"),
            None => f,
        }
    })
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    of(0u8..=1)
}

fn non_zero_u16() -> impl Strategy<Value = Option<u16>> {
    of(1u16..)
}

/// Every property with a valid value; [`keep`] trims it to what a packet may carry.
fn all_properties() -> impl Strategy<Value = Properties> {
    let a = (
        flag(),
        of(any::<u32>()),
        of(text()),
        of(topic_name()),
        of(binary()),
        vec(1u32..=268_435_455, 0..3),
    );
    let b = (
        of(any::<u32>()),
        of(text()),
        of(any::<u16>()),
        of(text()),
        of(binary()),
        flag(),
        of(any::<u32>()),
    );
    let c = (
        flag(),
        of(text()),
        of(text()),
        of(text()),
        non_zero_u16(),
        of(any::<u16>()),
        non_zero_u16(),
    );
    let d = (
        flag(),
        flag(),
        vec((text(), text()), 0..3),
        of(1u32..),
        flag(),
        flag(),
        flag(),
    );
    (a, b, c, d).prop_map(|(a, b, c, d)| Properties {
        payload_format_indicator: a.0,
        message_expiry_interval: a.1,
        content_type: a.2,
        response_topic: a.3,
        correlation_data: a.4,
        subscription_identifiers: a.5,
        session_expiry_interval: b.0,
        assigned_client_identifier: b.1,
        server_keep_alive: b.2,
        authentication_method: b.3,
        authentication_data: b.4,
        request_problem_information: b.5,
        will_delay_interval: b.6,
        request_response_information: c.0,
        response_information: c.1,
        server_reference: c.2,
        reason_string: c.3,
        receive_maximum: c.4,
        topic_alias_maximum: c.5,
        topic_alias: c.6,
        maximum_qos: d.0,
        retain_available: d.1,
        user_properties: d.2,
        maximum_packet_size: d.3,
        wildcard_subscription_available: d.4,
        subscription_identifier_available: d.5,
        shared_subscription_available: d.6,
    })
}

macro_rules! clear_unless {
    ($p:ident, $ids:ident, $( $id:literal => $field:ident ),* $(,)?) => {
        $( if !$ids.contains(&$id) { $p.$field = Default::default(); } )*
    };
}

/// Clear every property whose identifier is not in `ids` (table 2-4 of the 5.0 spec).
fn keep(mut p: Properties, ids: &[u8]) -> Properties {
    clear_unless!(p, ids,
        0x01 => payload_format_indicator, 0x02 => message_expiry_interval, 0x03 => content_type,
        0x08 => response_topic, 0x09 => correlation_data, 0x0B => subscription_identifiers,
        0x11 => session_expiry_interval, 0x12 => assigned_client_identifier,
        0x13 => server_keep_alive, 0x15 => authentication_method, 0x16 => authentication_data,
        0x17 => request_problem_information, 0x18 => will_delay_interval,
        0x19 => request_response_information, 0x1A => response_information,
        0x1C => server_reference, 0x1F => reason_string, 0x21 => receive_maximum,
        0x22 => topic_alias_maximum, 0x23 => topic_alias, 0x24 => maximum_qos,
        0x25 => retain_available, 0x26 => user_properties, 0x27 => maximum_packet_size,
        0x28 => wildcard_subscription_available, 0x29 => subscription_identifier_available,
        0x2A => shared_subscription_available,
    );
    p
}

fn props(ids: &'static [u8]) -> impl Strategy<Value = Properties> {
    prop_oneof![
        Just(Properties::default()),
        all_properties().prop_map(move |p| keep(p, ids))
    ]
}

const CONNECT_IDS: &[u8] = &[0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27];
const CONNACK_IDS: &[u8] = &[
    0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29,
    0x2A,
];
const PUBLISH_IDS: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26];
const WILL_IDS: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26];
const ACK_IDS: &[u8] = &[0x1F, 0x26];
const USER_IDS: &[u8] = &[0x26];
const SUBSCRIBE_IDS: &[u8] = &[0x0B, 0x26];
const DISCONNECT_IDS: &[u8] = &[0x11, 0x1C, 0x1F, 0x26];
const AUTH_IDS: &[u8] = &[0x15, 0x16, 0x1F, 0x26];

fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn reason(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    select(codes).prop_map(ReasonCode)
}

const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

fn will() -> impl Strategy<Value = Will> {
    (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        props(WILL_IDS),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic: ByteString::from(topic),
            payload,
            qos,
            retain,
            properties,
        })
}

fn connect(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let head = (any::<bool>(), any::<u16>(), props(CONNECT_IDS), text());
    (head, of(will()), of(text()), of(binary())).prop_map(
        move |((clean, ka, properties, id), will, user, pass)| {
            // MQTT-3.1.2-22: 3.1.1 forbids a password without a user name.
            let pass = if protocol == Protocol::V3_1_1 && user.is_none() {
                None
            } else {
                pass
            };
            Packet::Connect(Box::new(Connect {
                protocol,
                clean_start: clean,
                keep_alive: ka,
                properties,
                client_id: id,
                will,
                username: user,
                password: pass,
            }))
        },
    )
}

fn publish(protocol: Protocol) -> impl Strategy<Value = Publish> {
    // An empty topic standing for a topic alias only exists in 5.0.
    let alias_only = any::<bool>().prop_map(move |b| b && protocol.is_v5());
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        1u16..,
        props(PUBLISH_IDS),
        binary(),
        alias_only,
    )
        .prop_map(
            |(dup, qos, retain, topic, id, properties, payload, alias_only)| {
                let topic = if alias_only && properties.topic_alias.is_some() {
                    String::new()
                } else {
                    topic
                };
                Publish {
                    dup,
                    qos,
                    retain,
                    topic: ByteString::from(topic),
                    packet_id: Some(id),
                    properties,
                    payload,
                }
            },
        )
}

fn response(codes: &'static [u8]) -> impl Strategy<Value = PubResponse> {
    (1u16.., reason(codes), props(ACK_IDS)).prop_map(|(packet_id, reason, properties)| {
        PubResponse {
            packet_id,
            reason,
            properties,
        }
    })
}

fn options() -> impl Strategy<Value = SubscriptionOptions> {
    let rh = select(vec![
        RetainHandling::SendAtSubscribe,
        RetainHandling::SendIfNew,
        RetainHandling::DoNotSend,
    ]);
    (qos(), any::<bool>(), any::<bool>(), rh).prop_map(
        |(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
            qos,
            no_local,
            retain_as_published,
            retain_handling,
        },
    )
}

fn subscribe() -> impl Strategy<Value = Packet> {
    let filter = (topic_filter(), options()).prop_map(|(filter, mut options)| {
        // 5.0 MQTT-3.8.3-4: no No Local on shared subscriptions.
        if filter.starts_with("$share/") {
            options.no_local = false;
        }
        SubscribeFilter { filter, options }
    });
    (1u16.., vec(filter, 1..4), props(SUBSCRIBE_IDS)).prop_map(
        |(packet_id, filters, mut properties)| {
            properties.subscription_identifiers.truncate(1);
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        },
    )
}

/// Any packet that is valid for `protocol`.
pub(super) fn packet(protocol: Protocol) -> BoxedStrategy<Packet> {
    let mut options: Vec<BoxedStrategy<Packet>> = vec![
        connect(protocol).boxed(),
        (any::<bool>(), reason(CONNACK_CODES), props(CONNACK_IDS))
            .prop_map(|(session_present, reason, properties)| {
                Packet::ConnAck(ConnAck {
                    session_present,
                    reason,
                    properties,
                })
            })
            .boxed(),
        publish(protocol).prop_map(Packet::Publish).boxed(),
        response(PUBACK_CODES).prop_map(Packet::PubAck).boxed(),
        response(PUBACK_CODES).prop_map(Packet::PubRec).boxed(),
        response(PUBREL_CODES).prop_map(Packet::PubRel).boxed(),
        response(PUBREL_CODES).prop_map(Packet::PubComp).boxed(),
        subscribe().boxed(),
        (1u16.., vec(reason(SUBACK_CODES), 1..4), props(ACK_IDS))
            .prop_map(|(packet_id, reason_codes, properties)| {
                Packet::SubAck(SubAck {
                    packet_id,
                    reason_codes,
                    properties,
                })
            })
            .boxed(),
        (1u16.., vec(topic_filter(), 1..4), props(USER_IDS))
            .prop_map(|(packet_id, filters, properties)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    filters,
                    properties,
                })
            })
            .boxed(),
        (1u16.., vec(reason(UNSUBACK_CODES), 1..4), props(ACK_IDS))
            .prop_map(|(packet_id, reason_codes, properties)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    reason_codes,
                    properties,
                })
            })
            .boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        (reason(DISCONNECT_CODES), props(DISCONNECT_IDS))
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
            .boxed(),
    ];
    if protocol.is_v5() {
        options.push(
            (reason(AUTH_CODES), props(AUTH_IDS))
                .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options).boxed()
}

/// What a packet looks like after a trip through the wire in `protocol`.
pub(super) fn normalise(packet: &Packet, protocol: Protocol) -> Packet {
    let mut p = packet.clone();
    let v5 = protocol.is_v5();
    let none = Properties::default;
    match &mut p {
        Packet::Connect(c) if !c.protocol.is_v5() => {
            c.properties = none();
            if let Some(w) = &mut c.will {
                w.properties = none();
            }
        }
        Packet::ConnAck(c) if !v5 => {
            c.reason = connack_reason(connack_return_code(c.reason)).expect("mapped code is 0..=5");
            c.session_present &= c.reason == ReasonCode::SUCCESS && protocol != Protocol::V3_1;
            c.properties = none();
        }
        Packet::ConnAck(c) => c.session_present &= !c.reason.is_error(),
        Packet::Publish(publish) => {
            if publish.qos == QoS::AtMostOnce {
                publish.dup = false;
                publish.packet_id = None;
            }
            if !v5 {
                publish.properties = none();
            }
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) if !v5 => {
            *r = PubResponse::new(r.packet_id);
        }
        Packet::Subscribe(s) if !v5 => {
            s.properties = none();
            for f in &mut s.filters {
                f.options = SubscriptionOptions {
                    qos: f.options.qos,
                    ..Default::default()
                };
            }
        }
        Packet::SubAck(s) if !v5 => {
            s.properties = none();
            for r in &mut s.reason_codes {
                *r = ReasonCode(suback_return_code(*r));
            }
        }
        Packet::Unsubscribe(u) if !v5 => u.properties = none(),
        Packet::UnsubAck(u) if !v5 => {
            u.properties = none();
            u.reason_codes.clear();
        }
        Packet::Disconnect(d) if !v5 => {
            d.reason = ReasonCode::NORMAL_DISCONNECTION;
            d.properties = none();
        }
        _ => {}
    }
    p
}
