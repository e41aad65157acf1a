//! Topic access control: which topics a client may publish to and receive from.
//!
//! Rules are resolved once per connection (user filter applied, `%u`/`%c` substituted),
//! so the per-message check is a scan of a few filters, and costs nothing when no rules
//! are configured.

use outpost_mqtt::topic::{filters_overlap, matches};

use crate::config::{AclAccess, AclRule};

/// The rules that apply to one client.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientAcl {
    read: Vec<String>,
    write: Vec<String>,
}

impl ClientAcl {
    /// Resolves `rules` for a client; `None` when no rules are configured (all allowed).
    pub fn resolve(rules: &[AclRule], user: Option<&str>, client_id: &str) -> Option<ClientAcl> {
        if rules.is_empty() {
            return None;
        }
        let mut acl = ClientAcl::default();
        for r in rules {
            if r.user.as_deref().is_some_and(|u| Some(u) != user) {
                continue;
            }
            if r.topic.contains("%u") && user.is_none() {
                // A per-user rule gives nothing to a client without a user name.
                continue;
            }
            let filter = r
                .topic
                .replace("%u", user.unwrap_or(""))
                .replace("%c", client_id);
            // An id or name with wildcards or separators must not widen a rule.
            if (r.topic.contains("%c") && client_id.contains(['+', '#', '/']))
                || (r.topic.contains("%u") && user.is_some_and(|u| u.contains(['+', '#', '/'])))
            {
                continue;
            }
            if matches!(r.access, AclAccess::Read | AclAccess::Readwrite) {
                acl.read.push(filter.clone());
            }
            if matches!(r.access, AclAccess::Write | AclAccess::Readwrite) {
                acl.write.push(filter);
            }
        }
        Some(acl)
    }

    /// May the client receive a message on `topic`?
    pub fn can_read(&self, topic: &str) -> bool {
        self.read.iter().any(|f| matches(f, topic))
    }

    /// Can a subscription on `filter` ever deliver anything to the client? A filter that
    /// only partly overlaps what it may read is granted, and each message is checked on
    /// delivery; one that overlaps nothing is refused, so the client learns at once.
    pub fn can_subscribe(&self, filter: &str) -> bool {
        self.read.iter().any(|f| filters_overlap(f, filter))
    }

    /// May the client publish on `topic`?
    pub fn can_write(&self, topic: &str) -> bool {
        self.write.iter().any(|f| matches(f, topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: Option<&str>, topic: &str, access: AclAccess) -> AclRule {
        AclRule {
            user: user.map(str::to_owned),
            topic: topic.to_owned(),
            access,
        }
    }

    #[test]
    fn no_rules_means_no_restriction() {
        assert!(ClientAcl::resolve(&[], None, "c").is_none());
    }

    #[test]
    fn patterns_substitute_client_id_and_user() {
        let rules = [
            rule(None, "sensors/%c/#", AclAccess::Write),
            rule(None, "users/%u/inbox", AclAccess::Read),
            rule(Some("admin"), "#", AclAccess::Readwrite),
        ];
        let dev = ClientAcl::resolve(&rules, None, "dev1").unwrap();
        assert!(dev.can_write("sensors/dev1/t"));
        assert!(!dev.can_write("sensors/dev2/t"));
        assert!(!dev.can_read("users//inbox"));
        let bob = ClientAcl::resolve(&rules, Some("bob"), "x").unwrap();
        assert!(bob.can_read("users/bob/inbox"));
        assert!(!bob.can_read("users/alice/inbox"));
        let admin = ClientAcl::resolve(&rules, Some("admin"), "a").unwrap();
        assert!(admin.can_read("anything/at/all") && admin.can_write("x"));
    }

    #[test]
    fn subscriptions_are_refused_only_where_nothing_could_be_read() {
        let rules = [rule(None, "data/%c/#", AclAccess::Read)];
        let acl = ClientAcl::resolve(&rules, None, "d1").unwrap();
        assert!(acl.can_subscribe("data/d1/temp"));
        assert!(acl.can_subscribe("data/+/temp"), "overlaps data/d1/temp");
        assert!(acl.can_subscribe("#"), "overlaps; deliveries are filtered");
        assert!(!acl.can_subscribe("data/d2/#"));
        assert!(!acl.can_subscribe("other/#"));
    }

    #[test]
    fn wildcards_in_client_ids_do_not_widen_rules() {
        let rules = [rule(None, "sensors/%c/#", AclAccess::Write)];
        let sneaky = ClientAcl::resolve(&rules, None, "#").unwrap();
        assert!(!sneaky.can_write("sensors/dev2/t"));
    }
}
