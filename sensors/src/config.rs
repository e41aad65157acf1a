//! The `[sensors]` section of outpost.toml: serde types, defaults and semantic checks.

use crate::error::ConfigError;
use crate::point::{Area, Codec, DataType, Order};
use outpost_mqtt::QoS;
use serde::{Deserialize, Deserializer};
use std::collections::HashMap;
use std::ops::Deref;
use std::time::Duration;

/// A duration such as `"5s"` or `"250ms"` (or integer seconds), at most 30 days.
///
/// A type of its own, not a bare `Duration`, because of that bound; the parsing is the
/// shared `outpost_units::duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let d = outpost_units::duration(d)?;
        // Bounded so that deadline arithmetic (Instant + Duration) can never overflow.
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {:?} is longer than 30 days",
                humantime::format_duration(d).to_string()
            )));
        }
        Ok(Dur(d))
    }
}

const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Types whose local consistency is checked while deserializing, so toml reports the line.
pub trait Check {
    /// Returns the first problem, with a path relative to this value.
    fn check(&self) -> Result<(), ConfigError>;
}

/// A value that passed [`Check`] during deserialization.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<T>(pub T);

impl<T> Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'de, T: Deserialize<'de> + Check> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = T::deserialize(d)?;
        v.check().map_err(serde::de::Error::custom)?;
        Ok(Checked(v))
    }
}

/// The `[sensors]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorsConfig {
    /// First topic level (default `outpost`).
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// How often `$SYS/broker/sensors/...` counters are published (default 10s; "0s" disables).
    #[serde(default)]
    pub stats_interval: Option<Dur>,
    /// Whether to trust the wall clock before NTP says it is synchronised.
    #[serde(default)]
    pub clock: ClockMode,
    /// `[[sensors.modbus]]` devices.
    #[serde(default)]
    pub modbus: Vec<Checked<ModbusDevice>>,
    /// `[[sensors.serial]]` line sensors.
    #[serde(default)]
    pub serial: Vec<Checked<SerialSensor>>,
}

/// Clock policy for reading timestamps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    /// Stamp readings only once the kernel reports the clock synchronised (adjtimex).
    #[default]
    Auto,
    /// Always stamp readings (the box has a battery-backed RTC).
    Trusted,
}

/// How a device is reached.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Transport {
    /// Modbus TCP.
    Tcp(TcpTransport),
    /// Modbus RTU on a serial line.
    Rtu(RtuTransport),
}

/// Modbus TCP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpTransport {
    /// Host name or IP address.
    pub host: String,
    /// TCP port (default 502).
    #[serde(default = "default_tcp_port")]
    pub port: u16,
}

/// Serial line settings (shared by Modbus RTU and line sensors).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtuTransport {
    /// Device path, e.g. `/dev/ttyUSB0`.
    pub port: String,
    /// Baud rate (default 9600).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5..=8 (default 8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// none, even or odd (default none).
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2 (default 1).
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Silent interval between frames; default 3.5 characters at the baud rate (1.75 ms above 19200 baud).
    #[serde(default)]
    pub inter_frame: Option<Dur>,
}

impl RtuTransport {
    /// Bits on the wire per character (start + data + parity + stop).
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits)
            + u32::from(self.parity != Parity::None)
            + u32::from(self.stop_bits)
    }
    /// The silent interval (t3.5) that delimits RTU frames.
    pub fn inter_frame_delay(&self) -> Duration {
        if let Some(d) = self.inter_frame {
            return d.0;
        }
        if self.baud > 19_200 {
            // Modbus over serial line spec 2.5.1.1: fixed 1.75 ms above 19200 baud.
            return Duration::from_micros(1750);
        }
        let micros = 3.5 * 11.0 * 1_000_000.0 / f64::from(self.baud.max(1));
        Duration::from_micros(micros.ceil() as u64)
    }
    /// Theoretical wire time of `bytes` characters.
    pub fn wire_time(&self, bytes: u64) -> Duration {
        let bits = bytes * u64::from(self.bits_per_char());
        Duration::from_nanos(bits.saturating_mul(1_000_000_000) / u64::from(self.baud.max(1)))
    }
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity bit.
    #[default]
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// When a point's readings are published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportMode {
    /// Report by exception: on change beyond the deadband, on quality change, and at the heartbeat.
    #[default]
    Change,
    /// Publish every poll.
    Every,
}

/// Word order names accepted in `word_order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum WordOrder {
    /// Most significant word first.
    #[serde(rename = "big")]
    Big,
    /// Least significant word first.
    #[serde(rename = "little")]
    Little,
    /// Full order: big-endian.
    #[serde(rename = "ABCD", alias = "ABCDEFGH")]
    Abcd,
    /// Full order: words swapped.
    #[serde(rename = "CDAB", alias = "GHEFCDAB")]
    Cdab,
    /// Full order: bytes swapped.
    #[serde(rename = "BADC", alias = "BADCFEHG")]
    Badc,
    /// Full order: both swapped.
    #[serde(rename = "DCBA", alias = "HGFEDCBA")]
    Dcba,
}

