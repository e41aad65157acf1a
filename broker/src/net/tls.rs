//! TLS for listeners: rustls with the ring provider, PEM files from the config.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::TlsConfig;

/// Why a listener's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA bundle cannot build a verifier.
    #[error("client CA: {0}")]
    Verifier(String),
}

fn pem_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a server config; with `client_ca`, clients must present a certificate it signed.
pub fn server_config(c: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| pem_err(&c.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(&c.cert, e))?;
    if certs.is_empty() {
        return Err(pem_err(&c.cert, "no certificate found in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| pem_err(&c.key, e))?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &c.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| pem_err(ca, e))? {
                roots
                    .add(cert.map_err(|e| pem_err(ca, e))?)
                    .map_err(|e| pem_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"mqtt".to_vec(), b"http/1.1".to_vec()];
    enable_resumption(&mut config)?;
    Ok(Arc::new(config))
}

/// Entries of the stateful session cache, which only TLS 1.2 clients without ticket
/// support use once tickets are on. An entry is the 32-byte session ID (kept twice: map
/// and eviction order) plus the encoded session, about 90 bytes (master secret, suite,
/// ALPN, SNI), so about 250 bytes with allocator and table overhead, or about 1 KiB when
/// it also holds a client's certificate chain. 512 entries bound it at about 128 KiB
/// (512 KiB with client certificates), enough for every TLS 1.2 device of a site to
/// reconnect after a network blip without a full handshake.
pub const SESSION_CACHE_ENTRIES: usize = 512;

/// Lets returning clients skip the certificate signature and key exchange of a full
/// handshake: TLS 1.3 (and RFC 5077 TLS 1.2) clients get stateless tickets, encrypted with
/// keys that rotate every 6 hours and cost no memory per client; TLS 1.2 clients without
/// tickets use a bounded session-ID cache. A reload that rebuilds this config starts a new
/// ticketer and cache, so clients holding old tickets make one full handshake again.
fn enable_resumption(config: &mut ServerConfig) -> Result<(), TlsError> {
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(())
}

/// The Common Name of a certificate's subject (the last one, as OpenSSL and Mosquitto
/// take it), if it has one that is text.
pub(crate) fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_cert::der::{Decode, Tag, Tagged};
    // id-at-commonName, 2.5.4.3.
    const CN: x509_cert::der::asn1::ObjectIdentifier =
        x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let mut found = None;
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == CN
                && matches!(
                    atv.value.tag(),
                    Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
                )
                && let Ok(s) = std::str::from_utf8(atv.value.value())
            {
                found = Some(s.to_owned());
            }
        }
    }
    found.filter(|s| !s.is_empty())
}
