//! The cost of fluxgate's hand-written metrics against the `prometheus-client` crate
//! (the Prometheus organisation's Rust client), for the decision in ARCHITECTURE.md:
//! the hot-path increment of `Event::Ingested` (two counters, one per unit, labelled by
//! transport), and rendering a scrape of about the same size as `/metrics`.
//!
//! Run: `cargo bench --bench exposition`. With `EXPOSITION_PRINT=1` it also prints what
//! prometheus-client renders, to feed `promtool check metrics`.
#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use fluxgate::model::Transport;
use fluxgate::observe::{Event, Metrics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByTransport {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByReason {
    reason: String,
}

/// A registry shaped like fluxgate's `/metrics`: the two per-transport ingest counters,
/// and enough other families (reason-labelled counters and scalar gauges) to render
/// about as many series.
fn registry() -> (
    Registry,
    Family<ByTransport, Counter>,
    Family<ByTransport, Counter>,
) {
    let mut r = Registry::default();
    let messages = Family::<ByTransport, Counter>::default();
    let readings = Family::<ByTransport, Counter>::default();
    r.register(
        "fluxgate_ingest_messages",
        "Messages decoded successfully, by transport.",
        messages.clone(),
    );
    r.register(
        "fluxgate_ingest_readings",
        "Readings decoded, by transport.",
        readings.clone(),
    );
    for t in ["mqtt", "ws", "http"] {
        let _ = messages.get_or_create(&ByTransport { transport: t });
        let _ = readings.get_or_create(&ByTransport { transport: t });
    }
    for f in 0..12 {
        let fam = Family::<ByReason, Counter>::default();
        for reason in 0..12 {
            fam.get_or_create(&ByReason {
                reason: format!("reason_{reason}"),
            })
            .inc_by(reason);
        }
        r.register(
            format!("fluxgate_family_{f}"),
            "A reason-labelled counter.",
            fam,
        );
    }
    for g in 0..30 {
        let gauge = Gauge::<i64>::default();
        gauge.set(g);
        r.register(format!("fluxgate_scalar_{g}"), "A scalar.", gauge);
    }
    (r, messages, readings)
}

fn increments(c: &mut Criterion) {
    let metrics = Metrics::default();
    let (_r, messages, readings) = registry();
    let (m_ws, r_ws) = (
        messages
            .get_or_create(&ByTransport { transport: "ws" })
            .clone(),
        readings
            .get_or_create(&ByTransport { transport: "ws" })
            .clone(),
    );
    let mut g = c.benchmark_group("ingested_event");
    g.bench_function("fluxgate_emit", |b| {
        b.iter(|| {
            metrics.emit(Event::Ingested {
                transport: std::hint::black_box(Transport::Ws),
                readings: 4,
            })
        })
    });
    g.bench_function("prometheus_client_family_lookup", |b| {
        b.iter(|| {
            let t = ByTransport {
                transport: std::hint::black_box("ws"),
            };
            messages.get_or_create(&t).inc();
            readings.get_or_create(&t).inc_by(4);
        })
    });
    g.bench_function("prometheus_client_prefetched_handles", |b| {
        b.iter(|| {
            std::hint::black_box(&m_ws).inc();
            std::hint::black_box(&r_ws).inc_by(4);
        })
    });
    g.finish();
}

fn render(c: &mut Criterion) {
    let metrics = Metrics::default();
    let (r, _, _) = registry();
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    let mut ours = String::new();
    ours.push_str(&metrics.render());
    let mut theirs = String::new();
    prometheus_client::encoding::text::encode(&mut theirs, &r).unwrap();
    eprintln!(
        "series rendered: fluxgate {} ({} bytes), prometheus-client registry {} ({} bytes)",
        series(&ours),
        ours.len(),
        series(&theirs),
        theirs.len()
    );
    if std::env::var_os("EXPOSITION_PRINT").is_some() {
        println!("{theirs}");
    }
    let mut g = c.benchmark_group("render");
    g.bench_function("fluxgate_hand_written", |b| b.iter(|| metrics.render()));
    g.bench_function("prometheus_client_text", |b| {
        b.iter(|| {
            let mut out = String::with_capacity(16 * 1024);
            prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
            out
        })
    });
    g.finish();
}

criterion_group!(benches, increments, render);
criterion_main!(benches);
