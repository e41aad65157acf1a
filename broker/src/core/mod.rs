//! The broker core: one task that owns all session state and routes every message.
//!
//! Keeping the state in one place (as Mosquitto does in its single thread) means no
//! locks on the routing path and a simple story for takeover, wills and expiry. The
//! expensive per-byte work, decoding and encoding, happens in the connection tasks.
//!
//! The core itself does no I/O and never reads the clock: events and the time go in
//! ([`Core::handle_event`], [`Core::handle_timeout`]), and what it decided comes out as
//! values the task around it polls: store changes ([`Core::poll_store_op`]), items for
//! connections ([`Core::poll_transmit`]), answers to the in-process API
//! ([`Core::poll_reply`]), its next deadline ([`Core::poll_timeout`]) and, after
//! `Shutdown`, that it has stopped ([`Core::poll_stopped`]). The task ([`run`]) only
//! waits, reads the clock and does the sends.

mod ack;
mod connect;
mod packet;
mod persist;
mod publish;
mod reply;
mod route;
mod subscribe;
mod sys_publish;
mod table;
mod timers;
mod transmit;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::acl::ClientAcl;
pub(crate) use super::events::{Accepted, ClientOrigin, ConnId, ConnectRequest, CoreEvent};
use super::retained::RetainedStore;
use super::session::AckGate;
use super::settings::Settings;
pub(crate) use super::store::Op as StoreOp;
use super::store::{Loaded, Store, StoreWriter};
use super::subscriptions::{Match, SessionKey, SubscriptionTree};
use super::sys::Stats;
use super::{DurableReceipt, DurableSink, SinkId};
use table::SessionTable;

/// Capacity of the queue from connections into the core; a full queue slows the
/// readers down instead of growing memory.
const INBOX_CAPACITY: usize = 4096;

pub(crate) struct Core {
    settings: Arc<Settings>,
    sessions: SessionTable,
    tree: SubscriptionTree,
    retained: RetainedStore,
    sinks: Vec<Arc<dyn DurableSink>>,
    /// The core's own inbox, for acknowledgements that report back (weak, so the core
    /// still stops when every handle is gone).
    inbox: mpsc::WeakSender<CoreEvent>,
    next_conn_id: ConnId,
    timers: timers::Timers,
    /// Reused per publish to avoid an allocation per message.
    scratch: Vec<Match>,
    /// Retained messages and persistent sessions on disk; `None` with persistence off.
    /// The core only makes the changes; the task hands them to the writer
    /// ([`Core::poll_store_op`]).
    store: Option<Store>,
    /// What is to be sent to connections ([`Core::poll_transmit`]).
    out: transmit::Transmits,
    /// Set by `Shutdown`: the core has stopped, and who asked waits for this once the
    /// last outputs are out ([`Core::poll_stopped`]).
    stopped: Option<Stopped>,
    /// Acknowledgement gates to release once the store has committed what they wait for
    /// ([`Core::poll_release`]).
    releases: Vec<(DurableReceipt, Vec<Arc<AckGate>>)>,
    /// Answers to the in-process API, in the order the events came ([`Core::poll_reply`]).
    replies: std::collections::VecDeque<reply::Reply>,
    /// Deliveries in flight to persistent sessions that are not written yet: when each is
    /// due to be written, its session and its store id, in order.
    deferred: std::collections::VecDeque<(Instant, SessionKey, super::store::DeliveryId)>,
    stats: Stats,
    started: Instant,
    /// User names of connected clients that gave one, and the listener of those that
    /// came through one with its own rules: a reload re-resolves their topic rules. Kept
    /// here rather than in every session so other clients pay nothing.
    users: std::collections::HashMap<SessionKey, ClientOrigin>,
}

/// Spawns the core task and returns its inbox (wrapped by [`crate::BrokerHandle`] for the
/// in-process API, cloned by listeners for their connections).
pub(crate) fn spawn(
    settings: Arc<Settings>,
    sinks: Vec<Arc<dyn DurableSink>>,
    store: Option<(Store, Loaded)>,
) -> mpsc::Sender<CoreEvent> {
    let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
    let mut store = store;
    // The task owns the queue into the store's writer thread; the core only makes changes.
    let writer = store.as_mut().and_then(|(s, _)| s.take_writer());
    let core = Core::new(settings, sinks, store, tx.downgrade(), Instant::now());
    tokio::spawn(run(core, writer, rx));
    tx
}

/// Whether the core has handed out its last outputs after stopping.
enum Stopped {
    /// Who asked for the stop, not told yet.
    Pending(oneshot::Sender<()>),
    /// Told.
    Told,
}

