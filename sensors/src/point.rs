//! Point data types, word/byte orders, register decoding/encoding and scaling.

use serde::Deserialize;
use std::fmt;

/// The Modbus data area a point lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Area {
    /// Read/write bits (FC 1, 5, 15).
    Coil,
    /// Read-only bits (FC 2).
    #[serde(alias = "discrete_input")]
    Discrete,
    /// Read-only registers (FC 4).
    #[serde(alias = "input_register")]
    Input,
    /// Read/write registers (FC 3, 6, 16).
    #[serde(alias = "holding_register")]
    Holding,
}

impl Area {
    /// True for the two bit areas.
    pub fn is_bit(self) -> bool {
        matches!(self, Area::Coil | Area::Discrete)
    }
    /// The protocol limit on items in one read request.
    pub fn max_read(self) -> u16 {
        if self.is_bit() { 2000 } else { 125 }
    }
}

/// The value type stored in one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    /// A coil/discrete bit, or a register that is non-zero.
    Bool,
    /// Unsigned 16-bit register.
    U16,
    /// Signed 16-bit register.
    I16,
    /// Unsigned 32-bit, two registers.
    U32,
    /// Signed 32-bit, two registers.
    I32,
    /// Unsigned 64-bit, four registers.
    U64,
    /// Signed 64-bit, four registers.
    I64,
    /// IEEE 754 single, two registers.
    F32,
    /// IEEE 754 double, four registers.
    F64,
    /// Text of `length` registers (two bytes each).
    String,
    /// Bit `bit` (0 = least significant) of one register.
    Bit,
}

impl DataType {
    /// Registers the type occupies (`string` needs its length).
    pub fn registers(self, string_len: u16) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 | DataType::Bit => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String => string_len,
        }
    }
    /// True when the type carries a number that scale/offset/deadband apply to.
    pub fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::Bit | DataType::String)
    }
    /// Integer range of the raw register value, if an integer type.
    pub fn int_range(self) -> Option<(f64, f64)> {
        Some(match self {
            DataType::U16 => (0.0, u16::MAX as f64),
            DataType::I16 => (i16::MIN as f64, i16::MAX as f64),
            DataType::U32 => (0.0, u32::MAX as f64),
            DataType::I32 => (i32::MIN as f64, i32::MAX as f64),
            DataType::U64 => (0.0, u64::MAX as f64),
            DataType::I64 => (i64::MIN as f64, i64::MAX as f64),
            _ => return None,
        })
    }
}

/// Order of the bytes of a multi-register value, written as the letters of a big-endian value.
///
/// `ABCD` is Modbus's native big-endian; `CDAB` swaps words; `BADC` swaps bytes in each word;
/// `DCBA` does both. The 64-bit names (`ABCDEFGH`, `GHEFCDAB`, `BADCFEHG`, `HGFEDCBA`) are aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Big-endian words, big-endian bytes.
    #[default]
    Abcd,
    /// Little-endian words (low word first), big-endian bytes.
    Cdab,
    /// Big-endian words, bytes swapped in each word.
    Badc,
    /// Little-endian words, bytes swapped.
    Dcba,
}

impl Order {
    /// Builds the order from separate word and byte orders (true = big-endian).
    pub fn from_parts(word_big: bool, byte_big: bool) -> Self {
        match (word_big, byte_big) {
            (true, true) => Order::Abcd,
            (false, true) => Order::Cdab,
            (true, false) => Order::Badc,
            (false, false) => Order::Dcba,
        }
    }
    fn words_reversed(self) -> bool {
        matches!(self, Order::Cdab | Order::Dcba)
    }
    fn bytes_swapped(self) -> bool {
        matches!(self, Order::Badc | Order::Dcba)
    }
    /// Parses one of the names accepted in `word_order`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "ABCD" | "ABCDEFGH" | "BIG" => Order::Abcd,
            "CDAB" | "GHEFCDAB" | "LITTLE" => Order::Cdab,
            "BADC" | "BADCFEHG" => Order::Badc,
            "DCBA" | "HGFEDCBA" => Order::Dcba,
            _ => return None,
        })
    }
}

/// A decoded point value, before or after scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A bit.
    Bool(bool),
    /// A signed integer (all signed types and unsigned ones that fit).
    Int(i64),
    /// An unsigned integer above `i64::MAX`.
    UInt(u64),
    /// A float, or any scaled value.
    Float(f64),
    /// Text.
    Text(String),
}

