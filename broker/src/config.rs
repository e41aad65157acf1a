//! The `[broker]` table of `outpost.toml`: the local MQTT broker's settings as written.
//!
//! Every table denies unknown keys; the gateway composes this section into the whole
//! file and reports errors with file, line, column and key path.
//! [`Settings`](crate::Settings) turns it into what the broker runs with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use outpost_units::ByteSize;
use serde::Deserialize;

/// `[broker]`: the local MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Sockets to listen on. Default: 127.0.0.1:1883 only (secure by default).
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    /// Accept clients without a user name. Default: true only when every listener is on
    /// loopback, as Mosquitto 2 does.
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// Users allowed to connect, with PHC-format password hashes (see `outpost passwd`).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// A Mosquitto password file (`user:$7$...` lines as `mosquitto_passwd` writes them,
    /// `$6$` too), read beside `users`; a name in both is refused as a duplicate.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The users of `password_file`, filled by [`BrokerConfig::load_password_file`]
    /// (the TOML never sets it).
    #[serde(skip)]
    pub password_file_users: Vec<FileEntry>,
    /// Topic access rules. None: every client may publish and subscribe to anything.
    /// Any: a client may only do what a rule that applies to it allows.
    #[serde(default)]
    pub acl: Vec<AclRule>,
    /// A client must send CONNECT within this time after the TCP connection opens (at
    /// most [`MAX_CONNECTION_TIMEOUT`]).
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "connect_timeout"
    )]
    pub connect_timeout: Duration,
    /// Upper bound on a client's keep alive, announced as 5.0 Server Keep Alive.
    #[serde(default = "default_max_keepalive")]
    pub max_keepalive: u16,
    /// Largest packet accepted from a client (announced as Maximum Packet Size).
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: ByteSize,
    /// QoS 1/2 publishes a client may have unacknowledged towards us (5.0 Receive Maximum).
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    /// QoS 1/2 messages in flight towards one client (capped by its Receive Maximum).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages queued per session beyond the inflight window (offline or slow clients);
    /// past it new messages for that session are dropped and counted.
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Queue QoS 0 messages for offline persistent sessions too.
    #[serde(default)]
    pub queue_qos0: bool,
    /// Topic aliases a 5.0 client may use towards us (Topic Alias Maximum).
    #[serde(default = "default_topic_alias_maximum")]
    pub topic_alias_maximum: u16,
    /// Upper bound on a session's expiry: 5.0 clients are told (Session Expiry Interval
    /// in CONNACK), and 3.1.1 persistent sessions, which would otherwise never expire,
    /// end this long after their client left. "0s" means no bound.
    #[serde(
        default = "default_max_session_expiry",
        deserialize_with = "max_session_expiry"
    )]
    pub max_session_expiry: Option<Duration>,
    /// Open client connections, all listeners together; past it new ones are closed at
    /// accept. 0 means no limit.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open client connections from one IP address. 0 means no limit.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Sessions, connected and persistent offline ones together; a CONNECT that would
    /// make a new one past it is refused (5.0: 0x97, 3.1.1: 0x03). 0 means no limit.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Largest first packet (CONNECT, will included) from a client not yet connected: an
    /// unauthenticated peer cannot make the broker buffer `max_packet_size`.
    #[serde(default = "default_max_connect_size")]
    pub max_connect_size: ByteSize,
    /// A packet whose first byte has arrived must be complete within this time, or the
    /// connection is closed (slow-sender guard; keep alive 0 does not turn it off). At
    /// most [`MAX_CONNECTION_TIMEOUT`].
    #[serde(
        default = "default_packet_timeout",
        deserialize_with = "packet_timeout"
    )]
    pub packet_timeout: Duration,
    /// Subscriptions one session may hold; further filters are refused (SUBACK 0x97,
    /// 3.1.1: 0x80). 0 means no limit.
    #[serde(default = "default_max_subscriptions_per_client")]
    pub max_subscriptions_per_client: usize,
    /// Retained messages (topics) the broker keeps; a retained message for a new topic
    /// past it is not retained (5.0: refused with 0x97; 3.x: delivered, not retained).
    /// 0 means no limit.
    #[serde(default = "default_max_retained_messages")]
    pub max_retained_messages: usize,
    /// Payload bytes of all retained messages together, bounded the same way.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: ByteSize,
    /// Bytes of messages queued for one session (payload, topic and per-message
    /// overhead), beside `max_queued_messages`; past either, new messages for that
    /// session are dropped and counted. "0" for no bound.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: ByteSize,
    /// Bytes the broker store may hold (retained messages, persistent sessions and what
    /// they are owed); past it, new ones are refused as on a full disk. "0" for no bound.
    #[serde(default = "default_max_store_size")]
    pub max_store_size: ByteSize,
    /// Most levels (`/`-separated parts) in a topic name or filter; deeper ones are refused
    /// (PUBACK 0x90, SUBACK 0x8F). 0 means no limit. Mosquitto's limit is 200 too.
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Longest topic name or filter in bytes; longer ones are refused like deep ones.
    /// The default is the protocol's own limit (65,535): lower it to bound what each
    /// subscription can take.
    #[serde(default = "default_max_topic_length")]
    pub max_topic_length: usize,
    /// How often `$SYS/broker/...` statistics are published; "0s" turns them off. At most
    /// [`MAX_SYS_INTERVAL`].
    #[serde(default = "default_sys_interval", deserialize_with = "sys_interval")]
    pub sys_interval: Duration,
    /// Keep retained messages and persistent sessions (with the messages they are owed)
    /// in `{state_dir}/broker.sqlite`, so they survive a restart, a crash or a power
    /// cut; acknowledgements for such messages wait until they are on disk.
    #[serde(default = "default_persistence")]
    pub persistence: bool,
    /// Longest a change to `broker.sqlite` may wait for others to share its commit, so
    /// that a steady stream writes a few pages per commit rather than per message
    /// (default 100ms, at most 5s; "0s" commits each at once). A client that waits for
    /// each PUBACK is not held.
    #[serde(default = "default_commit_window", deserialize_with = "commit_window")]
    pub commit_window: Duration,
}

