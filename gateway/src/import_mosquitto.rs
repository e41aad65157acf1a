//! `outpost import-mosquitto`: a Mosquitto configuration as `outpost.toml`.
//!
//! Reads `mosquitto.conf` the way Mosquitto 2 does (one `key value...` per line, `#`
//! comments at the start of a line, `include_dir` loading `*.conf` in name order at the
//! point it appears, bridge keys going to the last `connection`, listener keys to the last
//! `listener`) and prints the Outpost keys that mean the same. What has no equivalent is
//! printed as a comment naming the file, line and reason, so nothing is dropped in silence.
//! Defaults that differ are written out: Mosquitto keeps no persistence and bridges with
//! 3.1.1 at QoS 0 unless told, Outpost does the opposite.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Why a Mosquitto configuration cannot be imported at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file (the config, an include_dir, an acl_file) cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line that Mosquitto itself would refuse.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Where a directive came from, for comments.
#[derive(Debug, Clone)]
struct At {
    file: PathBuf,
    line: usize,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Default)]
struct Listener {
    port: u16,
    address: Option<String>,
    websockets: bool,
    cafile: Option<String>,
    certfile: Option<String>,
    keyfile: Option<String>,
    require_certificate: bool,
    /// `use_identity_as_username`: the client certificate's CN is the user name.
    identity_as_username: bool,
    /// With `per_listener_settings true`: this listener's own `allow_anonymous`.
    allow_anonymous: Option<bool>,
    /// With `per_listener_settings true`: this listener's own `acl_file`, and its rules.
    acl_file: Option<String>,
    acl: Vec<AclOut>,
}

#[derive(Debug, Default)]
struct Topic {
    pattern: String,
    direction: String,
    qos: u8,
    local_prefix: String,
    remote_prefix: String,
}

#[derive(Debug, Default)]
struct Bridge {
    name: String,
    addresses: Vec<String>,
    topics: Vec<Topic>,
    username: Option<String>,
    password: Option<String>,
    client_id: Option<String>,
    cafile: Option<String>,
    capath: bool,
    certfile: Option<String>,
    keyfile: Option<String>,
    protocol: Option<String>,
    keepalive: Option<u64>,
}

#[derive(Debug, Default)]
struct Conf {
    listeners: Vec<Listener>,
    /// Index of the default listener (`port`, `bind_address` and listener keys before
    /// any `listener` line), which Mosquitto keeps apart from `listener` ones.
    default_listener: Option<usize>,
    allow_anonymous: Option<bool>,
    password_file: Option<String>,
    acl_file: Option<String>,
    per_listener_settings: bool,
    max_queued_messages: Option<i64>,
    max_inflight_messages: Option<i64>,
    max_keepalive: Option<u16>,
    max_connections: Option<i64>,
    queue_qos0: Option<bool>,
    persistence: Option<bool>,
    persistence_location: Option<String>,
    sys_interval: Option<u64>,
    bridges: Vec<Bridge>,
    /// Comments: what was not imported, or imported with a difference.
    notes: Vec<String>,
}

/// Reads `path` (following `include_dir`, reading `acl_file`) and returns the TOML.
pub fn import(path: &Path) -> Result<String, ImportError> {
    let mut conf = Conf::default();
    read_conf(path, &mut conf, 0)?;
    let acl = match &conf.acl_file {
        Some(f) => {
            let p = PathBuf::from(f);
            let text = std::fs::read_to_string(&p).map_err(|source| ImportError::Read {
                path: p.clone(),
                source,
            })?;
            acl_rules(&text, &p, &mut conf.notes)
        }
        None => Vec::new(),
    };
    for i in 0..conf.listeners.len() {
        if let Some(f) = conf.listeners[i].acl_file.clone() {
            let p = PathBuf::from(f);
            let text = std::fs::read_to_string(&p).map_err(|source| ImportError::Read {
                path: p.clone(),
                source,
            })?;
            conf.listeners[i].acl = acl_rules(&text, &p, &mut conf.notes);
        }
    }
    Ok(render(path, &conf, &acl))
}

fn bool_arg(v: &str, at: &At, key: &str) -> Result<bool, ImportError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ImportError::Line {
            path: at.file.clone(),
            line: at.line,
            message: format!("{key}: expected true or false, found {v:?}"),
        }),
    }
}

