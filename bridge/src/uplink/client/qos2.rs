//! QoS 2 staging on the send side. A QoS 2 PUBLISH goes on the wire only once its row's
//! `published` stage (with the packet identifier) is durable, and the PUBREL that answers
//! PUBREC only once `released` is: after a crash at any point the next session sends what
//! the cloud expects for that identifier (the PUBLISH again with DUP before PUBREC, the
//! PUBREL after it), so the cloud delivers the message once. While a stage commit is out
//! nothing more goes into the window, which keeps the spool's stages in send order.

use std::collections::HashSet;

use outpost_mqtt::QoS;

use super::super::inflight::Inflight;
use super::{Client, Out};
use crate::spool::{Stage, StageUpdate, StoredMessage};

/// The stage commit in progress and what waits for it.
#[derive(Default)]
pub(super) struct Staging {
    /// A stage commit is out: nothing more goes into the window until it is done.
    committing: bool,
    /// Stage updates to make durable, not yet taken by the driver.
    commit: Option<Vec<StageUpdate>>,
    /// What goes on the wire once the stage commit is durable.
    gated: Vec<Out>,
    /// Rows answered with PUBREC whose `released` stage is not yet asked for, by packet
    /// identifier.
    rel_pending: Vec<(u16, i64)>,
}

impl Staging {
    /// A stage commit is out.
    pub(super) fn committing(&self) -> bool {
        self.committing
    }

    /// Stage updates to make durable now.
    pub(super) fn poll_commit(&mut self) -> Option<Vec<StageUpdate>> {
        self.commit.take()
    }

    /// The commit is durable: what waited for it, in order.
    pub(super) fn committed(&mut self) -> Vec<Out> {
        self.committing = false;
        std::mem::take(&mut self.gated)
    }

    /// Moves the PUBRECs answered since the last fill into `updates` (their `released`
    /// stage) and `outs` (their PUBRELs, sent once that is durable).
    pub(super) fn take_released(&mut self, updates: &mut Vec<StageUpdate>, outs: &mut Vec<Out>) {
        for (pid, id) in self.rel_pending.drain(..) {
            updates.push(StageUpdate {
                id,
                packet_id: pid,
                stage: Stage::Released,
            });
            outs.push(Out::PubRel(pid));
        }
    }

    /// Holds `outs` behind the commit of `updates`; gives them back when there is nothing
    /// to commit (they may go at once).
    pub(super) fn hold(&mut self, updates: Vec<StageUpdate>, outs: Vec<Out>) -> Option<Vec<Out>> {
        if updates.is_empty() {
            return Some(outs);
        }
        self.committing = true;
        self.commit = Some(updates);
        self.gated = outs;
        None
    }

    /// PUBREC came for the row `id` under `pid`: its `released` stage is due.
    pub(super) fn on_released(&mut self, pid: u16, id: i64) {
        self.rel_pending.push((pid, id));
    }

    /// A PUBREL for `pid` is already due or waiting for its stage.
    pub(super) fn pubrel_queued(&self, pid: u16) -> bool {
        self.rel_pending.iter().any(|(p, _)| *p == pid)
            || self
                .gated
                .iter()
                .any(|o| matches!(o, Out::PubRel(p) if *p == pid))
    }

    /// A row's PUBLISH waits for the commit.
    pub(super) fn publish_held(&self) -> bool {
        self.gated.iter().any(|o| matches!(o, Out::Publish { .. }))
    }

    /// Rows given a window slot whose PUBLISH still waits for the commit.
    pub(super) fn unsent_rows(&self) -> HashSet<i64> {
        self.gated
            .iter()
            .filter_map(|o| match o {
                Out::Publish { row, .. } => Some(*row),
                Out::PubRel(_) | Out::Status(_) => None,
            })
            .collect()
    }
}

impl Client<'_> {
    /// At the start of a session: the spool's rows in a QoS 2 exchange keep their
    /// identifiers reserved until they come round again (and are resumed or sent anew,
    /// see [`Client::resume_qos2`]).
    pub(super) fn resume_stages(&mut self, in_progress: &[StoredMessage]) {
        if self.limits.moved && !in_progress.is_empty() {
            let released = in_progress
                .iter()
                .filter(|r| r.stage == Stage::Released)
                .count();
            tracing::info!(bridge = %self.setup.name, rows = in_progress.len(), released,
                "moved to another broker: {} QoS 2 messages the previous broker had not \
                 completed ({released} past PUBREC there) go up here as new messages",
                in_progress.len());
        } else if !in_progress.is_empty() && !self.limits.session_present {
            tracing::warn!(bridge = %self.setup.name, rows = in_progress.len(),
                "cloud has no session for us: QoS 2 messages in flight are resent and may be duplicated");
        }
        // Persisted QoS 2 identifiers stay reserved until their rows come round again.
        for row in in_progress {
            if let Some(pid) = row.packet_id {
                self.ids.reserve(pid);
            }
        }
    }

    /// A row the spool has in a QoS 2 exchange: `Ok` with what resumes it at the same
    /// broker (the PUBREL past PUBREC, else the PUBLISH again with DUP), `Err(row)` when
    /// it goes up as a new message instead (another broker, or no QoS 2 any more), its
    /// old identifier freed.
    // The row passes through by value on the common path (`Err`: a new message); boxing
    // it would allocate per row.
    #[allow(clippy::result_large_err)]
    pub(super) fn resume_qos2(&mut self, row: StoredMessage) -> Result<Out, StoredMessage> {
        let id = row.id;
        match (row.stage, row.packet_id) {
            (Stage::Released | Stage::Published, Some(pid)) if self.limits.moved => {
                // Another broker has (or had) these: this one never saw them, so they go
                // up here as new exchanges under fresh identifiers.
                self.ids.release(pid);
                Err(row)
            }
            (Stage::Released, Some(pid)) => {
                self.inflight.insert(
                    pid,
                    Inflight::Row {
                        id,
                        stage: Stage::Released,
                    },
                );
                Ok(Out::PubRel(pid))
            }
            (Stage::Published, Some(pid)) if self.limits.max_qos == QoS::ExactlyOnce => {
                self.inflight.insert(
                    pid,
                    Inflight::Row {
                        id,
                        stage: Stage::Published,
                    },
                );
                let publish = self.publish_of(row, QoS::ExactlyOnce, Some(pid), true);
                Ok(Out::Publish { row: id, publish })
            }
            (Stage::Published, Some(pid)) => {
                // The cloud no longer takes QoS 2 (a QoS 2 PUBLISH would get us disconnected
                // over and over): send it as QoS 1 under a fresh identifier.
                self.ids.release(pid);
                Err(row)
            }
            _ => Err(row),
        }
    }

    /// A new QoS 2 exchange for row `id` under `pid`: its `published` stage goes into
    /// `updates`, and the PUBLISH waits for it.
    pub(super) fn stage_published(&mut self, id: i64, pid: u16, updates: &mut Vec<StageUpdate>) {
        updates.push(StageUpdate {
            id,
            packet_id: pid,
            stage: Stage::Published,
        });
        self.inflight.insert(
            pid,
            Inflight::Row {
                id,
                stage: Stage::Published,
            },
        );
    }
}
