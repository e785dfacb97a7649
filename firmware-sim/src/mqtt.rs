//! MQTT devices: one rumqttc client and event loop per simulated device.
//!
//! rumqttc splits a connection into an [`AsyncClient`] (a handle that queues requests)
//! and an [`EventLoop`] that does all network I/O and must be polled continuously. Each
//! device therefore runs two tasks: a publisher that generates messages into the client,
//! and [`drive`], which polls the event loop, counts what actually went over the wire
//! and reconnects with jittered backoff.
//!
//! `run` devices subscribe to their command topic after every CONNACK and answer the
//! commands that arrive (see `commands`): the reply goes out `--reply-latency` later, and
//! `set_period` changes the publisher's sending period through a watch channel.
//!
//! With `--tls` the connection is mqtts (rumqttc with rustls), trusting only `--ca`; a
//! device with a client certificate sends no username or password.
//!
//! "Sent" is counted on `Outgoing::Publish` events, i.e. when the event loop has written
//! and flushed the PUBLISH packet, not when it was queued in the client; only that number
//! is comparable with what the gateway receives.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
    TlsConfiguration,
};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::bench_ctx::BenchCtx;
use crate::clock::now_ms;
use crate::commands::{self, CommandSettings, Effect};
use crate::config::{Encoding, Qos, RunSettings};
use crate::device::{Device, MessageSource};
use crate::nodes::{Node, home, next, validate_host_port};
use crate::stats::{ConnectedGuard, Counters, Tally, micros};
use crate::stop::stopped;
use crate::ticker::{device_ticker, ticker_every};
use crate::tls::TlsSettings;

/// Keep-alive interval; short enough to notice a dead gateway within a minute.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Seconds rumqttc waits for the TCP connect plus CONNACK.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// How long a stopping device may take to send its DISCONNECT before it is dropped.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// Request queue between a `run` publisher and its event loop. Small on purpose: while
/// disconnected, a device should drop new readings (counted) rather than pile them up.
const RUN_QUEUE: usize = 16;
/// Request queue for `bench`; deep enough that the event loop never waits for the
/// publisher task, which keeps the socket busy.
const BENCH_QUEUE: usize = 1_024;
/// Maximum unacknowledged QoS 1 publishes per connection.
pub const BENCH_INFLIGHT: u16 = 100;

/// The telemetry topic for `encoding`.
pub fn topic_for(device_id: &str, encoding: Encoding) -> String {
    match encoding {
        Encoding::Json => fluxgate_proto::topic::telemetry(device_id),
        Encoding::Postcard => fluxgate_proto::topic::telemetry_bin(device_id),
    }
}

/// The connection options of `device` for the broker at `addr` (`HOST:PORT`),
/// presenting the device's credentials for node `node`.
pub fn options_for(
    device: &Device,
    addr: &str,
    node: usize,
    inflight: u16,
    tls: Option<&TlsSettings>,
) -> anyhow::Result<MqttOptions> {
    let (host, port) = validate_host_port(addr)?;
    // The gateway identifies devices by MQTT client id, so it must be the device id.
    let mut options = MqttOptions::new(device.id.clone(), host, port);
    options
        .set_keep_alive(KEEP_ALIVE)
        // A clean session keeps the broker from holding state for thousands of simulated
        // devices between runs; the simulator does not need queued messages redelivered.
        .set_clean_session(true)
        .set_inflight(inflight.max(1));
    // A client certificate names the device; it then needs no token.
    let cert_auth = tls.is_some_and(TlsSettings::client_certs);
    if let (Some(credentials), false) = (device.credentials(node), cert_auth) {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    if let Some(tls) = tls {
        let config = tls.config_for(&device.id)?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            TlsConfiguration::Rustls(config),
        ));
    }
    Ok(options)
}

/// Builds the client and event loop of `device` for the broker at `addr` (`HOST:PORT`),
/// with the device's credentials for node `node`.
pub fn client_for(
    device: &Device,
    addr: &str,
    node: usize,
    inflight: u16,
    queue: usize,
    tls: Option<&TlsSettings>,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let options = options_for(device, addr, node, inflight, tls)?;
    let (client, mut eventloop) = AsyncClient::new(options, queue);
    let mut network = NetworkOptions::new();
    // Telemetry messages are small; Nagle's algorithm would only add latency.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// Where one device connects and where it goes after a connection failure: its current
/// node of the list, and what it needs to rebuild its options for the next one.
pub struct Route<'a> {
    /// The device (its id and per-node credentials).
    pub device: &'a Device,
    /// Every node, in list order.
    pub nodes: &'a [Node],
    /// The node the device is connected to or trying.
    pub node: usize,
    /// The per-node counters; the device counts into its current node's.
    pub tally: &'a Tally,
    /// Unacknowledged QoS 1 publishes allowed.
    pub inflight: u16,
    /// TLS settings, if any.
    pub tls: Option<&'a TlsSettings>,
}

