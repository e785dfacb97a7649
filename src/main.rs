//! The `fluxgate` command: parse the CLI, initialise logging, load and validate the
//! config, run. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fluxgate::config::{Config, LogFormat};
use fluxgate::registry::Role;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::prelude::*;

/// fluxgate: IoT telemetry gateway (MQTT broker + WebSocket/HTTP ingest + SQLite store +
/// InfluxDB sink + live streams).
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
    /// Operator API keys (work on `data_dir` directly; no running gateway needed).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development CA (`ca.pem`), a server certificate for localhost, 127.0.0.1
    /// and ::1 (`server.pem`, `server-key.pem`) and, per `--device`, a client
    /// certificate with CN = the device id. For trying TLS, not for production.
    Dev {
        /// Directory to write into (created if missing; existing files are replaced).
        #[arg(long)]
        out: PathBuf,
        /// A device id to issue a client certificate for (repeatable).
        #[arg(long = "device")]
        devices: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key and print it (once) on stdout.
    Create {
        /// `admin` (read and write) or `viewer` (read and subscribe).
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
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
    // Writing development certificates needs no configuration.
    if let Some(Command::Certs {
        command: CertsCommand::Dev { out, devices },
    }) = &cli.command
    {
        return match fluxgate::tls::dev_certs::write_dev_certs(out, devices) {
            Ok(written) => {
                println!(
                    "CA certificate (trust it in clients): {}",
                    written.ca.display()
                );
                println!(
                    "server certificate and key (http.tls / mqtt.tls): {} {}",
                    written.server.0.display(),
                    written.server.1.display()
                );
                for (cert, key) in &written.devices {
                    println!(
                        "device certificate and key: {} {}",
                        cert.display(),
                        key.display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Certs { .. } => ExitCode::SUCCESS,
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            println!("configuration OK\n{config:#?}");
            ExitCode::SUCCESS
        }
        Command::Keys {
            command: KeysCommand::Create { role, name },
        } => {
            let role = if role == "admin" {
                Role::Admin
            } else {
                Role::Viewer
            };
            match fluxgate::registry::create_key_offline(&config, &name, role) {
                Ok((key, secret)) => {
                    eprintln!(
                        "created {} key `{}` (id {})",
                        role_name(role),
                        key.name,
                        key.id
                    );
                    println!("{secret}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
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

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Viewer => "viewer",
    }
}

fn init_tracing(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // Logs go to stderr; stdout carries only what a user or script asked for (the
    // one-time admin key), so secrets never end up in a log stream.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for a terminal, so log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry();
    match config.log.format {
        LogFormat::Text => registry.with(layer.with_filter(filter)).init(),
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).init(),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let gateway = fluxgate::Gateway::start(config).await?;
        if let Some(key) = &gateway.bootstrap_admin_key {
            // Printed once, on stdout, never logged: only its hash is stored.
            let host = match gateway.http_addr.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                ip => ip.to_string(),
            };
            println!(
                "First start: created an admin API key. It is shown only now; store it safely.\n\n    {key}\n\nUse it as `Authorization: Bearer {key}`. Dashboard: http://{host}:{}/#key={key}\nMore keys: fluxgate keys create --role viewer --name NAME",
                gateway.http_addr.port()
            );
        }
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
