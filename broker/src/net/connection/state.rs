//! A connection's protocol state: what it checks on each packet from the client and
//! how it encodes what the core sends back. No I/O here; the driver moves the bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use bytestring::ByteString;
use futures_util::future::BoxFuture;
use outpost_mqtt::{Disconnect, Packet, Properties, Protocol, Publish, QoS, ReasonCode};
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, info};

use crate::events::CoreEvent;
use crate::events::CoreInbox;
use crate::message::Delivery;
use crate::net::ConnContext;
use crate::net::deadlines::Deadlines;
use crate::outbound::{Ack, AckKind, DurableResult, Outbound};
use crate::settings::Settings;
use crate::subscriptions::SessionKey;

/// Replies a client may be owed before its packets wait unread
/// ([`Conn::replies_backlogged`]). A 5.0 client is held to the broker's Receive Maximum
/// (at most 65,535) by an error; this bounds a 3.x client, which has none, and the
/// acknowledgements and SUBACKs of any client that wait for a commit. Large enough that a
/// client pipelining its publishes is not slowed while the commit window gathers them.
const REPLIES_BACKLOG: usize = 4096;

/// An acknowledgement waiting its turn.
enum PendingAck {
    Waiting {
        wait: BoxFuture<'static, DurableResult>,
        ack: Box<dyn FnOnce(DurableResult) -> Option<Ack> + Send>,
    },
    Ready(Ack),
    /// A SUBACK or UNSUBACK that waits for its subscription rows to be committed.
    Control {
        wait: BoxFuture<'static, DurableResult>,
        packet: Box<Packet>,
    },
}

/// Tables most connections never need (topic aliases, QoS 2 from the client),
/// allocated on first use so an idle client's task stays small.
#[derive(Default)]
struct Tables {
    /// Inbound topic aliases (5.0): alias -> topic.
    inbound: HashMap<u16, ByteString>,
    /// Outbound topic aliases (5.0): topic -> alias.
    outbound: HashMap<ByteString, u16>,
    /// QoS 2 packet ids between PUBLISH and PUBREL.
    pending_qos2: HashSet<u16>,
    /// Acknowledgements held back behind one that waits for durability (only with a
    /// bridge), so PUBACK/PUBREC leave in the order the PUBLISHes came.
    acks: VecDeque<PendingAck>,
    /// Deliveries held back behind a QoS 2 one that waits for its row to be committed,
    /// so messages still leave in the order the core routed them.
    held: VecDeque<HeldPublish>,
}

/// A delivery in the held line.
enum HeldPublish {
    Waiting {
        wait: BoxFuture<'static, DurableResult>,
        delivery: Delivery,
        packet_id: u16,
    },
    Ready {
        delivery: Delivery,
        packet_id: Option<u16>,
        dup: bool,
    },
}

/// How the read side ended.
pub(super) enum End {
    /// The client sent DISCONNECT.
    Graceful(Box<Disconnect>),
    /// Anything else: the will is due.
    Abnormal,
}

/// Where handling the buffered bytes stopped.
pub(super) enum Decoded {
    /// Every whole packet was handled.
    Done,
    /// The core's queue is full: this event waits for room, and decoding resumes after.
    Stalled(Box<CoreEvent>),
}

