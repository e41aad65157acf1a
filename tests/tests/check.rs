//! `outpost check` finds what a start would trip on, each error at file:line:column with
//! its key and what to do; `outpost import-mosquitto` turns real Mosquitto files into a
//! config that check accepts. Runs the real binary; Outpost-specific.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_tests::{outpost_bin, outpost_only};

struct Run {
    code: i32,
    text: String,
}

/// Writes `body` as `dir/outpost.toml` (with `{dir}` replaced by `dir`) and runs
/// `outpost ARGS --config FILE`.
fn run_in(dir: &Path, args: &[&str], body: &str) -> Run {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, body.replace("{dir}", &dir.display().to_string())).unwrap();
    let out = Command::new(outpost_bin())
        .args(args)
        .arg("--config")
        .arg(&path)
        .env("STATE_DIRECTORY", dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run outpost");
    Run {
        code: out.status.code().unwrap_or(-1),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn check(body: &str) -> (Run, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (run_in(dir.path(), &["check"], body), dir)
}

/// Asserts exit 2 and a line with `outpost.toml:LINE:COL: KEY: ...HINT...`.
#[track_caller]
fn assert_error(r: &Run, line: usize, key: &str, hint: &str) {
    assert_eq!(
        r.code, 2,
        "check must exit 2 on an invalid file: {}",
        r.text
    );
    let at = format!("outpost.toml:{line}:");
    let found = r
        .text
        .lines()
        .any(|l| l.contains(&at) && l.contains(&format!("{key}: ")) && l.contains(hint));
    assert!(found, "want {at}COL: {key}: ...{hint}... in:\n{}", r.text);
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

/// A self-signed certificate (cert.pem, key.pem) and an unrelated key (other.key).
fn pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-out",
            "other.key",
        ],
    );
}

#[test]
fn missing_certificate_names_the_key_and_the_path() {
    outpost_only!();
    let (r, _d) = check(
        "[broker]\nlisteners = [\n  { bind = \"127.0.0.1:0\", tls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" } },\n]\n",
    );
    assert_error(
        &r,
        3,
        "broker.listeners[0].tls.cert",
        "/nonexistent/cert.pem does not exist",
    );
    assert_error(&r, 3, "broker.listeners[0].tls.key", "check the path");
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let body = "[broker]\nlisteners = [{ bind = \"127.0.0.1:0\", tls = { cert = \"{dir}/cert.pem\", key = \"{dir}/KEY\" } }]\n";
    let good = run_in(dir.path(), &["check"], &body.replace("KEY", "key.pem"));
    assert_eq!(good.code, 0, "{}", good.text);
    let r = run_in(dir.path(), &["check"], &body.replace("KEY", "other.key"));
    assert_error(
        &r,
        2,
        "broker.listeners[0].tls.key",
        "does not belong to the certificate",
    );
}

#[test]
fn a_bridge_client_key_that_is_not_its_certificates_is_refused() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let body = "[[bridge]]\nname = \"cloud\"\naddress = \"mqtts://127.0.0.1:8883\"\ntopics = [{ pattern = \"a/#\" }]\n[bridge.tls]\nca_file = \"{dir}/cert.pem\"\ncert_file = \"{dir}/cert.pem\"\nkey_file = \"{dir}/KEY\"\n";
    let good = run_in(dir.path(), &["check"], &body.replace("KEY", "key.pem"));
    assert_eq!(good.code, 0, "{}", good.text);
    let r = run_in(dir.path(), &["check"], &body.replace("KEY", "other.key"));
    assert_error(
        &r,
        8,
        "bridge[0].tls.key_file",
        "does not belong to the certificate",
    );
}

#[test]
fn a_ca_file_that_is_not_pem_is_refused() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
    let r = run_in(
        dir.path(),
        &["check"],
        "[[bridge]]\nname = \"cloud\"\naddress = \"mqtts://127.0.0.1:8883\"\ntopics = [{ pattern = \"a/#\" }]\n[bridge.tls]\nca_file = \"{dir}/ca.pem\"\n",
    );
    assert_error(&r, 6, "bridge[0].tls.ca_file", "no certificate in it");
}

