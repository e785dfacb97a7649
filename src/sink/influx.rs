//! The InfluxDB v2 writer: `POST {url}/api/v2/write?org=&bucket=&precision=` with the
//! line protocol body (gzip-compressed when configured) and `Authorization: Token`.
//!
//! Outcome rules, per request:
//! * 2xx: written.
//! * 429 and 503: retried after the server's `Retry-After` (seconds or HTTP date) when
//!   it sends one, else after the backoff.
//! * other 5xx, 408, timeouts, connection errors: retried with exponential backoff and
//!   jitter (`retry.initial * retry.multiplier^n`, at most `retry.max`, then a random
//!   50-100 % of it).
//! * 401, 403, 404: retried too. They mean a wrong token, permission or bucket, a
//!   configuration problem that an operator fixes, not bad data; dead-lettering would
//!   throw every batch away until then. `/readyz` reports it meanwhile.
//! * any other 4xx (bad data, such as InfluxDB's 400 `partial write: field type
//!   conflict`): the request is split in halves and each half sent again, down to single
//!   lines (at most [`MAX_REQUESTS_PER_JOB`] requests per job); a single line (or a part
//!   past that budget) the server still rejects goes to the dead-letter file with the
//!   server's reason, counted, and the writer moves on. So one device's bad line never
//!   costs the other devices' points that shared its request.
//!
//! reqwest and HTTP types stay inside this module.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{self, HeaderValue};
use tokio_util::sync::CancellationToken;

use crate::config::{InfluxConfig, Precision, RetryConfig};
use crate::observe::{Event, Metrics};
use crate::sink::spool::{Done, Job};
use crate::sink::{SinkError, SinkHealth};

/// The longest `Retry-After` honoured; a larger one is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Writes jobs to the server; one instance shared by `max_in_flight` tasks.
pub struct InfluxWriter {
    client: reqwest::Client,
    url: reqwest::Url,
    auth: Option<HeaderValue>,
    gzip: bool,
    retry: RetryConfig,
    dead_letter: PathBuf,
    metrics: Arc<Metrics>,
    health: Arc<SinkHealth>,
}

enum Attempt {
    Written,
    Rejected {
        status: u16,
        reason: String,
    },
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
}

