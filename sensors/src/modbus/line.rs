//! One scheduler per line: one request at a time, fair across devices, writes first.

use super::health::{Health, StatusChange};
use super::transport::{Endpoint, Link, connect, describe_transport_error};
use crate::emit::{Emitter, PointOutput};
use crate::error::{LinkError, OutOfRange, ReadingError, SensorsError};
use crate::messages::{SensorMessage, write_result_payload};
use crate::plan::Read;
use crate::point::{Area, Codec, DataType, Value, WriteValueError, value_to_bool};
use crate::stats::LineStats;
use crate::stop::Stop;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_modbus::client::Client;
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

/// A point as the scheduler sees it.
#[derive(Debug)]
pub struct LinePoint {
    /// Point name.
    pub name: String,
    /// Area.
    pub area: Area,
    /// Wire address.
    pub start: u16,
    /// Decoder/encoder.
    pub codec: Codec,
    /// Whether writes are accepted.
    pub writable: bool,
    /// Forced write function code.
    pub write_function: Option<u8>,
    /// Publisher.
    pub out: PointOutput,
}

/// A planned read with its schedule.
#[derive(Debug)]
pub struct Scheduled {
    /// The request.
    pub read: Read,
    /// Poll interval.
    pub every: Duration,
    /// Next time it is due.
    pub next_due: Instant,
}

/// One device on a line.
#[derive(Debug)]
pub struct LineDevice {
    /// Device name.
    pub name: String,
    /// Unit id.
    pub unit: u8,
    /// Response timeout.
    pub timeout: Duration,
    /// Retries after timeouts/transport errors.
    pub retries: u32,
    /// Points.
    pub points: Vec<LinePoint>,
    /// Reads.
    pub reads: Vec<Scheduled>,
    /// Health.
    pub health: Health,
    /// Status topic.
    pub status_topic: String,
    /// Write-result topics per point.
    pub result_topics: Vec<String>,
    /// Scheduler round in which the device was last served (fairness).
    pub served: u64,
    /// Its counters and state, read by `$SYS` and the gateway's status page.
    pub stats: Arc<crate::stats::DeviceStats>,
}

impl LineDevice {
    fn earliest_due(&self) -> Option<Instant> {
        let due = self.reads.iter().map(|r| r.next_due).min()?;
        Some(self.health.next_allowed().map_or(due, |t| t.max(due)))
    }
}

/// A write routed to a line.
#[derive(Debug)]
pub struct WriteJob {
    /// Device index on the line.
    pub device: usize,
    /// Point index in the device.
    pub point: usize,
    /// Requested engineering value.
    pub value: Value,
    /// Correlation id echoed in the result.
    pub id: Option<serde_json::Value>,
}

enum Outcome {
    Data(Response),
    Exception(ExceptionCode),
    Failed(LinkError),
}

/// Why a write command failed; its text is sent back on the point's write-result topic.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The job names a point the device does not have.
    #[error("no such point")]
    NoSuchPoint,
    /// The point has no `writable = true`.
    #[error("point is not writable")]
    NotWritable,
    /// Discrete inputs and input registers cannot be written (Modbus has no function).
    #[error("read-only area")]
    ReadOnlyArea,
    /// The value does not fit the point.
    #[error(transparent)]
    Value(#[from] WriteValueError),
    /// The value is outside the point's `min`/`max`.
    #[error(transparent)]
    OutOfRange(#[from] OutOfRange),
    /// The device answered with a Modbus exception.
    #[error("exception: {0}")]
    Exception(ExceptionCode),
    /// The device did not answer.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Publishing the device's new status failed (the gateway is stopping).
    #[error(transparent)]
    Sensors(#[from] SensorsError),
}

/// The scheduler of one line.
pub struct Line {
    endpoint: Endpoint,
    devices: Vec<LineDevice>,
    stats: Arc<LineStats>,
    emitter: Emitter,
    inter_frame: Duration,
    bus_free_at: Instant,
    conn: Option<Link>,
    rounds: u64,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line")
            .field("endpoint", &self.endpoint)
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Data(r) => write!(f, "Data({r:?})"),
            Outcome::Exception(e) => write!(f, "Exception({e:?})"),
            Outcome::Failed(s) => write!(f, "Failed({s})"),
        }
    }
}

