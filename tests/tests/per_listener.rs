//! Per-listener access (Mosquitto's `per_listener_settings`): a loopback listener for
//! local apps stays anonymous while the LAN listener needs users, each with its own topic
//! rules, and a reload changes them without dropping anyone who is still allowed.

use std::time::Duration;

use outpost_tests::broker::{Broker, mosquitto_mode, password_hash};
use outpost_tests::ports::reserve_port;
use outpost_tests::{V4Client, WAIT};
use rumqttc::QoS;

fn config(lan: u16, alice: &str, lan_acl: &str) -> String {
    // The "LAN" listener is on loopback too (tests talk only to loopback); what makes it
    // the LAN one here is its explicit settings.
    format!(
        r#"[broker]
users = [{{ name = "alice", password_hash = "{alice}" }}]
listeners = [
  {{ bind = "127.0.0.1:0", allow_anonymous = true }},
  {{ bind = "127.0.0.1:{lan}", allow_anonymous = false, acl = [{lan_acl}] }},
]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_listener_stays_anonymous_while_the_lan_one_needs_users_and_its_own_rules() {
    if mosquitto_mode() {
        return;
    }
    let alice = password_hash("alice-pw");
    let lan_held = reserve_port();
    let lan = lan_held.port();
    let mut b = Broker::outpost_with_full_config(&config(
        lan,
        &alice,
        r#"{ user = "alice", topic = "plant/#", access = "readwrite" }"#,
    ));
    let local = b.port();

    // Anonymous: welcome on the local listener, refused on the LAN one (CONNACK 5,
    // not authorized; MQTT-3.2.2-5 for the reason, 3.1.1 table 3.1).
    let (mut app, _) = V4Client::connect(local, "local-app", |_| {}).await;
    let (_, refused) = V4Client::try_connect(lan, "lan-anon", |_| {}).await;
    assert!(
        refused.is_err(),
        "anonymous client accepted on the LAN listener"
    );

    // The local app has no rules (the broker's ACL is empty): it reads everything.
    app.client.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    app.expect_suback().await;
    let (mut dev, _) = V4Client::connect(lan, "lan-dev", |o| {
        o.set_credentials("alice", "alice-pw");
    })
    .await;
    for t in ["plant/line1", "office/door"] {
        dev.client
            .publish(t, QoS::AtLeastOnce, false, t)
            .await
            .unwrap();
        dev.expect_publish_done().await;
    }
    // On the LAN listener alice may write only plant/#: office/door is dropped (3.1.1
    // has no negative PUBACK; it is acknowledged and not delivered, as Mosquitto does).
    let got = app.publishes_during(Duration::from_secs(1)).await;
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, ["plant/line1"], "{}", b.log());

    // A reload that narrows the LAN listener's rules applies to alice's live connection;
    // the anonymous local app on the untouched listener stays connected.
    b.reload_with(&config(
        lan,
        &alice,
        r#"{ user = "alice", topic = "plant/line2/#", access = "write" }"#,
    ));
    assert!(
        tokio::task::block_in_place(|| b.wait_for_log(
            "outpost_gateway::reload: reloaded ",
            1,
            WAIT
        )),
        "{}",
        b.log()
    );
    for t in ["plant/line1", "plant/line2/speed"] {
        dev.client
            .publish(t, QoS::AtLeastOnce, false, t)
            .await
            .unwrap();
        dev.expect_publish_done().await;
    }
    let got = app.publishes_during(Duration::from_secs(1)).await;
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, ["plant/line2/speed"], "{}", b.log());
    assert!(app.closed.is_none(), "local app dropped: {:?}", app.closed);
    assert!(dev.closed.is_none(), "LAN device dropped: {:?}", dev.closed);
}
