//! One JSON object per line; nested objects become dotted field names.

use super::kv::truncate;
use super::parsed::Parsed;
use crate::error::{FieldError, FrameError};
use crate::point::Value;
use serde_json::Value as Json;

/// Parses one JSON line.
pub fn parse(line: &str) -> Parsed {
    match serde_json::from_str::<Json>(line) {
        Ok(Json::Object(map)) => {
            let mut out = Vec::new();
            flatten("", &map, &mut out, 0);
            Parsed::Fields(out)
        }
        Ok(_) => Parsed::error(FrameError::JsonNotObject),
        Err(e) => Parsed::error(FrameError::InvalidJson {
            error: e.to_string(),
            line: truncate(line),
        }),
    }
}

fn flatten(
    prefix: &str,
    map: &serde_json::Map<String, Json>,
    out: &mut Vec<(String, Result<Value, FieldError>)>,
    depth: usize,
) {
    for (k, v) in map {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let value = match v {
            Json::Bool(b) => Ok(Value::Bool(*b)),
            Json::Number(n) => Ok(n
                .as_i64()
                .map(Value::Int)
                .unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN)))),
            Json::String(s) => Ok(Value::Text(s.clone())),
            Json::Null => Err(FieldError::Null),
            Json::Object(inner) if depth < 4 => {
                flatten(&name, inner, out, depth + 1);
                continue;
            }
            Json::Object(_) | Json::Array(_) => continue,
        };
        out.push((name, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects() {
        let p =
            parse(r#"{"t": 21.5, "n": 3, "env": {"hum": 40}, "s": "x", "bad": null, "arr": [1]}"#);
        let Parsed::Fields(f) = p else { panic!() };
        assert!(f.contains(&("t".into(), Ok(Value::Float(21.5)))));
        assert!(f.contains(&("n".into(), Ok(Value::Int(3)))));
        assert!(f.contains(&("env.hum".into(), Ok(Value::Int(40)))));
        assert!(f.contains(&("bad".into(), Err(FieldError::Null))));
        assert!(!f.iter().any(|(n, _)| n == "arr"));
        assert!(matches!(parse("[1,2]"), Parsed::Error { .. }));
        assert!(matches!(parse("{oops"), Parsed::Error { .. }));
    }
}
