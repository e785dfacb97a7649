//! Cluster mode's start-up checks against real engines: a 3-server JetStream cluster
//! (`nats-server`) and PostgreSQL, started by the test on free ports. A node creates the
//! stream, its consumers and the presence bucket when they are missing, accepts them
//! when they match, and refuses to start, naming every difference, when they do not.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::engines::{NatsCluster, Postgres, free_port};
use fluxgate::cluster::{ClusterError, Engines, subject};
use fluxgate::config::{ClusterConfig, Secret};
use fluxgate::observe::Metrics;
use fluxgate::registry::{Registry, RegistryError};

fn node(id: &str, nats: &NatsCluster, pg: &Postgres) -> ClusterConfig {
    ClusterConfig {
        enabled: true,
        node_id: id.to_owned(),
        nats: nats.urls(),
        postgres: Secret(pg.url()),
        connect_timeout: Duration::from_secs(10),
        replicas: 3,
        // Within the test servers' 2 GB file store.
        stream_max_bytes: 256 << 20,
        ..ClusterConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_create_missing_objects_accept_matching_ones_and_refuse_mismatches() {
    let nats = NatsCluster::start(3).await;
    let pg = Postgres::start().await;

    // The first node creates everything, replicated on the three servers.
    let a = node("a", &nats, &pg);
    let engines = Engines::connect(&a, true).await.unwrap();
    let mut stream = engines.jetstream.get_stream(subject::STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.config.subjects, [subject::TELEMETRY_SUBJECTS]);
    assert_eq!(
        info.cluster.as_ref().map(|c| c.replicas.len()),
        Some(2),
        "a leader and two followers: {:?}",
        info.cluster
    );
    for consumer in ["replica-a", subject::TSDB_CONSUMER] {
        stream.consumer_info(consumer).await.unwrap();
    }
    engines
        .jetstream
        .get_key_value(subject::PRESENCE_BUCKET)
        .await
        .unwrap();

    // A second node, and the first one again, find what exists and accept it.
    let b = Engines::connect(&node("b", &nats, &pg), false)
        .await
        .unwrap();
    drop(b);
    Engines::connect(&a, true).await.unwrap();
    stream.consumer_info("replica-b").await.unwrap();

    // A node whose settings differ refuses to start and names each difference.
    let other = ClusterConfig {
        replicas: 1,
        stream_max_age: Duration::from_secs(3600),
        ..node("c", &nats, &pg)
    };
    let e = Engines::connect(&other, false).await.err().unwrap();
    let ClusterError::Mismatch { what, mismatches } = &e else {
        panic!("expected a mismatch, got {e}");
    };
    assert_eq!(what, "stream FLUXGATE");
    let settings: Vec<&str> = mismatches.iter().map(|m| m.setting).collect();
    assert_eq!(settings, ["num_replicas", "max_age"], "{e}");
    assert!(
        e.to_string()
            .contains("num_replicas is 3 on the server, this node expects 1"),
        "{e}"
    );
    // ... and creates nothing on the way.
    assert!(stream.consumer_info("replica-c").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_engines_are_named_and_passwords_are_not() {
    let nats = NatsCluster::start(1).await;
    let pg = Postgres::start().await;

    let no_nats = ClusterConfig {
        nats: vec![format!("nats://127.0.0.1:{}", free_port())],
        connect_timeout: Duration::from_secs(1),
        replicas: 1,
        ..node("a", &nats, &pg)
    };
    let e = Engines::connect(&no_nats, false).await.err().unwrap();
    assert!(matches!(e, ClusterError::NatsConnect { .. }), "{e}");

    let port = free_port();
    let no_pg = ClusterConfig {
        postgres: Secret(format!(
            "postgres://fluxgate:hunter2@127.0.0.1:{port}/fluxgate"
        )),
        connect_timeout: Duration::from_secs(2),
        replicas: 1,
        ..node("a", &nats, &pg)
    };
    // The registry connects to PostgreSQL (in cluster mode it lives there).
    let e = tokio::task::spawn_blocking(move || {
        Registry::open_postgres(
            &no_pg.postgres,
            no_pg.connect_timeout,
            Duration::from_secs(60),
            Arc::new(Metrics::default()),
        )
        .err()
        .unwrap()
    })
    .await
    .unwrap();
    let text = e.to_string();
    assert!(matches!(e, RegistryError::Postgres(_)), "{text}");
    assert!(
        text.contains(&format!("postgres://fluxgate@127.0.0.1:{port}/fluxgate")),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}