impl Line {
    /// Builds a line scheduler.
    pub fn new(
        endpoint: Endpoint,
        devices: Vec<LineDevice>,
        stats: Arc<LineStats>,
        emitter: Emitter,
    ) -> Self {
        let inter_frame = match &endpoint {
            Endpoint::Rtu(s) => s.inter_frame_delay(),
            Endpoint::Tcp { .. } => Duration::ZERO,
        };
        Line {
            endpoint,
            devices,
            stats,
            emitter,
            inter_frame,
            bus_free_at: Instant::now(),
            conn: None,
            rounds: 0,
        }
    }

    /// Runs until told to stop or until the gateway channel closes; on a stop, every
    /// device's retained status is left as the stop's [`Farewell`] says.
    pub async fn run(
        mut self,
        mut writes: mpsc::Receiver<WriteJob>,
        mut stop: Stop,
    ) -> Result<(), SensorsError> {
        let mut writes_open = true;
        let farewell = loop {
            if let Some(f) = stop.requested() {
                break f;
            }
            self.stats.beat();
            #[cfg(debug_assertions)]
            if crate::fault::wedge_lines() {
                // Test-only: the task stops here for good, as a wedged poller would.
                std::future::pending::<()>().await;
            }
            let step = async {
                if writes_open {
                    match writes.try_recv() {
                        Ok(job) => return self.write(job).await,
                        Err(mpsc::error::TryRecvError::Disconnected) => writes_open = false,
                        Err(mpsc::error::TryRecvError::Empty) => {}
                    }
                }
                let now = Instant::now();
                if let Some((d, r)) = self.pick(now) {
                    return self.poll(d, r).await;
                }
                let wake = self
                    .devices
                    .iter()
                    .filter_map(LineDevice::earliest_due)
                    .min()
                    .unwrap_or(now + Duration::from_secs(3600))
                    // Round the loop at least once a heartbeat, also with nothing due.
                    .min(now + crate::stats::HEARTBEAT);
                tokio::select! {
                    () = tokio::time::sleep_until(wake.into()) => Ok(()),
                    job = writes.recv(), if writes_open => match job {
                        Some(job) => self.write(job).await,
                        None => { writes_open = false; Ok(()) }
                    },
                }
            };
            tokio::select! {
                r = step => r?,
                f = stop.wait() => break f,
            }
        };
        if let Some(mut c) = self.conn.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), c.ctx.disconnect()).await;
        }
        for d in &self.devices {
            tracing::debug!(device = %d.name, ?farewell, "device stopped");
            // Owned topics: borrowing closures in an async fn's iterator trip up the
            // Send check of the boxed future.
            let retained: Vec<String> = d
                .points
                .iter()
                .filter(|p| p.out.retain)
                .map(|p| p.out.topic.clone())
                .collect();
            self.emitter
                .farewell(
                    &farewell,
                    &d.name,
                    &d.status_topic,
                    retained.iter().map(String::as_str),
                )
                .await?;
        }
        Ok(())
    }

    /// The next read: among devices with a due read, the one served longest ago (round robin).
    fn pick(&self, now: Instant) -> Option<(usize, usize)> {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.health.ready(now))
            .filter_map(|(i, d)| {
                let (ri, r) = d
                    .reads
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.next_due <= now)
                    .min_by_key(|(_, r)| r.next_due)?;
                Some((d.served, r.next_due, i, ri))
            })
            .min()
            .map(|(_, _, i, ri)| (i, ri))
    }

    async fn transact(&mut self, dev: usize, req: Request<'static>) -> Outcome {
        let (unit, timeout, retries) = {
            let d = &self.devices[dev];
            (d.unit, d.timeout, d.retries)
        };
        // At low baud rates a long frame takes a noticeable time on the wire: the response timeout
        // starts after that, so a slow line is not mistaken for a dead device.
        let timeout = match &self.endpoint {
            Endpoint::Rtu(s) => timeout + s.wire_time(frame_bytes(&req)),
            Endpoint::Tcp { .. } => timeout,
        };
        let mut last = LinkError::NoAttempt;
        for _ in 0..=retries {
            tokio::time::sleep_until(self.bus_free_at.into()).await;
            let started = Instant::now();
            if self.conn.is_none() {
                match connect(&self.endpoint, timeout, &self.stats).await {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => {
                        LineStats::bump(&self.stats.transport_errors);
                        last = LinkError::Connect(Arc::new(e));
                        self.bus_free_at = Instant::now() + self.inter_frame;
                        continue;
                    }
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            conn.ctx.set_slave(Slave(unit));
            LineStats::bump(&self.stats.requests);
            let res = tokio::time::timeout(timeout, conn.ctx.call(req.clone())).await;
            LineStats::add_time(&self.stats.busy_ns, started.elapsed());
            self.bus_free_at = Instant::now() + self.inter_frame;
            match res {
                Ok(Ok(Ok(resp))) => {
                    LineStats::bump(&self.stats.responses);
                    return Outcome::Data(resp);
                }
                Ok(Ok(Err(code))) => {
                    LineStats::bump(&self.stats.exceptions);
                    return Outcome::Exception(code);
                }
                Ok(Err(e)) => {
                    LineStats::bump(&self.stats.transport_errors);
                    last = match e {
                        tokio_modbus::Error::Transport(io) => {
                            describe_transport_error(conn, &self.endpoint, io)
                        }
                        tokio_modbus::Error::Protocol(_) => LinkError::WrongResponse,
                    };
                    // After a decode error the framed stream may be desynchronised: start afresh.
                    self.conn = None;
                }
                Err(_) => {
                    LineStats::bump(&self.stats.timeouts);
                    last = LinkError::Timeout;
                    if matches!(self.endpoint, Endpoint::Tcp { .. }) {
                        // A late TCP reply would carry a stale transaction id; reconnect instead.
                        self.conn = None;
                    }
                }
            }
        }
        Outcome::Failed(last)
    }

    async fn poll(&mut self, dev: usize, ri: usize) -> Result<(), SensorsError> {
        self.rounds += 1;
        let read = self.devices[dev].reads[ri].read.clone();
        self.devices[dev].served = self.rounds;
        let req = match read.area {
            Area::Coil => Request::ReadCoils(read.start, read.count),
            Area::Discrete => Request::ReadDiscreteInputs(read.start, read.count),
            Area::Input => Request::ReadInputRegisters(read.start, read.count),
            Area::Holding => Request::ReadHoldingRegisters(read.start, read.count),
        };
        let began = Instant::now();
        let outcome = self.transact(dev, req).await;
        let now = Instant::now();
        self.devices[dev]
            .stats
            .record_poll(now - began, !matches!(outcome, Outcome::Failed(_)));
        if matches!(outcome, Outcome::Data(_)) {
            self.devices[dev].stats.reading();
        }
        {
            let s = &mut self.devices[dev].reads[ri];
            s.next_due += s.every;
            if s.next_due <= now {
                // Fell behind (slow bus or backoff): skip missed cycles rather than bursting.
                s.next_due = now + s.every;
            }
        }
        let mut msgs: Vec<SensorMessage> = Vec::new();
        let change = match outcome {
            Outcome::Data(resp) => {
                let change = self.devices[dev].health.on_success();
                self.decode(dev, &read, resp, now, &mut msgs);
                change
            }
            Outcome::Exception(code) => {
                let change = self.devices[dev].health.on_success();
                if code == ExceptionCode::IllegalDataAddress && read.points.len() > 1 {
                    // The device rejects a coalesced span (an unmapped hole): read its points one by one.
                    tracing::warn!(device = %self.devices[dev].name, start = read.start, count = read.count, "coalesced read refused; splitting");
                    self.split(dev, ri, now);
                } else {
                    let reason = ReadingError::Exception(code);
                    let d = &mut self.devices[dev];
                    for &p in &read.points {
                        msgs.extend(d.points[p].out.observe(
                            Err(reason.clone()),
                            now,
                            &self.emitter.clock,
                        ));
                    }
                }
                change
            }
            Outcome::Failed(reason) => {
                let d = &mut self.devices[dev];
                tracing::debug!(device = %d.name, %reason, "poll failed");
                let change = d.health.on_failure(&reason.to_string(), now);
                let reason = ReadingError::Link(reason);
                for p in &mut d.points {
                    msgs.extend(p.out.observe(Err(reason.clone()), now, &self.emitter.clock));
                }
                change
            }
        };
        self.publish_status(dev, change).await?;
        for m in msgs {
            self.emitter.send(m).await?;
        }
        Ok(())
    }

    fn split(&mut self, dev: usize, ri: usize, now: Instant) {
        let d = &mut self.devices[dev];
        let s = d.reads.swap_remove(ri);
        for &p in &s.read.points {
            let pt = &d.points[p];
            let count = if pt.area.is_bit() {
                1
            } else {
                pt.codec.count()
            };
            d.reads.push(Scheduled {
                read: Read {
                    area: pt.area,
                    start: pt.start,
                    count,
                    points: vec![p],
                },
                every: s.every,
                next_due: now,
            });
        }
    }

    fn decode(
        &mut self,
        dev: usize,
        read: &Read,
        resp: Response,
        now: Instant,
        msgs: &mut Vec<SensorMessage>,
    ) {
        let clock = self.emitter.clock.clone();
        let d = &mut self.devices[dev];
        let (words, bits): (Option<Vec<u16>>, Option<Vec<bool>>) = match resp {
            Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => (Some(w), None),
            Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => (None, Some(b)),
            other => {
                LineStats::bump(&self.stats.transport_errors);
                let reason = ReadingError::UnexpectedResponse(format!("{other:?}"));
                for &p in &read.points {
                    msgs.extend(d.points[p].out.observe(Err(reason.clone()), now, &clock));
                }
                return;
            }
        };
        for &p in &read.points {
            let pt = &mut d.points[p];
            let off = usize::from(pt.start - read.start);
            let value = if let Some(b) = &bits {
                b.get(off)
                    .map(|v| Value::Bool(*v))
                    .ok_or(ReadingError::ShortResponse)
            } else {
                let w = words.as_deref().unwrap_or(&[]);
                let slice = w.get(off..).unwrap_or(&[]);
                pt.codec.decode_registers(slice).map_err(ReadingError::from)
            };
            let value = value.and_then(|v| pt.out.check_range(&v).map(|()| v).map_err(Into::into));
            if value.is_err() {
                LineStats::bump(&self.stats.value_errors);
            }
            msgs.extend(pt.out.observe(value, now, &clock));
        }
    }

    async fn publish_status(
        &mut self,
        dev: usize,
        change: Option<StatusChange>,
    ) -> Result<(), SensorsError> {
        if let Some((status, err)) = change {
            let d = &self.devices[dev];
            crate::emit::log_status(&d.name, status, err.as_deref(), d.health.failures());
            d.stats.set_status(status, err.as_deref());
            self.emitter
                .status(&d.status_topic, status, err.as_deref())
                .await?;
        }
        Ok(())
    }

    async fn write(&mut self, job: WriteJob) -> Result<(), SensorsError> {
        let topic = self.devices[job.device].result_topics[job.point].clone();
        let result = self.execute_write(&job).await;
        match &result {
            Ok(_) => {
                // Read the point back soon so the new value is reported.
                let now = Instant::now();
                for r in &mut self.devices[job.device].reads {
                    if r.read.points.contains(&job.point) {
                        r.next_due = now;
                    }
                }
            }
            Err(error) => {
                let d = &self.devices[job.device];
                let point = d.points.get(job.point).map_or("?", |p| p.name.as_str());
                tracing::info!(device = %d.name, point, %error, "write failed");
            }
        }
        let payload = write_result_payload(
            result.as_ref().map_err(|e| e as &dyn std::fmt::Display),
            job.id.as_ref(),
            &self.emitter.clock,
        );
        self.emitter
            .send(SensorMessage {
                topic,
                payload,
                qos: outpost_mqtt::QoS::AtLeastOnce,
                retain: false,
            })
            .await
    }

    /// Writes the job's value; the value the device was given (after scaling to its
    /// registers and back, so a rounded value is reported as written, not as asked).
    async fn execute_write(&mut self, job: &WriteJob) -> Result<Value, WriteError> {
        let (req, written) = {
            let pt = self.devices[job.device]
                .points
                .get(job.point)
                .ok_or(WriteError::NoSuchPoint)?;
            if !pt.writable {
                return Err(WriteError::NotWritable);
            }
            build_write(pt, &job.value)?
        };
        match self.transact(job.device, req).await {
            Outcome::Data(_) => {
                let change = self.devices[job.device].health.on_success();
                self.publish_status(job.device, change).await?;
                Ok(written)
            }
            Outcome::Exception(code) => Err(WriteError::Exception(code)),
            Outcome::Failed(reason) => {
                let change = self.devices[job.device]
                    .health
                    .on_failure(&reason.to_string(), Instant::now());
                self.publish_status(job.device, change).await?;
                Err(WriteError::Link(reason))
            }
        }
    }
}

/// RTU bytes of a request plus its normal response (address, PDU, CRC).
pub fn frame_bytes(req: &Request<'_>) -> u64 {
    let (request, response) = match req {
        Request::ReadCoils(_, n) | Request::ReadDiscreteInputs(_, n) => {
            (8, 5 + u64::from(n.div_ceil(8)))
        }
        Request::ReadHoldingRegisters(_, n) | Request::ReadInputRegisters(_, n) => {
            (8, 5 + 2 * u64::from(*n))
        }
        Request::WriteMultipleCoils(_, v) => (9 + (v.len() as u64).div_ceil(8), 8),
        Request::WriteMultipleRegisters(_, v) => (9 + 2 * v.len() as u64, 8),
        _ => (8, 8),
    };
    request + response
}

/// Builds the write request for a point (FC 5/15 for coils, 6/16 for registers), with
/// the value it really writes: what the registers decode to (an integer register takes
/// `1.5` as `2`).
pub fn build_write(pt: &LinePoint, value: &Value) -> Result<(Request<'static>, Value), WriteError> {
    match pt.area {
        Area::Coil => {
            let b = value_to_bool(value)?;
            let req = if pt.write_function == Some(15) {
                Request::WriteMultipleCoils(pt.start, Cow::Owned(vec![b]))
            } else {
                Request::WriteSingleCoil(pt.start, b)
            };
            Ok((req, Value::Bool(b)))
        }
        Area::Holding => {
            let value = if pt.codec.ty == DataType::Bool {
                Value::Bool(value_to_bool(value)?)
            } else {
                value.clone()
            };
            pt.out.check_range(&value)?;
            let regs = pt.codec.encode_registers(&value)?;
            let written = pt.codec.decode_registers(&regs).unwrap_or(value);
            let req = if regs.len() == 1 && pt.write_function != Some(16) {
                Request::WriteSingleRegister(pt.start, regs[0])
            } else {
                Request::WriteMultipleRegisters(pt.start, Cow::Owned(regs))
            };
            Ok((req, written))
        }
        Area::Discrete | Area::Input => Err(WriteError::ReadOnlyArea),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Parity, RtuTransport};

    #[test]
    fn wire_time_of_a_full_read_at_9600_baud() {
        // 125 registers: 8-byte request + 255-byte response = 263 characters of 11 bits.
        let bytes = frame_bytes(&Request::ReadHoldingRegisters(0, 125));
        assert_eq!(bytes, 263);
        let line = RtuTransport {
            port: "x".into(),
            baud: 9600,
            data_bits: 8,
            parity: Parity::Even,
            stop_bits: 1,
            inter_frame: None,
        };
        let t = line.wire_time(bytes);
        assert!(
            t > Duration::from_millis(300) && t < Duration::from_millis(302),
            "{t:?}"
        );
        assert_eq!(frame_bytes(&Request::ReadCoils(0, 9)), 8 + 7);
        assert_eq!(
            frame_bytes(&Request::WriteMultipleRegisters(0, vec![1, 2].into())),
            13 + 8
        );
    }
}
