//! TLS on every listener, with real clients.
//!
//! HTTPS and WSS on the HTTP listener, with the real binary: `fluxgate certs dev` writes
//! the certificates, clients trust only its CA, a plaintext client on the TLS port is
//! refused and counted, and SIGHUP reloads the certificate for new connections while an
//! open connection keeps working; a bad new certificate keeps the old one.
//!
//! mqtts: rumqttc (rustls, trusting only the dev CA) and `mosquitto_pub --cafile`
//! publish; SIGHUP and a file change reload the mqtts certificate the same way.
//!
//! Client certificates (mTLS) for MQTT and WSS/HTTPS ingest, from a PKI the test makes
//! with rcgen: the right CN is accepted without a token, a wrong CN, an expired
//! certificate, an unknown CA and a disabled device are refused and counted by reason;
//! token auth stays available.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Process, TestGateway, bounded, fluxgate, refused};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// Run `fluxgate certs dev --out dir` and check what it wrote.
/// Copy the server certificate and key of the dev certificates in `from` over the
/// ones the gateway serves from `live` (which a reload then picks up).
fn install_server_cert(from: &Path, live: &Path) {
    for f in ["server.pem", "server-key.pem"] {
        std::fs::copy(from.join(f), live.join(f)).unwrap();
    }
}

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
        install_server_cert(&first, &live);
        let (cert, key) = (live.join("server.pem"), live.join("server-key.pem"));
        let mut p = Process::start(&[
            ("FLUXGATE_HTTP__TLS__ENABLED", "true"),
            ("FLUXGATE_HTTP__TLS__LISTEN", "127.0.0.1:0"),
            ("FLUXGATE_HTTP__TLS__CERT", cert.to_str().unwrap()),
            ("FLUXGATE_HTTP__TLS__KEY", key.to_str().unwrap()),
            // Only SIGHUP reloads here, so the reload counts are exact.
            ("FLUXGATE_HTTP__TLS__RELOAD_POLL", "0s"),
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
        install_server_cert(&second, &live);
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
        (vec![("FLUXGATE_MQTT__TLS__ENABLED", "true")], "mqtt.tls"),
        (
            vec![("FLUXGATE_MQTT__PLAINTEXT", "false")],
            "mqtt.plaintext",
        ),
        (
            vec![
                ("FLUXGATE_MQTT__TLS__CLIENT_AUTH", "required"),
                ("FLUXGATE_MQTT__TLS__ENABLED", "true"),
                ("FLUXGATE_MQTT__TLS__CERT", "c.pem"),
                ("FLUXGATE_MQTT__TLS__KEY", "k.pem"),
            ],
            "mqtt.tls.client_auth",
        ),
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

// ---- mqtts ---------------------------------------------------------------------------

fn mqtts_addr(p: &Process) -> SocketAddr {
    let log = p.stderr.lock().unwrap().clone();
    let line = log.lines().find(|l| l.contains("listening mqtt=")).unwrap();
    let start = line.find("mqtts=").unwrap() + "mqtts=".len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A rustls client configuration trusting only `ca`, presenting `identity` if given.
fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Arc<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls::pki_types::PrivateKeyDer;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    })
}

/// An mqtts connection driven by the test (no background task): rumqttc with rustls.
struct Mqtts {
    client: rumqttc::AsyncClient,
    eventloop: rumqttc::EventLoop,
}

impl Mqtts {
    /// Connect as `id` (password `token`, if any) and wait for CONNACK: `Err` with
    /// rumqttc's error when the handshake or the login fails.
    async fn connect(
        addr: SocketAddr,
        id: &str,
        token: Option<&str>,
        tls: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Result<Mqtts, String> {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", addr.port());
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        if let Some(token) = token {
            options.set_credentials(id, token);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                        return if ack.code == rumqttc::ConnectReturnCode::Success {
                            Ok(())
                        } else {
                            Err(format!("{:?}", ack.code))
                        };
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .unwrap();
        outcome.map(|()| Mqtts { client, eventloop })
    }

    /// Publish one QoS 1 telemetry message and wait for its PUBACK.
    async fn publish(&mut self, device: &str, value: f64) {
        self.client
            .publish(
                format!("devices/{device}/telemetry"),
                rumqttc::QoS::AtLeastOnce,
                false,
                format!(r#"{{"temp":{value}}}"#),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match self.eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return,
                    Ok(_) => {}
                    Err(e) => panic!("mqtts connection failed: {e}"),
                }
            }
        })
        .await
        .unwrap();
    }
}

