//! The `drctl` binary: parse flags, load config, run one command, print, exit with its code.

use clap::Parser;

use drctl::cli::{Cli, Command, LogFormat, PlanCommand, WalCommand};
use drctl::command::{self, Ctx, Output};
use drctl::config::Config;
use drctl::error::{Error, ExitCode};
use drctl::restore::executor::Mode;

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
        .with_writer(std::io::stderr);
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
    let ctx = Ctx {
        config,
        json: cli.json,
        config_path: cli
            .config
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    };
    match &cli.command {
        Command::Backup(a) => command::backup::run(&ctx, a).await,
        Command::List => command::list::run(&ctx).await,
        Command::Verify(a) => command::verify::run(&ctx, a.backup_id.as_deref()).await,
        Command::Restore(a) => command::restore::run(&ctx, a).await,
        Command::Demo(a) => command::demo::run(&ctx, a).await,
        Command::Wal(WalCommand::Push { path }) => command::wal::push(&ctx, path).await,
        Command::Wal(WalCommand::Fetch { name, dest }) => {
            command::wal::fetch(&ctx, name, dest).await
        }
        Command::Wal(WalCommand::Prefetch { first }) => command::wal::prefetch(&ctx, first).await,
        Command::Plan(PlanCommand::Run(a)) => {
            let mode = if a.health_only {
                Mode::HealthOnly
            } else if a.backup_only {
                Mode::BackupOnly
            } else if a.test_only {
                Mode::TestOnly
            } else {
                Mode::All
            };
            command::plan::run(&ctx, &a.file, mode).await
        }
        Command::Plan(PlanCommand::Check { file }) => {
            let p = drctl::restore::plan::Plan::load(file)?;
            Ok(command::Output::ok(
                serde_json::json!({"ok": true, "plan": p.name, "stages": p.stages.len()}),
                format!(
                    "{}: plan {:?} is valid ({} stages)",
                    file.display(),
                    p.name,
                    p.stages.len()
                ),
            ))
        }
        Command::Drill(a) => {
            command::plan::drill(&ctx, a.plan.as_deref(), a.report.as_deref()).await
        }
        Command::Status(a) => command::status::run(&ctx, a.prometheus).await,
        Command::Expire(a) => command::expire::run(&ctx, a).await,
    }
}

fn main() {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.log_format);
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
