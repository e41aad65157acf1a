//! Runs one bridge from a `[[bridge]]` TOML table, offers N messages, then waits until the
//! spool is drained. Used by the crash tests (they `kill -9` it mid-drain) and handy by hand.
//!
//! `bridge_run CONFIG.toml STATE_DIR GATEWAY_ID N [FIRST]`: messages FIRST..FIRST+N go to
//! `sensors/q2` (every third) or `sensors/q1` with their number as payload. Prints
//! `spooled N` once every offer is committed and `drained` when the spool is empty, and
//! `local TOPIC PAYLOAD` for every downlink message delivered locally. With
//! `BRIDGE_RUN_STAY=1` it keeps running after `drained` until killed.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_bridge::{BridgeConfig, start};
use outpost_mqtt::QoS;
use tokio::sync::{mpsc, watch};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: bridge_run CONFIG.toml STATE_DIR GATEWAY_ID N [FIRST]");
        std::process::exit(64);
    }
    let config: BridgeConfig = toml::from_str(&std::fs::read_to_string(&args[1])?)?;
    let state = PathBuf::from(&args[2]);
    let n: usize = args[4].parse()?;
    let first: usize = args.get(5).map_or(Ok(0), |s| s.parse())?;
    let (local_tx, mut local_rx) = mpsc::channel::<outpost_bridge::LocalPublish>(1024);
    tokio::spawn(async move {
        while let Some(m) = local_rx.recv().await {
            if !m.topic.starts_with("$SYS/") {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "local {} {}",
                    m.topic,
                    String::from_utf8_lossy(&m.payload)
                );
                let _ = out.flush();
            }
        }
    });
    let stay = std::env::var_os("BRIDGE_RUN_STAY").is_some_and(|v| v == "1");
    let (_stop_tx, stop_rx) = watch::channel(false);
    let bridge = start(config, &args[3], &state, local_tx, stop_rx).await?;
    let mut acks = Vec::with_capacity(n);
    for i in first..first + n {
        let qos = if i % 3 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        let topic = format!("sensors/q{}", qos as u8);
        let ack = bridge
            .offer(&topic, &Bytes::from(i.to_string()), qos, false, None)
            .ok_or("no out rule matches sensors/#")?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await?.map_err(|e| format!("offer refused: {e}"))?;
    }
    println!("spooled {n}");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let left = bridge
            .stats()
            .spool_messages
            .load(std::sync::atomic::Ordering::Relaxed);
        if left == 0 && bridge.is_connected() {
            println!("drained");
            std::io::stdout().flush()?;
            if stay {
                std::future::pending::<()>().await;
            }
            bridge.shutdown().await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("spool not drained in time");
    std::process::exit(2);
}