/// `mosquitto_pub` over TLS; its exit code and stderr.
async fn mosquitto_pub(args: Vec<String>) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("mosquitto_pub")
            .args(&args)
            .output()
            .unwrap_or_else(|e| {
                panic!("mosquitto_pub is missing ({e}): scripts/test.sh installs mosquitto-clients")
            });
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn mosquitto_args(
    addr: SocketAddr,
    ca: &Path,
    id: &str,
    token: Option<&str>,
    identity: Option<(&Path, &Path)>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-h",
        "localhost",
        "-p",
        &addr.port().to_string(),
        "--cafile",
        ca.to_str().unwrap(),
        "-i",
        id,
        "-t",
        &format!("devices/{id}/telemetry"),
        "-q",
        "1",
        "-m",
        r#"{"temp":7}"#,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(token) = token {
        args.extend([
            "-u".to_owned(),
            id.to_owned(),
            "-P".to_owned(),
            token.to_owned(),
        ]);
    }
    if let Some((cert, key)) = identity {
        args.extend([
            "--cert".to_owned(),
            cert.to_str().unwrap().to_owned(),
            "--key".to_owned(),
            key.to_str().unwrap().to_owned(),
        ]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_rumqttc_and_mosquitto_and_reload_on_sighup_and_file_change() {
    bounded(90, async {
        let certs = tempfile::tempdir().unwrap();
        let (first, second, third) = (
            certs.path().join("first"),
            certs.path().join("second"),
            certs.path().join("third"),
        );
        dev_certs(&first, &[]);
        dev_certs(&second, &[]);
        dev_certs(&third, &[]);
        let live = certs.path().join("live");
        std::fs::create_dir(&live).unwrap();
        install_server_cert(&first, &live);
        let (cert, key) = (live.join("server.pem"), live.join("server-key.pem"));
        let mut p = Process::start(&[
            ("FLUXGATE_MQTT__TLS__ENABLED", "true"),
            ("FLUXGATE_MQTT__TLS__LISTEN", "127.0.0.1:0"),
            ("FLUXGATE_MQTT__TLS__CERT", cert.to_str().unwrap()),
            ("FLUXGATE_MQTT__TLS__KEY", key.to_str().unwrap()),
            ("FLUXGATE_MQTT__TLS__RELOAD_POLL", "1s"),
        ]);
        let addr = mqtts_addr(&p);
        let token = p.admin.provision("m1").await;
        // mosquitto_pub logs in as another device: the same client id would take over
        // the open rumqttc connection.
        let token2 = p.admin.provision("m2").await;

        // rumqttc over rustls, trusting only the dev CA.
        let mut open = Mqtts::connect(
            addr,
            "m1",
            Some(&token),
            client_config(&first.join("ca.pem"), None),
        )
        .await
        .unwrap();
        open.publish("m1", 1.0).await;
        // mosquitto_pub --cafile.
        let (code, err) = mosquitto_pub(mosquitto_args(
            addr,
            &first.join("ca.pem"),
            "m2",
            Some(&token2),
            None,
        ))
        .await;
        assert_eq!(code, Some(0), "{err}");
        // A client that trusts another CA, and a plaintext client, are refused; counted.
        let stranger = Mqtts::connect(
            addr,
            "m2",
            Some(&token2),
            client_config(&second.join("ca.pem"), None),
        )
        .await;
        assert!(stranger.is_err());
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), plain.read(&mut buf))
            .await
            .unwrap();
        assert!(
            !matches!(n, Ok(n) if n > 0 && buf[0] == 0x20),
            "no CONNACK over plaintext"
        );
        let failures = |reason: &str| {
            format!(
                r#"fluxgate_tls_handshake_failures_total{{listener="mqtts",reason="{reason}"}}"#
            )
        };
        // The handshake failures are counted when the gateway's tasks see them.
        let deadline = Instant::now() + Duration::from_secs(10);
        let metrics = loop {
            let metrics = metrics_text(&p).await;
            if common::scrape(&metrics, &failures("protocol")) >= 1.0
                && common::scrape(&metrics, &failures("peer_alert")) >= 1.0
            {
                break metrics;
            }
            assert!(
                Instant::now() < deadline,
                "handshake failures not counted:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(common::scrape(&metrics, &failures("protocol")) >= 1.0);
        assert!(
            common::scrape(&metrics, &failures("peer_alert")) >= 1.0,
            "the stranger's alert"
        );
        assert!(
            common::scrape(
                &metrics,
                r#"fluxgate_mqtt_connections_closed_total{reason="tls_handshake"}"#
            ) >= 2.0
        );
        assert_eq!(
            common::scrape(
                &metrics,
                r#"fluxgate_ingest_messages_total{transport="mqtt"}"#
            ),
            2.0
        );

        // SIGHUP: new connections get the new certificate, the open one keeps working.
        install_server_cert(&second, &live);
        sighup(&p);
        wait_log(&p, "TLS certificate reloaded", 1).await;
        assert!(
            Mqtts::connect(
                addr,
                "m2",
                Some(&token2),
                client_config(&first.join("ca.pem"), None)
            )
            .await
            .is_err()
        );
        let (code, err) = mosquitto_pub(mosquitto_args(
            addr,
            &second.join("ca.pem"),
            "m2",
            Some(&token2),
            None,
        ))
        .await;
        assert_eq!(code, Some(0), "{err}");
        open.publish("m1", 2.0).await;

        // A changed file is noticed by the poll (reload_poll = 1s) without a signal.
        // The key is written first, then the certificate: a reload may see a mismatched
        // pair in between, which keeps the old certificate, and the next change fixes it.
        std::fs::copy(third.join("server-key.pem"), &key).unwrap();
        std::fs::copy(third.join("server.pem"), &cert).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let third_ca = client_config(&third.join("ca.pem"), None);
            if Mqtts::connect(addr, "m2", Some(&token2), third_ca)
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the changed certificate was never loaded"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        open.publish("m1", 3.0).await;
        let metrics = metrics_text(&p).await;
        assert!(common::scrape(&metrics, "fluxgate_tls_reloads_total") >= 2.0);

        p.sigterm();
        assert!(p.wait_exit(Duration::from_secs(30)).await.success());
    })
    .await;
}

// ---- client certificates -------------------------------------------------------------

/// A CA made with rcgen, writing PEM files into a directory.
struct Pki {
    dir: std::path::PathBuf,
    ca: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
        std::fs::create_dir_all(dir).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir: dir.to_owned(),
            ca,
            key,
        }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf certificate `name` (files `{name}.pem`, `{name}-key.pem`).
    fn leaf(
        &self,
        name: &str,
        cn: &str,
        sans: &[&str],
        server: bool,
        expired: bool,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose};
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

fn handshake_failures(listener: &str, reason: &str) -> String {
    format!(r#"fluxgate_tls_handshake_failures_total{{listener="{listener}",reason="{reason}"}}"#)
}

/// A WebSocket ingest connection over TLS with `tls`; `Err` with the reason it failed
/// (handshake, HTTP status).
async fn wss_ingest(
    addr: SocketAddr,
    query: &str,
    token: Option<&str>,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    String,
> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "wss://localhost:{}/api/v1/ingest/ws{query}",
            addr.port()
        ))
        .unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::client_async(request, stream)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// Send one telemetry message and wait for its ack frame.
async fn ws_send_acked<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"temp":3}"#,
    ))
    .await
    .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = frame.into_text().unwrap();
    assert!(text.contains(r#""type":"ack""#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_devices_over_mqtts_wss_and_https() {
    bounded(90, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("fleet"), "fleet CA");
        let other = Pki::new(&dir.path().join("other"), "someone else's CA");
        let (server, server_key) = pki.leaf(
            "server",
            "localhost",
            &["localhost", "127.0.0.1"],
            true,
            false,
        );
        let c1 = pki.leaf("c1", "c1", &[], false, false);
        let c_off = pki.leaf("c-off", "c-off", &[], false, false);
        let expired = pki.leaf("expired", "c1", &[], false, true);
        let stranger = other.leaf("stranger", "c1", &[], false, false);
        let ca = pki.ca();
        let (ca2, server2, server_key2) = (ca.clone(), server.clone(), server_key.clone());
        let gw = TestGateway::spawn_with(move |c| {
            c.mqtt.tls.enabled = true;
            c.mqtt.tls.listen = "127.0.0.1:0".parse().unwrap();
            c.mqtt.tls.cert = server2.clone();
            c.mqtt.tls.key = server_key2.clone();
            c.mqtt.tls.client_ca = ca2.clone();
            c.http.tls.enabled = true;
            c.http.tls.listen = "127.0.0.1:0".parse().unwrap();
            c.http.tls.cert = server2;
            c.http.tls.key = server_key2;
            c.http.tls.client_ca = ca2;
        })
        .await;
        let (mqtts, https) = (gw.mqtts.unwrap(), gw.https.unwrap());
        let tokens = gw.provision_many(&["c1", "c2", "c-off"]).await;
        let off = gw
            .admin
            .call(
                reqwest::Method::PATCH,
                "/api/v1/devices/c-off",
                Some(serde_json::json!({"enabled": false})),
            )
            .await;
        assert_eq!(off.status, 200, "{}", off.body);
        let with = |leaf: &(std::path::PathBuf, std::path::PathBuf)| {
            client_config(&ca, Some((&leaf.0, &leaf.1)))
        };

        // MQTT: the right CN connects without a password and publishes.
        let mut m = Mqtts::connect(mqtts, "c1", None, with(&c1)).await.unwrap();
        m.publish("c1", 1.0).await;
        // mosquitto_pub with --cert/--key, no password.
        let (code, err) =
            mosquitto_pub(mosquitto_args(mqtts, &ca, "c1", None, Some((&c1.0, &c1.1)))).await;
        assert_eq!(code, Some(0), "{err}");
        // c1's certificate does not make anyone c2; a disabled device's certificate is
        // refused; an expired one and one of another CA fail the handshake.
        let wrong = Mqtts::connect(mqtts, "c2", None, with(&c1)).await;
        assert!(wrong.err().unwrap().contains("NotAuthorized"));
        assert!(
            Mqtts::connect(mqtts, "c-off", None, with(&c_off))
                .await
                .is_err()
        );
        assert!(
            Mqtts::connect(mqtts, "c1", None, with(&expired))
                .await
                .is_err()
        );
        assert!(
            Mqtts::connect(mqtts, "c1", None, with(&stranger))
                .await
                .is_err()
        );
        // Without a certificate the token still works (client_auth = "optional"), and
        // without either the device is refused.
        let mut t = Mqtts::connect(mqtts, "c2", Some(&tokens["c2"]), client_config(&ca, None))
            .await
            .unwrap();
        t.publish("c2", 2.0).await;
        assert!(
            Mqtts::connect(mqtts, "c2", None, client_config(&ca, None))
                .await
                .is_err()
        );

        // WSS ingest: the certificate names the device; no token needed.
        let mut ws = wss_ingest(https, "?device=c1", None, with(&c1))
            .await
            .unwrap();
        ws_send_acked(&mut ws).await;
        // Without ?device=, the certificate's one name is the device.
        let mut ws_cert = wss_ingest(https, "", None, with(&c1)).await.unwrap();
        ws_send_acked(&mut ws_cert).await;
        let wrong = wss_ingest(https, "?device=c2", None, with(&c1)).await;
        assert!(wrong.err().unwrap().contains("401"));
        assert!(wss_ingest(https, "", None, with(&expired)).await.is_err());
        assert!(wss_ingest(https, "", None, with(&stranger)).await.is_err());
        let mut ws = wss_ingest(https, "", Some(&tokens["c2"]), client_config(&ca, None))
            .await
            .unwrap();
        ws_send_acked(&mut ws).await;

        // HTTPS ingest: the path's device must be the certificate's.
        let https_client = |leaf: &(std::path::PathBuf, std::path::PathBuf)| {
            let mut pem = std::fs::read(&leaf.0).unwrap();
            pem.extend(std::fs::read(&leaf.1).unwrap());
            reqwest::Client::builder()
                .add_root_certificate(
                    reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap(),
                )
                .tls_built_in_root_certs(false)
                .identity(reqwest::Identity::from_pem(&pem).unwrap())
                .build()
                .unwrap()
        };
        let post = |client: reqwest::Client, device: &str| {
            let url = format!(
                "https://localhost:{}/api/v1/devices/{device}/telemetry",
                https.port()
            );
            async move {
                client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(r#"{"temp":4}"#)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        };
        assert_eq!(post(https_client(&c1), "c1").await.unwrap(), 200);
        assert_eq!(post(https_client(&c1), "c2").await.unwrap(), 401);

        // Everything refused is counted by reason.
        assert_eq!(
            gw.metric(&refused("mqtt", "certificate_mismatch")).await,
            1.0
        );
        assert_eq!(gw.metric(&refused("mqtt", "disabled")).await, 1.0);
        assert_eq!(
            gw.metric(&refused("mqtt", "missing_credentials")).await,
            1.0
        );
        assert_eq!(gw.metric(&refused("ws", "certificate_mismatch")).await, 1.0);
        assert_eq!(
            gw.metric(&refused("http", "certificate_mismatch")).await,
            1.0
        );
        for listener in ["mqtts", "https"] {
            for reason in ["cert_expired", "cert_unknown_ca"] {
                let series = handshake_failures(listener, reason);
                common::wait_for(&series, Duration::from_secs(10), || {
                    gw.local_metric(&series) == 1.0
                })
                .await;
            }
        }
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="mqtt"}"#)
                .await,
            3.0
        );
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="ws"}"#)
                .await,
            3.0
        );
        assert_eq!(
            gw.metric(r#"fluxgate_ingest_messages_total{transport="http"}"#)
                .await,
            1.0
        );
        // Disabling the device closes its certificate-authenticated connections (the
        // registry re-checks their credential), and only those.
        let off = gw
            .admin
            .call(
                reqwest::Method::PATCH,
                "/api/v1/devices/c1",
                Some(serde_json::json!({"enabled": false})),
            )
            .await;
        assert_eq!(off.status, 200, "{}", off.body);
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if m.eventloop.poll().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the mqtts connection of c1 stayed open");
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ws_cert.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(m)) if m.is_close() => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the wss connection of c1 stayed open");
        t.publish("c2", 5.0).await;
        drop((t, ws));
        gw.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_and_san_identities() {
    bounded(60, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "fleet CA");
        let (server, server_key) = pki.leaf(
            "server",
            "localhost",
            &["localhost", "127.0.0.1"],
            true,
            false,
        );
        let by_san = pki.leaf("by-san", "not-a-device", &["s1"], false, false);
        let ca = pki.ca();
        let ca2 = ca.clone();
        let gw = TestGateway::spawn_with(move |c| {
            c.mqtt.tls.enabled = true;
            c.mqtt.tls.listen = "127.0.0.1:0".parse().unwrap();
            c.mqtt.tls.cert = server;
            c.mqtt.tls.key = server_key;
            c.mqtt.tls.client_ca = ca2;
            c.mqtt.tls.client_auth = fluxgate::config::ClientAuth::Required;
            c.mqtt.tls.identity = fluxgate::config::CertIdentity::SanDns;
        })
        .await;
        let mqtts = gw.mqtts.unwrap();
        let tokens = gw.provision_many(&["s1", "not-a-device"]).await;
        let with = client_config(&ca, Some((&by_san.0, &by_san.1)));
        let mut m = Mqtts::connect(mqtts, "s1", None, with.clone())
            .await
            .unwrap();
        m.publish("s1", 1.0).await;
        // The CN is not the identity with san_dns.
        assert!(
            Mqtts::connect(mqtts, "not-a-device", None, with)
                .await
                .is_err()
        );
        // Required: a token alone does not pass the handshake.
        let token_only =
            Mqtts::connect(mqtts, "s1", Some(&tokens["s1"]), client_config(&ca, None)).await;
        assert!(token_only.is_err());
        let series = handshake_failures("mqtts", "cert_missing");
        common::wait_for(&series, Duration::from_secs(10), || {
            gw.local_metric(&series) == 1.0
        })
        .await;
        assert_eq!(
            gw.metric(&refused("mqtt", "certificate_mismatch")).await,
            1.0
        );
        drop(m);
        gw.shutdown().await;
    })
    .await;
}

