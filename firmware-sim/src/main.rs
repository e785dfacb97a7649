//! `firmware-sim`: simulates fleets of fluxgate devices and benchmarks the gateway.
//!
//! There are three subcommands. `run` and `bench` share the device, signal and transport
//! code; `watch` only reads the gateway's live stream and sends no telemetry itself.
//!
//! * `run` keeps N devices sending realistic telemetry at a steady rate, over MQTT or
//!   WebSocket, until a duration elapses or Ctrl-C, with a live rate display.
//! * `bench` pushes a fixed number of messages as fast as possible and reports send
//!   throughput, end-to-end ingest throughput (from the gateway's `/metrics`) and
//!   acknowledgement latency, as a table and as one JSON line (`--shape burst`, the
//!   default); `--shape fleet` runs many slow devices at a steady rate and `--shape
//!   storm` connects every device at once (see `fleet`).
//! * `watch` opens many live-stream (SSE) subscribers for a fixed duration and reports
//!   fan-out: delivered readings per second, publish-to-subscriber latency and, given the
//!   gateway's pid, its CPU use and resident memory, as a table and as one JSON line.
//!
//! The modules are layered so that their imports never form a cycle: each one only uses
//! modules in layers below it, which keeps every piece testable without the ones above.
//! From the top down:
//!
//! 1. `main` (this file): command-line parsing and output.
//! 2. `run`, `bench`, `fleet`: the subcommand drivers that spawn device tasks (`fleet`
//!    runs `bench --shape fleet|storm`).
//! 3. `mqtt`, `ws`, `raw_mqtt`, `provision`: the transports (`raw_mqtt` is the small
//!    client of the fleet shapes) and token provisioning.
//! 4. `device`, `bench_ctx`: devices and their messages; the state shared by a benchmark.
//! 5. `config`, `stats`, `watch`: options; counters and reports; the `watch` subcommand.
//! 6. `backoff`, `clock`, `commands`, `ids`, `metrics`, `procfs`, `signal`, `stop`,
//!    `ticker`, `tls`: leaf modules that import nothing from the crate (`commands`: how a
//!    device answers commands; `tls`: the `--tls` client configuration).
//!
//! Something that two modules of one layer both need belongs in a lower layer, not in
//! either of them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod backoff;
mod bench;
mod bench_ctx;
mod clock;
mod commands;
mod config;
mod device;
mod fleet;
mod ids;
mod metrics;
mod mqtt;
mod nodes;
mod procfs;
mod provision;
mod raw_mqtt;
mod run;
mod signal;
mod stats;
mod stop;
mod ticker;
mod tls;
mod watch;
mod ws;

use config::{DEFAULT_HTTP, DEFAULT_MQTT, Encoding, Qos, RunFile, RunSettings, Shape, Transport};
use provision::Provisioning;

/// Exit code of a benchmark that finished but lost or failed to send messages, so that
/// scripts can tell "gateway dropped data" from "benchmark could not run" (exit code 1).
const EXIT_INCOMPLETE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "firmware-sim",
    version,
    about = "fluxgate device fleet simulator and benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate a fleet sending telemetry at a steady rate until stopped.
    Run(RunArgs),
    /// Send a fixed number of messages as fast as possible and measure the gateway.
    Bench(BenchArgs),
    /// Open many live-stream (SSE) subscribers and measure fan-out: readings/s, latency,
    /// and the gateway's CPU and memory.
    Watch(WatchArgs),
}

#[derive(Debug, Args)]
struct WatchArgs {
    /// Number of SSE subscribers.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    subscribers: u64,
    /// Filter query for every subscriber, e.g. `device=sim-*` or `metric=temp`; `{i}`
    /// becomes the subscriber's index (`device=sim-{i}`: subscriber i watches device i).
    #[arg(long, default_value = "")]
    filter: String,
    /// How long to measure.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
    duration: Duration,
    /// Gateway HTTP listener, or a comma-separated list of several nodes': subscribers
    /// are spread round-robin over them.
    #[arg(long, value_name = "HOST:PORT[,..]", default_value = DEFAULT_HTTP, env = "FLUXGATE_SIM_HTTP")]
    http: String,
    /// Operator API key (a viewer key is enough).
    #[arg(long, env = "FLUXGATE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The gateway's process id, to report its CPU use and resident memory.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Print only the JSON result line on stdout.
    #[arg(long)]
    json: bool,
}

