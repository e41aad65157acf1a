//! Report by exception: deadband, quality changes and heartbeat; or every poll.

use crate::config::ReportMode;
use crate::point::Value;
use std::time::{Duration, Instant};

/// Quality of a reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quality {
    /// A fresh, valid value.
    Good,
    /// No valid value; the reason says why.
    Bad(String),
    /// The last good value, older than the sensor's `stale_after`.
    Stale,
}

/// Deadband settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deadband {
    /// Any change is reported.
    None,
    /// Report when |new - last| > d.
    Absolute(f64),
    /// Report when |new - last| > p% of |last|.
    Percent(f64),
}

/// Reporting policy of one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Change or every poll.
    pub mode: ReportMode,
    /// Deadband for numbers.
    pub deadband: Deadband,
    /// Maximum silence.
    pub heartbeat: Option<Duration>,
}

impl Policy {
    /// Builds a policy from config options.
    pub fn new(
        mode: ReportMode,
        deadband: Option<f64>,
        percent: Option<f64>,
        heartbeat: Option<Duration>,
    ) -> Self {
        let deadband = match (deadband, percent) {
            (Some(d), _) => Deadband::Absolute(d),
            (None, Some(p)) => Deadband::Percent(p),
            _ => Deadband::None,
        };
        Policy {
            mode,
            deadband,
            heartbeat,
        }
    }
}

/// Remembers what was last published for one point.
#[derive(Debug, Clone)]
pub struct Reporter {
    policy: Policy,
    last: Option<(Option<Value>, Quality, Instant)>,
}

impl Reporter {
    /// A reporter that has published nothing yet.
    pub fn new(policy: Policy) -> Self {
        Reporter { policy, last: None }
    }

    /// The last value published as good or stale.
    pub fn last_value(&self) -> Option<&Value> {
        self.last.as_ref().and_then(|(v, _, _)| v.as_ref())
    }

    /// The quality last published.
    pub fn last_quality(&self) -> Option<&Quality> {
        self.last.as_ref().map(|(_, q, _)| q)
    }

    /// Decides whether a reading must be published and records it if so.
    pub fn offer(&mut self, value: Option<&Value>, quality: &Quality, now: Instant) -> bool {
        let publish = match (&self.last, self.policy.mode) {
            (None, _) | (_, ReportMode::Every) => true,
            (Some((last_v, last_q, at)), ReportMode::Change) => {
                let silent_too_long = self
                    .policy
                    .heartbeat
                    .is_some_and(|h| now.duration_since(*at) >= h);
                silent_too_long
                    || last_q != quality
                    || (quality == &Quality::Good && self.moved(last_v.as_ref(), value))
            }
        };
        if publish {
            self.last = Some((value.cloned(), quality.clone(), now));
        }
        publish
    }

    fn moved(&self, last: Option<&Value>, new: Option<&Value>) -> bool {
        match (last, new) {
            (Some(Value::Text(a)), Some(Value::Text(b))) => a != b,
            (Some(Value::Bool(a)), Some(Value::Bool(b))) => a != b,
            (Some(a), Some(b)) => match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => {
                    let d = (y - x).abs();
                    match self.policy.deadband {
                        Deadband::None => x != y,
                        Deadband::Absolute(band) => d > band,
                        Deadband::Percent(p) => d > x.abs() * p / 100.0 || (x == 0.0 && y != 0.0),
                    }
                }
                _ => a != b,
            },
            (None, None) => false,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(x: f64) -> Value {
        Value::Float(x)
    }

    #[test]
    fn absolute_deadband_compares_with_last_reported() {
        let t0 = Instant::now();
        let mut r = Reporter::new(Policy::new(ReportMode::Change, Some(0.5), None, None));
        assert!(r.offer(Some(&f(10.0)), &Quality::Good, t0));
        assert!(!r.offer(Some(&f(10.3)), &Quality::Good, t0));
        assert!(!r.offer(Some(&f(10.5)), &Quality::Good, t0));
        // Slow drift is caught: 10.6 is 0.6 from the last *reported* 10.0.
        assert!(r.offer(Some(&f(10.6)), &Quality::Good, t0));
        assert!(!r.offer(Some(&f(10.2)), &Quality::Good, t0));
        assert!(r.offer(Some(&f(10.0)), &Quality::Good, t0));
    }

    #[test]
    fn percent_deadband() {
        let t0 = Instant::now();
        let mut r = Reporter::new(Policy::new(ReportMode::Change, None, Some(10.0), None));
        assert!(r.offer(Some(&f(200.0)), &Quality::Good, t0));
        assert!(!r.offer(Some(&f(219.0)), &Quality::Good, t0));
        assert!(r.offer(Some(&f(221.0)), &Quality::Good, t0));
        let mut z = Reporter::new(Policy::new(ReportMode::Change, None, Some(10.0), None));
        assert!(z.offer(Some(&f(0.0)), &Quality::Good, t0));
        assert!(z.offer(Some(&f(0.001)), &Quality::Good, t0));
    }

    #[test]
    fn heartbeat_reports_a_steady_value() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(30);
        let mut r = Reporter::new(Policy::new(ReportMode::Change, Some(1.0), None, Some(hb)));
        assert!(r.offer(Some(&f(5.0)), &Quality::Good, t0));
        assert!(!r.offer(Some(&f(5.0)), &Quality::Good, t0 + Duration::from_secs(29)));
        assert!(r.offer(Some(&f(5.0)), &Quality::Good, t0 + hb));
        assert!(!r.offer(
            Some(&f(5.0)),
            &Quality::Good,
            t0 + hb + Duration::from_secs(1)
        ));
    }

    #[test]
    fn quality_changes_are_always_reported_and_repeats_are_not() {
        let t0 = Instant::now();
        let mut r = Reporter::new(Policy::new(ReportMode::Change, Some(100.0), None, None));
        assert!(r.offer(Some(&f(1.0)), &Quality::Good, t0));
        let timeout = Quality::Bad("timeout".into());
        assert!(r.offer(None, &timeout, t0));
        assert!(!r.offer(None, &timeout, t0));
        assert!(r.offer(
            None,
            &Quality::Bad("exception: IllegalDataAddress".into()),
            t0
        ));
        assert!(r.offer(Some(&f(1.0)), &Quality::Good, t0));
    }

    #[test]
    fn every_poll_and_non_numeric() {
        let t0 = Instant::now();
        let mut r = Reporter::new(Policy::new(ReportMode::Every, Some(100.0), None, None));
        assert!(r.offer(Some(&f(1.0)), &Quality::Good, t0));
        assert!(r.offer(Some(&f(1.0)), &Quality::Good, t0));
        let mut b = Reporter::new(Policy::new(ReportMode::Change, None, None, None));
        assert!(b.offer(Some(&Value::Bool(false)), &Quality::Good, t0));
        assert!(!b.offer(Some(&Value::Bool(false)), &Quality::Good, t0));
        assert!(b.offer(Some(&Value::Bool(true)), &Quality::Good, t0));
        assert!(b.offer(Some(&Value::Text("x".into())), &Quality::Good, t0));
    }
}
