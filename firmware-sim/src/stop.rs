//! The stop signal every long-running task of the simulator listens to.
//!
//! `run` and `bench` tell their device tasks and progress reporters to finish through a
//! `tokio::sync::watch` channel carrying `bool`. Waiting for it is needed by the
//! transports, the progress reporter and the drivers alike, so the helper lives here, on
//! its own, rather than in any one of them: a transport must not have to import the
//! subcommand that spawns it just to learn when to stop.

use tokio::sync::watch;

/// Completes once `stop` becomes true, or when its sender is gone (which can only
/// mean the simulation is over).
///
/// This wraps [`watch::Receiver::wait_for`] because the guard that returns must not be
/// held across an `.await` inside `tokio::select!` (it is not `Send`).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
