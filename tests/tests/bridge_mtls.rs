//! Mutual TLS to the cloud, the way AWS IoT Core and Azure IoT Hub authenticate devices:
//! a private CA, a client certificate made by the openssl CLI, and a real Mosquitto with
//! `require_certificate true` and `use_identity_as_username true` whose ACL lets only
//! that identity publish. The certificate is valid for 2 days, inside the default 30-day
//! warning: the log says so with the file and the date, and `$SYS` shows the days left.

use std::process::Command;
use std::time::Duration;

use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::cloud::Cloud;
use outpost_tests::pki::Pki;

const WAIT: Duration = Duration::from_secs(20);

/// A TLS Mosquitto that requires a client certificate and takes its CN as the user name;
/// only `gw-mtls` may publish, only `collector` may read.
fn mtls_cloud(pki: &Pki) -> Cloud {
    let acl = pki.path("acl");
    std::fs::write(
        &acl,
        "user gw-mtls\ntopic readwrite up/#\ntopic readwrite outpost/#\n\
         user collector\ntopic read up/#\ntopic read outpost/#\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&acl, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cloud = Cloud::with_limits(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
         use_identity_as_username true\nacl_file {}\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        acl.display()
    ));
    cloud.start();
    cloud
}

fn collector(
    cloud: &Cloud,
    pki: &Pki,
    topic: &str,
    count: usize,
    secs: u32,
) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &cloud.port.to_string()])
        .arg("--cafile")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("collector.pem"))
        .arg("--key")
        .arg(pki.path("collector.key"))
        .args([
            "-t",
            topic,
            "-v",
            "-q",
            "1",
            "-C",
            &count.to_string(),
            "-W",
            &secs.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub")
}

fn gateway(cloud: &Cloud, pki: &Pki, cert: &str, extra: &str) -> Broker {
    Broker::outpost_with_full_config(&format!(
        r#"gateway_id = "gw-mtls"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "cloud"
address = "mqtts://127.0.0.1:{port}"
client_id = "gw-mtls"
stats_interval = "1s"
topics = [{{ pattern = "q1/#", direction = "out", qos = 1, remote_prefix = "up/" }}]
reconnect = {{ min = "100ms", max = "500ms" }}
[bridge.tls]
ca_file = "{ca}"
cert_file = "{cert_pem}"
key_file = "{cert_key}"
{extra}
"#,
        port = cloud.port,
        ca = pki.path("ca.pem").display(),
        cert_pem = pki.path(&format!("{cert}.pem")).display(),
        cert_key = pki.path(&format!("{cert}.key")).display(),
    ))
}

fn local(port: u16, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("mosquitto clients");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The gateway's identity, the cloud-side collector's, and one the cloud's ACL refuses.
fn three_identities() -> Pki {
    Pki::new(&[
        ("gw-mtls", "gw-mtls"),
        ("collector", "collector"),
        ("intruder", "intruder"),
    ])
}

/// Waits for the bridge's TLS link, then publishes `q1/meter0..2` retained at QoS 1.
fn connected_then_three_retained(broker: &Broker) {
    assert!(
        broker.wait_for_log("waiting in the spool; using mqtts://", 1, WAIT),
        "{}",
        broker.log()
    );
    for n in 0..3 {
        local(
            broker.port(),
            "mosquitto_pub",
            &[
                "-t",
                &format!("q1/meter{n}"),
                "-q",
                "1",
                "-r",
                "-m",
                &n.to_string(),
            ],
        );
    }
}

#[test]
fn bridge_authenticates_with_its_client_certificate_and_warns_before_it_expires() {
    if mosquitto_mode() {
        return;
    }
    let pki = three_identities();
    let cloud = mtls_cloud(&pki);
    // The status page's /metrics shows the expiry too (a table after [bridge.tls]).
    let broker = gateway(&cloud, &pki, "gw-mtls", "[http]\nbind = \"127.0.0.1:0\"");
    // Retained, so the collector gets them whenever its subscription lands.
    connected_then_three_retained(&broker);
    let sub = collector(&cloud, &pki, "up/#", 3, 20);
    let out = sub.wait_with_output().unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.lines().filter(|l| l.starts_with("up/q1/meter")).count() == 3,
        "nothing reached the mTLS cloud: {got}\n{}",
        broker.log()
    );

    let log = broker.log();
    let cert = pki.path("gw-mtls.pem");
    // Made valid for 2 days: 2 whole days left, or 1 once a second has passed.
    assert!(
        ["expires in 2 days (on ", "expires in 1 days (on "]
            .iter()
            .any(|w| log.contains(w)),
        "no expiry warning:\n{log}"
    );
    assert!(
        log.contains(&cert.display().to_string()),
        "warning names no file:\n{log}"
    );
    let days = local(
        broker.port(),
        "mosquitto_sub",
        &[
            "-t",
            "$SYS/broker/bridge/cloud/tls/cert_expires_in_days",
            "-C",
            "1",
            "-W",
            "5",
        ],
    );
    assert!(days == "1" || days == "2", "cert_expires_in_days {days:?}");
    let metrics =
        outpost_tests::http::get(outpost_tests::http::http_port(&broker), "/metrics", None);
    let expiry = outpost_tests::http::metric(
        &metrics.body,
        "outpost_bridge_client_cert_expiry_timestamp_seconds{bridge=\"cloud\"}",
    )
    .unwrap_or_else(|| panic!("no certificate expiry in /metrics:\n{}", metrics.body));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let left_days = (expiry - now) / 86_400.0;
    assert!(
        (0.5..=2.5).contains(&left_days),
        "expiry {expiry} is {left_days} days away"
    );
}

#[test]
fn a_certificate_the_cloud_does_not_authorise_gets_nothing_through() {
    if mosquitto_mode() {
        return;
    }
    let pki = three_identities();
    let cloud = mtls_cloud(&pki);
    // Same CA, another identity: TLS succeeds, the ACL (keyed on the certificate's CN)
    // refuses its messages. With warnings off, nothing is said about expiry.
    let broker = gateway(&cloud, &pki, "intruder", "warn_expiry_days = 0");
    connected_then_three_retained(&broker);
    // The cloud answers each with PUBACK "not authorised" (0x87): counted, not retried.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let refused = local(
            broker.port(),
            "mosquitto_sub",
            &[
                "-t",
                "$SYS/broker/bridge/cloud/dropped/refused",
                "-C",
                "1",
                "-W",
                "5",
            ],
        );
        if refused == "3" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusals counted: {refused:?}\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Had any been accepted, it would be retained there.
    let out = collector(&cloud, &pki, "up/#", 1, 2)
        .wait_with_output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "an unauthorised identity got through"
    );
    assert!(
        !broker.log().contains("certificate expires"),
        "{}",
        broker.log()
    );
}
