//! Topic rules with Mosquitto's `topic pattern direction qos local_prefix remote_prefix`
//! semantics: the local topic is `local_prefix + T`, the remote one `remote_prefix + T`,
//! where `T` matches `pattern`. An empty pattern makes the prefixes full topic names.

use serde::Deserialize;

use outpost_mqtt::QoS;
use outpost_mqtt::topic::{TopicError, matches, validate_topic_filter};

/// Which way a rule carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local to cloud (spooled).
    #[default]
    Out,
    /// Cloud to local.
    In,
    /// Both ways.
    Both,
}

impl Direction {
    fn is_out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
    fn is_in(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
}

/// What happens to the RETAIN flag of a bridged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetainMode {
    /// Forward the flag as published (5.0 subscriptions ask for Retain As Published).
    #[default]
    Keep,
    /// Always clear it.
    Clear,
}

/// One topic rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    /// Topic filter relative to the prefixes; may be empty (then the prefixes are topics).
    pub pattern: String,
    /// Direction (default `out`).
    #[serde(default)]
    pub direction: Direction,
    /// Highest QoS for this rule (default 1): messages go up at min(published, rule) QoS.
    #[serde(default = "default_qos")]
    pub qos: QoS,
    /// Prefix of the local topic.
    #[serde(default)]
    pub local_prefix: String,
    /// Prefix of the remote topic.
    #[serde(default)]
    pub remote_prefix: String,
    /// RETAIN flag handling.
    #[serde(default)]
    pub retain: RetainMode,
}

/// Why a topic rule is refused; shown as the config error of its `topics[i]` entry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    /// A prefix holds `+`, `#` or U+0000 (prefixes are topic text, not filters).
    #[error("topic {pattern:?}: {what} {prefix:?} contains a wildcard")]
    WildcardPrefix {
        /// The rule's pattern.
        pattern: String,
        /// "local_prefix" or "remote_prefix".
        what: &'static str,
        /// The prefix as written.
        prefix: String,
    },
    /// An empty pattern maps one full topic name to another, so both must be given.
    #[error("topic with empty pattern needs both prefixes (full topic names)")]
    EmptyPatternNeedsPrefixes,
    /// The pattern is not a valid topic filter.
    #[error("topic {pattern:?}: {cause}")]
    BadPattern {
        /// The rule's pattern.
        pattern: String,
        /// What is wrong with it.
        cause: TopicError,
    },
    /// A `$share/` filter: a bridge subscribes for itself, never as a share member.
    #[error("topic {0:?}: shared filters cannot be bridged")]
    SharedPattern(String),
}

fn default_qos() -> QoS {
    QoS::AtLeastOnce
}

impl TopicRule {
    /// Check the pattern and prefixes.
    pub fn validate(&self) -> Result<(), RuleError> {
        for (what, p) in [
            ("local_prefix", &self.local_prefix),
            ("remote_prefix", &self.remote_prefix),
        ] {
            if p.contains(['+', '#', '\0']) {
                return Err(RuleError::WildcardPrefix {
                    pattern: self.pattern.clone(),
                    what,
                    prefix: p.clone(),
                });
            }
        }
        if self.pattern.is_empty() {
            if self.local_prefix.is_empty() || self.remote_prefix.is_empty() {
                return Err(RuleError::EmptyPatternNeedsPrefixes);
            }
            return Ok(());
        }
        validate_topic_filter(&self.pattern).map_err(|cause| RuleError::BadPattern {
            pattern: self.pattern.clone(),
            cause,
        })?;
        if self.pattern.starts_with("$share/") {
            return Err(RuleError::SharedPattern(self.pattern.clone()));
        }
        Ok(())
    }

    fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.pattern)
    }

    fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.pattern)
    }
}

/// The result of mapping a topic through a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The topic on the other side.
    pub topic: String,
    /// Rule QoS ceiling.
    pub qos: QoS,
    /// Retain handling.
    pub retain: RetainMode,
}

/// The rules of one bridge, in configuration order (first match wins).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<TopicRule>,
}

fn map(topic: &str, from_prefix: &str, pattern: &str, to_prefix: &str) -> Option<String> {
    let rest = topic.strip_prefix(from_prefix)?;
    if pattern.is_empty() {
        return rest.is_empty().then(|| to_prefix.to_string());
    }
    if !matches(pattern, rest) {
        return None;
    }
    let mut out = String::with_capacity(to_prefix.len() + rest.len());
    out.push_str(to_prefix);
    out.push_str(rest);
    Some(out)
}

impl Rules {
    /// Wrap validated rules.
    pub fn new(rules: Vec<TopicRule>) -> Self {
        Rules { rules }
    }

    /// True when some rule sends messages to the cloud.
    pub fn has_out(&self) -> bool {
        self.rules.iter().any(|r| r.direction.is_out())
    }

    /// Map a local topic to the cloud, `None` when no `out`/`both` rule matches.
    pub fn map_out(&self, local_topic: &str) -> Option<Mapped> {
        self.rules
            .iter()
            .filter(|r| r.direction.is_out())
            .find_map(|r| {
                map(local_topic, &r.local_prefix, &r.pattern, &r.remote_prefix).map(|topic| {
                    Mapped {
                        topic,
                        qos: r.qos,
                        retain: r.retain,
                    }
                })
            })
    }