/// Byte order inside each register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ByteOrder {
    /// High byte first (Modbus standard).
    Big,
    /// Low byte first.
    Little,
}

/// One `[[sensors.modbus]]` device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    /// Topic level of the device; unique.
    pub name: String,
    /// TCP or RTU.
    pub transport: Transport,
    /// Unit (slave) id (default 1).
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// Whether `address` values are 0-based (default) or 1-based.
    #[serde(default)]
    pub address_base: u8,
    /// Default poll interval (default 1s).
    #[serde(default)]
    pub every: Option<Dur>,
    /// Response timeout per request (default 1s).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Retries after a timeout or transport error (default 1).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff after a failed poll, doubled per failure (default 1s).
    #[serde(default)]
    pub backoff: Option<Dur>,
    /// Backoff ceiling (default 30s).
    #[serde(default)]
    pub max_backoff: Option<Dur>,
    /// Consecutive failed polls before quarantine (default 5).
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: u32,
    /// How long a quarantined device waits between probes (default 60s).
    #[serde(default)]
    pub quarantine: Option<Dur>,
    /// Largest run of unused addresses that reads may span to join points (default 8).
    #[serde(default = "default_max_gap")]
    pub max_gap: u16,
    /// Largest register read (default and maximum 125).
    #[serde(default = "default_max_registers")]
    pub max_registers: u16,
    /// Largest bit read (default and maximum 2000).
    #[serde(default = "default_max_bits")]
    pub max_bits: u16,
    /// Default report mode.
    #[serde(default)]
    pub report: ReportMode,
    /// Default maximum silence for report-by-exception (default 60s; "0s" disables).
    #[serde(default)]
    pub heartbeat: Option<Dur>,
    /// Default MQTT QoS of readings.
    #[serde(default)]
    pub qos: QoS,
    /// Default retain flag of readings.
    #[serde(default)]
    pub retain: bool,
    /// The register map.
    #[serde(default, deserialize_with = "checked_points")]
    pub points: Vec<ModbusPoint>,
}

/// One point of a Modbus device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusPoint {
    /// Topic level of the point; unique in the device.
    pub name: String,
    /// coil, discrete, input, holding.
    pub kind: Area,
    /// Address in the device's `address_base`.
    pub address: u32,
    /// Value type (default bool for bit areas, u16 for registers).
    #[serde(rename = "type", default)]
    pub ty: Option<DataType>,
    /// Registers of a `string`.
    #[serde(default)]
    pub length: Option<u16>,
    /// Bit index of a `bit` point.
    #[serde(default)]
    pub bit: Option<u8>,
    /// Word order (big, little) or a full order (ABCD, CDAB, BADC, DCBA and 64-bit names).
    #[serde(default)]
    pub word_order: Option<WordOrder>,
    /// Byte order in each register (with big/little word_order).
    #[serde(default)]
    pub byte_order: Option<ByteOrder>,
    /// Multiplier (default 1).
    #[serde(default = "one")]
    pub scale: f64,
    /// Added after scaling (default 0).
    #[serde(default)]
    pub offset: f64,
    /// Engineering unit published with readings.
    #[serde(default)]
    pub unit: Option<String>,
    /// Poll interval (default: the device's).
    #[serde(default)]
    pub every: Option<Dur>,
    /// Report mode (default: the device's).
    #[serde(default)]
    pub report: Option<ReportMode>,
    /// Absolute deadband in engineering units.
    #[serde(default)]
    pub deadband: Option<f64>,
    /// Deadband in percent of the last reported value.
    #[serde(default)]
    pub deadband_percent: Option<f64>,
    /// Maximum silence (default: the device's).
    #[serde(default)]
    pub heartbeat: Option<Dur>,
    /// QoS (default: the device's).
    #[serde(default)]
    pub qos: Option<QoS>,
    /// Retain (default: the device's).
    #[serde(default)]
    pub retain: Option<bool>,
    /// Whether `.../set` may write this point.
    #[serde(default)]
    pub writable: bool,
    /// Force FC 15 (coils) or 16 (registers) for writes.
    #[serde(default)]
    pub write_function: Option<u8>,
    /// Lowest good value (engineering units); also bounds writes.
    #[serde(default)]
    pub min: Option<f64>,
    /// Highest good value (engineering units); also bounds writes.
    #[serde(default)]
    pub max: Option<f64>,
}

