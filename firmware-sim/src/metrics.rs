//! Scraping the gateway's Prometheus `/metrics` endpoint.
//!
//! The benchmark measures end-to-end throughput by watching the gateway's ingest counter.
//! A full HTTP client would be a heavy dependency for one GET per 50 ms against a local
//! endpoint, so this module speaks just enough HTTP/1.1 over a [`TcpStream`]: one request
//! with `Connection: close`, then the status line, headers and a body that is either
//! delimited by `Content-Length`, chunked, or ended by the server closing the socket.
//!
//! The Prometheus text parser is equally small: it finds the samples of one metric whose
//! labels include the requested ones and sums their values.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for a `/metrics` response; a gateway's exposition is a few kilobytes, so
/// anything this large means we are talking to something else.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// How long a single scrape may take before it counts as failed.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches `http://{addr}{path}` and returns the body as text.
///
/// Only `200 OK` responses are accepted; anything else is an error naming the status.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    tokio::time::timeout(SCRAPE_TIMEOUT, http_get_inner(addr, path))
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out after {SCRAPE_TIMEOUT:?}"))?
}

async fn http_get_inner(addr: &str, path: &str) -> anyhow::Result<String> {
    let raw = exchange(addr, "GET", path, None, None).await?;
    let body = parse_http_response(&raw)?;
    String::from_utf8(body).context("metrics body is not UTF-8")
}

/// Sends one request and reads the whole raw response.
async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: firmware-sim\r\nConnection: close\r\n"
    );
    if let Some(token) = bearer {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    if let Some(body) = body {
        stream.write_all(body).await?;
    }

    // With `Connection: close` the server ends the response by closing the socket, so
    // reading to EOF (bounded by MAX_RESPONSE) collects the whole response.
    let mut raw = Vec::new();
    let mut limited = (&mut stream).take(MAX_RESPONSE as u64 + 1);
    limited.read_to_end(&mut raw).await?;
    if raw.len() > MAX_RESPONSE {
        bail!("response from {addr} exceeds {MAX_RESPONSE} bytes");
    }
    Ok(raw)
}

/// Sends `method path` with an optional bearer token and JSON body; returns the status
/// and the body whatever the status.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let raw = tokio::time::timeout(
        Duration::from_secs(60),
        exchange(addr, method, path, bearer, body),
    )
    .await
    .with_context(|| format!("{method} http://{addr}{path} timed out"))??;
    split_response(&raw)
}

/// Splits a complete HTTP/1.1 response into its body, checking for status 200 and
/// undoing chunked transfer encoding.
pub fn parse_http_response(raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (status, body) = split_response(raw)?;
    if status != 200 {
        bail!("HTTP status {status}");
    }
    Ok(body)
}

/// Splits a complete HTTP/1.1 response into status and body, undoing chunked transfer
/// encoding.
fn split_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let header_end =
        find(raw, b"\r\n\r\n").context("incomplete HTTP response: no end of headers")?;
    let head = std::str::from_utf8(&raw[..header_end]).context("HTTP headers are not UTF-8")?;
    let body = &raw[header_end + 4..];

    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = status
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;

    let mut chunked = false;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().context("bad Content-Length")?);
        }
    }

    let body = if chunked {
        decode_chunked(body)?
    } else if let Some(len) = content_length {
        body.get(..len)
            .with_context(|| format!("body truncated: {} of {len} bytes", body.len()))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

/// Decodes a chunked transfer-encoded body (chunk extensions and trailers are ignored).
fn decode_chunked(mut rest: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").context("chunked body: missing chunk size line")?;
        let size_line =
            std::str::from_utf8(&rest[..line_end]).context("chunk size is not UTF-8")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).context("chunked body truncated")?;
        out.extend_from_slice(chunk);
        rest = rest
            .get(size + 2..)
            .context("chunked body truncated after chunk")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Returns the sum of all samples of `metric` whose labels include every pair in
/// `labels`, or `None` if no sample matched.
///
/// Summing over matching series means the caller does not need to know every label the
/// gateway attaches: asking for `{transport="mqtt"}` still works if the gateway later
/// splits the counter by encoding. Malformed lines are skipped rather than failing the
/// whole scrape, because one odd metric elsewhere should not stop the benchmark.
pub fn parse_metric(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(sample) = parse_sample(line) else {
            continue;
        };
        if sample.name != metric {
            continue;
        }
        let all_match = labels
            .iter()
            .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if all_match {
            total = Some(total.unwrap_or(0.0) + sample.value);
        }
    }
    total
}

/// One parsed exposition line.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // The value is the first whitespace-separated field; an optional timestamp follows.
    let value = rest.split_ascii_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels plus the text after the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        // Label values escape backslash, double quote and newline.
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        }
    }
}