fn num_arg<T: std::str::FromStr>(v: &str, at: &At, key: &str) -> Result<T, ImportError> {
    v.parse().map_err(|_| ImportError::Line {
        path: at.file.clone(),
        line: at.line,
        message: format!("{key}: expected a number, found {v:?}"),
    })
}

/// Mosquitto keys with no Outpost equivalent, and why.
fn unmapped_reason(key: &str) -> &'static str {
    match key {
        "pid_file" | "user" => "systemd runs Outpost as its own user and tracks the process",
        "log_dest"
        | "log_type"
        | "log_timestamp"
        | "log_timestamp_format"
        | "log_facility"
        | "connection_messages" => {
            "Outpost logs to the journal (or stderr); set [log] level instead"
        }
        "autosave_interval" | "autosave_on_changes" | "persistence_file" => {
            "Outpost commits to SQLite as messages arrive (acked means durable); no autosave"
        }
        "persistent_client_expiration" => {
            "set broker.max_session_expiry (a duration such as \"14d\") to the same bound"
        }
        "psk_file" | "psk_hint" | "psk_identity" | "bridge_identity" | "bridge_psk" => {
            "TLS-PSK is not offered (rustls has no PSK); use certificates"
        }
        "plugin" | "auth_plugin" | "plugin_opt" | "global_plugin" => {
            "plugins are not supported; users, password_file and acl cover the built-in auth"
        }
        "use_subject_as_username" => {
            "the whole subject as a user name is not offered; use_identity_as_username \
             (the Common Name) is"
        }
        "capath" | "bridge_capath" => {
            "give a CA bundle file (cafile); a hashed CA directory is not read"
        }
        "bridge_insecure" => "Outpost always verifies the cloud's certificate and name",
        "cleansession" => {
            "Outpost always keeps a persistent cloud session (QoS 2 exactly-once across \
             restarts depends on it)"
        }
        "notifications" | "notification_topic" | "notifications_local_only" => {
            "Outpost announces the link on {topic_prefix}/{gateway_id}/status (retained \
             birth and will) instead of $SYS/broker/connection/.../state"
        }
        "try_private" => "no bridge-loop detection flag is sent; keep topic rules from looping",
        "start_type" | "restart_timeout" | "idle_timeout" | "threshold" | "round_robin" => {
            "Outpost bridges always start and reconnect with backoff (see [bridge.reconnect])"
        }
        "local_clientid" | "local_username" | "local_password" => {
            "the bridge talks to the local broker in-process, without a client"
        }
        "message_size_limit" => "set broker.max_packet_size (bytes, a bound on the whole packet)",
        "per_listener_settings" => {
            "allow_anonymous and acl_file are imported onto each listener; a password_file \
             is shared by every listener (Outpost has one user table)"
        }
        "protocol" => "only mqtt and websockets listeners exist",
        _ => "no Outpost equivalent",
    }
}

