//! The uplink: connect (TCP or TLS), run a session, reconnect with backoff, forever until
//! shutdown. Also mirrors the link state on the local broker.

mod aliases;
mod backoff;
mod careful;
mod client;
mod downlink;
mod inflight;
mod packet_ids;
mod progress;
mod session;
mod tls;
mod transport;
mod window;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use outpost_mqtt::{
    Connect, Packet, Properties, Protocol, QoS, Will, codec::decode, codec::encode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::LocalPublish;
use crate::clock::now_ms;
use crate::config::{Address, BridgeConfig};
use crate::rules::Rules;
use crate::spool::{NewMessage, Spool, StrikeOutcome};
use crate::stats::BridgeStats;
use crate::status::{OfflineReason, Status};

pub use backoff::Backoff;
use client::{Limits, MAX_INCOMING_PACKET, SessionEnd};
use session::Session;
pub use tls::{client_cert_not_after, client_config};

/// A session shorter than this does not reset the backoff (a cloud that accepts and then
/// drops us at once must not be hammered).
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Drops of a 3.1.1 link with an unanswered QoS 2 PUBLISH out, in a row, that make the
/// bridge conclude the cloud has no QoS 2. Two, not one: any link may fail once while a
/// QoS 2 message is out, but the second time that message is the only one out (it is
/// resent alone, see `Client::must_wait` in `client/send.rs`).
const QOS2_REFUSALS: u32 = 2;

/// Everything a link needs, shared by the reconnect loop and its sessions.
pub(crate) struct Ctx {
    pub name: String,
    pub config: BridgeConfig,
    /// Where the cloud is, primary first.
    pub addresses: Vec<Address>,
    pub protocol: Protocol,
    pub client_id: String,
    pub rules: Rules,
    pub spool: Spool,
    pub stats: Arc<BridgeStats>,
    pub local: mpsc::Sender<LocalPublish>,
    pub status: Status,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Consecutive sessions a 3.1.1 cloud dropped with a QoS 2 PUBLISH unanswered; at
    /// [`QOS2_REFUSALS`] the link goes on with QoS 1 (until a restart or reload).
    pub qos2_refusals: std::sync::atomic::AtomicU32,
    /// The client certificate's notAfter (unix seconds, RFC 3339), for mutual TLS.
    pub cert_expiry: Option<(i64, String)>,
}

impl Ctx {
    /// Logs a warning when the client certificate expires within `tls.warn_expiry_days`
    /// (or has expired), naming the file and the date.
    fn warn_cert_expiry(&self) {
        let (Some((not_after, date)), Some(tls)) = (&self.cert_expiry, &self.config.tls) else {
            return;
        };
        let warn_days = tls.warn_expiry_days();
        let Some(days) = self.stats.cert_expires_in_days(now_ms()) else {
            return;
        };
        let file = tls
            .cert_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if *not_after <= now_ms() / 1000 {
            tracing::error!(bridge = %self.name, file = %file, not_after = %date,
                "the TLS client certificate has expired: the cloud will refuse the link; \
                 install a renewed certificate and reload");
        } else if warn_days > 0 && days < i64::from(warn_days) {
            tracing::warn!(bridge = %self.name, file = %file, not_after = %date, days,
                "the TLS client certificate expires in {days} days (on {date}): renew it \
                 before then and reload (tls.warn_expiry_days = {warn_days})");
        }
    }

    pub(crate) fn state_topic(&self) -> String {
        format!("$SYS/broker/bridge/{}/state", self.name)
    }

