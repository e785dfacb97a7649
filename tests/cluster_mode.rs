//! Cluster mode end to end on real engines: gateways on one JetStream and one
//! PostgreSQL. A reading acknowledged by the node a device talks to is in the stream
//! (it was acknowledged after JetStream's publish ack) and reaches every node's store
//! exactly once through that node's own consumer.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::engines::{NatsCluster, Postgres};
use common::{TestGateway, bounded, now_ms, wait_for};
use fluxgate::cluster::subject;
use fluxgate::config::Secret;
use fluxgate::model::Value;

async fn node(id: &str, nats: &NatsCluster, pg: &Postgres) -> TestGateway {
    let (id, urls, pg) = (id.to_owned(), nats.urls(), pg.url());
    TestGateway::spawn_with(move |c| {
        c.cluster.enabled = true;
        c.cluster.node_id = id;
        c.cluster.nats = urls;
        c.cluster.postgres = Secret(pg);
        c.cluster.replicas = 1;
        c.cluster.stream_max_bytes = 256 << 20;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_acknowledged_by_one_node_is_stored_once_on_every_node() {
    bounded(120, async {
        let nats = NatsCluster::start(1).await;
        let pg = Postgres::start().await;
        let a = node("a", &nats, &pg).await;
        let b = node("b", &nats, &pg).await;

        let token = a.provision("d.1").await;
        let t0 = now_ms() - 10_000;
        const SENT: i64 = 50;
        for i in 0..SENT {
            let body = format!(r#"{{"ts":{},"values":{{"temp":{i}}}}}"#, t0 + i);
            let r = a.telemetry("d.1", Some(&token), &body).await;
            assert!(r.status < 300, "{} {}", r.status, r.body);
        }

        // Acknowledged means in the stream.
        let client = async_nats::connect(nats.url(0)).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(subject::STREAM).await.unwrap();
        let info = stream.info().await.unwrap();
        assert!(info.state.messages >= 1 && info.state.messages <= SENT as u64);

        // Every node holds every reading once, the sender's node included.
        for gw in [&a, &b] {
            wait_for(
                "the readings on every node",
                Duration::from_secs(30),
                || gw.store_count() == SENT,
            )
            .await;
        }
        for gw in [&a, &b] {
            let mut rows = gw.store_rows();
            rows.sort_by_key(|r| r.2);
            let temps: Vec<Value> = rows.iter().map(|r| r.3.clone()).collect();
            let want: Vec<Value> = (0..SENT).map(Value::I64).collect();
            assert_eq!(temps, want);
            assert!(rows.iter().all(|r| r.0 == "d.1" && r.1 == "temp"));
        }
        // Both consumers are done: nothing pending or waiting for an ack.
        for name in ["replica-a", "replica-b"] {
            let c = stream.consumer_info(name).await.unwrap();
            assert_eq!((c.num_pending, c.num_ack_pending), (0, 0), "{name}");
        }
    })
    .await;
}