/// Options of `run`. None of them has a clap default, so that values from `--config`
/// apply unless overridden; the defaults are listed in the help texts.
#[derive(Debug, Args)]
struct RunArgs {
    /// TOML file with any of the options below (command-line values take precedence).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Transport [default: mqtt].
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Payload encoding [default: json].
    #[arg(long, value_enum)]
    encoding: Option<Encoding>,
    /// Number of devices, one connection each [default: 10].
    #[arg(long)]
    devices: Option<usize>,
    /// Messages per second per device, may be fractional (e.g. 0.5) [default: 1].
    #[arg(long)]
    rate: Option<f64>,
    /// Gateway MQTT listener HOST:PORT, or a comma-separated list of several nodes':
    /// devices are spread round-robin and move to the next node after a connection
    /// failure [default: 127.0.0.1:1883].
    #[arg(long, value_name = "HOST:PORT[,..]", env = "FLUXGATE_SIM_MQTT")]
    mqtt: Option<String>,
    /// Gateway HTTP/WebSocket listener HOST:PORT, or one per node (as --mqtt)
    /// [default: 127.0.0.1:8080].
    #[arg(long, value_name = "HOST:PORT[,..]", env = "FLUXGATE_SIM_HTTP")]
    http: Option<String>,
    /// MQTT QoS, 0 or 1 [default: 0].
    #[arg(long, value_parser = config::parse_qos)]
    qos: Option<u8>,
    /// Stop after this long, e.g. 30s or 2h [default: run until Ctrl-C].
    #[arg(long, value_parser = duration_text)]
    duration: Option<String>,
    /// Device id prefix; devices are named PREFIX-00000, PREFIX-00001, ... [default: sim].
    #[arg(long)]
    prefix: Option<String>,
    /// Length of one simulated day of the sensor signals [default: 10m].
    #[arg(long, value_parser = duration_text)]
    period: Option<String>,
    #[command(flatten)]
    provisioning: ProvisionArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Time a device takes to answer a command.
    #[arg(long, default_value = "0s", value_parser = config::parse_duration)]
    reply_latency: Duration,
    /// Probability (0 to 1) that a device fails a known command (answers ok:false).
    #[arg(long, default_value_t = 0.0, value_parser = failure_rate)]
    reply_failure_rate: f64,
}

/// `--tls`: connect with TLS (mqtts, wss).
#[derive(Debug, Args)]
struct TlsArgs {
    /// Connect with TLS (mqtts to --mqtt, wss to --https or --http), trusting only --ca.
    #[arg(long, requires = "ca")]
    tls: bool,
    /// PEM file of the CA the gateway's certificate must chain to.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// PEM client certificate (device authentication by certificate; then no token is
    /// sent). `{id}` becomes the device id: `certs/device-{id}.pem`.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "key"])]
    cert: Option<String>,
    /// PEM private key of --cert (`{id}` as there).
    #[arg(long, value_name = "FILE", requires_all = ["tls", "cert"])]
    key: Option<String>,
    /// The gateway's HTTPS listener HOST:PORT for wss ingest, or one per node
    /// [default: --http].
    #[arg(long, value_name = "HOST:PORT[,..]", requires = "tls")]
    https: Option<String>,
}

impl TlsArgs {
    fn settings(self) -> anyhow::Result<Option<tls::TlsSettings>> {
        match (self.tls, self.ca) {
            (true, Some(ca)) => {
                let identity = self.cert.zip(self.key);
                tls::TlsSettings::new(ca, identity, self.https).map(Some)
            }
            _ => Ok(None),
        }
    }
}

fn failure_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not a probability (0 to 1)"))
    }
}