    fn mirror_link_state(&self, up: bool) {
        if self.stats.connected.swap(up, Relaxed) != up
            || self.stats.link_changed_ms.load(Relaxed) == 0
        {
            self.stats.link_changed_ms.store(now_ms(), Relaxed);
        }
        let msg = LocalPublish {
            topic: self.state_topic(),
            payload: Bytes::from_static(if up { b"connected" } else { b"disconnected" }),
            qos: QoS::AtLeastOnce,
            retain: true,
        };
        if self.local.try_send(msg).is_err() {
            tracing::debug!(bridge = %self.name, "local queue full: link state not mirrored");
        }
    }
}

impl Ctx {
    /// The cloud dropped a link that had come up: blame the oldest row in flight (or
    /// nobody), and set it aside once it was to blame for `dead_letter_after` consecutive
    /// losses. A cloud that is down never gets here (no CONNACK, no session), so an
    /// outage alone cannot set a message aside.
    async fn count_strike(&self, suspect: Option<i64>, careful_through: i64) {
        let limit = self.config.spool.dead_letter_after;
        if limit == 0 {
            return;
        }
        match self.spool.strike(suspect, careful_through, limit).await {
            Ok(StrikeOutcome::Counted { row, strikes }) => {
                tracing::info!(bridge = %self.name, row, strikes, limit,
                    "the cloud dropped the link while this spooled message was the oldest in flight");
            }
            Ok(StrikeOutcome::DeadLettered {
                row,
                topic,
                size,
                strikes,
            }) => {
                tracing::warn!(bridge = %self.name, row, %topic, size, strikes,
                    "poison message: the cloud dropped the link each time it was sent; moved to \
                     the spool's dead_letters table, carrying on with the next messages");
            }
            Ok(StrikeOutcome::Cleared | StrikeOutcome::Gone) => {}
            Err(e) => {
                tracing::warn!(bridge = %self.name, error = %e, "spool: link-loss strike not recorded");
            }
        }
    }
}

/// CONNECT for a session that persists; with `reset`, for one that ends at once (clean
/// start, no expiry, no will), used to discard what a broker kept from an earlier stay.
fn connect_packet(ctx: &Ctx, reset: bool) -> Packet {
    let cfg = &ctx.config;
    let mut properties = Properties::default();
    if ctx.protocol.is_v5() {
        properties.session_expiry_interval = Some(if reset {
            0
        } else {
            cfg.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32
        });
        properties.receive_maximum = Some(client::RECEIVE_MAXIMUM);
        properties.maximum_packet_size = Some(MAX_INCOMING_PACKET as u32);
    }
    let will = (cfg.status.enabled && !reset).then(|| Will {
        topic: ByteString::from(ctx.status.topic.clone()),
        payload: ctx.status.offline(OfflineReason::Unexpected),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::default(),
    });
    Packet::Connect(Box::new(Connect {
        protocol: ctx.protocol,
        // A persistent session keeps QoS 2 state on the cloud across our restarts.
        clean_start: reset,
        keep_alive: cfg.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
        properties,
        client_id: ctx.client_id.clone(),
        will,
        username: cfg.username.clone(),
        password: cfg.password.clone().map(Bytes::from),
    }))
}

/// Opens the transport (TCP, TLS, WebSocket) to `addr`.
async fn open(ctx: &Ctx, addr: &Address) -> Result<Box<dyn transport::Io>, ConnectError> {
    let tls = ctx.tls.as_ref().map(|c| {
        (
            c,
            ctx.config
                .tls
                .as_ref()
                .and_then(|t| t.server_name.as_deref()),
        )
    });
    transport::connect(addr, tls)
        .await
        .map_err(|cause| ConnectError::Open {
            host: addr.host.clone(),
            port: addr.port,
            cause,
        })
}

/// Why an attempt to connect to the cloud failed; logged, and shown on the status page
/// as the bridge's last error.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// TCP, TLS or the WebSocket handshake failed.
    #[error("connect {host}:{port}: {cause}")]
    Open {
        host: String,
        port: u16,
        cause: std::io::Error,
    },
    /// Our own CONNECT or DISCONNECT did not encode (a config the codec refuses).
    #[error("encode {packet}: {cause}")]
    Encode {
        packet: &'static str,
        cause: outpost_mqtt::EncodeError,
    },
    /// Sending CONNECT or DISCONNECT failed.
    #[error("write {packet}: {cause}")]
    Write {
        packet: &'static str,
        cause: std::io::Error,
    },
    /// Reading the answer to CONNECT failed.
    #[error("read CONNACK: {0}")]
    ReadConnAck(std::io::Error),
    /// The cloud closed the connection without answering CONNECT.
    #[error("connection closed before CONNACK")]
    ClosedBeforeConnAck,
    /// The cloud answered CONNECT with another packet (MQTT-3.2.0-1).
    #[error("expected CONNACK, got {0:?}")]
    NotConnAck(Box<Packet>),
    /// The answer to CONNECT did not decode.
    #[error("bad CONNACK: {0}")]
    BadConnAck(outpost_mqtt::DecodeError),
    /// The cloud refused with an error reason code, and maybe a reason string.
    #[error(
        "cloud refused the connection (reason 0x{code:02x}{})",
        .reason_string.as_deref().map(|s| format!(": {s}")).unwrap_or_default()
    )]
    Refused {
        code: u8,
        reason_string: Option<String>,
    },
    /// The task that records the address in use did not finish.
    #[error("recording the address in use: {0}")]
    AddressTask(tokio::task::JoinError),
    /// The address in use could not be written (durably) beside the spool.
    #[error("recording the address in use beside the spool: {0}")]
    AddressWrite(std::io::Error),
    /// No CONNACK within `reconnect.connect_timeout`.
    #[error("connect timed out")]
    TimedOut,
}

