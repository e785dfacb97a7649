//! HTTPS and WSS on the HTTP listener, with the real binary: `fluxgate certs dev` writes
//! the certificates, clients trust only its CA, a plaintext client on the TLS port is
//! refused and counted, and SIGHUP reloads the certificate for new connections while an
//! open connection keeps working; a bad new certificate keeps the old one.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Process, bounded, fluxgate};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// Run `fluxgate certs dev --out dir` and check what it wrote.
fn dev_certs(dir: &Path, devices: &[&str]) {
    let mut cmd = fluxgate();
    cmd.args(["certs", "dev", "--out"]).arg(dir);
    for d in devices {
        cmd.args(["--device", d]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "server.pem", "server-key.pem"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    for d in devices {
        assert!(dir.join(format!("device-{d}.pem")).exists(), "{d}");
    }
}

fn https_addr(p: &Process) -> SocketAddr {
    let log = p.stderr.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.contains("listening mqtt="))
        .unwrap()
        .to_owned();
    let start = line.find("https=").unwrap() + "https=".len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn client_trusting(ca: &Path) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A TLS connection to `addr` that trusts only `ca`, for raw HTTP/1.1 and WebSockets.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One keep-alive GET /healthz on an open connection; the status line.
async fn healthz<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> String {
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.lines().next().unwrap_or_default().to_owned()
}

/// The gateway's `/metrics` page, over plaintext HTTP.
async fn metrics_text(p: &Process) -> String {
    reqwest::get(format!("http://{}/metrics", p.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn sighup(p: &Process) {
    let ok = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

async fn wait_log(p: &Process, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = p.stderr.lock().unwrap().matches(needle).count();
        if n >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {count}x {needle:?} in the log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_with_dev_certificates_and_reload_on_sighup() {
    bounded(60, async {
        let certs = tempfile::tempdir().unwrap();
        let first = certs.path().join("first");
        let second = certs.path().join("second");
        dev_certs(&first, &["dev-1"]);
        dev_certs(&second, &[]);
        // The gateway serves copies, so that the test can replace them.
        let live = certs.path().join("live");
        std::fs::create_dir(&live).unwrap();
        for f in ["server.pem", "server-key.pem"] {
            std::fs::copy(first.join(f), live.join(f)).unwrap();
        }
        let (cert, key) = (live.join("server.pem"), live.join("server-key.pem"));
        let mut p = Process::start(&[
            ("FLUXGATE_HTTP__TLS__ENABLED", "true"),
            ("FLUXGATE_HTTP__TLS__LISTEN", "127.0.0.1:0"),
            ("FLUXGATE_HTTP__TLS__CERT", cert.to_str().unwrap()),
            ("FLUXGATE_HTTP__TLS__KEY", key.to_str().unwrap()),
        ]);
        let tls = https_addr(&p);
        let url = |path: &str| format!("https://localhost:{}{path}", tls.port());

        // HTTPS with the dev CA: the same routes as plaintext, credentials included.
        let first_client = client_trusting(&first.join("ca.pem"));
        let r = first_client
            .get(url("/api/v1/devices"))
            .bearer_auth(&p.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // A client that does not trust the CA gets no answer, and nor does a plaintext
        // client on the TLS port; the gateway counts the failed handshakes.
        let stranger = client_trusting(&second.join("ca.pem"));
        assert!(stranger.get(url("/healthz")).send().await.is_err());
        let plain = reqwest::get(format!("http://{tls}/healthz")).await;
        assert!(plain.is_err() || plain.unwrap().status() != 200);
        let metrics = metrics_text(&p).await;
        let failed = common::scrape(
            &metrics,
            r#"fluxgate_http_connections_closed_total{reason="tls_handshake"}"#,
        );
        assert!(failed >= 2.0, "tls_handshake closes: {failed}");

        // WSS: a live stream over TLS.
        let stream = tls_connect(tls, &first.join("ca.pem")).await.unwrap();
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("wss://localhost:{}/api/v1/live", tls.port()),
            )
            .map(|mut r| {
                r.headers_mut().insert(
                    "authorization",
                    format!("Bearer {}", p.admin_key).parse().unwrap(),
                );
                r
            })
            .unwrap();
        let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap();
        assert_eq!(response.status(), 101);
        let first_frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(first_frame.is_text(), "{first_frame:?}");

        // An open keep-alive connection, made with the first certificate.
        let mut open = tls_connect(tls, &first.join("ca.pem")).await.unwrap();
        assert_eq!(healthz(&mut open).await, "HTTP/1.1 200 OK");

        // Replace the certificate and send SIGHUP: new connections get the new one.
        for f in ["server.pem", "server-key.pem"] {
            std::fs::copy(second.join(f), live.join(f)).unwrap();
        }
        sighup(&p);
        wait_log(&p, "TLS certificate reloaded", 1).await;
        assert!(tls_connect(tls, &first.join("ca.pem")).await.is_err());
        let second_client = client_trusting(&second.join("ca.pem"));
        assert_eq!(
            second_client
                .get(url("/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        // The open connection and the live stream stay up.
        assert_eq!(healthz(&mut open).await, "HTTP/1.1 200 OK");
        ws.send(tokio_tungstenite::tungstenite::Message::Ping(
            vec![7].into(),
        ))
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if msg.is_pong() {
                break;
            }
            assert!(Instant::now() < deadline, "no pong on the old stream");
        }

        // A bad certificate file: the reload is refused, the current certificate stays.
        std::fs::write(&cert, "not a certificate").unwrap();
        sighup(&p);
        wait_log(&p, "TLS certificate not reloaded", 1).await;
        assert_eq!(
            second_client
                .get(url("/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );

        let metrics = metrics_text(&p).await;
        for series in [
            "fluxgate_tls_reloads_total",
            "fluxgate_tls_reload_failures_total",
        ] {
            assert_eq!(common::scrape(&metrics, series), 1.0, "{series}");
        }

        p.sigterm();
        assert!(p.wait_exit(Duration::from_secs(30)).await.success());
    })
    .await;
}

#[test]
fn certs_dev_refuses_a_bad_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let out = fluxgate()
        .args(["certs", "dev", "--out"])
        .arg(dir.path())
        .args(["--device", "../etc"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid device id"));
    assert!(!dir.path().join("ca.pem").exists(), "nothing written");
}

#[test]
fn tls_without_files_or_any_listener_is_refused_at_start() {
    for (env, needle) in [
        (vec![("FLUXGATE_HTTP__TLS__ENABLED", "true")], "http.tls"),
        (
            vec![("FLUXGATE_HTTP__PLAINTEXT", "false")],
            "http.plaintext",
        ),
    ] {
        let out = fluxgate()
            .args(["config", "check"])
            .envs(env)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
    }
}