fn read_conf(path: &Path, conf: &mut Conf, depth: usize) -> Result<(), ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    for (i, raw) in text.lines().enumerate() {
        let at = At {
            file: path.to_owned(),
            line: i + 1,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, r)| (k, r.trim()));
        let args: Vec<&str> = rest.split_whitespace().collect();
        let first = args.first().copied().unwrap_or("");
        let note = |conf: &mut Conf, why: &str| {
            conf.notes.push(format!("{at}: `{line}`: {why}"));
        };
        let default_listener = |conf: &mut Conf| match conf.default_listener {
            Some(i) => i,
            None => {
                conf.listeners.push(Listener {
                    port: 1883,
                    ..Listener::default()
                });
                conf.default_listener = Some(conf.listeners.len() - 1);
                conf.listeners.len() - 1
            }
        };
        // Listener keys go to the last `listener`, or before any to the default one.
        let listener = |conf: &mut Conf| {
            if conf.listeners.is_empty() {
                default_listener(conf)
            } else {
                conf.listeners.len() - 1
            }
        };
        match key {
            "include_dir" => {
                if depth > 8 {
                    note(conf, "include_dir nested too deep; not followed");
                    continue;
                }
                let dir = PathBuf::from(rest);
                let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map_err(|source| ImportError::Read {
                        path: dir.clone(),
                        source,
                    })?
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "conf") && p.is_file())
                    .collect();
                files.sort();
                for f in files {
                    read_conf(&f, conf, depth + 1)?;
                }
            }
            "listener" => {
                let port = num_arg(first, &at, key)?;
                conf.listeners.push(Listener {
                    port,
                    address: args.get(1).map(|s| (*s).to_owned()),
                    ..Listener::default()
                });
            }
            "port" => {
                let port = num_arg(first, &at, key)?;
                let l = default_listener(conf);
                conf.listeners[l].port = port;
            }
            "bind_address" => {
                let l = default_listener(conf);
                conf.listeners[l].address = Some(first.to_owned());
            }
            "protocol" => {
                let l = listener(conf);
                match first {
                    "websockets" => conf.listeners[l].websockets = true,
                    "mqtt" => {}
                    _ => note(conf, unmapped_reason(key)),
                }
            }
            "cafile" => {
                let l = listener(conf);
                conf.listeners[l].cafile = Some(rest.to_owned());
            }
            "certfile" => {
                let l = listener(conf);
                conf.listeners[l].certfile = Some(rest.to_owned());
            }
            "keyfile" => {
                let l = listener(conf);
                conf.listeners[l].keyfile = Some(rest.to_owned());
            }
            "require_certificate" => {
                let l = listener(conf);
                conf.listeners[l].require_certificate = bool_arg(first, &at, key)?;
            }
            "use_identity_as_username" => {
                let l = listener(conf);
                conf.listeners[l].identity_as_username = bool_arg(first, &at, key)?;
            }
            "allow_anonymous" => {
                let v = bool_arg(first, &at, key)?;
                if conf.per_listener_settings {
                    let l = listener(conf);
                    conf.listeners[l].allow_anonymous = Some(v);
                } else {
                    conf.allow_anonymous = Some(v);
                }
            }
            "password_file" => {
                if conf.password_file.as_deref().is_some_and(|p| p != rest) {
                    note(
                        conf,
                        "a second password_file: only one is read; this one is not",
                    );
                } else {
                    conf.password_file = Some(rest.to_owned());
                }
            }
            "acl_file" if conf.per_listener_settings => {
                let l = listener(conf);
                conf.listeners[l].acl_file = Some(rest.to_owned());
            }
            "acl_file" => {
                if conf.acl_file.as_deref().is_some_and(|p| p != rest) {
                    note(conf, "a second acl_file: only one is read; this one is not");
                } else {
                    conf.acl_file = Some(rest.to_owned());
                }
            }
            "per_listener_settings" => {
                conf.per_listener_settings = bool_arg(first, &at, key)?;
                if conf.per_listener_settings {
                    note(conf, unmapped_reason(key));
                }
            }
            "max_queued_messages" => conf.max_queued_messages = Some(num_arg(first, &at, key)?),
            "max_inflight_messages" => conf.max_inflight_messages = Some(num_arg(first, &at, key)?),
            "max_keepalive" => conf.max_keepalive = Some(num_arg(first, &at, key)?),
            "max_connections" => conf.max_connections = Some(num_arg(first, &at, key)?),
            "queue_qos0_messages" => conf.queue_qos0 = Some(bool_arg(first, &at, key)?),
            "persistence" => conf.persistence = Some(bool_arg(first, &at, key)?),
            "persistence_location" => conf.persistence_location = Some(rest.to_owned()),
            "sys_interval" => conf.sys_interval = Some(num_arg(first, &at, key)?),
            "connection" => conf.bridges.push(Bridge {
                name: first.to_owned(),
                ..Bridge::default()
            }),
            k if k == "address"
                || k == "addresses"
                || k.starts_with("bridge_")
                || matches!(
                    k,
                    "topic"
                        | "remote_username"
                        | "remote_password"
                        | "remote_clientid"
                        | "keepalive_interval"
                ) =>
            {
                let Some(b) = conf.bridges.last_mut() else {
                    note(
                        conf,
                        "a bridge key before any `connection` line; Mosquitto refuses it",
                    );
                    continue;
                };
                match k {
                    "address" | "addresses" => {
                        b.addresses.extend(
                            rest.split([' ', ','])
                                .filter(|s| !s.is_empty())
                                .map(str::to_owned),
                        );
                    }
                    "topic" => b.topics.push(topic_line(&args, &at)?),
                    "remote_username" => b.username = Some(rest.to_owned()),
                    "remote_password" => b.password = Some(rest.to_owned()),
                    "remote_clientid" => b.client_id = Some(rest.to_owned()),
                    "keepalive_interval" => b.keepalive = Some(num_arg(first, &at, k)?),
                    "bridge_cafile" => b.cafile = Some(rest.to_owned()),
                    "bridge_capath" => {
                        b.capath = true;
                        note(conf, "bridge_capath: the system CA bundle is used instead");
                    }
                    "bridge_certfile" => b.certfile = Some(rest.to_owned()),
                    "bridge_keyfile" => b.keyfile = Some(rest.to_owned()),
                    "bridge_protocol_version" => b.protocol = Some(first.to_owned()),
                    _ => note(conf, unmapped_reason(k)),
                }
            }
            "cleansession" => {
                if first == "true" {
                    note(conf, unmapped_reason(key));
                }
            }
            _ => note(conf, unmapped_reason(key)),
        }
    }
    Ok(())
}

