//! `outpost check`: what a start would find wrong, found without starting.
//!
//! Parsing and validation ([`Config::parse`]) come first and stop at the first error.
//! The checks here need the outside world (files, names, sockets), so they run on a
//! valid config and report every problem at once, each at the file:line:column of its
//! key. Some are warnings: a USB serial adapter may be plugged in after boot, and a cloud
//! name that does not resolve now may once the uplink is up; the gateway copes with both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, locate};

/// One problem found, at a key of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Dotted key path, e.g. `broker.listeners[1].tls.key`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
    /// A warning does not make the file invalid.
    pub warning: bool,
}

/// All findings of a check.
#[derive(Debug, Default)]
pub struct Report {
    /// In the order found.
    pub findings: Vec<Finding>,
}

impl Report {
    fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            key: key.into(),
            message: message.into(),
            warning: false,
        });
    }

    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            key: key.into(),
            message: message.into(),
            warning: true,
        });
    }

    /// True if any finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| !f.warning)
    }

    /// Each finding as a line: `file:line:column: [warning: ]key: message`.
    pub fn lines(&self, path: &Path, text: &str) -> Vec<String> {
        self.findings
            .iter()
            .map(|f| {
                let at = match locate(text, &f.key) {
                    Some((l, c)) => format!("{}:{l}:{c}", path.display()),
                    None => path.display().to_string(),
                };
                let level = if f.warning { "warning: " } else { "" };
                format!("{at}: {level}{}: {}", f.key, f.message)
            })
            .collect()
    }
}

/// Options of `outpost check`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Also bind every listener (and let go at once), to find ports in use.
    pub bind: bool,
}

/// Runs every check on a config that parsed and validated.
pub fn check(config: &Config, opts: Options) -> Report {
    let mut r = Report::default();
    listener_tls(config, &mut r);
    listener_clashes(config, &mut r);
    bridges(config, &mut r);
    paths(config, &mut r);
    serial_devices(config, &mut r);
    if opts.bind && !r.has_errors() {
        bind(config, &mut r);
    }
    r
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    std::fs::metadata(path).map_err(|e| io_hint(path, &e))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected a -----BEGIN CERTIFICATE----- block)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    std::fs::metadata(path).map_err(|e| io_hint(path, &e))?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "{}: no usable private key in it ({e}); expected a PEM PRIVATE KEY block \
             (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        )
    })
}

fn io_hint(path: &Path, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{} does not exist; check the path (relative paths are from the working \
             directory, /var/lib/outpost under systemd)",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "{}: permission denied; let the service user (outpost) read it",
            path.display()
        ),
        _ => format!("cannot read {}: {e}", path.display()),
    }
}

fn ca_roots(path: &Path) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(path)? {
        roots.add(c).map_err(|e| {
            format!(
                "{}: a CA certificate in it is unusable ({e})",
                path.display()
            )
        })?;
    }
    Ok(())
}

const MISMATCH: &str = "the private key does not belong to the certificate (their public keys \
                        differ); give the key the certificate was issued for";

fn listener_tls(config: &Config, r: &mut Report) {
    for (i, l) in config.broker.listeners.iter().enumerate() {
        let Some(tls) = &l.tls else { continue };
        let k = |f: &str| format!("broker.listeners[{i}].tls.{f}");
        let mut files_ok = true;
        if let Err(e) = read_certs(&tls.cert) {
            r.error(k("cert"), e);
            files_ok = false;
        }
        if let Err(e) = read_key(&tls.key) {
            r.error(k("key"), e);
            files_ok = false;
        }
        if let Some(ca) = &tls.client_ca
            && let Err(e) = ca_roots(ca)
        {
            r.error(k("client_ca"), e);
            files_ok = false;
        }
        if !files_ok {
            continue;
        }
        // What the listener itself will build: catches a key that is not the cert's.
        match outpost_broker::server_config(tls) {
            Ok(_) => {}
            Err(outpost_broker::TlsError::Rustls(rustls::Error::InconsistentKeys(_))) => {
                r.error(k("key"), MISMATCH)
            }
            Err(e) => r.error(k("cert"), e.to_string()),
        }
    }
}

/// Two listeners clash when the kernel would refuse the second bind: the same port on
/// the same address, or on a wildcard address and any address of its family (Linux
/// refuses 127.0.0.1:P beside 0.0.0.0:P). `[::]` also takes IPv4 unless v6-only, so it
/// clashes with every address. Port 0 picks a free port and clashes with nothing.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (ai, bi) = (a.ip(), b.ip());
    ai == bi
        || (ai.is_unspecified() && (ai.is_ipv6() || ai.is_ipv4() == bi.is_ipv4()))
        || (bi.is_unspecified() && (bi.is_ipv6() || ai.is_ipv4() == bi.is_ipv4()))
}

fn listener_clashes(config: &Config, r: &mut Report) {
    let ls = &config.broker.listeners;
    for j in 0..ls.len() {
        if let Some(i) = (0..j).find(|&i| clash(ls[i].bind, ls[j].bind)) {
            r.error(
                format!("broker.listeners[{j}].bind"),
                format!(
                    "{} clashes with broker.listeners[{i}] ({}): both cannot listen on port {}; \
                     give one another port, or remove one",
                    ls[j].bind,
                    ls[i].bind,
                    ls[j].bind.port()
                ),
            );
        }
    }
}