/// Ends whatever session `addr` kept for our client id: a clean-start CONNECT with no
/// expiry, then DISCONNECT. What the broker still held from an earlier stay (QoS 2
/// exchanges it never saw completed, messages queued for us) is history by now: those
/// messages went to another broker meanwhile.
async fn reset_session(ctx: &Ctx, addr: &Address) -> Result<(), ConnectError> {
    let (mut io, _, _) = mqtt_connect(ctx, addr, true).await?;
    let mut buf = BytesMut::new();
    encode(
        &Packet::Disconnect(outpost_mqtt::Disconnect {
            reason: outpost_mqtt::ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::default(),
        }),
        ctx.protocol,
        &mut buf,
    )
    .map_err(|cause| ConnectError::Encode {
        packet: "DISCONNECT",
        cause,
    })?;
    let write = |cause| ConnectError::Write {
        packet: "DISCONNECT",
        cause,
    };
    io.write_all(&buf).await.map_err(write)?;
    io.flush().await.map_err(write)?;
    let _ = io.shutdown().await;
    Ok(())
}

async fn mqtt_connect(
    ctx: &Ctx,
    addr: &Address,
    reset: bool,
) -> Result<(Box<dyn transport::Io>, BytesMut, Box<outpost_mqtt::ConnAck>), ConnectError> {
    let mut io = open(ctx, addr).await?;
    let mut buf = BytesMut::with_capacity(4096);
    encode(&connect_packet(ctx, reset), ctx.protocol, &mut buf).map_err(|cause| {
        ConnectError::Encode {
            packet: "CONNECT",
            cause,
        }
    })?;
    let write = |cause| ConnectError::Write {
        packet: "CONNECT",
        cause,
    };
    io.write_all(&buf).await.map_err(write)?;
    // TLS and WebSocket buffer inside; a flush puts CONNECT on the wire.
    io.flush().await.map_err(write)?;
    buf.clear();
    let connack = loop {
        if io
            .read_buf(&mut buf)
            .await
            .map_err(ConnectError::ReadConnAck)?
            == 0
        {
            return Err(ConnectError::ClosedBeforeConnAck);
        }
        match decode(&mut buf, ctx.protocol, MAX_INCOMING_PACKET) {
            Ok(Some(Packet::ConnAck(c))) => break Box::new(c),
            Ok(Some(other)) => return Err(ConnectError::NotConnAck(Box::new(other))),
            Ok(None) => continue,
            Err(e) => return Err(ConnectError::BadConnAck(e)),
        }
    };
    if connack.reason.is_error() {
        return Err(ConnectError::Refused {
            code: connack.reason.0,
            reason_string: connack.properties.reason_string,
        });
    }
    Ok((io, buf, connack))
}

