use std::sync::Arc;

use bytes::Bytes;
use outpost_mqtt::{Properties, Protocol, QoS, SubscriptionOptions};

use super::Store;
use crate::message::Delivery;
use crate::message::Message;

fn msg(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Arc<Message> {
    let props = Properties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".to_owned(), "v".to_owned())],
        ..Default::default()
    };
    Message::new(
        topic.into(),
        Bytes::copy_from_slice(payload),
        qos,
        retain,
        props,
        None,
    )
}

fn delivery(m: &Arc<Message>, qos: QoS, sub_ids: Vec<u32>) -> Delivery {
    Delivery {
        msg: m.clone(),
        qos,
        retain: false,
        sub_ids,
    }
}

#[tokio::test]
async fn what_was_committed_comes_back_in_order_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    {
        let (mut store, loaded) = Store::open(&path, 0).unwrap();
        assert!(loaded.sessions.is_empty() && loaded.retained.is_empty());
        let sid = store.new_session_id();
        store.put_session(sid, "c1", Protocol::V5, 600);
        let opts = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            ..Default::default()
        };
        store.put_sub(sid, "a/#", opts, Some(7));
        store.put_sub(sid, "$share/g/b/+", SubscriptionOptions::default(), None);
        store.put_sub(sid, "gone", SubscriptionOptions::default(), None);
        store.drop_sub(sid, "gone");

        let m1 = msg("a/1", b"one", QoS::AtLeastOnce, false);
        let m2 = msg("a/2", b"two", QoS::ExactlyOnce, false);
        let m3 = msg("a/3", b"three", QoS::AtLeastOnce, false);
        let (d1, d2, d3) = (
            store.new_delivery_id(),
            store.new_delivery_id(),
            store.new_delivery_id(),
        );
        store.put_delivery(d1, sid, &delivery(&m1, QoS::AtLeastOnce, vec![7]), Some(11));
        store.put_delivery(d2, sid, &delivery(&m2, QoS::ExactlyOnce, vec![]), None);
        store.set_packet_id(d2, 12);
        store.released(d2);
        store.put_delivery(d3, sid, &delivery(&m3, QoS::AtLeastOnce, vec![]), None);
        store.put_qos2(sid, 99);
        store.put_qos2(sid, 98);
        store.drop_qos2(sid, 98);
        store.retain(&msg("r/1", b"kept", QoS::AtLeastOnce, true));
        store.retain(&msg("r/2", b"cleared", QoS::AtMostOnce, true));
        store.retain(&msg("r/2", b"", QoS::AtMostOnce, true));
        store.receipt().await.unwrap();
    }

    let (mut store, loaded) = Store::open(&path, 0).unwrap();
    assert_eq!(loaded.retained.len(), 1);
    assert_eq!(&*loaded.retained[0].topic, "r/1");
    assert_eq!(&loaded.retained[0].payload[..], b"kept");
    assert_eq!(
        loaded.retained[0].properties.content_type.as_deref(),
        Some("text/plain")
    );
    assert_eq!(loaded.sessions.len(), 1);
    let s = &loaded.sessions[0];
    assert_eq!(
        (s.client_id.as_str(), s.protocol, s.expiry),
        ("c1", Protocol::V5, 600)
    );
    let mut subs: Vec<_> = s
        .subs
        .iter()
        .map(|(f, o, id)| (f.as_str(), o.qos, o.no_local, *id))
        .collect();
    subs.sort_by_key(|s| s.0);
    assert_eq!(
        subs,
        vec![
            ("$share/g/b/+", QoS::AtMostOnce, false, None),
            ("a/#", QoS::ExactlyOnce, true, Some(7)),
        ]
    );
    let owed: Vec<_> = s
        .deliveries
        .iter()
        .map(|(_, pid, rel, d)| (&d.msg.payload[..], d.qos, *pid, *rel, d.sub_ids.clone()))
        .collect();
    assert_eq!(
        owed,
        vec![
            (&b"one"[..], QoS::AtLeastOnce, Some(11), false, vec![7]),
            (&b"two"[..], QoS::ExactlyOnce, Some(12), true, vec![]),
            (&b"three"[..], QoS::AtLeastOnce, None, false, vec![]),
        ]
    );
    assert_eq!(s.deliveries[0].3.msg.properties.user_properties.len(), 1);
    assert_eq!(s.incoming_qos2, vec![99]);
    // New ids continue above what the file holds.
    assert!(store.new_delivery_id().get() > s.deliveries[2].0);
    assert!(store.new_session_id().get() > s.id);
}

#[tokio::test]
async fn a_delivery_acknowledged_within_one_batch_and_a_dropped_session_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    {
        let (mut store, _) = Store::open(&path, 0).unwrap();
        let keep = store.new_session_id();
        let gone = store.new_session_id();
        store.put_session(keep, "keep", Protocol::V3_1_1, u32::MAX);
        store.put_session(gone, "gone", Protocol::V3_1_1, 60);
        let m = msg("t", b"x", QoS::AtLeastOnce, false);
        let d = store.new_delivery_id();
        store.put_delivery(d, keep, &delivery(&m, QoS::AtLeastOnce, vec![]), Some(1));
        store.drop_delivery(d);
        let e = store.new_delivery_id();
        store.put_delivery(e, gone, &delivery(&m, QoS::AtLeastOnce, vec![]), None);
        store.put_sub(gone, "t", SubscriptionOptions::default(), None);
        store.drop_session(gone);
        store.receipt().await.unwrap();
    }
    let (_, loaded) = Store::open(&path, 0).unwrap();
    assert_eq!(loaded.sessions.len(), 1);
    assert_eq!(loaded.sessions[0].client_id, "keep");
    assert_eq!(loaded.sessions[0].expiry, u32::MAX);
    assert!(loaded.sessions[0].deliveries.is_empty());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM deliveries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        rows, 0,
        "nothing of the dropped session or the acknowledged message"
    );
}