/// Per-connection protocol state.
pub(super) struct Conn {
    pub(super) protocol: Protocol,
    /// Whether the core accepted the CONNECT (and so must hear about the close).
    pub(super) accepted: bool,
    pub(super) session: SessionKey,
    pub(super) conn_id: crate::events::ConnId,
    /// Why the broker ended the connection, for the core's log line.
    pub(super) close_reason: Option<ReasonCode>,
    pub(super) core: CoreInbox,
    /// Its settings and the broker's deadlines, behind one pointer.
    ctx: Arc<ConnContext>,
    /// QoS 1 PUBLISHes received and not yet acknowledged.
    unacked_qos1: u32,
    tables: Option<Box<Tables>>,
    out_alias_max: u16,
    /// The client's Maximum Packet Size; 0 when it set none (0 is not a valid value).
    max_packet_size: u32,
    /// The client's Request Problem Information (5.0): false means no Reason String or
    /// User Property on anything but PUBLISH, CONNACK and DISCONNECT (MQTT-3.1.2-29).
    problem_info: bool,
    /// Set once DISCONNECT or a close was queued: flush, then end.
    pub(super) closing: bool,
    /// The client broke a rule: reading has stopped, and the core queues the DISCONNECT
    /// behind its replies to the packets before the offending one.
    pub(super) ending: bool,
    /// 5.0 CONNECT had Session Expiry 0: a DISCONNECT may not raise it (3.14.2.2.2).
    connect_expiry_zero: bool,
    /// This connection's key in the deadlines.
    pub(super) timer_id: u32,
    /// Key of the armed deadline in `Deadlines` (0 when none). Kept here rather than in
    /// the driver so that it is disarmed whenever the connection's state goes, running
    /// or parked.
    pub(super) deadline: u64,
    /// A test fault point was reached: abort once the write buffer is flushed
    /// (`broker::fault`).
    #[cfg(debug_assertions)]
    pub(super) abort_after_flush: std::cell::Cell<bool>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.ctx.deadlines.disarm(self.deadline);
    }
}

impl Conn {
    /// State for a client that sent `connect`; not yet accepted by the core.
    pub(super) fn new(
        connect: &outpost_mqtt::Connect,
        core: CoreInbox,
        ctx: Arc<ConnContext>,
    ) -> Conn {
        let timer_id = ctx.deadlines.id();
        Conn {
            protocol: connect.protocol,
            accepted: false,
            session: SessionKey::new(0, 0),
            conn_id: crate::events::ConnId::UNACCEPTED,
            close_reason: None,
            core,
            ctx,
            unacked_qos1: 0,
            tables: None,
            timer_id,
            deadline: 0,
            connect_expiry_zero: connect.protocol.is_v5()
                && connect.properties.session_expiry_interval.unwrap_or(0) == 0,
            out_alias_max: connect.properties.topic_alias_maximum.unwrap_or(0),
            max_packet_size: connect.properties.maximum_packet_size.unwrap_or(0),
            problem_info: connect.properties.request_problem_information != Some(0),
            closing: false,
            ending: false,
            #[cfg(debug_assertions)]
            abort_after_flush: std::cell::Cell::new(false),
        }
    }

    /// True once the connection is closing or ending: nothing more is read or timed out
    /// by keep alive, only written.
    pub(super) fn winding_down(&self) -> bool {
        self.closing || self.ending
    }

    /// The broker's settings.
    pub(super) fn settings(&self) -> &Settings {
        &self.ctx.settings
    }

