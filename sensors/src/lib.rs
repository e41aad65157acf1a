//! Outpost sensor layer: Modbus RTU/TCP and serial line acquisition.
//!
//! The layer emits [`SensorMessage`]s; the gateway publishes them in-process. Commands arrive as
//! [`Command`]s from the `.../{device}/{point}/set` topics returned by [`command_filters`].
//! Counters are published through the same channel under `$SYS/broker/sensors/...` every
//! `stats_interval`, and are readable directly through [`Stats`] when using [`run_with_stats`].

#![warn(missing_docs)]

pub mod clock;
pub mod config;
pub mod emit;
pub mod error;
#[cfg(debug_assertions)]
mod fault;
pub mod modbus;
pub mod plan;
pub mod point;
pub mod publish;
pub mod report;
pub mod serial;
pub mod stats;

pub use config::SensorsConfig;
pub use error::{ConfigError, SensorsError};
pub use publish::{Command, SensorMessage};
pub use stats::Stats;

use clock::Clock;
use emit::Emitter;
use publish::{Topics, parse_command_payload, write_result_payload};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// The topic filter(s) the gateway subscribes to so that writes reach [`run`].
pub fn command_filters(config: &SensorsConfig, gateway_id: &str) -> Vec<String> {
    if config
        .modbus
        .iter()
        .any(|d| d.points.iter().any(|p| p.writable))
    {
        vec![Topics::new(config.prefix(), gateway_id).command_filter()]
    } else {
        Vec::new()
    }
}

/// Starts every line and sensor; returns when `shutdown` turns true (or its sender is dropped).
pub async fn run(
    config: SensorsConfig,
    gateway_id: String,
    out: mpsc::Sender<SensorMessage>,
    commands: mpsc::Receiver<Command>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SensorsError> {
    run_with_stats(
        config,
        gateway_id,
        out,
        commands,
        shutdown,
        Arc::new(Stats::default()),
    )
    .await
}

/// [`run`] with a caller-provided [`Stats`] handle.
pub async fn run_with_stats(
    config: SensorsConfig,
    gateway_id: String,
    out: mpsc::Sender<SensorMessage>,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<(), SensorsError> {
    config.validate()?;
    let topics = Topics::new(config.prefix(), &gateway_id);
    let clock = Clock::start(config.clock, shutdown.clone());
    let emitter = Emitter::new(out, clock);
    let mut tasks: JoinSet<Result<(), SensorsError>> = JoinSet::new();

    let built = modbus::build(&config, &topics, &emitter, &stats);
    for (line, writes) in built.lines {
        tasks.spawn(line.run(writes, shutdown.clone()));
    }
    for s in &config.serial {
        let line_stats = stats.line(stats::line_name(&s.port), s.baud);
        let task =
            serial::SerialTask::new(s.0.clone(), topics.clone(), emitter.clone(), line_stats);
        tasks.spawn(task.run(shutdown.clone()));
    }
    if let Some(every) = config.stats_every() {
        let stats = Arc::clone(&stats);
        let emitter = emitter.clone();
        let mut sd = shutdown.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sd.changed() => return Ok(()),
                }
                for m in stats.messages() {
                    emitter.send(m).await?;
                }
            }
        });
    }
    tracing::info!(
        modbus = config.modbus.len(),
        serial = config.serial.len(),
        "sensor layer started"
    );

    let mut commands_open = true;
    let mut result = Ok(());
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            cmd = commands.recv(), if commands_open => match cmd {
                Some(cmd) => {
                    if let Err(e) = handle_command(&cmd, &topics, &built.routes, &emitter).await {
                        result = Err(e);
                        break;
                    }
                }
                None => commands_open = false,
            },
            joined = tasks.join_next(), if !tasks.is_empty() => match joined {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(e))) => { result = Err(e); break; }
                Some(Err(e)) => { result = Err(SensorsError::Task(e.to_string())); break; }
            },
            changed = shutdown.changed() => if changed.is_err() { break },
        }
    }
    // Tasks watch the same shutdown signal; give them a moment, then stop the rest.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
        || result.is_err()
    {
        tasks.abort_all();
    }
    result
}

async fn handle_command(
    cmd: &Command,
    topics: &Topics,
    routes: &std::collections::HashMap<String, modbus::WriteRoute>,
    emitter: &Emitter,
) -> Result<(), SensorsError> {
    let Some((device, point)) = topics.parse_command(&cmd.topic) else {
        tracing::debug!(topic = %cmd.topic, "ignoring command on an unknown topic");
        return Ok(());
    };
    let (error, id) = match parse_command_payload(&cmd.payload) {
        Ok((value, id)) => match modbus::route_write(routes, device, point, value, id.clone()) {
            Ok(()) => return Ok(()),
            Err(e) => (e.to_string(), id),
        },
        Err(e) => (e, None),
    };
    tracing::info!(device, point, %error, "write refused");
    emitter
        .send(SensorMessage {
            topic: topics.write_result(device, point),
            payload: write_result_payload(Err(&error), id.as_ref(), &emitter.clock),
            qos: 1,
            retain: false,
        })
        .await
}