#[tokio::test]
async fn a_row_that_does_not_decode_costs_that_row_not_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    {
        let (store, _) = Store::open(&path, 0).unwrap();
        store.retain(&msg("ok", b"fine", QoS::AtMostOnce, true));
        store.receipt().await.unwrap();
    }
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO retained (topic, publish) VALUES ('bad', x'30ff')",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO retained (topic, publish, expires_ms) VALUES ('old', x'3003000178', 1)",
            [],
        )
        .unwrap();
    }
    let (_, loaded) = Store::open(&path, 0).unwrap();
    let topics: Vec<&str> = loaded.retained.iter().map(|m| &*m.topic).collect();
    assert_eq!(
        topics,
        vec!["ok"],
        "the malformed and the expired rows are skipped"
    );
}

#[tokio::test]
async fn the_file_is_made_only_once_there_is_something_to_keep() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    {
        let (store, loaded) = Store::open(&path, 0).unwrap();
        assert!(loaded.sessions.is_empty() && loaded.retained.is_empty());
        store.receipt().await.unwrap();
        assert!(!path.exists(), "nothing kept, no file");
        store.retain(&msg("r", b"v", QoS::AtLeastOnce, true));
        store.receipt().await.unwrap();
        assert!(path.exists(), "the first change makes the file");
    }
    let (_, loaded) = Store::open(&path, 0).unwrap();
    assert_eq!(loaded.retained.len(), 1);
}

#[tokio::test]
async fn a_message_whose_bytes_changed_on_disk_sets_the_file_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    {
        let (store, _) = Store::open(&path, 0).unwrap();
        store.retain(&msg("r/1", b"original", QoS::AtLeastOnce, true));
        store.receipt().await.unwrap();
    }
    {
        // A failing card hands back other bytes without an error: same length, one
        // byte different, which SQLite's own page checks cannot see.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let blob: Vec<u8> = conn
            .query_row("SELECT publish FROM retained", [], |r| r.get(0))
            .unwrap();
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        conn.execute("UPDATE retained SET publish = ?1", [bad])
            .unwrap();
    }
    let (_store, loaded) = Store::open(&path, 0).unwrap();
    assert!(
        loaded.retained.is_empty(),
        "the damaged file's contents are not served"
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert!(
        !aside.is_empty(),
        "the damaged file is kept aside, not deleted"
    );
}

#[tokio::test]
async fn rows_from_before_checksums_still_load_and_the_file_gains_the_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    {
        let (store, _) = Store::open(&path, 0).unwrap();
        store.retain(&msg("r/old", b"kept", QoS::AtLeastOnce, true));
        store.receipt().await.unwrap();
    }
    {
        // As an earlier version wrote it: no checksum column at all.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "ALTER TABLE retained DROP COLUMN crc; ALTER TABLE deliveries DROP COLUMN crc;",
        )
        .unwrap();
    }
    let (_store, loaded) = Store::open(&path, 0).unwrap();
    assert_eq!(loaded.retained.len(), 1);
    assert_eq!(&loaded.retained[0].payload[..], b"kept");
}

#[tokio::test]
async fn an_empty_file_starts_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    std::fs::write(&path, b"").unwrap();
    let (store, loaded) = Store::open(&path, 0).unwrap();
    assert!(loaded.retained.is_empty() && loaded.sessions.is_empty());
    store.retain(&msg("r/1", b"x", QoS::AtLeastOnce, true));
    store.receipt().await.unwrap();
}

#[tokio::test]
async fn a_message_owed_to_many_sessions_is_kept_once_and_goes_with_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite");
    let big = msg("fw/image", &vec![7u8; 1 << 20], QoS::ExactlyOnce, true);
    let mut rows = Vec::new();
    {
        let (mut store, _) = Store::open(&path, 0).unwrap();
        for i in 0..40 {
            let sid = store.new_session_id();
            store.put_session(sid, &format!("s{i}"), Protocol::V5, 600);
            let id = store.new_delivery_id();
            // Each session gets the QoS its subscription allows.
            let qos = if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            store.put_delivery(id, sid, &delivery(&big, qos, vec![]), None);
            rows.push((id, qos));
        }
        store.receipt().await.unwrap();
    }
    let on_disk: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum();
    assert!(on_disk < 4 << 20, "40 copies of 1 MiB take {on_disk} bytes");
    let (store, loaded) = Store::open(&path, 0).unwrap();
    let owed: Vec<_> = loaded.sessions.iter().flat_map(|s| &s.deliveries).collect();
    assert_eq!(owed.len(), 40);
    for (id, _, _, d) in &owed {
        let want = rows.iter().find(|(r, _)| r.get() == *id).unwrap().1;
        assert_eq!(d.qos, want, "each delivery keeps its own QoS");
        assert_eq!(d.msg.payload.len(), 1 << 20);
    }
    for (id, _) in &rows {
        store.drop_delivery(*id);
    }
    store.receipt().await.unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let left: i64 = conn
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "the shared message went with its last delivery");
}
