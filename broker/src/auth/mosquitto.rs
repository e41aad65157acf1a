//! Mosquitto password files, read as `mosquitto_passwd` writes them, verified natively.
//!
//! A line is `user:hash`. Mosquitto 2 writes `$7$<iterations>$<base64 salt>$<base64
//! PBKDF2-HMAC-SHA512(password, salt, iterations)>` (64-byte key); Mosquitto 1.6 and
//! earlier wrote `$6$<base64 salt>$<base64 SHA-512(password || salt)>` (its own format,
//! not crypt(3)'s SHA-crypt despite the prefix). Both as in Mosquitto's
//! `src/password_mosq.c`. Comparison is constant-time, as Mosquitto's own.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Mosquitto's PBKDF2 default is 101; a file is written by an administrator, but a
/// bound keeps one typo (an extra digit or six) from making every login take minutes.
const MAX_ITERATIONS: u32 = 10_000_000;

/// A parsed Mosquitto hash.
#[derive(Clone, PartialEq, Eq)]
pub enum MosquittoHash {
    /// `$6$`: SHA-512 over password then salt.
    Sha512 {
        /// Decoded salt.
        salt: Vec<u8>,
        /// Decoded digest (64 bytes).
        hash: Vec<u8>,
    },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        /// Rounds.
        iterations: u32,
        /// Decoded salt.
        salt: Vec<u8>,
        /// Decoded derived key (64 bytes).
        hash: Vec<u8>,
    },
}

impl std::fmt::Debug for MosquittoHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print hash material into logs.
        match self {
            MosquittoHash::Sha512 { .. } => f.write_str("MosquittoHash::Sha512"),
            MosquittoHash::Pbkdf2Sha512 { iterations, .. } => {
                write!(f, "MosquittoHash::Pbkdf2Sha512({iterations} rounds)")
            }
        }
    }
}

/// Why a Mosquitto hash cannot be read; shown in config errors and refused logins.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MosquittoHashError {
    /// The salt or the digest is not standard base64.
    #[error("the {what} is not base64 ({cause})")]
    NotBase64 {
        /// "salt" or "hash".
        what: &'static str,
        /// The decoder's complaint.
        cause: base64::DecodeError,
    },
    /// The digest decodes to the wrong length (usually a line cut short).
    #[error("the hash decodes to {0} bytes; SHA-512 gives 64 (a truncated line?)")]
    DigestLength(usize),
    /// A `$6$` hash without the `$` between salt and digest.
    #[error("a $6$ hash is $6$<salt>$<hash>; this one has no second '$'")]
    Sha512NoHash,
    /// A `$6$` hash with more than salt and digest.
    #[error("a $6$ hash is $6$<salt>$<hash>; this one has more parts")]
    Sha512ExtraParts,
    /// A `$7$` hash without exactly iterations, salt and digest.
    #[error(
        "a $7$ hash is $7$<iterations>$<salt>$<hash>; this one has a different number of parts"
    )]
    Pbkdf2Parts,
    /// The `$7$` iteration count is not a number in the accepted range.
    #[error("the iteration count {0:?} is not a number from 1 to {max}", max = MAX_ITERATIONS)]
    Iterations(String),
    /// Neither `$6$` nor `$7$`.
    #[error("not a Mosquitto hash ($6$ or $7$)")]
    NotMosquitto,
}

impl MosquittoHash {
    /// True if `s` looks like a Mosquitto hash (so its errors should be about that format).
    pub fn is_mosquitto(s: &str) -> bool {
        s.starts_with("$6$") || s.starts_with("$7$")
    }

    /// Parses `$6$salt$hash` or `$7$iterations$salt$hash`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<MosquittoHash, MosquittoHashError> {
        let b64 = |what: &'static str, v: &str| {
            STANDARD
                .decode(v)
                .map_err(|cause| MosquittoHashError::NotBase64 { what, cause })
        };
        let digest = |v: &str| {
            let h = b64("hash", v)?;
            if h.len() == 64 {
                Ok(h)
            } else {
                Err(MosquittoHashError::DigestLength(h.len()))
            }
        };
        if let Some(rest) = s.strip_prefix("$6$") {
            let (salt, hash) = rest
                .split_once('$')
                .ok_or(MosquittoHashError::Sha512NoHash)?;
            if hash.contains('$') {
                return Err(MosquittoHashError::Sha512ExtraParts);
            }
            return Ok(MosquittoHash::Sha512 {
                salt: b64("salt", salt)?,
                hash: digest(hash)?,
            });
        }
        if let Some(rest) = s.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(it), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(MosquittoHashError::Pbkdf2Parts);
            };
            let iterations: u32 = it
                .parse()
                .ok()
                .filter(|n| (1..=MAX_ITERATIONS).contains(n))
                .ok_or_else(|| MosquittoHashError::Iterations(it.to_owned()))?;
            return Ok(MosquittoHash::Pbkdf2Sha512 {
                iterations,
                salt: b64("salt", salt)?,
                hash: digest(hash)?,
            });
        }
        Err(MosquittoHashError::NotMosquitto)
    }

    /// True if `password` matches, compared in constant time.
    pub fn verify(&self, password: &[u8]) -> bool {
        let mut out = [0u8; 64];
        let want = match self {
            MosquittoHash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                out.copy_from_slice(&d.finalize());
                hash
            }
            MosquittoHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                hash
            }
        };
        out.ct_eq(want.as_slice()).into()
    }
}

