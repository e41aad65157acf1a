//! A full disk must not turn acknowledged messages into lost ones (issue #17, breach 3):
//! when the broker store cannot commit, what would have to be kept is refused (5.0:
//! 0x97; 3.x: no acknowledgement), everything else goes on, everything acknowledged is
//! there after a `kill -9`, and the broker accepts again by itself once space returns.
//!
//! The state directory is a small tmpfs mounted by the test (CI runs as root).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_mqtt::{Packet, Properties, Protocol, QoS, ReasonCode};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, RawClient, WAIT, outpost_only};

/// A tmpfs of a given size, unmounted (and its mount point removed) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn retained(topic: &str, id: u16, payload: &[u8]) -> Packet {
    let mut p = publish(topic, QoS::AtLeastOnce, Some(id), payload);
    p.retain = true;
    Packet::Publish(p)
}

async fn puback_reason(c: &mut RawClient) -> ReasonCode {
    match c.expect_packet(WAIT).await {
        Packet::PubAck(r) => r.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_what_it_cannot_keep_loses_nothing_acknowledged_and_recovers() {
    outpost_only!();
    let fs = Tmpfs::mount("24m");
    // Most of the file system is taken by someone else's file.
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0xA5u8; 14 << 20]).expect("write filler");
    // Stop the broker (it holds the mount) before the file system goes.
    let mut broker = Broker::outpost_with_state_dir("", fs.path());
    let port = broker.port();

    let (mut v5, _) = RawClient::connect(port, connect_packet(Protocol::V5, "full-5", true)).await;
    let payload = vec![0x5Au8; 256 << 10];
    let mut acked = BTreeSet::new();
    let mut refused = None;
    for i in 0..60u16 {
        let topic = format!("full/{i}");
        v5.send(&retained(&topic, i + 1, &payload)).await;
        let reason = puback_reason(&mut v5).await;
        if reason.is_error() {
            refused = Some((topic, reason));
            break;
        }
        acked.insert(topic);
    }
    let (first_refused, reason) = refused.expect("10 MiB of room never filled with 15 MiB");
    assert_eq!(
        reason,
        ReasonCode::QUOTA_EXCEEDED,
        "5.0: 0x97 Quota exceeded"
    );
    assert!(
        acked.len() >= 4,
        "only {} kept before the disk filled",
        acked.len()
    );

    // While the store cannot write, more retained messages are refused at once...
    v5.send(&retained("full/more", 100, b"x")).await;
    assert_eq!(puback_reason(&mut v5).await, ReasonCode::QUOTA_EXCEEDED);
    // ...a 3.x publisher, which cannot be told, is not acknowledged...
    let (mut v4, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "full-4", true)).await;
    v4.send(&retained("full/v4", 1, b"y")).await;
    assert!(
        v4.recv(Duration::from_secs(1)).await.is_err(),
        "no PUBACK for a 3.x message the store cannot keep"
    );
    // ...and what needs no disk is served as before.
    v5.send(&Packet::Publish(publish(
        "live/x",
        QoS::AtLeastOnce,
        Some(101),
        b"z",
    )))
    .await;
    assert!(
        !puback_reason(&mut v5).await.is_error(),
        "plain traffic flows"
    );

    // Nothing acknowledged is lost by a crash on the full disk.
    broker.kill9();
    broker.restart();
    let port = broker.port();
    let (mut sub, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "full-sub", true)).await;
    sub.subscribe(
        1,
        "full/#",
        sub_opts(QoS::AtMostOnce),
        Properties::default(),
    )
    .await;
    let mut restored = BTreeSet::new();
    while let Ok(Packet::Publish(p)) = sub.recv(Duration::from_millis(800)).await {
        assert_eq!(p.payload.len(), payload.len(), "{} whole", p.topic);
        restored.insert(p.topic.to_string());
    }
    let lost: Vec<_> = acked.difference(&restored).collect();
    assert!(lost.is_empty(), "acknowledged, then lost: {lost:?}");
    assert!(
        !restored.contains("full/more") && !restored.contains("full/v4"),
        "refused messages are not kept: {restored:?}"
    );
    eprintln!(
        "kept {} before the disk filled; first refused: {first_refused}",
        acked.len()
    );

    // Space comes back: the broker accepts again by itself, without a restart.
    std::fs::remove_file(&filler).expect("remove filler");
    let (mut v5, _) = RawClient::connect(port, connect_packet(Protocol::V5, "full-5b", true)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut id = 200;
    loop {
        id += 1;
        v5.send(&retained("full/after", id, b"back")).await;
        if !puback_reason(&mut v5).await.is_error() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refusing 15 s after space returned"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    broker.kill9();
}