/// How the fleet gets its device tokens.
#[derive(Debug, Args)]
struct ProvisionArgs {
    /// Admin API key, used to create devices that have no saved token yet; with several
    /// gateways that each have their own registry, one per --http address (`k1,k2,k3`).
    #[arg(long, env = "FLUXGATE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Where device tokens are kept between runs (owner-only permissions).
    #[arg(long, value_name = "FILE", default_value = "sim-tokens.json")]
    tokens_file: PathBuf,
    /// The listed nodes share one registry (cluster nodes on PostgreSQL): provision on
    /// the first node only and present its token to every node. Without it, devices are
    /// provisioned on every listed HTTP address and carry a token per node.
    #[arg(long)]
    shared_registry: bool,
}

impl ProvisionArgs {
    fn into_provisioning(self) -> Provisioning {
        Provisioning {
            api_key: self.api_key,
            tokens_file: self.tokens_file,
            shared_registry: self.shared_registry,
        }
    }
}

impl RunArgs {
    /// The options only the command line sets: TLS and how devices answer commands.
    fn split_cli_only(self) -> (Self, TlsArgs, commands::CommandSettings) {
        let commands = commands::CommandSettings {
            reply_latency: self.reply_latency,
            failure_rate: self.reply_failure_rate,
        };
        let tls = TlsArgs {
            tls: self.tls.tls,
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
            https: self.tls.https.clone(),
        };
        (self, tls, commands)
    }