pub use crate::config::FileEntry;

/// A line of a password file that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct FileLineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

/// Splits a password file into entries, as Mosquitto reads it: blank lines and lines
/// starting with '#' are skipped, surrounding blanks trimmed, the name ends at the first
/// ':'. Every hash is parsed here so an unreadable one is refused at start, naming the
/// user and line, rather than failing that user's logins in silence.
pub fn parse_file(text: &str) -> Result<Vec<FileEntry>, FileLineError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = l.split_once(':') else {
            return Err(FileLineError {
                line,
                message: "expected `user:hash`; add users with `mosquitto_passwd FILE USER`".into(),
            });
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(FileLineError {
                line,
                message: "the user name before ':' is empty".into(),
            });
        }
        let hash = hash.trim();
        if let Err(e) = MosquittoHash::parse(hash) {
            let message = if hash.starts_with('$') {
                format!(
                    "user {name:?}: the password hash cannot be read: {e}; set it again \
                     with `mosquitto_passwd FILE {name}`"
                )
            } else {
                format!(
                    "user {name:?}: the password is in clear text; hash the file with \
                     `mosquitto_passwd -U FILE` (Outpost never stores passwords in clear)"
                )
            };
            return Err(FileLineError { line, message });
        }
        out.push(FileEntry {
            line,
            name: name.to_owned(),
            hash: hash.to_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `mosquitto_passwd -b` (Mosquitto 2.0.11; `-H sha512` for the $6$ one) for user "u", password "pw".
    const PBKDF2: &str = "$7$101$Divz7TbHBTEXA6R5$uLu9u6ra8cu7Uukj2JKUb2HIiYzD6rzmjijF3Xd9GYunvLyT7zk+tFIStRV662ewvW9KbVZf3lqVDKTelIvkrA==";
    const SHA512: &str = "$6$PsGQOmjtW4MuP3eW$KzRDjTfjbo8C/OLZWZbe0MBTt5M8plYJRZFYXou0H6j1v6KFhcYDlEigNeeoG8i2eUK1ifHlm5QakzxlB6U7OQ==";

    #[test]
    fn hashes_made_by_mosquitto_passwd_verify() {
        for h in [PBKDF2, SHA512] {
            let p = MosquittoHash::parse(h).unwrap();
            assert!(p.verify(b"pw"), "{h}");
            assert!(!p.verify(b"pW"), "{h}");
            assert!(!p.verify(b""), "{h}");
        }
    }

    #[test]
    fn unreadable_hashes_say_why() {
        for (h, want) in [
            ("$7$abc$AAAA$AAAA", "iteration count"),
            ("$7$0$AAAA$AAAA", "iteration count"),
            ("$7$101$AAAA", "number of parts"),
            ("$6$!!$AAAA", "salt is not base64"),
            ("$6$AAAA$AAAA", "decodes to 3 bytes"),
            ("$5$x$y", "not a Mosquitto hash"),
        ] {
            let e = MosquittoHash::parse(h).unwrap_err().to_string();
            assert!(e.contains(want), "{h}: {e}");
        }
    }

    #[test]
    fn file_lines_name_the_user_and_line() {
        let text = format!("# comment\n\nu:{PBKDF2}\n  v : {SHA512}  \nw:$7$101$x\n");
        let e = parse_file(&text).unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.message.contains("\"w\""), "{e}");
        let ok = parse_file(&text.replace("w:$7$101$x\n", "")).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!((ok[1].line, ok[1].name.as_str()), (4, "v"));
        let e = parse_file("bob:plaintext\n").unwrap_err();
        assert!(e.message.contains("mosquitto_passwd -U"), "{e}");
        let e = parse_file("nocolon\n").unwrap_err();
        assert!(e.message.contains("user:hash"), "{e}");
    }
}