/// A CONNECT written in the same TCP write as the client's last handshake flight (with
/// a client certificate): the gateway may decrypt it while finishing the handshake, so
/// the connection must read what TLS already holds before it waits for the socket.
/// Whether the gateway's handshake read takes the CONNECT too depends on timing, so this
/// test does not always take that path (firmware-sim with client certificates hung on it
/// before the fix, every time); it checks the whole exchange at the byte level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_in_the_last_handshake_flight_is_answered() {
    bounded(60, async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "fleet CA");
        let (server, server_key) = pki.leaf(
            "server",
            "localhost",
            &["localhost", "127.0.0.1"],
            true,
            false,
        );
        let f1 = pki.leaf("f1", "f1", &[], false, false);
        let ca = pki.ca();
        let gw = TestGateway::spawn_with(move |c| {
            c.mqtt.tls.enabled = true;
            c.mqtt.tls.listen = "127.0.0.1:0".parse().unwrap();
            c.mqtt.tls.cert = server;
            c.mqtt.tls.key = server_key;
            // With client certificates the server's handshake ends only with the
            // client's last flight, so the CONNECT arrives inside the handshake.
            c.mqtt.tls.client_ca = ca;
        })
        .await;
        let addr = gw.mqtts.unwrap();
        let token = gw.provision("f1").await;
        let config = client_config(&pki.ca(), Some((&f1.0, &f1.1)));
        let connack = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let mut conn = tokio_rustls::rustls::ClientConnection::new(
                config,
                ServerName::try_from("localhost").unwrap(),
            )
            .unwrap();
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            // Returns once the server's flight is processed, with the client's Finished
            // still queued.
            conn.complete_io(&mut sock).unwrap();
            assert!(!conn.is_handshaking());
            let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 30];
            for s in ["f1", "f1", token.as_str()] {
                body.extend_from_slice(&(s.len() as u16).to_be_bytes());
                body.extend_from_slice(s.as_bytes());
            }
            conn.writer()
                .write_all(&common::packet(0x10, &body))
                .unwrap();
            let mut flight = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut flight).unwrap();
            }
            sock.write_all(&flight).unwrap();
            let mut answer = [0u8; 4];
            let mut got = 0;
            while got < 4 {
                if conn.read_tls(&mut sock).unwrap() == 0 {
                    break;
                }
                conn.process_new_packets().unwrap();
                match conn.reader().read(&mut answer[got..]) {
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            answer
        })
        .await
        .unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
        gw.shutdown().await;
    })
    .await;
}
