//! Who may connect: anonymous access, argon2 users from `[[broker.users]]` and users of a
//! Mosquitto password file (`broker.password_file`, see [`mosquitto`]).

pub mod mosquitto;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use outpost_mqtt::{Connect, ReasonCode};
use tokio::sync::Semaphore;

use super::config::{BrokerConfig, PasswordFileError};
pub use mosquitto::{MosquittoHash, MosquittoHashError};

/// A password hash the broker can verify, parsed once when the users table is made.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A PHC argon2 string (`outpost passwd`), checked when parsed.
    Argon2(String),
    /// A Mosquitto `$6$` or `$7$` hash.
    Mosquitto(MosquittoHash),
    /// A hash that did not parse; logins as this user are refused with this reason.
    /// Config validation refuses such a file first, so this is a second line only.
    Unreadable(CredentialError),
}

impl Credential {
    /// Parses a hash as written in `password_hash` or a Mosquitto password file.
    pub fn parse(s: &str) -> Result<Credential, CredentialError> {
        if MosquittoHash::is_mosquitto(s) {
            return Ok(Credential::Mosquitto(MosquittoHash::parse(s)?));
        }
        let h = PasswordHash::new(s).map_err(CredentialError::NotPhc)?;
        argon2::Algorithm::try_from(h.algorithm)
            .map_err(|_| CredentialError::NotArgon2(h.algorithm.as_str().to_owned()))?;
        argon2::Params::try_from(&h).map_err(CredentialError::Argon2Params)?;
        if h.hash.is_none() {
            return Err(CredentialError::NoHashPart);
        }
        Ok(Credential::Argon2(s.to_owned()))
    }

    /// True if `password` matches. Slow on purpose: call it off the async workers.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Credential::Argon2(s) => verify(password, s),
            Credential::Mosquitto(h) => h.verify(password),
            Credential::Unreadable(_) => false,
        }
    }
}

/// Why a configured password hash cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// A `$6$`/`$7$` hash that does not parse.
    #[error(transparent)]
    Mosquitto(#[from] MosquittoHashError),
    /// Not a PHC string at all.
    #[error("not a PHC hash string ({0}); expected \"$argon2id$v=19$m=...\"")]
    NotPhc(argon2::password_hash::Error),
    /// A PHC string for another algorithm (the name as written).
    #[error("the algorithm {0:?} is not argon2")]
    NotArgon2(String),
    /// An argon2 PHC string whose parameters argon2 refuses.
    #[error("bad argon2 parameters ({0})")]
    Argon2Params(argon2::password_hash::Error),
    /// A PHC string without the hash part.
    #[error("the PHC string is incomplete: it has no hash part (a line cut short?)")]
    NoHashPart,
}

/// Hashing a new password failed (the system's random source, in practice).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HashPasswordError(argon2::password_hash::Error);

/// Users and their credentials: made from the config, never changed afterwards (a new
/// config makes a new table). Cheap to clone.
#[derive(Clone)]
pub struct Users {
    by_name: Arc<HashMap<String, Arc<Credential>>>,
    /// Longest a CONNECT waits for a free hash check (`connect_timeout`): the caller's
    /// deadline does not reach this far, so a client is not held longer than it would
    /// be for a slow CONNECT.
    check_wait: Duration,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            by_name: Arc::default(),
            check_wait: BrokerConfig::default().connect_timeout,
        }
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: hashes stay out of debug output.
        f.debug_set().entries(self.by_name.keys()).finish()
    }
}

impl Users {
    /// The table for a `[broker]` table: `users` plus the entries of `password_file`
    /// (read into `password_file_users` by [`BrokerConfig::load_password_file`]). A name
    /// in both is refused by the gateway's check; were it not, `[[broker.users]]` wins,
    /// being the more specific place.
    pub fn from_config(c: &BrokerConfig) -> Users {
        let mut by_name = HashMap::new();
        let file = c.password_file_users.iter().map(|e| (&e.name, &e.hash));
        let inline = c.users.iter().map(|u| (&u.name, &u.password_hash));
        for (name, hash) in file.chain(inline) {
            let cred = Credential::parse(hash).unwrap_or_else(Credential::Unreadable);
            by_name.insert(name.clone(), Arc::new(cred));
        }
        Users {
            by_name: Arc::new(by_name),
            check_wait: c.connect_timeout,
        }
    }

    /// No users configured.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    fn get(&self, name: &str) -> Option<Arc<Credential>> {
        self.by_name.get(name).cloned()
    }
}

/// Why a CONNECT was refused, by name, for the log; [`Refusal::reason`] is the code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 5.0 enhanced authentication was asked for.
    #[error("enhanced authentication is not offered")]
    AuthMethod,
    /// No user name, and anonymous access is off.
    #[error("anonymous access is off (no user name given)")]
    Anonymous,
    /// The user name is not configured.
    #[error("unknown user")]
    UnknownUser,
    /// A user name without a password.
    #[error("no password given")]
    NoPassword,
    /// The password does not match.
    #[error("bad password")]
    BadPassword,
    /// Every password check was taken for as long as a CONNECT may take.
    #[error("too many password checks at once; none came free within broker.connect_timeout")]
    Busy,
    /// The user's hash cannot be read.
    #[error("unreadable hash for user {user}: {why}")]
    UnreadableHash {
        /// The user.
        user: String,
        /// The parse error.
        why: CredentialError,
    },
}

