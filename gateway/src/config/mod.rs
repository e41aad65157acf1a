//! The one TOML configuration file, `outpost.toml`.
//!
//! Every table denies unknown keys: a misspelt key silently ignored on an appliance is a
//! field visit later. Errors name the file, line, column and key path so the user can fix
//! them without guessing. Each crate owns its own section's types; this module composes
//! them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod http;
mod span;
pub use http::HttpConfig;
pub use span::{line_col, locate};

pub use outpost_broker::config::{
    AclAccess, AclRule, BrokerConfig, ListenerConfig, TlsConfig, UserConfig,
};
pub use outpost_units::ByteSize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identifies this gateway in topics and in the cloud; defaults to the host name.
    #[serde(default)]
    pub gateway_id: Option<String>,
    /// First level of the gateway's own topics (`{prefix}/{gateway_id}/...`).
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Where sessions, retained messages and spools live; defaults to `$STATE_DIRECTORY`
    /// (set by systemd) or the working directory.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Threads that run connections, the broker core, sensors and uplinks; 0 means
    /// one per CPU core. See [`DEFAULT_WORKER_THREADS`].
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The local MQTT broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Store-and-forward uplinks to cloud brokers (`[[bridge]]`).
    #[serde(default)]
    pub bridge: Vec<outpost_bridge::BridgeConfig>,
    /// Modbus and serial sensors (`[sensors]`, `[[sensors.modbus]]`, `[[sensors.serial]]`).
    #[serde(default)]
    pub sensors: outpost_sensors::SensorsConfig,
    /// Status page, metrics and health endpoints (`[http]`; off without the table).
    #[serde(default)]
    pub http: Option<HttpConfig>,
}

/// One thread by default (a current-thread runtime), as Mosquitto: a message then goes
/// from the publisher's socket through the core to the subscriber's socket without waking
/// another thread, which is what keeps latency and CPU per message low (BENCHMARKS.md). SQLite commits, password
/// hashing and serial I/O run on their own threads either way. More threads help only
/// a board with several cores and many busy or TLS clients.
pub const DEFAULT_WORKER_THREADS: usize = 1;

fn default_worker_threads() -> usize {
    DEFAULT_WORKER_THREADS
}

