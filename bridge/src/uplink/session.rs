//! The I/O driver of one connected session with the cloud: the socket, the spool reads and
//! commits, the local broker and the clock, around the sans-I/O [`Client`] that holds
//! the protocol state (the publish window, QoS 2 stages, careful resend, downlink) and
//! its timers (keep alive, replay rate, goodbye): the driver sleeps until
//! [`Client::poll_timeout`] and calls [`Client::handle_timeout`].

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::Ctx;
use super::client::{Client, Limits, SessionEnd, Setup, dropped, lost};
use super::transport::Io;
use crate::clock::now_ms;
use crate::error::SpoolError;
use crate::spool::{NewMessage, StoredMessage};

/// Rows read from the spool at a time.
const FETCH_LIMIT: usize = 4096;
/// Acknowledged rows are deleted in groups: this many, or whatever gathered in
/// [`ACK_FLUSH_EVERY`]. A crash in between only resends a few acknowledged QoS 1 messages
/// (QoS 2 rows that lost their delete get a harmless PUBREL again).
const ACK_BATCH: usize = 4096;
/// Longest an acknowledged row waits for its delete to be queued.
const ACK_FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How long a write may block before the link counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to read what the cloud sent before it dropped the link.
const SALVAGE_TIME: Duration = Duration::from_millis(200);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One session's I/O around its [`Client`].
pub(crate) struct Session<'a> {
    ctx: &'a Ctx,
    io: Box<dyn Io>,
    rbuf: BytesMut,
    client: Client<'a>,
    committed: watch::Receiver<i64>,
    fetch: Option<BoxFuture<Result<Vec<StoredMessage>, SpoolError>>>,
    gate: Option<BoxFuture<Result<(), SpoolError>>>,
    down_gate: Option<BoxFuture<Result<(), SpoolError>>>,
}