impl Value {
    /// The value as f64 when numeric (bools are 0/1).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) => None,
        }
    }
    /// Converts to JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::UInt(u) => serde_json::Value::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(t) => serde_json::Value::String(t.clone()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(t) => write!(f, "{t}"),
        }
    }
}

/// Why a raw reading could not become a good value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer registers than the type needs (a short response).
    #[error("short data: need {need} registers, got {got}")]
    Short {
        /// Registers needed.
        need: usize,
        /// Registers present.
        got: usize,
    },
    /// A float that is NaN or infinite.
    #[error("not a number")]
    NotANumber,
    /// Outside the configured min/max.
    #[error("out of range: {0}")]
    OutOfRange(String),
}

/// Why a commanded value cannot be written to a point; sent back in the write result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteValueError {
    /// A bit takes true/false, on/off or 1/0 (the value as given).
    #[error("expected a boolean, got {0}")]
    NotABool(String),
    /// A string point takes a string.
    #[error("expected a string")]
    ExpectedString,
    /// The string does not fit the point's registers (their size in bytes).
    #[error("string longer than {0} bytes")]
    StringTooLong(usize),
    /// A `bit` point shares its register; write the register instead.
    #[error("bit points are written through their register")]
    BitPoint,
    /// A numeric point takes a number.
    #[error("expected a number")]
    ExpectedNumber,
    /// NaN or an infinity.
    #[error("not a number")]
    NotANumber,
    /// Undoing `scale`/`offset` gives no finite number (a zero scale).
    #[error("value cannot be unscaled")]
    CannotUnscale,
    /// The raw value does not fit the register type (its name in lower case).
    #[error("{value} out of range for {ty}")]
    OutOfRangeFor {
        /// The engineering value asked for.
        value: f64,
        /// The register type.
        ty: String,
    },
    /// The point's type has no integer range (not expected for register types).
    #[error("not an integer type")]
    NotAnInteger,
}

/// How one point's registers are interpreted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    /// Value type.
    pub ty: DataType,
    /// Byte order.
    pub order: Order,
    /// Register count for strings.
    pub length: u16,
    /// Bit index for `bit`.
    pub bit: u8,
    /// Multiplier applied to the raw value.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

impl Codec {
    /// A codec with no scaling.
    pub fn plain(ty: DataType, order: Order) -> Self {
        Codec {
            ty,
            order,
            length: 1,
            bit: 0,
            scale: 1.0,
            offset: 0.0,
        }
    }

    /// Registers (or bits) the point occupies.
    pub fn count(&self) -> u16 {
        self.ty.registers(self.length)
    }

