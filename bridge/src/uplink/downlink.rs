//! The receiving side of the cloud session, without I/O: downlink PUBLISHes mapped to the
//! local broker, their QoS 1 and QoS 2 answers, and the QoS 2 packet identifiers that
//! must be remembered durably between PUBREC and PUBCOMP.
//!
//! Order of a QoS 2 message: delivered locally first, its id remembered durably second,
//! PUBREC last; a crash in between can at worst deliver twice, never lose it. PUBCOMP goes
//! only once the id is forgotten durably: after PUBCOMP the cloud may reuse the id for a
//! new message, which a stale entry would swallow as a duplicate.

use std::collections::{HashSet, VecDeque};

use outpost_mqtt::{Packet, PubResponse, Publish, QoS};

use crate::LocalPublish;
use crate::rules::{RetainMode, Rules};
use crate::spool::IncomingOp;

/// Downlink state of one session; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Downlink {
    /// QoS 2 ids received from the cloud and not released yet; mirrored in the spool so a
    /// resent PUBLISH (DUP) after our restart is not delivered twice.
    incoming_qos2: HashSet<u16>,
    /// QoS 2 answers (PUBREC, PUBCOMP) in order, with the id-set change that must be
    /// durable before each goes out.
    pending: Vec<(Option<IncomingOp>, Packet)>,
    /// A commit is out; answers behind it wait.
    committing: bool,
    /// Id-set changes to make durable, not yet taken by the driver.
    commit: Option<Vec<IncomingOp>>,
    /// Answers that go out once the commit is durable.
    gated: Vec<Packet>,
    /// Messages for the local broker, in order.
    deliveries: VecDeque<LocalPublish>,
    /// QoS 2 exchanges the cloud opened on this connection whose PUBCOMP has not gone
    /// out: what the cloud's Receive Maximum quota counts (QoS 1 is answered at once).
    open: HashSet<u16>,
}

impl Downlink {
    /// Downlink state that remembers the QoS 2 ids of `incoming` (from the spool, when the
    /// cloud kept our session).
    pub(crate) fn new(incoming: impl IntoIterator<Item = u16>) -> Self {
        Downlink {
            incoming_qos2: incoming.into_iter().collect(),
            ..Default::default()
        }
    }