fn bridges(config: &Config, r: &mut Report) {
    for (i, b) in config.bridge.iter().enumerate() {
        let k = |f: &str| format!("bridge[{i}].{f}");
        let Ok(addrs) = b.addresses() else {
            continue; // validation refused it already
        };
        // All or none use TLS (validation checks), so the first tells.
        if addrs.first().is_some_and(|a| a.scheme.is_tls()) {
            let tls = b.tls.clone().unwrap_or_default();
            let mut files_ok = true;
            if let Some(ca) = &tls.ca_file
                && let Err(e) = ca_roots(ca)
            {
                r.error(k("tls.ca_file"), e);
                files_ok = false;
            }
            if let Some(c) = &tls.cert_file
                && let Err(e) = read_certs(c)
            {
                r.error(k("tls.cert_file"), e);
                files_ok = false;
            }
            if let Some(c) = &tls.key_file
                && let Err(e) = read_key(c)
            {
                r.error(k("tls.key_file"), e);
                files_ok = false;
            }
            if files_ok && let Err(e) = outpost_bridge::uplink::client_config(&tls) {
                let msg = e.to_string();
                if msg.contains("KeyMismatch") {
                    r.error(k("tls.key_file"), MISMATCH);
                } else if tls.ca_file.is_none() {
                    r.error(k("tls"), msg);
                } else {
                    r.error(k("tls.cert_file"), msg);
                }
            }
        }
        for addr in &addrs {
            let is_ip = addr.host.parse::<std::net::IpAddr>().is_ok();
            if !is_ip {
                use std::net::ToSocketAddrs;
                if let Err(e) = (addr.host.as_str(), addr.port).to_socket_addrs() {
                    r.warn(
                        k("address"),
                        format!(
                            "host {:?} does not resolve now ({e}); the bridge keeps retrying, \
                             but check the name and the gateway's DNS",
                            addr.host
                        ),
                    );
                }
            }
        }
    }
}

/// The nearest directory at or above `dir` that exists, and whether we may create in it.
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut probe_in = dir.to_path_buf();
    loop {
        match std::fs::metadata(&probe_in) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(format!(
                    "{} is not a directory; point it elsewhere or remove the file",
                    probe_in.display()
                ));
            }
            Err(_) => match probe_in.parent() {
                Some(p) if !p.as_os_str().is_empty() => probe_in = p.to_path_buf(),
                _ => {
                    probe_in = PathBuf::from(".");
                    break;
                }
            },
        }
    }
    // Create and remove a file: permission bits alone miss read-only mounts and ACLs.
    let probe = probe_in.join(format!(".outpost-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => {
            let what = if probe_in == dir {
                format!("cannot write in {}", dir.display())
            } else {
                format!(
                    "cannot create {}: cannot write in {}",
                    dir.display(),
                    probe_in.display()
                )
            };
            Err(format!(
                "{what} ({e}); create it and let the service user (outpost) write there, \
                 or choose another directory"
            ))
        }
    }
}

fn paths(config: &Config, r: &mut Report) {
    let state = config.state_dir();
    if let Err(e) = writable_dir(&state) {
        r.error("state_dir", format!("state directory: {e}"));
    }
    for (i, b) in config.bridge.iter().enumerate() {
        // The default spool lives in the state directory, checked above.
        if let Some(p) = &b.spool.path {
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
            if let Err(e) = writable_dir(dir.unwrap_or(Path::new("."))) {
                r.error(format!("bridge[{i}].spool.path"), format!("spool: {e}"));
            }
        }
    }
}

fn serial_devices(config: &Config, r: &mut Report) {
    let missing = |port: &str| std::fs::metadata(port).is_err();
    let warn = |r: &mut Report, key: String, port: &str| {
        r.warn(
            key,
            format!(
                "serial device {port} does not exist now; the sensor will retry until it \
                 appears (plug the adapter in, or use a /dev/serial/by-id/ name)"
            ),
        )
    };
    for (i, d) in config.sensors.modbus.iter().enumerate() {
        if let outpost_sensors::config::Transport::Rtu(rtu) = &d.transport
            && missing(&rtu.port)
        {
            warn(
                r,
                format!("sensors.modbus[{i}].transport.rtu.port"),
                &rtu.port,
            );
        }
    }
    for (i, s) in config.sensors.serial.iter().enumerate() {
        if missing(&s.port) {
            warn(r, format!("sensors.serial[{i}].port"), &s.port);
        }
    }
}

fn bind(config: &Config, r: &mut Report) {
    // All held at once, as a start holds them, then let go.
    let mut held = Vec::new();
    for (i, l) in config.broker.listeners.iter().enumerate() {
        match std::net::TcpListener::bind(l.bind) {
            Ok(s) => held.push(s),
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrInUse => format!(
                        "{} is in use by another program; stop it (`ss -ltnp 'sport = :{}'` \
                         shows which) or choose another port",
                        l.bind,
                        l.bind.port()
                    ),
                    std::io::ErrorKind::PermissionDenied => format!(
                        "binding {} is not permitted; ports below 1024 need \
                         CAP_NET_BIND_SERVICE (the shipped unit grants it)",
                        l.bind
                    ),
                    std::io::ErrorKind::AddrNotAvailable => format!(
                        "{} is not an address of this machine; use one it has, or 0.0.0.0",
                        l.bind.ip()
                    ),
                    _ => format!("cannot bind {}: {e}", l.bind),
                };
                r.error(format!("broker.listeners[{i}].bind"), hint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clashes_follow_the_kernel() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(clash(a("0.0.0.0:1883"), a("127.0.0.1:1883")));
        assert!(clash(a("127.0.0.1:1883"), a("0.0.0.0:1883")));
        assert!(clash(a("10.0.0.1:1883"), a("10.0.0.1:1883")));
        assert!(clash(a("[::]:1883"), a("127.0.0.1:1883")));
        assert!(!clash(a("127.0.0.1:1883"), a("10.0.0.1:1883")));
        assert!(!clash(a("0.0.0.0:1883"), a("0.0.0.0:8883")));
        assert!(!clash(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!clash(a("0.0.0.0:1883"), a("[::1]:1883")));
    }
}
