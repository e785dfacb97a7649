//! Criterion micro-benchmarks of the per-message hot path: decoding (JSON and postcard),
//! publishing to the live hub, and writing batches to the embedded SQLite store.
//!
//! Run: `cargo bench --bench hot_path` (or `scripts/bench.sh`). The store figures are the
//! ones the store layout decisions rest on (ARCHITECTURE.md, Decisions): points per
//! second written over 40, 4,000 and 200,000 series, compaction included, and the
//! latency of a one-hour readings query after an hour of fleet load.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fluxgate::live::{Filter, Hub, HubLimits};
use fluxgate::model::NoLabels;
use fluxgate::model::{Reading, Value};
use fluxgate::observe::Metrics;
use fluxgate_proto::{Frame, Limits, Point, decode_frame, decode_json, encode_frame};

const NOW_MS: u64 = 1_795_000_000_000;

fn json_message(i: u64) -> Vec<u8> {
    format!(
        r#"{{"ts":{},"values":{{"temp":{:.2},"humidity":{:.2},"pressure":{:.1},"battery":{:.3}}}}}"#,
        NOW_MS - 1000 + i,
        20.0 + (i % 10) as f64 * 0.37,
        45.5 + (i % 7) as f64,
        1013.2 - (i % 5) as f64,
        3.9 - (i % 3) as f64 * 0.01
    )
    .into_bytes()
}

fn decode(c: &mut Criterion) {
    let limits = Limits::default();
    let json = json_message(7);
    let frame = encode_frame(&Frame {
        readings: vec![Point {
            ts_ms: Some(NOW_MS - 1000),
            values: vec![
                ("temp".into(), Value::F64(21.37)),
                ("humidity".into(), Value::F64(45.5)),
                ("pressure".into(), Value::F64(1013.2)),
                ("battery".into(), Value::F64(3.89)),
            ],
        }],
    })
    .unwrap();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json_4_metrics", |b| {
        b.iter(|| decode_json(std::hint::black_box(&json), &limits, NOW_MS).unwrap())
    });
    g.bench_function("postcard_4_metrics", |b| {
        b.iter(|| decode_frame(std::hint::black_box(&frame), &limits, NOW_MS).unwrap())
    });
    g.finish();
}

fn readings(devices: usize, per_device: usize, t0: i64) -> Vec<Reading> {
    let metrics: Vec<Arc<str>> = ["temp", "humidity", "pressure", "battery"]
        .iter()
        .map(|m| Arc::from(*m))
        .collect();
    let mut out = Vec::with_capacity(devices * per_device * 4);
    for i in 0..per_device {
        for d in 0..devices {
            let device: Arc<str> = Arc::from(format!("dev-{d:05}"));
            for (k, m) in metrics.iter().enumerate() {
                out.push(Reading {
                    device: device.clone(),
                    metric: m.clone(),
                    ts_ms: t0 + i as i64,
                    value: Value::F64(k as f64 + i as f64 * 0.01),
                });
            }
        }
    }
    out
}

fn hub_publish(c: &mut Criterion) {
    let hub = Arc::new(Hub::new(
        1,
        HubLimits {
            ring_capacity: 100_000,
            ring_bytes: 32 * 1024 * 1024,
            client_queue: 10_000,
            max_subscribers: 1_000,
            max_filters: 10,
            max_subscriptions: 16,
        },
        Arc::new(NoLabels),
        Arc::new(Metrics::default()),
    ));
    let batch = readings(1_000, 1, 0);
    let mut g = c.benchmark_group("live");
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("hub_publish_4000_no_subscribers", |b| {
        b.iter(|| hub.publish(&batch))
    });
    // Subscribers that never read: their queues fill, then conflate. What this measures
    // is the cost a stalled dashboard adds to every publish (ingest's live path).
    let stalled: Vec<_> = (0..100)
        .map(|i| {
            hub.subscribe(format!("s{i}"), Filter::default(), None)
                .unwrap()
        })
        .collect();
    g.bench_function("hub_publish_4000_100_stalled_subscribers", |b| {
        b.iter(|| hub.publish(&batch))
    });
    assert!(stalled.iter().all(|(s, _, _)| s.queued() <= 10_000 + 4_000));
    g.finish();
}

