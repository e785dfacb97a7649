//! The only place that wires components together: it creates every channel (bounded,
//! with its full-policy named here), starts every task, and owns shutdown.
//!
//! ```text
//! mqtt conns ────┐
//! ws / http ─────┤ send().await; full (messages or bytes) -> backpressure to the device
//!                v
//!            pipeline ── publish (never waits) ──> live hub -> subscriber queues (conflate)
//!                │
//!                v send_async to each durable destination; full -> backpressure (block)
//!          store writer thread (SQLite)  +  influxdb spool thread (buffer; when_full
//!                                            policy) -> jobs (<= max_in_flight) -> writer tasks
//! ```
//!
//! Shutdown runs front to back: cancel -> ingest stops accepting and drains -> the
//! pipeline sees its input close, flushes the batcher -> the store writer commits the
//! last batch and exits; the spool thread delivers what it can within
//! `sinks.influxdb.shutdown_drain`, stops the writer tasks and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::throttle::{FailureThrottle, ThrottleSettings};
use crate::api::{self, ApiSettings, AppState};
use crate::cluster::{
    CommandRelay, Engines, Follower, NatsRoute, PresenceSync, Publisher, TsdbFeeder,
};
use crate::commands::{Commands, Remote};
use crate::config::Config;
use crate::ingest::mqtt::{MqttCommands, MqttIngest};
use crate::live::{Hub, HubLimits};
use crate::model::{Downlink, DurableBatch};
use crate::model::{QueueBudget, now_ms};
use crate::observe::{Event, Metrics, Queue, ReadingDropReason};
use crate::pipeline::{Destination, Pipeline};
use crate::registry::{ChangeListener, Registry};
use crate::server::{self, ServerTls};
use crate::sink;
use crate::store;
use crate::tls::{ReloadableTls, TlsFiles};

/// Entry point for starting a gateway.
pub struct Gateway;

/// A started gateway: its bound addresses and the handle to stop it.
pub struct RunningGateway {
    /// The HTTP listener's bound address (the TLS listener's when `http.plaintext` is
    /// off).
    pub http_addr: SocketAddr,
    /// The HTTPS listener's bound address, when `http.tls` is enabled.
    pub https_addr: Option<SocketAddr>,
    /// The plaintext MQTT listener's address, when the MQTT front is enabled and
    /// `mqtt.plaintext` is on.
    pub mqtt_addr: Option<SocketAddr>,
    /// The mqtts listener's address, when the MQTT front and `mqtt.tls` are enabled.
    pub mqtts_addr: Option<SocketAddr>,
    /// The handle that sends commands to MQTT devices, when the MQTT front is enabled.
    pub mqtt_commands: Option<MqttCommands>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// On the first start only: the generated admin API key (stored as a hash; this is
    /// the one chance to show it).
    pub bootstrap_admin_key: Option<String>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// One per dedicated thread (store writer, sink spool): fires when it has finished.
    threads_done: Vec<oneshot::Receiver<()>>,
}

