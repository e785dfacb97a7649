//! The `fluxgate` command: parse the CLI, initialise logging, load and validate the
//! config, run. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fluxgate::config::{Config, LogFormat};
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::prelude::*;

/// fluxgate: IoT telemetry gateway (MQTT broker + WebSocket/HTTP ingest + SQLite store +
/// live streams).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML). Without it the built-in defaults apply; `FLUXGATE_*`
    /// environment variables override either.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Parse and validate the configuration, print the effective values, and exit.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            println!("configuration OK\n{config:#?}");
            ExitCode::SUCCESS
        }
        Command::Serve => {
            init_tracing(&config);
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(config: &Config) {
    // rumqttd logs every accepted connection at info; that is noise at fleet scale.
    let default = format!("{},rumqttd=warn", config.log.level);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // rumqttd opens error-level spans around every packet batch with the topic and
    // payload as fields; the fmt layer formats those fields eagerly, which measured as a
    // large share of the broker thread's CPU under load. Its events still get through.
    let no_broker_spans =
        filter_fn(|meta| !(meta.is_span() && meta.target().starts_with("rumqttd")));
    let layer = tracing_subscriber::fmt::layer();
    let registry = tracing_subscriber::registry();
    match config.log.format {
        LogFormat::Text => registry
            .with(layer.with_filter(filter.and(no_broker_spans)))
            .init(),
        LogFormat::Json => registry
            .with(layer.json().with_filter(filter.and(no_broker_spans)))
            .init(),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let gateway = fluxgate::Gateway::start(config).await?;
        let token = gateway.shutdown_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: draining and flushing");
            token.cancel();
        });
        gateway.wait().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