impl InfluxWriter {
    /// A writer for `config` with the resolved `token`; rejected batches are appended to
    /// `dead_letter`.
    pub fn new(
        config: &InfluxConfig,
        token: &str,
        dead_letter: PathBuf,
        metrics: Arc<Metrics>,
        health: Arc<SinkHealth>,
    ) -> Result<Self, SinkError> {
        let mut url =
            reqwest::Url::parse(&config.url).map_err(|e| SinkError::Config(format!("url: {e}")))?;
        let path = format!("{}/api/v2/write", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url.query_pairs_mut()
            .clear()
            .append_pair("org", &config.org)
            .append_pair("bucket", &config.bucket)
            .append_pair(
                "precision",
                match config.precision {
                    Precision::Ms => "ms",
                    Precision::Ns => "ns",
                },
            );
        let auth = if token.is_empty() {
            None
        } else {
            let mut v = HeaderValue::from_str(&format!("Token {token}"))
                .map_err(|_| SinkError::Config("token: not a valid header value".to_owned()))?;
            v.set_sensitive(true);
            Some(v)
        };
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.max_in_flight)
            .build()
            .map_err(|e| SinkError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            client,
            url,
            auth,
            gzip: config.gzip,
            retry: config.retry.clone(),
            dead_letter,
            metrics,
            health,
        })
    }

    /// Take jobs until the queue closes or `stop` is cancelled; report each finished
    /// job on `done`. A job interrupted by `stop` is not reported: it stays in the
    /// buffer.
    pub async fn run(
        self: Arc<Self>,
        jobs: flume::Receiver<Job>,
        done: flume::Sender<Done>,
        stop: CancellationToken,
    ) {
        loop {
            let job = tokio::select! {
                job = jobs.recv_async() => match job {
                    Ok(job) => job,
                    Err(_) => break,
                },
                () = stop.cancelled() => break,
            };
            tokio::select! {
                () = self.deliver(&job) => {
                    let _ = done.send(Done { id: job.id });
                }
                () = stop.cancelled() => break,
            }
        }
    }

    /// Deliver one job: every line ends up accepted by the server or in the dead-letter
    /// file. A request the server rejects as bad data is split in halves and each half
    /// sent again, down to single lines, so one bad line (a field whose type conflicts
    /// with what the database already holds, say) costs only itself: the other devices'
    /// points in the same request are written. InfluxDB answers such a request with a
    /// 400 `partial write` after writing the good points; sending them again overwrites
    /// them with the same values, so the split adds no duplicates.
    async fn deliver(&self, job: &Job) {
        // Parts still to send, the next one last: halves are pushed second half first so
        // that lines keep their order.
        let mut pending: Vec<(Bytes, usize)> = vec![(job.body.clone(), job.lines)];
        let mut requests = 0usize;
        while let Some((raw, lines)) = pending.pop() {
            requests += 1;
            let Some((status, reason)) = self.send(&raw, lines).await else {
                continue;
            };
            match split_in_half(&raw) {
                Some(((a, a_lines), (b, b_lines))) if requests < MAX_REQUESTS_PER_JOB => {
                    pending.push((b, b_lines));
                    pending.push((a, a_lines));
                }
                _ => {
                    let file_error = self.dead_letter(&raw, lines, status, &reason).await.err();
                    self.metrics.emit(Event::SinkDeadLettered {
                        lines,
                        status,
                        reason: &reason,
                        file_error: file_error.as_deref(),
                    });
                }
            }
        }
    }

    /// Send `raw` (`lines` lines) until the server accepts it (`None`) or rejects it as
    /// bad data (`Some((status, reason))`); everything else is retried.
    async fn send(&self, raw: &Bytes, lines: usize) -> Option<(u16, String)> {
        let body = if self.gzip {
            let raw = raw.clone();
            // Compression is CPU work of a few ms per request: off the async workers.
            match tokio::task::spawn_blocking(move || gzip(&raw)).await {
                Ok(Ok(b)) => Some(b),
                _ => None,
            }
        } else {
            None
        };
        let (body, gzipped) = match body {
            Some(b) => (b, true),
            None => (raw.clone(), false),
        };
        let started = Instant::now();
        let mut retries = 0u32;
        loop {
            match self.attempt(&body, gzipped).await {
                Attempt::Written => {
                    self.health.set_failing(false);
                    self.metrics.emit(Event::SinkWritten {
                        lines,
                        bytes: body.len(),
                        elapsed: started.elapsed(),
                        retries,
                    });
                    return None;
                }
                Attempt::Rejected { status, reason } => {
                    // The server is up and answering: not a readiness problem.
                    self.health.set_failing(false);
                    return Some((status, reason));
                }
                Attempt::Retry {
                    status,
                    error,
                    retry_after,
                } => {
                    let delay = retry_after.unwrap_or_else(|| backoff(&self.retry, retries));
                    self.health.set_failing(true);
                    self.metrics.emit(Event::SinkRetry {
                        status,
                        error: &error,
                        delay,
                    });
                    retries = retries.saturating_add(1);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attempt(&self, body: &Bytes, gzipped: bool) -> Attempt {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body.clone());
        if gzipped {
            request = request.header(header::CONTENT_ENCODING, "gzip");
        }
        if let Some(auth) = &self.auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    status: None,
                    error: error_chain(&e),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Written;
        }
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let reason = reason_text(response.text().await.unwrap_or_default());
        let code = status.as_u16();
        match code {
            401 | 403 | 404 | 408 | 429 | 500..=599 => Attempt::Retry {
                status: Some(code),
                error: reason,
                retry_after,
            },
            _ => Attempt::Rejected {
                status: code,
                reason,
            },
        }
    }

    /// Append the rejected request to the dead-letter file: a comment line with the
    /// time, status and reason, then the lines themselves, so the file is line protocol
    /// that can be fixed and posted again.
    async fn dead_letter(
        &self,
        body: &Bytes,
        lines: usize,
        status: u16,
        reason: &str,
    ) -> Result<(), String> {
        let path = self.dead_letter.clone();
        let header = format!(
            "# {} status={status} lines={lines} reason={reason}\n",
            humantime::format_rfc3339_millis(SystemTime::now()),
        );
        let body = body.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(header.as_bytes())?;
            f.write_all(&body)?;
            f.sync_data()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", self.dead_letter.display()))
    }
}

/// The most requests one job may cost while its rejected parts are split: a request of
/// n lines with one bad line needs about 2 log2(n) of them (26 for 5,000 lines). Past
/// this, a rejected part goes to the dead-letter file whole, so a request full of bad
/// lines cannot keep a writer busy for 2n requests.
const MAX_REQUESTS_PER_JOB: usize = 256;

/// Split a body of newline-terminated lines into two halves of whole lines, with their
/// line counts; `None` for a single line. (No line holds a newline of its own: the
/// encoder writes control bytes in values as U+FFFD.)
fn split_in_half(raw: &Bytes) -> Option<((Bytes, usize), (Bytes, usize))> {
    let ends: Vec<usize> = raw
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1)
        .collect();
    // A body whose last line lacks its newline still counts that line.
    let total = ends.len() + usize::from(raw.last().is_some_and(|&b| b != b'\n'));
    if total < 2 {
        return None;
    }
    let half = total / 2;
    let cut = ends[half - 1];
    Some(((raw.slice(..cut), half), (raw.slice(cut..), total - half)))
}