impl Route<'_> {
    /// The counters of the current node.
    fn counters(&self) -> &Arc<Counters> {
        self.tally.node(self.node)
    }

    /// After a failure: point the event loop at the next node (nothing changes with one
    /// node). rumqttc keeps its request queue and session state across this, so the
    /// publisher's client handle stays valid.
    fn move_on(&mut self, eventloop: &mut EventLoop) {
        if self.nodes.len() < 2 {
            return;
        }
        let node = next(self.node, self.nodes.len());
        match options_for(
            self.device,
            &self.nodes[node].mqtt,
            node,
            self.inflight,
            self.tls,
        ) {
            Ok(options) => {
                eventloop.mqtt_options = options;
                self.node = node;
            }
            // The same settings built the first options, so this cannot fail in
            // practice; staying on the current node is the safe answer if it does.
            Err(e) => self
                .counters()
                .error(|| format!("{}: cannot move to node {node}: {e:#}", self.device.id)),
        }
    }
}

/// Polls `eventloop` until the device has disconnected after `shutdown`, counting sent
/// messages, PUBACKs and errors into the current node's counters, and reconnecting with
/// backoff after failures, each time to the next node of `route`.
///
/// With `track_latency`, the time from writing each QoS 1 PUBLISH to its PUBACK is
/// recorded and returned (in microseconds).
///
/// The event loop is never cancelled in the middle of a `poll` except when the shutdown
/// grace period has run out, because a cancelled poll may leave a half-written packet
/// behind; after that the connection is dropped rather than reused.
pub async fn drive(
    mut eventloop: EventLoop,
    mut route: Route<'_>,
    shutdown: watch::Receiver<bool>,
    track_latency: bool,
    mut commands: Option<CommandHandler>,
) -> Vec<u32> {
    let device_id = route.device.id.as_str();
    let mut guard = ConnectedGuard::new(route.counters().clone());
    let mut backoff = Backoff::default();
    let mut inflight: HashMap<u16, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let mut connected_before = false;
    let stopping = shutdown.clone();
    let mut grace_rx = shutdown;
    let grace = async move {
        stopped(&mut grace_rx).await;
        tokio::time::sleep(DISCONNECT_GRACE).await;
    };
    tokio::pin!(grace);

    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = &mut grace => break,
        };
        // Through the tally reference, not `route`, which moves on after a failure.
        let tally = route.tally;
        let counters = tally.node(route.node);
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                guard.up();
                backoff.reset();
                if connected_before {
                    Counters::inc(&counters.reconnects);
                }
                connected_before = true;
                // A clean session forgets subscriptions: subscribe on every connection.
                if let Some(handler) = &commands
                    && handler
                        .client
                        .try_subscribe(handler.topic.clone(), QoS::AtLeastOnce)
                        .is_err()
                {
                    counters.error(|| format!("{device_id}: cannot subscribe to commands"));
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if let Some(handler) = &mut commands {
                    handler.handle(&publish.topic, &publish.payload, counters);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                Counters::inc(&counters.acked);
                if let Some(sent_at) = inflight.remove(&ack.pkid) {
                    latencies.push(micros(sent_at.elapsed()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                Counters::inc(&counters.sent);
                // Packet id 0 is QoS 0, which is never acknowledged.
                if track_latency && pkid != 0 {
                    inflight.insert(pkid, Instant::now());
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(error) => {
                guard.down();
                // Unacknowledged publishes of a clean session are gone after reconnecting,
                // so their timers must not be matched against new packets.
                inflight.clear();
                if *stopping.borrow() {
                    break;
                }
                let delay = backoff.next_delay();
                let from = route.node;
                route.move_on(&mut eventloop);
                let moved = if route.node == from {
                    String::new()
                } else {
                    format!(", moving to node {}", route.node)
                };
                counters.error(|| {
                    format!("{device_id}: MQTT: {error} (retrying in {delay:.1?}{moved})")
                });
                // The next connection counts into the node it goes to.
                guard = ConnectedGuard::new(route.counters().clone());
                // rumqttc reconnects on the very next poll, so the backoff is ours to do.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut grace => break,
                }
            }
        }
    }
    latencies
}

/// Runs one device of `run` until `shutdown`, starting on its home node of `nodes`.
pub async fn run_device(
    device: Device,
    nodes: Arc<[Node]>,
    settings: Arc<RunSettings>,
    tally: Arc<Tally>,
    shutdown: watch::Receiver<bool>,
) {
    let node = home(device.index, nodes.len());
    let counters = tally.node(node).clone();
    let (client, eventloop) = match client_for(
        &device,
        &nodes[node].mqtt,
        node,
        BENCH_INFLIGHT,
        RUN_QUEUE,
        settings.tls.as_ref(),
    ) {
        Ok(pair) => pair,
        Err(e) => {
            counters.error(|| format!("{}: {e:#}", device.id));
            return;
        }
    };
    let (period_tx, period_rx) = watch::channel(None);
    let handler = CommandHandler {
        client: client.clone(),
        topic: fluxgate_proto::topic::commands(&device.id),
        device_id: device.id.clone(),
        settings: settings.commands,
        period: period_tx,
    };
    // The publisher counts what it drops into the home node: a dropped reading never
    // reached any node.
    let publisher = tokio::spawn(run_publisher(
        client,
        device.clone(),
        settings.clone(),
        counters,
        shutdown.clone(),
        period_rx,
    ));
    let route = Route {
        device: &device,
        nodes: &nodes,
        node,
        tally: &tally,
        inflight: BENCH_INFLIGHT,
        tls: settings.tls.as_ref(),
    };
    drive(eventloop, route, shutdown, false, Some(handler)).await;
    // The publisher normally ended by itself on shutdown; this only matters if the event
    // loop gave up first.
    publisher.abort();
}

/// Generates `run` messages at the configured rate until `shutdown`, then asks the event
/// loop to disconnect.
async fn run_publisher(
    client: AsyncClient,
    device: Device,
    settings: Arc<RunSettings>,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
    mut period: watch::Receiver<Option<Duration>>,
) {
    let period_ms = u64::try_from(settings.period.as_millis()).unwrap_or(u64::MAX);
    let mut source = MessageSource::new(&device, period_ms, settings.encoding);
    let topic = topic_for(&device.id, settings.encoding);
    let qos = settings.qos.to_rumqttc();
    let mut ticker = device_ticker(settings.rate);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stopped(&mut shutdown) => break,
            changed = period.changed() => {
                // `set_period`: the new period applies from now on.
                if changed.is_ok()
                    && let Some(every) = *period.borrow_and_update() {
                        ticker = ticker_every(every);
                    }
                continue;
            }
        }
        let payload = match source.next_message(now_ms()) {
            Ok(payload) => payload,
            Err(e) => {
                counters.error(|| format!("{}: {e:#}", device.id));
                continue;
            }
        };
        // try_publish never blocks: if the event loop is not draining the queue (because
        // the device is disconnected), the reading is dropped like a real device with a
        // full buffer would, and the schedule of later readings is unaffected.
        if client
            .try_publish(topic.clone(), qos, false, payload.into_bytes())
            .is_err()
        {
            Counters::inc(&counters.dropped);
        }
    }
    let _ = client.try_disconnect();
}

