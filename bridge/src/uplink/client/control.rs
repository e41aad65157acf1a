//! What the client sends besides spooled rows: the downlink SUBSCRIBE and the gateway
//! status messages (the birth, which may have to wait behind exchanges resumed from the
//! last session, and the clean offline status of the goodbye).

use std::time::Instant;

use bytestring::ByteString;
use outpost_mqtt::{Packet, Properties, Publish, QoS, SubAck};

use super::super::inflight::Inflight;
use super::{Client, Out, SessionEnd, lost};
use crate::rules::RetainMode;
use crate::spool::StoredMessage;

impl Client<'_> {
    /// At the start of a session: the birth goes now, or once the rows `in_progress`
    /// (resumed QoS 2 exchanges) are out.
    pub(super) fn birth_or_schedule(
        &mut self,
        in_progress: &[StoredMessage],
        now: Instant,
    ) -> Result<(), SessionEnd> {
        if let Some(status) = self.setup.status {
            match in_progress.iter().map(|r| r.id).max() {
                None => {
                    let payload = status.birth();
                    self.send_control(payload, now)?;
                }
                // The cloud still holds these QoS 2 exchanges and counts them against its
                // Receive Maximum until PUBCOMP (section 4.9). Sent first, the birth would
                // exceed it: Mosquitto refuses it (0x97), leaving the status "offline",
                // and with max_queued_messages 0 also drops the link, every time.
                Some(last) => self.birth_after = Some(last),
            }
        }
        Ok(())
    }

    pub(super) fn subscribe(&mut self) -> Result<(), SessionEnd> {
        let subs = self.setup.rules.remote_subscriptions();
        if subs.is_empty() {
            return Ok(());
        }
        let Some(pid) = self.ids.alloc() else {
            return Err(lost("no free packet identifier"));
        };
        // Subscribe identifiers are freed on SUBACK; they never enter the publish window.
        let filters = subs
            .into_iter()
            .map(|(filter, qos, retain)| outpost_mqtt::SubscribeFilter {
                filter,
                options: outpost_mqtt::SubscriptionOptions {
                    qos: qos.min(self.limits.max_qos.max(QoS::AtLeastOnce)),
                    // Without No Local a `both` rule would echo our own uplink back down.
                    no_local: true,
                    retain_as_published: retain == RetainMode::Keep,
                    retain_handling: Default::default(),
                },
            })
            .collect();
        self.encode(&Packet::Subscribe(outpost_mqtt::Subscribe {
            packet_id: pid,
            filters,
            properties: Properties::default(),
        }))
    }

    /// The cloud answered the SUBSCRIBE: its identifier is free again, and refused
    /// filters are logged (the link goes on without them).
    pub(super) fn on_suback(&mut self, s: SubAck) {
        self.ids.release(s.packet_id);
        for (i, code) in s.reason_codes.iter().enumerate() {
            if code.is_error() {
                tracing::error!(bridge = %self.setup.name, filter = i, reason = code.0,
                    "cloud refused a downlink subscription");
            }
        }
    }

    pub(super) fn send_control(
        &mut self,
        payload: bytes::Bytes,
        now: Instant,
    ) -> Result<u16, SessionEnd> {
        let (pid, publish) = self.status_publish(payload)?;
        self.write_out(Out::Status(publish), now)?;
        Ok(pid)
    }

    /// A status PUBLISH under a fresh identifier, counted in flight.
    fn status_publish(&mut self, payload: bytes::Bytes) -> Result<(u16, Publish), SessionEnd> {
        let pid = self
            .ids
            .alloc()
            .ok_or_else(|| lost("no free packet identifier"))?;
        let topic = self
            .setup
            .status
            .map(|s| s.topic.clone())
            .unwrap_or_default();
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: self.limits.retain_available,
            topic: ByteString::from(topic),
            packet_id: Some(pid),
            properties: Properties::default(),
            payload,
        };
        self.inflight.insert(pid, Inflight::Control);
        Ok((pid, publish))
    }

    /// Queues the deferred birth once the resumed rows ahead of `next` (the next row to
    /// go, if any) are out; false while it must still wait.
    pub(super) fn birth_due(
        &mut self,
        next: Option<i64>,
        outs: &mut Vec<Out>,
    ) -> Result<bool, SessionEnd> {
        let Some(last) = self.birth_after else {
            return Ok(true);
        };
        let resumed_out = match next {
            Some(id) => id > last,
            None => self.exhausted,
        };
        if !resumed_out || self.inflight.len() >= self.window.limit() {
            return Ok(false);
        }
        self.birth_after = None;
        let Some(status) = self.setup.status else {
            return Ok(true);
        };
        let payload = status.birth();
        let (_, publish) = self.status_publish(payload)?;
        outs.push(Out::Status(publish));
        Ok(true)
    }
}