impl ModbusPoint {
    /// The resolved value type.
    pub fn data_type(&self) -> DataType {
        self.ty.unwrap_or(if self.kind.is_bit() {
            DataType::Bool
        } else {
            DataType::U16
        })
    }
    /// The resolved byte order.
    pub fn order(&self) -> Order {
        let byte_big = self.byte_order != Some(ByteOrder::Little);
        match self.word_order {
            None | Some(WordOrder::Big) => Order::from_parts(true, byte_big),
            Some(WordOrder::Little) => Order::from_parts(false, byte_big),
            Some(WordOrder::Abcd) => Order::Abcd,
            Some(WordOrder::Cdab) => Order::Cdab,
            Some(WordOrder::Badc) => Order::Badc,
            Some(WordOrder::Dcba) => Order::Dcba,
        }
    }
    /// The codec for this point.
    pub fn codec(&self) -> Codec {
        Codec {
            ty: self.data_type(),
            order: self.order(),
            length: self.length.unwrap_or(1),
            bit: self.bit.unwrap_or(0),
            scale: self.scale,
            offset: self.offset,
        }
    }
    /// Registers or bits read for this point.
    pub fn count(&self) -> u16 {
        if self.kind.is_bit() {
            1
        } else {
            self.codec().count()
        }
    }

