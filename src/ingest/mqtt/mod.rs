//! MQTT ingest: the embedded rumqttd broker and the gateway's local-link consumer. This
//! is the only module that imports rumqttd; nothing of its types leaves here.
//!
//! This file sets the broker up: the router runs on its own thread (rumqttd spawns it)
//! and the listener with its connection tasks on a runtime of its own, so stopping the
//! broker is dropping that runtime. The broker's auth handler accepts a CONNECT only
//! with client id = username = a registered, enabled device id and password = its
//! token. One concept per file:
//! - `consumer`: the local-link consumer thread (never blocks; spill, then drop);
//! - `protocol`: [`AclProtocol`](protocol::AclProtocol), rumqttd's codec wrapped with
//!   the protocol discipline, the session table and presence, per connection;
//! - `rules`: the discipline itself, pure (exact device topics, no retain, no
//!   wildcards, identity fixed by the first CONNECT);
//! - `sessions`: the open device connections and the credentials they logged in with;
//! - `kick`: closing revoked devices' connections and releasing the kick link's slot;
//! - `log_filter`: keeping rumqttd's churn lines (logged at ERROR) out of the log;
//! - `probe`: the readiness probe.

mod consumer;
mod kick;
mod log_filter;
mod probe;
mod protocol;
mod rules;
mod sessions;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fluxgate_proto::topic;
use rumqttd::local::{LinkBuilder, LinkRx};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::model::{AuthFailure, Envelope, QueueBudget, Transport};
use crate::observe::{Event, Metrics};
use crate::registry::Registry;
use consumer::Consumer;
pub use log_filter::{BrokerChurnFilter, is_broker_churn};
use protocol::{AclProtocol, Shared};
use sessions::Sessions;

/// The client id of the gateway's own consumer link. The colon is outside the device id
/// alphabet, so no device can take it.
pub const CONSUMER_CLIENT_ID: &str = "fluxgate:consumer";
/// The client id of the readiness probe.
pub(super) const PROBE_CLIENT_ID: &str = "fluxgate:probe";

/// Errors of the MQTT component.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The listen port could not be reserved.
    #[error("cannot bind MQTT listener {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The local link to the router failed.
    #[error("local link to the broker failed: {0}")]
    Link(String),
    /// The broker did not answer on its port in time.
    #[error("the MQTT broker did not come up on {0}")]
    NotReady(SocketAddr),
}

/// The MQTT ingest component.
pub struct MqttIngest {
    config: MqttConfig,
    max_packet_bytes: usize,
    listen: SocketAddr,
    registry: Arc<Registry>,
}

impl MqttIngest {
    /// Resolve the listen address. rumqttd binds internally and never reports the port
    /// it got, so for port 0 a free port is reserved here (bound and released) first.
    pub fn new(
        config: MqttConfig,
        max_packet_bytes: usize,
        registry: Arc<Registry>,
    ) -> Result<Self, MqttError> {
        let mut listen = config.listen;
        if listen.port() == 0 {
            let probe = std::net::TcpListener::bind(listen).map_err(|source| MqttError::Bind {
                addr: listen,
                source,
            })?;
            listen = probe.local_addr().map_err(|source| MqttError::Bind {
                addr: listen,
                source,
            })?;
        }
        Ok(Self {
            config,
            max_packet_bytes,
            listen,
            registry,
        })
    }