    /// How long a started packet may take to arrive in full, in ms.
    pub(super) fn packet_timeout_ms(&self) -> u64 {
        u64::try_from(self.ctx.settings.packet_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// The broker's connection deadlines (keep alive, close grace).
    pub(super) fn deadlines(&self) -> &Arc<Deadlines> {
        &self.ctx.deadlines
    }

    /// Arms this connection's deadline at `at` (ms, `Deadlines` clock) for `waker`,
    /// replacing the one armed before.
    pub(super) fn arm(&mut self, at: u64, waker: &std::task::Waker) {
        self.deadline = self
            .ctx
            .deadlines
            .arm(self.timer_id, self.deadline, at, waker);
    }

    /// Forgets this connection's deadline.
    pub(super) fn disarm(&mut self) {
        self.ctx.deadlines.disarm(self.deadline);
        self.deadline = 0;
    }

    /// Decodes and handles every whole packet in `rbuf`, unless the core's queue fills.
    pub(super) fn on_bytes(
        &mut self,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<Decoded, End> {
        let max = self.ctx.settings.max_packet_size;
        loop {
            let packet = match outpost_mqtt::decode(rbuf, self.protocol, max) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(Decoded::Done),
                Err(outpost_mqtt::DecodeError::PacketTooLarge { size, max }) => {
                    crate::limits::ConnectionLimits::count(
                        &self.ctx.settings.connections.packet_too_large,
                    );
                    info!(
                        conn_id = %self.conn_id,
                        size,
                        max_packet_size = max,
                        "packet refused: larger than broker.max_packet_size; closing the connection"
                    );
                    self.end_after_replies(ReasonCode::PACKET_TOO_LARGE, wbuf);
                    return Err(End::Abnormal);
                }
                Err(e) => {
                    info!(
                        conn_id = %self.conn_id,
                        error = %e,
                        "malformed packet; closing the connection"
                    );
                    self.end_after_replies(e.reason_code(), wbuf);
                    return Err(End::Abnormal);
                }
            };
            if matches!(packet, Packet::Connect(_)) {
                // MQTT-3.1.0-2: a second CONNECT is a protocol error and the connection
                // is closed. No DISCONNECT goes with it (the spec makes it optional):
                // a client that sends CONNECT twice is still waiting for a CONNACK, and
                // some (the Eclipse Paho test client) read that wait on a second thread
                // beside their reader, split a DISCONNECT's bytes between the two and
                // hang. Mosquitto closes silently here too.
                info!(
                    conn_id = %self.conn_id,
                    "second CONNECT; closing the connection"
                );
                self.closing = true;
                return Err(End::Abnormal);
            }
            match self.on_packet(packet, wbuf) {
                Ok(Step::Next) => {}
                Ok(Step::Stalled(ev)) => return Ok(Decoded::Stalled(ev)),
                Ok(Step::Disconnect(d)) => return Err(End::Graceful(d)),
                Err(reason) => {
                    self.end_after_replies(reason, wbuf);
                    return Err(End::Abnormal);
                }
            }
        }
    }

    /// Ends the connection for a broken rule, but lets the acknowledgements of the
    /// packets before it go out first: the core queues the DISCONNECT behind its replies
    /// to them, so the client learns which of its messages were accepted and does not
    /// send those again. With no publish awaiting its acknowledgement (or no room in the
    /// core's queue), the DISCONNECT goes out at once.
    fn end_after_replies(&mut self, reason: ReasonCode, wbuf: &mut BytesMut) {
        self.close_reason.get_or_insert(reason);
        let awaiting = self.unacked_qos1 > 0
            || self
                .tables
                .as_ref()
                .is_some_and(|t| !t.pending_qos2.is_empty() || !t.acks.is_empty());
        if self.accepted
            && awaiting
            && self
                .core
                .try_send(CoreEvent::CloseAfterReplies {
                    session: self.session,
                    conn_id: self.conn_id,
                    reason: Some(reason),
                })
                .is_ok()
        {
            self.ending = true;
        } else {
            self.violation(reason, wbuf);
        }
    }

    /// The client sent DISCONNECT: stop reading, and close once the core's replies to
    /// the packets before it (a SUBACK, say) are out. False when the core cannot be
    /// asked; then close now.
    pub(super) fn close_after_replies(&mut self) -> bool {
        if self.accepted
            && self
                .core
                .try_send(CoreEvent::CloseAfterReplies {
                    session: self.session,
                    conn_id: self.conn_id,
                    reason: None,
                })
                .is_ok()
        {
            self.ending = true;
            return true;
        }
        false
    }

    /// True while acknowledgements or SUBACKs wait for a commit: a closing connection
    /// lets them out first (within the close grace period).
    pub(super) fn replies_pending(&self) -> bool {
        self.tables.as_ref().is_some_and(|t| !t.acks.is_empty())
    }

    /// True when so many of the client's packets wait for their replies that reading
    /// more would only grow memory: acknowledgements held for a commit, or (3.x, which
    /// has no Receive Maximum to refuse with) QoS 1 PUBLISHes not yet acknowledged.
    /// Reading resumes as the replies leave, which needs nothing more from the client.
    pub(super) fn replies_backlogged(&self) -> bool {
        let held = self.tables.as_ref().map_or(0, |t| t.acks.len());
        held >= REPLIES_BACKLOG
            || (!self.protocol.is_v5() && self.unacked_qos1 as usize >= REPLIES_BACKLOG)
    }

    /// True when nothing waits on a future of this connection's own (a durable commit
    /// behind an acknowledgement or a held delivery): its socket, its outbound queue and
    /// its deadline are then all it waits on, and it may be parked.
    pub(super) fn parkable(&self) -> bool {
        !self.winding_down()
            && self
                .tables
                .as_ref()
                .is_none_or(|t| t.acks.is_empty() && t.held.is_empty())
    }

    /// Queues a DISCONNECT with `reason` (5.0 only; 3.x just closes).
    pub(super) fn violation(&mut self, reason: ReasonCode, wbuf: &mut BytesMut) {
        self.close_reason.get_or_insert(reason);
        if self.protocol.is_v5() {
            self.encode(
                &Packet::Disconnect(Disconnect {
                    reason,
                    properties: Properties::default(),
                }),
                wbuf,
            );
        }
        self.closing = true;
    }

    fn forward(&mut self, packet: Packet) -> Result<Step, ReasonCode> {
        let ev = CoreEvent::Packet {
            session: self.session,
            conn_id: self.conn_id,
            packet,
        };
        match self.core.try_send(ev) {
            Ok(()) => Ok(Step::Next),
            Err(TrySendError::Full(ev)) => Ok(Step::Stalled(Box::new(ev))),
            Err(TrySendError::Closed(_)) => Err(ReasonCode::SERVER_SHUTTING_DOWN),
        }
    }

    fn on_packet(&mut self, packet: Packet, wbuf: &mut BytesMut) -> Result<Step, ReasonCode> {
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PingReq => {
                self.encode(&Packet::PingResp, wbuf);
                Ok(Step::Next)
            }
            Packet::PubRel(r) => {
                if let Some(t) = self.tables.as_mut() {
                    t.pending_qos2.remove(&r.packet_id);
                }
                self.forward(Packet::PubRel(r))
            }
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubComp(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)) => self.forward(p),
            Packet::Disconnect(d) => {
                if self.connect_expiry_zero
                    && d.properties.session_expiry_interval.is_some_and(|e| e != 0)
                {
                    // Not a valid DISCONNECT: answer 0x82 and treat the close as
                    // abnormal, so the will is published.
                    return Err(ReasonCode::PROTOCOL_ERROR);
                }
                Ok(Step::Disconnect(Box::new(d)))
            }
            // Packets only a server sends are protocol errors, and so is AUTH, since no
            // enhanced authentication is offered. (A second CONNECT ends in `on_bytes`.)
            _ => Err(ReasonCode::PROTOCOL_ERROR),
        }
    }

