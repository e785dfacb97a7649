//! Cluster mode as it runs in production, failures included: three `fluxgate`
//! processes on a three-server JetStream cluster (stream `FLUXGATE` with three
//! replicas), PostgreSQL and VictoriaMetrics, each node with its own config file, ports
//! and data directory, and devices that do what devices do when a node dies: resend
//! what was not acknowledged, to another node.
//!
//! The registry is PostgreSQL's, shared by the nodes: a device is provisioned once,
//! through any node, and its token is valid on every node.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::scrape_or_zero;
use common::cluster::{Addr, Device, Node, NodeSetup, Outcome, Transport, wait_tokens_everywhere};
use common::engines::{NatsCluster, Postgres, Vm, sample};
use common::{Sse, bounded, now_ms};
use fluxgate::cluster::subject;

/// The engines and three nodes `a`, `b`, `c`.
struct Cluster {
    nats: NatsCluster,
    // Kept running for the nodes (and stopped on drop).
    _pg: Postgres,
    vm: Option<Vm>,
    nodes: Vec<Node>,
}

const NAMES: [&str; 3] = ["a", "b", "c"];

impl Cluster {
    async fn start(with_vm: bool) -> Cluster {
        let nats = NatsCluster::start(3).await;
        let pg = Postgres::start().await;
        // The contract of the TSDB path is InfluxDB's: a point written again (a record
        // redelivered after a node died, a reading a device resent) overwrites itself.
        // VictoriaMetrics keeps that contract with deduplication by timestamp.
        let vm = if with_vm {
            Some(Vm::start_deduplicating().await)
        } else {
            None
        };
        let setup = NodeSetup {
            nats: nats.urls(),
            postgres: pg.url(),
            replicas: 3,
            influx: vm.as_ref().map(Vm::url),
        };
        // The first node creates the admin key in the shared registry; the others
        // join with it.
        let mut nodes = vec![Node::start(NAMES[0], &setup, None).await];
        for id in &NAMES[1..] {
            let key = nodes[0].admin_key.clone();
            nodes.push(Node::start(id, &setup, Some(&key)).await);
        }
        Cluster {
            nats,
            _pg: pg,
            vm,
            nodes,
        }
    }

    fn addrs(&self) -> Vec<Addr> {
        self.nodes.iter().map(Addr::from).collect()
    }

    /// The index of the NATS server that leads the telemetry stream.
    async fn stream_leader(&self) -> usize {
        let client = async_nats::connect(self.nats.url(0)).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(subject::STREAM).await.unwrap();
        let info = stream.info().await.unwrap();
        let leader = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("the stream has a leader");
        leader
            .strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("unexpected server name {leader}"))
    }
}

/// Spawn `devices`, each with its own progress counter; returns their tasks.
fn spawn_all(devices: Vec<Device>) -> Vec<tokio::task::JoinHandle<Outcome>> {
    devices.into_iter().map(|d| tokio::spawn(d.run())).collect()
}