async fn opt<T>(f: &mut Option<BoxFuture<T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is no timer to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl<'a> Session<'a> {
    /// A session over `io`, connected with `limits`; `rbuf` holds what came after CONNACK.
    pub(crate) fn new(
        ctx: &'a Ctx,
        io: Box<dyn Io>,
        rbuf: BytesMut,
        limits: Limits,
        careful_through: i64,
    ) -> Self {
        let setup = Setup {
            name: &ctx.name,
            protocol: ctx.protocol,
            rules: &ctx.rules,
            status: ctx.config.status.enabled.then_some(&ctx.status),
            replay_rate: ctx.config.replay_rate,
            stats: &ctx.stats,
        };
        Session {
            ctx,
            io,
            rbuf,
            client: Client::new(setup, limits, careful_through, Instant::now(), now_ms()),
            committed: ctx.spool.committed(),
            fetch: None,
            gate: None,
            down_gate: None,
        }
    }

    /// Run until the link fails or shutdown completes.
    /// Also returns the QoS 1 rows left without PUBACK, with their packet ids, for the
    /// next connection's [`Session::resume_qos1`].
    pub(crate) async fn run(
        mut self,
        shutdown: &mut watch::Receiver<bool>,
        live0: &mut mpsc::Receiver<NewMessage>,
    ) -> (SessionEnd, Vec<(i64, u16)>) {
        let end = match self.drive(shutdown, live0).await {
            Ok(()) => SessionEnd::Shutdown,
            Err(SessionEnd::Dropped { why, .. }) => {
                self.salvage_acks().await;
                self.client.handle_drop(why)
            }
            Err(end) => end,
        };
        self.send_acked();
        // Queued after the deletes: acknowledged rows stay spared from drop-oldest until
        // their delete is applied, so none is counted both forwarded and dropped.
        self.ctx.spool.untake_all();
        (end, self.client.unacked_qos1())
    }

    /// QoS 1 rows the last connection left without PUBACK: sent again under the same
    /// packet ids when the cloud kept the session (see [`Client::resume_qos1`]).
    pub(crate) fn resume_qos1(mut self, rows: Vec<(i64, u16)>) -> Self {
        self.client.resume_qos1(rows);
        self
    }

    /// After the cloud dropped the link, read what it sent before closing: a write that
    /// failed on the reset may have kept us from reading acknowledgements of rows it had
    /// accepted, and those rows must be neither blamed nor resent.
    async fn salvage_acks(&mut self) {
        let deadline = tokio::time::Instant::now() + SALVAGE_TIME;
        loop {
            self.client.salvage(&mut self.rbuf, Instant::now());
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    }

    async fn drive(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        live0: &mut mpsc::Receiver<NewMessage>,
    ) -> Result<(), SessionEnd> {
        // The reader sees committed state only: let the previous session's deletes and
        // stage changes land first, or acknowledged rows would be sent again.
        self.ctx
            .spool
            .flush()
            .await
            .map_err(|e| lost(format!("spool: {e}")))?;
        let in_progress = self
            .ctx
            .spool
            .in_progress()
            .await
            .map_err(|e| lost(format!("spool: {e}")))?;
        // The cloud resends unreleased QoS 2 PUBLISHes only within its session.
        let incoming = if self.client.session_present() {
            self.ctx
                .spool
                .incoming(&self.ctx.name)
                .await
                .map_err(|e| lost(format!("spool: {e}")))?
        } else {
            self.ctx
                .spool
                .clear_incoming(&self.ctx.name)
                .await
                .map_err(|e| lost(format!("spool: {e}")))?;
            Vec::new()
        };
        self.client.start(&in_progress, incoming, Instant::now())?;
        let mut tick = tokio::time::interval(ACK_FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.fill()?;
            self.pump_downlink()?;
            self.flush().await?;
            if self.fetch.is_none()
                && let Some(after) = self.client.wants_rows(FETCH_LIMIT / 2)
            {
                let spool = self.ctx.spool.clone();
                self.fetch = Some(Box::pin(
                    async move { spool.fetch(after, FETCH_LIMIT).await },
                ));
            }
            let timeout = self.client.poll_timeout();
            let exhausted = self.client.exhausted();
            tokio::select! {
                r = self.io.read_buf(&mut self.rbuf) => {
                    match r {
                        Ok(0) => return Err(dropped("connection closed by the cloud")),
                        Ok(_) => self.on_bytes().await?,
                        Err(e) => return Err(dropped(format!("read: {e}"))),
                    }
                }
                rows = opt(&mut self.fetch) => {
                    self.fetch = None;
                    let rows = rows.map_err(|e| lost(format!("spool: {e}")))?;
                    let last = rows.len() < FETCH_LIMIT;
                    self.client.handle_rows(rows, last);
                }
                done = opt(&mut self.down_gate) => {
                    self.down_gate = None;
                    done.map_err(|e| lost(format!("spool: {e}")))?;
                    self.client.handle_incoming_committed()?;
                }
                done = opt(&mut self.gate) => {
                    self.gate = None;
                    done.map_err(|e| lost(format!("spool: {e}")))?;
                    self.client.handle_stages_committed(Instant::now())?;
                }
                changed = self.committed.changed(), if exhausted => {
                    changed.map_err(|_| lost("spool writer stopped"))?;
                    self.committed.borrow_and_update();
                    self.client.handle_more_rows();
                }
                Some(msg) = live0.recv() => self.client.handle_live_qos0(msg),
                _ = tick.tick() => self.send_acked(),
                _ = sleep_until(timeout) => self.client.handle_timeout(Instant::now())?,
                _ = super::stop_requested(shutdown) => return self.goodbye().await,
            }
        }
    }

    /// Moves spooled rows into the client's window under the drop-oldest fence, and
    /// starts the stage commit they wait for.
    fn fill(&mut self) -> Result<(), SessionEnd> {
        if self.client.acked_len() >= ACK_BATCH {
            self.send_acked();
        }
        {
            // One uncontended lock per refill; drop-oldest takes it only when the spool
            // is full.
            let mut marks = self.ctx.spool.fence().lock();
            self.client.fill(Instant::now(), now_ms(), &mut *marks)?;
        }
        if let Some(updates) = self.client.poll_commit() {
            // Deletes before any stage write, so a freed packet id is never persisted for
            // a new row while the old row still holds it.
            self.send_acked();
            let spool = self.ctx.spool.clone();
            self.gate = Some(Box::pin(async move { spool.set_stages(updates).await }));
        }
        Ok(())
    }

    /// Starts the commit that the oldest downlink answers wait for.
    fn pump_downlink(&mut self) -> Result<(), SessionEnd> {
        self.client.pump_downlink()?;
        if let Some(ops) = self.client.poll_incoming_commit() {
            let spool = self.ctx.spool.clone();
            let bridge = self.ctx.name.clone();
            self.down_gate = Some(Box::pin(
                async move { spool.apply_incoming(&bridge, ops).await },
            ));
        }
        Ok(())
    }

    /// Hand acknowledged rows to the spool writer.
    fn send_acked(&mut self) {
        let acked = self.client.poll_acked();
        if !acked.is_empty() {
            self.ctx.spool.delete_many(acked);
        }
    }

    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if self.client.poll_transmit().is_empty() {
            return Ok(());
        }
        let io = &mut self.io;
        let wbuf = &*self.client.poll_transmit();
        let write = async move {
            io.write_all(wbuf).await?;
            // TLS and WebSocket buffer inside; a flush puts the bytes on the wire.
            io.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(dropped(format!("write: {e}"))),
            Err(_) => return Err(lost("write timed out")),
        }
        self.client.handle_flushed(Instant::now());
        Ok(())
    }

    async fn on_bytes(&mut self) -> Result<(), SessionEnd> {
        let now = Instant::now();
        loop {
            match self.client.handle_next(&mut self.rbuf, now) {
                Ok(true) => {
                    while let Some(local) = self.client.poll_delivery() {
                        if self.ctx.local.send(local).await.is_err() {
                            tracing::warn!(bridge = %self.ctx.name, "local broker gone: downlink message not delivered");
                        }
                    }
                }
                Ok(false) => return Ok(()),
                Err(end) => {
                    if self.client.farewell() {
                        let _ = self.flush().await;
                    }
                    return Err(end);
                }
            }
        }
    }

    /// Publish the clean offline status, wait (bounded) for its ack while still taking
    /// acknowledgements of the window, then DISCONNECT so the will is not published.
    async fn goodbye(&mut self) -> Result<(), SessionEnd> {
        if self.client.handle_shutdown(Instant::now())? {
            self.flush().await?;
            // Bounded by the client's goodbye timer, set when the status went out.
            while self.client.goodbye_pending() {
                let timeout = self.client.poll_timeout();
                tokio::select! {
                    r = self.io.read_buf(&mut self.rbuf) => match r {
                        Ok(n) if n > 0 => {
                            self.on_bytes().await?;
                            self.flush().await?;
                        }
                        _ => return Err(lost("connection closed during shutdown")),
                    },
                    _ = sleep_until(timeout) => self.client.handle_timeout(Instant::now())?,
                }
            }
        }
        self.client.disconnect()?;
        self.flush().await?;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
        tracing::info!(bridge = %self.ctx.name, inflight = self.client.inflight_len(), "disconnected cleanly");
        Ok(())
    }
}