fn store_write(c: &mut Criterion) {
    // Batches of 20,000 points (a fleet's batches are smaller than `batch.max_rows`),
    // spread over few or many series: the number of series a write touches is what the
    // cost of a per-series layout depends on. One iteration is what the writer does for
    // 2,000,000 points: 100 log appends and one compaction, so the compaction's cost is
    // in the figure. With 200,000 series (50,000 devices of 4 metrics) one batch holds
    // 5,000 devices' points and consecutive batches move on through the fleet, as a
    // steady fleet at 1 message/s does over 10 s (the default `store.compact_interval`).
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(2_000_000));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    for (devices, per_device, fleet) in [
        (10usize, 500usize, 10usize),
        (1_000, 5, 1_000),
        (5_000, 1, 50_000),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _reader) =
            fluxgate::store::open_store(dir.path(), Default::default()).unwrap();
        let mut t0 = 0i64;
        let mut offset = 0usize;
        let name = format!("write_2000000_points_{}_series_with_compaction", fleet * 4);
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    (0..100)
                        .map(|_| {
                            if offset == 0 {
                                t0 += per_device as i64 * 1_000;
                            }
                            let batch = fleet_readings(offset, devices, per_device, t0);
                            offset = (offset + devices) % fleet;
                            batch
                        })
                        .collect::<Vec<_>>()
                },
                |batches| {
                    for batch in &batches {
                        writer.write(batch).unwrap();
                    }
                    writer.compact().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// A one-hour `readings` query of one series after an hour of fleet load: 5,000 devices
/// of 4 metrics (20,000 series) sending once per second, written one batch per second
/// and compacted every 10 s, as the gateway does. Besides criterion's estimate it prints
/// p50/p99 of 1,000 queries of random series (`STORE_READ_DEVICES` overrides the
/// fleet size).
fn store_read(c: &mut Criterion) {
    let devices: usize = std::env::var("STORE_READ_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let dir = tempfile::tempdir().unwrap();
    let (mut writer, reader) = fluxgate::store::open_store(dir.path(), Default::default()).unwrap();
    let t0 = 1_795_000_000_000i64;
    let started = std::time::Instant::now();
    for s in 0..3_600i64 {
        writer
            .write(&fleet_readings(0, devices, 1, t0 + s * 1_000))
            .unwrap();
        if s % 10 == 9 {
            writer.compact().unwrap();
        }
    }
    eprintln!(
        "store_read: wrote {} points over {} series in {:?}",
        devices * 4 * 3_600,
        devices * 4,
        started.elapsed()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let query = |d: usize| fluxgate::store::RangeQuery {
        device: format!("dev-{d:05}"),
        metric: "temp".into(),
        from_ms: t0,
        to_ms: t0 + 3_600_000,
        step: None,
        limit: 100_000,
    };
    let mut times: Vec<Duration> = (0..1_000)
        .map(|_| {
            let q = query(fastrand::usize(..devices));
            let t = std::time::Instant::now();
            let page = rt.block_on(reader.range(q)).unwrap();
            let elapsed = t.elapsed();
            assert_eq!(page.points.len(), 3_600);
            elapsed
        })
        .collect();
    times.sort();
    eprintln!(
        "store_read: one-hour readings query of one series: p50 {:?}, p99 {:?}, max {:?} (1,000 queries)",
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times[times.len() - 1]
    );
    let mut g = c.benchmark_group("store");
    g.bench_function(
        format!(
            "read_one_hour_of_one_series_after_an_hour_of_{}_series",
            devices * 4
        ),
        |b| {
            b.iter(|| {
                rt.block_on(reader.range(query(fastrand::usize(..devices))))
                    .unwrap()
            })
        },
    );
    g.finish();
}

/// `per_device` points of each of the 4 metrics of devices `offset..offset + devices`.
fn fleet_readings(offset: usize, devices: usize, per_device: usize, t0: i64) -> Vec<Reading> {
    let metrics: Vec<Arc<str>> = ["temp", "humidity", "pressure", "battery"]
        .iter()
        .map(|m| Arc::from(*m))
        .collect();
    let mut out = Vec::with_capacity(devices * per_device * 4);
    for i in 0..per_device {
        for d in offset..offset + devices {
            let device: Arc<str> = Arc::from(format!("dev-{d:05}"));
            for (k, m) in metrics.iter().enumerate() {
                out.push(Reading {
                    device: device.clone(),
                    metric: m.clone(),
                    ts_ms: t0 + i as i64,
                    value: Value::F64(k as f64 + i as f64 * 0.01),
                });
            }
        }
    }
    out
}

criterion_group!(benches, decode, hub_publish, store_write, store_read);
criterion_main!(benches);