impl Core {
    /// A core started at `now` with the sessions and retained messages `store` held,
    /// answering acknowledgements that report back through `inbox`.
    fn new(
        settings: Arc<Settings>,
        sinks: Vec<Arc<dyn DurableSink>>,
        store: Option<(Store, Loaded)>,
        inbox: mpsc::WeakSender<CoreEvent>,
        now: Instant,
    ) -> Core {
        let (store, loaded) = match store {
            Some((s, l)) => (Some(s), Some(l)),
            None => (None, None),
        };
        let mut core = Core {
            settings,
            sessions: SessionTable::new(),
            tree: SubscriptionTree::default(),
            retained: RetainedStore::default(),
            sinks,
            inbox,
            next_conn_id: ConnId::FIRST,
            timers: timers::Timers::default(),
            scratch: Vec::new(),
            store,
            out: transmit::Transmits::default(),
            stopped: None,
            releases: Vec::new(),
            replies: std::collections::VecDeque::new(),
            deferred: std::collections::VecDeque::new(),
            stats: Stats::default(),
            started: now,
            users: std::collections::HashMap::new(),
        };
        if let Some(loaded) = loaded {
            core.restore(loaded, now);
        }
        core.schedule_sys(now);
        core
    }
}

/// The task around the core: it hands the core events and the time, wakes it at the
/// deadlines it asks for, and after each batch sends what the core made: store changes
/// to the writer thread, then items to connections. The core itself does no I/O.
async fn run(mut core: Core, writer: Option<StoreWriter>, mut rx: mpsc::Receiver<CoreEvent>) {
    let mut batch = Vec::with_capacity(64);
    // One timer for the life of the core, moved only when the next deadline changes:
    // a fresh `sleep_until` per wake-up would insert into and remove from the timer
    // wheel on every batch of messages.
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        let deadline = core.poll_timeout();
        if deadline != armed {
            if let Some(t) = deadline {
                sleep.as_mut().reset(t.into());
            }
            armed = deadline;
        }
        tokio::select! {
            n = rx.recv_many(&mut batch, 64) => {
                // The one clock read per batch: the core takes the time as an input
                // and never reads the clock itself, so it can be driven with a fake
                // one (tests.rs), and a batch costs one read, not one per message.
                let now = Instant::now();
                if n == 0 {
                    // Every sender is gone: stop as if told to, with nobody to answer.
                    let (done, _) = oneshot::channel();
                    core.handle_event(CoreEvent::Shutdown(done), now);
                }
                for ev in batch.drain(..) {
                    core.handle_event(ev, now);
                }
            }
            () = &mut sleep, if armed.is_some() => {
                // A fired timer must be reset before it can fire again.
                armed = None;
                core.handle_timeout(Instant::now());
            }
        }
        transmit(&mut core, writer.as_ref());
        if let Some(done) = core.poll_stopped() {
            // Dropping the writer waits for its last commit: what a session is owed is
            // on disk before whoever asked for the stop hears back.
            drop(writer);
            let _ = done.send(());
            return;
        }
    }
}

/// Sends what the core made: store changes first, so the writer starts its commit, then
/// each connection's items (an acknowledgement that waits for a commit waits on its
/// receipt, whichever goes first), then the in-process API's answers.
fn transmit(core: &mut Core, writer: Option<&StoreWriter>) {
    while let Some(op) = core.poll_store_op() {
        // The core makes store changes only with a store, whose writer the task holds.
        if let Some(w) = writer {
            w.send(op);
        }
    }
    while let Some(t) = core.poll_transmit() {
        t.send();
    }
    spawn_releases(core);
    while let Some(r) = core.poll_reply() {
        r.send();
    }
}

/// Waits for each commit the core handed out on a task of its own, then releases (or, if
/// the commit failed, fails) the acknowledgements behind it.
fn spawn_releases(core: &mut Core) {
    while let Some((committed, gates)) = core.poll_release() {
        tokio::spawn(async move {
            if committed.await.is_err() {
                gates.iter().for_each(|g| g.fail());
            }
            drop(gates);
        });
    }
}

impl Core {
    /// The next change for the store's writer, in the order the core made them; `None`
    /// once all are out (or without persistence). Call after every
    /// [`Core::handle_event`] and [`Core::handle_timeout`] until `None`.
    pub(crate) fn poll_store_op(&mut self) -> Option<StoreOp> {
        self.store.as_mut()?.poll_op()
    }

    /// A commit to wait for and the acknowledgement gates to release when it is done
    /// (or to fail, if it could not be made); `None` once all are out. The task awaits
    /// each on a task of its own, so the core never waits for the disk.
    pub(crate) fn poll_release(&mut self) -> Option<(DurableReceipt, Vec<Arc<AckGate>>)> {
        self.releases.pop()
    }

    /// The next answer to the in-process API, in the order the events came; `None` once
    /// all are out. The task sends them after the connections' items.
    pub(crate) fn poll_reply(&mut self) -> Option<reply::Reply> {
        self.replies.pop_front()
    }

