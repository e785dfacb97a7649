//! External sinks: the InfluxDB v2 write API behind a crash-safe buffer.
//!
//! ```text
//! pipeline --DurableBatch--> spool thread --append (fsync per batch)--> buffer (disk|memory)
//!   (acks confirmed after the append)  \--Job (<= max_in_flight)--> writer tasks --HTTP--> InfluxDB
//!                                       <--Done----------------------/  (retry | dead-letter)
//! ```
//!
//! Its settings (`[sinks.influxdb]`) live with all other settings in
//! [`crate::config`], which is below this module.
//!
//! * [`line`]: line protocol encoding (pure).
//! * [`buffer`]: the disk and memory buffers (synchronous, single owner).
//! * [`spool`]: the thread that owns the buffer.
//! * [`influx`]: the HTTP writer, the only user of reqwest's HTTP client (the config
//!   validation in [`crate::config`] also uses reqwest, but only `reqwest::Url`, to check
//!   `sinks.influxdb.url`).
//!
//! The sink is independent of the embedded store: a database outage fills the buffer,
//! never the pipeline (unless `when_full = "block"` is chosen), so the store and the
//! live path keep going.

pub mod buffer;
pub mod influx;
pub mod line;
pub mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::config::{BufferMode, InfluxConfig};
use crate::observe::{Event, Metrics};

/// The dead-letter file inside `data_dir`.
pub const DEAD_LETTER_FILE: &str = "influxdb-dead-letter.lp";

/// Above this fill ratio of `buffer.max_bytes` (per mille), `/readyz` reports the sink.
const UNREADY_FILL_PERMILLE: u64 = 900;

/// Errors of building a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A setting cannot be used (checked again at build, beyond `validate`).
    #[error("sinks.influxdb.{0}")]
    Config(String),
    /// The token file cannot be read.
    #[error("sinks.influxdb.token_file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The buffer cannot be opened.
    #[error("sinks.influxdb buffer: {0}")]
    Buffer(#[from] buffer::BufferError),
}

/// What `/readyz` knows about a sink.
#[derive(Debug)]
pub struct SinkHealth {
    name: &'static str,
    /// Whether the latest write attempt failed (the reason goes to the log and the
    /// retry counter, never to the unauthenticated `/readyz`).
    failing: AtomicBool,
    fill_permille: AtomicU64,
}

impl SinkHealth {
    /// A healthy sink called `name`.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            failing: AtomicBool::new(false),
            fill_permille: AtomicU64::new(0),
        }
    }

    /// The sink's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Record the outcome of the latest write attempt.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// Whether the latest write attempt failed.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Record how full the buffer is.
    pub fn set_fill(&self, bytes: u64, max: u64) {
        let permille = bytes.saturating_mul(1000) / max.max(1);
        self.fill_permille.store(permille, Ordering::Relaxed);
    }

    /// The sink's state when it is not ready, as a stable name without details (for the
    /// unauthenticated `/readyz`): `write_failing` or `buffer_nearly_full`.
    pub fn state(&self) -> Option<&'static str> {
        if self.is_failing() {
            return Some("write_failing");
        }
        let fill = self.fill_permille.load(Ordering::Relaxed);
        (fill >= UNREADY_FILL_PERMILLE).then_some("buffer_nearly_full")
    }
}

/// The parts of a built InfluxDB sink, for `app.rs` to start.
pub struct InfluxSink {
    /// The spool component (run it on a dedicated thread).
    pub spooler: spool::Spooler,
    /// The writer (run `max_in_flight` tasks of it).
    pub writer: Arc<influx::InfluxWriter>,
    /// Readiness for `/readyz`.
    pub health: Arc<SinkHealth>,
    /// Writer tasks to start.
    pub max_in_flight: usize,
}

/// Build the InfluxDB sink: resolve the token, open (and recover) the buffer. Blocking
/// file I/O: call it on a blocking thread.
pub fn open_influx(
    config: &InfluxConfig,
    data_dir: &Path,
    metrics: Arc<Metrics>,
    labels: line::LabelLookup,
) -> Result<InfluxSink, SinkError> {
    let token = match &config.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| SinkError::TokenFile {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_owned(),
        None => config.token.0.clone(),
    };
    let health = Arc::new(SinkHealth::new("influxdb"));
    let b = &config.buffer;
    let limits = buffer::Limits {
        max_bytes: b.max_bytes,
        segment_bytes: b.segment_bytes,
        when_full: b.when_full,
    };
    let (buf, recovery) = buffer::open(b.mode, &data_dir.join(&b.dir), limits)?;
    if recovery.regions > 0 {
        metrics.emit(Event::SinkBufferCorrupt {
            regions: recovery.regions,
            bytes: recovery.bytes,
            detail: &recovery.details.join("; "),
        });
    }
    let stats = buf.stats();
    if stats.unacked_records > 0 {
        tracing::info!(
            lines = stats.unacked_records,
            bytes = stats.unacked_bytes,
            "influxdb buffer: replaying unwritten lines"
        );
    }
    let writer = influx::InfluxWriter::new(
        config,
        &token,
        data_dir.join(DEAD_LETTER_FILE),
        metrics.clone(),
        health.clone(),
    )?;
    let spooler = spool::Spooler {
        buffer: buf,
        memory: b.mode == BufferMode::Memory,
        encoder: line::LineEncoder::new(&config.measurement, config.precision)
            .with_label_tags(&config.tag_labels, labels),
        batch: config.batch.clone(),
        max_in_flight: config.max_in_flight,
        drain: config.shutdown_drain,
        metrics,
        health: health.clone(),
        max_bytes: b.max_bytes,
    };
    Ok(InfluxSink {
        spooler,
        writer: Arc::new(writer),
        health,
        max_in_flight: config.max_in_flight,
    })
}
