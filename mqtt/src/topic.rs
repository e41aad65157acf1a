//! Topic names, topic filters and wildcard matching (section 4.7 of both specs).

/// Longest topic name or filter: a UTF-8 string carries a two-byte length (MQTT-4.7.3-3).
pub const MAX_TOPIC_LEN: usize = 65_535;

const SHARE_PREFIX: &str = "$share/";

/// Why a topic name or filter is invalid.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TopicError {
    /// Empty topic name or filter (MQTT-4.7.3-1).
    #[error("empty topic")]
    Empty,
    /// Longer than 65,535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
    /// U+0000 inside the topic (MQTT-4.7.3-2).
    #[error("topic contains U+0000")]
    ContainsNull,
    /// A wildcard in a topic name (MQTT-3.3.2-2).
    #[error("wildcard in topic name")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level (MQTT-4.7.1-1/2).
    #[error("misplaced wildcard in topic filter")]
    MisplacedWildcard,
    /// `$share/{group}/...` with an empty group or one holding `+` or `#` (MQTT-4.8.2-1/2).
    #[error("invalid shared subscription group")]
    InvalidShareGroup,
    /// `$share/{group}` without a filter after the group.
    #[error("shared subscription without a topic filter")]
    EmptyShareFilter,
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::ContainsNull);
    }
    Ok(())
}

/// Check a topic name as used in PUBLISH and wills: non-empty, no wildcards, no U+0000.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Check a topic filter, including the `$share/{group}/{filter}` form.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    if filter.starts_with(SHARE_PREFIX) {
        let (group, inner) = parse_shared(filter).ok_or(TopicError::EmptyShareFilter)?;
        if group.is_empty() || group.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::InvalidShareGroup);
        }
        if inner.is_empty() {
            return Err(TopicError::EmptyShareFilter);
        }
        return check_wildcards(inner);
    }
    check_wildcards(filter)
}

fn check_wildcards(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let multi = level.contains('#');
        if multi && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Split a shared subscription filter `$share/{group}/{filter}` into group and filter.
///
/// Returns `None` for filters without the `$share/` prefix or without a `/` after the group.
pub fn parse_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    rest.split_once('/')
}