    fn scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }

    /// Bytes of the value in big-endian order, undoing the configured order.
    fn be_bytes(&self, regs: &[u16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(regs.len() * 2);
        let mut push = |r: u16| {
            let r = if self.order.bytes_swapped() {
                r.swap_bytes()
            } else {
                r
            };
            out.extend_from_slice(&r.to_be_bytes());
        };
        if self.order.words_reversed() {
            regs.iter().rev().copied().for_each(&mut push);
        } else {
            regs.iter().copied().for_each(&mut push);
        }
        out
    }

    /// Decodes registers into a scaled value.
    pub fn decode_registers(&self, regs: &[u16]) -> Result<Value, DecodeError> {
        let need = self.count() as usize;
        if regs.len() < need {
            return Err(DecodeError::Short {
                need,
                got: regs.len(),
            });
        }
        let regs = &regs[..need];
        let raw = match self.ty {
            DataType::Bool => return Ok(Value::Bool(regs[0] != 0)),
            DataType::Bit => return Ok(Value::Bool((regs[0] >> (self.bit & 15)) & 1 == 1)),
            DataType::String => {
                let mut bytes = Vec::with_capacity(need * 2);
                for r in regs {
                    let r = if self.order.bytes_swapped() {
                        r.swap_bytes()
                    } else {
                        *r
                    };
                    bytes.extend_from_slice(&r.to_be_bytes());
                }
                let end = bytes
                    .iter()
                    .rposition(|b| *b != 0 && *b != b' ')
                    .map_or(0, |p| p + 1);
                bytes.truncate(end);
                if let Some(nul) = bytes.iter().position(|b| *b == 0) {
                    bytes.truncate(nul);
                }
                return Ok(Value::Text(String::from_utf8_lossy(&bytes).into_owned()));
            }
            _ => self.be_bytes(regs),
        };
        let value = match self.ty {
            DataType::U16 => Value::Int(i64::from(u16::from_be_bytes([raw[0], raw[1]]))),
            DataType::I16 => Value::Int(i64::from(i16::from_be_bytes([raw[0], raw[1]]))),
            DataType::U32 => Value::Int(i64::from(u32::from_be_bytes(arr4(&raw)))),
            DataType::I32 => Value::Int(i64::from(i32::from_be_bytes(arr4(&raw)))),
            DataType::U64 => {
                let v = u64::from_be_bytes(arr8(&raw));
                i64::try_from(v).map_or(Value::UInt(v), Value::Int)
            }
            DataType::I64 => Value::Int(i64::from_be_bytes(arr8(&raw))),
            DataType::F32 => Value::Float(f64::from(f32::from_be_bytes(arr4(&raw)))),
            DataType::F64 => Value::Float(f64::from_be_bytes(arr8(&raw))),
            DataType::Bool | DataType::Bit | DataType::String => {
                return Err(DecodeError::Short { need, got: 0 });
            }
        };
        self.apply_scale(value)
    }

    /// Applies scale and offset; integers stay integers when unscaled.
    pub fn apply_scale(&self, value: Value) -> Result<Value, DecodeError> {
        let v = match value {
            Value::Float(f) if !f.is_finite() => return Err(DecodeError::NotANumber),
            Value::Float(f) if self.scaled() => Value::Float(f * self.scale + self.offset),
            other if self.scaled() => match other.as_f64() {
                Some(f) => Value::Float(f * self.scale + self.offset),
                None => other,
            },
            other => other,
        };
        if let Value::Float(f) = v
            && !f.is_finite()
        {
            return Err(DecodeError::NotANumber);
        }
        Ok(v)
    }

    /// Encodes an engineering value into registers, reversing scale/offset and checking range.
    pub fn encode_registers(&self, value: &Value) -> Result<Vec<u16>, WriteValueError> {
        match self.ty {
            DataType::String => {
                let Value::Text(t) = value else {
                    return Err(WriteValueError::ExpectedString);
                };
                let cap = self.length as usize * 2;
                if t.len() > cap {
                    return Err(WriteValueError::StringTooLong(cap));
                }
                let mut bytes = t.as_bytes().to_vec();
                bytes.resize(cap, 0);
                return Ok(bytes
                    .chunks(2)
                    .map(|c| {
                        let r = u16::from_be_bytes([c[0], c[1]]);
                        if self.order.bytes_swapped() {
                            r.swap_bytes()
                        } else {
                            r
                        }
                    })
                    .collect());
            }
            DataType::Bool => {
                let b = value_to_bool(value)?;
                return Ok(vec![u16::from(b)]);
            }
            DataType::Bit => return Err(WriteValueError::BitPoint),
            _ => {}
        }
        let eng = value.as_f64().ok_or(WriteValueError::ExpectedNumber)?;
        if !eng.is_finite() {
            return Err(WriteValueError::NotANumber);
        }
        let raw = (eng - self.offset) / self.scale;
        if !raw.is_finite() {
            return Err(WriteValueError::CannotUnscale);
        }
        let bytes: Vec<u8> = match self.ty {
            DataType::F32 => {
                if raw.abs() > f64::from(f32::MAX) {
                    return Err(WriteValueError::OutOfRangeFor {
                        value: eng,
                        ty: "f32".into(),
                    });
                }
                (raw as f32).to_be_bytes().to_vec()
            }
            DataType::F64 => raw.to_be_bytes().to_vec(),
            ty => {
                let r = raw.round();
                let (lo, hi) = ty.int_range().ok_or(WriteValueError::NotAnInteger)?;
                // 2^63/2^64 are not representable exactly; `>=` on the upper bound of 64-bit types keeps casts exact.
                let too_big = if matches!(ty, DataType::U64 | DataType::I64) {
                    r >= hi
                } else {
                    r > hi
                };
                if r < lo || too_big {
                    return Err(WriteValueError::OutOfRangeFor {
                        value: eng,
                        ty: format!("{ty:?}").to_lowercase(),
                    });
                }
                match ty {
                    DataType::U16 => (r as u16).to_be_bytes().to_vec(),
                    DataType::I16 => (r as i16).to_be_bytes().to_vec(),
                    DataType::U32 => (r as u32).to_be_bytes().to_vec(),
                    DataType::I32 => (r as i32).to_be_bytes().to_vec(),
                    DataType::U64 => (r as u64).to_be_bytes().to_vec(),
                    _ => (r as i64).to_be_bytes().to_vec(),
                }
            }
        };
        let mut regs: Vec<u16> = bytes
            .chunks(2)
            .map(|c| {
                let r = u16::from_be_bytes([c[0], c[1]]);
                if self.order.bytes_swapped() {
                    r.swap_bytes()
                } else {
                    r
                }
            })
            .collect();
        if self.order.words_reversed() {
            regs.reverse();
        }
        Ok(regs)
    }
}