impl Refusal {
    /// The CONNACK reason code to refuse with.
    pub fn reason(&self) -> ReasonCode {
        match self {
            // MQTT-4.12.0-1: an unsupported Authentication Method gets 0x8C.
            Refusal::AuthMethod => ReasonCode::BAD_AUTHENTICATION_METHOD,
            Refusal::Anonymous => ReasonCode::NOT_AUTHORIZED,
            // 3.1.1 gets return code 3 (server unavailable) for it.
            Refusal::Busy => ReasonCode::SERVER_BUSY,
            _ => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        }
    }
}

// Reading the password file is the auth module's job (it knows the hash formats); the
// method sits on the config type so callers load it where they load the config.
impl BrokerConfig {
    /// Reads `password_file` (if set) into `password_file_users`, refusing a line whose
    /// hash cannot be read so that user's logins do not fail in silence.
    pub fn load_password_file(&mut self) -> Result<(), PasswordFileError> {
        let Some(path) = &self.password_file else {
            self.password_file_users.clear();
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
            path: path.clone(),
            source,
        })?;
        self.password_file_users =
            mosquitto::parse_file(&text).map_err(|e| PasswordFileError::Line {
                path: path.clone(),
                line: e.line,
                message: e.message,
            })?;
        Ok(())
    }
}

/// Password hash checks that may run at once, broker-wide; more CONNECTs wait. Each
/// argon2 check holds its memory cost (19 MiB by default) while it runs, and tokio's
/// blocking pool would run up to 512: 300 CONNECTs with a wrong password took 3.6 GB.
/// A small device has few cores, so more at once would not finish sooner; the gateway's
/// HTTP logins are capped the same way (`CONCURRENT_LOGINS`).
pub const CONCURRENT_HASH_CHECKS: usize = 2;

/// The permits for hash checks, with a probe that tests use to watch them.
struct HashChecks {
    permits: Semaphore,
    #[cfg(test)]
    probe: tests::Probe,
}

impl HashChecks {
    const fn new() -> HashChecks {
        HashChecks {
            permits: Semaphore::const_new(CONCURRENT_HASH_CHECKS),
            #[cfg(test)]
            probe: tests::Probe::new(),
        }
    }
}

static HASH_CHECKS: HashChecks = HashChecks::new();

/// Checks a CONNECT's credentials against `users`; `Err` says why it is refused.
pub async fn check(c: &Connect, allow_anonymous: bool, users: &Users) -> Result<(), Refusal> {
    check_with(c, allow_anonymous, users, &HASH_CHECKS).await
}

async fn check_with(
    c: &Connect,
    allow_anonymous: bool,
    users: &Users,
    checks: &'static HashChecks,
) -> Result<(), Refusal> {
    if c.properties.authentication_method.is_some() {
        // 5.0 enhanced authentication is not offered (MQTT-4.12.0-1).
        return Err(Refusal::AuthMethod);
    }
    let Some(name) = &c.username else {
        return if allow_anonymous {
            Ok(())
        } else {
            Err(Refusal::Anonymous)
        };
    };
    let Some(cred) = users.get(name) else {
        // A user name nobody configured is anonymous access under another name.
        return if allow_anonymous && users.is_empty() {
            Ok(())
        } else {
            Err(Refusal::UnknownUser)
        };
    };
    if let Credential::Unreadable(why) = &*cred {
        return Err(Refusal::UnreadableHash {
            user: name.clone(),
            why: why.clone(),
        });
    }
    let Some(password) = c.password.clone() else {
        return Err(Refusal::NoPassword);
    };
    #[cfg(test)]
    let waiting = checks.probe.wait();
    let permit = match tokio::time::timeout(users.check_wait, checks.permits.acquire()).await {
        Ok(Ok(permit)) => permit,
        // The semaphore is never closed; a wait as long as a CONNECT may take is refused.
        Ok(Err(_)) | Err(_) => return Err(Refusal::Busy),
    };
    #[cfg(test)]
    drop(waiting);
    // Hash verification is deliberately slow; keep it off the async workers. The permit
    // goes with it: a client that hangs up does not stop a check already started, so
    // it must stay counted until the check ends.
    let ok = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        #[cfg(test)]
        let _running = checks.probe.enter();
        cred.verify(&password)
    })
    .await
    .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(Refusal::BadPassword)
    }
}

/// True if `password` matches the PHC `hash`.
pub fn verify(password: &[u8], hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password, &h)
            .is_ok()
    })
}