    fn check_at(&self, p: &str, base: Option<u8>) -> Result<(), ConfigError> {
        check_name(&self.name, &format!("{p}.name"))?;
        if self.name == "status" {
            return Err(ConfigError::new(
                format!("{p}.name"),
                "\"status\" is reserved for the device status topic",
            ));
        }
        let ty = self.data_type();
        if self.kind.is_bit() && ty != DataType::Bool {
            return Err(ConfigError::new(
                format!("{p}.type"),
                format!("{:?} points hold single bits; type must be bool", self.kind)
                    .to_lowercase(),
            ));
        }
        match (ty, self.length) {
            (DataType::String, None) => {
                return Err(ConfigError::new(
                    format!("{p}.length"),
                    "a string point needs `length` (registers)",
                ));
            }
            (DataType::String, Some(n)) if n == 0 || n > 125 => {
                return Err(ConfigError::new(
                    format!("{p}.length"),
                    format!(
                        "{n} registers: a string must be 1..=125 registers (one read is at most 125)"
                    ),
                ));
            }
            (DataType::String, _) => {}
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{p}.length"),
                    "`length` only applies to type = \"string\"",
                ));
            }
            _ => {}
        }
        match (ty, self.bit) {
            (DataType::Bit, None) => {
                return Err(ConfigError::new(
                    format!("{p}.bit"),
                    "a bit point needs `bit` (0..=15)",
                ));
            }
            (DataType::Bit, Some(b)) if b > 15 => {
                return Err(ConfigError::new(
                    format!("{p}.bit"),
                    format!("bit {b} does not exist in a 16-bit register"),
                ));
            }
            (DataType::Bit, _) => {}
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{p}.bit"),
                    "`bit` only applies to type = \"bit\"",
                ));
            }
            _ => {}
        }
        if matches!(
            self.word_order,
            Some(WordOrder::Abcd | WordOrder::Cdab | WordOrder::Badc | WordOrder::Dcba)
        ) && self.byte_order.is_some()
        {
            return Err(ConfigError::new(
                format!("{p}.byte_order"),
                "a full order (ABCD...) in word_order already fixes the byte order",
            ));
        }
        if !ty.is_numeric() && (self.scale != 1.0 || self.offset != 0.0) {
            return Err(ConfigError::new(
                format!("{p}.scale"),
                "scale/offset apply to numeric types only",
            ));
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            return Err(ConfigError::new(
                format!("{p}.scale"),
                "must be a finite, non-zero number",
            ));
        }
        if !self.offset.is_finite() {
            return Err(ConfigError::new(format!("{p}.offset"), "must be finite"));
        }
        check_report(p, self.deadband, self.deadband_percent)?;
        if let (Some(lo), Some(hi)) = (self.min, self.max)
            && lo > hi
        {
            return Err(ConfigError::new(
                format!("{p}.min"),
                "min is greater than max",
            ));
        }
        if let Some(e) = self.every
            && e.0.is_zero()
        {
            return Err(ConfigError::new(
                format!("{p}.every"),
                "poll interval must be above zero",
            ));
        }
        // Addresses: the last item must fit in 0..=65535 after removing the base.
        let count = u32::from(self.count());
        // Without the device (while deserializing the point alone) assume the most lenient base, 1.
        let base = base.map_or(1.min(self.address), u32::from);
        if self.address < base {
            return Err(ConfigError::new(
                format!("{p}.address"),
                format!("address {} is below address_base {base}", self.address),
            ));
        }
        let last = self.address - base + count - 1;
        if last > 65_535 {
            return Err(ConfigError::new(
                format!("{p}.address"),
                format!(
                    "address {} plus {count} item(s) overflows the 65536-address space",
                    self.address
                ),
            ));
        }
        if self.writable {
            if matches!(self.kind, Area::Discrete | Area::Input) {
                return Err(ConfigError::new(
                    format!("{p}.writable"),
                    format!("{:?} points are read-only", self.kind).to_lowercase(),
                ));
            }
            if ty == DataType::Bit {
                return Err(ConfigError::new(
                    format!("{p}.writable"),
                    "bit-of-register points are read-only; map the whole register to write it",
                ));
            }
        }
        if let Some(fc) = self.write_function {
            let ok = match self.kind {
                Area::Coil => fc == 5 || fc == 15,
                Area::Holding if count == 1 => fc == 6 || fc == 16,
                Area::Holding => fc == 16,
                _ => false,
            };
            if !ok || !self.writable {
                return Err(ConfigError::new(
                    format!("{p}.write_function"),
                    format!(
                        "function {fc} cannot write this point (coils: 5 or 15; one register: 6 or 16; several: 16; the point must be writable)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks each point as the list is read, so toml reports the line of the `points` array.
fn checked_points<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ModbusPoint>, D::Error> {
    let points = Vec::<ModbusPoint>::deserialize(d)?;
    for (i, p) in points.iter().enumerate() {
        p.check_at(&format!("points[{i}]"), None)
            .map_err(serde::de::Error::custom)?;
    }
    Ok(points)
}

impl Check for ModbusDevice {
    fn check(&self) -> Result<(), ConfigError> {
        self.check_at("")
    }
}

impl ModbusDevice {
    /// The resolved poll interval of a point.
    pub fn every_of(&self, p: &ModbusPoint) -> Duration {
        p.every
            .or(self.every)
            .map_or(Duration::from_secs(1), |d| d.0)
    }
    /// Response timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout.map_or(Duration::from_secs(1), |d| d.0)
    }
    /// First backoff.
    pub fn backoff(&self) -> Duration {
        self.backoff.map_or(Duration::from_secs(1), |d| d.0)
    }
    /// Backoff ceiling.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff.map_or(Duration::from_secs(30), |d| d.0)
    }
    /// Probe period in quarantine.
    pub fn quarantine(&self) -> Duration {
        self.quarantine.map_or(Duration::from_secs(60), |d| d.0)
    }
    /// Resolved heartbeat of a point (None = disabled).
    pub fn heartbeat_of(&self, p: &ModbusPoint) -> Option<Duration> {
        let d = p
            .heartbeat
            .or(self.heartbeat)
            .map_or(Duration::from_secs(60), |d| d.0);
        (!d.is_zero()).then_some(d)
    }

    fn check_at(&self, prefix: &str) -> Result<(), ConfigError> {
        let k = |key: &str| {
            if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            }
        };
        check_name(&self.name, &k("name"))?;
        match &self.transport {
            Transport::Tcp(t) => {
                if t.host.trim().is_empty() {
                    return Err(ConfigError::new(
                        k("transport.tcp.host"),
                        "must not be empty",
                    ));
                }
            }
            Transport::Rtu(r) => check_serial(r, &k("transport.rtu"))?,
        }
        if self.address_base > 1 {
            return Err(ConfigError::new(k("address_base"), "must be 0 or 1"));
        }
        if matches!(self.transport, Transport::Rtu(_)) && !(1..=247).contains(&self.unit) {
            return Err(ConfigError::new(
                k("unit"),
                "an RTU unit id must be 1..=247 (0 is broadcast)",
            ));
        }
        if self.max_registers == 0 || self.max_registers > 125 {
            return Err(ConfigError::new(
                k("max_registers"),
                "must be 1..=125 (the Modbus limit for one read)",
            ));
        }
        if self.max_bits == 0 || self.max_bits > 2000 {
            return Err(ConfigError::new(
                k("max_bits"),
                "must be 1..=2000 (the Modbus limit for one read)",
            ));
        }
        if self.timeout().is_zero() {
            return Err(ConfigError::new(k("timeout"), "must be above zero"));
        }
        if self.retries > 10 {
            return Err(ConfigError::new(k("retries"), "at most 10"));
        }
        if self.quarantine_after == 0 {
            return Err(ConfigError::new(
                k("quarantine_after"),
                "must be at least 1",
            ));
        }
        if let Some(e) = self.every
            && e.0.is_zero()
        {
            return Err(ConfigError::new(
                k("every"),
                "poll interval must be above zero",
            ));
        }
        let mut seen = HashMap::new();
        for (i, p) in self.points.iter().enumerate() {
            let pp = k(&format!("points[{i}]"));
            p.check_at(&pp, Some(self.address_base))?;
            if p.count() > self.max_registers && !p.kind.is_bit() {
                return Err(ConfigError::new(
                    format!("{pp}.length"),
                    format!(
                        "{} registers exceed max_registers = {}",
                        p.count(),
                        self.max_registers
                    ),
                ));
            }
            if let Some(prev) = seen.insert(p.name.as_str(), i) {
                return Err(ConfigError::new(
                    format!("{pp}.name"),
                    format!("duplicate point name {:?} (also points[{prev}])", p.name),
                ));
            }
        }
        Ok(())
    }
}

/// Input framing of a serial line sensor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// Frames end at `\n` (a trailing `\r` is dropped).
    #[default]
    Lines,
    /// Frames of exactly `frame_length` bytes.
    Fixed,
}

/// Parser of a serial line sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// NMEA 0183 GGA/RMC sentences.
    Nmea,
    /// `key=value` pairs separated by spaces, commas or semicolons.
    Kv,
    /// Comma-separated values with named `columns`.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// One `[[sensors.serial]]` line sensor.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSensor {
    /// Topic level of the sensor; unique among all devices.
    pub name: String,
    /// Device path.
    pub port: String,
    /// Baud rate (default 9600).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5..=8 (default 8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// none, even, odd.
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// lines or fixed.
    #[serde(default)]
    pub framing: Framing,
    /// Frame size for `fixed`; line limit for `lines` (default 1024).
    #[serde(default)]
    pub frame_length: Option<usize>,
    /// Parser.
    pub format: Format,
    /// Column names for `csv`.
    #[serde(default)]
    pub columns: Vec<String>,
    /// CSV separator (default `,`).
    #[serde(default)]
    pub separator: Option<char>,
    /// Accept NMEA sentences without a checksum (default false).
    #[serde(default)]
    pub allow_missing_checksum: bool,
    /// First reopen delay after the port fails (default 1s, doubling).
    #[serde(default)]
    pub reopen_backoff: Option<Dur>,
    /// Ceiling of the reopen delay (default 30s).
    #[serde(default)]
    pub max_reopen_backoff: Option<Dur>,
    /// Publish the last value as `stale` when no fresh one came for this long.
    #[serde(default)]
    pub stale_after: Option<Dur>,
    /// Default report mode.
    #[serde(default)]
    pub report: ReportMode,
    /// Default heartbeat (default 60s; "0s" disables).
    #[serde(default)]
    pub heartbeat: Option<Dur>,
    /// Default QoS.
    #[serde(default)]
    pub qos: QoS,
    /// Default retain.
    #[serde(default)]
    pub retain: bool,
    /// Fields to publish; empty publishes every field with defaults.
    #[serde(default)]
    pub points: Vec<SerialPoint>,
}

