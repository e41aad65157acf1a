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
    /// Check the configuration as a start would (files, certificates, password hashes,
    /// listener clashes, directories) and exit: 0 valid (warnings printed), 2 invalid.
    Check {
        /// Also bind every listener for a moment, to find ports already in use.
        #[arg(long)]
        bind: bool,
    },
    /// Print the PHC hash of a password for `[[broker.users]]`: asked twice without
    /// echo on a terminal, else read from the first line of stdin.
    Passwd,
    /// Print the outpost.toml equivalent of a Mosquitto configuration file; what has
    /// no equivalent is listed as comments.
    ImportMosquitto {
        /// The Mosquitto configuration, e.g. /etc/mosquitto/mosquitto.conf.
        file: PathBuf,
    },
}

/// Exit status of a configuration that cannot be used (as `outpost check` documents).
const INVALID: u8 = 2;

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
    match cli.command {
        Some(Command::Passwd) => return passwd(),
        Some(Command::ImportMosquitto { file }) => return import_mosquitto(&file),
        _ => {}
    }
    let (config, text) = match &cli.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (Config::parse(&text, path), text),
            Err(e) => {
                eprintln!(
                    "outpost: cannot read the configuration {}: {e}",
                    path.display()
                );
                return ExitCode::from(INVALID);
            }
        },
        None => (Ok(Config::embedded_default()), String::new()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outpost: invalid configuration: {e}");
            return ExitCode::from(INVALID);
        }
    };
    match cli.command {
        Some(Command::Check { bind }) => {
            let name = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("<embedded default>"));
            check(&config, &name, &text, bind)
        }
        _ => run(config, cli.config),
    }
}

fn check(config: &Config, path: &std::path::Path, text: &str, bind: bool) -> ExitCode {
    let report = outpost_gateway::check::check(config, outpost_gateway::check::Options { bind });
    for line in report.lines(path, text) {
        eprintln!("{line}");
    }
    if report.has_errors() {
        let n = report.findings.iter().filter(|f| !f.warning).count();
        eprintln!("outpost: invalid configuration: {n} error(s) above");
        return ExitCode::from(INVALID);
    }
    println!("{}: configuration is valid", path.display());
    ExitCode::SUCCESS
}

fn import_mosquitto(file: &std::path::Path) -> ExitCode {
    match outpost_gateway::import_mosquitto::import(file) {
        Ok(toml) => {
            print!("{toml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: {e}");
            ExitCode::from(INVALID)
        }
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
            // Logging is set up by now and goes to stderr or the journal (which also
            // takes the unit's stderr): one line, not the same error twice.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn passwd() -> ExitCode {
    use std::io::IsTerminal;
    // rpassword, not raw termios: it turns echo off and restores it on every exit path
    // (an error, ^C) in a small well-kept crate; nix's termios would need the same
    // restore-on-drop guard written here.
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ");
        let again = rpassword::prompt_password("Password (again): ");
        match (first, again) {
            (Ok(a), Ok(b)) if a == b => a,
            (Ok(_), Ok(_)) => {
                eprintln!("outpost: the passwords differ; nothing printed, try again");
                return ExitCode::FAILURE;
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("outpost: cannot read the password from the terminal: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            eprintln!("outpost: cannot read the password from stdin: {e}");
            return ExitCode::FAILURE;
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.is_empty() {
        eprintln!("outpost: empty password");
        return ExitCode::FAILURE;
    }
    match outpost_gateway::broker::hash_password(&password) {
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