/// Longest `connect_timeout` and `packet_timeout`. Both are added to the current
/// `Instant` for a connection's deadline, which panics past what the clock can hold (a
/// `connect_timeout` of i64::MAX seconds stopped the listener's accept task); an hour
/// is far beyond any real link's need and nowhere near that.
pub const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);

/// Longest `sys_interval`: a day. The next publication's time is `now + sys_interval`,
/// and statistics a day apart are already of little use.
pub const MAX_SYS_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Longest `max_session_expiry`: the largest Session Expiry Interval MQTT can carry
/// (u32::MAX seconds, about 136 years, which means "never"); a longer bound says nothing
/// more, and the expiry is added to an `Instant`.
pub const MAX_SESSION_EXPIRY: Duration = Duration::from_secs(u32::MAX as u64);

/// A duration of at most `max`, refused with the bound and `what` it is for otherwise.
fn at_most<'de, D: serde::Deserializer<'de>>(
    d: D,
    max: Duration,
    what: &str,
) -> Result<Duration, D::Error> {
    let v = outpost_units::duration(d)?;
    if v > max {
        return Err(serde::de::Error::custom(format_args!(
            "{} is too long for {what}; use at most {}",
            humantime::format_duration(v),
            humantime::format_duration(max)
        )));
    }
    Ok(v)
}

fn connect_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    at_most(d, MAX_CONNECTION_TIMEOUT, "the time to CONNECT")
}

fn packet_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    at_most(d, MAX_CONNECTION_TIMEOUT, "the time to finish a packet")
}

fn sys_interval<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    at_most(d, MAX_SYS_INTERVAL, "the $SYS interval")
}

fn max_session_expiry<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    let v = at_most(d, MAX_SESSION_EXPIRY, "a session expiry")?;
    // "0s" turns the bound off.
    Ok((!v.is_zero()).then_some(v))
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
        tls: None,
        websocket: None,
        allow_anonymous: None,
        acl: None,
        use_identity_as_username: false,
    }]
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_keepalive() -> u16 {
    u16::MAX
}
fn default_max_packet_size() -> ByteSize {
    // A 1 MiB payload (a firmware or image chunk) with its topic and properties.
    ByteSize(2 << 20)
}
fn default_max_session_expiry() -> Option<Duration> {
    Some(Duration::from_secs(7 * 24 * 3600))
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_address() -> usize {
    1_000
}
fn default_max_sessions() -> usize {
    20_000
}
fn default_max_connect_size() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_packet_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_subscriptions_per_client() -> usize {
    1_000
}
fn default_max_retained_messages() -> usize {
    10_000
}
fn default_max_retained_bytes() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_max_store_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_max_queued_bytes() -> ByteSize {
    // A burst of a few hundred 64 KiB messages to a subscriber that acknowledges a
    // window at a time must fit; a stalled or absent one stops at this.
    ByteSize(64 << 20)
}
fn default_receive_maximum() -> u16 {
    100
}
fn default_max_inflight() -> u16 {
    20
}
fn default_max_queued_messages() -> usize {
    10_000
}
fn default_topic_alias_maximum() -> u16 {
    10
}
fn default_max_topic_levels() -> usize {
    200
}
fn default_max_topic_length() -> usize {
    65_535
}
fn default_commit_window() -> Duration {
    outpost_sqlite::commit_window::DEFAULT_WINDOW
}

/// A duration of at most [`outpost_sqlite::commit_window::MAX_WINDOW`].
fn commit_window<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let w = outpost_units::duration(d)?;
    let max = outpost_sqlite::commit_window::MAX_WINDOW;
    if w > max {
        return Err(serde::de::Error::custom(format_args!(
            "a commit window of {w:?} would hold every acknowledgement that long; \
             use at most {max:?} (or \"0s\" to commit each change at once)"
        )));
    }
    Ok(w)
}

