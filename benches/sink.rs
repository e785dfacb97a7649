//! Criterion benchmarks of the InfluxDB sink's own work: line protocol encoding
//! (points/s) and the disk buffer's append (with its fsync per batch) + read throughput
//! (MB/s).
//!
//! Run: `cargo bench --bench sink`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fluxgate::config::{Precision, WhenFull};
use fluxgate::model::{Reading, Value};
use fluxgate::sink::buffer::{Buffer, DiskBuffer, Limits, Records};
use fluxgate::sink::line::LineEncoder;

/// `messages` device messages of 4 float metrics (one line each), 100 devices.
fn readings(messages: usize) -> Vec<Reading> {
    let metrics: Vec<Arc<str>> = ["temp", "humidity", "pressure", "battery"]
        .iter()
        .map(|m| Arc::from(*m))
        .collect();
    let devices: Vec<Arc<str>> = (0..100).map(|d| Arc::from(format!("sim-{d:05}"))).collect();
    let mut out = Vec::with_capacity(messages * 4);
    for i in 0..messages {
        for (k, m) in metrics.iter().enumerate() {
            out.push(Reading {
                device: devices[i % devices.len()].clone(),
                metric: m.clone(),
                ts_ms: 1_795_000_000_000 + i as i64,
                value: Value::F64(20.0 + (i % 10) as f64 * 0.37 + k as f64),
            });
        }
    }
    out
}

fn encode(c: &mut Criterion) {
    let batch = readings(5_000);
    let enc = LineEncoder::new("telemetry", Precision::Ms);
    let mut out = Records::default();
    let mut g = c.benchmark_group("sink_encode");
    // Elements are points (lines): 5,000 per batch, 4 fields each.
    g.throughput(Throughput::Elements(5_000));
    g.bench_function("line_protocol_5000_points_4_fields", |b| {
        b.iter(|| {
            out.clear();
            enc.encode(std::hint::black_box(&batch), &mut out)
        })
    });
    g.finish();
}

fn buffer(c: &mut Criterion) {
    let enc = LineEncoder::new("telemetry", Precision::Ms);
    let mut records = Records::default();
    enc.encode(&readings(5_000), &mut records);
    let bytes = records.framed_bytes();
    let dir = tempfile::tempdir().unwrap();
    let (mut buf, _) = DiskBuffer::open(
        dir.path(),
        Limits {
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            when_full: WhenFull::DropOldest,
        },
    )
    .unwrap();
    let mut body = Vec::with_capacity(1 << 20);
    let mut g = c.benchmark_group("sink_buffer");
    g.throughput(Throughput::Bytes(bytes));
    g.measurement_time(Duration::from_secs(10));
    // One pipeline batch of 5,000 lines appended (one fdatasync), then read back and
    // acknowledged (one cursor write + fsync), as the spool thread does.
    g.bench_function("append_read_ack_5000_lines", |b| {
        b.iter(|| {
            buf.append(&records).unwrap();
            loop {
                body.clear();
                let n = buf.read(5_000, usize::MAX, &mut body).unwrap();
                if n == 0 {
                    break;
                }
                buf.ack_oldest().unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, encode, buffer);
criterion_main!(benches);
