use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;

use super::*;

fn msg(i: usize, payload_len: usize) -> NewMessage {
    NewMessage {
        topic: format!("t/{i}"),
        payload: Bytes::from(vec![b'x'; payload_len]),
        qos: QoS::AtLeastOnce,
        retain: false,
        props: None,
        accepted_ms: 1_000 + i as i64,
    }
}

fn open(dir: &Path, max_bytes: u64, when_full: WhenFull) -> (Spool, SpoolThread, Arc<BridgeStats>) {
    open_windowed(dir, max_bytes, when_full, std::time::Duration::ZERO)
}

fn open_windowed(
    dir: &Path,
    max_bytes: u64,
    when_full: WhenFull,
    commit_window: std::time::Duration,
) -> (Spool, SpoolThread, Arc<BridgeStats>) {
    let stats = Arc::new(BridgeStats::default());
    let (spool, thread) = Spool::open(
        SpoolOptions {
            path: dir.join("spool.sqlite"),
            max_bytes,
            when_full,
            commit_window,
        },
        stats.clone(),
    )
    .expect("open spool");
    (spool, thread, stats)
}

fn close(spool: Spool, thread: SpoolThread) {
    drop(spool);
    thread.join();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Appends `n` messages one every `every`, each without waiting for the last one's commit
/// (as a sensor stream does), and returns the spool's commits for them.
fn paced_commits(window: std::time::Duration, n: usize, every: std::time::Duration) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (spool, thread, stats) =
            open_windowed(dir.path(), 1 << 30, WhenFull::RejectNew, window);
        let mut tick = tokio::time::interval(every);
        let mut rxs = Vec::new();
        for i in 0..n {
            tick.tick().await;
            rxs.push(spool.append(msg(i, 64)));
        }
        for rx in rxs {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(stats.spooled.load(Relaxed), n as u64);
        assert_eq!(stats.spool_messages.load(Relaxed), n as u64);
        let commits = stats.spool_commits.load(Relaxed);
        close(spool, thread);
        commits
    })
}

#[test]
fn a_steady_stream_shares_commits_within_the_commit_window() {
    // 150 messages at 200/s: with no window each is committed alone (a page written per
    // message); with 100 ms a probe finds the stream and then about 20 share a commit.
    let ms = std::time::Duration::from_millis;
    let alone = paced_commits(std::time::Duration::ZERO, 150, ms(5));
    let shared = paced_commits(ms(100), 150, ms(5));
    eprintln!("commits for 150 messages: {alone} without a window, {shared} with 100 ms");
    assert!(alone >= 100, "{alone} commits without a window");
    assert!(shared <= 30, "{shared} commits with a 100 ms window");
}

#[test]
fn commits_in_order_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (spool, thread, stats) = open(dir.path(), 1 << 30, WhenFull::DropOldest);
        let rxs: Vec<_> = (0..1000).map(|i| spool.append(msg(i, 64))).collect();
        for rx in rxs {
            rx.await.unwrap().unwrap();
        }
        assert_eq!(stats.spool_messages.load(Relaxed), 1000);
        let rows = spool.fetch(0, 10_000).await.unwrap();
        let topics: Vec<_> = rows.iter().map(|r| r.topic.clone()).collect();
        let expected: Vec<_> = (0..1000).map(|i| format!("t/{i}")).collect();
        assert_eq!(topics, expected);
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(stats.oldest_accepted_ms.load(Relaxed), 1000);
        // Acknowledge the first ten, then reopen as after a crash.
        for r in &rows[..10] {
            spool.delete(r.id);
        }
        spool.flush().await.unwrap();
        close(spool, thread);
    });
    rt().block_on(async {
        let (spool, thread, stats) = open(dir.path(), 1 << 30, WhenFull::DropOldest);
        assert_eq!(stats.spool_messages.load(Relaxed), 990);
        let topic_bytes = 90 * 4 + 900 * 5;
        assert_eq!(
            stats.spool_bytes.load(Relaxed),
            topic_bytes + 990 * (64 + ROW_OVERHEAD)
        );
        let rows = spool.fetch(0, 5).await.unwrap();
        assert_eq!(rows[0].topic, "t/10");
        assert_eq!(rows[0].payload.len(), 64);
        close(spool, thread);
    });
}

