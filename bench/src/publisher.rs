//! One publishing connection: fills a buffer with many PUBLISH packets per write, keeps a
//! window of unacknowledged QoS 1/2 packets, answers PUBREC with PUBREL, and optionally
//! holds a fixed rate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use outpost_mqtt::codec;
use outpost_mqtt::{Packet, Properties, Protocol, PubResponse, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::conn::{self, Connection, MAX_PACKET};
use crate::flow::Flow;
use crate::payload::{self, HEADER_LEN, Header};

/// What one publisher does.
#[derive(Debug, Clone)]
pub struct PublisherSpec {
    /// Publisher index, carried in every payload header.
    pub index: u16,
    /// Topic name it publishes on.
    pub topic: String,
    /// QoS of its messages.
    pub qos: QoS,
    /// Payload bytes per message (at least [`HEADER_LEN`]).
    pub payload_len: usize,
    /// Messages to send.
    pub messages: u64,
    /// Messages per second for this publisher; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Most QoS 1/2 packets awaiting PUBACK/PUBCOMP at once.
    pub inflight: usize,
    /// Most messages encoded into one write.
    pub batch: usize,
    /// No new messages after this instant.
    pub deadline: Instant,
    /// How long after the last send to wait for outstanding acknowledgements.
    pub ack_timeout: Duration,
}

/// What one publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublisherResult {
    /// Messages written to the socket.
    pub sent: u64,
    /// QoS 1/2 messages acknowledged (PUBACK, or PUBCOMP for QoS 2).
    pub acked: u64,
    /// Acknowledgements with a failure reason code.
    pub refused: u64,
    /// When the last message was written, ns since the run epoch.
    pub last_send_ns: u64,
    /// The error that ended the publisher early, if any.
    pub error: Option<String>,
}

/// Packet identifiers in flight and the PUBRELs the reader owes the broker.
struct Inflight {
    in_use: Vec<bool>,
    count: usize,
    next_id: u16,
    pending_rel: Vec<u16>,
    acked: u64,
    refused: u64,
    closed: Option<String>,
}

impl Inflight {
    fn new() -> Self {
        Inflight {
            in_use: vec![false; 65536],
            count: 0,
            next_id: 0,
            pending_rel: Vec::new(),
            acked: 0,
            refused: 0,
            closed: None,
        }
    }

    /// The next free identifier; the caller has checked `count < 65535`.
    fn acquire(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id != 0 && !self.in_use[self.next_id as usize] {
                self.in_use[self.next_id as usize] = true;
                self.count += 1;
                return self.next_id;
            }
        }
    }

    fn release(&mut self, id: u16, ok: bool) {
        if std::mem::take(&mut self.in_use[id as usize]) {
            self.count -= 1;
            if ok {
                self.acked += 1;
            } else {
                self.refused += 1;
            }
        }
    }
}

/// Runs one publisher to completion (bounded by its deadline and ack timeout).
pub async fn run(
    conn: Connection,
    spec: PublisherSpec,
    flow: Arc<Flow>,
    waker: Arc<Notify>,
) -> PublisherResult {
    let protocol = conn.protocol;
    let broker_max = conn
        .connack
        .properties
        .receive_maximum
        .map_or(usize::MAX, usize::from);
    let inflight_cap = spec.inflight.clamp(1, 65535).min(broker_max);
    let (rd, wr) = conn.stream.into_split();
    let state = Arc::new(Mutex::new(Inflight::new()));
    let reader = tokio::spawn(read_acks(
        rd,
        conn.rbuf,
        protocol,
        state.clone(),
        waker.clone(),
    ));
    let mut result = PublisherResult::default();
    if let Err(e) = write_loop(
        wr,
        &spec,
        protocol,
        inflight_cap,
        &flow,
        &waker,
        &state,
        &mut result,
    )
    .await
    {
        result.error = Some(format!("{e:#}"));
    }
    reader.abort();
    let st = lock(&state);
    result.acked = st.acked;
    result.refused = st.refused;
    if result.error.is_none() && spec.qos != QoS::AtMostOnce && st.count > 0 {
        result.error = Some(format!("{} messages never acknowledged", st.count));
    }
    result
}

fn lock(state: &Mutex<Inflight>) -> std::sync::MutexGuard<'_, Inflight> {
    // A panic elsewhere cannot leave the counters half-updated, so poison is harmless.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the writer has nothing to send right now.
enum Stall {
    Rate(Instant),
    Window,
    Acks,
}

