//! rustls client configuration (ring provider only): CA file or system roots, optional
//! client certificate for mutual TLS, ALPN.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::error::BridgeError;

/// Bundles where Linux distributions keep the system trust store.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn tls_err(what: &str, path: &Path, e: impl std::fmt::Display) -> BridgeError {
    BridgeError::Tls(format!("{what} {}: {e}", path.display()))
}

fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<usize, BridgeError> {
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| tls_err("CA file", path, e))? {
        let cert = cert.map_err(|e| tls_err("CA file", path, e))?;
        roots
            .add(cert)
            .map_err(|e| tls_err("CA certificate in", path, e))?;
        added += 1;
    }
    Ok(added)
}

fn system_roots(roots: &mut RootCertStore) -> Result<(), BridgeError> {
    let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let candidates = env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(std::path::PathBuf::from));
    for path in candidates {
        if !path.is_file() {
            continue;
        }
        let (certs, _) = roots.add_parsable_certificates(
            CertificateDer::pem_file_iter(&path)
                .map_err(|e| tls_err("system CA bundle", &path, e))?
                .filter_map(Result::ok),
        );
        if certs > 0 {
            tracing::debug!(bundle = %path.display(), certs, "loaded system CA roots");
            return Ok(());
        }
    }
    Err(BridgeError::Tls(
        "no tls.ca_file given and no system CA bundle found (install ca-certificates or set SSL_CERT_FILE)".into(),
    ))
}

/// When the client certificate (the first one in `tls.cert_file`) stops being valid:
/// notAfter as unix seconds and as RFC 3339 text; None without a client certificate.
///
/// Parsed with the `x509-cert` crate: a DER walk of our own would be one more parser of
/// untrusted input to get right, for a few KiB saved.
pub fn client_cert_not_after(tls: &TlsConfig) -> Result<Option<(i64, String)>, BridgeError> {
    use x509_cert::der::Decode;
    let Some(path) = &tls.cert_file else {
        return Ok(None);
    };
    let first = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err("client certificate", path, e))?
        .next()
        .ok_or_else(|| tls_err("client certificate", path, "no certificates in it"))?
        .map_err(|e| tls_err("client certificate", path, e))?;
    let cert = x509_cert::Certificate::from_der(first.as_ref())
        .map_err(|e| tls_err("client certificate", path, format!("not X.509: {e}")))?;
    let not_after = cert.tbs_certificate.validity.not_after;
    let secs = i64::try_from(not_after.to_unix_duration().as_secs()).unwrap_or(i64::MAX);
    Ok(Some((secs, not_after.to_date_time().to_string())))
}

/// Build the client config for a TLS link.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, BridgeError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            if add_pem_file(&mut roots, path)? == 0 {
                return Err(tls_err("CA file", path, "no certificates in it"));
            }
        }
        None => system_roots(&mut roots)?,
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BridgeError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_err("client certificate", cert, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_err("client certificate", cert, e))?;
            if chain.is_empty() {
                return Err(tls_err("client certificate", cert, "no certificates in it"));
            }
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err("client key", key, e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| BridgeError::Tls(format!("client certificate and key: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(BridgeError::Tls(
                "tls.cert_file and tls.key_file go together".into(),
            ));
        }
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}
