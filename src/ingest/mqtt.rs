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

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fluxgate_proto::topic::{self, TopicKind};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx};
use rumqttd::protocol::v4::V4;
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::model::{Encoding, Envelope, Transport, now_ms};
use crate::observe::{DropReason, Event, Metrics, Queue};

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
}

impl MqttIngest {
    /// Resolve the listen address. rumqttd binds internally and never reports the port
    /// it got, so for port 0 a free port is reserved here (bound and released) first.
    pub fn new(config: MqttConfig, max_packet_bytes: usize) -> Result<Self, MqttError> {
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

        let settings = ServerSettings {
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
                    let mut server = Server::new(settings, server_router_tx, V4);
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
        let probe = tokio::task::spawn_blocking(move || probe_ready(listen)).await;
        if !matches!(probe, Ok(true)) {
            let _ = stop_server.send(());
            let _ = ready.send(Err(MqttError::NotReady(listen)));
            return;
        }
        let _ = ready.send(Ok(listen));

        let draining = Arc::new(AtomicBool::new(false));
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

        shutdown.cancelled().await;
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
fn probe_ready(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = match addr.ip() {
        ip if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        _ => addr,
    };
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let id = PROBE_CLIENT_ID.as_bytes();
            // CONNECT, MQTT 3.1.1, clean session, keepalive 10 s.
            let mut packet = vec![0x10, (10 + 2 + id.len()) as u8];
            packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10]);
            packet.extend_from_slice(&[0, id.len() as u8]);
            packet.extend_from_slice(id);
            let mut connack = [0u8; 4];
            if s.write_all(&packet).is_ok() && s.read_exact(&mut connack).is_ok() {
                return connack[0] == 0x20 && connack[3] == 0;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
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
            self.metrics.emit(Event::Dropped {
                reason: DropReason::UnknownTopic,
                count: 1,
            });
            return;
        };
        if let Some(offset) = offset {
            if let Some(last) = self.cursors[filter] {
                if offset > last + 1 {
                    self.metrics.emit(Event::Dropped {
                        reason: DropReason::MqttCursorJump,
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
                Err(mpsc::error::TrySendError::Closed(_)) => self.metrics.emit(Event::Dropped {
                    reason: DropReason::ShuttingDown,
                    count: 1,
                }),
            }
        } else {
            self.push_spill(envelope);
        }
    }

    fn push_spill(&mut self, envelope: Envelope) {
        let size = envelope.payload.len() + envelope.device.len() + 64;
        if self.spill_bytes + size > self.max_spill_bytes {
            self.metrics.emit(Event::Dropped {
                reason: DropReason::MqttSpillFull,
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
                    self.metrics.emit(Event::Dropped {
                        reason: DropReason::ShuttingDown,
                        count: lost,
                    });
                }
            }
        }
        self.metrics
            .set_queue_depth(Queue::MqttSpill, self.spill.len());
    }
}
