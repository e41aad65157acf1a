//! Stopping a line or a sensor: the signal its task watches, and how its devices leave
//! their retained status.

use std::collections::BTreeSet;
use tokio::sync::watch;

/// How a stopping device leaves its retained status topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Farewell {
    /// A retained `offline` status with this reason: the device still exists, but the
    /// gateway (or its line) stops.
    Offline(String),
    /// Its retained status and retained readings removed: the device is no longer in the
    /// configuration, so no status at all is the truth (a retained "offline" would stay
    /// on every broker it was bridged to, for a device nobody will ever publish again).
    Clear,
    /// A reload stops the line: the devices named are gone from the configuration and are
    /// cleared as [`Farewell::Clear`]; the others restart with their new settings and say
    /// so with a retained `offline` until their first poll.
    Reload {
        /// Devices no longer configured.
        removed: BTreeSet<String>,
    },
}

impl Farewell {
    /// The farewell of every device when the gateway stops.
    pub fn gateway_stopping() -> Self {
        Farewell::Offline("gateway stopping".to_string())
    }

    /// What this farewell means for one device: `None` to clear its topics, or the
    /// reason of its retained `offline` status.
    pub fn for_device(&self, device: &str) -> Option<&str> {
        match self {
            Farewell::Offline(reason) => Some(reason),
            Farewell::Clear => None,
            Farewell::Reload { removed } if removed.contains(device) => None,
            Farewell::Reload { .. } => Some("restarting with a changed configuration"),
        }
    }
}

/// What a line or sensor task watches to stop: the gateway's shutdown, or an order for
/// this task alone (a reload that removes or changes it).
#[derive(Debug, Clone)]
pub struct Stop {
    gateway: watch::Receiver<bool>,
    unit: Option<watch::Receiver<Option<Farewell>>>,
}

impl Stop {
    /// Stops with the gateway only.
    pub fn gateway(gateway: watch::Receiver<bool>) -> Self {
        Stop {
            gateway,
            unit: None,
        }
    }

    /// Stops with the gateway, or when `unit` holds a farewell.
    pub fn with_unit(
        gateway: watch::Receiver<bool>,
        unit: watch::Receiver<Option<Farewell>>,
    ) -> Self {
        Stop {
            gateway,
            unit: Some(unit),
        }
    }

    /// The farewell if a stop was ordered.
    pub fn requested(&self) -> Option<Farewell> {
        if let Some(unit) = &self.unit
            && let Some(f) = unit.borrow().clone()
        {
            return Some(f);
        }
        (*self.gateway.borrow()).then(Farewell::gateway_stopping)
    }

    /// Waits until a stop is ordered (cancel safe). A dropped sender counts as the
    /// gateway stopping: nobody is left to keep the task running.
    pub async fn wait(&mut self) -> Farewell {
        loop {
            if let Some(f) = self.requested() {
                return f;
            }
            let unit = async {
                match self.unit.as_mut() {
                    Some(u) => u.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.gateway.changed() => if r.is_err() { return Farewell::gateway_stopping() },
                r = unit => if r.is_err() { return Farewell::gateway_stopping() },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unit_order_wins_and_a_dropped_gateway_sender_stops() {
        let (gw_tx, gw_rx) = watch::channel(false);
        let (unit_tx, unit_rx) = watch::channel(None);
        let mut stop = Stop::with_unit(gw_rx.clone(), unit_rx);
        assert_eq!(stop.requested(), None);
        unit_tx.send_replace(Some(Farewell::Clear));
        assert_eq!(stop.wait().await, Farewell::Clear);
        let mut only_gw = Stop::gateway(gw_rx);
        drop(gw_tx);
        assert_eq!(only_gw.wait().await, Farewell::gateway_stopping());
    }
}
