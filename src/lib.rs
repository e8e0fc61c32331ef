//! meterd: usage metering and time-series analytics for AI products.
//!
//! This crate is the binary's library half: the command line, configuration, the wiring of the
//! ingest and query crates into one HTTP server, the `meterd gen` load generator and `meterd
//! load`, which sends a file of events. `main.rs` only calls [`run`].

mod billing;
pub mod config;
pub mod listener;
pub mod load;
pub mod loadgen;
pub mod openapi;
mod send;
pub mod serve;
mod slo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, ServeArgs, Settings};

/// meterd command line.
#[derive(Debug, Parser)]
#[command(
    name = "meterd",
    version,
    about = "Usage metering and time-series analytics for AI products"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// meterd's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (ingest, SQL, health) on one listener.
    Serve(Box<ServeArgs>),
    /// Generate realistic usage events as NDJSON, or post them to a running meterd.
    Gen(loadgen::GenArgs),
    /// Send an NDJSON file of events (or standard input) to a running meterd, in batches.
    Load(load::LoadArgs),
    /// Create or upgrade meterd's schema in PostgreSQL/TimescaleDB, then exit. `serve` does
    /// the same at startup.
    Migrate(config::MigrateArgs),
}

/// Entry point of the `meterd` binary: 0 on success, 1 on a runtime failure, 2 on bad
/// configuration.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let settings = match Settings::resolve(&args) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("meterd: {}", error_chain(&e));
                    return ExitCode::from(2);
                }
            };
            init_tracing(settings.log_format);
            exit_code(runtime().and_then(|rt| rt.block_on(serve::serve(settings))))
        }
        Command::Gen(args) => {
            init_tracing(LogFormat::Text);
            exit_code(runtime().and_then(|rt| rt.block_on(loadgen::run(args))))
        }
        Command::Load(args) => {
            init_tracing(LogFormat::Text);
            exit_code(runtime().and_then(|rt| rt.block_on(load::run(args))))
        }
        Command::Migrate(args) => {
            let pg = match args.resolve() {
                Ok(pg) => pg,
                Err(e) => {
                    eprintln!("meterd: {}", error_chain(&e));
                    return ExitCode::from(2);
                }
            };
            init_tracing(LogFormat::Text);
            exit_code(runtime().and_then(|rt| rt.block_on(migrate(pg))))
        }
    }
}

async fn migrate(pg: meterd_store_postgres::PostgresConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut client = meterd_store_postgres::connect(&pg)
        .await
        .context("connecting to PostgreSQL")?;
    let report = meterd_store_postgres::migrate(&mut client, &pg)
        .await
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    println!(
        "meterd schema at version {} ({}); applied now: {:?}",
        report.version,
        report.flavor.as_str(),
        report.applied
    );
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("meterd-io")
        .build()?)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "meterd failed");
            eprintln!("meterd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("METERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests calling run twice) keeps the first subscriber; nothing to report.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