/// Poll until every `progress` counter reached `at_least` (bounded).
async fn wait_progress(progress: &[Arc<AtomicI64>], at_least: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.iter().any(|p| p.load(Ordering::SeqCst) < at_least) {
        let now: Vec<i64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
        assert!(
            Instant::now() < deadline,
            "{what}: devices did not get {at_least} readings acknowledged within 60 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `node`'s REST history of metric `v` of `device` holds `count` points from
/// `t0`, then check it is exactly readings `0..count` (value `i` at `t0 + i`), each once.
async fn assert_history(node: &Node, device: &str, t0: i64, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut points = node.history(device, "v", t0, t0 + count).await;
    while points.len() < count as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        points = node.history(device, "v", t0, t0 + count).await;
    }
    let got: Vec<(i64, i64)> = points
        .iter()
        .map(|(ts, v)| (*ts, v.as_i64().unwrap_or(i64::MIN)))
        .collect();
    let want: Vec<(i64, i64)> = (0..count).map(|i| (t0 + i, i)).collect();
    if got != want {
        let have: BTreeSet<&(i64, i64)> = got.iter().collect();
        let missing: Vec<i64> = want
            .iter()
            .filter(|p| !have.contains(p))
            .map(|p| p.1)
            .take(10)
            .collect();
        panic!(
            "node {} answers {} points of {device} for {count} acknowledged readings; missing e.g. {missing:?}; first points {:?}",
            node.id,
            got.len(),
            &got[..got.len().min(5)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_gateway_and_a_nats_server_mid_stream_loses_no_acknowledged_reading() {
    bounded(170, async {
        let mut cluster = Cluster::start(true).await;
        let mut ids = Vec::new();
        let mut kinds = Vec::new();
        for (t, name) in [
            (Transport::Ws, "ws"),
            (Transport::Http, "http"),
            (Transport::Mqtt, "mqtt"),
        ] {
            for (n, node) in NAMES.iter().enumerate() {
                ids.push(format!("{name}-{node}"));
                kinds.push((t, n));
            }
        }
        // And a QoS 0 device on b, which stays up: what it loses, it loses while the
        // stream has no leader, and that must be counted.
        const QOS0: &str = "mqtt0-b";
        ids.push(QOS0.to_owned());
        kinds.push((Transport::MqttQos0, 1));
        // Provisioned once, through a (which dies later): the registry is PostgreSQL,
        // so each token is valid on every node.
        let tokens = cluster.nodes[0].admin.provision_many(&ids).await;
        let took = wait_tokens_everywhere(&cluster.nodes.iter().collect::<Vec<_>>(), &tokens).await;
        eprintln!("every node accepted the new tokens after {took:?}");
        let t0 = now_ms() - 300_000;
        const COUNT: i64 = 300;
        let addrs = cluster.addrs();
        let progress: Vec<Arc<AtomicI64>> = ids.iter().map(|_| Arc::default()).collect();
        let devices = ids
            .iter()
            .zip(&kinds)
            .zip(&progress)
            .map(|((id, &(transport, start)), progress)| Device {
                id: id.clone(),
                transport,
                addrs: addrs.clone(),
                token: tokens[id].clone(),
                start,
                t0,
                count: COUNT,
                pause: Duration::from_millis(15),
                progress: progress.clone(),
            })
            .collect();
        let tasks = spawn_all(devices);

        // A third of the way in, kill -9 gateway a and the NATS server leading the
        // stream (the two others keep the stream's quorum).
        wait_progress(&progress, COUNT / 3, "before the kills").await;
        let leader = cluster.stream_leader().await;
        cluster.nodes[0].kill9();
        cluster.nats.kill(leader);
        let killed_at: Vec<i64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
        eprintln!("killed gateway a and NATS server n{leader} at {killed_at:?} acknowledged");

        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        // The devices of a moved on; nobody came back to a.
        for (o, &(_, start)) in outcomes.iter().zip(&kinds) {
            let last = *o.path.last().unwrap();
            assert_ne!(last, 0, "{} ended on the killed node: {:?}", o.id, o.path);
            if start == 0 {
                assert!(o.path.len() > 1, "{} never moved: {:?}", o.id, o.path);
            }
        }

        // Every acknowledged reading (all of them: a device resends until it is
        // acknowledged) is in the store of both surviving nodes, each exactly once,
        // as their REST history answers.
        let acked_ids: Vec<&String> = ids.iter().filter(|id| *id != QOS0).collect();
        for node in &cluster.nodes[1..] {
            for id in &acked_ids {
                assert_history(node, id, t0, COUNT).await;
            }
        }
        let moves: BTreeMap<&str, (&Vec<usize>, &HashMap<usize, u64>)> = outcomes
            .iter()
            .map(|o| (o.id.as_str(), (&o.path, &o.refused)))
            .collect();
        eprintln!("device paths (node indexes) and refusals per node: {moves:?}");

        // Counted: every message a surviving node refused as unavailable is a dropped
        // reading there (one reading per message), every MQTT connection it closed for
        // that is counted as such, and on b the QoS 0 readings it could not publish
        // are the rest of its dropped readings. Both b and c hold the same QoS 0
        // readings (the stream's), each once.
        let mut qos0_stored = Vec::new();
        for (n, node) in cluster.nodes.iter().enumerate().skip(1) {
            let refused: u64 = outcomes
                .iter()
                .map(|o| o.refused.get(&n).copied().unwrap_or(0))
                .sum();
            let mqtt_refused: u64 = outcomes
                .iter()
                .zip(&kinds)
                .filter(|(_, (t, _))| *t == Transport::Mqtt)
                .map(|(o, _)| o.refused.get(&n).copied().unwrap_or(0))
                .sum();
            let deadline = Instant::now() + Duration::from_secs(60);
            let (stored, dropped, closed) = loop {
                let text = node.metrics_text().await;
                let dropped = scrape_or_zero(
                    &text,
                    "fluxgate_dropped_readings_total{reason=\"stream_failed\"}",
                ) as i64;
                let closed = scrape_or_zero(
                    &text,
                    "fluxgate_mqtt_connections_closed_total{reason=\"unavailable\"}",
                ) as i64;
                let stored = node.history(QOS0, "v", t0, t0 + COUNT).await;
                let lost = if n == 1 { COUNT - stored.len() as i64 } else { 0 };
                if dropped == refused as i64 + lost || Instant::now() > deadline {
                    break (stored, dropped, closed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let lost = COUNT - stored.len() as i64;
            eprintln!(
                "node {}: refused {refused} messages ({mqtt_refused} MQTT), lost {lost} QoS 0 readings; counted {dropped} readings, {closed} MQTT closes",
                node.id
            );
            let counted_lost = if n == 1 { lost } else { 0 };
            assert_eq!(
                dropped,
                refused as i64 + counted_lost,
                "node {}: dropped readings counted vs refused and lost",
                node.id
            );
            assert_eq!(closed, mqtt_refused as i64, "node {}", node.id);
            for (ts, v) in &stored {
                assert_eq!(v.as_i64(), Some(ts - t0), "{QOS0} on node {}", node.id);
            }
            let distinct: BTreeSet<i64> = stored.iter().map(|p| p.0).collect();
            assert_eq!(distinct.len(), stored.len(), "{QOS0} twice on node {}", node.id);
            qos0_stored.push(stored);
        }
        assert_eq!(qos0_stored[0], qos0_stored[1], "b and c hold other QoS 0 readings");

        // In VictoriaMetrics, written by whichever nodes run the sink through the shared
        // consumer: every stored reading, nothing else, and each sample once.
        let vm = cluster.vm.as_ref().unwrap();
        let mut expected: BTreeSet<_> = acked_ids
            .iter()
            .flat_map(|id| (0..COUNT).map(move |i| sample("v", id, t0 + i, i as f64)))
            .collect();
        expected.extend(
            qos0_stored[0]
                .iter()
                .map(|(ts, _)| sample("v", QOS0, *ts, (ts - t0) as f64)),
        );
        // Records that a held unacknowledged come back to b or c after the ack wait
        // (30 s).
        vm.wait_for_exactly(&expected, Duration::from_secs(90)).await;
        let samples = vm.sample_count().await;
        let resent: u32 = outcomes
            .iter()
            .flat_map(|o| o.sends.values())
            .map(|n| n - 1)
            .sum();
        eprintln!(
            "VictoriaMetrics answers {samples} samples for {} readings; devices resent {resent} messages",
            expected.len()
        );
        assert_eq!(samples, expected.len(), "samples stored more than once");
    })
    .await;
}

/// The `v` values of an SSE event's readings.
fn values(data: &str) -> Vec<i64> {
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    v["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_whose_node_died_resumes_on_another_with_exactly_what_it_missed() {
    bounded(120, async {
        let mut cluster = Cluster::start(false).await;
        let ids = vec!["pump-1".to_owned()];
        // Provisioned once, through a: the registry is PostgreSQL, so each token is
        // valid on every node.
        let tokens = cluster.nodes[0].admin.provision_many(&ids).await;
        let took = wait_tokens_everywhere(&cluster.nodes.iter().collect::<Vec<_>>(), &tokens).await;
        eprintln!("every node accepted the new tokens after {took:?}");
        let t0 = now_ms() - 300_000;
        const COUNT: i64 = 400;
        let progress = Arc::new(AtomicI64::new(0));
        // The device is connected to a.
        let device = Device {
            id: ids[0].clone(),
            transport: Transport::Http,
            addrs: cluster.addrs(),
            token: tokens[&ids[0]].clone(),
            start: 0,
            t0,
            count: COUNT,
            pause: Duration::from_millis(20),
            progress: progress.clone(),
        };
        let task = tokio::spawn(device.run());
        wait_progress(std::slice::from_ref(&progress), 20, "before the dashboard").await;

        // A dashboard on b follows the device: a snapshot, then its readings live.
        let b = &cluster.nodes[1];
        let mut sse = Sse::connect(
            &format!("http://{}/api/v1/live/sse?device=pump-1", b.http),
            Some(&b.admin_key),
        )
        .await;
        let first = sse.next_event().await.unwrap();
        assert_eq!(first.event, "snapshot", "{}", first.data);
        let mut seen = values(&first.data);
        let mut position = first.id.clone().expect("the snapshot has a position");
        while seen.len() < 60 {
            let e = tokio::time::timeout(Duration::from_secs(20), sse.next_event())
                .await
                .expect("no live event from b within 20 s")
                .expect("b's stream ended");
            assert_eq!(e.event, "readings", "{}", e.data);
            seen.extend(values(&e.data));
            position = e.id.expect("a readings event has a position");
        }
        // Its node dies under it; the device goes on sending to a.
        let at_kill = progress.load(Ordering::SeqCst);
        cluster.nodes[1].kill9();
        // What reached the dashboard before the connection broke counts as seen.
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), sse.next_event_or_broken())
                .await
                .expect("b's stream did not end within 10 s of its death");
            let Some(e) = e else { break };
            assert_eq!(e.event, "readings", "{}", e.data);
            seen.extend(values(&e.data));
            position = e.id.expect("a readings event has a position");
        }
        drop(sse);
        wait_progress(
            std::slice::from_ref(&progress),
            at_kill + 50,
            "while the dashboard is away",
        )
        .await;

        // It resumes on c from its last position: first the readings it missed, then
        // live ones, with no gap and nothing twice.
        let c = &cluster.nodes[2];
        let mut sse = Sse::connect(
            &format!(
                "http://{}/api/v1/live/sse?device=pump-1&since={position}",
                c.http
            ),
            Some(&c.admin_key),
        )
        .await;
        while *seen.last().unwrap() < COUNT - 1 {
            let e = tokio::time::timeout(Duration::from_secs(20), sse.next_event())
                .await
                .expect("no event from c within 20 s")
                .expect("c's stream ended");
            assert_eq!(e.event, "readings", "a replay, not {}: {}", e.event, e.data);
            seen.extend(values(&e.data));
        }
        task.await.unwrap();
        let from = seen[0];
        assert_eq!(
            seen,
            (from..COUNT).collect::<Vec<i64>>(),
            "the dashboard's readings across b and c"
        );
        // c served the resume from its own ring (it followed the stream all along), and
        // says so.
        let text = c.metrics_text().await;
        let resumes = |source: &str| {
            scrape_or_zero(
                &text,
                &format!("fluxgate_live_resumes_total{{source=\"{source}\"}}"),
            )
        };
        assert_eq!(
            (resumes("ring"), resumes("store"), resumes("reset")),
            (1.0, 0.0, 0.0)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_a_while_down_catches_up_and_answers_for_that_period() {
    bounded(150, async {
        let mut cluster = Cluster::start(false).await;
        let ids = vec!["meter-a".to_owned(), "meter-b".to_owned()];
        // Provisioned once, through a: the registry is PostgreSQL, so each token is
        // valid on every node.
        let tokens = cluster.nodes[0].admin.provision_many(&ids).await;
        let took = wait_tokens_everywhere(&cluster.nodes.iter().collect::<Vec<_>>(), &tokens).await;
        eprintln!("every node accepted the new tokens after {took:?}");
        let t0 = now_ms() - 300_000;
        // HTTP: 20 ms apart and an answer each; WebSocket: 40 ms apart, answers
        // pipelined. Both go on for some 10 s after c is back.
        const COUNT: i64 = 800;
        let addrs = cluster.addrs();
        let progress: Vec<Arc<AtomicI64>> = ids.iter().map(|_| Arc::default()).collect();
        let devices = ids
            .iter()
            .zip([(Transport::Http, 20), (Transport::Ws, 40)])
            .enumerate()
            .map(|(n, (id, (transport, pause)))| Device {
                id: id.clone(),
                transport,
                addrs: addrs.clone(),
                token: tokens[id].clone(),
                start: n,
                t0,
                count: COUNT,
                pause: Duration::from_millis(pause),
                progress: progress[n].clone(),
            })
            .collect();
        let tasks = spawn_all(devices);
        wait_progress(&progress, 50, "before c goes down").await;

        // c hangs for a second (its consumer keeps delivering records it never
        // acknowledges), then dies (kill -9), and stays down for 20 s of traffic: less
        // than the consumers' ack wait (30 s), so when it is back, those records come
        // back to it after newer ones.
        cluster.nodes[2].freeze();
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.nodes[2].kill9();
        let at_kill: Vec<i64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
        tokio::time::sleep(Duration::from_secs(20)).await;
        let at_restart: Vec<i64> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
        eprintln!("c was down while readings {at_kill:?} to {at_restart:?} were acknowledged");
        assert!(
            at_restart.iter().all(|&n| n < COUNT),
            "the devices finished while c was down: {at_restart:?}"
        );

        // Started again, it catches up from its consumer, follows the rest live, and
        // answers for the period it was down, every reading once.
        cluster.nodes[2].restart().await;
        for t in tasks {
            let o = t.await.unwrap();
            assert!(!o.path.contains(&2), "{} used c: {:?}", o.id, o.path);
        }
        for id in &ids {
            assert_history(&cluster.nodes[2], id, t0, COUNT).await;
        }
    })
    .await;
}
