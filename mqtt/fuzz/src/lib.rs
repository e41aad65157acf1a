//! Packets shared by the seed generator (`src/bin/make_seeds.rs`) and the fuzz targets:
//! small valid packets of every type, built with the crate's own encoder so the seeds
//! follow the codec when it changes.

use bytes::{Bytes, BytesMut};
use outpost_mqtt::{
    Auth, ConnAck, Connect, Disconnect, Packet, Properties, Protocol, PubResponse, Publish,
    QoS, ReasonCode, RetainHandling, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will,
};

/// Every protocol version, oldest first.
pub const PROTOCOLS: [Protocol; 3] = [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5];

/// Short name of a protocol version for file names.
pub fn tag(p: Protocol) -> &'static str {
    match p {
        Protocol::V3_1 => "v31",
        Protocol::V3_1_1 => "v311",
        Protocol::V5 => "v5",
    }
}

/// Encodes one packet; panics if the encoder refuses it (the seeds are valid).
pub fn wire(p: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut b = BytesMut::new();
    outpost_mqtt::encode(p, protocol, &mut b)
        .unwrap_or_else(|e| panic!("seed packet {p:?} does not encode for {protocol:?}: {e}"));
    b.to_vec()
}

fn props_if(v5: bool, f: impl FnOnce(&mut Properties)) -> Properties {
    let mut p = Properties::default();
    if v5 {
        f(&mut p);
    }
    p
}

/// The CONNECT variants the connection target can start a stream with; `variant` is
/// taken modulo [`CONNECT_VARIANTS`].
pub const CONNECT_VARIANTS: usize = 6;

/// A valid CONNECT: 0 plain clean, 1 persistent with keep alive, 2 with a will,
/// 3 with user name and password, 4 (5.0) topic aliases and session expiry,
/// 5 (5.0) small Maximum Packet Size and Request Problem Information 0.
pub fn connect(protocol: Protocol, variant: usize) -> Connect {
    let v5 = protocol.is_v5();
    let mut c = Connect {
        protocol,
        clean_start: true,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: format!("fz{variant}"),
        will: None,
        username: None,
        password: None,
    };
    match variant % CONNECT_VARIANTS {
        0 => {}
        1 => {
            c.clean_start = false;
            c.keep_alive = 30;
            c.properties = props_if(v5, |p| p.session_expiry_interval = Some(60));
        }
        2 => {
            c.will = Some(Will {
                topic: "w/t".into(),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: props_if(v5, |p| {
                    p.will_delay_interval = Some(1);
                    p.message_expiry_interval = Some(10);
                    p.content_type = Some("text/plain".into());
                }),
            });
        }
        3 => {
            c.username = Some("u".into());
            c.password = Some(Bytes::from_static(b"p"));
        }
        4 => {
            c.properties = props_if(v5, |p| {
                p.topic_alias_maximum = Some(4);
                p.session_expiry_interval = Some(0xFFFF_FFFF);
                p.receive_maximum = Some(2);
                p.user_properties.push(("k".into(), "v".into()));
            });
        }
        _ => {
            c.keep_alive = 1;
            c.properties = props_if(v5, |p| {
                p.maximum_packet_size = Some(64);
                p.request_problem_information = Some(0);
                p.request_response_information = Some(1);
            });
        }
    }
    c
}

fn publish(protocol: Protocol, qos: QoS, retain: bool, dup: bool, id: u16) -> Publish {
    let v5 = protocol.is_v5();
    Publish {
        dup,
        qos,
        retain,
        topic: "a/b".into(),
        packet_id: (qos != QoS::AtMostOnce).then_some(id),
        properties: Properties::default(),
        payload: Bytes::from_static(b"hi"),
    }
    .with_props(v5 && qos == QoS::ExactlyOnce)
}

trait WithProps {
    fn with_props(self, on: bool) -> Self;
}

