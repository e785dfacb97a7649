//! Framing and packets: MQTT 3.1.1 on rumqttc's maintained packet codec
//! (`rumqttc::mqttbytes::v4`, which reads and writes every packet type, both
//! directions), plus the mapping of its errors to the front's violation reasons.
//!
//! Nothing of rumqttc leaves `ingest/mqtt/`; the connection handler sees its packet
//! types only through this file's re-exports.

use bytes::BytesMut;
use rumqttc::mqttbytes::{self, QoS};

pub(super) use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
pub(super) use rumqttc::mqttbytes::{Protocol, QoS as Qos};

use crate::observe::MqttViolation;

/// The packet type of PUBLISH in the first header byte's high nibble.
const PUBLISH: u8 = 3;
/// The packet type of CONNECT.
const CONNECT: u8 = 1;

/// Why the bytes at the front of a connection's buffer are not a packet it may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadError {
    /// A protocol violation: close the connection and count it.
    Violation(MqttViolation),
    /// A CONNECT of another protocol version or name (MQTT 3.1, MQTT 5): answered with
    /// CONNACK 1 ("unacceptable protocol version") when it is the first packet.
    ProtocolVersion,
}

/// Take the next whole packet off `buf`. `Ok(None)` means more bytes are needed; `max`
/// caps the remaining length, checked from the fixed header before the body arrives,
/// so a connection never buffers more than one packet of at most `max` bytes.
pub(super) fn read(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, ReadError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = first >> 4;
    match Packet::read(buf, max) {
        Ok(Packet::Connect(connect)) if connect.protocol != Protocol::V4 => {
            Err(ReadError::ProtocolVersion)
        }
        Ok(packet) => Ok(Some(packet)),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(classify(kind, &e)),
    }
}

/// The violation (or version refusal) a codec error stands for.
fn classify(kind: u8, error: &mqttbytes::Error) -> ReadError {
    use mqttbytes::Error as E;
    let violation = match error {
        E::PayloadSizeLimitExceeded(_) => MqttViolation::TooLarge,
        // The codec reads every string as UTF-8; in a PUBLISH that is the topic.
        E::TopicNotUtf8 if kind == PUBLISH => MqttViolation::InvalidTopic,
        E::InvalidProtocol | E::InvalidProtocolLevel(_) if kind == CONNECT => {
            return ReadError::ProtocolVersion;
        }
        _ => MqttViolation::Malformed,
    };
    ReadError::Violation(violation)
}

/// Whether a QoS is one the front accepts from devices (0 and 1).
pub(super) fn supported(qos: QoS) -> bool {
    qos != QoS::ExactlyOnce
}

/// Append a packet the gateway sends. Its own packets are small and well-formed, so the
/// only error (a packet over the size cap) cannot happen; the cap passed is the MQTT
/// maximum.
pub(super) fn write(packet: &Packet, out: &mut BytesMut) {
    let _ = packet.write(out, 268_435_455);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(first: u8, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        out.extend_from_slice(&[first]);
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.extend_from_slice(&[byte]);
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    fn publish_body(topic: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic);
        body.extend_from_slice(&7u16.to_be_bytes());
        body.extend_from_slice(b"{}");
        body
    }

    #[test]
    fn partial_packets_wait_for_more_bytes() {
        let whole = frame(0x32, &publish_body(b"devices/d1/telemetry"));
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(read(&mut buf, 1024), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
        let mut buf = whole.clone();
        let Ok(Some(Packet::Publish(p))) = read(&mut buf, 1024) else {
            panic!("not a publish");
        };
        assert_eq!(
            (p.topic.as_str(), p.pkid, &p.payload[..]),
            ("devices/d1/telemetry", 7, &b"{}"[..])
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn errors_map_to_violations() {
        // A remaining length beyond the cap is refused from the header alone.
        let mut buf = BytesMut::from(&[0x32, 0xff, 0xff, 0xff, 0x7f][..]);
        assert_eq!(
            read(&mut buf, 1024),
            Err(ReadError::Violation(MqttViolation::TooLarge))
        );
        let mut buf = frame(0x32, &publish_body(b"devices/d1/\xff"));
        assert_eq!(
            read(&mut buf, 1024),
            Err(ReadError::Violation(MqttViolation::InvalidTopic))
        );
        // QoS 3.
        let mut buf = frame(0x36, &publish_body(b"devices/d1/telemetry"));
        assert_eq!(
            read(&mut buf, 1024),
            Err(ReadError::Violation(MqttViolation::Malformed))
        );
        // Packet type 0 and 15 do not exist.
        for first in [0x00, 0xf0] {
            let mut buf = BytesMut::from(&[first, 0][..]);
            assert_eq!(
                read(&mut buf, 1024),
                Err(ReadError::Violation(MqttViolation::Malformed))
            );
        }
        // A five-byte remaining length.
        let mut buf = BytesMut::from(&[0x32, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert_eq!(
            read(&mut buf, 1 << 30),
            Err(ReadError::Violation(MqttViolation::Malformed))
        );
    }

    #[test]
    fn other_protocol_versions_are_told_so() {
        for (name, level) in [(&b"MQTT"[..], 5u8), (b"MQIsdp", 3), (b"MQTT", 9)] {
            let mut body = (name.len() as u16).to_be_bytes().to_vec();
            body.extend_from_slice(name);
            body.extend_from_slice(&[level, 0x02, 0, 30, 0, 1, b'x']);
            if level == 5 {
                // MQTT 5 has a properties length after the keep-alive.
                body.insert(name.len() + 6, 0);
            }
            let mut buf = frame(0x10, &body);
            assert_eq!(
                read(&mut buf, 1024),
                Err(ReadError::ProtocolVersion),
                "{level}"
            );
        }
    }
}
