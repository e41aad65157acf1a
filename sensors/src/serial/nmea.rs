//! NMEA 0183: position, speed and fix quality from GGA and RMC, with checksum verification.

use super::parsed::Parsed;
use crate::error::{FieldError, FrameError};
use crate::point::Value;

const GGA_FIELDS: &[&str] = &[
    "latitude",
    "longitude",
    "fix_quality",
    "satellites",
    "hdop",
    "altitude",
];
const RMC_FIELDS: &[&str] = &[
    "fix_valid",
    "latitude",
    "longitude",
    "speed_knots",
    "speed_mps",
    "course",
];

/// Parses one sentence.
pub fn parse(line: &str, allow_missing_checksum: bool) -> Parsed {
    let line = line.trim();
    let Some(body) = line.strip_prefix('$').or_else(|| line.strip_prefix('!')) else {
        return Parsed::error(FrameError::NotNmea);
    };
    let (data, checksum) = match body.rsplit_once('*') {
        Some((d, c)) => (d, Some(c)),
        None => (body, None),
    };
    let kind = sentence_kind(data);
    let affected = |reason: FrameError| Parsed::Error {
        fields: match kind {
            Some("GGA") => GGA_FIELDS.iter().map(|s| s.to_string()).collect(),
            Some("RMC") => RMC_FIELDS.iter().map(|s| s.to_string()).collect(),
            _ => Vec::new(),
        },
        reason,
    };
    match checksum {
        Some(c) => {
            let Ok(expected) = u8::from_str_radix(c.trim(), 16) else {
                return affected(FrameError::MalformedChecksum(c.to_owned()));
            };
            if c.trim().len() != 2 {
                return affected(FrameError::MalformedChecksum(c.to_owned()));
            }
            let actual = data.bytes().fold(0u8, |acc, b| acc ^ b);
            if actual != expected {
                return affected(FrameError::BadChecksum { expected, actual });
            }
        }
        None if !allow_missing_checksum => return affected(FrameError::MissingChecksum),
        None => {}
    }
    let f: Vec<&str> = data.split(',').collect();
    match kind {
        Some("GGA") => gga(&f),
        Some("RMC") => rmc(&f),
        _ => Parsed::Ignored,
    }
}

/// The sentence formatter without the talker id (`GPGGA` -> `GGA`).
fn sentence_kind(data: &str) -> Option<&str> {
    let addr = data.split(',').next()?;
    if addr.len() == 5 && !addr.starts_with('P') {
        addr.get(2..)
    } else {
        None
    }
}

fn field<'a>(f: &[&'a str], i: usize) -> &'a str {
    f.get(i).copied().unwrap_or("")
}

fn num(f: &[&str], i: usize, name: &str) -> (String, Result<Value, FieldError>) {
    let s = field(f, i);
    let v = if s.is_empty() {
        Err(FieldError::EmptyField)
    } else {
        s.parse::<f64>()
            .map(Value::Float)
            .map_err(|_| FieldError::Unparsable(s.to_owned()))
    };
    (name.to_string(), v)
}

fn int(f: &[&str], i: usize, name: &str) -> (String, Result<Value, FieldError>) {
    let s = field(f, i);
    let v = s.parse::<i64>().map(Value::Int).map_err(|_| {
        if s.is_empty() {
            FieldError::EmptyField
        } else {
            FieldError::Unparsable(s.to_owned())
        }
    });
    (name.to_string(), v)
}

/// `ddmm.mmmm` + hemisphere to signed decimal degrees.
fn coord(value: &str, hemi: &str, max_deg: f64) -> Result<Value, FieldError> {
    if value.is_empty() {
        return Err(FieldError::NoFix);
    }
    let raw: f64 = value
        .parse()
        .map_err(|_| FieldError::UnparsableCoordinate(value.to_owned()))?;
    let deg = (raw / 100.0).trunc();
    let min = raw - deg * 100.0;
    if !(0.0..60.0).contains(&min) {
        return Err(FieldError::BadMinutes(value.to_owned()));
    }
    let mut v = deg + min / 60.0;
    if v > max_deg {
        return Err(FieldError::CoordinateOutOfRange(value.to_owned()));
    }
    match hemi {
        "N" | "E" => {}
        "S" | "W" => v = -v,
        _ => return Err(FieldError::BadHemisphere(hemi.to_owned())),
    }
    Ok(Value::Float(v))
}

fn gga(f: &[&str]) -> Parsed {
    // $--GGA,time,lat,N/S,lon,E/W,quality,sats,hdop,alt,M,...
    Parsed::Fields(vec![
        ("latitude".into(), coord(field(f, 2), field(f, 3), 90.0)),
        ("longitude".into(), coord(field(f, 4), field(f, 5), 180.0)),
        int(f, 6, "fix_quality"),
        int(f, 7, "satellites"),
        num(f, 8, "hdop"),
        num(f, 9, "altitude"),
    ])
}