fn topic_line(args: &[&str], at: &At) -> Result<Topic, ImportError> {
    let bad = |m: &str| ImportError::Line {
        path: at.file.clone(),
        line: at.line,
        message: format!("topic: {m}"),
    };
    // `""` is Mosquitto's marker for an empty pattern or prefix.
    let unq = |s: &str| {
        if s == "\"\"" {
            String::new()
        } else {
            s.to_owned()
        }
    };
    let pattern = args
        .first()
        .map(|s| unq(s))
        .ok_or_else(|| bad("no pattern"))?;
    let direction = args.get(1).copied().unwrap_or("out");
    if !matches!(direction, "out" | "in" | "both") {
        return Err(bad(&format!("direction {direction:?} (out, in or both)")));
    }
    let qos = match args.get(2) {
        Some(q) => q
            .parse()
            .ok()
            .filter(|q| *q <= 2)
            .ok_or_else(|| bad(&format!("qos {q:?} (0, 1 or 2)")))?,
        None => 0,
    };
    let (local_prefix, remote_prefix) = match (args.get(3), args.get(4)) {
        (Some(l), Some(r)) => (unq(l), unq(r)),
        (None, None) => (String::new(), String::new()),
        _ => return Err(bad("local-prefix and remote-prefix go together")),
    };
    Ok(Topic {
        pattern,
        direction: direction.to_owned(),
        qos,
        local_prefix,
        remote_prefix,
    })
}

#[derive(Debug)]
struct AclOut {
    user: Option<String>,
    topic: String,
    access: &'static str,
}

/// Mosquitto ACL file to rules. `topic` lines before any `user` line are for clients
/// without a user name only, which Outpost rules cannot say; `deny` has no equivalent
/// either (Outpost denies what no rule allows).
fn acl_rules(text: &str, path: &Path, notes: &mut Vec<String>) -> Vec<AclOut> {
    let mut out = Vec::new();
    let mut user: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, r)| (k, r.trim()));
        match key {
            "user" => user = Some(rest.to_owned()),
            "topic" | "pattern" => {
                let (access, topic) = match rest.split_once(char::is_whitespace) {
                    Some((a @ ("read" | "write" | "readwrite" | "deny"), t)) => (a, t.trim()),
                    _ => ("readwrite", rest),
                };
                let access = match access {
                    "read" => "read",
                    "write" => "write",
                    "readwrite" => "readwrite",
                    _ => {
                        notes.push(format!(
                            "{at}: `{line}`: deny rules have no equivalent; Outpost refuses \
                             what no rule allows, so check no rule below allows this topic"
                        ));
                        continue;
                    }
                };
                if key == "topic" && user.is_none() {
                    notes.push(format!(
                        "{at}: `{line}`: applies to clients without a user name only; an \
                         Outpost rule without `user` applies to every client, so it is not \
                         imported"
                    ));
                    continue;
                }
                if key == "topic" && topic.contains(['%']) {
                    notes.push(format!(
                        "{at}: note: %u/%c in a `topic` line are literal in Mosquitto but \
                         substituted by Outpost"
                    ));
                }
                out.push(AclOut {
                    user: if key == "pattern" { None } else { user.clone() },
                    topic: topic.to_owned(),
                    access,
                });
            }
            _ => notes.push(format!("{at}: `{line}`: not an ACL line; skipped")),
        }
    }
    out
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(o, "\\u{:04X}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn bind_of(l: &Listener, notes: &mut Vec<String>) -> Option<String> {
    let ip = match l.address.as_deref() {
        None => {
            notes.push(format!(
                "listener {}: Mosquitto listens on IPv4 and IPv6 here; imported as \
                 0.0.0.0 (IPv4); use \"[::]:{}\" instead for both",
                l.port, l.port
            ));
            "0.0.0.0".to_owned()
        }
        Some("localhost") => "127.0.0.1".to_owned(),
        Some(h) => match h.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            Ok(ip) => ip.to_string(),
            Err(_) => {
                notes.push(format!(
                    "listener {} {h}: bind by host or interface name is not supported; give \
                     an IP address (not imported)",
                    l.port
                ));
                return None;
            }
        },
    };
    Some(format!("{ip}:{}", l.port))
}