/// One field of a serial sensor published as a point.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPoint {
    /// Field name produced by the parser (NMEA: latitude, longitude, altitude, fix_quality, satellites, hdop, speed_knots, speed_mps, course, fix_valid).
    pub field: String,
    /// Topic level (default: the field name).
    #[serde(default)]
    pub name: Option<String>,
    /// Engineering unit.
    #[serde(default)]
    pub unit: Option<String>,
    /// Multiplier for numbers.
    #[serde(default = "one")]
    pub scale: f64,
    /// Offset for numbers.
    #[serde(default)]
    pub offset: f64,
    /// Report mode.
    #[serde(default)]
    pub report: Option<ReportMode>,
    /// Absolute deadband.
    #[serde(default)]
    pub deadband: Option<f64>,
    /// Percent deadband.
    #[serde(default)]
    pub deadband_percent: Option<f64>,
    /// Maximum silence.
    #[serde(default)]
    pub heartbeat: Option<Dur>,
    /// QoS.
    #[serde(default)]
    pub qos: Option<QoS>,
    /// Retain.
    #[serde(default)]
    pub retain: Option<bool>,
    /// Lowest good value.
    #[serde(default)]
    pub min: Option<f64>,
    /// Highest good value.
    #[serde(default)]
    pub max: Option<f64>,
}

impl SerialPoint {
    /// Topic level of the point.
    pub fn topic_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.field)
    }

    /// True when the configuration says the field holds numbers: it has a unit, a scale
    /// or offset, a range or a deadband.
    pub fn is_numeric(&self) -> bool {
        self.unit.is_some()
            || self.scale != 1.0
            || self.offset != 0.0
            || self.min.is_some()
            || self.max.is_some()
            || self.deadband.is_some()
            || self.deadband_percent.is_some()
    }
}

impl SerialSensor {
    /// Serial settings in the shape Modbus RTU uses.
    pub fn line(&self) -> RtuTransport {
        RtuTransport {
            port: self.port.clone(),
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            inter_frame: None,
        }
    }
    /// Resolved heartbeat (None = disabled).
    pub fn heartbeat_of(&self, p: Option<&SerialPoint>) -> Option<Duration> {
        let d = p
            .and_then(|p| p.heartbeat)
            .or(self.heartbeat)
            .map_or(Duration::from_secs(60), |d| d.0);
        (!d.is_zero()).then_some(d)
    }

