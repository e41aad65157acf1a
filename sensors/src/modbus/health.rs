//! Device health: consecutive failures, exponential backoff, quarantine and recovery.

use crate::messages::DeviceStatus;
use std::time::{Duration, Instant};

/// Backoff and quarantine settings of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Delay after the first failure; doubles per failure.
    pub backoff: Duration,
    /// Cap of the doubling.
    pub max_backoff: Duration,
    /// Consecutive failures that quarantine the device.
    pub quarantine_after: u32,
    /// Probe period while quarantined.
    pub quarantine: Duration,
}

/// Health of one device.
#[derive(Debug, Clone)]
pub struct Health {
    policy: HealthPolicy,
    failures: u32,
    status: Option<DeviceStatus>,
    last_error: Option<String>,
    next_allowed: Option<Instant>,
}

/// A status change to publish.
pub type StatusChange = (DeviceStatus, Option<String>);

impl Health {
    /// A device not yet polled.
    pub fn new(policy: HealthPolicy) -> Self {
        Health {
            policy,
            failures: 0,
            status: None,
            last_error: None,
            next_allowed: None,
        }
    }

    /// Whether the device may be polled now.
    pub fn ready(&self, now: Instant) -> bool {
        self.next_allowed.is_none_or(|t| t <= now)
    }

    /// When the device may next be polled.
    pub fn next_allowed(&self) -> Option<Instant> {
        self.next_allowed
    }

    /// Current status.
    pub fn status(&self) -> Option<DeviceStatus> {
        self.status
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The device answered (data or exception).
    pub fn on_success(&mut self) -> Option<StatusChange> {
        self.failures = 0;
        self.next_allowed = None;
        if self.status == Some(DeviceStatus::Online) {
            return None;
        }
        self.status = Some(DeviceStatus::Online);
        // An online device has no error: a retained status naming the old one would read
        // as a current fault (the serial sensors clear it the same way).
        self.last_error = None;
        Some((DeviceStatus::Online, None))
    }

    /// The device did not answer after its retries.
    pub fn on_failure(&mut self, error: &str, now: Instant) -> Option<StatusChange> {
        self.failures = self.failures.saturating_add(1);
        let status = if self.failures >= self.policy.quarantine_after {
            self.next_allowed = Some(now + self.policy.quarantine);
            DeviceStatus::Quarantined
        } else {
            let factor = 1u32.checked_shl(self.failures - 1).unwrap_or(u32::MAX);
            let delay = self
                .policy
                .backoff
                .saturating_mul(factor)
                .min(self.policy.max_backoff);
            self.next_allowed = Some(now + delay);
            DeviceStatus::Offline
        };
        let changed = self.status != Some(status) || self.last_error.as_deref() != Some(error);
        self.status = Some(status);
        self.last_error = Some(error.to_string());
        changed.then(|| (status, Some(error.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            quarantine_after: 5,
            quarantine: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_then_caps_then_quarantines() {
        let t0 = Instant::now();
        let mut h = Health::new(policy());
        assert!(h.ready(t0));
        let mut delays = Vec::new();
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let change = h.on_failure("timeout", t0);
            statuses.push(change.map(|c| c.0));
            delays.push(h.next_allowed().unwrap() - t0);
        }
        let s = Duration::from_secs;
        assert_eq!(delays, vec![s(1), s(2), s(4), s(5), s(60), s(60)]);
        assert_eq!(
            statuses,
            vec![
                Some(DeviceStatus::Offline),
                None,
                None,
                None,
                Some(DeviceStatus::Quarantined),
                None
            ]
        );
        assert!(!h.ready(t0 + s(59)));
        assert!(h.ready(t0 + s(60)));
    }

    #[test]
    fn recovery_resets_and_reports_once() {
        let t0 = Instant::now();
        let mut h = Health::new(policy());
        assert_eq!(h.on_success().map(|c| c.0), Some(DeviceStatus::Online));
        assert_eq!(h.on_success(), None);
        h.on_failure("timeout", t0);
        // A new error text is news even when the status is the same.
        assert!(h.on_failure("connection refused", t0).is_some());
        // Back online: the old error is gone, not kept in the retained status.
        let back = h.on_success().unwrap();
        assert_eq!(back, (DeviceStatus::Online, None));
        assert_eq!(h.failures(), 0);
        assert!(h.ready(t0));
    }
}