/// ACL rules as a TOML array, one rule per line with `indent`.
fn acl_toml(acl: &[AclOut], indent: &str) -> String {
    let mut o = String::from("[\n");
    for r in acl {
        let user = r
            .user
            .as_ref()
            .map(|u| format!("user = {}, ", q(u)))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "{indent}  {{ {user}topic = {}, access = \"{}\" }},",
            q(&r.topic),
            r.access
        );
    }
    o.push_str(indent);
    o.push(']');
    o
}

fn no_rules_warning(what: &str) -> String {
    format!(
        "WARNING: the acl_file of {what} gave no rule Outpost can express; with no rules \
         Outpost lets every client there use every topic. Add rules by hand."
    )
}

fn render(path: &Path, c: &Conf, acl: &[AclOut]) -> String {
    let mut notes = c.notes.clone();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Imported from {} by `outpost import-mosquitto`.\n# Check it with `outpost check \
         --config FILE`; the comments at the end list what was not imported.\n",
        path.display()
    );
    if let Some(loc) = &c.persistence_location {
        // Not mapped to state_dir: mosquitto.db cannot be read by Outpost anyway, and the
        // packaged unit gives the service /var/lib/outpost (StateDirectory=) to write in.
        notes.push(format!(
            "persistence_location {loc}: Outpost keeps broker.sqlite and bridge spools in \
             its state directory (/var/lib/outpost under systemd); set state_dir to move it \
             (mosquitto.db is not converted)"
        ));
    }
    o.push_str("[broker]\n");
    // Mosquitto 2 with no listener listens on loopback only, as Outpost's default.
    let mut listeners = Vec::new();
    if c.listeners.is_empty() {
        listeners.push("{ bind = \"127.0.0.1:1883\" }".to_owned());
    }
    for l in &c.listeners {
        let Some(bind) = bind_of(l, &mut notes) else {
            continue;
        };
        let mut s = format!("{{ bind = {}", q(&bind));
        if l.websockets {
            s.push_str(", websocket = \"/mqtt\"");
            notes.push(format!(
                "listener {bind}: Mosquitto answers WebSocket on any path; Outpost on \
                 /mqtt only, so point clients at ws://HOST:{}/mqtt",
                l.port
            ));
        }
        let mut identity = false;
        match (&l.certfile, &l.keyfile) {
            (Some(cert), Some(key)) => {
                let _ = write!(s, ", tls = {{ cert = {}, key = {}", q(cert), q(key));
                match (&l.cafile, l.require_certificate) {
                    (Some(ca), true) => {
                        let _ = write!(s, ", client_ca = {}", q(ca));
                        identity = l.identity_as_username;
                    }
                    (Some(_), false) => notes.push(format!(
                        "listener {bind}: cafile without require_certificate only matters \
                         for optional client certificates, which Outpost does not ask for"
                    )),
                    (None, true) => notes.push(format!(
                        "listener {bind}: require_certificate without cafile (capath?): \
                         give tls.client_ca a CA bundle file"
                    )),
                    (None, false) => {}
                }
                s.push_str(" }");
            }
            (None, None) => {}
            _ => notes.push(format!(
                "listener {bind}: certfile and keyfile go together; TLS not imported"
            )),
        }
        if identity {
            s.push_str(", use_identity_as_username = true");
        } else if l.identity_as_username {
            notes.push(format!(
                "listener {bind}: use_identity_as_username needs certfile, keyfile, cafile \
                 and require_certificate true; not imported"
            ));
        }
        if let Some(a) = l.allow_anonymous {
            let _ = write!(s, ", allow_anonymous = {a}");
        }
        if l.acl_file.is_some() {
            if l.acl.is_empty() {
                notes.push(no_rules_warning(&format!("listener {bind}")));
            }
            // An inline table may span lines since TOML 1.1, which Outpost's parser reads.
            let _ = write!(s, ", acl = {}", acl_toml(&l.acl, "  "));
        }
        s.push_str(" }");
        listeners.push(s);
    }
    o.push_str("listeners = [\n");
    for l in &listeners {
        let _ = writeln!(o, "  {l},");
    }
    o.push_str("]\n");
    // Mosquitto 2 refuses anonymous clients once listeners are configured unless told;
    // Outpost's default depends on the addresses, so say it outright.
    let anonymous = c.allow_anonymous.unwrap_or(c.listeners.is_empty());
    let _ = writeln!(o, "allow_anonymous = {anonymous}");
    if let Some(p) = &c.password_file {
        let _ = writeln!(o, "password_file = {}", q(p));
    }
    if let Some(n) = c.max_queued_messages {
        if n > 0 {
            let _ = writeln!(o, "max_queued_messages = {n}");
        } else {
            notes.push(
                "max_queued_messages 0 (no limit): Outpost bounds every queue; its default \
                 (10000) is kept"
                    .into(),
            );
        }
    }
    if let Some(n) = c.max_inflight_messages.filter(|n| (1..=65535).contains(n)) {
        let _ = writeln!(o, "max_inflight = {n}");
    }
    if let Some(n) = c.max_keepalive.filter(|n| *n > 0) {
        let _ = writeln!(o, "max_keepalive = {n}");
    }
    if let Some(n) = c.max_connections {
        let _ = writeln!(o, "max_connections = {}", n.max(0));
    }
    if let Some(q0) = c.queue_qos0 {
        let _ = writeln!(o, "queue_qos0 = {q0}");
    }
    // Mosquitto's default is no persistence; Outpost's is on.
    let _ = writeln!(o, "persistence = {}", c.persistence.unwrap_or(false));
    if let Some(s) = c.sys_interval {
        let _ = writeln!(o, "sys_interval = \"{s}s\"");
    }
    if c.acl_file.is_some() {
        if acl.is_empty() {
            notes.push(no_rules_warning("the broker"));
        }
        let _ = writeln!(o, "acl = {}", acl_toml(acl, ""));
    }
    for b in &c.bridges {
        render_bridge(&mut o, b, &mut notes);
    }
    if !notes.is_empty() {
        o.push_str("\n# Not imported, or imported with a difference:\n");
        for n in &notes {
            for (i, l) in n.lines().enumerate() {
                let _ = writeln!(o, "{}{l}", if i == 0 { "# - " } else { "#   " });
            }
        }
    }
    o
}

fn render_bridge(o: &mut String, b: &Bridge, notes: &mut Vec<String>) {
    let name: String = b
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name != b.name {
        notes.push(format!(
            "connection {}: renamed {name} (a bridge name names its spool file)",
            b.name
        ));
    }
    let Some(addr) = b.addresses.first() else {
        notes.push(format!(
            "connection {}: no address; bridge not imported",
            b.name
        ));
        return;
    };
    if b.addresses.len() > 1 {
        notes.push(format!(
            "connection {}: only the first address is used (no fail-over): {}",
            b.name,
            b.addresses[1..].join(", ")
        ));
    }
    let tls = b.cafile.is_some() || b.capath || b.certfile.is_some();
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.starts_with('[') => (h.to_owned(), p.to_owned()),
        _ if addr.contains(':') => (format!("[{addr}]"), "1883".to_owned()),
        _ => (addr.clone(), "1883".to_owned()),
    };
    let scheme = if tls { "mqtts" } else { "mqtt" };
    let _ = writeln!(o, "\n[[bridge]]\nname = {}", q(&name));
    let _ = writeln!(o, "address = {}", q(&format!("{scheme}://{host}:{port}")));
    let protocol = match b.protocol.as_deref() {
        Some("mqttv50") => "5.0",
        Some("mqttv31") => {
            notes.push(format!(
                "connection {}: MQTT 3.1 is spoken as 3.1.1 (every 3.1 broker in use takes it)",
                b.name
            ));
            "3.1.1"
        }
        _ => "3.1.1",
    };
    let _ = writeln!(o, "protocol = {}", q(protocol));
    if let Some(id) = &b.client_id {
        let _ = writeln!(o, "client_id = {}", q(id));
    } else {
        notes.push(format!(
            "connection {}: Mosquitto's client id was {}.HOSTNAME; Outpost uses \
             outpost-GATEWAY_ID-{name} unless client_id is set (the cloud session and its \
             ACL are keyed on it)",
            b.name, b.name
        ));
    }
    if let Some(u) = &b.username {
        let _ = writeln!(o, "username = {}", q(u));
    }
    if let Some(p) = &b.password {
        let _ = writeln!(o, "password = {}", q(p));
        notes.push(format!(
            "connection {}: the password is inline as it was; better move it to a file \
             (password_file) or a systemd credential",
            b.name
        ));
    }
    if let Some(k) = b.keepalive {
        let _ = writeln!(o, "keep_alive = \"{k}s\"");
    }
    o.push_str("topics = [\n");
    for t in &b.topics {
        let _ = writeln!(
            o,
            "  {{ pattern = {}, direction = \"{}\", qos = {}, local_prefix = {}, remote_prefix = {} }},",
            q(&t.pattern),
            t.direction,
            t.qos,
            q(&t.local_prefix),
            q(&t.remote_prefix)
        );
    }
    o.push_str("]\n");
    if tls {
        o.push_str("[bridge.tls]\n");
        if let Some(ca) = &b.cafile {
            let _ = writeln!(o, "ca_file = {}", q(ca));
        }
        if let Some(c) = &b.certfile {
            let _ = writeln!(o, "cert_file = {}", q(c));
        }
        if let Some(k) = &b.keyfile {
            let _ = writeln!(o, "key_file = {}", q(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_lines_follow_mosquitto_defaults() {
        let at = At {
            file: "x".into(),
            line: 1,
        };
        let t = topic_line(&["sensors/#"], &at).unwrap();
        assert_eq!((t.direction.as_str(), t.qos), ("out", 0));
        let t = topic_line(&["#", "both", "1", "\"\"", "remote/"], &at).unwrap();
        assert_eq!(
            (t.local_prefix.as_str(), t.remote_prefix.as_str()),
            ("", "remote/")
        );
        assert!(topic_line(&["#", "sideways"], &at).is_err());
        assert!(topic_line(&["#", "in", "1", "a/"], &at).is_err());
    }

    #[test]
    fn port_and_bind_address_make_the_default_listener_only() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("m.conf");
        std::fs::write(
            &conf,
            "listener 8883 10.0.0.1\nport 1884\nbind_address 127.0.0.1\nlistener 9001\n",
        )
        .unwrap();
        let toml = import(&conf).unwrap();
        assert!(toml.contains("{ bind = \"10.0.0.1:8883\" }"), "{toml}");
        assert!(toml.contains("{ bind = \"127.0.0.1:1884\" }"), "{toml}");
        assert!(toml.contains("{ bind = \"0.0.0.0:9001\" }"), "{toml}");
    }

    #[test]
    fn a_certificate_identity_listener_is_imported() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("m.conf");
        std::fs::write(
            &conf,
            "listener 8883\ncafile /c/ca.pem\ncertfile /c/s.pem\nkeyfile /c/s.key\n\
             require_certificate true\nuse_identity_as_username true\n\
             listener 8884\nuse_identity_as_username true\n",
        )
        .unwrap();
        let out = import(&conf).unwrap();
        let first = out.lines().find(|l| l.contains(":8883")).unwrap();
        assert!(first.contains("client_ca = \"/c/ca.pem\""), "{out}");
        assert!(first.contains("use_identity_as_username = true"), "{out}");
        let second = out.lines().find(|l| l.contains(":8884\"")).unwrap();
        assert!(!second.contains("use_identity_as_username"), "{out}");
        assert!(
            out.contains("use_identity_as_username needs certfile"),
            "{out}"
        );
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(q("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
