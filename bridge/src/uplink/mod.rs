//! The uplink: connect (TCP or TLS), run a session, reconnect with backoff, forever until
//! shutdown. Also mirrors the link state on the local broker.

mod backoff;
mod packet_ids;
mod progress;
mod session;
mod tls;
mod transport;

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
use crate::config::{Address, BridgeConfig};
use crate::rules::Rules;
use crate::spool::{NewMessage, Spool, StrikeOutcome};
use crate::stats::BridgeStats;
use crate::status::{OfflineReason, Status};

pub use backoff::Backoff;
pub(crate) use session::now_ms;
use session::{Limits, MAX_INCOMING_PACKET, Session, SessionEnd};
pub use tls::client_config;

/// A session shorter than this does not reset the backoff (a cloud that accepts and then
/// drops us at once must not be hammered).
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Everything a link needs, shared by the reconnect loop and its sessions.
pub(crate) struct Ctx {
    pub name: String,
    pub config: BridgeConfig,
    pub address: Address,
    pub protocol: Protocol,
    pub client_id: String,
    pub rules: Rules,
    pub spool: Spool,
    pub stats: Arc<BridgeStats>,
    pub local: mpsc::Sender<LocalPublish>,
    pub status: Status,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Ctx {
    pub(crate) fn state_topic(&self) -> String {
        format!("$SYS/broker/bridge/{}/state", self.name)
    }

    fn mirror_link_state(&self, up: bool) {
        self.stats.connected.store(up, Relaxed);
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

fn connect_packet(ctx: &Ctx) -> Packet {
    let cfg = &ctx.config;
    let mut properties = Properties::default();
    if ctx.protocol.is_v5() {
        properties.session_expiry_interval =
            Some(cfg.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32);
        properties.receive_maximum = Some(256);
        properties.maximum_packet_size = Some(MAX_INCOMING_PACKET as u32);
    }
    let will = cfg.status.enabled.then(|| Will {
        topic: ByteString::from(ctx.status.topic.clone()),
        payload: ctx.status.offline(OfflineReason::Unexpected),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::default(),
    });
    Packet::Connect(Box::new(Connect {
        protocol: ctx.protocol,
        // A persistent session keeps QoS 2 state on the cloud across our restarts.
        clean_start: false,
        keep_alive: cfg.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
        properties,
        client_id: ctx.client_id.clone(),
        will,
        username: cfg.username.clone(),
        password: cfg.password.clone().map(Bytes::from),
    }))
}

async fn handshake(ctx: &Ctx) -> Result<(Box<dyn transport::Io>, BytesMut, Limits), String> {
    let tls = ctx.tls.as_ref().map(|c| {
        (
            c,
            ctx.config
                .tls
                .as_ref()
                .and_then(|t| t.server_name.as_deref()),
        )
    });
    let mut io = transport::connect(&ctx.address, tls)
        .await
        .map_err(|e| format!("connect {}:{}: {e}", ctx.address.host, ctx.address.port))?;
    let mut buf = BytesMut::with_capacity(4096);
    encode(&connect_packet(ctx), ctx.protocol, &mut buf)
        .map_err(|e| format!("encode CONNECT: {e}"))?;
    io.write_all(&buf)
        .await
        .map_err(|e| format!("write CONNECT: {e}"))?;
    // TLS and WebSocket buffer inside; a flush puts CONNECT on the wire.
    io.flush()
        .await
        .map_err(|e| format!("write CONNECT: {e}"))?;
    buf.clear();
    let connack = loop {
        if io
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read CONNACK: {e}"))?
            == 0
        {
            return Err("connection closed before CONNACK".into());
        }
        match decode(&mut buf, ctx.protocol, MAX_INCOMING_PACKET) {
            Ok(Some(Packet::ConnAck(c))) => break c,
            Ok(Some(other)) => return Err(format!("expected CONNACK, got {other:?}")),
            Ok(None) => continue,
            Err(e) => return Err(format!("bad CONNACK: {e}")),
        }
    };
    if connack.reason.is_error() {
        return Err(format!(
            "cloud refused the connection (reason 0x{:02x}{})",
            connack.reason.0,
            connack
                .properties
                .reason_string
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        ));
    }
    let p = &connack.properties;
    let cfg = &ctx.config;
    let mut max_qos = cfg.max_qos;
    if let Some(server_max) = p.maximum_qos
        && server_max < max_qos
    {
        tracing::warn!(bridge = %ctx.name, server_max,
            "cloud CONNACK says Maximum QoS {server_max}: QoS 2 messages are downgraded");
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
        topic_alias_max: p.topic_alias_maximum.unwrap_or(0),
    };
    Ok((io, buf, limits))
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
    let mut repeats = progress::Repeats::default();
    ctx.mirror_link_state(false);
    loop {
        if stopping || *shutdown.borrow() {
            break;
        }
        let attempt = tokio::select! {
            r = tokio::time::timeout(cfg.connect_timeout, handshake(&ctx)) => r.unwrap_or_else(|_| Err("connect timed out".into())),
            _ = stop_requested(&mut shutdown) => {
                stopping = true;
                continue;
            }
        };
        match attempt {
            Ok((io, rbuf, limits)) => {
                if connected_before {
                    BridgeStats::bump(&ctx.stats.reconnects);
                }
                connected_before = true;
                repeats.reset();
                let backlog = progress::Backlog::now(&ctx.stats, now_ms());
                tracing::info!(bridge = %ctx.name, address = %ctx.config.address,
                    window = limits.window, max_qos = limits.max_qos,
                    session_present = limits.session_present,
                    "connected to the cloud; {} waiting in the spool", backlog.describe());
                // QoS 0 that waited for the link is stale by now; it was best effort.
                while live0.try_recv().is_ok() {
                    BridgeStats::bump(&ctx.stats.dropped_qos0);
                }
                ctx.mirror_link_state(true);
                progress::watch_drain(ctx.name.clone(), ctx.stats.clone(), backlog);
                let began = Instant::now();
                let end = Session::new(&ctx, io, rbuf, limits, careful_through)
                    .run(&mut shutdown, &mut live0)
                    .await;
                ctx.mirror_link_state(false);
                match end {
                    SessionEnd::Shutdown => break,
                    SessionEnd::Lost(why) => {
                        tracing::warn!(bridge = %ctx.name, "link lost: {why}");
                    }
                    SessionEnd::Dropped {
                        why,
                        suspect,
                        out_through,
                    } => {
                        tracing::warn!(bridge = %ctx.name, "link lost: {why}");
                        if let Some(through) = out_through
                            && ctx.config.spool.dead_letter_after > 0
                            && through > careful_through
                        {
                            careful_through = through;
                            tracing::info!(bridge = %ctx.name, through,
                                "the cloud dropped the link with messages out: they are resent one \
                                 at a time until acknowledged, to tell a poison message apart");
                        }
                        ctx.count_strike(suspect, careful_through).await;
                    }
                }
                if began.elapsed() >= HEALTHY_SESSION {
                    backoff.reset();
                }
            }
            Err(why) => {
                BridgeStats::bump(&ctx.stats.connect_failures);
                repeats.failed(&ctx.name, &why);
            }
        }
        let delay = backoff.next_delay();
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