#[test]
fn reject_new_refuses_past_the_byte_bound() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let one = msg(0, 1000).accounted_size();
        let (spool, thread, stats) = open(dir.path(), one * 5, WhenFull::RejectNew);
        let mut results = Vec::new();
        for i in 0..8 {
            results.push(spool.append(msg(i, 1000)).await.unwrap());
        }
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 5);
        for r in &results[5..] {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.reason, RejectReason::SpoolFull);
            assert_eq!(e.reason_code(), outpost_mqtt::ReasonCode::QUOTA_EXCEEDED);
        }
        assert_eq!(stats.rejected_full.load(Relaxed), 3);
        // The accepted five are intact and first in line.
        let rows = spool.fetch(0, 100).await.unwrap();
        let topics: Vec<_> = rows.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, ["t/0", "t/1", "t/2", "t/3", "t/4"]);
        // Room frees up after an ack.
        spool.delete(rows[0].id);
        assert!(spool.append(msg(9, 1000)).await.unwrap().is_ok());
        close(spool, thread);
    });
}

#[test]
fn drop_oldest_keeps_newest_and_spares_qos2_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let one = msg(0, 1000).accounted_size();
        let (spool, thread, stats) = open(dir.path(), one * 4, WhenFull::DropOldest);
        for i in 0..4 {
            spool.append(msg(i, 1000)).await.unwrap().unwrap();
        }
        let first = spool.fetch(0, 1).await.unwrap()[0].id;
        spool
            .set_stages(vec![StageUpdate {
                id: first,
                packet_id: 7,
                stage: Stage::Released,
            }])
            .await
            .unwrap();
        for i in 4..7 {
            spool.append(msg(i, 1000)).await.unwrap().unwrap();
        }
        let rows = spool.fetch(0, 100).await.unwrap();
        let topics: Vec<_> = rows.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["t/0", "t/4", "t/5", "t/6"],
            "t/0 has a QoS 2 exchange in progress"
        );
        assert_eq!(rows[0].packet_id, Some(7));
        assert_eq!(rows[0].stage, Stage::Released);
        assert_eq!(stats.dropped_spool_full.load(Relaxed), 3);
        assert!(stats.spool_bytes.load(Relaxed) <= one * 4);
        let in_progress = spool.in_progress().await.unwrap();
        assert_eq!(in_progress.len(), 1);
        // A message bigger than the whole bound is refused, not allowed to wipe the spool.
        let huge = spool.append(msg(99, 10 * 1000)).await.unwrap();
        assert_eq!(huge.unwrap_err().reason, RejectReason::SpoolFull);
        assert_eq!(spool.fetch(0, 100).await.unwrap().len(), 4);
        close(spool, thread);
    });
}

#[test]
fn properties_round_trip_through_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (spool, thread, _) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        let props = outpost_mqtt::Properties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let mut m = msg(0, 3);
        m.props = encode_properties(&props);
        m.qos = QoS::ExactlyOnce;
        m.retain = true;
        spool.append(m).await.unwrap().unwrap();
        let row = &spool.fetch(0, 1).await.unwrap()[0];
        assert_eq!(row.properties, props);
        assert_eq!(
            (row.qos, row.retain, row.stage),
            (QoS::ExactlyOnce, true, Stage::New)
        );
        close(spool, thread);
    });
}

#[test]
fn corrupt_file_is_set_aside_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.sqlite");
    let garbage = b"this is not an sqlite database, it is a damaged spool file....".repeat(200);
    std::fs::write(&path, &garbage).unwrap();
    rt().block_on(async {
        let (spool, thread, stats) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        assert_eq!(stats.quarantined.load(Relaxed), 1);
        spool.append(msg(0, 8)).await.unwrap().unwrap();
        close(spool, thread);
    });
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.sqlite.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "exactly one quarantined file");
    assert_eq!(
        std::fs::read(aside[0].path()).unwrap(),
        garbage,
        "kept byte for byte"
    );
}