#[test]
fn clashing_listeners_are_refused() {
    outpost_only!();
    let (r, _d) = check(
        "[broker]\nallow_anonymous = true\nlisteners = [\n  { bind = \"0.0.0.0:18830\" },\n  { bind = \"127.0.0.1:18830\" },\n]\n",
    );
    assert_error(
        &r,
        5,
        "broker.listeners[1].bind",
        "clashes with broker.listeners[0]",
    );
}

#[test]
fn check_bind_names_the_address_in_use() {
    outpost_only!();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let body = format!("[broker]\nlisteners = [{{ bind = \"127.0.0.1:{port}\" }}]\n");
    let (plain, _d) = check(&body);
    assert_eq!(
        plain.code, 0,
        "without --bind the port is not tried: {}",
        plain.text
    );
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(dir.path(), &["check", "--bind"], &body);
    assert_error(
        &r,
        2,
        "broker.listeners[0].bind",
        &format!("127.0.0.1:{port} is in use"),
    );
}

#[test]
fn a_state_directory_that_cannot_be_created_is_refused() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let r = run_in(dir.path(), &["check"], "state_dir = \"{dir}/file/state\"\n");
    assert_error(&r, 1, "state_dir", "is not a directory");
}

#[test]
fn a_spool_path_that_cannot_be_created_is_refused() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let r = run_in(
        dir.path(),
        &["check"],
        "[[bridge]]\nname = \"cloud\"\naddress = \"mqtt://127.0.0.1:1883\"\ntopics = [{ pattern = \"a/#\" }]\nspool = { path = \"{dir}/file/spool.sqlite\" }\n",
    );
    assert_error(&r, 5, "bridge[0].spool.path", "is not a directory");
}

#[test]
fn unreadable_password_hashes_are_refused_naming_the_user() {
    outpost_only!();
    for hash in ["$argon2id$garbage", "$7$101$AAAA"] {
        let (r, _d) = check(&format!(
            "[broker]\nusers = [\n  {{ name = \"alice\", password_hash = \"{hash}\" }},\n]\n"
        ));
        assert_error(
            &r,
            3,
            "broker.users[0].password_hash",
            "the hash of user \"alice\" cannot be read",
        );
    }
}

#[test]
fn duplicate_users_are_refused() {
    outpost_only!();
    let h = "$7$101$Divz7TbHBTEXA6R5$uLu9u6ra8cu7Uukj2JKUb2HIiYzD6rzmjijF3Xd9GYunvLyT7zk+tFIStRV662ewvW9KbVZf3lqVDKTelIvkrA==";
    let (r, _d) = check(&format!(
        "[broker]\nusers = [\n  {{ name = \"alice\", password_hash = \"{h}\" }},\n  {{ name = \"alice\", password_hash = \"{h}\" }},\n]\n"
    ));
    assert_error(&r, 4, "broker.users[1].name", "already broker.users[0]");
}

#[test]
fn value_errors_carry_the_position() {
    outpost_only!();
    let (r, _d) = check("[broker]\nacl = [\n  { topic = \"a/#/b\", access = \"read\" },\n]\n");
    assert_error(&r, 3, "broker.acl[0].topic", "not a valid topic filter");
    let (r, _d) = check(
        "[[bridge]]\nname = \"my cloud\"\naddress = \"mqtt://127.0.0.1:1883\"\ntopics = [{ pattern = \"a/#\" }]\n",
    );
    assert_error(&r, 2, "bridge[0].name", "[A-Za-z0-9_-]");
    let (r, _d) = check(
        "[[bridge]]\nname = \"c\"\naddress = \"mqtt://127.0.0.1:1883\"\ntopics = [\n  { pattern = \"a/#\" },\n  { pattern = \"b/#/c\" },\n]\n",
    );
    assert_error(&r, 6, "bridge[0].topics[1]", "b/#/c");
    let bridge = "[[bridge]]\nname = \"c\"\naddress = \"mqtt://127.0.0.1:1883\"\ntopics = [{ pattern = \"a/#\" }]\n";
    let (r, _d) = check(&format!("{bridge}{bridge}"));
    assert_error(&r, 6, "bridge[1].name", "two bridges share this name");
    let device = "[[sensors.serial]]\nname = \"scale\"\nport = \"/dev/ttyS9\"\nformat = \"nmea\"\npoints = [{ field = \"latitude\" }]\n";
    let (r, _d) = check(&format!("{device}{}", device.replace("ttyS9", "ttyS8")));
    assert_error(&r, 7, "sensors.serial[1].name", "duplicate device name");
}