impl WithProps for Publish {
    fn with_props(mut self, on: bool) -> Self {
        if on {
            self.properties.payload_format_indicator = Some(1);
            self.properties.message_expiry_interval = Some(30);
            self.properties.response_topic = Some("r/t".into());
            self.properties.correlation_data = Some(Bytes::from_static(b"\x01\x02"));
            self.properties.content_type = Some("c".into());
            self.properties.user_properties.push(("a".into(), "b".into()));
        }
        self
    }
}

fn subscribe(protocol: Protocol, id: u16, filters: &[(&str, QoS)]) -> Subscribe {
    let v5 = protocol.is_v5();
    Subscribe {
        packet_id: id,
        filters: filters
            .iter()
            .map(|&(f, qos)| SubscribeFilter {
                filter: f.into(),
                options: SubscriptionOptions {
                    qos,
                    no_local: v5 && f.starts_with('a'),
                    retain_as_published: v5,
                    retain_handling: if v5 {
                        RetainHandling::SendIfNew
                    } else {
                        RetainHandling::SendAtSubscribe
                    },
                },
            })
            .collect(),
        properties: props_if(v5, |p| p.subscription_identifiers.push(7)),
    }
}

/// One small valid packet of every type the protocol has, each with a name.
pub fn every_packet(protocol: Protocol) -> Vec<(&'static str, Packet)> {
    let v5 = protocol.is_v5();
    let mut out = Vec::new();
    for (i, name) in [
        "connect_clean",
        "connect_persistent",
        "connect_will",
        "connect_auth",
        "connect_props",
        "connect_limits",
    ]
    .into_iter()
    .enumerate()
    {
        out.push((name, Packet::Connect(Box::new(connect(protocol, i)))));
    }
    out.push((
        "connack",
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason: ReasonCode::SUCCESS,
            properties: props_if(v5, |p| {
                p.assigned_client_identifier = Some("id".into());
                p.server_keep_alive = Some(60);
                p.topic_alias_maximum = Some(10);
                p.receive_maximum = Some(20);
                p.maximum_qos = Some(1);
                p.retain_available = Some(1);
                p.maximum_packet_size = Some(1 << 20);
                p.wildcard_subscription_available = Some(1);
                p.subscription_identifier_available = Some(1);
                p.shared_subscription_available = Some(1);
                p.response_information = Some("ri".into());
                p.server_reference = Some("sr".into());
                p.authentication_method = Some("m".into());
                p.authentication_data = Some(Bytes::from_static(b"d"));
            }),
        }),
    ));
    out.push((
        "connack_refused",
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::NOT_AUTHORIZED,
            properties: props_if(v5, |p| p.reason_string = Some("no".into())),
        }),
    ));
    out.push(("publish_q0", Packet::Publish(publish(protocol, QoS::AtMostOnce, false, false, 0))));
    out.push(("publish_q1_retain", Packet::Publish(publish(protocol, QoS::AtLeastOnce, true, false, 1))));
    out.push(("publish_q2_dup", Packet::Publish(publish(protocol, QoS::ExactlyOnce, false, true, 2))));
    if v5 {
        let mut p = publish(protocol, QoS::AtLeastOnce, false, false, 3);
        p.properties.topic_alias = Some(1);
        out.push(("publish_alias_set", Packet::Publish(p.clone())));
        p.topic = "".into();
        p.packet_id = Some(4);
        out.push(("publish_alias_use", Packet::Publish(p)));
    }
    let resp = |id: u16, reason: ReasonCode| PubResponse {
        packet_id: id,
        reason: if v5 { reason } else { ReasonCode::SUCCESS },
        properties: props_if(v5, |p| p.reason_string = Some("r".into())),
    };
    out.push(("puback", Packet::PubAck(PubResponse::new(1))));
    out.push(("puback_reason", Packet::PubAck(resp(1, ReasonCode::NO_MATCHING_SUBSCRIBERS))));
    out.push(("pubrec", Packet::PubRec(PubResponse::new(2))));
    out.push(("pubrel", Packet::PubRel(PubResponse::new(2))));
    out.push(("pubrel_reason", Packet::PubRel(resp(2, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND))));
    out.push(("pubcomp", Packet::PubComp(PubResponse::new(2))));
    out.push((
        "subscribe",
        Packet::Subscribe(subscribe(
            protocol,
            5,
            &[("a/b", QoS::AtMostOnce), ("a/+/c", QoS::AtLeastOnce), ("#", QoS::ExactlyOnce)],
        )),
    ));
    out.push((
        "subscribe_shared",
        Packet::Subscribe(subscribe(protocol, 6, &[("$share/g/a/#", QoS::AtLeastOnce), ("$SYS/#", QoS::AtMostOnce)])),
    ));
    out.push((
        "suback",
        Packet::SubAck(SubAck {
            packet_id: 5,
            reason_codes: vec![
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::GRANTED_QOS_2,
                ReasonCode::UNSPECIFIED_ERROR,
            ],
            properties: Properties::default(),
        }),
    ));
    out.push((
        "unsubscribe",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 7,
            filters: vec!["a/b".into(), "#".into()],
            properties: props_if(v5, |p| p.user_properties.push(("x".into(), "y".into()))),
        }),
    ));
    out.push((
        "unsuback",
        Packet::UnsubAck(UnsubAck {
            packet_id: 7,
            reason_codes: if v5 {
                vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            } else {
                Vec::new()
            },
            properties: Properties::default(),
        }),
    ));
    out.push(("pingreq", Packet::PingReq));
    out.push(("pingresp", Packet::PingResp));
    out.push((
        "disconnect",
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        }),
    ));
    if v5 {
        out.push((
            "disconnect_will",
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
                properties: props_if(v5, |p| {
                    p.session_expiry_interval = Some(0);
                    p.reason_string = Some("bye".into());
                }),
            }),
        ));
        out.push((
            "auth",
            Packet::Auth(Auth {
                reason: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: props_if(v5, |p| {
                    p.authentication_method = Some("SCRAM".into());
                    p.authentication_data = Some(Bytes::from_static(b"abc"));
                }),
            }),
        ));
    }
    out
}