/// Scrapes `http://{addr}/metrics` and returns the value of `metric{labels}` (see
/// [`parse_metric`]); `Ok(None)` means the endpoint answered but the series is absent,
/// which for a counter usually means it is still zero.
pub async fn scrape_counter(
    addr: &str,
    metric: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<Option<f64>> {
    let body = http_get(addr, "/metrics").await?;
    Ok(parse_metric(&body, metric, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP fluxgate_ingest_messages_total Messages ingested.
# TYPE fluxgate_ingest_messages_total counter
fluxgate_ingest_messages_total{transport="mqtt"} 12345
fluxgate_ingest_messages_total{transport="ws"} 67 1700000000000
fluxgate_ingest_messages_total_created{transport="mqtt"} 1.7e9
fluxgate_ingest_readings_total{transport="mqtt",encoding="json"} 100
fluxgate_ingest_readings_total{transport="mqtt",encoding="postcard"} 50
fluxgate_ingest_readings_total{ transport = "ws" , encoding="json", } 3
weird_label{path="a\"b\\c\nd"} 1
fluxgate_uptime_seconds 42.5
fluxgate_broken{transport="mqtt" 7
fluxgate_inf +Inf
"#;

    #[test]
    fn parses_counter_with_labels() {
        let m = "fluxgate_ingest_messages_total";
        assert_eq!(
            parse_metric(TEXT, m, &[("transport", "mqtt")]),
            Some(12345.0)
        );
        assert_eq!(parse_metric(TEXT, m, &[("transport", "ws")]), Some(67.0));
        assert_eq!(parse_metric(TEXT, m, &[("transport", "http")]), None);
        // No label filter sums every series of the metric, and the `_created` series,
        // which shares the prefix, is not mistaken for it.
        assert_eq!(parse_metric(TEXT, m, &[]), Some(12412.0));
    }

    #[test]
    fn sums_over_extra_labels_and_handles_odd_formatting() {
        let m = "fluxgate_ingest_readings_total";
        assert_eq!(parse_metric(TEXT, m, &[("transport", "mqtt")]), Some(150.0));
        assert_eq!(
            parse_metric(TEXT, m, &[("transport", "mqtt"), ("encoding", "postcard")]),
            Some(50.0)
        );
        assert_eq!(parse_metric(TEXT, m, &[("transport", "ws")]), Some(3.0));
        assert_eq!(
            parse_metric(TEXT, "weird_label", &[("path", "a\"b\\c\nd")]),
            Some(1.0)
        );
        assert_eq!(
            parse_metric(TEXT, "fluxgate_uptime_seconds", &[]),
            Some(42.5)
        );
        assert_eq!(parse_metric(TEXT, "fluxgate_broken", &[]), None);
        assert_eq!(parse_metric(TEXT, "fluxgate_inf", &[]), Some(f64::INFINITY));
        assert_eq!(parse_metric("", "x", &[]), None);
    }

    #[test]
    fn http_response_parsing() {
        let plain =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_http_response(plain).expect("plain"), b"hello");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked).expect("chunked"),
            b"hello world"
        );
        let until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(
            parse_http_response(until_close).expect("close"),
            b"all of it"
        );
        assert!(parse_http_response(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_http_response(b"garbage").is_err());
        assert!(
            parse_http_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
                .is_err()
        );
    }

    /// Serves one canned `/metrics` response per connection from a real TCP listener, so
    /// the scraper is exercised over the network exactly as the benchmark uses it.
    #[tokio::test]
    async fn scrapes_fake_metrics_endpoint() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            for chunked in [false, true] {
                let (mut sock, _) = listener.accept().await.expect("accept");
                let mut buf = Vec::new();
                let mut tmp = [0u8; 1024];
                while find(&buf, b"\r\n\r\n").is_none() {
                    let n = sock.read(&mut tmp).await.expect("read");
                    assert!(n > 0, "client closed before sending a request");
                    buf.extend_from_slice(&tmp[..n]);
                }
                let request = String::from_utf8(buf).expect("utf8 request");
                paths.push(request.lines().next().unwrap_or_default().to_string());
                let response = if chunked {
                    let (a, b) = TEXT.split_at(40);
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                        a.len(),
                        b.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{TEXT}",
                        TEXT.len()
                    )
                };
                sock.write_all(response.as_bytes()).await.expect("write");
                sock.shutdown().await.expect("shutdown");
            }
            paths
        });

        let metric = "fluxgate_ingest_messages_total";
        let mqtt = scrape_counter(&addr, metric, &[("transport", "mqtt")])
            .await
            .expect("scrape");
        assert_eq!(mqtt, Some(12345.0));
        let ws = scrape_counter(&addr, metric, &[("transport", "ws")])
            .await
            .expect("scrape chunked");
        assert_eq!(ws, Some(67.0));
        let paths = server.await.expect("server task");
        assert_eq!(paths, ["GET /metrics HTTP/1.1", "GET /metrics HTTP/1.1"]);
    }

    #[tokio::test]
    async fn scrape_of_closed_port_is_an_error() {
        // Bind then drop to get a port that is (almost certainly) closed.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        assert!(scrape_counter(&addr, "x", &[]).await.is_err());
    }
}