fn default_persistence() -> bool {
    true
}
fn default_sys_interval() -> Duration {
    Duration::from_secs(10)
}

impl Default for BrokerConfig {
    fn default() -> Self {
        // Round-trip through serde so the defaults live in one place.
        toml::from_str("").expect("empty broker table is valid")
    }
}

/// One user line of a Mosquitto password file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// 1-based line number.
    pub line: usize,
    /// The user name.
    pub name: String,
    /// The hash text after the ':'.
    pub hash: String,
}

/// A `password_file` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line cannot be used.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong and what to do.
        message: String,
    },
}

impl BrokerConfig {
    /// Whether anonymous clients are accepted, after applying the loopback default.
    /// Whether anonymous clients may connect through `l`.
    pub fn anonymous_allowed_on(&self, l: &ListenerConfig) -> bool {
        l.allow_anonymous
            .unwrap_or_else(|| self.anonymous_allowed())
    }

    /// Whether anonymous clients may connect where no listener says otherwise.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous
            .unwrap_or_else(|| self.listeners.iter().all(|l| l.bind.ip().is_loopback()))
    }
}

/// One `[[broker.listeners]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address and port, e.g. "0.0.0.0:1883"; port 0 picks a free one (logged).
    pub bind: SocketAddr,
    /// Serve MQTT over TLS on this listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve MQTT over WebSocket (subprotocol `mqtt`) at this HTTP path, e.g. "/mqtt".
    #[serde(default)]
    pub websocket: Option<String>,
    /// Anonymous access on this listener only (Mosquitto's `per_listener_settings`):
    /// e.g. a loopback listener for local apps stays anonymous while the LAN listener
    /// needs users. Unset: `[broker] allow_anonymous` decides.
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// Topic rules for clients of this listener only, instead of `[broker] acl`. Unset:
    /// `[broker] acl` applies. An empty list allows everything here.
    #[serde(default)]
    pub acl: Option<Vec<AclRule>>,
    /// mTLS: the client certificate's Common Name is the client's user name (for the ACL
    /// and the log) and no password is asked, as Mosquitto's `use_identity_as_username`.
    /// Needs `tls.client_ca`, so every client presents a certificate the CA signed.
    #[serde(default)]
    pub use_identity_as_username: bool,
}

impl ListenerConfig {
    /// Whether `other` needs the same socket (address, TLS files, WebSocket path); the
    /// per-listener access settings can change without rebinding.
    pub fn same_socket(&self, other: &ListenerConfig) -> bool {
        self.bind == other.bind && self.tls == other.tls && self.websocket == other.websocket
    }
}

/// TLS settings of a listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle for client certificates; with it, clients must present one.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// One `[[broker.acl]]` entry, in Mosquitto's `pattern` spirit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// The user name this rule is for; without it the rule applies to every client.
    #[serde(default)]
    pub user: Option<String>,
    /// A topic filter; `%u` is replaced by the client's user name and `%c` by its client id.
    pub topic: String,
    /// What the rule allows.
    pub access: AclAccess,
}

/// What an ACL rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAccess {
    /// Receive messages on matching topics.
    Read,
    /// Publish on matching topics (wills included).
    Write,
    /// Both.
    Readwrite,
}

/// One `[[broker.users]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// User name clients present in CONNECT.
    pub name: String,
    /// PHC string of the password hash (argon2id), never the password itself.
    pub password_hash: String,
}