    /// The address the broker will listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Run the broker and the consumer until `shutdown`; then stop accepting, drain what
    /// the broker already accepted into `output`, and return. `ready` is answered once
    /// the broker answers MQTT on its port.
    pub async fn run(
        self,
        output: mpsc::Sender<Envelope>,
        budget: QueueBudget,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        ready: oneshot::Sender<Result<SocketAddr, MqttError>>,
    ) {
        // Subscribed before the listener starts, so no revocation can fall between a
        // connection's registration and the kicker's start.
        let revocations = self.registry.revocations();
        let router_config = RouterConfig {
            max_connections: self.config.max_connections + 2,
            max_outgoing_packet_count: 16_384,
            max_segment_size: self.config.segment_bytes,
            max_segment_count: self.config.segment_count,
            ..RouterConfig::default()
        };
        let router_tx = Router::new(0, router_config).spawn();
        // Subscribing before the listener starts guarantees no publish is acked and
        // dropped for lack of a subscriber.
        let link_tx = router_tx.clone();
        let link = tokio::task::spawn_blocking(move || -> Result<LinkRx, MqttError> {
            let (mut tx, rx, _ack) = LinkBuilder::new(CONSUMER_CLIENT_ID, link_tx)
                .build()
                .map_err(|e| MqttError::Link(e.to_string()))?;
            for filter in [topic::TELEMETRY_FILTER, topic::TELEMETRY_BIN_FILTER] {
                tx.subscribe(filter)
                    .map_err(|e| MqttError::Link(e.to_string()))?;
            }
            // The sending half is not needed again but must stay alive with the link.
            std::mem::forget(tx);
            Ok(rx)
        })
        .await;
        let link_rx = match link {
            Ok(Ok(rx)) => rx,
            Ok(Err(e)) => {
                let _ = ready.send(Err(e));
                return;
            }
            Err(e) => {
                let _ = ready.send(Err(MqttError::Link(e.to_string())));
                return;
            }
        };

        // The readiness probe authenticates with a secret that exists only in this process.
        let probe_secret = match crate::registry::secret::generate("probe_") {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(MqttError::Link(e.to_string())));
                return;
            }
        };
        let mut settings = ServerSettings {
            name: "fluxgate-mqtt".to_owned(),
            listen: self.listen,
            tls: None,
            // rumqttd sleeps this long after every accept; 0 lets devices reconnect en masse.
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: u16::try_from(self.config.connect_timeout.as_millis())
                    .unwrap_or(u16::MAX),
                max_payload_size: self.max_packet_bytes,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let sessions = Arc::new(Sessions::default());
        let (auth_registry, auth_metrics, auth_probe, auth_sessions) = (
            self.registry.clone(),
            metrics.clone(),
            probe_secret.clone(),
            sessions.clone(),
        );
        settings.set_auth_handler(
            move |client_id: String, username: String, password: String| {
                let outcome = if client_id == PROBE_CLIENT_ID {
                    if crate::registry::secret::hashes_equal(
                        &crate::registry::secret::hash(&password),
                        &crate::registry::secret::hash(&auth_probe),
                    ) {
                        Ok(())
                    } else {
                        Err(AuthFailure::BadToken)
                    }
                } else {
                    auth_registry.authenticate_mqtt(&client_id, &username, &password)
                };
                match outcome {
                    Ok(()) => auth_sessions.successor_authenticated(&client_id),
                    Err(reason) => auth_metrics.emit(Event::AuthRefused {
                        transport: Transport::Mqtt,
                        device: &client_id,
                        reason,
                    }),
                }
                std::future::ready(outcome.is_ok())
            },
        );
        let stopping = Arc::new(AtomicBool::new(false));
        let protocol = AclProtocol::new(Arc::new(Shared {
            registry: self.registry.clone(),
            metrics: metrics.clone(),
            sessions: sessions.clone(),
            stopping: stopping.clone(),
        }));
        let (stop_server, server_stopped) = std::sync::mpsc::channel::<()>();
        let server_router_tx = router_tx.clone();
        let server_thread = std::thread::Builder::new()
            .name("mqtt-server".to_owned())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("mqtt-conn")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the MQTT runtime");
                        return;
                    }
                };
                rt.spawn(async move {
                    let mut server = Server::new(settings, server_router_tx, protocol);
                    if let Err(e) = server.start(LinkType::Remote).await {
                        tracing::error!(error = %e, "MQTT listener stopped");
                    }
                });
                let _ = server_stopped.recv();
                // Dropping the runtime cancels the listener and every connection task.
                rt.shutdown_background();
            });
        let server_thread = match server_thread {
            Ok(t) => t,
            Err(e) => {
                let _ = ready.send(Err(MqttError::Link(e.to_string())));
                return;
            }
        };

        let listen = self.listen;
        let probe =
            tokio::task::spawn_blocking(move || probe::probe_ready(listen, &probe_secret)).await;
        if !matches!(probe, Ok(true)) {
            let _ = stop_server.send(());
            let _ = ready.send(Err(MqttError::NotReady(listen)));
            return;
        }
        let _ = ready.send(Ok(listen));

        let draining = Arc::new(AtomicBool::new(false));
        let metrics_for_kicker = metrics.clone();
        let consumer = Consumer {
            link: link_rx,
            output,
            budget,
            metrics,
            spill: VecDeque::new(),
            spill_bytes: 0,
            max_spill_bytes: self.config.spill_bytes,
            draining: draining.clone(),
            cursors: [None, None],
        };
        let (done_tx, done_rx) = oneshot::channel();
        let consumer_thread = std::thread::Builder::new()
            .name("mqtt-consumer".to_owned())
            .spawn(move || {
                consumer.run();
                let _ = done_tx.send(());
            });
        if let Err(e) = consumer_thread {
            tracing::error!(error = %e, "cannot start the MQTT consumer thread");
            let _ = stop_server.send(());
            return;
        }

        // Revoked devices lose their MQTT connection at once: registering a link under
        // the device's client id makes the router drop the existing connection with that
        // id, and releasing the link frees its slot again (see `kick`).
        let kick_tx = router_tx.clone();
        let kick = move |id: &str| {
            let (tx, _rx, _ack) = LinkBuilder::new(id, kick_tx.clone())
                .build()
                .map_err(|e| e.to_string())?;
            kick::release_link(tx)
        };
        let kicks = tokio::spawn(kick::kick_requested(
            self.registry.clone(),
            kick.clone(),
            metrics_for_kicker.clone(),
            shutdown.clone(),
        ));
        let kicker = tokio::spawn(kick::kick_revoked(
            self.registry.clone(),
            sessions,
            revocations,
            kick,
            metrics_for_kicker,
            shutdown.clone(),
        ));

        shutdown.cancelled().await;
        let _ = kicker.await;
        let _ = kicks.await;
        // Stop accepting and close device connections first, so that what the broker
        // has acknowledged is final; then let the consumer drain it.
        stopping.store(true, Ordering::Release);
        let _ = stop_server.send(());
        let _ = tokio::task::spawn_blocking(move || server_thread.join()).await;
        draining.store(true, Ordering::Release);
        let _ = done_rx.await;
        tracing::debug!("mqtt ingest drained and stopped");
    }
}