/// Hashes a password into a PHC string for the config file.
pub fn hash_password(password: &str) -> Result<String, HashPasswordError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use rand_core::OsRng;
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(HashPasswordError)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};

    /// Counts hash checks running at once and holds them at a gate until a test opens it.
    pub(super) struct Probe {
        /// Checks waiting for a permit.
        waiting: AtomicUsize,
        running: AtomicUsize,
        most: AtomicUsize,
        /// Open gate: checks run through. Starts open, so the static's checks never wait.
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl Probe {
        pub(super) const fn new() -> Probe {
            Probe {
                waiting: AtomicUsize::new(0),
                running: AtomicUsize::new(0),
                most: AtomicUsize::new(0),
                open: Mutex::new(true),
                opened: Condvar::new(),
            }
        }

        /// Marks a check running until the guard drops; waits while the gate is shut.
        pub(super) fn enter(&self) -> Running<'_> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            Running(self)
        }

        /// Marks a check waiting for a permit until the guard drops.
        pub(super) fn wait(&self) -> Waiting<'_> {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            Waiting(self)
        }

        fn set_open(&self, open: bool) {
            *self.open.lock().unwrap() = open;
            self.opened.notify_all();
        }
    }

    pub(super) struct Running<'a>(&'a Probe);

    pub(super) struct Waiting<'a>(&'a Probe);

    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn hash_then_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(b"s3cret", &h));
        assert!(!verify(b"wrong", &h));
        assert!(!verify(b"s3cret", "not a hash"));
    }

    #[test]
    fn credentials_parse_or_say_why() {
        let h = hash_password("s3cret").unwrap();
        assert!(Credential::parse(&h).unwrap().verify(b"s3cret"));
        for (bad, want) in [
            ("$argon2id$garbage", "PHC"),
            (
                "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "not argon2",
            ),
            ("$7$101$AAAA", "parts"),
            ("plain", "PHC"),
        ] {
            let e = Credential::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    /// A cheap argon2id hash (8 KiB, one pass): the tests count checks, not their cost.
    fn cheap_hash(password: &str) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::generate(&mut rand_core::OsRng);
        a.hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    fn users_with(name: &str, password: &str) -> Users {
        let mut c = BrokerConfig::default();
        c.users.push(crate::config::UserConfig {
            name: name.into(),
            password_hash: cheap_hash(password),
        });
        Users::from_config(&c)
    }

    fn connect(user: &str, password: &'static [u8]) -> Connect {
        Connect {
            protocol: outpost_mqtt::Protocol::V5,
            clean_start: true,
            keep_alive: 0,
            properties: outpost_mqtt::Properties::default(),
            client_id: String::new(),
            will: None,
            username: Some(user.into()),
            password: Some(bytes::Bytes::from_static(password)),
        }
    }

    fn own_checks() -> &'static HashChecks {
        Box::leak(Box::new(HashChecks::new()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn password_checks_run_at_most_the_limit_at_once_and_each_connect_gets_its_answer() {
        const CONNECTS: usize = 16;
        let users = users_with("u", "right");
        let checks = own_checks();
        // Shut: every check that starts stays running, so any past the limit would show.
        checks.probe.set_open(false);
        let tasks: Vec<_> = (0..CONNECTS)
            .map(|_| {
                let users = users.clone();
                tokio::spawn(async move {
                    check_with(&connect("u", b"wrong"), false, &users, checks).await
                })
            })
            .collect();
        // Settled once every CONNECT is either running its check or waiting for a permit;
        // without the bound all of them run.
        let p = &checks.probe;
        while p.running.load(Ordering::SeqCst) + p.waiting.load(Ordering::SeqCst) < CONNECTS {
            tokio::task::yield_now().await;
        }
        let running = p.running.load(Ordering::SeqCst);
        // Opened before asserting: the runtime waits for its blocking threads on drop.
        p.set_open(true);
        assert_eq!(running, CONCURRENT_HASH_CHECKS);
        for t in tasks {
            // 5.0: 0x86 Bad User Name or Password (3.1.1: return code 4).
            let refusal = t.await.unwrap().unwrap_err();
            assert_eq!(refusal, Refusal::BadPassword);
            assert_eq!(refusal.reason(), ReasonCode::BAD_USER_NAME_OR_PASSWORD);
        }
        assert_eq!(p.most.load(Ordering::SeqCst), CONCURRENT_HASH_CHECKS);
        assert_eq!(
            check_with(&connect("u", b"right"), false, &users, checks).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_connect_that_finds_no_free_check_within_its_wait_is_refused_as_busy() {
        let mut users = users_with("u", "right");
        users.check_wait = Duration::ZERO;
        let checks = own_checks();
        let _all = checks
            .permits
            .acquire_many(CONCURRENT_HASH_CHECKS as u32)
            .await
            .unwrap();
        let refusal = check_with(&connect("u", b"right"), false, &users, checks)
            .await
            .unwrap_err();
        // 5.0: 0x89 Server busy.
        assert_eq!(refusal, Refusal::Busy);
        assert_eq!(refusal.reason(), ReasonCode::SERVER_BUSY);
    }
}
