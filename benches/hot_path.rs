//! Criterion micro-benchmarks of the per-message hot path: decoding (JSON and postcard),
//! publishing to the live hub, and writing batches to the embedded SQLite store.
//!
//! Run: `cargo bench --bench hot_path` (or `scripts/bench.sh`). The store figure is the
//! one the store layout decision rests on: cost per point of a batched, idempotent
//! `INSERT OR REPLACE` into `points` keyed (series_id, ts) WITHOUT ROWID.
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
    // 20,000 points per batch (the default batch.max_rows), spread over few or many
    // series: the number of series touched per commit is what the write cost depends on.
    // With 200,000 series (50,000 devices of 4 metrics) one batch holds 5,000 devices'
    // points, and consecutive batches move on through the fleet, as a steady fleet does.
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(20_000));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
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
        let name = format!("write_batch_20000_points_{}_series", fleet * 4);
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    if offset == 0 {
                        t0 += per_device as i64;
                    }
                    let batch = fleet_readings(offset, devices, per_device, t0);
                    offset = (offset + devices) % fleet;
                    batch
                },
                |batch| writer.write(&batch).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
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

criterion_group!(benches, decode, hub_publish, store_write);
criterion_main!(benches);