#[allow(clippy::too_many_arguments)]
async fn write_loop(
    mut wr: conn::Writer,
    spec: &PublisherSpec,
    protocol: Protocol,
    inflight_cap: usize,
    flow: &Flow,
    waker: &Notify,
    state: &Mutex<Inflight>,
    result: &mut PublisherResult,
) -> Result<()> {
    let payload_len = spec.payload_len.max(HEADER_LEN);
    let mut template = Publish {
        dup: false,
        qos: spec.qos,
        retain: false,
        topic: ByteString::from(spec.topic.clone()),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from(vec![0u8; payload_len]),
    };
    let mut buf = BytesMut::with_capacity(spec.batch * (payload_len + spec.topic.len() + 16));
    let mut ids: Vec<u16> = Vec::with_capacity(spec.batch);
    let start = Instant::now();
    let qos_acked = spec.qos != QoS::AtMostOnce;
    let mut done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let sending_done = result.sent >= spec.messages || now >= spec.deadline;
        let (rels, free) = {
            let mut st = lock(state);
            if let Some(e) = st.closed.take() {
                return Err(anyhow!(e));
            }
            (
                std::mem::take(&mut st.pending_rel),
                inflight_cap.saturating_sub(st.count),
            )
        };
        for id in &rels {
            codec::encode(&Packet::PubRel(PubResponse::new(*id)), protocol, &mut buf)
                .map_err(|e| anyhow!("encoding PUBREL: {e}"))?;
        }
        if sending_done {
            let outstanding = lock(state).count;
            if !qos_acked || outstanding == 0 {
                if !buf.is_empty() {
                    wr.write_all(&buf).await?;
                }
                break;
            }
            if now.duration_since(*done_at.get_or_insert(now)) >= spec.ack_timeout {
                break;
            }
        }

        let mut n = if sending_done {
            0
        } else {
            (spec.batch as u64).min(spec.messages - result.sent)
        };
        let mut stall = Stall::Window;
        if let Some(rate) = spec.rate
            && n > 0
        {
            let due = (now.duration_since(start).as_secs_f64() * rate) as u64 + 1;
            let may = due.saturating_sub(result.sent);
            if may < n {
                n = may;
                let next = start + Duration::from_secs_f64(result.sent as f64 / rate);
                stall = Stall::Rate(next);
            }
        }
        if n > 0 {
            let a = flow.allowance();
            if a < n {
                n = a;
                stall = Stall::Window;
            }
        }
        if qos_acked && n > 0 && (free as u64) < n {
            n = free as u64;
            stall = Stall::Acks;
        }
        if sending_done {
            stall = Stall::Acks;
        }

        if n > 0 {
            ids.clear();
            if qos_acked {
                let mut st = lock(state);
                for _ in 0..n {
                    ids.push(st.acquire());
                }
            }
            let sent_ns = flow.now_ns();
            for i in 0..n as usize {
                template.packet_id = ids.get(i).copied();
                codec::encode_publish(&template, protocol, &mut buf)
                    .map_err(|e| anyhow!("encoding PUBLISH: {e}"))?;
                let at = buf.len() - payload_len;
                payload::write_header(
                    &mut buf[at..at + HEADER_LEN],
                    Header {
                        publisher: spec.index,
                        seq: result.sent + i as u64,
                        sent_ns,
                    },
                );
            }
            flow.add_published(n);
            result.sent += n;
            result.last_send_ns = sent_ns;
        }
        if !buf.is_empty() {
            wr.write_all(&buf).await?;
            buf.clear();
        }
        if n == 0 && rels.is_empty() {
            match stall {
                Stall::Rate(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = waker.notified() => {}
                    }
                }
                Stall::Window | Stall::Acks => {
                    let wait = Duration::from_millis(200);
                    let timed_out = tokio::select! {
                        _ = tokio::time::sleep(wait) => true,
                        _ = waker.notified() => false,
                    };
                    // Only QoS 0 may lose messages; at 1 and 2 a stall means a slow broker,
                    // and the window must keep holding publishers back.
                    if timed_out && !qos_acked && matches!(stall, Stall::Window) {
                        flow.write_off_outstanding();
                    }
                }
            }
        }
    }
    let mut tail = BytesMut::new();
    if codec::encode(&conn::disconnect_packet(), protocol, &mut tail).is_ok() {
        let _ = wr.write_all(&tail).await;
    }
    let _ = wr.shutdown().await;
    Ok(())
}

async fn read_acks(
    mut rd: conn::Reader,
    mut rbuf: BytesMut,
    protocol: Protocol,
    state: Arc<Mutex<Inflight>>,
    waker: Arc<Notify>,
) {
    let reason = loop {
        let mut decoded = false;
        loop {
            match codec::decode(&mut rbuf, protocol, MAX_PACKET) {
                Ok(Some(p)) => {
                    decoded = true;
                    let mut st = lock(&state);
                    match p {
                        Packet::PubAck(r) | Packet::PubComp(r) => {
                            st.release(r.packet_id, !r.reason.is_error())
                        }
                        Packet::PubRec(r) if r.reason.is_error() => st.release(r.packet_id, false),
                        Packet::PubRec(r) => st.pending_rel.push(r.packet_id),
                        Packet::Disconnect(d) => {
                            st.closed = Some(format!("broker sent DISCONNECT {:?}", d.reason));
                        }
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    lock(&state).closed = Some(format!("decoding from broker: {e}"));
                    waker.notify_one();
                    return;
                }
            }
        }
        if decoded {
            waker.notify_one();
        }
        rbuf.reserve(16 * 1024);
        match rd.read_buf(&mut rbuf).await {
            Ok(0) => break "broker closed the connection".to_owned(),
            Ok(_) => {}
            Err(e) => break format!("reading from broker: {e}"),
        }
    };
    lock(&state).closed.get_or_insert(reason);
    waker.notify_one();
}
