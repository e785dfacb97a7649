//! The readiness probe: one MQTT login with a secret that exists only in this process,
//! which proves that the listener is bound and the router answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::PROBE_CLIENT_ID;

/// Connect as the probe client and wait for CONNACK: proves the listener is bound and
/// the router answers, without a failed-handshake error in rumqttd's log.
pub(super) fn probe_ready(addr: SocketAddr, secret: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = match addr.ip() {
        ip if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        _ => addr,
    };
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut payload = Vec::new();
            for field in [PROBE_CLIENT_ID, PROBE_CLIENT_ID, secret] {
                payload.extend_from_slice(&(field.len() as u16).to_be_bytes());
                payload.extend_from_slice(field.as_bytes());
            }
            // CONNECT, MQTT 3.1.1, username + password + clean session, keepalive 10 s.
            let mut packet = vec![0x10, (10 + payload.len()) as u8];
            packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 10]);
            packet.extend_from_slice(&payload);
            let mut connack = [0u8; 4];
            if s.write_all(&packet).is_ok() && s.read_exact(&mut connack).is_ok() {
                return connack[0] == 0x20 && connack[3] == 0;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
