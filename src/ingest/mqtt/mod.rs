//! MQTT ingest: fluxgate's own device-facing MQTT 3.1.1 front on tokio. Devices publish
//! their own telemetry, which goes straight into the pipeline (no broker, no log in
//! between), and receive their own commands; nothing else is offered, so nothing else
//! has to be kept per connection.
//!
//! This file owns the listeners, plaintext (`mqtt.listen`, unless `mqtt.plaintext` is
//! off) and mqtts (`[mqtt.tls]`): it accepts (over `mqtt.max_connections`, counted over
//! both, a connection is closed at once, counted), starts one task per connection (which
//! does the TLS handshake itself), and the two kick tasks;
//! at shutdown it stops accepting and waits until every connection has answered what it
//! took and closed. One concept per file:
//! - `codec`: framing and packets, on rumqttc's maintained MQTT 3.1.1 codec (the only
//!   importer of rumqttc);
//! - `connection`: one connection's life (TLS handshake, login, session, end);
//! - `stream`: plain or TLS bytes, read without holding an idle buffer;
//! - `rules`: the protocol discipline, pure (exact device topics, no retain, no
//!   wildcards, identity fixed by the first CONNECT);
//! - `sessions`: the open connections, their credentials, links and outboxes, and the
//!   kept `clean_session = false` sessions;
//! - `kick`: closing revoked (and rate-kicked) devices' connections;
//! - `connect_rate`: the global connect-rate limit;
//! - `commands`: [`MqttCommands`], the handle that sends QoS 1 commands to devices.

mod codec;
mod commands;
mod connect_rate;
mod connection;
mod kick;
mod rules;
mod sessions;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::commands::Commands;
use crate::config::{LimitsConfig, MqttConfig};
use crate::model::{Envelope, QueueBudget};
use crate::observe::{Event, Metrics, MqttCloseReason};
use crate::registry::Registry;
use crate::tls::ReloadableTls;
pub use commands::MqttCommands;
use connect_rate::ConnectRate;
use connection::{Front, FrontTls, Settings};
use sessions::Sessions;
pub use sessions::{CommandError, Delivery};

/// Errors of the MQTT component.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The listen address could not be bound.
    #[error("cannot bind MQTT listener {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The MQTT ingest component: a bound listener, ready to run.
pub struct MqttIngest {
    config: MqttConfig,
    max_frame_bytes: usize,
    max_payload_bytes: usize,
    /// The plaintext listener, unless `mqtt.plaintext` is off.
    plain: Option<Listener>,
    /// The mqtts listener and its TLS configuration, with `mqtt.tls.enabled`.
    tls: Option<(Listener, Arc<ReloadableTls>)>,
    registry: Arc<Registry>,
    sessions: Arc<Sessions>,
}

struct Listener {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Bind a listener with `backlog`, address reuse on.
fn bind(addr: SocketAddr, backlog: u32) -> Result<Listener, MqttError> {
    let bind = |source| MqttError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind)?;
    // A restarted gateway rebinds its port while the old connections' sockets are
    // still in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(bind)?;
    socket.bind(addr).map_err(bind)?;
    let listener = socket.listen(backlog).map_err(bind)?;
    let addr = listener.local_addr().map_err(bind)?;
    Ok(Listener { listener, addr })
}

/// The next connection of `listener`; never, without one.
async fn accept(
    listener: Option<&Listener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.listener.accept().await,
        None => std::future::pending().await,
    }
}

impl MqttIngest {
    /// Bind the listeners (with `mqtt.listen_backlog`): plaintext unless
    /// `mqtt.plaintext` is off, mqtts when `tls` is given. Must be called on the runtime.
    pub fn new(
        config: MqttConfig,
        limits: &LimitsConfig,
        registry: Arc<Registry>,
        tls: Option<Arc<ReloadableTls>>,
    ) -> Result<Self, MqttError> {
        let plain = if config.plaintext {
            Some(bind(config.listen, config.listen_backlog)?)
        } else {
            None
        };
        let tls = match tls {
            Some(tls) => Some((bind(config.tls.listen, config.listen_backlog)?, tls)),
            None => None,
        };
        let sessions = Arc::new(Sessions::new(config.max_connections, config.max_outbound));
        Ok(Self {
            max_frame_bytes: limits.max_frame_bytes,
            max_payload_bytes: limits.max_payload_bytes,
            config,
            plain,
            tls,
            registry,
            sessions,
        })
    }

