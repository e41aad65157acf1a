//! Spool commit rate: appends N QoS 1 messages (64-byte payloads) with up to W offers
//! waiting for their group commit (as W publishers waiting for PUBACK would), then reports
//! messages/s and bytes written to disk per message (from /proc/self/io `write_bytes`).
//!
//! `cargo run --release -p outpost-bridge --example spool_bench -- [N] [W] [DIR]`

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use outpost_bridge::config::WhenFull;
use outpost_bridge::spool::{NewMessage, Spool, SpoolOptions};
use outpost_bridge::stats::BridgeStats;

fn write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(Ok(500_000), |s| s.parse())?;
    let window: usize = args.get(2).map_or(Ok(4096), |s| s.parse())?;
    let tmp = tempfile::tempdir_in(args.get(3).map_or(".", String::as_str))?;
    let path = tmp.path().join("bench.sqlite");
    let stats = Arc::new(BridgeStats::default());
    let (spool, thread) = Spool::open(
        SpoolOptions {
            path: path.clone(),
            max_bytes: u64::MAX / 2,
            when_full: WhenFull::RejectNew,
            commit_window: outpost_sqlite::commit_window::DEFAULT_WINDOW,
        },
        stats,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let payload = Bytes::from(vec![0x5au8; 64]);
    let w0 = write_bytes();
    let start = Instant::now();
    rt.block_on(async {
        let mut waiting = VecDeque::with_capacity(window);
        for i in 0..n {
            if waiting.len() >= window
                && let Some(rx) = waiting.pop_front()
            {
                let r: Result<Result<(), _>, _> = rx.await;
                r.expect("writer alive").expect("committed");
            }
            waiting.push_back(spool.append(NewMessage {
                topic: format!("plant-7/sensors/dev{}/temp", i % 100),
                payload: payload.clone(),
                qos: outpost_mqtt::QoS::AtLeastOnce,
                retain: false,
                props: None,
                accepted_ms: i as i64,
            }));
        }
        for rx in waiting {
            rx.await.expect("writer alive").expect("committed");
        }
    });
    let elapsed = start.elapsed();
    let w1 = write_bytes();
    drop(spool);
    thread.join();
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "messages: {n}, window: {window}, elapsed: {:.3}s",
        elapsed.as_secs_f64()
    );
    println!("committed durably: {rate:.0} msgs/s");
    if let (Some(a), Some(b)) = (w0, w1) {
        let per = (b - a) as f64 / n as f64;
        let logical = 64.0 + 26.0;
        println!(
            "disk writes during commits: {} bytes, {per:.1} bytes/message (write amplification {:.1}x over ~{logical} bytes of topic+payload)",
            b - a,
            per / logical
        );
    } else {
        println!("/proc/self/io not readable: write amplification not measured");
    }
    Ok(())
}