    fn into_file(self) -> (Option<PathBuf>, RunFile, Provisioning) {
        let file = RunFile {
            transport: self.transport,
            encoding: self.encoding,
            devices: self.devices,
            rate: self.rate,
            mqtt: self.mqtt,
            http: self.http,
            qos: self.qos,
            duration: self.duration,
            prefix: self.prefix,
            period: self.period,
        };
        (self.config, file, self.provisioning.into_provisioning())
    }
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Load shape: `burst` (fixed messages as fast as possible over --devices
    /// connections), `fleet` (--devices slow devices at --rate for --duration, one line
    /// per second) or `storm` (--devices devices connect at once; time until all online).
    #[arg(long, value_enum, default_value = "burst")]
    shape: Shape,
    /// Messages per second per device (fleet).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Steady phase of the fleet shape.
    #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
    duration: Duration,
    /// Index of the first device of this process (fleet, storm): processes with
    /// disjoint ranges together simulate a fleet larger than one process's file limit.
    #[arg(long, default_value_t = 0)]
    offset: u64,
    /// Spread connections over the source addresses 127.0.0.1 ..= 127.0.0.N (fleet,
    /// storm; loopback gateways only), so that they do not run out of ephemeral ports.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=254))]
    source_addrs: u8,
    /// Longest wait for every device to be online (fleet, storm).
    #[arg(long, default_value = "120s", value_parser = config::parse_duration)]
    online_timeout: Duration,
    /// Timeout of one connection attempt, TCP connect to CONNACK (fleet, storm).
    #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
    connect_timeout: Duration,
    /// The gateway's process id, to report its CPU use and resident memory.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Every listed node stores every reading (cluster mode): the fleet shape's
    /// "stored" is the least any node stored, instead of the sum over the nodes.
    #[arg(long)]
    replicated: bool,
    /// Transport under test.
    #[arg(long, value_enum, default_value = "mqtt")]
    transport: Transport,
    /// Payload encoding.
    #[arg(long, value_enum, default_value = "json")]
    encoding: Encoding,
    /// Number of concurrent device connections.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    devices: u64,
    /// Total messages over all devices (underscores allowed: 1_000_000).
    #[arg(long, default_value = "1_000_000", value_parser = count)]
    messages: u64,
    /// MQTT QoS, 0 or 1; QoS 1 keeps 100 publishes in flight per connection.
    #[arg(long, default_value = "0", value_parser = config::parse_qos)]
    qos: u8,
    /// Gateway MQTT listener HOST:PORT, or a comma-separated list of several nodes':
    /// devices are spread round-robin, move to the next node after a connection failure,
    /// and the report has per-node figures.
    #[arg(long, value_name = "HOST:PORT[,..]", default_value = DEFAULT_MQTT, env = "FLUXGATE_SIM_MQTT")]
    mqtt: String,
    /// Gateway HTTP listener HOST:PORT (WebSocket ingest, provisioning and /metrics), or
    /// one per node (as --mqtt).
    #[arg(long, value_name = "HOST:PORT[,..]", default_value = DEFAULT_HTTP, env = "FLUXGATE_SIM_HTTP")]
    http: String,
    /// Unacknowledged messages allowed per WebSocket connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_inflight: u64,
    /// WebSocket acknowledgements: `each` (one per message) or `cumulative` (the gateway
    /// acks every ready message up to a sequence number in one frame).
    #[arg(long, default_value = "each", value_parser = ["each", "cumulative"])]
    ack: String,
    /// Give up sending after this long (the drain wait adds at most a few seconds).
    #[arg(long, default_value = "120s", value_parser = config::parse_duration)]
    timeout: Duration,
    /// Device id prefix. Distinct from `run`'s default so that a benchmark does not take
    /// over the MQTT client ids (and thus the sessions) of a simulation running alongside.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Print only the JSON result line on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    provisioning: ProvisionArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Validates a duration argument but keeps it as text, so that it merges with the
/// config file (where durations are strings) before being parsed once.
fn duration_text(s: &str) -> Result<String, String> {
    config::parse_duration(s).map(|_| s.to_string())
}

/// Parses a message count, allowing `_` separators.
fn count(s: &str) -> Result<u64, String> {
    s.replace('_', "")
        .parse()
        .map_err(|e| format!("invalid count {s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let (args, tls, commands) = args.split_cli_only();
            let (config, cli, provisioning) = args.into_file();
            let file = match config {
                Some(path) => RunFile::load(&path)?,
                None => RunFile::default(),
            };
            let mut settings = RunSettings::resolve(cli, file)?;
            settings.tls = tls.settings()?;
            settings.commands = commands;
            run::run(settings, provisioning).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch(args) => {
            let report = watch::watch(watch::WatchSettings {
                http: args.http,
                api_key: args.api_key,
                subscribers: usize::try_from(args.subscribers)?,
                filter: args.filter,
                duration: args.duration,
                gateway_pid: args.gateway_pid,
            })
            .await?;
            if !args.json {
                println!("firmware-sim watch results:");
                println!("  subscribers      {} connected", report.connected);
                println!(
                    "  delivered        {} readings in {} frames, {:.0} readings/s",
                    report.readings,
                    report.frames,
                    report.readings as f64 / report.secs
                );
                if let Some((p50, p90, p99, max)) = report.latency_ms {
                    println!(
                        "  latency          p50 {p50} ms  p90 {p90} ms  p99 {p99} ms  max {max} ms"
                    );
                }
                println!("  conflated        {}", report.conflated);
                println!("  errors           {}", report.errors);
                if let (Some(cpu), Some(rss)) = (report.gateway_cpu_percent, report.gateway_rss_mib)
                {
                    println!("  gateway          {cpu:.0}% CPU (of one core), {rss:.0} MiB RSS");
                }
            }
            println!("json: {}", report.to_json());
            Ok(if report.errors == 0 && report.connected > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_INCOMPLETE)
            })
        }
        Command::Bench(args) if args.shape != Shape::Burst => {
            anyhow::ensure!(
                !args.tls.tls,
                "--tls is supported by --shape burst (rumqttc, WebSocket), not by the fleet shapes"
            );
            let report = fleet::fleet(
                fleet::FleetSettings {
                    shape: args.shape,
                    devices: usize::try_from(args.devices)?,
                    offset: usize::try_from(args.offset)?,
                    rate: args.rate,
                    duration: args.duration,
                    online_timeout: args.online_timeout,
                    connect_timeout: args.connect_timeout,
                    mqtt: args.mqtt,
                    http: args.http,
                    prefix: args.prefix,
                    source_addrs: args.source_addrs,
                    gateway_pid: args.gateway_pid,
                    period: config::DEFAULT_PERIOD,
                    replicated: args.replicated,
                },
                args.provisioning.into_provisioning(),
            )
            .await?;
            if !args.json {
                println!("{}", fleet::summary_line(&report));
            }
            println!("json: {report}");
            let complete = report["online"] == report["devices"]
                && report
                    .get("unstored_at_end")
                    .is_none_or(|u| u.as_i64() == Some(0));
            Ok(if complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_INCOMPLETE)
            })
        }
        Command::Bench(args) => {
            let pid = args.gateway_pid;
            let (gw0, own0, t0) = (
                pid.and_then(procfs::cpu_ticks),
                procfs::own_cpu_ticks(),
                std::time::Instant::now(),
            );
            let settings = bench::BenchSettings {
                transport: args.transport,
                encoding: args.encoding,
                devices: usize::try_from(args.devices)?,
                messages: args.messages,
                qos: Qos::from_level(args.qos)?,
                mqtt: args.mqtt,
                http: args.http,
                max_inflight: usize::try_from(args.max_inflight)?,
                cumulative_acks: args.ack == "cumulative",
                timeout: args.timeout,
                prefix: args.prefix,
                period: config::DEFAULT_PERIOD,
                json: args.json,
                tls: args.tls.settings()?,
            };
            let json_only = settings.json;
            let report = bench::bench(settings, args.provisioning.into_provisioning()).await?;
            let secs = t0.elapsed().as_secs_f64();
            let gateway_cpu = procfs::cpu_percent(gw0, pid.and_then(procfs::cpu_ticks), secs);
            let sim_cpu = procfs::cpu_percent(own0, procfs::own_cpu_ticks(), secs);
            let gateway_rss = pid.and_then(procfs::rss_kib).map(|k| k as f64 / 1024.0);
            eprintln!(
                "burst: gateway_cpu={} gateway_rss_mib={} sim_cpu={} over {secs:.1} s",
                gateway_cpu.map_or("-".into(), |c| format!("{c:.0}%")),
                gateway_rss.map_or("-".into(), |r| format!("{r:.0}")),
                sim_cpu.map_or("-".into(), |c| format!("{c:.0}%")),
            );
            if json_only {
                println!("{}", report.to_json());
            } else {
                println!("firmware-sim bench results:");
                print!("{}", report.to_table());
                println!("json: {}", report.to_json());
            }
            if report.is_complete() {
                Ok(ExitCode::SUCCESS)
            } else {
                if let Some(missing) = report.missing().filter(|m| *m > 0) {
                    eprintln!("!!! {missing} messages missing at the gateway !!!");
                }
                Ok(ExitCode::from(EXIT_INCOMPLETE))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_arguments_parse() {
        let cli = Cli::try_parse_from([
            "firmware-sim",
            "run",
            "--transport",
            "ws",
            "--encoding",
            "postcard",
            "--devices",
            "5",
            "--rate",
            "0.5",
            "--duration",
            "30s",
            "--qos",
            "1",
        ])
        .expect("valid arguments");
        let Command::Run(args) = cli.command else {
            panic!("expected run");
        };
        let (config, file, provisioning) = args.into_file();
        assert_eq!(provisioning.tokens_file, PathBuf::from("sim-tokens.json"));
        assert_eq!(config, None);
        let s = RunSettings::resolve(file, RunFile::default()).expect("valid settings");
        assert_eq!(s.transport, Transport::Ws);
        assert_eq!(s.rate, 0.5);
        assert_eq!(s.duration, Some(Duration::from_secs(30)));
        assert_eq!(s.qos, Qos::AtLeastOnce);
        assert!(Cli::try_parse_from(["firmware-sim", "run", "--qos", "2"]).is_err());
        assert!(Cli::try_parse_from(["firmware-sim", "run", "--duration", "soon"]).is_err());
    }

    #[test]
    fn bench_defaults_and_counts() {
        let cli = Cli::try_parse_from(["firmware-sim", "bench"]).expect("defaults");
        let Command::Bench(args) = cli.command else {
            panic!("expected bench");
        };
        assert_eq!(args.devices, 10);
        assert_eq!(args.messages, 1_000_000);
        assert_eq!(args.max_inflight, 64);
        assert_eq!(args.timeout, Duration::from_secs(120));
        assert_eq!(count("2_500"), Ok(2_500));
        assert!(count("many").is_err());
        assert!(Cli::try_parse_from(["firmware-sim", "bench", "--devices", "0"]).is_err());
    }
}