/// Does `filter` match the topic name `topic`?
///
/// `#` matches the parent level too ("sport/#" matches "sport"), and filters starting with
/// a wildcard do not match topics starting with `$` (MQTT-4.7.2-1). A shared filter is
/// matched by the filter after its group.
pub fn matches(filter: &str, topic: &str) -> bool {
    let filter = parse_shared(filter).map_or(filter, |(_, inner)| inner);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Is there a topic name that both filters match?
///
/// This is how a broker tells whether a subscription can ever receive anything an
/// access rule lets through. It follows [`matches`]: `#` covers the parent level, and a
/// filter starting with a wildcard shares no `$` topic with another (MQTT-4.7.2-1).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let a = parse_shared(a).map_or(a, |(_, inner)| inner);
    let b = parse_shared(b).map_or(b, |(_, inner)| inner);
    let wild_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (a.starts_with('$') && wild_first(b)) || (b.starts_with('$') && wild_first(a)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn overlapping_filters() {
        for (a, b) in [
            ("a/#", "a"),
            ("a/+", "+/b"),
            ("#", "x/y/z"),
            ("$SYS/#", "$SYS/+/c"),
            ("$share/g/a/+", "a/b"),
        ] {
            assert!(filters_overlap(a, b), "{a} ~ {b}");
            assert!(filters_overlap(b, a), "{b} ~ {a}");
        }
        for (a, b) in [
            ("a", "a/b"),
            ("+", "a/b"),
            ("a/+/c", "a/b/d"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
        ] {
            assert!(!filters_overlap(a, b), "{a} !~ {b}");
            assert!(!filters_overlap(b, a), "{b} !~ {a}");
        }
    }

    fn small_filter() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "$s", "+"]);
        (prop::collection::vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            f
        })
    }

    proptest! {
        /// Two filters overlap exactly when some topic over the same small alphabet
        /// matches both (every topic that could tell them apart is in the search).
        #[test]
        fn overlap_agrees_with_brute_force(a in small_filter(), b in small_filter()) {
            let names = ["a", "b", "$s", "z"];
            let mut topics = Vec::new();
            for n in 1..=5u32 {
                for i in 0..names.len().pow(n) {
                    let mut k = i;
                    let t: Vec<&str> = (0..n).map(|_| { let l = names[k % names.len()]; k /= names.len(); l }).collect();
                    topics.push(t.join("/"));
                }
            }
            let brute = topics.iter().any(|t| matches(&a, t) && matches(&b, t));
            prop_assert_eq!(filters_overlap(&a, &b), brute, "{} vs {}", a, b);
        }
    }

    // Non-normative examples of 3.1.1 section 4.7.1.2 and 5.0 section 4.7.1.2.
    #[test]
    fn multi_level_wildcard_spec_examples() {
        for topic in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(matches("sport/tennis/player1/#", topic), "{topic}");
        }
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "sport/tennis"));
        assert!(!matches("sport/tennis/player1/#", "sport/tennis/player2"));
        assert!(validate_topic_filter("sport/tennis#").is_err());
        assert!(validate_topic_filter("sport/tennis/#/ranking").is_err());
    }

    // Section 4.7.1.3 examples.
    #[test]
    fn single_level_wildcard_spec_examples() {
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+/tennis/#", "sport/tennis"));
        assert!(validate_topic_filter("sport+").is_err());
        for ok in ["+", "+/tennis/#", "sport/+/player1"] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok}");
        }
    }

    // MQTT-4.7.2-1: filters starting with a wildcard do not match topics starting with '$'.
    #[test]
    fn dollar_topics_and_leading_wildcards_mqtt_4_7_2_1() {
        assert!(!matches("#", "$SYS/broker/clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$"));
    }

    #[test]
    fn exact_and_case_sensitive_matching() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "A/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(matches("a//b", "a//b"));
        assert!(!matches("a/b", "a/b/"));
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(parse_shared("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(parse_shared("$share/g/#"), Some(("g", "#")));
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$share"), None);
        assert_eq!(parse_shared("$share/g"), None);
        assert_eq!(validate_topic_filter("$share/g/a/+"), Ok(()));
        assert_eq!(
            validate_topic_filter("$share/g"),
            Err(TopicError::EmptyShareFilter)
        );
        assert_eq!(
            validate_topic_filter("$share/g/"),
            Err(TopicError::EmptyShareFilter)
        );
        assert_eq!(
            validate_topic_filter("$share//a"),
            Err(TopicError::InvalidShareGroup)
        );
        assert_eq!(
            validate_topic_filter("$share/g#/a"),
            Err(TopicError::InvalidShareGroup)
        );
        assert_eq!(
            validate_topic_filter("$share/+/a"),
            Err(TopicError::InvalidShareGroup)
        );
        assert_eq!(
            validate_topic_filter("$share/g/a#"),
            Err(TopicError::MisplacedWildcard)
        );
        // A shared filter matches like its inner filter.
        assert!(matches("$share/g/sensors/+", "sensors/t1"));
        assert!(!matches("$share/g/#", "$SYS/x"));
        // "$sharefoo/..." is an ordinary filter.
        assert_eq!(parse_shared("$sharefoo/g/a"), None);
    }

    #[test]
    fn topic_name_rules() {
        assert_eq!(validate_topic_name("a/b"), Ok(()));
        assert_eq!(validate_topic_name("/"), Ok(()));
        assert_eq!(validate_topic_name("$SYS/x"), Ok(()));
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::ContainsNull));
        assert_eq!(validate_topic_name(&"x".repeat(MAX_TOPIC_LEN)), Ok(()));
        assert_eq!(
            validate_topic_name(&"x".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong)
        );
        assert_eq!(validate_topic_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_filter("a\0"), Err(TopicError::ContainsNull));
    }

    proptest! {
        // A topic name used as a filter matches itself, and "#" matches every non-$ topic.
        #[test]
        fn names_match_themselves(topic in "[a-z$/]{1,12}") {
            prop_assume!(validate_topic_name(&topic).is_ok());
            prop_assert!(matches(&topic, &topic));
            prop_assert_eq!(matches("#", &topic), !topic.starts_with('$'));
        }

        // Replacing any level of a topic by '+' still matches it (unless it is a $ topic's
        // first level), and cutting the tail for '#' does too.
        #[test]
        fn wildcards_generalise(levels in proptest::collection::vec("[a-z]{0,3}", 1..5), at in any::<proptest::sample::Index>()) {
            let topic = levels.join("/");
            let i = at.index(levels.len());
            let mut plus = levels.clone();
            plus[i] = "+".into();
            prop_assert!(matches(&plus.join("/"), &topic));
            let mut hash: Vec<String> = levels[..i].to_vec();
            hash.push("#".into());
            prop_assert!(matches(&hash.join("/"), &topic));
            prop_assert!(validate_topic_filter(&hash.join("/")).is_ok());
        }
    }
}