fn rmc(f: &[&str]) -> Parsed {
    // $--RMC,time,status,lat,N/S,lon,E/W,speed(knots),course,date,...
    let valid = match field(f, 2) {
        "A" => Ok(Value::Bool(true)),
        "V" => Ok(Value::Bool(false)),
        other => Err(FieldError::BadStatus(other.to_owned())),
    };
    let (_, speed) = num(f, 7, "speed_knots");
    let mps = speed
        .clone()
        .map(|v| Value::Float(v.as_f64().unwrap_or(0.0) * 1852.0 / 3600.0));
    let mut out = vec![("fix_valid".to_string(), valid)];
    if field(f, 2) == "A" {
        out.push(("latitude".into(), coord(field(f, 3), field(f, 4), 90.0)));
        out.push(("longitude".into(), coord(field(f, 5), field(f, 6), 180.0)));
    }
    out.push(("speed_knots".into(), speed));
    out.push(("speed_mps".into(), mps));
    let course = field(f, 8);
    if !course.is_empty() {
        out.push(num(f, 8, "course"));
    }
    Parsed::Fields(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(p: &Parsed, name: &str) -> Result<Value, String> {
        match p {
            Parsed::Fields(v) => v
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, r)| r.clone().map_err(|e| e.to_string()))
                .unwrap_or(Err("absent".into())),
            other => panic!("not fields: {other:?}"),
        }
    }

    fn close(v: Result<Value, String>, x: f64) -> bool {
        (v.unwrap().as_f64().unwrap() - x).abs() < 1e-6
    }

    #[test]
    fn gga_with_valid_checksum() {
        let p = parse(
            "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47",
            false,
        );
        assert!(close(get(&p, "latitude"), 48.0 + 7.038 / 60.0));
        assert!(close(get(&p, "longitude"), 11.0 + 31.0 / 60.0));
        assert_eq!(get(&p, "fix_quality"), Ok(Value::Int(1)));
        assert_eq!(get(&p, "satellites"), Ok(Value::Int(8)));
        assert!(close(get(&p, "altitude"), 545.4));
        assert!(close(get(&p, "hdop"), 0.9));
    }

    #[test]
    fn rmc_with_valid_checksum() {
        let p = parse(
            "$GPRMC,123519,A,4807.038,N,01131.000,W,022.4,084.4,230394,003.1,W*78",
            false,
        );
        assert_eq!(get(&p, "fix_valid"), Ok(Value::Bool(true)));
        assert!(close(get(&p, "longitude"), -(11.0 + 31.0 / 60.0)));
        assert!(close(get(&p, "speed_knots"), 22.4));
        assert!(close(get(&p, "speed_mps"), 22.4 * 1852.0 / 3600.0));
        assert!(close(get(&p, "course"), 84.4));
    }

    #[test]
    fn bad_checksum_marks_the_sentence_fields() {
        let p = parse(
            "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48",
            false,
        );
        match p {
            Parsed::Error { fields, reason } => {
                assert_eq!(reason.to_string(), "bad checksum: expected 48, computed 47");
                assert!(fields.contains(&"latitude".to_string()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("$GPGGA,1,2*ZZ", false),
            Parsed::Error { .. }
        ));
        assert!(matches!(
            parse("$GPGGA,123519,4807.038,N", false),
            Parsed::Error { .. }
        ));
        assert!(matches!(parse("garbage", false), Parsed::Error { .. }));
    }

    #[test]
    fn no_fix_and_other_sentences() {
        let p = parse("$GPGGA,,,,,,0,00,,,M,,M,,*66", false);
        assert_eq!(get(&p, "latitude"), Err("no fix".into()));
        assert_eq!(get(&p, "fix_quality"), Ok(Value::Int(0)));
        assert_eq!(parse("$GPGSV,1,1,00*79", false), Parsed::Ignored);
        let p = parse("$GNRMC,001225,V,,,,,,,280511,,*24", true);
        assert_eq!(get(&p, "fix_valid"), Ok(Value::Bool(false)));
    }

    #[test]
    fn never_panics_on_junk() {
        for s in [
            "$",
            "$*",
            "$,,,,*00",
            "$GPGGA*",
            "$GPRMC,,,,,,,,,,,,,,,,*",
            "!\u{1F600}*AA",
            "$GPGGA,1,99999.9,N,1,E,1,1,1,1*00",
        ] {
            let _ = parse(s, true);
            let _ = parse(s, false);
        }
    }
}
