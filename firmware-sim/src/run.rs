//! The `run` subcommand: a fleet of devices sending at a steady rate until stopped.
//!
//! Every device is an independent task with its own connection, so the gateway sees
//! exactly what a real fleet of that size would produce: N connections, N client ids,
//! and messages spread evenly over time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};

use crate::config::{RunSettings, Transport};
use crate::device::fleet;
use crate::provision::{Provisioning, provision};
use crate::stats::{Counters, report_progress};
use crate::{mqtt, ws};

/// How long stopping devices get to disconnect before they are abandoned.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Completes once `stop` becomes true, or when its sender is gone (which can only
/// mean the simulation is over).
///
/// This wraps [`watch::Receiver::wait_for`] because the guard that returns must not be
/// held across an `.await` inside `tokio::select!` (it is not `Send`).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// A ticker firing `rate` times per second, with a random first tick.
///
/// Starting each device at a random point within its first period spreads a fleet that
/// was started all at once evenly over the period; otherwise every device would publish
/// in the same millisecond each period. Missed ticks (a slow connection) are skipped
/// rather than bursted, like a sensor that samples on a fixed schedule.
pub fn device_ticker(rate: f64) -> Interval {
    let period = Duration::try_from_secs_f64(1.0 / rate)
        .ok()
        .filter(|p| !p.is_zero())
        .unwrap_or(Duration::from_secs(1));
    let first = tokio::time::Instant::now() + period.mul_f64(fastrand::f64());
    let mut ticker = tokio::time::interval_at(first, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    ticker
}

/// Runs the fleet until the configured duration elapses or Ctrl-C, then prints a summary.
pub async fn run(settings: RunSettings, provisioning: Provisioning) -> anyhow::Result<()> {
    let mut fleet = fleet(&settings.prefix, settings.devices);
    provision(&settings.http, &provisioning, &mut fleet).await?;
    let settings = Arc::new(settings);
    let target = match settings.transport {
        Transport::Mqtt => format!("mqtt://{} qos{}", settings.mqtt, settings.qos.level()),
        Transport::Ws => format!("ws://{}", settings.http),
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

    let counters = Counters::shared();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut devices = JoinSet::new();
    for device in fleet {
        let (settings, counters, stop) = (settings.clone(), counters.clone(), stop_rx.clone());
        match settings.transport {
            Transport::Mqtt => devices.spawn(mqtt::run_device(device, settings, counters, stop)),
            Transport::Ws => devices.spawn(ws::run_device(device, settings, counters, stop)),
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

    let snap = counters.snapshot();
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticker_fires_at_the_requested_rate() {
        let mut ticker = device_ticker(50.0);
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            ticker.tick().await;
        }
        // The first tick is within the first 20 ms, then ten more 20 ms periods. The upper
        // bound is loose because a busy CI machine may schedule the task late.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed <= Duration::from_secs(2), "{elapsed:?}");
    }

    #[test]
    fn absurd_rates_do_not_panic() {
        // Validation rejects these before they get here, but the ticker must not panic.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
                let _ = device_ticker(rate);
            }
        });
    }
}