#[test]
fn full_disk_refuses_with_a_reason_keeps_committed_rows_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let stats = Arc::new(BridgeStats::default());
        // SQLITE_FULL from a page cap is the same error path as a full file system.
        let (spool, thread) = Spool::open_with(
            SpoolOptions {
                path: dir.path().join("spool.sqlite"),
                max_bytes: 1 << 30,
                when_full: WhenFull::RejectNew,
                commit_window: std::time::Duration::ZERO,
            },
            stats.clone(),
            &|c| c.query_row("PRAGMA max_page_count = 160", [], |_| Ok(())),
            None,
        )
        .expect("open spool");
        let mut accepted = 0;
        let mut refusal = None;
        for i in 0..2000 {
            match spool.append(msg(i, 1000)).await.unwrap() {
                Ok(()) => accepted += 1,
                Err(e) => {
                    refusal = Some(e);
                    break;
                }
            }
        }
        let refusal = refusal.expect("the capped file fills up");
        match &refusal.reason {
            RejectReason::Storage(text) => assert!(text.contains("full"), "{text}"),
            other => panic!("expected a storage refusal, got {other:?}"),
        }
        assert_eq!(
            refusal.reason_code(),
            outpost_mqtt::ReasonCode::UNSPECIFIED_ERROR
        );
        assert!(
            accepted > 10,
            "some messages fit before the disk filled: {accepted}"
        );
        assert_eq!(stats.rejected_storage.load(Relaxed), 1);
        // Everything acknowledged before the failure is still there, in order.
        let rows = spool.fetch(0, 10_000).await.unwrap();
        assert_eq!(rows.len(), accepted);
        assert_eq!(stats.spool_messages.load(Relaxed), accepted as u64);
        // Once the cloud takes some messages, the spool accepts again.
        for r in &rows[..accepted / 2] {
            spool.delete(r.id);
        }
        spool.flush().await.unwrap();
        spool
            .append(msg(5000, 1000))
            .await
            .unwrap()
            .expect("room again after deletes");
        close(spool, thread);
    });
}

async fn append_all(spool: &Spool, range: std::ops::Range<usize>, len: usize) -> Vec<i64> {
    for i in range.clone() {
        spool.append(msg(i, len)).await.unwrap().unwrap();
    }
    let rows = spool.fetch(0, 100_000).await.unwrap();
    let wanted: Vec<String> = range.map(|i| format!("t/{i}")).collect();
    rows.iter()
        .filter(|r| wanted.contains(&r.topic))
        .map(|r| r.id)
        .collect()
}

fn topics(rows: &[StoredMessage]) -> Vec<&str> {
    rows.iter().map(|r| r.topic.as_str()).collect()
}

#[test]
fn row_ids_are_never_reused_after_the_spool_drained_empty() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (spool, thread, _) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        let first = append_all(&spool, 0..3, 8).await;
        spool.delete_many(first.clone());
        spool.flush().await.unwrap();
        assert!(spool.fetch(0, 10).await.unwrap().is_empty());
        let next = append_all(&spool, 3..4, 8).await;
        assert!(
            next[0] > first[2],
            "an uplink that read up to {} must still see the new row ({})",
            first[2],
            next[0]
        );
        assert!(*spool.committed().borrow() >= next[0]);
        close(spool, thread);
    });
}

#[test]
fn strikes_count_consecutive_losses_survive_reopen_and_set_the_row_aside() {
    let dir = tempfile::tempdir().unwrap();
    let ids = rt().block_on(async {
        let (spool, thread, _) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        let ids = append_all(&spool, 0..3, 100).await;
        assert_eq!(
            spool.strike(Some(ids[1]), 9, 3).await.unwrap(),
            StrikeOutcome::Counted {
                row: ids[1],
                strikes: 1
            }
        );
        close(spool, thread);
        ids
    });
    rt().block_on(async {
        // A restart (crash loop) in between still counts.
        let (spool, thread, stats) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        assert_eq!(
            spool.strike(Some(ids[1]), 9, 3).await.unwrap(),
            StrikeOutcome::Counted {
                row: ids[1],
                strikes: 2
            }
        );
        // A loss blamed on another row breaks the chain.
        assert_eq!(
            spool.strike(Some(ids[0]), 9, 3).await.unwrap(),
            StrikeOutcome::Counted {
                row: ids[0],
                strikes: 1
            }
        );
        // So does a loss with nothing in flight.
        assert_eq!(
            spool.strike(Some(ids[1]), 9, 3).await.unwrap(),
            StrikeOutcome::Counted {
                row: ids[1],
                strikes: 1
            }
        );
        assert_eq!(
            spool.strike(None, 9, 3).await.unwrap(),
            StrikeOutcome::Cleared
        );
        for n in 1..3 {
            assert_eq!(
                spool.strike(Some(ids[1]), 9, 3).await.unwrap(),
                StrikeOutcome::Counted {
                    row: ids[1],
                    strikes: n
                }
            );
        }
        let bytes_before = stats.spool_bytes.load(Relaxed);
        let size = msg(1, 100).accounted_size();
        assert_eq!(
            spool.strike(Some(ids[1]), 9, 3).await.unwrap(),
            StrikeOutcome::DeadLettered {
                row: ids[1],
                topic: "t/1".into(),
                size,
                strikes: 3
            }
        );
        assert_eq!(topics(&spool.fetch(0, 10).await.unwrap()), ["t/0", "t/2"]);
        assert_eq!(stats.spool_messages.load(Relaxed), 2);
        assert_eq!(stats.spool_bytes.load(Relaxed), bytes_before - size);
        assert_eq!(stats.dropped_poison.load(Relaxed), 1);
        assert_eq!(stats.dead_letters.load(Relaxed), 1);
        let dead = spool.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (
                dead[0].row_id,
                dead[0].topic.as_str(),
                dead[0].reason.as_str()
            ),
            (ids[1], "t/1", "poison")
        );
        assert_eq!((dead[0].payload.len(), dead[0].strikes), (100, 3));
        // A row acknowledged meanwhile is not blamed.
        spool.delete(ids[0]);
        assert_eq!(
            spool.strike(Some(ids[0]), 9, 3).await.unwrap(),
            StrikeOutcome::Gone
        );
        close(spool, thread);
    });
    rt().block_on(async {
        let (spool, thread, stats) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        assert_eq!(
            stats.dead_letters.load(Relaxed),
            1,
            "dead letters are kept and reported after a restart"
        );
        // New rows never take the id of a dead letter.
        let next = append_all(&spool, 9..10, 8).await;
        assert!(next[0] > ids[2]);
        close(spool, thread);
    });
}