/// The delay before retry number `n + 1`: exponential, capped, with jitter (50-100 %).
pub fn backoff(retry: &RetryConfig, n: u32) -> Duration {
    let exp = retry.multiplier.powi(n.min(64) as i32);
    let base = retry.initial.mul_f64(exp.min(1e9)).min(retry.max);
    base.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let d = match v.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v.trim())
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// The server's reason on one line, at most 512 bytes.
fn reason_text(body: String) -> String {
    let mut s: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > 512 {
        let mut cut = 512;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    let s = s.trim().to_owned();
    if s.is_empty() {
        "(no reason given)".to_owned()
    } else {
        s
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn gzip(raw: &[u8]) -> std::io::Result<Bytes> {
    // The fastest level: line protocol compresses about 10:1 even so, and the gateway's
    // CPU is better spent on ingest.
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(raw)?;
    Ok(Bytes::from(enc.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let r = RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
        };
        for n in 0..20 {
            let d = backoff(&r, n);
            let base = Duration::from_millis(100 * 2u64.pow(n.min(10))).min(r.max);
            assert!(d >= base / 2 && d <= base, "retry {n}: {d:?} vs {base:?}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&future).expect("date");
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn split_keeps_whole_lines_in_order() {
        let body = Bytes::from_static(b"a 1\nb 2\nc 3\n");
        let ((x, xn), (y, yn)) = split_in_half(&body).expect("splits");
        assert_eq!(
            (&x[..], xn, &y[..], yn),
            (&b"a 1\n"[..], 1, &b"b 2\nc 3\n"[..], 2)
        );
        let ((x, xn), (y, yn)) = split_in_half(&y).expect("splits");
        assert_eq!(
            (&x[..], xn, &y[..], yn),
            (&b"b 2\n"[..], 1, &b"c 3\n"[..], 1)
        );
        assert!(split_in_half(&Bytes::from_static(b"a 1\n")).is_none());
        assert!(split_in_half(&Bytes::new()).is_none());
        let ((x, _), (y, yn)) = split_in_half(&Bytes::from_static(b"a\nb")).expect("splits");
        assert_eq!((&x[..], &y[..], yn), (&b"a\n"[..], &b"b"[..], 1));
    }

    #[test]
    fn reason_is_one_bounded_line() {
        assert_eq!(reason_text("a\nb".to_owned()), "a b");
        assert_eq!(reason_text(String::new()), "(no reason given)");
        assert!(reason_text("é".repeat(1000)).len() <= 512);
    }
}
