//! A device that takes downlink commands over MQTT (rumqttc), for the command tests on
//! one node and across nodes.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

use super::TestGateway;

/// An rumqttc device subscribed to `devices/{id}/commands`; received commands arrive
/// on `commands` (its event loop PUBACKs them).
pub struct MqttDevice {
    pub id: String,
    pub client: AsyncClient,
    pub commands: mpsc::UnboundedReceiver<Value>,
    pub task: tokio::task::JoinHandle<()>,
}

pub async fn mqtt_device(gw: &TestGateway, id: &str, token: &str) -> MqttDevice {
    let mut options = MqttOptions::new(id, gw.mqtt.ip().to_string(), gw.mqtt.port());
    options
        .set_credentials(id, token)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (tx, commands) = mpsc::unbounded_channel();
    let (subacked_tx, subacked) = tokio::sync::oneshot::channel();
    let mut subacked_tx = Some(subacked_tx);
    client
        .subscribe(format!("devices/{id}/commands"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let topic = format!("devices/{id}/commands");
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subacked_tx.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    assert_eq!(p.topic, topic, "a command on another topic");
                    let _ = tx.send(serde_json::from_slice(&p.payload).unwrap());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subacked)
        .await
        .expect("no SUBACK")
        .unwrap();
    MqttDevice {
        id: id.to_owned(),
        client,
        commands,
        task,
    }
}

impl MqttDevice {
    pub async fn next(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(20), self.commands.recv())
            .await
            .expect("no command within 20 s")
            .expect("device event loop ended")
    }

    pub async fn reply(&self, cmd: &str, body: Value) {
        self.client
            .publish(
                format!("devices/{}/commands/{cmd}/reply", self.id),
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .unwrap();
    }
}
