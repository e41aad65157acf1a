//! Comma-separated values with named columns.

use super::kv::truncate;
use super::parsed::{Parsed, parse_scalar};
use crate::error::{FieldError, FrameError};

/// Parses one record; a wrong column count marks every column bad.
pub fn parse(line: &str, columns: &[String], separator: char) -> Parsed {
    let cells: Vec<&str> = line.split(separator).collect();
    if cells.len() != columns.len() {
        return Parsed::Error {
            fields: columns.to_vec(),
            reason: FrameError::Columns {
                expected: columns.len(),
                got: cells.len(),
                line: truncate(line),
            },
        };
    }
    Parsed::Fields(
        columns
            .iter()
            .zip(cells)
            .map(|(c, v)| {
                let v = v.trim().trim_matches('"');
                (
                    c.clone(),
                    if v.is_empty() {
                        Err(FieldError::EmptyValue)
                    } else {
                        Ok(parse_scalar(v))
                    },
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::Value;

    #[test]
    fn records() {
        let cols = vec!["t".to_string(), "p".to_string(), "id".to_string()];
        assert_eq!(
            parse("21.5, 1013,\"A1\"", &cols, ','),
            Parsed::Fields(vec![
                ("t".into(), Ok(Value::Float(21.5))),
                ("p".into(), Ok(Value::Int(1013))),
                ("id".into(), Ok(Value::Text("A1".into()))),
            ])
        );
        assert!(matches!(parse("1;2;", &cols, ';'), Parsed::Fields(ref f) if f[2].1.is_err()));
        match parse("1,2", &cols, ',') {
            Parsed::Error { fields, .. } => assert_eq!(fields, cols),
            other => panic!("{other:?}"),
        }
    }
}