fn default_prefix() -> String {
    "outpost".to_owned()
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as "info" or "info,outpost_gateway=debug"; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// A configuration error a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}:{line}:{column}: {key}{message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Dotted key path, with a trailing ": " when known.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Parsed, but the values do not make sense together.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key path.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// `Some` when `p` starts with `$CREDENTIALS_DIRECTORY/` or `${CREDENTIALS_DIRECTORY}/`:
/// the path inside `dir`, or why it cannot be had.
fn expand_credentials(p: &Path, dir: Option<&Path>) -> Option<Result<PathBuf, String>> {
    let s = p.to_str()?;
    let rest = s
        .strip_prefix("$CREDENTIALS_DIRECTORY/")
        .or_else(|| s.strip_prefix("${CREDENTIALS_DIRECTORY}/"))?;
    Some(match dir {
        Some(d) if !rest.is_empty() && !rest.contains("..") => Ok(d.join(rest)),
        Some(_) => Err(format!(
            "{s}: the credential name must be a plain file name"
        )),
        None => Err(format!(
            "{s}: $CREDENTIALS_DIRECTORY is not set (add LoadCredential= to the unit, \
             or give a plain file path)"
        )),
    })
}

impl Config {
    /// The configuration used when `outpost` runs without `--config`.
    pub fn embedded_default() -> Config {
        Config::parse("", Path::new("<embedded default>")).expect("embedded default is valid")
    }

    /// The sensors section with the gateway's topic prefix applied where the section
    /// does not set its own.
    pub fn sensors(&self) -> outpost_sensors::SensorsConfig {
        let mut s = self.sensors.clone();
        if s.topic_prefix.is_none() {
            s.topic_prefix = Some(self.topic_prefix.clone());
        }
        s
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, path, "", &e))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            toml_error(text, path, &key, e.inner())
        })?;
        let mut config = config;
        config
            .validate(path)
            .and_then(|()| config.resolve_secrets(path))
            .map_err(|e| place(e, text))?;
        Ok(config)
    }

    /// Secrets from files and systemd credentials: a file path that starts with
    /// `$CREDENTIALS_DIRECTORY/` (or `${CREDENTIALS_DIRECTORY}/`) is taken from that
    /// directory (`LoadCredential=` in the unit), and a bridge's `password_file` is read
    /// into its password. Inline values are left as they are.
    fn resolve_secrets(&mut self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let expand = |p: &mut PathBuf, key: String| -> Result<(), ConfigError> {
            if let Some(e) = expand_credentials(p, creds.as_deref()) {
                *p = e.map_err(|m| invalid(key, m))?;
            }
            Ok(())
        };
        for (i, l) in self.broker.listeners.iter_mut().enumerate() {
            if let Some(t) = &mut l.tls {
                let k = |f: &str| format!("broker.listeners[{i}].tls.{f}");
                expand(&mut t.cert, k("cert"))?;
                expand(&mut t.key, k("key"))?;
                if let Some(ca) = &mut t.client_ca {
                    expand(ca, k("client_ca"))?;
                }
            }
        }
        if let Some(p) = &mut self.broker.password_file {
            expand(p, "broker.password_file".into())?;
        }
        self.broker.load_password_file().map_err(|e| {
            let hint = match &e {
                outpost_broker::config::PasswordFileError::Read { .. } => {
                    " (check the path and that the service user may read it)"
                }
                outpost_broker::config::PasswordFileError::Line { .. } => "",
            };
            invalid("broker.password_file".into(), format!("{e}{hint}"))
        })?;
        for e in &self.broker.password_file_users {
            if let Some(i) = self.broker.users.iter().position(|u| u.name == e.name) {
                return Err(invalid(
                    format!("broker.users[{i}].name"),
                    format!(
                        "user {:?} is also in broker.password_file (line {}); keep one of \
                         the two, or rename one",
                        e.name, e.line
                    ),
                ));
            }
        }
        if let Some(t) = self.http.as_mut().and_then(|h| h.tls.as_mut()) {
            expand(&mut t.cert, "http.tls.cert".into())?;
            expand(&mut t.key, "http.tls.key".into())?;
            if let Some(ca) = &mut t.client_ca {
                expand(ca, "http.tls.client_ca".into())?;
            }
        }
        for (i, b) in self.bridge.iter_mut().enumerate() {
            if let Some(t) = &mut b.tls {
                for (f, v) in [
                    ("ca_file", &mut t.ca_file),
                    ("cert_file", &mut t.cert_file),
                    ("key_file", &mut t.key_file),
                ] {
                    if let Some(p) = v {
                        expand(p, format!("bridge[{i}].tls.{f}"))?;
                    }
                }
            }
            if let Some(p) = &mut b.password_file {
                let key = format!("bridge[{i}].password_file");
                expand(p, key.clone())?;
                let text = std::fs::read_to_string(&*p)
                    .map_err(|e| invalid(key, format!("cannot read {}: {e}", p.display())))?;
                b.password = Some(text.trim_end_matches(['\r', '\n']).to_owned());
            }
        }
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: message.to_owned(),
        };
        let b = &self.broker;
        if b.listeners.is_empty() {
            return Err(invalid(
                "broker.listeners".into(),
                "at least one listener is needed, e.g. [{ bind = \"127.0.0.1:1883\" }]",
            ));
        }
        for (i, l) in b.listeners.iter().enumerate() {
            if let Some(ws) = &l.websocket
                && !ws.starts_with('/')
            {
                return Err(invalid(
                    format!("broker.listeners[{i}].websocket"),
                    "the WebSocket path must start with '/', e.g. \"/mqtt\"",
                ));
            }
        }
        if b.receive_maximum == 0 {
            return Err(invalid(
                "broker.receive_maximum".into(),
                "must be at least 1 (MQTT 5.0 forbids 0)",
            ));
        }
        if b.max_inflight == 0 {
            return Err(invalid("broker.max_inflight".into(), "must be at least 1"));
        }
        if b.max_packet_size.0 < 64 || b.max_packet_size.0 > 268_435_455 {
            return Err(invalid(
                "broker.max_packet_size".into(),
                "must be between 64 bytes and 256MiB (the MQTT limit)",
            ));
        }
        if b.max_connect_size.0 < 64 {
            return Err(invalid(
                "broker.max_connect_size".into(),
                "must be at least 64 bytes (a CONNECT with a client id and credentials)",
            ));
        }
        if b.packet_timeout.is_zero() {
            return Err(invalid(
                "broker.packet_timeout".into(),
                "must be above zero, e.g. \"60s\"",
            ));
        }
        for (i, l) in b.listeners.iter().enumerate() {
            if l.use_identity_as_username && l.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
                return Err(invalid(
                    format!("broker.listeners[{i}].use_identity_as_username"),
                    "needs tls with client_ca: the user name comes from a client \
                     certificate that CA signed; add tls = { cert, key, client_ca }",
                ));
            }
        }
        let listener_acls = b.listeners.iter().enumerate().filter_map(|(l, c)| {
            c.acl
                .as_ref()
                .map(|acl| (format!("broker.listeners[{l}].acl"), acl))
        });
        for (key, acl) in std::iter::once(("broker.acl".to_owned(), &b.acl)).chain(listener_acls) {
            for (i, rule) in acl.iter().enumerate() {
                let probe = rule.topic.replace("%u", "u").replace("%c", "c");
                if outpost_mqtt::topic::validate_topic_filter(&probe).is_err() {
                    return Err(invalid(
                        format!("{key}[{i}].topic"),
                        "is not a valid topic filter ('+' and '#' must fill whole levels)",
                    ));
                }
            }
        }
        let mut users = std::collections::HashMap::new();
        for (i, u) in b.users.iter().enumerate() {
            if !u.password_hash.starts_with('$') {
                return Err(invalid(
                    format!("broker.users[{i}].password_hash"),
                    "must be a PHC hash string such as \"$argon2id$...\"; \
                     create one with `outpost passwd`",
                ));
            }
            if let Err(e) = outpost_broker::auth::Credential::parse(&u.password_hash) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    key: format!("broker.users[{i}].password_hash"),
                    message: format!(
                        "the hash of user {:?} cannot be read: {e}; make a new one with \
                         `outpost passwd`",
                        u.name
                    ),
                });
            }
            if let Some(prev) = users.insert(u.name.as_str(), i) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    key: format!("broker.users[{i}].name"),
                    message: format!(
                        "user {:?} is already broker.users[{prev}]; remove one of the two",
                        u.name
                    ),
                });
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.bridge.iter().enumerate() {
            b.validate_at().map_err(|(field, e)| ConfigError::Invalid {
                path: path.to_owned(),
                key: format!("bridge[{i}].{field}"),
                message: e.to_string(),
            })?;
            if !names.insert(b.name.clone()) {
                return Err(invalid(
                    format!("bridge[{i}].name"),
                    "two bridges share this name; each needs its own (it names the spool file)",
                ));
            }
        }
        self.sensors.validate().map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            key: e.path.clone(),
            message: e.message.clone(),
        })?;
        if let Some(h) = &self.http {
            h.validate()
                .map_err(|(key, message)| ConfigError::Invalid {
                    path: path.to_owned(),
                    key,
                    message,
                })?;
        }
        if let Some(id) = &self.gateway_id
            && (id.is_empty() || id.contains(['/', '+', '#']))
        {
            return Err(invalid(
                "gateway_id".into(),
                "must be non-empty and contain no '/', '+' or '#' (it is a topic level)",
            ));
        }
        Ok(())
    }

    /// The gateway id, defaulting to the host name.
    pub fn gateway_id(&self) -> String {
        self.gateway_id.clone().unwrap_or_else(|| {
            // gethostname(2), not /proc/sys/kernel/hostname: the hardened unit's
            // ProcSubset=pid hides /proc/sys, which silently gave every gateway the
            // fallback id (the image's boot test caught it).
            nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().trim().replace(['/', '+', '#'], "_"))
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "outpost".to_owned())
        })
    }

    /// The state directory: config, else `$STATE_DIRECTORY` (systemd), else the working
    /// directory.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
            // systemd may pass several colon-separated directories; the first is ours.
            if let Some(first) = d.to_string_lossy().split(':').next()
                && !first.is_empty()
            {
                return PathBuf::from(first);
            }
        }
        PathBuf::from(".")
    }
}

