//! A minimal MQTT 3.1.1 device client for fleets: one TCP socket, the packet codec of
//! `rumqttc::mqttbytes::v4`, and nothing else. A rumqttc `EventLoop` per device carries
//! request queues, an in-flight table and a state machine; tens of thousands of
//! simulated devices need only CONNECT, QoS 0 PUBLISH and PINGREQ, so a device costs a
//! socket and a few hundred bytes of buffers.
//!
//! Each connection binds its own source address first (any 127.0.0.x reaches a loopback
//! gateway), so that many connections do not exhaust the ephemeral ports of one address.
//! Connect failures are classified ([`ConnectError`]) so a storm report can say what the
//! devices saw.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, PingReq, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest packet accepted from the gateway (it sends CONNACK, PINGRESP and commands).
const MAX_INCOMING: usize = 64 * 1024;

/// Why a connection attempt failed, as a device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectError {
    /// TCP connection refused (nothing listening, or the backlog overflowed).
    Refused,
    /// No answer (TCP or CONNACK) within the timeout.
    Timeout,
    /// The connection was reset.
    Reset,
    /// The gateway closed the connection before its CONNACK.
    Closed,
    /// No local address/port left to connect from.
    AddrNotAvailable,
    /// CONNACK with a refusal code (1..=5).
    Refusal(u8),
    /// The gateway sent something that is not a CONNACK first.
    Protocol,
    /// Any other I/O error.
    Other,
}

impl ConnectError {
    /// A short stable name for reports.
    pub fn name(self) -> String {
        match self {
            ConnectError::Refused => "refused".into(),
            ConnectError::Timeout => "timeout".into(),
            ConnectError::Reset => "reset".into(),
            ConnectError::Closed => "closed".into(),
            ConnectError::AddrNotAvailable => "addr_not_available".into(),
            ConnectError::Refusal(code) => format!("connack_{code}"),
            ConnectError::Protocol => "protocol".into(),
            ConnectError::Other => "other".into(),
        }
    }

    fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::ConnectionRefused => ConnectError::Refused,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                ConnectError::Reset
            }
            ErrorKind::UnexpectedEof => ConnectError::Closed,
            ErrorKind::AddrNotAvailable | ErrorKind::AddrInUse => ConnectError::AddrNotAvailable,
            ErrorKind::TimedOut => ConnectError::Timeout,
            _ => ConnectError::Other,
        }
    }
}

/// What a device presents in its CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    /// Client id (the device id).
    pub client_id: &'a str,
    /// Username (the device id).
    pub username: &'a str,
    /// Password (the device token).
    pub password: &'a str,
    /// Keepalive in seconds.
    pub keep_alive: u16,
}

/// One open, accepted MQTT connection.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Connect to `server` from `source` (port chosen by the kernel), send CONNECT and wait
/// for an accepting CONNACK, all within `timeout`.
pub async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    login: Login<'_>,
    timeout: Duration,
) -> Result<RawConn, ConnectError> {
    match tokio::time::timeout(timeout, connect_inner(server, source, login)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout),
    }
}

async fn connect_inner(
    server: SocketAddr,
    source: Option<IpAddr>,
    login: Login<'_>,
) -> Result<RawConn, ConnectError> {
    let io = |e: std::io::Error| ConnectError::from_io(&e);
    let socket = match server {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(io)?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(io)?;
    }
    let stream = socket.connect(server).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let mut conn = RawConn {
        stream,
        rbuf: BytesMut::with_capacity(64),
        wbuf: BytesMut::with_capacity(256),
    };
    let mut connect = Connect::new(login.client_id);
    connect.keep_alive = login.keep_alive;
    connect.clean_session = true;
    connect.set_login(login.username, login.password);
    connect
        .write(&mut conn.wbuf)
        .map_err(|_| ConnectError::Protocol)?;
    conn.flush().await.map_err(io)?;
    match conn.next_packet().await.map_err(io)? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(conn),
        Packet::ConnAck(ack) => Err(ConnectError::Refusal(ack.code as u8)),
        _ => Err(ConnectError::Protocol),
    }
}

impl RawConn {
    async fn flush(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        // Give back a buffer that one large message grew.
        if self.wbuf.capacity() > 4 * 1024 {
            self.wbuf = BytesMut::with_capacity(256);
        }
        Ok(())
    }

    /// Publish `payload` on `topic` with QoS 0.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> std::io::Result<()> {
        Publish::new(topic, QoS::AtMostOnce, payload.to_vec())
            .write(&mut self.wbuf)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        self.flush().await
    }

    /// Send a PINGREQ.
    pub async fn ping(&mut self) -> std::io::Result<()> {
        PingReq
            .write(&mut self.wbuf)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        self.flush().await
    }

    /// Wait for the next packet from the gateway (PINGRESP, a command, ...). An error
    /// means the connection is gone or the gateway broke the protocol.
    pub async fn next_packet(&mut self) -> std::io::Result<Packet> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_INCOMING) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{e:?}"),
                    ));
                }
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A scripted server: accepts one connection, checks the CONNECT, answers `reply`.
    async fn server(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, peer) = listener.accept().await.unwrap();
            assert_eq!(peer.ip(), "127.0.0.7".parse::<IpAddr>().unwrap());
            let mut buf = BytesMut::new();
            let packet = loop {
                match Packet::read(&mut buf, 1 << 16) {
                    Ok(p) => break p,
                    Err(_) => assert!(s.read_buf(&mut buf).await.unwrap() > 0),
                }
            };
            let Packet::Connect(c) = packet else {
                panic!("{packet:?}")
            };
            assert_eq!(c.client_id, "dev-1");
            assert_eq!(c.login.unwrap().password, "secret");
            s.write_all(reply).await.unwrap();
            // Then expect a publish and a ping, and answer the ping.
            let mut seen = Vec::new();
            while seen.len() < 2 {
                match Packet::read(&mut buf, 1 << 16) {
                    Ok(p) => seen.push(p),
                    Err(_) => {
                        if s.read_buf(&mut buf).await.unwrap() == 0 {
                            return;
                        }
                    }
                }
            }
            assert!(
                matches!(&seen[0], Packet::Publish(p) if p.topic == "t" && &p.payload[..] == b"x")
            );
            assert_eq!(seen[1], Packet::PingReq);
            s.write_all(&[0xD0, 0x00]).await.unwrap();
        });
        addr
    }

    fn login() -> Login<'static> {
        Login {
            client_id: "dev-1",
            username: "dev-1",
            password: "secret",
            keep_alive: 30,
        }
    }

    #[tokio::test]
    async fn connects_from_the_source_address_publishes_and_pings() {
        let addr = server(&[0x20, 0x02, 0x00, 0x00]).await;
        let source = Some("127.0.0.7".parse().unwrap());
        let mut c = connect(addr, source, login(), Duration::from_secs(5))
            .await
            .unwrap();
        c.publish("t", b"x").await.unwrap();
        c.ping().await.unwrap();
        assert_eq!(c.next_packet().await.unwrap(), Packet::PingResp);
    }

    #[tokio::test]
    async fn classifies_refusals() {
        // CONNACK "server unavailable".
        let addr = server(&[0x20, 0x02, 0x00, 0x03]).await;
        let source = Some("127.0.0.7".parse().unwrap());
        let err = connect(addr, source, login(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err, ConnectError::Refusal(3));
        assert_eq!(err.name(), "connack_3");
        // Nothing listening.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = connect(closed, None, login(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err, ConnectError::Refused);
    }
}
