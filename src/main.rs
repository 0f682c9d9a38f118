//! The `drctl` binary: parse flags, load config, run one command, print, exit with its code.

use clap::Parser;

use drctl::cli::{Cli, Command, LogFormat};
use drctl::command::{self, Ctx, Output};
use drctl::config::Config;
use drctl::error::{Error, ExitCode};

fn init_tracing(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DRCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("drctl={default},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(drctl::progress::LogWriter);
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(cli: &Cli) -> Result<Output, Error> {
    // The demo brings its own embedded configuration.
    let config = match &cli.command {
        Command::Demo(_) => Config::default(),
        _ => Config::load(cli.config.as_deref())?,
    };
    let ctx = Ctx::new(
        config,
        cli.json,
        cli.config
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    );
    // Commands that must stop cleanly (no manifest, objects removed) watch for SIGTERM and
    // SIGINT; the rest keep the default: the signal ends the process.
    if matches!(cli.command, Command::Backup(_) | Command::Agent(_)) {
        command::agent::cancel_on_signals(ctx.cancel.clone());
    }
    command::dispatch(&ctx, &cli.command).await
}

fn main() {
    let cli = Cli::parse();
    // The agent is a service: its job log is the point, so it logs at info by default.
    let verbose = if matches!(cli.command, Command::Agent(_)) {
        cli.verbose.max(1)
    } else {
        cli.verbose
    };
    // Progress bars only for a person at a terminal: never under --json, never in the agent
    // (its jobs run side by side, and it is a service).
    drctl::progress::enable(
        std::io::IsTerminal::is_terminal(&std::io::stderr())
            && !cli.json
            && !matches!(cli.command, Command::Agent(_)),
    );
    init_tracing(verbose, cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drctl: cannot start runtime: {e}");
            std::process::exit(ExitCode::Failure.code());
        }
    };
    let code = match rt.block_on(dispatch(&cli)) {
        Ok(out) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out.json).unwrap_or_default()
                );
            } else if !out.human.is_empty() {
                println!("{}", out.human);
            }
            out.exit.code()
        }
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"error": e.to_string(), "exit_code": e.exit_code().code()})
                );
            }
            eprintln!("drctl: error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            e.exit_code().code()
        }
    };
    drop(rt);
    std::process::exit(code);
}