/// What a client sends after its CONNECT in a typical session, for the connection
/// target's seeds: subscribe, publish at every QoS (to itself), the QoS 2 exchange,
/// aliases (5.0), ping, unsubscribe, disconnect.
pub fn session_stream(protocol: Protocol) -> Vec<u8> {
    let v5 = protocol.is_v5();
    let mut packets = vec![
        Packet::Subscribe(subscribe(protocol, 1, &[("a/#", QoS::ExactlyOnce), ("$share/g/a/b", QoS::AtLeastOnce)])),
        Packet::Publish(publish(protocol, QoS::AtMostOnce, false, false, 0)),
        Packet::Publish(publish(protocol, QoS::AtLeastOnce, true, false, 1)),
        Packet::Publish(publish(protocol, QoS::ExactlyOnce, false, false, 2)),
        Packet::PubRel(PubResponse::new(2)),
        Packet::PubAck(PubResponse::new(1)),
        Packet::PubRec(PubResponse::new(2)),
        Packet::PubComp(PubResponse::new(2)),
    ];
    if v5 {
        let mut p = publish(protocol, QoS::AtLeastOnce, false, false, 3);
        p.properties.topic_alias = Some(1);
        packets.push(Packet::Publish(p.clone()));
        p.topic = "".into();
        p.packet_id = Some(4);
        packets.push(Packet::Publish(p));
    }
    packets.push(Packet::PingReq);
    packets.push(Packet::Unsubscribe(Unsubscribe {
        packet_id: 9,
        filters: vec!["a/#".into()],
        properties: Properties::default(),
    }));
    packets.push(Packet::Disconnect(Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: Properties::default(),
    }));
    packets.iter().flat_map(|p| wire(p, protocol)).collect()
}