    /// Once after a `Shutdown` event: who asked, to be answered when the outputs made
    /// so far are out and the store's writer has committed them. The core handles no
    /// events after it.
    pub(crate) fn poll_stopped(&mut self) -> Option<oneshot::Sender<()>> {
        if !matches!(self.stopped, Some(Stopped::Pending(_))) {
            return None;
        }
        match self.stopped.replace(Stopped::Told) {
            Some(Stopped::Pending(done)) => Some(done),
            _ => None,
        }
    }

    /// Handles one event that arrived at `now`.
    fn handle_event(&mut self, ev: CoreEvent, now: Instant) {
        if self.stopped.is_some() {
            return;
        }
        match ev {
            CoreEvent::Connect(req) => self.on_connect(req, now),
            CoreEvent::Packet {
                session,
                conn_id,
                packet,
            } => {
                if self.sessions.get(session).and_then(|s| s.conn_id()) == Some(conn_id) {
                    self.on_packet(session, packet, now);
                }
            }
            CoreEvent::CloseAfterReplies {
                session,
                conn_id,
                reason,
            } => {
                if let Some(super::session::Link::Network { conn_id: c, tx }) =
                    self.sessions.get(session).and_then(|s| s.link.as_ref())
                    && *c == conn_id
                {
                    self.out.send(
                        tx,
                        match reason {
                            Some(r) => super::outbound::Outbound::Disconnect(r),
                            None => super::outbound::Outbound::Close,
                        },
                    );
                }
            }
            CoreEvent::Closed {
                session,
                conn_id,
                disconnect,
                reason,
            } => self.on_closed(session, conn_id, disconnect, reason, now),
            CoreEvent::LocalPublish { msg, done } => {
                self.stats.local_publishes += 1;
                let (receipts, _) = self.accept(&msg, now);
                self.replies
                    .push_back(reply::Reply::Published(done, receipts));
            }
            CoreEvent::LocalSubscribe {
                filter,
                qos,
                tx,
                done,
            } => {
                let key = self.local_subscribe(&filter, qos, tx);
                self.replies.push_back(reply::Reply::Subscribed(done, key));
            }
            CoreEvent::LocalUnsubscribe(key) => self.end_session(key),
            CoreEvent::Qos2Refused { session, packet_id } => {
                if let Some(s) = self.sessions.get_mut(session)
                    && s.end_incoming_qos2(packet_id)
                    && let Some(sid) = s.store_id
                    && let Some(store) = &self.store
                {
                    store.drop_qos2(sid, packet_id);
                }
            }
            CoreEvent::AddSink(sink, done) => {
                self.sinks.push(sink);
                let id = SinkId(self.sinks.len() - 1);
                self.replies.push_back(reply::Reply::SinkAdded(done, id));
            }
            CoreEvent::Reload(settings, done) => {
                self.reload(settings);
                self.replies.push_back(reply::Reply::Reloaded(done));
            }
            CoreEvent::Snapshot(done) => {
                let snapshot = Box::new(self.sys_snapshot(now));
                self.replies
                    .push_back(reply::Reply::Snapshot(done, snapshot));
            }
            CoreEvent::Shutdown(done) => {
                self.shutdown();
                // Deliveries not acknowledged yet are written: what a session is owed is
                // on disk before the process exits (the task waits for the commit).
                self.flush_deferred(now, true);
                self.stopped = Some(Stopped::Pending(done));
            }
        }
    }

    /// Applies reloaded settings. What a client may read and write changes at once for
    /// connected clients too (a revoked topic stops flowing to an existing subscription
    /// at the next message); offline sessions get their rules when they reconnect.
    fn reload(&mut self, settings: Arc<Settings>) {
        self.settings = settings;
        let mut changed = 0usize;
        for (key, s) in self.sessions.iter_mut() {
            if s.link.is_none() {
                continue;
            }
            let origin = self.users.get(&key);
            let user = origin.and_then(|o| o.user.as_deref());
            let rules = self.settings.acl_for(origin.and_then(|o| o.listener));
            let acl = ClientAcl::resolve(rules, user, &s.client_id).map(Box::new);
            if acl != s.acl {
                changed += 1;
            }
            s.acl = acl;
        }
        tracing::info!(
            clients_with_new_topic_rules = changed,
            "broker settings applied"
        );
    }

    fn shutdown(&mut self) {
        for s in self.sessions.values_mut() {
            if let Some(super::session::Link::Network { tx, .. }) = s.link.take() {
                self.out.send(
                    &tx,
                    super::outbound::Outbound::Disconnect(
                        outpost_mqtt::ReasonCode::SERVER_SHUTTING_DOWN,
                    ),
                );
            }
        }
    }
}