    fn on_publish(&mut self, mut p: Publish) -> Result<Step, ReasonCode> {
        if self.protocol.is_v5() {
            self.resolve_alias(&mut p)?;
            if !p.properties.subscription_identifiers.is_empty() {
                // MQTT-3.3.4-6: only the server sends subscription identifiers.
                return Err(ReasonCode::PROTOCOL_ERROR);
            }
            if p.qos != QoS::AtMostOnce {
                let id = p.packet_id.unwrap_or(0);
                let pending = self.tables.as_ref().map(|t| &t.pending_qos2);
                let new_qos2 =
                    p.qos == QoS::ExactlyOnce && !pending.is_some_and(|s| s.contains(&id));
                let inflight = self.unacked_qos1 as usize
                    + pending.map_or(0, HashSet::len)
                    + usize::from(p.qos == QoS::AtLeastOnce || new_qos2);
                if inflight > usize::from(self.ctx.settings.receive_maximum) {
                    // MQTT-3.3.4-9: more unacknowledged QoS 1/2 PUBLISHes than our
                    // Receive Maximum.
                    return Err(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                }
            }
        }
        match p.qos {
            QoS::AtLeastOnce => self.unacked_qos1 += 1,
            QoS::ExactlyOnce => {
                let t = self.tables.get_or_insert_with(Default::default);
                t.pending_qos2.insert(p.packet_id.unwrap_or(0));
            }
            QoS::AtMostOnce => {}
        }
        self.forward(Packet::Publish(p))
    }

    /// MQTT-3.3.2-12 and following: replace a Topic Alias by its topic, or remember a new
    /// mapping.
    fn resolve_alias(&mut self, p: &mut Publish) -> Result<(), ReasonCode> {
        let Some(alias) = p.properties.topic_alias.take() else {
            return if p.topic.is_empty() {
                Err(ReasonCode::PROTOCOL_ERROR)
            } else {
                Ok(())
            };
        };
        if alias == 0 || alias > self.ctx.settings.topic_alias_maximum {
            return Err(ReasonCode::TOPIC_ALIAS_INVALID);
        }
        let aliases = self.tables.get_or_insert_with(Default::default);
        if p.topic.is_empty() {
            match aliases.inbound.get(&alias) {
                Some(t) => p.topic = t.clone(),
                None => return Err(ReasonCode::PROTOCOL_ERROR),
            }
        } else {
            // A copy: the topic shares the buffer its packet was read into, which the
            // alias would otherwise keep alive (up to the largest packet allowed) for as
            // long as the connection lasts.
            aliases.inbound.insert(alias, ByteString::from(&*p.topic));
        }
        Ok(())
    }

    /// Encodes one item from the core; true when the connection must close after it.
    pub(super) fn add(&mut self, item: Outbound, wbuf: &mut BytesMut) -> bool {
        match item {
            Outbound::Ack(a)
                if matches!(a.kind, AckKind::PubAck | AckKind::PubRec)
                    && self.tables.as_ref().is_some_and(|t| !t.acks.is_empty()) =>
            {
                if let Some(t) = self.tables.as_mut() {
                    t.acks.push_back(PendingAck::Ready(a));
                }
            }
            Outbound::Ack(a) => self.encode_ack(&a, wbuf),
            Outbound::Control(p) => self.encode(&p, wbuf),
            Outbound::AckAfter { wait, ack } => {
                let t = self.tables.get_or_insert_with(Default::default);
                t.acks.push_back(PendingAck::Waiting { wait, ack });
            }
            Outbound::ControlAfter { wait, packet } => {
                let t = self.tables.get_or_insert_with(Default::default);
                t.acks.push_back(PendingAck::Control { wait, packet });
            }
            Outbound::PublishAfter {
                wait,
                delivery,
                packet_id,
            } => {
                let t = self.tables.get_or_insert_with(Default::default);
                t.held.push_back(HeldPublish::Waiting {
                    wait,
                    delivery,
                    packet_id,
                });
            }
            Outbound::Publish {
                delivery,
                packet_id,
                dup,
            } if self.tables.as_ref().is_some_and(|t| !t.held.is_empty()) => {
                if let Some(t) = self.tables.as_mut() {
                    t.held.push_back(HeldPublish::Ready {
                        delivery,
                        packet_id,
                        dup,
                    });
                }
            }
            Outbound::Publish {
                delivery,
                packet_id,
                dup,
            } => self.encode_publish(delivery, packet_id, dup, wbuf),
            Outbound::Disconnect(reason) => {
                self.violation(reason, wbuf);
                return true;
            }
            Outbound::Close => return true,
        }
        false
    }

    /// Polls the acknowledgement at the head of the line, if it waits for durability;
    /// its outcome once resolved (then call [`Self::release_acks`]).
    pub(super) fn poll_head_ack(&mut self, cx: &mut Context<'_>) -> Option<DurableResult> {
        match self.tables.as_mut()?.acks.front_mut() {
            Some(PendingAck::Waiting { wait, .. } | PendingAck::Control { wait, .. }) => {
                match wait.as_mut().poll(cx) {
                    Poll::Ready(outcome) => Some(outcome),
                    Poll::Pending => None,
                }
            }
            _ => None,
        }
    }

    /// Polls the delivery at the head of the held line; true once it may be sent (then
    /// call [`Self::release_publishes`]).
    pub(super) fn poll_head_publish(&mut self, cx: &mut Context<'_>) -> bool {
        match self.tables.as_mut().and_then(|t| t.held.front_mut()) {
            // Sent whatever the outcome: a failed write is carried and retried by the
            // store, and holding the message back would only stall the session.
            Some(HeldPublish::Waiting { wait, .. }) => wait.as_mut().poll(cx).is_ready(),
            Some(HeldPublish::Ready { .. }) => true,
            None => false,
        }
    }

    /// Encodes the head of the held line and every ready delivery behind it.
    pub(super) fn release_publishes(&mut self, wbuf: &mut BytesMut) {
        let mut first = true;
        loop {
            let Some(t) = self.tables.as_mut() else {
                return;
            };
            let next = match t.held.front() {
                Some(HeldPublish::Waiting { .. }) if !first => return,
                Some(_) => t.held.pop_front(),
                None => return,
            };
            first = false;
            match next {
                Some(HeldPublish::Waiting {
                    delivery,
                    packet_id,
                    ..
                }) => self.encode_publish(delivery, Some(packet_id), false, wbuf),
                Some(HeldPublish::Ready {
                    delivery,
                    packet_id,
                    dup,
                }) => self.encode_publish(delivery, packet_id, dup, wbuf),
                None => return,
            }
        }
    }

    /// Encodes the resolved head acknowledgement and every ready one behind it.
    pub(super) fn release_acks(&mut self, outcome: DurableResult, wbuf: &mut BytesMut) {
        let Some(mut t) = self.tables.take() else {
            return;
        };
        // `encode_ack` cannot reach the tables while they are taken out here, so the
        // QoS 2 ids a failing PUBREC ends are settled on `t` directly.
        match t.acks.pop_front() {
            Some(PendingAck::Waiting { ack, .. }) => {
                if let Some(a) = ack(outcome) {
                    settle_refused_qos2(&mut t, &a);
                    self.encode_ack(&a, wbuf);
                }
            }
            // Sent whatever the outcome: rows that failed are carried and written again
            // by the store, which never drops what memory relies on.
            Some(PendingAck::Control { packet, .. }) => self.encode(&packet, wbuf),
            _ => {}
        }
        while let Some(PendingAck::Ready(_)) = t.acks.front() {
            if let Some(PendingAck::Ready(a)) = t.acks.pop_front() {
                settle_refused_qos2(&mut t, &a);
                self.encode_ack(&a, wbuf);
            }
        }
        if t.acks.is_empty() && t.acks.capacity() > 0 {
            // Release the queue after a burst of durable publishes.
            t.acks = VecDeque::new();
        }
        self.tables = Some(t);
    }

    fn encode_ack(&mut self, a: &Ack, wbuf: &mut BytesMut) {
        if a.kind == AckKind::PubAck {
            self.unacked_qos1 = self.unacked_qos1.saturating_sub(1);
        }
        if let Some(t) = self.tables.as_mut() {
            settle_refused_qos2(t, a);
        }
        if a.reason_string.is_some() && !self.problem_info {
            let plain = Ack {
                reason_string: None,
                ..a.clone()
            };
            self.encode(&plain.to_packet(), wbuf);
        } else {
            self.encode(&a.to_packet(), wbuf);
        }
    }

    /// Encodes a control packet within the client's Maximum Packet Size: first without
    /// its Reason String and User Properties if those make it too large (MQTT-3.1.2-25
    /// and the per-packet rules such as MQTT-3.4.2-2), and not at all if even that is.
    fn encode(&self, p: &Packet, wbuf: &mut BytesMut) {
        #[cfg(debug_assertions)]
        if crate::fault::abort_after(p) {
            self.abort_after_flush.set(true);
        }
        let start = wbuf.len();
        if let Err(e) = outpost_mqtt::encode(p, self.protocol, wbuf) {
            debug!(error = %e, "cannot encode a control packet; skipped");
            wbuf.truncate(start);
            return;
        }
        let limit = self.max_packet_size as usize;
        if limit == 0 || wbuf.len() - start <= limit {
            return;
        }
        wbuf.truncate(start);
        if let Some(plain) = without_diagnostics(p) {
            let _ = outpost_mqtt::encode(&plain, self.protocol, wbuf);
            if wbuf.len() - start <= limit {
                return;
            }
            wbuf.truncate(start);
        }
        debug!(
            limit,
            "a control packet exceeds the client's Maximum Packet Size; skipped"
        );
    }

    fn encode_publish(
        &mut self,
        d: Delivery,
        packet_id: Option<u16>,
        dup: bool,
        wbuf: &mut BytesMut,
    ) {
        let v5 = self.protocol.is_v5();
        let mut properties = if v5 {
            d.msg.properties.clone()
        } else {
            Properties::default()
        };
        let mut topic = d.msg.topic.clone();
        let mut new_alias = None;
        if v5 {
            properties.subscription_identifiers = d.sub_ids;
            properties.message_expiry_interval = d.msg.remaining_expiry(Instant::now());
            if self.out_alias_max > 0 {
                let aliases = self.tables.get_or_insert_with(Default::default);
                if let Some(&a) = aliases.outbound.get(&topic) {
                    properties.topic_alias = Some(a);
                    topic = ByteString::new();
                } else if aliases.outbound.len() < usize::from(self.out_alias_max) {
                    let a = aliases.outbound.len() as u16 + 1;
                    properties.topic_alias = Some(a);
                    new_alias = Some(a);
                }
            }
        }
        let publish = Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id,
            properties,
            payload: d.msg.payload.clone(),
        };
        let start = wbuf.len();
        if let Err(e) = outpost_mqtt::codec::encode_publish(&publish, self.protocol, wbuf) {
            debug!(error = %e, "cannot encode a PUBLISH; skipped");
            wbuf.truncate(start);
            return;
        }
        if self.max_packet_size > 0 && wbuf.len() - start > self.max_packet_size as usize {
            // MQTT-3.1.2-25: never send more than the client's Maximum Packet Size.
            wbuf.truncate(start);
            return;
        }
        if let Some(a) = new_alias
            && let Some(aliases) = self.tables.as_mut()
        {
            aliases.outbound.insert(d.msg.topic.clone(), a);
        }
    }
}

/// A failing PUBREC ends its exchange: no PUBREL follows (section 4.9), so the message
/// no longer counts against our Receive Maximum.
fn settle_refused_qos2(t: &mut Tables, a: &Ack) {
    if a.kind == AckKind::PubRec && a.reason.is_error() {
        t.pending_qos2.remove(&a.packet_id);
    }
}

/// `p` without its Reason String and User Properties, if it carries either.
fn without_diagnostics(p: &Packet) -> Option<Packet> {
    let mut p = p.clone();
    let props = match &mut p {
        Packet::ConnAck(c) => &mut c.properties,
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            &mut r.properties
        }
        Packet::SubAck(a) => &mut a.properties,
        Packet::UnsubAck(a) => &mut a.properties,
        Packet::Disconnect(d) => &mut d.properties,
        _ => return None,
    };
    if props.reason_string.is_none() && props.user_properties.is_empty() {
        return None;
    }
    props.reason_string = None;
    props.user_properties.clear();
    Some(p)
}

/// What one packet from the client led to.
enum Step {
    /// Handled; decode the next.
    Next,
    /// Waiting for room in the core's queue.
    Stalled(Box<CoreEvent>),
    /// The client sent DISCONNECT.
    Disconnect(Box<Disconnect>),
}