    /// The plaintext listener's address, unless `mqtt.plaintext` is off.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.plain.as_ref().map(|l| l.addr)
    }

    /// The mqtts listener's address, with `mqtt.tls.enabled`.
    pub fn tls_listen_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(l, _)| l.addr)
    }

    /// The handle that sends commands to connected devices.
    pub fn commands(&self) -> MqttCommands {
        MqttCommands::new(self.sessions.clone())
    }

    /// Accept and serve connections until `shutdown`; then stop accepting, let every
    /// connection answer what it already took (its PUBACKs) and close, and return once
    /// all have ended (so their senders into `output` are gone).
    pub async fn run(
        self,
        output: mpsc::Sender<Envelope>,
        budget: QueueBudget,
        commands: Commands,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        // Subscribed before the first accept, so no revocation can fall between a
        // connection's registration and the kicker's start.
        let revocations = self.registry.revocations();
        let kicker = tokio::spawn(kick::kick_revoked(
            self.registry.clone(),
            self.sessions.clone(),
            revocations,
            metrics.clone(),
            shutdown.clone(),
        ));
        let kicks = tokio::spawn(kick::kick_requested(
            self.registry.clone(),
            self.sessions.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let front = Arc::new(Front {
            registry: self.registry.clone(),
            metrics: metrics.clone(),
            sessions: self.sessions.clone(),
            output,
            budget,
            commands,
            connect_rate: (self.config.connect_rate > 0.0).then(|| {
                std::sync::Mutex::new(ConnectRate::new(
                    self.config.connect_rate,
                    self.config.connect_burst,
                ))
            }),
            settings: Settings {
                max_frame_bytes: self.max_frame_bytes,
                max_payload_bytes: self.max_payload_bytes,
                connect_timeout: self.config.connect_timeout,
                max_keep_alive: self.config.max_keep_alive,
                puback: self.config.puback,
                max_inflight: self.config.max_inflight,
            },
            tls: self.tls.as_ref().map(|(_, tls)| FrontTls {
                config: tls.clone(),
                identity: self.config.tls.identity,
                handshake_timeout: self.config.tls.handshake_timeout,
            }),
            shutdown: shutdown.clone(),
        });
        let open = Arc::new(AtomicUsize::new(0));
        let tracker = TaskTracker::new();
        loop {
            let plain = self.plain.as_ref();
            let tls = self.tls.as_ref().map(|(l, _)| l);
            let (accepted, is_tls) = tokio::select! {
                () = shutdown.cancelled() => break,
                r = accept(plain) => (r, false),
                r = accept(tls) => (r, true),
            };
            let stream = match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: the
                    // listener itself is fine. A short pause keeps an exhausted process
                    // from spinning on the error.
                    tracing::debug!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if open.load(Ordering::Acquire) >= self.config.max_connections {
                drop(stream);
                metrics.emit(Event::MqttClosed {
                    device: "",
                    reason: MqttCloseReason::OverCapacity,
                });
                continue;
            }
            // Small packets (CONNACK, PUBACK) go out at once.
            let _ = stream.set_nodelay(true);
            let slot = Slot::take(&open);
            let front = front.clone();
            tracker.spawn(connection::serve(stream, is_tls, front, slot));
        }
        drop(self.plain);
        drop(self.tls);
        tracker.close();
        tracker.wait().await;
        let _ = kicker.await;
        let _ = kicks.await;
        tracing::debug!("mqtt front stopped");
    }
}

/// One of `mqtt.max_connections`, held by a connection's task.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        Self(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
