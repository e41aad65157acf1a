//! A throwaway private CA with a server certificate for 127.0.0.1 and client
//! certificates (ECDSA P-256, valid 2 days), made by the openssl CLI, for TLS tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The CA (`ca.pem`, `ca.key`), `server.pem`/`server.key`, and `NAME.pem`/`NAME.key` per
/// client. The files are world-readable: a Mosquitto started as root drops to its own user
/// and must read them.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes the CA, the server certificate and one certificate per `(file name, CN)`.
    pub fn new(clients: &[(&str, &str)]) -> Pki {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let days = ["-days", "2"];
        let ca = [
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=outpost-test-ca",
        ];
        openssl(d, &[&["req", "-x509"][..], &ec, &days, &ca].concat());
        let mut certs = vec![("server", "127.0.0.1", "serverAuth")];
        certs.extend(clients.iter().map(|(name, cn)| (*name, *cn, "clientAuth")));
        for (name, cn, eku) in certs {
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={cn}");
            openssl(
                d,
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", &subj],
                ]
                .concat(),
            );
            let san = if name == "server" {
                "subjectAltName=IP:127.0.0.1\n"
            } else {
                ""
            };
            std::fs::write(
                d.join(&ext),
                format!("{san}extendedKeyUsage={eku}\nbasicConstraints=CA:FALSE\n"),
            )
            .expect("write the extensions file");
            let sign = [
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ];
            openssl(d, &[&sign[..], &days].concat());
        }
        for f in std::fs::read_dir(d).expect("read the PKI directory") {
            let f = f.expect("a PKI file").path();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        Pki { dir }
    }

    /// A file of it, e.g. `ca.pem`.
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl CLI (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