/// Interprets a command value as a bit.
pub fn value_to_bool(value: &Value) -> Result<bool, WriteValueError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Int(0) => Ok(false),
        Value::Int(1) => Ok(true),
        Value::Float(f) if *f == 0.0 => Ok(false),
        Value::Float(f) if *f == 1.0 => Ok(true),
        Value::Text(t) => match t.to_ascii_lowercase().as_str() {
            "true" | "on" | "1" => Ok(true),
            "false" | "off" | "0" => Ok(false),
            _ => Err(WriteValueError::NotABool(format!("{t:?}"))),
        },
        other => Err(WriteValueError::NotABool(other.to_string())),
    }
}

fn arr4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

fn arr8(b: &[u8]) -> [u8; 8] {
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(ty: DataType, order: Order, regs: &[u16]) -> Value {
        Codec::plain(ty, order).decode_registers(regs).unwrap()
    }

    #[test]
    fn sixteen_bit_types() {
        assert_eq!(
            dec(DataType::U16, Order::Abcd, &[0xFFFE]),
            Value::Int(65534)
        );
        assert_eq!(dec(DataType::I16, Order::Abcd, &[0xFFFE]), Value::Int(-2));
        assert_eq!(
            dec(DataType::U16, Order::Badc, &[0x3412]),
            Value::Int(0x1234)
        );
        assert_eq!(dec(DataType::I16, Order::Dcba, &[0xFEFF]), Value::Int(-2));
        assert_eq!(dec(DataType::Bool, Order::Abcd, &[7]), Value::Bool(true));
        assert_eq!(dec(DataType::Bool, Order::Abcd, &[0]), Value::Bool(false));
    }

    #[test]
    fn thirty_two_bit_orders() {
        // 0x12345678 laid out in each order.
        let cases = [
            (Order::Abcd, [0x1234, 0x5678]),
            (Order::Cdab, [0x5678, 0x1234]),
            (Order::Badc, [0x3412, 0x7856]),
            (Order::Dcba, [0x7856, 0x3412]),
        ];
        for (order, regs) in cases {
            assert_eq!(
                dec(DataType::U32, order, &regs),
                Value::Int(0x1234_5678),
                "{order:?}"
            );
            assert_eq!(
                dec(DataType::I32, order, &regs),
                Value::Int(0x1234_5678),
                "{order:?}"
            );
        }
        // -2 as i32 in CDAB.
        assert_eq!(
            dec(DataType::I32, Order::Cdab, &[0xFFFE, 0xFFFF]),
            Value::Int(-2)
        );
        // 1.5f32 = 0x3FC00000.
        let f = [
            (Order::Abcd, [0x3FC0, 0x0000]),
            (Order::Cdab, [0x0000, 0x3FC0]),
            (Order::Badc, [0xC03F, 0x0000]),
            (Order::Dcba, [0x0000, 0xC03F]),
        ];
        for (order, regs) in f {
            assert_eq!(
                dec(DataType::F32, order, &regs),
                Value::Float(1.5),
                "{order:?}"
            );
        }
    }

    #[test]
    fn sixty_four_bit_orders() {
        // 0x0102030405060708 as ABCDEFGH, GHEFCDAB, BADCFEHG, HGFEDCBA.
        let cases = [
            ("ABCDEFGH", [0x0102, 0x0304, 0x0506, 0x0708]),
            ("GHEFCDAB", [0x0708, 0x0506, 0x0304, 0x0102]),
            ("BADCFEHG", [0x0201, 0x0403, 0x0605, 0x0807]),
            ("HGFEDCBA", [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (name, regs) in cases {
            let order = Order::parse(name).unwrap();
            assert_eq!(
                dec(DataType::U64, order, &regs),
                Value::Int(0x0102_0304_0506_0708),
                "{name}"
            );
            assert_eq!(
                dec(DataType::I64, order, &regs),
                Value::Int(0x0102_0304_0506_0708),
                "{name}"
            );
        }
        assert_eq!(
            dec(DataType::U64, Order::Abcd, &[0xFFFF; 4]),
            Value::UInt(u64::MAX)
        );
        assert_eq!(
            dec(DataType::I64, Order::Abcd, &[0xFFFF; 4]),
            Value::Int(-1)
        );
        // -2.5f64 = 0xC004000000000000.
        assert_eq!(
            dec(DataType::F64, Order::Abcd, &[0xC004, 0, 0, 0]),
            Value::Float(-2.5)
        );
        assert_eq!(
            dec(DataType::F64, Order::Cdab, &[0, 0, 0, 0xC004]),
            Value::Float(-2.5)
        );
        assert_eq!(
            dec(DataType::F64, Order::Badc, &[0x04C0, 0, 0, 0]),
            Value::Float(-2.5)
        );
        assert_eq!(
            dec(DataType::F64, Order::Dcba, &[0, 0, 0, 0x04C0]),
            Value::Float(-2.5)
        );
    }

    #[test]
    fn strings_and_bits() {
        let mut c = Codec::plain(DataType::String, Order::Abcd);
        c.length = 3;
        assert_eq!(
            c.decode_registers(&[0x4142, 0x4300, 0]).unwrap(),
            Value::Text("ABC".into())
        );
        c.order = Order::Badc;
        assert_eq!(
            c.decode_registers(&[0x4241, 0x0043, 0x2020]).unwrap(),
            Value::Text("ABC".into())
        );
        let mut b = Codec::plain(DataType::Bit, Order::Abcd);
        b.bit = 15;
        assert_eq!(b.decode_registers(&[0x8000]).unwrap(), Value::Bool(true));
        b.bit = 0;
        assert_eq!(b.decode_registers(&[0x8000]).unwrap(), Value::Bool(false));
    }

    #[test]
    fn scaling_and_bad_values() {
        let mut c = Codec::plain(DataType::I16, Order::Abcd);
        c.scale = 0.1;
        c.offset = -40.0;
        let v = c.decode_registers(&[650]).unwrap().as_f64().unwrap();
        assert!((v - 25.0).abs() < 1e-9);
        let nan = Codec::plain(DataType::F32, Order::Abcd);
        assert_eq!(
            nan.decode_registers(&[0x7FC0, 0]),
            Err(DecodeError::NotANumber)
        );
        assert_eq!(
            nan.decode_registers(&[0x7F80, 0]),
            Err(DecodeError::NotANumber)
        );
        assert!(matches!(
            nan.decode_registers(&[1]),
            Err(DecodeError::Short { need: 2, got: 1 })
        ));
    }

    #[test]
    fn encode_round_trips_every_type_and_order() {
        let types = [
            (DataType::U16, Value::Int(60000)),
            (DataType::I16, Value::Int(-1234)),
            (DataType::U32, Value::Int(4_000_000_000)),
            (DataType::I32, Value::Int(-2_000_000_000)),
            (DataType::U64, Value::Int(1 << 60)),
            (DataType::I64, Value::Int(-(1 << 60))),
            (DataType::F32, Value::Float(3.25)),
            (DataType::F64, Value::Float(-1e100)),
        ];
        for order in [Order::Abcd, Order::Cdab, Order::Badc, Order::Dcba] {
            for (ty, v) in &types {
                let c = Codec::plain(*ty, order);
                let regs = c.encode_registers(v).unwrap();
                assert_eq!(regs.len(), c.count() as usize);
                assert_eq!(c.decode_registers(&regs).unwrap(), *v, "{ty:?} {order:?}");
            }
        }
    }

    #[test]
    fn encode_reverses_scaling_and_checks_range() {
        let mut c = Codec::plain(DataType::U16, Order::Abcd);
        c.scale = 0.1;
        assert_eq!(c.encode_registers(&Value::Float(21.5)).unwrap(), vec![215]);
        assert!(c.encode_registers(&Value::Float(-1.0)).is_err());
        let e = c.encode_registers(&Value::Float(6553.6)).unwrap_err();
        assert_eq!(e.to_string(), "6553.6 out of range for u16");
        assert_eq!(
            c.encode_registers(&Value::Float(f64::NAN)),
            Err(WriteValueError::NotANumber)
        );
        let e = value_to_bool(&Value::Text("maybe".into())).unwrap_err();
        assert_eq!(e.to_string(), "expected a boolean, got \"maybe\"");
        let s = Codec {
            length: 2,
            ..Codec::plain(DataType::String, Order::Abcd)
        };
        assert_eq!(
            s.encode_registers(&Value::Text("hi".into())).unwrap(),
            vec![0x6869, 0]
        );
        assert_eq!(
            s.encode_registers(&Value::Text("hello".into())),
            Err(WriteValueError::StringTooLong(4))
        );
    }
}