    /// True when taking `p` would leave more than `max` QoS 1 and QoS 2 exchanges open
    /// on this connection (a repeat of an open QoS 2 exchange opens none).
    pub(crate) fn exceeds(&self, p: &Publish, max: u16) -> bool {
        let opens = match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) => false,
            (QoS::ExactlyOnce, Some(id)) => !self.open.contains(&id),
            _ => true,
        };
        opens && self.open.len() >= usize::from(max)
    }

    /// A PUBLISH from the cloud: queued for the local broker through the `in` rules
    /// (unless it is a QoS 2 message already delivered); returns the answer that goes out
    /// at once (PUBACK), while a PUBREC waits for [`Downlink::pump`].
    pub(crate) fn on_publish(&mut self, p: Publish, rules: &Rules) -> Option<Packet> {
        let pid = p.packet_id;
        let duplicate =
            p.qos == QoS::ExactlyOnce && pid.is_some_and(|id| self.incoming_qos2.contains(&id));
        if !duplicate {
            match rules.map_in(&p.topic) {
                Some(m) => self.deliveries.push_back(LocalPublish {
                    topic: m.topic,
                    payload: p.payload,
                    qos: p.qos.min(m.qos),
                    retain: p.retain && m.retain == RetainMode::Keep,
                }),
                None => tracing::debug!(topic = %p.topic, "downlink message matches no `in` rule"),
            }
        }
        match (p.qos, pid) {
            (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubResponse::new(id))),
            (QoS::ExactlyOnce, Some(id)) => {
                self.open.insert(id);
                let op =
                    (!duplicate && self.incoming_qos2.insert(id)).then_some(IncomingOp::Add(id));
                self.pending
                    .push((op, Packet::PubRec(PubResponse::new(id))));
                None
            }
            _ => None,
        }
    }

    /// A PUBREL from the cloud: its PUBCOMP waits for the id to be forgotten durably.
    pub(crate) fn on_pubrel(&mut self, pid: u16) {
        let op = self
            .incoming_qos2
            .remove(&pid)
            .then_some(IncomingOp::Remove(pid));
        self.pending
            .push((op, Packet::PubComp(PubResponse::new(pid))));
    }

    /// Starts the commit the oldest answers wait for (one at a time, so their order is
    /// kept); returns the answers that change nothing and go out at once.
    pub(crate) fn pump(&mut self) -> Vec<Packet> {
        if self.committing || self.pending.is_empty() {
            return Vec::new();
        }
        let pending = std::mem::take(&mut self.pending);
        let ops: Vec<IncomingOp> = pending.iter().filter_map(|(op, _)| *op).collect();
        let answers: Vec<Packet> = pending.into_iter().map(|(_, answer)| answer).collect();
        if ops.is_empty() {
            self.closed(&answers);
            return answers;
        }
        self.gated = answers;
        self.committing = true;
        self.commit = Some(ops);
        Vec::new()
    }

    /// Id-set changes to make durable now; answer with [`Downlink::on_committed`].
    pub(crate) fn poll_commit(&mut self) -> Option<Vec<IncomingOp>> {
        self.commit.take()
    }

    /// The changes from [`Downlink::poll_commit`] are durable: returns their answers.
    pub(crate) fn on_committed(&mut self) -> Vec<Packet> {
        self.committing = false;
        let answers = std::mem::take(&mut self.gated);
        self.closed(&answers);
        answers
    }

    /// The exchanges whose PUBCOMP is among `answers` are over: the cloud may open more.
    fn closed(&mut self, answers: &[Packet]) {
        for a in answers {
            if let Packet::PubComp(r) = a {
                self.open.remove(&r.packet_id);
            }
        }
    }

    /// The next message for the local broker.
    pub(crate) fn poll_delivery(&mut self) -> Option<LocalPublish> {
        self.deliveries.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use bytestring::ByteString;
    use outpost_mqtt::Properties;

    use crate::rules::{Direction, TopicRule};

    fn rules() -> Rules {
        Rules::new(vec![TopicRule {
            pattern: "#".into(),
            direction: Direction::In,
            qos: QoS::ExactlyOnce,
            local_prefix: "cmd/".into(),
            remote_prefix: "gw-01/cmd/".into(),
            retain: RetainMode::Clear,
        }])
    }

    fn command(qos: QoS, pid: Option<u16>) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: true,
            topic: ByteString::from("gw-01/cmd/valve"),
            packet_id: pid,
            properties: Properties::default(),
            payload: Bytes::from_static(b"open"),
        }
    }

    #[test]
    fn qos1_is_delivered_and_acknowledged_at_once_through_the_in_rule() {
        let mut d = Downlink::new([]);
        let answer = d.on_publish(command(QoS::AtLeastOnce, Some(3)), &rules());
        assert_eq!(answer, Some(Packet::PubAck(PubResponse::new(3))));
        let local = d.poll_delivery().unwrap();
        assert_eq!(local.topic, "cmd/valve");
        assert_eq!(local.qos, QoS::AtLeastOnce);
        assert!(!local.retain, "retain = clear");
        assert!(d.pump().is_empty() && d.poll_commit().is_none());
        // Nothing matches: acknowledged, not delivered.
        let mut stray = command(QoS::AtLeastOnce, Some(4));
        stray.topic = ByteString::from("elsewhere/valve");
        assert!(d.on_publish(stray, &rules()).is_some());
        assert!(d.poll_delivery().is_none());
    }

    #[test]
    fn qos2_answers_keep_their_order_behind_one_commit_at_a_time() {
        let mut d = Downlink::new([]);
        assert_eq!(
            d.on_publish(command(QoS::ExactlyOnce, Some(1)), &rules()),
            None
        );
        assert_eq!(
            d.on_publish(command(QoS::ExactlyOnce, Some(2)), &rules()),
            None
        );
        assert!(d.pump().is_empty());
        assert_eq!(
            d.poll_commit(),
            Some(vec![IncomingOp::Add(1), IncomingOp::Add(2)])
        );
        // PUBREL 1 arrives while that commit is out: it waits behind it.
        d.on_pubrel(1);
        assert!(d.pump().is_empty());
        assert_eq!(d.poll_commit(), None);
        assert_eq!(
            d.on_committed(),
            [
                Packet::PubRec(PubResponse::new(1)),
                Packet::PubRec(PubResponse::new(2))
            ]
        );
        assert!(d.pump().is_empty());
        assert_eq!(d.poll_commit(), Some(vec![IncomingOp::Remove(1)]));
        assert_eq!(d.on_committed(), [Packet::PubComp(PubResponse::new(1))]);
        assert_eq!(d.deliveries.len(), 2);
    }

    #[test]
    fn a_remembered_qos2_id_is_answered_without_a_second_delivery() {
        // After our restart the cloud resends PUBLISH (DUP) for an id we had PUBREC'd.
        let mut d = Downlink::new([9]);
        let mut dup = command(QoS::ExactlyOnce, Some(9));
        dup.dup = true;
        assert_eq!(d.on_publish(dup, &rules()), None);
        assert!(d.poll_delivery().is_none());
        assert_eq!(d.pump(), [Packet::PubRec(PubResponse::new(9))]);
        // An unknown PUBREL (already completed) is answered at once, nothing to forget.
        d.on_pubrel(10);
        assert_eq!(d.pump(), [Packet::PubComp(PubResponse::new(10))]);
    }
}
