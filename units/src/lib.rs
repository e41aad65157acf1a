//! Human units in the config file: byte sizes ("512MiB") and durations ("10s").
//!
//! The gateway, bridge and sensors sections of one `outpost.toml` used to parse these
//! each in their own way, so the same value could be accepted in one table and refused
//! (with a different message) in the next. This crate is the one parser they share.
//! Both also accept plain integers (bytes, seconds) so generated configs stay simple.

#![forbid(unsafe_code)]
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A byte count written as an integer or a string with a unit (B, KB, KiB, ... TB, TiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses "512MiB", "1.5 MB", "1024" and friends; units are case-insensitive.
    pub fn parse(s: &str) -> Result<ByteSize, SizeError> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num.parse().map_err(|_| SizeError::NotASize(s.to_owned()))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => {
                return Err(SizeError::UnknownUnit {
                    unit: other.to_owned(),
                    text: s.to_owned(),
                });
            }
        };
        let bytes = num * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(SizeError::OutOfRange(s.to_owned()));
        }
        Ok(ByteSize(bytes as u64))
    }
}

/// Why a size string was refused; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The number part is missing or is not a number.
    #[error("`{0}` is not a size; write e.g. \"512MiB\" or 1048576")]
    NotASize(String),
    /// The unit after the number is not one this parser knows.
    #[error("unknown size unit `{unit}` in `{text}`; use B, KB, KiB, MB, MiB, GB, GiB, TB or TiB")]
    UnknownUnit {
        /// The unit as written, lowercased.
        unit: String,
        /// The whole size as written.
        text: String,
    },
    /// The size does not fit in 64 bits of bytes.
    #[error("size `{0}` is out of range")]
    OutOfRange(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"512MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Deserializes a byte count as a plain `u64`, for `#[serde(deserialize_with = ...)]`.
pub fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ByteSize::deserialize(d).map(|b| b.0)
}

/// Deserializes a duration from "10s", "250ms", "1h 30m" or an integer number of seconds.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as \"10s\" or \"250ms\", or a number of seconds")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom("a duration cannot be negative"))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            // Trimmed because humantime accepts a bare "0" only when it is the whole
            // string; " 0 " must mean zero too.
            humantime::parse_duration(v.trim()).map_err(|e| {
                E::custom(format!(
                    "`{v}` is not a duration ({e}); write e.g. \"10s\" or \"250ms\""
                ))
            })
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::IntoDeserializer;
    use serde::de::value::Error;

    fn dur<'a>(d: impl IntoDeserializer<'a, Error>) -> Result<Duration, String> {
        duration(d.into_deserializer()).map_err(|e| e.to_string())
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("1 KB").unwrap().0, 1000);
        assert_eq!(ByteSize::parse("42").unwrap().0, 42);
        assert_eq!(ByteSize::parse("1.5KiB").unwrap().0, 1536);
        assert_eq!(ByteSize::parse("1.5 KiB").unwrap().0, 1536);
        assert_eq!(ByteSize::parse("2GB").unwrap().0, 2_000_000_000);
        assert_eq!(ByteSize::parse("2gib").unwrap().0, 2 << 30);
        assert_eq!(ByteSize::parse("1T").unwrap().0, 1_000_000_000_000);
        assert_eq!(ByteSize::parse("1TiB").unwrap().0, 1 << 40);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("").is_err());
        assert!(ByteSize::parse("-1KB").is_err());
    }

    #[test]
    fn size_errors_say_what_to_write() {
        let e = ByteSize::parse("lots").unwrap_err();
        assert_eq!(e, SizeError::NotASize("lots".into()));
        assert_eq!(
            e.to_string(),
            "`lots` is not a size; write e.g. \"512MiB\" or 1048576"
        );
        let e = ByteSize::parse("12 parsecs").unwrap_err().to_string();
        assert!(e.contains("unknown size unit `parsecs`"), "{e}");
        let e = ByteSize::parse("99999999999TiB").unwrap_err();
        assert_eq!(e.to_string(), "size `99999999999TiB` is out of range");
    }

    #[test]
    fn sizes_deserialize_from_integers_and_strings() {
        let b = |d: serde::de::value::I64Deserializer<Error>| bytes(d).map_err(|e| e.to_string());
        assert_eq!(b(4096i64.into_deserializer()), Ok(4096));
        assert_eq!(
            b((-1i64).into_deserializer()).unwrap_err(),
            "a size cannot be negative"
        );
        assert_eq!(bytes("4KiB".into_deserializer()), Ok::<_, Error>(4096));
    }

    #[test]
    fn durations_take_humantime_strings_and_integer_seconds() {
        assert_eq!(dur("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(dur("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(dur("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(dur(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(dur("0"), Ok(Duration::ZERO));
        assert_eq!(dur(" 0 "), Ok(Duration::ZERO));
        assert_eq!(dur(30u64), Ok(Duration::from_secs(30)));
        assert_eq!(dur(0i64), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_are_refused_with_an_example() {
        let e = dur("soon").unwrap_err();
        assert!(e.starts_with("`soon` is not a duration ("), "{e}");
        assert!(e.ends_with("write e.g. \"10s\" or \"250ms\""), "{e}");
        assert_eq!(dur(-5i64).unwrap_err(), "a duration cannot be negative");
        assert!(dur(1.5f64).is_err());
    }
}
