//! MQTT ingest: the embedded rumqttd broker and the gateway's local-link consumer. This
//! is the only module that imports rumqttd; nothing of its types leaves here.
//!
//! The router runs on its own thread (rumqttd spawns it) and the listener with its
//! connection tasks on a runtime of its own, so stopping the broker is dropping that
//! runtime. The consumer is a dedicated thread that never blocks on the pipeline: when
//! the pipeline queue is full it spills into a bounded in-memory queue, and only when
//! that is full too does it drop, counted (`mqtt_spill_full`). A consumer that blocked
//! would let rumqttd's segments roll over under it, which loses data with no error; those
//! jumps are detected from the forward cursors and counted (`mqtt_cursor_jump`).
//!
//! Security: the broker's auth handler accepts a CONNECT only with client id = username
//! = a registered, enabled device id and password = its token. rumqttd has no ACLs, so
//! [`AclProtocol`] wraps its v4 codec (rumqttd clones the codec per connection and passes
//! every packet through it): it remembers the CONNECT identity and closes the connection
//! on a PUBLISH, SUBSCRIBE or will outside `devices/{own id}/`. Revoked devices are
//! disconnected by taking over their client id with a local link, which makes the router
//! drop the old connection (MQTT's rule for duplicate client ids).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytes::BytesMut;
use fluxgate_proto::topic::{self, TopicKind};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{ConnectReturnCode, Packet, Protocol};
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::model::AuthFailure;
use crate::model::{Encoding, Envelope, Transport, now_ms};
use crate::observe::{Event, MessageDropReason, Metrics, Queue};
use crate::registry::Registry;

/// The client id of the gateway's own consumer link. The colon is outside the device id
/// alphabet, so no device can take it.
pub const CONSUMER_CLIENT_ID: &str = "fluxgate:consumer";
/// The client id of the readiness probe.
const PROBE_CLIENT_ID: &str = "fluxgate:probe";

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
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        ready: oneshot::Sender<Result<SocketAddr, MqttError>>,
    ) {
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
        let (auth_registry, auth_metrics, auth_probe) =
            (self.registry.clone(), metrics.clone(), probe_secret.clone());
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
                if let Err(reason) = outcome {
                    auth_metrics.emit(Event::AuthRefused {
                        transport: Transport::Mqtt,
                        device: &client_id,
                        reason,
                    });
                }
                std::future::ready(outcome.is_ok())
            },
        );
        let protocol = AclProtocol::new(self.registry.clone(), metrics.clone());
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
        let probe = tokio::task::spawn_blocking(move || probe_ready(listen, &probe_secret)).await;
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

        // Revoked devices lose their MQTT connection at once.
        let kick_tx = router_tx.clone();
        // Registering a link under the device's client id makes the router drop the
        // existing connection with that id. The link itself is dropped right away; the
        // router replaces it when the device connects again.
        let kick = move |id: &str| {
            LinkBuilder::new(id, kick_tx.clone())
                .build()
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let kicks = tokio::spawn(kick_requested(
            self.registry.clone(),
            kick.clone(),
            metrics_for_kicker.clone(),
            shutdown.clone(),
        ));
        let kicker = tokio::spawn(kick_revoked(
            self.registry.clone(),
            kick,
            metrics_for_kicker,
            shutdown.clone(),
        ));

        shutdown.cancelled().await;
        let _ = kicker.await;
        let _ = kicks.await;
        // Stop accepting and close device connections first, so that what the broker
        // has acknowledged is final; then let the consumer drain it.
        let _ = stop_server.send(());
        let _ = tokio::task::spawn_blocking(move || server_thread.join()).await;
        draining.store(true, Ordering::Release);
        let _ = done_rx.await;
        tracing::debug!("mqtt ingest drained and stopped");
    }
}