    /// Map a cloud topic to the local broker, `None` when no `in`/`both` rule matches.
    pub fn map_in(&self, remote_topic: &str) -> Option<Mapped> {
        self.rules
            .iter()
            .filter(|r| r.direction.is_in())
            .find_map(|r| {
                map(remote_topic, &r.remote_prefix, &r.pattern, &r.local_prefix).map(|topic| {
                    Mapped {
                        topic,
                        qos: r.qos,
                        retain: r.retain,
                    }
                })
            })
    }

    /// Filters (with QoS and retain mode) to subscribe to on the cloud for `in` rules.
    pub fn remote_subscriptions(&self) -> Vec<(String, QoS, RetainMode)> {
        self.rules
            .iter()
            .filter(|r| r.direction.is_in())
            .map(|r| (r.remote_filter(), r.qos, r.retain))
            .collect()
    }

    /// Local filters whose messages the bridge carries to the cloud.
    pub fn local_filters(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.direction.is_out())
            .map(TopicRule::local_filter)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, dir: Direction, lp: &str, rp: &str) -> TopicRule {
        TopicRule {
            pattern: pattern.into(),
            direction: dir,
            qos: QoS::AtLeastOnce,
            local_prefix: lp.into(),
            remote_prefix: rp.into(),
            retain: RetainMode::Keep,
        }
    }

    #[test]
    fn prefixes_are_swapped_like_mosquitto() {
        let rules = Rules::new(vec![rule(
            "sensors/#",
            Direction::Out,
            "outpost/gw-01/",
            "plant-7/",
        )]);
        let m = rules.map_out("outpost/gw-01/sensors/boiler/temp").unwrap();
        assert_eq!(m.topic, "plant-7/sensors/boiler/temp");
        assert!(rules.map_out("sensors/boiler/temp").is_none());
        assert!(rules.map_out("outpost/gw-01/other").is_none());
        assert!(
            rules.map_in("plant-7/sensors/x").is_none(),
            "out rule must not map in"
        );
        assert_eq!(
            rules.local_filters(),
            vec!["outpost/gw-01/sensors/#".to_string()]
        );
    }

    #[test]
    fn in_and_both_rules() {
        let rules = Rules::new(vec![
            rule("cmd/+", Direction::In, "local/", "cloud/"),
            rule("chat/#", Direction::Both, "", "site/"),
        ]);
        assert_eq!(
            rules.map_in("cloud/cmd/reboot").unwrap().topic,
            "local/cmd/reboot"
        );
        assert!(rules.map_in("cloud/cmd/a/b").is_none());
        assert_eq!(rules.map_out("chat/x").unwrap().topic, "site/chat/x");
        assert_eq!(rules.map_in("site/chat/y").unwrap().topic, "chat/y");
        let subs: Vec<_> = rules
            .remote_subscriptions()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(subs, vec!["cloud/cmd/+", "site/chat/#"]);
    }

    #[test]
    fn empty_pattern_maps_full_topics() {
        let r = rule("", Direction::Out, "a/b", "x/y/z");
        r.validate().unwrap();
        let rules = Rules::new(vec![r]);
        assert_eq!(rules.map_out("a/b").unwrap().topic, "x/y/z");
        assert!(rules.map_out("a/b/c").is_none());
    }

    #[test]
    fn first_match_wins_and_validation() {
        let mut a = rule("a/#", Direction::Out, "", "first/");
        a.qos = QoS::ExactlyOnce;
        let rules = Rules::new(vec![a, rule("#", Direction::Out, "", "second/")]);
        let m = rules.map_out("a/1").unwrap();
        assert_eq!((m.topic.as_str(), m.qos), ("first/a/1", QoS::ExactlyOnce));
        assert_eq!(rules.map_out("b").unwrap().topic, "second/b");
        assert!(rule("a/#/b", Direction::Out, "", "").validate().is_err());
        assert!(rule("a", Direction::Out, "x/+/", "").validate().is_err());
        assert!(rule("", Direction::Out, "x", "").validate().is_err());
    }

    #[test]
    fn refused_rules_name_the_case_and_say_why() {
        let e = rule("a/#/b", Direction::Out, "", "")
            .validate()
            .unwrap_err();
        assert_eq!(
            e,
            RuleError::BadPattern {
                pattern: "a/#/b".into(),
                cause: TopicError::MisplacedWildcard
            }
        );
        assert_eq!(
            e.to_string(),
            "topic \"a/#/b\": misplaced wildcard in topic filter"
        );
        let e = rule("a", Direction::Out, "x/+/", "")
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "topic \"a\": local_prefix \"x/+/\" contains a wildcard"
        );
        let e = rule("", Direction::Out, "x", "").validate().unwrap_err();
        assert_eq!(e, RuleError::EmptyPatternNeedsPrefixes);
        let e = rule("$share/g/t", Direction::Out, "", "")
            .validate()
            .unwrap_err();
        assert_eq!(e, RuleError::SharedPattern("$share/g/t".into()));
        assert_eq!(
            e.to_string(),
            "topic \"$share/g/t\": shared filters cannot be bridged"
        );
    }
}