#[test]
fn warnings_do_not_fail_the_check() {
    outpost_only!();
    let (r, _d) = check(
        "[[bridge]]\nname = \"cloud\"\naddress = \"mqtt://cloud.example.invalid:1883\"\ntopics = [{ pattern = \"a/#\" }]\n\
         [[sensors.serial]]\nname = \"scale\"\nport = \"/dev/ttyOUTPOST-none\"\nformat = \"nmea\"\npoints = [{ field = \"latitude\" }]\n",
    );
    assert_eq!(r.code, 0, "warnings only: {}", r.text);
    assert!(
        r.text.contains("outpost.toml:3:")
            && r.text.contains(
                "warning: bridge[0].address: host \"cloud.example.invalid\" does not resolve"
            ),
        "{}",
        r.text
    );
    assert!(
        r.text.contains(
            "warning: sensors.serial[0].port: serial device /dev/ttyOUTPOST-none does not exist"
        ),
        "{}",
        r.text
    );
    assert!(r.text.contains("configuration is valid"), "{}", r.text);
}

#[test]
fn a_failed_start_prints_its_error_once() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let r = run_in(
        dir.path(),
        &[],
        "[broker]\nlisteners = [{ bind = \"127.0.0.1:0\", tls = { cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" } }]\n",
    );
    assert_ne!(r.code, 0, "{}", r.text);
    let n = r.text.matches("/nonexistent/c.pem").count();
    assert_eq!(n, 1, "the error must be printed once:\n{}", r.text);
}

// ---- outpost import-mosquitto ----

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mosquitto")
}

fn import(conf: &Path) -> String {
    let out = Command::new(outpost_bin())
        .arg("import-mosquitto")
        .arg(conf)
        .output()
        .expect("run outpost import-mosquitto");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The imported TOML must pass `outpost check` as it is.
#[track_caller]
fn assert_checks(dir: &Path, toml: &str) {
    let r = run_in(dir, &["check"], toml);
    assert_eq!(
        r.code, 0,
        "imported config fails check:\n{}\n---\n{toml}",
        r.text
    );
}

#[test]
fn debians_mosquitto_conf_imports_and_checks() {
    outpost_only!();
    // The file Debian's package installs, with its include_dir pointed at a conf.d of
    // our own (the system one may hold anything).
    let dir = tempfile::tempdir().unwrap();
    let confd = dir.path().join("conf.d");
    std::fs::create_dir(&confd).unwrap();
    std::fs::write(
        confd.join("10-lan.conf"),
        "listener 1883\nallow_anonymous false\npassword_file PW\n"
            .replace("PW", &dir.path().join("passwd").display().to_string()),
    )
    .unwrap();
    std::fs::write(confd.join("README"), "listener 9999\n").unwrap();
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(dir.path().join("passwd"))
        .args(["alice", "pw"])
        .status()
        .expect("mosquitto_passwd (apt-get install mosquitto)");
    assert!(status.success());
    let debian = std::fs::read_to_string(fixtures().join("debian-mosquitto.conf")).unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        debian.replace("/etc/mosquitto/conf.d", &confd.display().to_string()),
    )
    .unwrap();
    let toml = import(&conf);
    assert!(toml.contains("{ bind = \"0.0.0.0:1883\" }"), "{toml}");
    assert!(
        !toml.contains("9999"),
        "only *.conf files are included: {toml}"
    );
    assert!(
        toml.contains("allow_anonymous = false") && toml.contains("persistence = true"),
        "{toml}"
    );
    assert!(
        toml.contains("pid_file") && toml.contains("log_dest"),
        "unmapped lines are listed: {toml}"
    );
    assert_checks(dir.path(), &toml);
    // The installed file itself, where this machine has one.
    if Path::new("/etc/mosquitto/mosquitto.conf").is_file()
        && Path::new("/etc/mosquitto/conf.d").is_dir()
    {
        let toml = import(Path::new("/etc/mosquitto/mosquitto.conf"));
        assert!(toml.contains("[broker]"), "{toml}");
    }
}

