//! One subscribing connection: decodes straight from its read buffer, checks every
//! payload header, records latency, and acknowledges QoS 1/2 deliveries from a separate
//! writer task so a full socket in one direction never blocks the other.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use outpost_mqtt::codec;
use outpost_mqtt::{Packet, Protocol, PubResponse, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::conn::{self, Connection, MAX_PACKET};
use crate::flow::Flow;
use crate::payload;
use crate::seqtrack::{Arrival, SeqTracker};

/// Highest latency the histogram holds, ns (a minute).
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// What one subscriber saw.
#[derive(Debug)]
pub struct SubscriberResult {
    /// One tracker per publisher index.
    pub trackers: Vec<SeqTracker>,
    /// Latency of first deliveries, ns.
    pub latency: Histogram<u64>,
    /// When the last new message arrived, ns since the run epoch.
    pub last_new_ns: u64,
    /// PUBLISH packets whose payload had no valid header or publisher index.
    pub foreign: u64,
    /// PUBLISH packets at a QoS other than the one subscribed.
    pub wrong_qos: u64,
    /// QoS 2 deliveries this subscriber answered with PUBREC that the broker has not yet
    /// released with PUBREL when the run ended: non-zero means a stalled broker.
    pub awaiting_pubrel: usize,
    /// PUBLISH packets received, duplicates included.
    pub publishes: u64,
    /// The error that ended the subscriber early, if any.
    pub error: Option<String>,
}

/// A fresh latency histogram (1 ns to a minute, 3 significant digits).
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)?)
}

/// Receives until `stop` turns true or the broker closes the connection.
pub async fn run(
    conn: Connection,
    qos: QoS,
    publishers: usize,
    flow: Arc<Flow>,
    latency: Histogram<u64>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberResult {
    let protocol = conn.protocol;
    let (mut rd, wr) = conn.stream.into_split();
    let mut rbuf = conn.rbuf;
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let writer = tokio::spawn(write_acks(wr, rx, protocol));
    let mut res = SubscriberResult {
        trackers: vec![SeqTracker::default(); publishers],
        latency,
        last_new_ns: 0,
        foreign: 0,
        wrong_qos: 0,
        awaiting_pubrel: 0,
        publishes: 0,
        error: None,
    };
    let mut awaiting = vec![false; 65536];
    let mut acks = BytesMut::with_capacity(4096);
    loop {
        if rbuf.capacity() - rbuf.len() < 16 * 1024 {
            rbuf.reserve(64 * 1024);
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = rd.read_buf(&mut rbuf) => match r {
                Ok(0) => {
                    if !*stop.borrow() {
                        res.error = Some("broker closed the connection".into());
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    res.error = Some(format!("reading from broker: {e}"));
                    break;
                }
            }
        }
        let now = flow.now_ns();
        let mut new = 0u64;
        let mut packets = 0u64;
        let awaiting_before = res.awaiting_pubrel;
        loop {
            let packet = match codec::decode(&mut rbuf, protocol, MAX_PACKET) {
                Ok(Some(p)) => {
                    packets += 1;
                    p
                }
                Ok(None) => break,
                Err(e) => {
                    res.error = Some(format!("decoding from broker: {e}"));
                    break;
                }
            };
            let reply = match packet {
                Packet::Publish(p) => {
                    res.publishes += 1;
                    if p.qos != qos {
                        res.wrong_qos += 1;
                    }
                    match payload::read_header(&p.payload)
                        .and_then(|h| Some((h, res.trackers.get_mut(h.publisher as usize)?)))
                    {
                        Some((h, tracker)) => {
                            if tracker.record(h.seq) == Arrival::New {
                                new += 1;
                                res.latency
                                    .saturating_record(now.saturating_sub(h.sent_ns).max(1));
                            }
                        }
                        None => res.foreign += 1,
                    }
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubResponse::new(id))),
                        (QoS::ExactlyOnce, Some(id)) => {
                            if !std::mem::replace(&mut awaiting[id as usize], true) {
                                res.awaiting_pubrel += 1;
                            }
                            Some(Packet::PubRec(PubResponse::new(id)))
                        }
                        _ => None,
                    }
                }
                Packet::PubRel(r) => {
                    if std::mem::take(&mut awaiting[r.packet_id as usize]) {
                        res.awaiting_pubrel -= 1;
                    }
                    Some(Packet::PubComp(PubResponse::new(r.packet_id)))
                }
                Packet::Disconnect(d) => {
                    res.error = Some(format!("broker sent DISCONNECT {:?}", d.reason));
                    None
                }
                _ => None,
            };
            if let Some(reply) = reply
                && let Err(e) = codec::encode(&reply, protocol, &mut acks)
            {
                res.error = Some(format!("encoding acknowledgement: {e}"));
            }
        }
        flow.add_activity(packets);
        if res.awaiting_pubrel != awaiting_before {
            flow.add_awaiting_pubrel(res.awaiting_pubrel as i64 - awaiting_before as i64);
        }
        if new > 0 {
            res.last_new_ns = now;
            flow.add_delivered(new);
        }
        if !acks.is_empty() && tx.send(acks.split().freeze()).is_err() {
            res.error
                .get_or_insert_with(|| "acknowledgement writer stopped".into());
        }
        if res.error.is_some() {
            break;
        }
    }
    drop(tx);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer).await;
    res
}

/// Writes acknowledgements in order, coalescing whatever is queued into one write, and
/// says DISCONNECT when the reader is done.
async fn write_acks(
    mut wr: conn::Writer,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    protocol: Protocol,
) {
    let mut out = BytesMut::with_capacity(16 * 1024);
    while let Some(first) = rx.recv().await {
        out.extend_from_slice(&first);
        while let Ok(more) = rx.try_recv() {
            out.extend_from_slice(&more);
        }
        if wr.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
    if codec::encode(&conn::disconnect_packet(), protocol, &mut out).is_ok() {
        let _ = wr.write_all(&out).await;
    }
    let _ = wr.shutdown().await;
}
