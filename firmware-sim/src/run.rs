//! The `run` subcommand: a fleet of devices sending at a steady rate until stopped.
//!
//! Every device is an independent task with its own connection, so the gateway sees
//! exactly what a real fleet of that size would produce: N connections, N client ids,
//! and messages spread evenly over time. With several nodes (`--mqtt a,b,c`) devices
//! are spread round-robin and move to the next node when a connection fails; the
//! summary then has a line per node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{RunSettings, Transport};
use crate::device::fleet;
use crate::nodes::{Node, parse_nodes};
use crate::provision::{Provisioning, provision};
use crate::stats::{Tally, report_progress};
use crate::{mqtt, ws};

/// How long stopping devices get to disconnect before they are abandoned.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the fleet until the configured duration elapses or Ctrl-C, then prints a summary.
pub async fn run(settings: RunSettings, provisioning: Provisioning) -> anyhow::Result<()> {
    let https = settings.tls.as_ref().and_then(|t| t.https.as_deref());
    let nodes: Arc<[Node]> = parse_nodes(&settings.mqtt, &settings.http, https)?.into();
    let mut fleet = fleet(&settings.prefix, settings.devices);
    provision(&nodes, &provisioning, &mut fleet).await?;
    let settings = Arc::new(settings);
    let scheme = |plain: &'static str, tls: &'static str| {
        if settings.tls.is_some() { tls } else { plain }
    };
    let target = match settings.transport {
        Transport::Mqtt => format!(
            "{}://{} qos{}",
            scheme("mqtt", "mqtts"),
            settings.mqtt,
            settings.qos.level()
        ),
        Transport::Ws => {
            let https = settings.tls.as_ref().and_then(|t| t.https.as_deref());
            format!(
                "{}://{}",
                scheme("ws", "wss"),
                https.unwrap_or(&settings.http)
            )
        }
    };
    eprintln!(
        "firmware-sim run: {} devices ({}-00000..) -> {target}, {} encoding, {} msg/s per device, {}",
        settings.devices,
        settings.prefix,
        settings.encoding.as_str(),
        settings.rate,
        match settings.duration {
            Some(d) => format!("for {}", humantime::format_duration(d)),
            None => "until Ctrl-C".to_string(),
        },
    );

    let counters = Tally::shared(nodes.len());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut devices = JoinSet::new();
    for device in fleet {
        let (settings, counters, stop) = (settings.clone(), counters.clone(), stop_rx.clone());
        let nodes = nodes.clone();
        match settings.transport {
            Transport::Mqtt => {
                devices.spawn(mqtt::run_device(device, nodes, settings, counters, stop))
            }
            Transport::Ws => devices.spawn(ws::run_device(device, nodes, settings, counters, stop)),
        };
    }
    let reporter = tokio::spawn(report_progress(counters.clone(), settings.devices, stop_rx));

    let start = Instant::now();
    let reason = match settings.duration {
        Some(duration) => tokio::select! {
            () = tokio::time::sleep(duration) => "duration elapsed",
            signal = tokio::signal::ctrl_c() => { signal?; "interrupted" }
        },
        None => {
            tokio::signal::ctrl_c().await?;
            "interrupted"
        }
    };
    let elapsed = start.elapsed();
    eprintln!(
        "stopping ({reason}); disconnecting {} devices...",
        settings.devices
    );
    // Ignoring the error is fine: it only means every receiver is already gone.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
        while devices.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "warning: {} devices did not stop within {SHUTDOWN_TIMEOUT:?}; abandoning them",
            devices.len()
        );
        devices.abort_all();
    }
    let _ = reporter.await;

    let snap = counters.total();
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!("summary ({reason} after {:.1} s):", secs);
    println!("  devices   {}", settings.devices);
    println!(
        "  sent      {} ({:.1} msg/s)",
        snap.sent,
        snap.sent as f64 / secs
    );
    println!("  acked     {}", snap.acked);
    println!("  errors    {}", snap.errors);
    println!("  dropped   {}", snap.dropped);
    println!("  reconnects {}", snap.reconnects);
    if nodes.len() > 1 {
        let mqtt = settings.transport == Transport::Mqtt;
        for (k, (node, s)) in nodes.iter().zip(counters.snapshots()).enumerate() {
            println!(
                "  node {k} {}: connected at the end {}, sent {}, acked {}, errors {}, dropped {}, reconnects {}",
                node.label(mqtt),
                s.connected,
                s.sent,
                s.acked,
                s.errors,
                s.dropped,
                s.reconnects
            );
        }
    }
    Ok(())
}