/// Connect as the probe client and wait for CONNACK: proves the listener is bound and
/// the router answers, without a failed-handshake error in rumqttd's log.
fn probe_ready(addr: SocketAddr, secret: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = match addr.ip() {
        ip if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        _ => addr,
    };
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut payload = Vec::new();
            for field in [PROBE_CLIENT_ID, PROBE_CLIENT_ID, secret] {
                payload.extend_from_slice(&(field.len() as u16).to_be_bytes());
                payload.extend_from_slice(field.as_bytes());
            }
            // CONNECT, MQTT 3.1.1, username + password + clean session, keepalive 10 s.
            let mut packet = vec![0x10, (10 + payload.len()) as u8];
            packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 10]);
            packet.extend_from_slice(&payload);
            let mut connack = [0u8; 4];
            if s.write_all(&packet).is_ok() && s.read_exact(&mut connack).is_ok() {
                return connack[0] == 0x20 && connack[3] == 0;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Close the MQTT connections of devices the pipeline asked to disconnect (over
/// `limits.device_rate` with `device_rate_action = "disconnect"`). Their credentials stay
/// valid: they may connect again, and are refused again while over the rate.
async fn kick_requested<K>(
    registry: Arc<Registry>,
    kick: K,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    K: Fn(&str) -> Result<(), String> + Clone + Send + Sync + 'static,
{
    let mut kicks = registry.kicks();
    loop {
        let id = tokio::select! {
            () = shutdown.cancelled() => return,
            r = kicks.recv() => match r {
                Ok((id, Transport::Mqtt)) => id,
                // Another transport's kick, or missed kicks: a device still over its
                // rate keeps having its messages refused and is kicked on the next one.
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        let (kick, client) = (kick.clone(), id.clone());
        // Building a link waits for the router's answer: a blocking call.
        match tokio::task::spawn_blocking(move || kick(&client)).await {
            Ok(Ok(())) => metrics.emit(Event::DeviceKicked {
                device: &id,
                transport: Transport::Mqtt,
            }),
            Ok(Err(e)) => {
                tracing::warn!(device = &*id, error = %e, "could not close MQTT connection")
            }
            Err(e) => {
                tracing::warn!(device = &*id, error = %e, "could not close MQTT connection")
            }
        }
    }
}

/// Close the MQTT connections of devices that were disabled, deleted or re-keyed.
async fn kick_revoked<K>(
    registry: Arc<Registry>,
    kick: K,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    K: Fn(&str) -> Result<(), String> + Clone + Send + Sync + 'static,
{
    let mut revocations = registry.revocations();
    loop {
        let ids: Vec<Arc<str>> = tokio::select! {
            () = shutdown.cancelled() => return,
            r = revocations.recv() => match r {
                Ok(id) => vec![id],
                // Missed events: re-check every connected device that is now invalid.
                // (A missed re-key of a still-enabled device is not visible here; it is
                // caught when that device reconnects.)
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => registry
                    .connected_devices()
                    .into_iter()
                    .filter(|id| registry.get(id).is_none_or(|d| !d.record.fields.enabled))
                    .collect(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        for id in ids {
            let (kick, client) = (kick.clone(), id.clone());
            // Building a link waits for the router's answer: a blocking call.
            let kicked = tokio::task::spawn_blocking(move || kick(&client)).await;
            match kicked {
                Ok(Ok(())) => metrics.emit(Event::DeviceKicked {
                    device: &id,
                    transport: Transport::Mqtt,
                }),
                Ok(Err(e)) => {
                    tracing::error!(device = &*id, error = %e, "could not close MQTT connection")
                }
                Err(e) => {
                    tracing::error!(device = &*id, error = %e, "could not close MQTT connection")
                }
            }
        }
    }
}

/// rumqttd's v4 codec with a per-connection topic ACL and presence tracking. rumqttd
/// clones the value given to `Server::new` for every connection, so each connection has
/// its own `client` and `connected`.
struct AclProtocol {
    inner: V4,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// The client id from CONNECT, and the topic prefix it may publish under.
    client: Option<(Arc<str>, String)>,
    /// Set once the broker accepted the connection (CONNACK success written).
    connected: AtomicBool,
}

impl AclProtocol {
    fn new(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: V4,
            registry,
            metrics,
            client: None,
            connected: AtomicBool::new(false),
        }
    }

    fn violation(&self, action: &'static str, topic: &str) -> rumqttd::protocol::Error {
        let device = self.client.as_ref().map_or("", |(id, _)| &**id);
        self.metrics.emit(Event::AclViolation {
            device,
            action,
            topic,
        });
        rumqttd::protocol::Error::InvalidProtocol
    }

    fn allowed_topic(&self, topic: &[u8]) -> bool {
        self.client
            .as_ref()
            .is_some_and(|(_, prefix)| topic.starts_with(prefix.as_bytes()))
    }
}

impl Clone for AclProtocol {
    fn clone(&self) -> Self {
        Self::new(self.registry.clone(), self.metrics.clone())
    }
}

impl Protocol for AclProtocol {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, rumqttd::protocol::Error> {
        let packet = self.inner.read_mut(stream, max_size)?;
        match &packet {
            Packet::Connect(connect, _, will, _, login) => {
                // rumqttd refuses a CONNECT without credentials before it asks the auth
                // handler, so that refusal is counted here.
                if login.is_none() && connect.client_id != PROBE_CLIENT_ID {
                    self.metrics.emit(Event::AuthRefused {
                        transport: Transport::Mqtt,
                        device: &connect.client_id,
                        reason: AuthFailure::Missing,
                    });
                }
                let id: Arc<str> = Arc::from(connect.client_id.as_str());
                self.client = Some((id, format!("devices/{}/", connect.client_id)));
                if let Some(will) = will {
                    if !self.allowed_topic(&will.topic) && connect.client_id != PROBE_CLIENT_ID {
                        return Err(
                            self.violation("publish", &String::from_utf8_lossy(&will.topic))
                        );
                    }
                }
            }
            Packet::Publish(publish, _) if !self.allowed_topic(&publish.topic) => {
                return Err(self.violation("publish", &String::from_utf8_lossy(&publish.topic)));
            }
            Packet::Subscribe(subscribe, _) => {
                let own = self
                    .client
                    .as_ref()
                    .map(|(id, _)| topic::commands(id))
                    .unwrap_or_default();
                if let Some(f) = subscribe.filters.iter().find(|f| f.path != own) {
                    return Err(self.violation("subscribe", &f.path));
                }
            }
            _ => {}
        }
        Ok(packet)
    }

    fn write(
        &self,
        packet: Packet,
        write: &mut BytesMut,
    ) -> Result<usize, rumqttd::protocol::Error> {
        if let (Packet::ConnAck(ack, _), Some((id, _))) = (&packet, &self.client) {
            if ack.code == ConnectReturnCode::Success
                && &**id != PROBE_CLIENT_ID
                && !self.connected.swap(true, Ordering::Relaxed)
            {
                self.registry.connected(id, Transport::Mqtt);
            }
        }
        self.inner.write(packet, write)
    }
}

impl Drop for AclProtocol {
    fn drop(&mut self) {
        if self.connected.load(Ordering::Relaxed) {
            if let Some((id, _)) = &self.client {
                self.registry.disconnected(id);
            }
        }
    }
}

struct Consumer {
    link: LinkRx,
    output: mpsc::Sender<Envelope>,
    metrics: Arc<Metrics>,
    spill: VecDeque<Envelope>,
    spill_bytes: usize,
    max_spill_bytes: usize,
    draining: Arc<AtomicBool>,
    /// Last forward cursor seen per filter (JSON, binary), to detect rumqttd skipping
    /// data that rolled out of its segments.
    cursors: [Option<u64>; 2],
}

impl Consumer {
    fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        loop {
            let draining = self.draining.load(Ordering::Acquire);
            let wait = if self.spill.is_empty() { 50 } else { 1 };
            match self
                .link
                .recv_deadline(Instant::now() + Duration::from_millis(wait))
            {
                Ok(Some(Notification::Forward(forward))) => {
                    idle_since = None;
                    let offset = forward.cursor.map(|c| c.1);
                    self.accept(forward.publish.topic, forward.publish.payload, offset);
                }
                Ok(Some(Notification::Unschedule)) => {
                    // The router paused this link because its buffer filled; without
                    // `ready()` it would never resume.
                    if self.link.ready().is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(LinkError::RecvTimeout(_)) => {
                    if draining {
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_millis(200) && self.spill.is_empty() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "MQTT local link failed");
                    break;
                }
            }
            self.unspill(draining);
        }
        self.unspill(true);
    }

    fn accept(&mut self, topic_bytes: Bytes, payload: Bytes, offset: Option<u64>) {
        let parsed = std::str::from_utf8(&topic_bytes)
            .ok()
            .and_then(topic::parse)
            .and_then(|(device, kind)| match kind {
                TopicKind::Telemetry => Some((device, Encoding::Json, 0)),
                TopicKind::TelemetryBin => Some((device, Encoding::Postcard, 1)),
                _ => None,
            });
        let Some((device, encoding, filter)) = parsed else {
            self.metrics.emit(Event::MessagesDropped {
                reason: MessageDropReason::UnknownTopic,
                count: 1,
            });
            return;
        };
        if let Some(offset) = offset {
            if let Some(last) = self.cursors[filter] {
                if offset > last + 1 {
                    self.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::MqttCursorJump,
                        count: offset - last - 1,
                    });
                }
            }
            self.cursors[filter] = Some(offset);
        }
        let envelope = Envelope {
            device: Arc::from(device),
            transport: Transport::Mqtt,
            encoding,
            payload,
            received_at_ms: now_ms(),
            ack: None,
        };
        if self.spill.is_empty() {
            match self.output.try_send(envelope) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(e)) => self.push_spill(e),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::ShuttingDown,
                        count: 1,
                    })
                }
            }
        } else {
            self.push_spill(envelope);
        }
    }

    fn push_spill(&mut self, envelope: Envelope) {
        let size = envelope.payload.len() + envelope.device.len() + 64;
        if self.spill_bytes + size > self.max_spill_bytes {
            self.metrics.emit(Event::MessagesDropped {
                reason: MessageDropReason::MqttSpillFull,
                count: 1,
            });
            return;
        }
        self.spill_bytes += size;
        self.spill.push_back(envelope);
        self.metrics
            .set_queue_depth(Queue::MqttSpill, self.spill.len());
    }

    /// Move spilled messages to the pipeline: without waiting normally, and waiting for
    /// room when draining at shutdown (nothing new arrives then).
    fn unspill(&mut self, wait: bool) {
        if self.spill.is_empty() {
            return;
        }
        while let Some(envelope) = self.spill.pop_front() {
            let size = envelope.payload.len() + envelope.device.len() + 64;
            let result = if wait {
                self.output.blocking_send(envelope).map_err(|e| (true, e.0))
            } else {
                self.output.try_send(envelope).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(e) => (false, e),
                    mpsc::error::TrySendError::Closed(e) => (true, e),
                })
            };
            match result {
                Ok(()) => self.spill_bytes -= size,
                Err((false, envelope)) => {
                    self.spill.push_front(envelope);
                    break;
                }
                Err((true, _)) => {
                    let lost = self.spill.len() as u64 + 1;
                    self.spill.clear();
                    self.spill_bytes = 0;
                    self.metrics.emit(Event::MessagesDropped {
                        reason: MessageDropReason::ShuttingDown,
                        count: lost,
                    });
                }
            }
        }
        self.metrics
            .set_queue_depth(Queue::MqttSpill, self.spill.len());
    }
}