    fn check_at(&self, prefix: &str) -> Result<(), ConfigError> {
        let k = |key: &str| {
            if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            }
        };
        check_name(&self.name, &k("name"))?;
        check_serial(&self.line(), prefix)?;
        match (self.framing, self.frame_length) {
            (Framing::Fixed, None) => {
                return Err(ConfigError::new(
                    k("frame_length"),
                    "fixed framing needs frame_length",
                ));
            }
            (_, Some(0)) => return Err(ConfigError::new(k("frame_length"), "must be above zero")),
            (_, Some(n)) if n > 65_536 => {
                return Err(ConfigError::new(k("frame_length"), "at most 65536"));
            }
            _ => {}
        }
        if self.format == Format::Csv && self.columns.is_empty() {
            return Err(ConfigError::new(k("columns"), "csv needs the column names"));
        }
        if self.format != Format::Csv && (!self.columns.is_empty() || self.separator.is_some()) {
            return Err(ConfigError::new(
                k("columns"),
                "columns/separator apply to csv only",
            ));
        }
        let mut seen = HashMap::new();
        for (i, p) in self.points.iter().enumerate() {
            let pp = k(&format!("points[{i}]"));
            check_name(p.topic_name(), &format!("{pp}.name"))?;
            if p.topic_name() == "status" {
                return Err(ConfigError::new(
                    format!("{pp}.name"),
                    "\"status\" is reserved for the device status topic",
                ));
            }
            if !p.scale.is_finite() || p.scale == 0.0 || !p.offset.is_finite() {
                return Err(ConfigError::new(
                    format!("{pp}.scale"),
                    "scale must be finite and non-zero, offset finite",
                ));
            }
            check_report(&pp, p.deadband, p.deadband_percent)?;
            if let Some(prev) = seen.insert(p.topic_name(), i) {
                return Err(ConfigError::new(
                    format!("{pp}.name"),
                    format!("duplicate point name (also points[{prev}])"),
                ));
            }
        }
        Ok(())
    }
}

impl Check for SerialSensor {
    fn check(&self) -> Result<(), ConfigError> {
        self.check_at("")
    }
}

impl SensorsConfig {
    /// Topic prefix (default `outpost`).
    pub fn prefix(&self) -> &str {
        self.topic_prefix.as_deref().unwrap_or("outpost")
    }
    /// Interval of `$SYS` counters (None = disabled).
    pub fn stats_every(&self) -> Option<Duration> {
        let d = self.stats_interval.map_or(Duration::from_secs(10), |d| d.0);
        (!d.is_zero()).then_some(d)
    }

