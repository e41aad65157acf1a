//! Turns observations into published messages: range checks, report policy, payloads.

use crate::clock::Clock;
use crate::error::{OutOfRange, ReadingError, SensorsError};
use crate::messages::{
    DeviceStatus, SensorMessage, reading_payload, status_payload, stopped_payload,
};
use crate::point::Value;
use crate::report::{Policy, Quality, Reporter};
use crate::stop::Farewell;
use std::time::Instant;
use tokio::sync::mpsc;

/// Sends messages to the gateway with the layer's clock.
#[derive(Debug, Clone)]
pub struct Emitter {
    out: mpsc::Sender<SensorMessage>,
    /// Clock used to stamp payloads.
    pub clock: Clock,
}

impl Emitter {
    /// An emitter over the gateway channel.
    pub fn new(out: mpsc::Sender<SensorMessage>, clock: Clock) -> Self {
        Emitter { out, clock }
    }

    /// Sends one message; fails only when the gateway is gone.
    pub async fn send(&self, msg: SensorMessage) -> Result<(), SensorsError> {
        self.out
            .send(msg)
            .await
            .map_err(|_| SensorsError::OutputClosed)
    }

    /// Publishes a retained device status.
    pub async fn status(
        &self,
        topic: &str,
        status: DeviceStatus,
        error: Option<&str>,
    ) -> Result<(), SensorsError> {
        self.send(SensorMessage {
            topic: topic.to_string(),
            payload: status_payload(status, error, &self.clock),
            qos: outpost_mqtt::QoS::AtLeastOnce,
            retain: true,
        })
        .await
    }

    /// Publishes the retained status of a device that stops without a fault.
    pub async fn stopped(&self, topic: &str, reason: &str) -> Result<(), SensorsError> {
        self.send(SensorMessage {
            topic: topic.to_string(),
            payload: stopped_payload(reason, &self.clock),
            qos: outpost_mqtt::QoS::AtLeastOnce,
            retain: true,
        })
        .await
    }

    /// Removes the retained message of `topic`: a zero-byte retained PUBLISH removes it and
    /// no later subscriber receives one (MQTT-3.3.1-10/-11 in 3.1.1, MQTT-3.3.1-6/-7 in 5.0).
    pub async fn clear(&self, topic: &str) -> Result<(), SensorsError> {
        self.send(SensorMessage {
            topic: topic.to_string(),
            payload: bytes::Bytes::new(),
            qos: outpost_mqtt::QoS::AtLeastOnce,
            retain: true,
        })
        .await
    }

    /// Leaves a stopping device's topics as `farewell` says: a retained `offline` status,
    /// or its retained status and retained readings removed.
    pub async fn farewell<'a>(
        &self,
        farewell: &Farewell,
        device: &str,
        status_topic: &str,
        retained_readings: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), SensorsError> {
        match farewell.for_device(device) {
            Some(reason) => self.stopped(status_topic, reason).await,
            None => {
                for topic in retained_readings {
                    self.clear(topic).await?;
                }
                self.clear(status_topic).await
            }
        }
    }
}

/// Logs a device status change: going offline is a warning naming the device and the
/// cause. The message carries both because a plain `journalctl` shows only the message;
/// the `device` field is there to filter on (`journalctl DEVICE=boiler` with a journald
/// layer that does not prefix fields).
pub(crate) fn log_status(device: &str, status: DeviceStatus, error: Option<&str>, failures: u32) {
    let error = error.unwrap_or("unknown error");
    match status {
        DeviceStatus::Online => tracing::info!(device, "device {device} online"),
        DeviceStatus::Offline => {
            tracing::warn!(device, "device {device} offline: {error}")
        }
        DeviceStatus::Quarantined => tracing::warn!(
            device,
            "device {device} quarantined after {failures} failed polls: {error}; probing it rarely"
        ),
    }
}

/// The publishing side of one point.
#[derive(Debug, Clone)]
pub struct PointOutput {
    /// Reading topic.
    pub topic: String,
    /// Engineering unit.
    pub unit: Option<String>,
    /// QoS of readings.
    pub qos: outpost_mqtt::QoS,
    /// Retain flag of readings.
    pub retain: bool,
    /// Lowest good value.
    pub min: Option<f64>,
    /// Highest good value.
    pub max: Option<f64>,
    reporter: Reporter,
}

impl PointOutput {
    /// Builds the output of one point.
    pub fn new(
        topic: String,
        unit: Option<String>,
        qos: outpost_mqtt::QoS,
        retain: bool,
        min: Option<f64>,
        max: Option<f64>,
        policy: Policy,
    ) -> Self {
        PointOutput {
            topic,
            unit,
            qos,
            retain,
            min,
            max,
            reporter: Reporter::new(policy),
        }
    }

    /// Range check against min/max.
    pub fn check_range(&self, v: &Value) -> Result<(), OutOfRange> {
        if let Some(x) = v.as_f64()
            && (self.min.is_some_and(|m| x < m) || self.max.is_some_and(|m| x > m))
        {
            return Err(OutOfRange(x));
        }
        Ok(())
    }

    /// Records a reading (or a failure) and returns the message to publish, if any.
    pub fn observe(
        &mut self,
        reading: Result<Value, ReadingError>,
        now: Instant,
        clock: &Clock,
    ) -> Option<SensorMessage> {
        let checked = reading.and_then(|v| self.check_range(&v).map(|()| v).map_err(Into::into));
        let (value, quality) = match checked {
            Ok(v) => (Some(v), Quality::Good),
            Err(reason) => (None, Quality::Bad(reason.to_string())),
        };
        self.offer(value, quality, now, clock)
    }

    /// Republishes the last good value as stale, once.
    pub fn mark_stale(&mut self, now: Instant, clock: &Clock) -> Option<SensorMessage> {
        if self.reporter.last_quality() != Some(&Quality::Good) {
            return None;
        }
        let last = self.reporter.last_value().cloned();
        self.offer(last, Quality::Stale, now, clock)
    }

    /// Quality last published.
    pub fn last_quality(&self) -> Option<&Quality> {
        self.reporter.last_quality()
    }

    fn offer(
        &mut self,
        value: Option<Value>,
        quality: Quality,
        now: Instant,
        clock: &Clock,
    ) -> Option<SensorMessage> {
        if !self.reporter.offer(value.as_ref(), &quality, now) {
            return None;
        }
        Some(SensorMessage {
            topic: self.topic.clone(),
            payload: reading_payload(value.as_ref(), self.unit.as_deref(), &quality, clock),
            qos: self.qos,
            retain: self.retain,
        })
    }
}