#[test]
fn mosquittos_example_conf_and_acl_import_and_check() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    // Mosquitto's shipped example: every line commented out, so Mosquitto's defaults.
    let toml = import(&fixtures().join("mosquitto.conf.example"));
    assert!(
        toml.contains("{ bind = \"127.0.0.1:1883\" }") && toml.contains("persistence = false"),
        "{toml}"
    );
    assert_checks(dir.path(), &toml);
    // Its ACL example, through acl_file.
    let conf = dir.path().join("acl.conf");
    std::fs::write(
        &conf,
        format!(
            "listener 1883 127.0.0.1\nallow_anonymous true\nacl_file {}\n",
            fixtures().join("aclfile.example").display()
        ),
    )
    .unwrap();
    let toml = import(&conf);
    assert!(
        toml.contains("{ user = \"roger\", topic = \"foo/bar\", access = \"readwrite\" }"),
        "{toml}"
    );
    assert!(
        toml.contains("{ topic = \"$SYS/broker/connection/%c/state\", access = \"write\" }"),
        "{toml}"
    );
    assert!(
        toml.contains("topic read $SYS/#") && toml.contains("without a user name only"),
        "the anonymous-only rule is listed, not imported: {toml}"
    );
    assert_checks(dir.path(), &toml);
}

#[test]
fn a_bridge_imports_with_topics_credentials_and_tls() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let text = std::fs::read_to_string(fixtures().join("bridge.conf")).unwrap();
    let conf = dir.path().join("bridge.conf");
    std::fs::write(
        &conf,
        text.replace("/etc/mosquitto/certs", &dir.path().display().to_string()),
    )
    .unwrap();
    let toml = import(&conf);
    for want in [
        "name = \"cloud\"",
        "address = \"mqtts://127.0.0.1:8883\"",
        "protocol = \"3.1.1\"",
        "client_id = \"gw-01\"",
        "username = \"gw-01\"",
        "{ pattern = \"sensors/#\", direction = \"out\", qos = 1, local_prefix = \"\", remote_prefix = \"plant-7/\" }",
        "{ pattern = \"cmd/#\", direction = \"in\", qos = 1, local_prefix = \"local/\", remote_prefix = \"gw-01/\" }",
        "{ pattern = \"status\", direction = \"both\", qos = 0, local_prefix = \"\", remote_prefix = \"\" }",
        "ca_file = ",
        "cert_file = ",
        "key_file = ",
        "cleansession true",
        "try_private false",
    ] {
        assert!(toml.contains(want), "missing {want:?} in:\n{toml}");
    }
    assert_checks(dir.path(), &toml);
}

#[test]
fn per_listener_settings_import_onto_each_listener() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::write(
        dir.path().join("acl"),
        "user alice\ntopic readwrite plant/#\n",
    )
    .unwrap();
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(dir.path().join("passwd"))
        .args(["alice", "pw"])
        .status()
        .expect("mosquitto_passwd (apt-get install mosquitto)");
    assert!(status.success());
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings true\nlistener 1883 127.0.0.1\nallow_anonymous true\n\
             listener 18883\nallow_anonymous false\npassword_file {d}/passwd\nacl_file {d}/acl\n"
        ),
    )
    .unwrap();
    let toml = import(&conf);
    assert!(
        toml.contains("{ bind = \"127.0.0.1:1883\", allow_anonymous = true }"),
        "{toml}"
    );
    assert!(
        toml.contains("{ bind = \"0.0.0.0:18883\", allow_anonymous = false, acl = ["),
        "{toml}"
    );
    assert!(
        toml.contains("{ user = \"alice\", topic = \"plant/#\", access = \"readwrite\" }"),
        "{toml}"
    );
    assert!(
        toml.contains("a password_file is shared by every listener"),
        "{toml}"
    );
    assert_checks(dir.path(), &toml);
}