async fn handshake(
    ctx: &Ctx,
    addr: &Address,
    moved: bool,
) -> Result<(Box<dyn transport::Io>, BytesMut, Limits), ConnectError> {
    let (io, buf, connack) = mqtt_connect(ctx, addr, false).await?;
    let p = &connack.properties;
    let cfg = &ctx.config;
    let mut max_qos = cfg.max_qos;
    if ctx.qos2_refusals.load(Relaxed) >= QOS2_REFUSALS {
        max_qos = max_qos.min(QoS::AtLeastOnce);
    }
    // The codec takes only 0 or 1 here (a byte flag, MQTT-3.2.2-9).
    if let Some(server_max) = p.maximum_qos.and_then(QoS::from_u8)
        && server_max < max_qos
    {
        let announced = server_max as u8;
        tracing::warn!(bridge = %ctx.name, server_max = announced,
            "cloud CONNACK says Maximum QoS {announced}: QoS 2 messages are downgraded");
        max_qos = server_max;
    }
    let window = usize::from(
        cfg.max_inflight
            .min(p.receive_maximum.unwrap_or(u16::MAX))
            .max(1),
    );
    let keep_alive = p
        .server_keep_alive
        .map_or(cfg.keep_alive, |s| Duration::from_secs(u64::from(s)));
    let limits = Limits {
        window,
        max_qos,
        max_packet: p.maximum_packet_size.map_or(268_435_460, |m| m as usize),
        retain_available: p.retain_available != Some(0),
        keep_alive,
        session_present: connack.session_present,
        moved,
        topic_alias_max: p.topic_alias_maximum.unwrap_or(0),
    };
    Ok((io, buf, limits))
}

/// Waits `primary_retry`, then tells whether the primary address accepts a connection
/// (TCP, and the TLS or WebSocket handshake where used; no MQTT session is opened).
async fn primary_reachable(ctx: &Ctx) -> bool {
    tokio::time::sleep(ctx.config.primary_retry).await;
    let probe = tokio::time::timeout(
        ctx.config.reconnect.connect_timeout,
        open(ctx, &ctx.addresses[0]),
    );
    match probe.await {
        Ok(Ok(mut io)) => {
            let _ = io.shutdown().await;
            true
        }
        Ok(Err(why)) => {
            tracing::debug!(bridge = %ctx.name, "primary still unreachable: {why}");
            false
        }
        Err(_) => false,
    }
}

/// The address the spool's QoS 2 stages belong to, kept beside the spool file.
mod last_address {
    use super::{ConnectError, Ctx};

    fn path(ctx: &Ctx) -> std::path::PathBuf {
        let mut p = ctx.spool.path().as_os_str().to_owned();
        p.push(".address");
        p.into()
    }

    /// The address of the last session, if any was recorded.
    pub(super) async fn read(ctx: &Ctx) -> Option<String> {
        let path = path(ctx);
        match tokio::fs::read_to_string(&path).await {
            Ok(s) => Some(s.trim_end().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(bridge = %ctx.name, file = %path.display(), error = %e,
                    "cannot read the address of the last session; assuming the first one is used");
                None
            }
        }
    }

    /// Records `address` durably (write, fsync, rename, fsync the directory).
    pub(super) async fn write(ctx: &Ctx, address: &str) -> Result<(), ConnectError> {
        let path = path(ctx);
        let text = address.to_owned();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = std::path::PathBuf::from(tmp);
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(ConnectError::AddressTask)?
        .map_err(ConnectError::AddressWrite)
    }
}

/// Resolves once shutdown is requested, or when nobody can request it any more (the
/// sender is gone), so a dropped handle never leaves a loop spinning on a closed channel.
pub(crate) async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The reconnect loop; returns after a clean shutdown.
/// What one uplink task hands to the next when a reconfigure replaces it.
pub(crate) struct Carry {
    /// QoS 0 messages waiting for the link.
    pub live0: mpsc::Receiver<NewMessage>,
    /// Messages up to this spool id are resent one at a time (poison detection).
    pub careful_through: i64,
}