/// Runs one device of `bench`: connects, waits for the start signal, publishes
/// `messages` messages as fast as the connection allows, and keeps the connection open
/// until `ctx.shutdown` so that nothing is cut off while the gateway drains.
///
/// Returns PUBACK latencies in microseconds for QoS 1.
pub async fn bench_device(device: Device, messages: u64, ctx: Arc<BenchCtx>) -> Vec<u32> {
    let node = home(device.index, ctx.nodes.len());
    let (client, eventloop) = match client_for(
        &device,
        &ctx.nodes[node].mqtt,
        node,
        BENCH_INFLIGHT,
        BENCH_QUEUE,
        ctx.tls.as_ref(),
    ) {
        Ok(pair) => pair,
        Err(e) => {
            ctx.counters
                .node(node)
                .error(|| format!("{}: {e:#}", device.id));
            ctx.finished.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
    };
    let publisher = tokio::spawn(bench_publisher(
        client,
        device.clone(),
        messages,
        ctx.clone(),
    ));
    let track_latency = ctx.qos == Qos::AtLeastOnce;
    let route = Route {
        device: &device,
        nodes: &ctx.nodes,
        node,
        tally: &ctx.counters,
        inflight: BENCH_INFLIGHT,
        tls: ctx.tls.as_ref(),
    };
    let latencies = drive(eventloop, route, ctx.shutdown.clone(), track_latency, None).await;
    publisher.abort();
    latencies
}

async fn bench_publisher(client: AsyncClient, device: Device, messages: u64, ctx: Arc<BenchCtx>) {
    publish_burst(&client, &device, messages, &ctx).await;
    ctx.finished.fetch_add(1, Ordering::Relaxed);
    stopped(&mut ctx.shutdown.clone()).await;
    let _ = client.try_disconnect();
}

async fn publish_burst(client: &AsyncClient, device: &Device, messages: u64, ctx: &BenchCtx) {
    let mut go = ctx.go.clone();
    if go.wait_for(|go| *go).await.is_err() {
        return;
    }
    let mut source = MessageSource::new(device, ctx.period_ms, ctx.encoding);
    let topic = topic_for(&device.id, ctx.encoding);
    let qos = ctx.qos.to_rumqttc();
    for i in 0..messages {
        // Back-date by the number of messages still to send: timestamps stay strictly
        // increasing yet never run ahead of the wall clock (see `TsClock`).
        let remaining_after = messages - i - 1;
        let payload = match source.next_message(now_ms().saturating_sub(remaining_after)) {
            Ok(payload) => payload,
            Err(e) => {
                ctx.counters
                    .node(home(device.index, ctx.nodes.len()))
                    .error(|| format!("{}: {e:#}", device.id));
                return;
            }
        };
        // `publish` waits while the queue is full, which is the backpressure that keeps
        // the inflight window full without unbounded memory. The deadline bounds that
        // wait in case the gateway stops reading.
        let queued = tokio::time::timeout_at(
            ctx.deadline.into(),
            client.publish(topic.clone(), qos, false, payload.into_bytes()),
        )
        .await;
        match queued {
            Ok(Ok(())) => {
                ctx.queued.fetch_add(1, Ordering::Relaxed);
            }
            // The event loop is gone or the deadline passed: stop this device.
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Answers the commands of one `run` device (see the module docs).
pub struct CommandHandler {
    client: AsyncClient,
    /// `devices/{id}/commands`.
    topic: String,
    device_id: String,
    settings: CommandSettings,
    /// The publisher's sending period, set by `set_period`.
    period: watch::Sender<Option<Duration>>,
}

impl CommandHandler {
    /// A PUBLISH from the gateway: a command on the device's own topic is answered
    /// after the reply latency (on a task of its own, so the event loop keeps running).
    fn handle(&mut self, topic: &str, payload: &[u8], counters: &Counters) {
        if topic != self.topic {
            counters.error(|| format!("{}: unexpected PUBLISH on {topic}", self.device_id));
            return;
        }
        let command = match commands::parse_mqtt(payload) {
            Ok(command) => command,
            Err(e) => {
                counters.error(|| format!("{}: {e}", self.device_id));
                return;
            }
        };
        let (outcome, effect) = commands::execute(&command, &self.settings, fastrand::f64());
        if let Effect::SetPeriod(every) = effect {
            let _ = self.period.send(Some(every));
        }
        let client = self.client.clone();
        let topic = commands::reply_topic(&self.device_id, &command.id);
        let latency = self.settings.reply_latency;
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            // A full queue or a closed client: the device is going away, like a real
            // one that reboots before answering.
            let _ = client.try_publish(
                topic,
                QoS::AtLeastOnce,
                false,
                commands::mqtt_reply(&outcome),
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_contract() {
        assert_eq!(
            topic_for("sim-00001", Encoding::Json),
            "devices/sim-00001/telemetry"
        );
        assert_eq!(
            topic_for("sim-00001", Encoding::Postcard),
            "devices/sim-00001/telemetry/bin"
        );
    }

    #[test]
    fn client_options_use_device_id_and_credentials() {
        let mut device = crate::device::fleet("sim", 1).remove(0);
        let (_client, eventloop) =
            client_for(&device, "127.0.0.1:1883", 0, 100, 8, None).expect("options");
        assert_eq!(eventloop.mqtt_options.client_id(), "sim-00000");
        assert_eq!(eventloop.mqtt_options.credentials(), None);
        assert!(eventloop.mqtt_options.clean_session());

        let token = |t: &str| crate::device::Credentials {
            username: "sim-00000".into(),
            password: t.into(),
        };
        device.credentials = vec![token("other"), token("token")];
        let (_client, eventloop) =
            client_for(&device, "[::1]:1884", 1, 100, 8, None).expect("options");
        let login = eventloop
            .mqtt_options
            .credentials()
            .expect("credentials set");
        assert_eq!(login.username, "sim-00000");
        assert_eq!(login.password, "token");
        assert_eq!(
            eventloop.mqtt_options.broker_address(),
            ("::1".to_string(), 1884)
        );
        assert!(client_for(&device, "no-port", 0, 100, 8, None).is_err());
    }
}
