//! Authentication (outpost-specific config): anonymous access is an explicit choice and
//! passwords are configured as hashes made by `outpost passwd`.

use std::process::{Command, Stdio};

use outpost_mqtt::{Protocol, ReasonCode};
use outpost_tests::raw::connect_packet;
use outpost_tests::{Broker, RawClient, WAIT, outpost_bin, outpost_only};

fn hash(password: &str) -> String {
    outpost_tests::broker::password_hash(password)
}

fn secured_broker() -> Broker {
    let h = hash("s3cret-pw");
    Broker::start(&format!(
        "allow_anonymous = false\nusers = [{{ name = \"alice\", password_hash = \"{h}\" }}]"
    ))
}

async fn connack(
    broker: &Broker,
    protocol: Protocol,
    user: Option<&str>,
    pw: Option<&str>,
) -> (RawClient, ReasonCode) {
    let mut c = connect_packet(protocol, "auth-client", true);
    c.username = user.map(str::to_string);
    c.password = pw.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    let (raw, ack) = RawClient::connect(broker.port(), c).await;
    (raw, ack.reason)
}

#[test]
fn passwd_prints_a_phc_hash_not_the_password() {
    outpost_only!();
    let h = hash("s3cret-pw");
    assert!(h.starts_with("$argon2"), "not a PHC argon2 string: {h}");
    assert!(!h.contains("s3cret-pw"));
    assert_ne!(h, hash("s3cret-pw"), "hashes must be salted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correct_password_is_accepted() {
    outpost_only!();
    let broker = secured_broker();
    let (_raw, rc) = connack(&broker, Protocol::V3_1_1, Some("alice"), Some("s3cret-pw")).await;
    assert_eq!(rc, ReasonCode::SUCCESS);
    let (_raw, rc) = connack(&broker, Protocol::V5, Some("alice"), Some("s3cret-pw")).await;
    assert_eq!(rc, ReasonCode::SUCCESS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_and_wrong_passwords_are_refused_and_closed_mqtt_3_2_2_5() {
    outpost_only!();
    let broker = secured_broker();
    let refused = [
        ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        ReasonCode::NOT_AUTHORIZED,
    ];
    for protocol in [Protocol::V3_1_1, Protocol::V5] {
        for (user, pw) in [
            (None, None),
            (Some("alice"), Some("wrong")),
            (Some("mallory"), Some("s3cret-pw")),
        ] {
            let (mut raw, rc) = connack(&broker, protocol, user, pw).await;
            assert!(
                refused.contains(&rc),
                "{protocol:?} {user:?}/{pw:?}: CONNACK {rc:?}"
            );
            assert!(
                raw.closed_within(WAIT).await,
                "refused connection left open"
            );
        }
    }
}

// ---- Mosquitto password files (`broker.password_file`) ----

/// A password file written by Mosquitto's own `mosquitto_passwd`: alice with the default
/// `$7$` (PBKDF2-SHA512), bob with `-H sha512` (`$6$`, Mosquitto 1.6 and earlier).
fn mosquitto_password_file(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("passwd");
    for (args, user, pw) in [
        (&["-c", "-b"][..], "alice", "alice-pw"),
        (&["-H", "sha512", "-b"][..], "bob", "bob-pw"),
    ] {
        let out = Command::new("mosquitto_passwd")
            .args(args)
            .arg(&file)
            .args([user, pw])
            .output()
            .expect("mosquitto_passwd (apt-get install mosquitto)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("alice:$7$") && text.contains("bob:$6$"),
        "{text}"
    );
    file
}

/// Connects and disconnects with Mosquitto's `mosquitto_pub`; true if it was let in.
fn mosquitto_pub_login(port: u16, user: &str, pw: &str, client_id: &str) -> bool {
    Command::new("timeout")
        .args(["10", "mosquitto_pub", "-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args([
            "-u", user, "-P", pw, "-i", client_id, "-t", "t", "-m", "x", "-q", "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
        .success()
}

fn wait_log(broker: &Broker, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let log = broker.log();
        if log.lines().any(|l| l.contains(needle)) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn mosquitto_passwd_hashes_log_in_beside_argon2_users() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let file = mosquitto_password_file(dir.path());
    let h = hash("carol-pw");
    let broker = Broker::start(&format!(
        "allow_anonymous = false\npassword_file = \"{}\"\n\
         users = [{{ name = \"carol\", password_hash = \"{h}\" }}]",
        file.display()
    ));
    let port = broker.port();
    assert!(
        mosquitto_pub_login(port, "alice", "alice-pw", "c1"),
        "$7$ user refused"
    );
    assert!(
        mosquitto_pub_login(port, "bob", "bob-pw", "c2"),
        "$6$ user refused"
    );
    assert!(
        mosquitto_pub_login(port, "carol", "carol-pw", "c3"),
        "argon2 user refused"
    );
    assert!(
        !mosquitto_pub_login(port, "alice", "bob-pw", "c4"),
        "wrong $7$ password let in"
    );
    assert!(
        !mosquitto_pub_login(port, "bob", "alice-pw", "c5"),
        "wrong $6$ password let in"
    );
    assert!(
        !mosquitto_pub_login(port, "dave", "x", "c6"),
        "unknown user let in"
    );
}

#[test]
fn refused_logins_are_logged_with_user_client_and_cause() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let file = mosquitto_password_file(dir.path());
    let broker = Broker::start(&format!(
        "allow_anonymous = false\npassword_file = \"{}\"",
        file.display()
    ));
    assert!(!mosquitto_pub_login(
        broker.port(),
        "alice",
        "wrong",
        "meter-7"
    ));
    let log = wait_log(&broker, "login refused: bad password");
    let line = log
        .lines()
        .find(|l| l.contains("login refused: bad password"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    for want in ["user=alice", "client_id=meter-7", "peer=127.0.0.1:"] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    assert!(
        !line.contains("ReasonCode("),
        "debug text in the log: {line}"
    );
    assert!(!mosquitto_pub_login(
        broker.port(),
        "mallory",
        "x",
        "meter-8"
    ));
    let log = wait_log(&broker, "login refused: unknown user");
    assert!(
        log.lines()
            .any(|l| l.contains("login refused: unknown user") && l.contains("user=mallory")),
        "{log}"
    );
}

#[test]
fn a_user_in_both_places_or_an_unreadable_file_line_is_refused_at_start() {
    outpost_only!();
    let dir = tempfile::tempdir().unwrap();
    let file = mosquitto_password_file(dir.path());
    let check = |body: &str| {
        let cfg = dir.path().join("outpost.toml");
        std::fs::write(&cfg, body).unwrap();
        let out = Command::new(outpost_bin())
            .args(["check", "--config"])
            .arg(&cfg)
            .env("STATE_DIRECTORY", dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let h = hash("x");
    let (code, err) = check(&format!(
        "[broker]\npassword_file = \"{}\"\nusers = [{{ name = \"alice\", password_hash = \"{h}\" }}]\n",
        file.display()
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("outpost.toml:3:")
            && err.contains("broker.users[0].name")
            && err.contains("also in broker.password_file (line 1)"),
        "{err}"
    );
    // A $7$ line cut short: the user and the line are named, with what to do.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("eve:$7$101$c2FsdA==\n");
    std::fs::write(&file, text).unwrap();
    let (code, err) = check(&format!(
        "[broker]\npassword_file = \"{}\"\n",
        file.display()
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("outpost.toml:2:")
            && err.contains(&format!("{}:3: user \"eve\"", file.display()))
            && err.contains("mosquitto_passwd"),
        "{err}"
    );
}

/// Runs `outpost passwd` on a pseudo-terminal (Python's pty module) and returns what the
/// terminal showed and the exit code. The driver types only once the prompt is out and
/// the terminal's ECHO flag is off (the prompt is printed before echo is turned off, so
/// typing at the prompt alone raced with it on a loaded machine).
fn passwd_on_a_terminal(first: &str, second: &str) -> (String, Option<i32>) {
    const DRIVER: &str = r#"
import os, pty, sys, termios, time
binary, first, second = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
pid, fd = pty.fork()
if pid == 0:
    os.execv(binary, [binary, "passwd"])
seen = b""
def read_until(marker):
    global seen
    while marker not in seen:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            return
        if not chunk:
            return
        seen += chunk
def type_when_echo_is_off(line):
    for _ in range(500):
        if not termios.tcgetattr(fd)[3] & termios.ECHO:
            break
        time.sleep(0.01)
    os.write(fd, line + b"\n")
read_until(b"Password: ")
type_when_echo_is_off(first)
read_until(b"(again): ")
type_when_echo_is_off(second)
read_until(b"\0never")
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let out = Command::new("timeout")
        .args(["20", "python3", "-c", DRIVER])
        .arg(outpost_bin())
        .args([first, second])
        .output()
        .expect("python3 for the pty driver");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

#[test]
fn passwd_on_a_terminal_asks_twice_without_echo() {
    outpost_only!();
    let (screen, code) = passwd_on_a_terminal("tty-s3cret", "tty-s3cret");
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        screen.contains("Password: ") && screen.contains("Password (again): "),
        "{screen}"
    );
    assert!(screen.contains("$argon2id$"), "no hash printed: {screen}");
    assert!(
        !screen.contains("tty-s3cret"),
        "the password was echoed: {screen}"
    );
    let (screen, code) = passwd_on_a_terminal("one", "other");
    assert_eq!(code, Some(1), "{screen}");
    assert!(
        screen.contains("the passwords differ") && !screen.contains("$argon2"),
        "{screen}"
    );
}