/// Gives a value error found after deserialisation the position of its key in `text`.
fn place(e: ConfigError, text: &str) -> ConfigError {
    match e {
        ConfigError::Invalid { path, key, message } => match locate(text, &key) {
            Some((line, column)) => ConfigError::Parse {
                path,
                line,
                column,
                key: format!("{key}: "),
                message,
            },
            None => ConfigError::Invalid { path, key, message },
        },
        other => other,
    }
}

fn toml_error(text: &str, path: &Path, key: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    // Syntax errors (a duplicate key, say) carry no key path; the text under the span
    // usually is the key, which is what the user needs to find.
    let key = if key.is_empty() || key == "." {
        e.span()
            .and_then(|s| text.get(s))
            .map(|t| t.lines().next().unwrap_or("").trim().to_owned())
            .filter(|t| !t.is_empty() && t.len() <= 64 && !t.contains(char::is_whitespace))
            .unwrap_or_default()
    } else {
        key.to_owned()
    };
    ConfigError::Parse {
        path: path.to_owned(),
        line,
        column,
        key: if key.is_empty() {
            String::new()
        } else {
            format!("{key}: ")
        },
        message: e.message().trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn gateway_id_defaults_to_the_host_name() {
        let c = parse("").unwrap();
        let host = nix::unistd::gethostname().unwrap();
        let want = host.to_string_lossy().trim().replace(['/', '+', '#'], "_");
        assert_eq!(c.gateway_id(), want);
        assert_eq!(
            parse("gateway_id = \"gw-7\"\n").unwrap().gateway_id(),
            "gw-7"
        );
    }

    #[test]
    fn credentials_directory_paths_expand() {
        let d = Path::new("/run/credentials/outpost.service");
        for p in [
            "$CREDENTIALS_DIRECTORY/key.pem",
            "${CREDENTIALS_DIRECTORY}/key.pem",
        ] {
            let got = expand_credentials(Path::new(p), Some(d)).unwrap().unwrap();
            assert_eq!(got, d.join("key.pem"));
        }
        assert!(expand_credentials(Path::new("/etc/outpost/key.pem"), Some(d)).is_none());
        let err = expand_credentials(Path::new("$CREDENTIALS_DIRECTORY/k"), None)
            .unwrap()
            .unwrap_err();
        assert!(err.contains("LoadCredential"), "{err}");
        assert!(
            expand_credentials(Path::new("$CREDENTIALS_DIRECTORY/../x"), Some(d))
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn bridge_password_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let text = format!(
            "[[bridge]]\nname = \"cloud\"\naddress = \"mqtt://127.0.0.1:1883\"\n\
             password_file = \"{}\"\ntopics = [{{ pattern = \"a/#\", direction = \"out\" }}]\n",
            pw.display()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.bridge[0].password.as_deref(), Some("s3cret"));
        let both = text.replace("password_file", "password = \"x\"\npassword_file");
        let err = parse(&both).unwrap_err().to_string();
        assert!(err.contains("exclude each other"), "{err}");
        let missing = text.replace(&pw.display().to_string(), "/nonexistent/pw");
        let err = parse(&missing).unwrap_err().to_string();
        assert!(err.contains("bridge[0].password_file"), "{err}");
    }
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn empty_config_is_loopback_only_and_anonymous() {
        let c = parse("").unwrap();
        assert_eq!(c.broker.listeners.len(), 1);
        assert!(c.broker.listeners[0].bind.ip().is_loopback());
        assert!(c.broker.anonymous_allowed());
    }

    #[test]
    fn lan_listener_turns_anonymous_off_unless_explicit() {
        let c = parse("[broker]\nlisteners = [{ bind = \"0.0.0.0:1883\" }]\n").unwrap();
        assert!(!c.broker.anonymous_allowed());
        let c =
            parse("[broker]\nlisteners = [{ bind = \"0.0.0.0:1883\" }]\nallow_anonymous = true\n")
                .unwrap();
        assert!(c.broker.anonymous_allowed());
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let err = parse("[broker]\nlisteners = [{ bind = \"127.0.0.1:0\" }]\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:3:1:"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key_path() {
        let err = parse("[broker]\nconnect_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:2:"), "{err}");
        assert!(err.contains("broker.connect_timeout"), "{err}");
    }

    #[test]
    fn duplicate_key_names_the_key() {
        let err = parse("[broker]\nsys_interval = \"1s\"\nsys_interval = \"2s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:3:"), "{err}");
        assert!(err.contains("sys_interval"), "{err}");
    }

    #[test]
    fn listener_acl_rules_need_valid_filters_too() {
        let err = parse(
            "[broker]\nlisteners = [{ bind = \"127.0.0.1:1883\", acl = [{ topic = \"a/#/b\", access = \"read\" }] }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("broker.listeners[0].acl[0].topic"), "{err}");
    }

    #[test]
    fn acl_rules_need_valid_filters() {
        let err = parse("[broker]\nacl = [{ topic = \"a/#/b\", access = \"read\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.acl[0].topic"), "{err}");
        let err = parse("[broker]\nacl = [{ topic = \"a\", access = \"sometimes\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.toml:2:") && err.contains("sometimes"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let err = parse("[broker]\nreceive_maximum = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.receive_maximum"), "{err}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example documents every key; it must stay a valid config.
    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/outpost.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.gateway_id(), "gw-01");
        assert_eq!(c.broker.max_packet_size, ByteSize(2 << 20));
        assert!(
            c.bridge.is_empty(),
            "the example bridge stays commented out"
        );
    }

    /// The commented bridge example is a valid config once uncommented, so its keys
    /// cannot drift from the real ones.
    #[test]
    fn shipped_bridge_example_is_valid_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/outpost.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut inside = false;
        let mut out = String::new();
        for line in text.lines() {
            if line.contains("BEGIN BRIDGE EXAMPLE") {
                inside = true;
            } else if line.contains("END BRIDGE EXAMPLE") {
                inside = false;
            } else if inside {
                out.push_str(line.strip_prefix("# ").unwrap_or(line));
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        let dir = tempfile::tempdir().unwrap();
        let uncommented = dir.path().join("outpost.toml");
        std::fs::write(&uncommented, out).unwrap();
        let c = Config::load(&uncommented).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.bridge.len(), 1);
        assert_eq!(c.bridge[0].name, "cloud");
    }
}