#[test]
fn unreleased_incoming_qos2_ids_survive_reopen_per_bridge() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (spool, thread, _) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        spool
            .apply_incoming(
                "a",
                vec![IncomingOp::Add(5), IncomingOp::Add(7), IncomingOp::Add(9)],
            )
            .await
            .unwrap();
        spool
            .apply_incoming("b", vec![IncomingOp::Add(5)])
            .await
            .unwrap();
        spool
            .apply_incoming("a", vec![IncomingOp::Remove(7), IncomingOp::Add(9)])
            .await
            .unwrap();
        close(spool, thread);
    });
    rt().block_on(async {
        let (spool, thread, _) = open(dir.path(), 1 << 20, WhenFull::DropOldest);
        assert_eq!(spool.incoming("a").await.unwrap(), [5, 9]);
        assert_eq!(spool.incoming("b").await.unwrap(), [5]);
        spool.clear_incoming("a").await.unwrap();
        assert!(spool.incoming("a").await.unwrap().is_empty());
        assert_eq!(spool.incoming("b").await.unwrap(), [5]);
        close(spool, thread);
    });
}

#[test]
fn drop_oldest_spares_rows_taken_for_sending_and_fences_off_the_dropped() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let one = msg(0, 1000).accounted_size();
        let (spool, thread, stats) = open(dir.path(), one * 4, WhenFull::DropOldest);
        let ids = append_all(&spool, 0..4, 1000).await;
        // The uplink has t/0 and t/1 in its window.
        {
            let mut marks = spool.fence().lock();
            marks.take(ids[0]);
            marks.take(ids[1]);
        }
        let new = append_all(&spool, 4..6, 1000).await;
        assert_eq!(
            topics(&spool.fetch(0, 100).await.unwrap()),
            ["t/0", "t/1", "t/4", "t/5"],
            "rows in flight are spared, the oldest others dropped"
        );
        assert_eq!(stats.dropped_spool_full.load(Relaxed), 2);
        {
            let marks = spool.fence().lock();
            // The uplink read t/2 and t/3 before they were dropped: it must skip them.
            assert!(marks.claimed(ids[2], Stage::New) && marks.claimed(ids[3], Stage::New));
            assert!(!marks.claimed(ids[1], Stage::New) && !marks.claimed(new[0], Stage::New));
        }
        // Everything left is in flight: the bound holds, the new message is refused.
        {
            let mut marks = spool.fence().lock();
            marks.take(new[0]);
            marks.take(new[1]);
        }
        let refused = spool.append(msg(6, 1000)).await.unwrap();
        assert_eq!(refused.unwrap_err().reason, RejectReason::SpoolFull);
        assert_eq!(stats.rejected_full.load(Relaxed), 1);
        assert!(stats.spool_bytes.load(Relaxed) <= one * 4);
        // The session ends: its rows may be dropped again, oldest first.
        spool.untake_all();
        append_all(&spool, 7..8, 1000).await;
        assert_eq!(
            topics(&spool.fetch(0, 100).await.unwrap()),
            ["t/1", "t/4", "t/5", "t/7"]
        );
        assert_eq!(stats.dropped_spool_full.load(Relaxed), 3);
        close(spool, thread);
    });
}

