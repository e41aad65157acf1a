//! `key=value` pairs separated by spaces, commas or semicolons.

use super::parsed::{Parsed, parse_scalar};
use crate::error::{FieldError, FrameError};

/// Parses one line of pairs; tokens without `=` are skipped, a line without any pair is an error.
pub fn parse(line: &str) -> Parsed {
    let fields: Vec<_> = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter_map(|tok| tok.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| {
            let v = if v.is_empty() {
                Err(FieldError::EmptyValue)
            } else {
                Ok(parse_scalar(v))
            };
            (k.to_string(), v)
        })
        .collect();
    if fields.is_empty() {
        return Parsed::error(FrameError::UnparsableLine(truncate(line)));
    }
    Parsed::Fields(fields)
}

/// The keys of the pairs in a line, for a line too damaged to read its values.
pub fn keys(line: &str) -> Vec<String> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter_map(|tok| tok.split_once('='))
        .map(|(k, _)| k)
        .filter(|k| !k.is_empty() && !k.contains(char::REPLACEMENT_CHARACTER))
        .map(str::to_string)
        .collect()
}

/// Shortens a line for error messages.
pub fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::Value;

    #[test]
    fn pairs() {
        let p = parse("temp=21.5 hum=40;ok=true,name=abc x=");
        assert_eq!(
            p,
            Parsed::Fields(vec![
                ("temp".into(), Ok(Value::Float(21.5))),
                ("hum".into(), Ok(Value::Int(40))),
                ("ok".into(), Ok(Value::Bool(true))),
                ("name".into(), Ok(Value::Text("abc".into()))),
                ("x".into(), Err(FieldError::EmptyValue)),
            ])
        );
        assert!(matches!(parse("no pairs here"), Parsed::Error { .. }));
    }
}