    /// Semantic checks across the whole section; errors name the key path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.topic_prefix {
            for (i, level) in p.split('/').enumerate() {
                if level.is_empty() || level.contains(['+', '#', '\0']) {
                    return Err(ConfigError::new(
                        "sensors.topic_prefix",
                        format!("level {i} ({level:?}) is not a valid topic level"),
                    ));
                }
            }
        }
        let mut names: HashMap<&str, String> = HashMap::new();
        let mut lines: HashMap<&str, (String, &RtuTransport)> = HashMap::new();
        for (i, d) in self.modbus.iter().enumerate() {
            let path = format!("sensors.modbus[{i}]");
            d.check_at(&path)?;
            if let Some(prev) = names.insert(d.name.as_str(), path.clone()) {
                return Err(ConfigError::new(
                    format!("{path}.name"),
                    format!("duplicate device name {:?} (also {prev})", d.name),
                ));
            }
            if let Transport::Rtu(r) = &d.transport {
                match lines.get(r.port.as_str()) {
                    Some((prev, first)) if !same_line_settings(first, r) => {
                        return Err(ConfigError::new(
                            format!("{path}.transport.rtu"),
                            format!(
                                "port {} is shared with {prev} but its serial settings differ",
                                r.port
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        lines.insert(r.port.as_str(), (path.clone(), r));
                    }
                }
            }
        }
        for (i, s) in self.serial.iter().enumerate() {
            let path = format!("sensors.serial[{i}]");
            s.check_at(&path)?;
            if let Some(prev) = names.insert(s.name.as_str(), path.clone()) {
                return Err(ConfigError::new(
                    format!("{path}.name"),
                    format!("duplicate device name {:?} (also {prev})", s.name),
                ));
            }
            if let Some((prev, _)) = lines.get(s.port.as_str()) {
                return Err(ConfigError::new(
                    format!("{path}.port"),
                    format!("port {} is already used by {prev}", s.port),
                ));
            }
        }
        Ok(())
    }
}

fn same_line_settings(a: &RtuTransport, b: &RtuTransport) -> bool {
    a.baud == b.baud
        && a.data_bits == b.data_bits
        && a.parity == b.parity
        && a.stop_bits == b.stop_bits
        && a.inter_frame == b.inter_frame
}

fn check_serial(r: &RtuTransport, prefix: &str) -> Result<(), ConfigError> {
    let k = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    if r.port.trim().is_empty() {
        return Err(ConfigError::new(k("port"), "must not be empty"));
    }
    if r.baud == 0 || r.baud > 4_000_000 {
        return Err(ConfigError::new(k("baud"), "must be 1..=4000000"));
    }
    if !(5..=8).contains(&r.data_bits) {
        return Err(ConfigError::new(k("data_bits"), "must be 5..=8"));
    }
    if !(1..=2).contains(&r.stop_bits) {
        return Err(ConfigError::new(k("stop_bits"), "must be 1 or 2"));
    }
    Ok(())
}

fn check_report(p: &str, deadband: Option<f64>, pct: Option<f64>) -> Result<(), ConfigError> {
    if let Some(d) = deadband
        && !(d.is_finite() && d >= 0.0)
    {
        return Err(ConfigError::new(
            format!("{p}.deadband"),
            "must be a non-negative number",
        ));
    }
    if let Some(d) = pct
        && !(d.is_finite() && d >= 0.0)
    {
        return Err(ConfigError::new(
            format!("{p}.deadband_percent"),
            "must be a non-negative number",
        ));
    }
    if deadband.is_some() && pct.is_some() {
        return Err(ConfigError::new(
            format!("{p}.deadband_percent"),
            "use either deadband or deadband_percent",
        ));
    }
    Ok(())
}

/// Names become topic levels: no separators, wildcards or NUL, not empty.
fn check_name(name: &str, path: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.contains(['/', '+', '#', '\0']) || name.starts_with('$') {
        return Err(ConfigError::new(
            path,
            format!("{name:?} is not a valid topic level (no /, +, #, leading $ or empty)"),
        ));
    }
    Ok(())
}

fn default_tcp_port() -> u16 {
    502
}
fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit() -> u8 {
    1
}
fn default_retries() -> u32 {
    1
}
fn default_quarantine_after() -> u32 {
    5
}
fn default_max_gap() -> u16 {
    8
}
fn default_max_registers() -> u16 {
    125
}
fn default_max_bits() -> u16 {
    2000
}
fn one() -> f64 {
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Root {
        sensors: SensorsConfig,
    }

    fn parse(src: &str) -> Result<SensorsConfig, String> {
        toml::from_str::<Root>(src)
            .map(|r| r.sensors)
            .map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
[sensors]
topic_prefix = "plant"
[[sensors.modbus]]
name = "boiler"
transport = { rtu = { port = "/dev/ttyUSB0", baud = 9600, parity = "even" } }
unit = 1
points = [
  { name = "temperature", kind = "input", address = 0, type = "f32", word_order = "big", scale = 0.1, unit = "°C", every = "5s", deadband = 0.2 },
  { name = "energy", kind = "holding", address = 10, type = "u64", word_order = "GHEFCDAB" },
  { name = "alarm", kind = "holding", address = 12, type = "bit", bit = 3 },
  { name = "model", kind = "holding", address = 20, type = "string", length = 8 },
  { name = "pump", kind = "coil", address = 0, writable = true },
]
[[sensors.modbus]]
name = "meter"
transport = { tcp = { host = "127.0.0.1" } }
points = [{ name = "power", kind = "holding", address = 1, type = "i32", word_order = "little", byte_order = "little" }]
[[sensors.serial]]
name = "gps"
port = "/dev/ttyACM0"
format = "nmea"
"#;

    #[test]
    fn the_design_example_parses_and_validates() {
        let c = parse(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(c.prefix(), "plant");
        let d = &c.modbus[0];
        assert_eq!(d.points[0].every, Some(Dur(Duration::from_secs(5))));
        assert_eq!(d.points[1].order(), Order::Cdab);
        assert_eq!(c.modbus[1].points[0].order(), Order::Dcba);
        assert_eq!(
            c.modbus[1].transport,
            Transport::Tcp(TcpTransport {
                host: "127.0.0.1".into(),
                port: 502
            })
        );
        match &d.transport {
            Transport::Rtu(r) => {
                assert_eq!(r.parity, Parity::Even);
                assert_eq!(r.bits_per_char(), 11);
                // 3.5 characters of 11 bits at 9600 baud.
                assert_eq!(r.inter_frame_delay(), Duration::from_micros(4011));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            crate::command_filters(&c, "gw-01"),
            vec!["plant/gw-01/sensors/+/+/set".to_string()]
        );
    }

    /// The sensors part of the sample config handed to the end-to-end test.
    #[test]
    fn end_to_end_sample_parses() {
        let src = r#"
[sensors]
clock = "trusted"
stats_interval = "1s"
[[sensors.modbus]]
name = "boiler"
transport = { tcp = { host = "127.0.0.1", port = 15020 } }
unit = 1
every = "200ms"
points = [
  { name = "temperature", kind = "input", address = 0, type = "f32", word_order = "big", scale = 0.1, unit = "°C", deadband = 0.2, retain = true },
  { name = "setpoint", kind = "holding", address = 10, type = "u16", scale = 0.1, writable = true, max = 90.0 },
]
"#;
        let c = parse(src).unwrap();
        c.validate().unwrap();
        assert!(c.modbus[0].points[0].retain == Some(true));
    }

    fn err_of(src: &str) -> String {
        match parse(src) {
            Err(e) => e,
            Ok(c) => c
                .validate()
                .map(|()| "valid".to_string())
                .unwrap_or_else(|e| e.to_string()),
        }
    }

    fn device(points: &str) -> String {
        format!(
            "[sensors]\n[[sensors.modbus]]\nname = \"d\"\ntransport = {{ tcp = {{ host = \"h\" }} }}\npoints = [\n{points}\n]\n"
        )
    }

    #[test]
    fn impossible_points_are_refused_with_line_and_key() {
        let e = err_of(&device(
            r#"{ name = "x", kind = "holding", address = 65534, type = "f64" }"#,
        ));
        assert!(
            e.contains("points[0].address") && e.contains("overflows"),
            "{e}"
        );
        assert!(e.contains("line 5"), "toml should report the line: {e}");
        let e = err_of(&device(
            r#"{ name = "x", kind = "holding", address = 0, type = "string", length = 126 }"#,
        ));
        assert!(e.contains("points[0].length") && e.contains("125"), "{e}");
        let e = err_of(&device(
            r#"{ name = "x", kind = "holding", address = 0, type = "u128" }"#,
        ));
        assert!(e.contains("unknown variant") && e.contains("u128"), "{e}");
        let e = err_of(&device(
            r#"{ name = "x", kind = "coil", address = 0, type = "u16" }"#,
        ));
        assert!(e.contains("type must be bool"), "{e}");
        let e = err_of(&device(
            r#"{ name = "x", kind = "holding", address = 0, type = "bit" }"#,
        ));
        assert!(e.contains("points[0].bit"), "{e}");
        let e = err_of(&device(
            r#"{ name = "x", kind = "input", address = 0, writable = true }"#,
        ));
        assert!(e.contains("read-only"), "{e}");
        let e = err_of(&device(
            r#"{ name = "x", kind = "holding", address = 0, type = "u32", writable = true, write_function = 6 }"#,
        ));
        assert!(e.contains("write_function"), "{e}");
        let e = err_of(&device(
            r#"{ name = "a/b", kind = "holding", address = 0 }"#,
        ));
        assert!(e.contains("topic level"), "{e}");
        let e = err_of(&device(
            r#"{ name = "x", kind = "holding", address = 0, colour = "red" }"#,
        ));
        assert!(e.contains("unknown field"), "{e}");
        let e = err_of(&device(
            "{ name = \"x\", kind = \"holding\", address = 0 },\n{ name = \"x\", kind = \"holding\", address = 1 }",
        ));
        assert!(
            e.contains("points[1].name") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn one_based_addresses() {
        let src = "[sensors]\n[[sensors.modbus]]\nname = \"d\"\naddress_base = 1\ntransport = { tcp = { host = \"h\" } }\npoints = [{ name = \"x\", kind = \"holding\", address = 0 }]\n";
        let e = err_of(src);
        assert!(e.contains("below address_base"), "{e}");
        let src = src.replace("address = 0", "address = 65536");
        assert_eq!(err_of(&src), "valid");
    }

    #[test]
    fn shared_rtu_lines_must_agree() {
        let src = r#"
[sensors]
[[sensors.modbus]]
name = "a"
transport = { rtu = { port = "/dev/ttyUSB0", baud = 9600 } }
[[sensors.modbus]]
name = "b"
unit = 2
transport = { rtu = { port = "/dev/ttyUSB0", baud = 19200 } }
"#;
        let e = err_of(src);
        assert!(e.starts_with("sensors.modbus[1].transport.rtu"), "{e}");
        let e = err_of(&src.replace("name = \"b\"", "name = \"a\""));
        assert!(e.contains("duplicate device name"), "{e}");
    }

    #[test]
    fn serial_sensor_checks() {
        let e = err_of(
            "[sensors]\n[[sensors.serial]]\nname = \"s\"\nport = \"/dev/x\"\nformat = \"csv\"\n",
        );
        assert!(e.contains("columns"), "{e}");
        let e = err_of(
            "[sensors]\n[[sensors.serial]]\nname = \"s\"\nport = \"/dev/x\"\nformat = \"kv\"\nframing = \"fixed\"\n",
        );
        assert!(e.contains("frame_length"), "{e}");
        let e = err_of(
            "[sensors]\n[[sensors.serial]]\nname = \"s\"\nport = \"/dev/x\"\nformat = \"kv\"\nreopen_backoff = \"soon\"\n",
        );
        assert!(e.contains("is not a duration"), "{e}");
        let e = err_of(
            "[sensors]\n[[sensors.serial]]\nname = \"s\"\nport = \"/dev/x\"\nformat = \"kv\"\nreopen_backoff = \"100years\"\n",
        );
        assert!(e.contains("longer than 30 days"), "{e}");
    }
}