/// A disk of `capacity` pages, the page cap of the writer's connection: `SQLITE_FULL` when
/// it is used up, as on a full file system. The reserve holds `pages` of it back, as the
/// reserve file does, and is held only with half as much again (20 pages at least) free
/// beside it.
struct PageReserve {
    capacity: Arc<std::sync::atomic::AtomicI64>,
    pages: i64,
}

impl PageReserve {
    fn cap(conn: &rusqlite::Connection, pages: i64) {
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .unwrap();
    }
}

impl reserve::Reserve for PageReserve {
    fn hold(&mut self, conn: &rusqlite::Connection) -> std::io::Result<()> {
        let capacity = self.capacity.load(Relaxed);
        let used: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        if used + self.pages + (self.pages / 2).max(20) >= capacity {
            // What someone else freed meanwhile is usable even without the reserve.
            Self::cap(conn, capacity);
            return Err(std::io::ErrorKind::StorageFull.into());
        }
        Self::cap(conn, capacity - self.pages);
        Ok(())
    }

    fn release(&mut self, conn: &rusqlite::Connection) -> std::io::Result<()> {
        Self::cap(conn, self.capacity.load(Relaxed));
        Ok(())
    }

    fn size(&self) -> u64 {
        self.pages as u64 * u64::from(outpost_sqlite::PAGE_SIZE)
    }

    fn describe(&self) -> String {
        format!("{} pages", self.pages)
    }
}

/// Every row deleted briefly needs 16 pages of its own (more than a failed group of appends
/// leaves free, less than the reserve), as every write in WAL mode needs room
/// in the `-wal` file: on a full disk a delete fails with `SQLITE_FULL` too.
fn deletes_need_space(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS ballast (b BLOB);
         CREATE TEMP TRIGGER deletes_need_space AFTER DELETE ON main.messages BEGIN
             INSERT INTO ballast VALUES (zeroblob(65536));
             DELETE FROM ballast;
         END;",
    )
}

/// A spool on a disk of `capacity` pages with a reserve of `reserve` pages.
fn open_on_small_disk(
    dir: &Path,
    capacity: i64,
    reserve: i64,
) -> (
    Spool,
    SpoolThread,
    Arc<BridgeStats>,
    Arc<std::sync::atomic::AtomicI64>,
) {
    let stats = Arc::new(BridgeStats::default());
    let capacity = Arc::new(std::sync::atomic::AtomicI64::new(capacity));
    let (spool, thread) = Spool::open_with(
        SpoolOptions {
            path: dir.join("spool.sqlite"),
            max_bytes: 1 << 30,
            when_full: WhenFull::RejectNew,
            commit_window: std::time::Duration::ZERO,
        },
        stats.clone(),
        &deletes_need_space,
        Some(Box::new(PageReserve {
            capacity: capacity.clone(),
            pages: reserve,
        })),
    )
    .expect("open spool");
    (spool, thread, stats, capacity)
}

/// Append 1000-byte messages, 20 at a time, until the disk is full; the ids accepted and
/// the first refusal.
async fn fill_disk(spool: &Spool) -> (Vec<i64>, Rejected) {
    let mut i = 0;
    loop {
        let rxs: Vec<_> = (i..i + 20).map(|n| spool.append(msg(n, 1000))).collect();
        i += 20;
        let mut refusal = None;
        for rx in rxs {
            if let Err(e) = rx.await.unwrap() {
                refusal.get_or_insert(e);
            }
        }
        if let Some(refusal) = refusal {
            let ids = spool.fetch(0, 100_000).await.unwrap();
            return (ids.iter().map(|r| r.id).collect(), refusal);
        }
        assert!(i < 100_000, "the disk never filled");
    }
}

fn storage_text(e: &Rejected) -> &str {
    match &e.reason {
        RejectReason::Storage(text) => text,
        other => panic!("expected a storage refusal, got {other:?}"),
    }
}

