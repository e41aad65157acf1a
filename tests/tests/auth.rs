//! Authentication (outpost-specific config): anonymous access is an explicit choice and
//! passwords are configured as hashes made by `outpost passwd`.

use std::io::Write;
use std::process::{Command, Stdio};

use outpost_mqtt::{Protocol, ReasonCode};
use outpost_tests::raw::connect_packet;
use outpost_tests::{Broker, RawClient, WAIT, outpost_bin, outpost_only};

fn hash(password: &str) -> String {
    let mut child = Command::new(outpost_bin())
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outpost passwd");
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
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