impl Gateway {
    /// Start every component from a validated config. Returns once all listeners are
    /// bound.
    pub async fn start(config: Config) -> anyhow::Result<RunningGateway> {
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut threads_done = Vec::new();
        let mut destinations = Vec::new();

        // Cluster mode: reach the engines and check the stream's settings before
        // anything else starts, so a misconfigured node refuses to start at once.
        let mut engines = if config.cluster.enabled {
            let engines = Engines::connect(&config.cluster, config.sinks.influxdb.enabled)
                .await
                .context("cluster mode")?;
            tracing::info!(node = %config.cluster.node_id, "cluster mode: engines ready");
            Some(engines)
        } else {
            None
        };
        // In cluster mode the store is fed by this node's follower of the stream, not
        // by the pipeline.
        let mut local_store = None;
        let mut stream_position = 0;

        let dir = config.data_dir.clone();
        let (online_timeout, m) = (config.devices.online_timeout, metrics.clone());
        // One node: the registry is a file in the data directory. Cluster mode: every node
        // shares the PostgreSQL registry, and a listener applies other nodes' changes.
        let registry = if config.cluster.enabled {
            let (url, timeout) = (
                config.cluster.postgres.clone(),
                config.cluster.connect_timeout,
            );
            let registry = tokio::task::spawn_blocking(move || {
                Registry::open_postgres(&url, timeout, online_timeout, m)
            })
            .await
            .context("opening the registry")?
            .context("cluster mode: cannot open the device registry in PostgreSQL")?;
            let listener = ChangeListener {
                registry: registry.clone(),
                url: config.cluster.postgres.clone(),
                connect_timeout: config.cluster.connect_timeout,
            };
            tasks.push(tokio::spawn(listener.run(shutdown.clone())));
            registry
        } else {
            tokio::task::spawn_blocking(move || Registry::open(&dir, online_timeout, m))
                .await
                .context("opening the registry")?
                .with_context(|| {
                    format!(
                        "cannot open the device registry in {}",
                        config.data_dir.display()
                    )
                })?
        };
        registry
            .configure_negative_cache(config.auth.negative_key_cache, config.auth.negative_key_ttl);
        let reg = registry.clone();
        let bootstrap_admin_key = tokio::task::spawn_blocking(move || reg.bootstrap_admin_key())
            .await
            .context("bootstrapping the admin key")??;
        tasks.push(tokio::spawn(registry.clone().run(shutdown.clone())));

        // The series that exist, for the pipeline's caps on new ones (empty without the
        // embedded store: the InfluxDB sink alone keeps no series table to seed from).
        let mut known_series = Vec::new();
        // Store writer: a dedicated thread; its queue's full-policy is backpressure.
        let store_reader = if config.store.enabled {
            let dir = config.data_dir.clone();
            let limits = store::QueryLimits {
                max_decode_points: config.store.max_decode_points,
                max_concurrent: config.store.max_concurrent_queries,
                wait: config.store.query_wait,
            };
            let (writer, reader) =
                tokio::task::spawn_blocking(move || store::open_store(&dir, limits))
                    .await
                    .context("opening the store")?
                    .with_context(|| {
                        format!(
                            "cannot open the embedded store in {}",
                            config.data_dir.display()
                        )
                    })?;
            writer
                .set_cache_bytes(config.store.cache_bytes)
                .context("cannot size the embedded store's page cache")?;
            known_series = writer.series_names();
            stream_position = writer.stream_position();
            let (tx, rx) = flume::bounded::<DurableBatch>(config.batch.queue_capacity);
            let (done_tx, done_rx) = oneshot::channel();
            let m = metrics.clone();
            let opts = store::WriterOptions {
                retention: config.store.retention,
                retention_interval: config.store.retention_interval,
                write_attempts: config.store.write_attempts,
                write_retry_backoff: config.store.write_retry_backoff,
                compact_interval: config.store.compact_interval,
                tail_max_bytes: config.store.tail_max_bytes,
            };
            std::thread::Builder::new()
                .name("store-writer".to_owned())
                .spawn(move || {
                    writer.run(rx, m, opts);
                    let _ = done_tx.send(());
                })
                .context("starting the store writer thread")?;
            threads_done.push(done_rx);
            if engines.is_some() {
                local_store = Some(tx);
            } else {
                destinations.push(Destination {
                    tx,
                    queue: Queue::Store,
                    gone: ReadingDropReason::StoreFailed,
                });
            }
            Some(reader)
        } else {
            None
        };

        // InfluxDB sink: a spool thread owning the buffer (its input's full-policy is
        // backpressure; the buffer's own is `when_full`), and `max_in_flight` writer
        // tasks fed by a job queue that never fills (the spool thread hands out at most
        // `max_in_flight` jobs).
        let mut sinks = Vec::new();
        if config.sinks.influxdb.enabled {
            let (mut cfg, dir, m) = (
                config.sinks.influxdb.clone(),
                config.data_dir.clone(),
                metrics.clone(),
            );
            if config.cluster.enabled && cfg.buffer.mode == crate::config::BufferMode::Disk {
                // JetStream is the sink's buffer in cluster mode (the shared consumer
                // redelivers what the database did not accept), so no segment files
                // are created for a spool that never runs.
                tracing::info!(
                    "cluster mode: sinks.influxdb.buffer is not used; JetStream buffers the sink"
                );
                cfg.buffer.mode = crate::config::BufferMode::Memory;
            }
            let reg = registry.clone();
            let labels: sink::line::LabelLookup =
                Arc::new(move |device: &str| reg.labels_of(device));
            let built =
                tokio::task::spawn_blocking(move || sink::open_influx(&cfg, &dir, m, labels))
                    .await
                    .context("opening the InfluxDB sink")??;
            let (tx, rx) = flume::bounded::<DurableBatch>(config.batch.queue_capacity);
            let (jobs_tx, jobs_rx) = flume::bounded(built.max_in_flight);
            // Writers -> spool: one `Done` per job. The spool hands out at most
            // `max_in_flight` jobs before it hears back, so this queue can never hold more
            // than that: bounded at that size, a writer's send never waits (full-policy:
            // cannot be full by construction).
            let (done_tx, done_rx) = flume::bounded(built.max_in_flight);
            let stop_writers = CancellationToken::new();
            for _ in 0..built.max_in_flight {
                tasks.push(tokio::spawn(built.writer.clone().run(
                    jobs_rx.clone(),
                    done_tx.clone(),
                    stop_writers.clone(),
                )));
            }
            let spooler = built.spooler;
            if let Some(consumer) = engines.as_mut().and_then(|e| e.tsdb.take()) {
                // Cluster mode: the writers are fed from the stream's shared consumer
                // (JetStream is the buffer), not by the pipeline through the spool.
                let feeder = TsdbFeeder {
                    consumer,
                    encoder: spooler.encoder,
                    max_lines: config.sinks.influxdb.batch.max_lines,
                    max_in_flight: built.max_in_flight,
                };
                tasks.push(tokio::spawn(feeder.run(
                    jobs_tx,
                    done_rx,
                    stop_writers,
                    shutdown.clone(),
                )));
            } else {
                let (thread_done_tx, thread_done_rx) = oneshot::channel();
                let spool_shutdown = shutdown.clone();
                std::thread::Builder::new()
                    .name("influxdb-spool".to_owned())
                    .spawn(move || {
                        spooler.run(rx, jobs_tx, done_rx, stop_writers, spool_shutdown);
                        let _ = thread_done_tx.send(());
                    })
                    .context("starting the InfluxDB spool thread")?;
                threads_done.push(thread_done_rx);
                destinations.push(Destination {
                    tx,
                    queue: Queue::Sink,
                    gone: ReadingDropReason::SinkBufferFailed,
                });
            }
            sinks.push(built.health);
        }

        // A node's epoch is its run; a cluster's is its stream (every node, every run).
        let epoch = engines.as_ref().map_or_else(now_ms, |e| e.epoch);
        let hub = Arc::new(Hub::new(
            epoch,
            HubLimits {
                ring_capacity: config.live.ring_capacity,
                ring_bytes: config.live.ring_bytes,
                client_queue: config.live.client_queue,
                max_subscribers: config.live.max_subscribers,
                max_filters: config.live.max_filters,
                max_subscriptions: config.live.max_subscriptions,
            },
            registry.clone(),
            metrics.clone(),
        ));

        // Cluster mode: the pipeline's batches go to the stream (the publisher's queue:
        // full-policy backpressure, like the store's), and this node's follower applies
        // the whole stream to the local store and hub.
        let mut command_route = None;
        if let Some(engines) = engines {
            // Commands across nodes: the port the dispatcher asks other nodes through,
            // and the queue of changes it publishes (full-policy: dropped, counted; see
            // cluster::commands).
            command_route = Some((
                NatsRoute::new(
                    engines.jetstream.client(),
                    config.cluster.node_id.clone(),
                    engines.presence.clone(),
                    registry.clone(),
                    metrics.clone(),
                ),
                engines.jetstream.client(),
            ));
            let (tx, rx) = flume::bounded::<DurableBatch>(config.batch.queue_capacity);
            let publisher = Publisher {
                jetstream: engines.jetstream.clone(),
                node_id: config.cluster.node_id.clone(),
                metrics: metrics.clone(),
            };
            tasks.push(tokio::spawn(publisher.run(rx)));
            destinations.push(Destination {
                tx,
                queue: Queue::Stream,
                gone: ReadingDropReason::StreamFailed,
            });
            let presence = PresenceSync {
                bucket: engines.presence,
                node_id: config.cluster.node_id.clone(),
                registry: registry.clone(),
                ttl: config.cluster.presence_ttl,
            };
            tasks.push(tokio::spawn(presence.run(shutdown.clone())));
            let follower = Follower {
                consumer: engines.replica,
                store: local_store.take(),
                applied: stream_position,
                hub: hub.clone(),
            };
            tasks.push(tokio::spawn(follower.run(shutdown.clone())));
        }

        // Ingest -> pipeline, bounded in messages (the channel) and in bytes (the budget
        // every envelope takes its size from before it is queued, and returns when the
        // pipeline has decoded it). Full-policy, for either bound: every transport
        // waits (backpressure to the device: an MQTT connection stops reading its
        // socket); waits for want of bytes are counted
        // (`fluxgate_ingest_budget_waits_total`).
        let (pipe_tx, pipe_rx) = mpsc::channel(config.pipeline.queue_capacity);
        let ingest_budget = QueueBudget::new(config.pipeline.queue_bytes);
        let pipeline = Pipeline {
            limits: config.limits.to_proto(),
            input: config.limits.clone(),
            known_series,
            batch: config.batch.clone(),
            hub: (!config.cluster.enabled).then(|| hub.clone()),
            registry: registry.clone(),
            metrics: metrics.clone(),
        };
        tasks.push(tokio::spawn(pipeline.run(
            pipe_rx,
            destinations,
            shutdown.clone(),
            config.http.shutdown_grace,
        )));

        // TLS configurations, each reloaded on SIGHUP and, with its `reload_poll`, when
        // its files change (one task below).
        let mut reloadable = Vec::new();

        // Downlink commands: the dispatcher owns the unfinished ones; its request queue
        // is bounded (full-policy: callers wait; reachability hints are dropped and the
        // dispatcher's retry tick covers them). The push transports (MQTT) are its
        // inputs; WS connections and HTTP long polls attach through the handle.
        // In cluster mode the remote port reaches the other nodes, and the relay answers
        // them (at most MAX_SERVING requests at once).
        let (route, relay) = match command_route {
            Some(((route, outbox), client)) => (
                Some(Arc::new(route) as Arc<dyn Remote>),
                Some((outbox, client)),
            ),
            None => (None, None),
        };
        let (commands, dispatcher) = Commands::with_remote(
            config.commands.clone(),
            registry.clone(),
            metrics.clone(),
            route,
        );
        if let Some((outbox, client)) = relay {
            let relay = CommandRelay {
                client,
                node_id: config.cluster.node_id.clone(),
                commands: commands.clone(),
                metrics: metrics.clone(),
            };
            tasks.push(tokio::spawn(relay.run(outbox, shutdown.clone())));
        }
        let mut downlinks: Vec<Arc<dyn Downlink>> = Vec::new();

        let mut mqtt_commands = None;
        let (mut mqtt_addr, mut mqtts_addr) = (None, None);
        if config.mqtt.enabled {
            let tls = if config.mqtt.tls.enabled {
                // No ALPN: MQTT clients rarely offer one, and an offer is ignored.
                let tls = Arc::new(
                    ReloadableTls::load(TlsFiles::of(&config.mqtt.tls.listener(), &[]))
                        .context("mqtt.tls")?,
                );
                reloadable.push((tls.clone(), config.mqtt.tls.reload_poll));
                Some(tls)
            } else {
                None
            };
            let mqtt = MqttIngest::new(config.mqtt.clone(), &config.limits, registry.clone(), tls)?;
            mqtt_addr = mqtt.listen_addr();
            mqtts_addr = mqtt.tls_listen_addr();
            mqtt_commands = Some(mqtt.commands());
            downlinks.push(Arc::new(mqtt.commands()));
            tasks.push(tokio::spawn(mqtt.run(
                pipe_tx.clone(),
                ingest_budget.clone(),
                commands.clone(),
                metrics.clone(),
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(dispatcher.run(downlinks, shutdown.clone())));

        // The plaintext and the TLS listener serve the same router; either may be off
        // (validation keeps at least one).
        let mut listeners = Vec::new();
        if config.http.plaintext {
            let listener = tokio::net::TcpListener::bind(config.http.listen)
                .await
                .with_context(|| format!("cannot bind HTTP listener {}", config.http.listen))?;
            listeners.push((listener, None));
        }
        let mut https_addr = None;
        if config.http.tls.enabled {
            let t = &config.http.tls.listener();
            // HTTP/1.1 only: the server loop runs hyper's HTTP/1 (WebSocket upgrades
            // need it).
            let tls =
                Arc::new(ReloadableTls::load(TlsFiles::of(t, &[b"http/1.1"])).context("http.tls")?);
            let listener = tokio::net::TcpListener::bind(t.listen)
                .await
                .with_context(|| format!("cannot bind HTTPS listener {}", t.listen))?;
            https_addr = Some(listener.local_addr()?);
            reloadable.push((tls.clone(), t.reload_poll));
            listeners.push((
                listener,
                Some(ServerTls {
                    config: tls,
                    identity: t.identity,
                    handshake_timeout: t.handshake_timeout,
                }),
            ));
        }
        if !reloadable.is_empty() {
            tasks.push(tokio::spawn(reload_tls(
                reloadable,
                metrics.clone(),
                shutdown.clone(),
            )));
        }
        let http_addr = match listeners.first() {
            Some((l, _)) => l.local_addr()?,
            None => anyhow::bail!("no HTTP listener: http.plaintext and http.tls are both off"),
        };
        let state = AppState {
            hub,
            registry,
            commands,
            store: store_reader,
            ingest: pipe_tx,
            ingest_budget,
            metrics: metrics.clone(),
            sinks,
            settings: Arc::new(ApiSettings {
                limits: config.limits.to_proto(),
                max_frame_bytes: config.limits.max_frame_bytes,
                ws_max_inflight: config.http.ws_max_inflight,
                heartbeat: config.live.heartbeat,
                max_query_points: config.store.max_query_points,
                stream_token_ttl: config.http.stream_token_ttl,
                max_gap_fill: config.live.max_gap_fill,
                ws_idle_timeout: config.http.ws_idle_timeout,
                max_subscribers_per_key: config.live.max_subscribers_per_key,
                influxql_measurement: config.sinks.influxdb.measurement.clone(),
            }),
            // Bounded (max_tracked_addresses, oldest evicted); see api::throttle.
            throttle: Arc::new(FailureThrottle::new(ThrottleSettings {
                burst: config.auth.failure_burst,
                refill: config.auth.failure_refill,
                max_addresses: config.auth.max_tracked_addresses,
            })),
            shutdown: shutdown.clone(),
        };
        let app = api::router(state, &config.http);
        for (listener, tls) in listeners {
            let http_shutdown = shutdown.clone();
            let grace = config.http.shutdown_grace;
            let (http_config, m, app) = (config.http.clone(), metrics.clone(), app.clone());
            tasks.push(tokio::spawn(async move {
                // Connections over `http.max_connections` are closed at accept (counted,
                // per listener); the server's time limits are in `server`, which also
                // hands handlers the client address (`ConnectInfo`) for the auth throttle.
                let server =
                    server::serve(listener, app, &http_config, tls, m, http_shutdown.clone());
                tokio::select! {
                    () = server => {}
                    // Graceful shutdown waits for open connections; past the grace period
                    // they are cut so that shutdown always completes.
                    () = async { http_shutdown.cancelled().await; tokio::time::sleep(grace).await } => {}
                }
            }));
        }

        let shown =
            |a: Option<SocketAddr>| a.map_or_else(|| "disabled".to_owned(), |a| a.to_string());
        let (mqtt_shown, mqtts_shown) = (shown(mqtt_addr), shown(mqtts_addr));
        let https_shown = shown(https_addr);
        let budgets = config.memory_budgets();
        let total: usize = budgets.iter().map(|(_, bytes)| bytes).sum();
        let listed: Vec<String> = budgets
            .iter()
            .map(|(what, bytes)| format!("{what} {:.1} MiB", *bytes as f64 / 1048576.0))
            .collect();
        tracing::info!(
            total_mib = format!("{:.1}", total as f64 / 1048576.0),
            "memory budgets (connections come on top): {}",
            listed.join(", ")
        );
        tracing::info!(data_dir = %config.data_dir.display(), "listening mqtt={mqtt_shown} http={http_addr} https={https_shown} mqtts={mqtts_shown}");
        Ok(RunningGateway {
            http_addr,
            https_addr,
            mqtt_addr,
            mqtts_addr,
            mqtt_commands,
            data_dir: config.data_dir,
            bootstrap_admin_key,
            metrics,
            shutdown,
            tasks,
            threads_done,
        })
    }
}

impl RunningGateway {
    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A token that stops the gateway when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stop accepting, drain, flush, and wait until everything has stopped.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Wait until the gateway has stopped (after its token is cancelled).
    pub async fn wait(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a gateway task failed");
            }
        }
        for done in self.threads_done {
            let _ = done.await;
        }
        tracing::info!("gateway stopped");
    }
}

/// Reload the TLS certificates on every SIGHUP until shutdown, and each configuration
/// whose `reload_poll` is set when its files changed: new connections get the new
/// certificate, open ones keep theirs; a bad file keeps the old certificate (and is not
/// tried again until it changes).
async fn reload_tls(
    configs: Vec<(Arc<ReloadableTls>, std::time::Duration)>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let reload = |tls: &ReloadableTls| {
        let result = tls.reload();
        let error = result.err().map(|e| e.to_string());
        metrics.emit(Event::TlsReloaded {
            cert: tls.cert_path(),
            error: error.as_deref(),
        });
    };
    let mut hup = signal(SignalKind::hangup()).ok();
    if hup.is_none() {
        tracing::warn!("cannot listen for SIGHUP: TLS certificates reload only on file change");
    }
    // One poll tick at the shortest interval asked for: a stat of a few files.
    let poll = configs
        .iter()
        .map(|(_, p)| *p)
        .filter(|p| !p.is_zero())
        .min();
    let mut tick = poll.map(|p| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                if got.is_none() {
                    hup = None;
                    continue;
                }
                for (tls, _) in &configs {
                    reload(tls);
                }
            }
            _ = async { match tick.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                for (tls, poll) in &configs {
                    if !poll.is_zero() && tls.files_changed() {
                        reload(tls);
                    }
                }
            }
        }
    }
}