#[test]
fn a_full_disk_releases_the_reserve_so_acked_rows_are_deleted_and_the_spool_accepts_again() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (spool, thread, stats, _) = open_on_small_disk(dir.path(), 800, 160);
        let (ids, refusal) = fill_disk(&spool).await;
        assert!(storage_text(&refusal).contains("full"), "{refusal:?}");
        assert!(ids.len() > 50, "{} messages fit", ids.len());
        // Full: new messages are refused with a reason, without trying the disk.
        let refused = spool.append(msg(90_000, 10)).await.unwrap().unwrap_err();
        assert!(storage_text(&refused).contains("full"), "{refused:?}");
        assert_eq!(
            refused.reason_code(),
            outpost_mqtt::ReasonCode::UNSPECIFIED_ERROR
        );
        // The cloud comes back and acknowledges everything: the deletes need room, which
        // the released reserve gives.
        spool.delete_many(ids.clone());
        spool.flush().await.unwrap();
        assert_eq!(stats.spool_messages.load(Relaxed), 0, "acked rows deleted");
        assert!(spool.fetch(0, 100_000).await.unwrap().is_empty());
        // Drained: the reserve is held again and the spool accepts by itself.
        spool
            .append(msg(90_001, 1000))
            .await
            .unwrap()
            .expect("accepts again once drained");
        assert_eq!(topics(&spool.fetch(0, 10).await.unwrap()), ["t/90001"]);
        // And it keeps working: it can fill up again and recover again.
        let (again, _) = fill_disk(&spool).await;
        assert!(
            again.len() > 50,
            "{} messages fit the second time",
            again.len()
        );
        spool.delete_many(again);
        spool.flush().await.unwrap();
        assert_eq!(stats.spool_messages.load(Relaxed), 0);
        spool.append(msg(90_002, 1000)).await.unwrap().unwrap();
        close(spool, thread);
    });
}

#[test]
fn failed_deletes_are_kept_not_resent_and_retried_once_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        // No room for any reserve: nothing can be released when the disk fills.
        let (spool, thread, stats, capacity) = open_on_small_disk(dir.path(), 480, 0);
        let (ids, _) = fill_disk(&spool).await;
        let total = ids.len();
        let (acked, rest) = ids.split_at(total / 2);
        spool.delete_many(acked.to_vec());
        spool.flush().await.unwrap();
        // The delete failed for lack of space: the rows are still in the file...
        assert_eq!(stats.spool_messages.load(Relaxed), total as u64);
        // ...but a new uplink session does not read them again.
        let left = fetched_ids(&spool, 100_000).await;
        assert_eq!(left, rest, "acknowledged rows are not sent again");
        // A short page still reads past the skipped rows.
        let first = fetched_ids(&spool, 3).await;
        assert_eq!(first, rest[..3]);
        // Someone frees space: the kept deletes go through without being sent again.
        capacity.fetch_add(240, Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while stats.spool_messages.load(Relaxed) != rest.len() as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "the failed deletes were never retried: {} rows",
                stats.spool_messages.load(Relaxed)
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let left = fetched_ids(&spool, 100_000).await;
        assert_eq!(left, rest);
        spool.append(msg(90_000, 100)).await.unwrap().unwrap();
        close(spool, thread);
    });
    // They stay deleted after a restart.
    rt().block_on(async {
        let (spool, thread, stats) = open(dir.path(), 1 << 30, WhenFull::RejectNew);
        let rows = spool.fetch(0, 100_000).await.unwrap();
        assert_eq!(stats.spool_messages.load(Relaxed), rows.len() as u64);
        assert_eq!(rows.last().unwrap().topic, "t/90000");
        close(spool, thread);
    });
}

#[test]
fn the_reserve_file_is_made_beside_the_spool_and_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let reserve = dir.path().join("spool.sqlite.reserve");
    rt().block_on(async {
        let (spool, thread, _) = open(dir.path(), 1 << 20, WhenFull::RejectNew);
        close(spool, thread);
    });
    let meta = std::fs::metadata(&reserve).expect("reserve file");
    assert_eq!(meta.len(), reserve::RESERVE_BYTES);
    let modified = meta.modified().unwrap();
    rt().block_on(async {
        let (spool, thread, _) = open(dir.path(), 1 << 20, WhenFull::RejectNew);
        close(spool, thread);
    });
    let again = std::fs::metadata(&reserve).unwrap();
    assert_eq!(
        (again.len(), again.modified().unwrap()),
        (reserve::RESERVE_BYTES, modified),
        "not rewritten at every start"
    );
}

/// Ids of the first `limit` rows an uplink session would read.
async fn fetched_ids(spool: &Spool, limit: usize) -> Vec<i64> {
    spool
        .fetch(0, limit)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}