pub(crate) async fn run(
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
    mut live0: mpsc::Receiver<NewMessage>,
    careful_through: i64,
) -> Carry {
    let cfg = &ctx.config.reconnect;
    let mut backoff = Backoff::new(cfg.min, cfg.max);
    let mut connected_before = false;
    let mut stopping = false;
    let mut careful_through = careful_through;
    // The row blamed at the last loss, when that loss was a drop by the cloud.
    let mut last_drop: Option<Option<i64>> = None;
    // QoS 1 rows the last connection left without PUBACK, with their packet ids.
    let mut qos1_out: Vec<(i64, u16)> = Vec::new();
    let mut repeats = progress::Repeats::default();
    let count = ctx.addresses.len();
    // The address tried next; a failed attempt moves on to the next one in the list.
    let mut at = 0usize;
    let mut failed_in_row = 0usize;
    let mut last_used = last_address::read(&ctx).await;
    ctx.mirror_link_state(false);
    ctx.warn_cert_expiry();
    loop {
        if stopping || *shutdown.borrow() {
            break;
        }
        let addr = &ctx.addresses[at];
        let text = ctx.config.address.as_slice()[at].as_str();
        // Independent brokers each keep their own session: coming to one from another,
        // what it kept from an earlier stay is discarded first, and QoS 2 messages the
        // previous broker had not completed go up here as new ones (docs/clouds.md).
        let moved = !ctx.config.shared_session && last_used.as_deref().is_some_and(|l| l != text);
        let attempt = tokio::select! {
            r = tokio::time::timeout(cfg.connect_timeout, async {
                if moved {
                    reset_session(&ctx, addr).await?;
                }
                let conn = handshake(&ctx, addr, moved).await?;
                if last_used.as_deref() != Some(text) {
                    // Durable before anything is sent: after a crash, the next start must
                    // know which broker the spool's QoS 2 stages belong to.
                    last_address::write(&ctx, text).await?;
                }
                Ok::<_, ConnectError>(conn)
            }) => r.unwrap_or(Err(ConnectError::TimedOut)),
            _ = stop_requested(&mut shutdown) => {
                stopping = true;
                continue;
            }
        };
        let mut delay = None;
        match attempt {
            Ok((io, rbuf, limits)) => {
                if connected_before {
                    BridgeStats::bump(&ctx.stats.reconnects);
                    ctx.warn_cert_expiry();
                }
                connected_before = true;
                failed_in_row = 0;
                last_used = Some(text.to_owned());
                repeats.reset();
                ctx.stats.set_address(text);
                let backlog = progress::Backlog::now(&ctx.stats, now_ms());
                tracing::info!(bridge = %ctx.name, address = %text,
                    max_window = limits.window, max_qos = limits.max_qos as u8,
                    session_present = limits.session_present,
                    "connected to the cloud; {} waiting in the spool; using {text}", backlog.describe());
                if moved {
                    tracing::info!(bridge = %ctx.name, address = %text,
                        "moved to another broker: started a fresh session there");
                }
                // QoS 0 that waited for the link is stale by now; it was best effort.
                while live0.try_recv().is_ok() {
                    BridgeStats::bump(&ctx.stats.dropped_qos0);
                }
                ctx.mirror_link_state(true);
                progress::watch_drain(ctx.name.clone(), ctx.stats.clone(), backlog);
                let began = Instant::now();
                // The session stops on shutdown, or to go back to the primary once it is
                // reachable again (round_robin = false).
                let (leave, mut leave_rx) = watch::channel(false);
                let probe_primary = !ctx.config.round_robin && at != 0;
                let mut back_to_primary = false;
                let end = {
                    let session = Session::new(&ctx, io, rbuf, limits, careful_through)
                        .resume_qos1(std::mem::take(&mut qos1_out))
                        .run(&mut leave_rx, &mut live0);
                    tokio::pin!(session);
                    let mut leaving = false;
                    loop {
                        tokio::select! {
                            (end, unacked) = &mut session => {
                                qos1_out = unacked;
                                break end;
                            }
                            _ = stop_requested(&mut shutdown), if !leaving => {
                                leaving = true;
                                leave.send_replace(true);
                            }
                            up = primary_reachable(&ctx), if probe_primary && !leaving => {
                                if up {
                                    tracing::info!(bridge = %ctx.name, primary = %ctx.config.address.as_slice()[0],
                                        "the primary address is reachable again: going back to it");
                                    leaving = true;
                                    back_to_primary = true;
                                    leave.send_replace(true);
                                }
                            }
                        }
                    }
                };
                ctx.mirror_link_state(false);
                match end {
                    SessionEnd::Shutdown if back_to_primary && !*shutdown.borrow() => {
                        at = 0;
                        delay = Some(Duration::ZERO);
                    }
                    SessionEnd::Shutdown => break,
                    SessionEnd::Lost(why) => {
                        last_drop = None;
                        tracing::warn!(bridge = %ctx.name, address = %text, "link lost: {why}");
                        ctx.stats.set_error(format!("link lost: {why}"));
                    }
                    SessionEnd::Dropped {
                        why,
                        suspect,
                        out_through,
                        qos2_unanswered,
                    } => {
                        tracing::warn!(bridge = %ctx.name, address = %text, "link lost: {why}");
                        ctx.stats.set_error(format!("link lost: {why}"));
                        let refusals = if qos2_unanswered && !ctx.protocol.is_v5() {
                            ctx.qos2_refusals.fetch_add(1, Relaxed) + 1
                        } else {
                            // Not in a row: start over, unless already concluded.
                            let _ = ctx.qos2_refusals.fetch_update(Relaxed, Relaxed, |n| {
                                (n < QOS2_REFUSALS).then_some(0)
                            });
                            0
                        };
                        let careful = careful::careful_after_drop(
                            last_drop,
                            suspect,
                            out_through,
                            careful_through,
                            ctx.config.spool.dead_letter_after,
                        );
                        last_drop = Some(suspect);
                        if let Some(through) = careful {
                            careful_through = through;
                            tracing::info!(bridge = %ctx.name, through,
                                "the cloud dropped the link twice with the same message oldest in \
                                 flight: the messages that were out are resent one at a time until \
                                 acknowledged, to tell a poison message apart");
                        }
                        if refusals == QOS2_REFUSALS {
                            tracing::warn!(bridge = %ctx.name, address = %text,
                                "the cloud closed the link {QOS2_REFUSALS} times in a row on a QoS 2 \
                                 message it never acknowledged: it has no QoS 2 (RabbitMQ, AWS IoT \
                                 Core do this on MQTT 3.1.1). QoS 2 messages now go up as QoS 1; set \
                                 `max_qos = 1` in this [[bridge]] to start that way");
                        } else {
                            // Not the message's fault once the QoS is to blame.
                            ctx.count_strike(suspect, careful_through).await;
                        }
                    }
                }
                if began.elapsed() >= HEALTHY_SESSION {
                    backoff.reset();
                }
                // A lost link is retried at the same address first: a blip must not move
                // the bridge (and, between independent brokers, its QoS 2 exchanges).
            }
            Err(why) => {
                BridgeStats::bump(&ctx.stats.connect_failures);
                let why = if count > 1 {
                    format!("{text}: {why}")
                } else {
                    why.to_string()
                };
                repeats.failed(&ctx.name, &why);
                ctx.stats.set_error(format!("cannot connect: {why}"));
                if ctx.stats.link_changed_ms.load(Relaxed) == 0 {
                    // Down since the first attempt: the page says since when.
                    ctx.stats.link_changed_ms.store(now_ms(), Relaxed);
                }
                failed_in_row += 1;
                if count > 1 {
                    at = (at + 1) % count;
                    // The next address is tried at once until each failed in this round.
                    if !failed_in_row.is_multiple_of(count) {
                        delay = Some(Duration::ZERO);
                    }
                }
            }
        }
        let delay = delay.unwrap_or_else(|| backoff.next_delay());
        tracing::debug!(bridge = %ctx.name, ?delay, "reconnecting after backoff");
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = stop_requested(&mut shutdown) => {
                    stopping = true;
                    break;
                }
                Some(_) = live0.recv() => BridgeStats::bump(&ctx.stats.dropped_qos0),
            }
        }
    }
    Carry {
        live0,
        careful_through,
    }
}
