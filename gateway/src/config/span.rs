//! Where a key path (`broker.acl[0].topic`) sits in the file, for errors found after
//! deserialisation (cross-field checks, file contents, TLS material).
//!
//! serde sees values, not positions; rather than wrap every field in `toml::Spanned`,
//! the text is parsed once more into toml's span-keeping `DeTable` and the path is walked.

use toml::de::{DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, PartialEq)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Step::Key(name));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            if let Ok(i) = r[..end].parse() {
                out.push(Step::Index(i));
            }
            rest = &r[end + 1..];
        }
    }
    out
}

/// 1-based line and column of the value at `path`, or of the deepest part of the path
/// that the file spells out (a default left out of the file has no place of its own;
/// its table does). `None` when not even the first step is in the file.
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let root = DeTable::parse(text).ok()?;
    let mut cur = DeValue::Table(root.into_inner());
    let mut found: Option<std::ops::Range<usize>> = None;
    for step in steps(path) {
        let next = match step {
            Step::Key(k) => cur.get(k),
            Step::Index(i) => cur.get(i),
        };
        let Some(next) = next else { break };
        found = Some(next.span());
        let next = next.get_ref().clone();
        cur = next;
    }
    found.map(|s| line_col(text, s.start))
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_keys_and_indexes() {
        assert_eq!(
            steps("broker.acl[2].topic"),
            vec![
                Step::Key("broker"),
                Step::Key("acl"),
                Step::Index(2),
                Step::Key("topic")
            ]
        );
        assert_eq!(
            steps("bridge[0]"),
            vec![Step::Key("bridge"), Step::Index(0)]
        );
    }

    #[test]
    fn values_are_found_in_inline_and_header_tables() {
        let text = "[broker]\nacl = [\n  { topic = \"a\", access = \"read\" },\n  { topic = \"a/#/b\", access = \"read\" },\n]\n\n[[bridge]]\nname = \"x y\"\n";
        assert_eq!(locate(text, "broker.acl[1].topic"), Some((4, 13)));
        assert_eq!(locate(text, "bridge[0].name"), Some((8, 8)));
        // A key left at its default points at its table.
        assert_eq!(
            locate(text, "bridge[0].spool.max_bytes").map(|p| p.0),
            Some(7)
        );
        assert_eq!(locate(text, "sensors.modbus[0]"), None);
    }
}
