//! `outpost`: the edge gateway binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outpost_gateway::config::Config;

/// Outpost edge gateway: local MQTT broker, sensors and store-and-forward bridge.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded default runs: a broker on
    /// 127.0.0.1:1883 with state in the working directory or $STATE_DIRECTORY.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit (non-zero with the error on a bad file).
    Check,
    /// Print the PHC hash of a password (read from stdin) for `[[broker.users]]`.
    Passwd,
}

fn main() -> ExitCode {
    // Freed heap in the middle of glibc's arenas goes back to the OS only by trimming;
    // the broker trims after a burst of clients goes quiet again.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    outpost_broker::set_memory_trim(|| {
        // SAFETY: malloc_trim has no preconditions; it only walks glibc's own arenas.
        unsafe {
            libc::malloc_trim(0);
        }
    });
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(path) => Config::load(path),
        None => Ok(Config::embedded_default()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            let name = cli
                .config
                .as_ref()
                .map_or("embedded default".to_owned(), |p| p.display().to_string());
            println!("{name}: configuration is valid");
            ExitCode::SUCCESS
        }
        Some(Command::Passwd) => passwd(),
        None => run(config, cli.config),
    }
}

fn run(config: Config, path: Option<PathBuf>) -> ExitCode {
    outpost_gateway::service::init_logging(&config.log.level);
    outpost_gateway::service::raise_fd_limit();
    // One worker is a current-thread runtime: the same single thread without the
    // work-stealing scheduler's bookkeeping around every wake-up.
    let mut builder = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if config.worker_threads > 1 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(outpost_gateway::app::run(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn passwd() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        eprintln!("outpost: cannot read the password from stdin");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("outpost: empty password");
        return ExitCode::FAILURE;
    }
    match outpost_gateway::broker::hash_password(password) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: {e}");
            ExitCode::FAILURE
        }
    }
}
