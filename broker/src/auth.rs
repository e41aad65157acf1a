//! Who may connect: anonymous access and user names with argon2 password hashes.

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use outpost_mqtt::{Connect, ReasonCode};

use super::settings::Settings;

/// Checks a CONNECT's credentials; `Err` carries the CONNACK reason to refuse with.
pub async fn check(c: &Connect, s: &Settings) -> Result<(), ReasonCode> {
    if c.properties.authentication_method.is_some() {
        // 5.0 enhanced authentication is not offered (MQTT-4.12.0-1).
        return Err(ReasonCode::BAD_AUTHENTICATION_METHOD);
    }
    let Some(name) = &c.username else {
        return if s.allow_anonymous {
            Ok(())
        } else {
            Err(ReasonCode::NOT_AUTHORIZED)
        };
    };
    let Some(user) = s.users.iter().find(|u| &u.name == name) else {
        // A user name nobody configured is anonymous access under another name.
        return if s.allow_anonymous && s.users.is_empty() {
            Ok(())
        } else {
            Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        };
    };
    let Some(password) = c.password.clone() else {
        return Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    };
    let hash = user.password_hash.clone();
    // Hash verification is deliberately slow; keep it off the async workers.
    let ok = tokio::task::spawn_blocking(move || verify(&password, &hash))
        .await
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
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
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use rand_core::OsRng;
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(b"s3cret", &h));
        assert!(!verify(b"wrong", &h));
        assert!(!verify(b"s3cret", "not a hash"));
    }
}
