//! Kicks: closing the MQTT connections of devices that were disabled, deleted or
//! re-keyed.
//!
//! rumqttd offers no call to close a connection. What it does offer is MQTT's rule for
//! duplicate client ids: registering a local link under a device's client id makes the
//! router drop the older connection with that id. That link then holds a broker
//! connection slot of its own; dropping it does not tell the router (a local link has
//! no socket whose end it could notice), so [`release_link`] disconnects it explicitly.
//! Without that, every kick of a device that never reconnects would keep a slot, and
//! enough of them would fill `mqtt.max_connections`.
//!
//! Who to kick comes from the session table (`sessions`): a revocation names one
//! device, a lagged revocation channel or a connection that saw its own credentials
//! revoked while it was being registered asks for a re-check of every open connection.

use std::sync::Arc;

use rumqttd::local::LinkTx;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::sessions::Sessions;
use crate::model::Transport;
use crate::observe::{Event, Metrics};
use crate::registry::Registry;

/// Disconnect a local link the router has registered, which frees its connection slot.
///
/// A local link has no public "disconnect" call, but the router processes the packets
/// in its buffer when told there is data: a DISCONNECT there makes it remove the link
/// (and stop at it). The notification is sent by queueing an UNSUBSCRIBE behind it,
/// the only public way to ring that bell; it is never processed, because the router
/// stops at the DISCONNECT and discards the rest of the batch.
pub(super) fn release_link(mut tx: LinkTx) -> Result<(), String> {
    tx.buffer().push_back(Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    ));
    tx.unsubscribe("fluxgate/kick-release")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Close the MQTT connections of revoked devices until `shutdown`. `kick` takes over a
/// client id and releases the link again (it blocks on the router's answer, so it runs
/// on the blocking pool).
pub(super) async fn kick_revoked<K>(
    registry: Arc<Registry>,
    sessions: Arc<Sessions>,
    mut revocations: broadcast::Receiver<Arc<str>>,
    kick: K,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    K: Fn(&str) -> Result<(), String> + Clone + Send + Sync + 'static,
{
    loop {
        let ids = tokio::select! {
            () = shutdown.cancelled() => return,
            () = sessions.recheck_requested() => sessions.revoked(&registry, None),
            r = revocations.recv() => match r {
                Ok(id) => sessions.revoked(&registry, Some(&id)),
                // Missed revocations: re-check the credentials of every open connection,
                // which also finds re-keyed devices that are still enabled.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "revocation channel lagged; re-checking every MQTT connection");
                    sessions.revoked(&registry, None)
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        for id in ids {
            kick_one(&kick, id, &metrics, &shutdown).await;
        }
    }
}

/// Close the MQTT connections of devices the pipeline asked to disconnect (over
/// `limits.device_rate` with `device_rate_action = "disconnect"`). Their credentials stay
/// valid: they may connect again, and are refused again while over the rate.
pub(super) async fn kick_requested<K>(
    registry: Arc<Registry>,
    kick: K,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    K: Fn(&str) -> Result<(), String> + Clone + Send + Sync + 'static,
{
    let mut kicks = registry.kicks();
    loop {
        let id = tokio::select! {
            () = shutdown.cancelled() => return,
            r = kicks.recv() => match r {
                Ok((id, Transport::Mqtt)) => id,
                // Another transport's kick, or missed kicks: a device still over its
                // rate keeps having its messages refused and is kicked on the next one.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        kick_one(&kick, id, &metrics, &shutdown).await;
    }
}

/// Kick one client id on the blocking pool (building a link waits for the router's
/// answer) and count it.
async fn kick_one<K>(kick: &K, id: Arc<str>, metrics: &Metrics, shutdown: &CancellationToken)
where
    K: Fn(&str) -> Result<(), String> + Clone + Send + Sync + 'static,
{
    let (kick, client) = (kick.clone(), id.clone());
    let kicked = tokio::task::spawn_blocking(move || kick(&client))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match kicked {
        Ok(()) => metrics.emit(Event::DeviceKicked {
            device: &id,
            transport: Transport::Mqtt,
        }),
        // The router is gone when the gateway stops: nothing left to close.
        Err(_) if shutdown.is_cancelled() => {}
        Err(e) => tracing::error!(device = &*id, error = %e, "could not close MQTT connection"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use bytes::BytesMut;
    use rumqttd::protocol::{ConnAck, ConnectReturnCode, Protocol as _};

    use super::super::protocol::{AclProtocol, Shared};
    use super::*;
    use crate::registry::DeviceFields;

    fn registry(dir: &std::path::Path, ids: &[&str]) -> (Arc<Registry>, Vec<String>) {
        let reg =
            Registry::open(dir, Duration::from_secs(60), Arc::new(Metrics::default())).unwrap();
        let fields = DeviceFields {
            name: "device".to_owned(),
            labels: BTreeMap::new(),
            enabled: true,
        };
        let out = reg
            .create_devices(
                ids.iter()
                    .map(|id| ((*id).to_owned(), fields.clone()))
                    .collect(),
            )
            .unwrap();
        let tokens = out.into_iter().map(|r| r.unwrap().1).collect();
        (reg, tokens)
    }

    /// A connection's codec that read the CONNECT of `id`/`token` (the auth handler
    /// would now accept it).
    fn connecting(shared: &Arc<Shared>, id: &str, token: &str) -> AclProtocol {
        let mut conn = AclProtocol::new(shared.clone()).clone();
        let mut payload = Vec::new();
        for field in [id, id, token] {
            payload.extend_from_slice(&u16::try_from(field.len()).unwrap().to_be_bytes());
            payload.extend_from_slice(field.as_bytes());
        }
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 30];
        body.extend_from_slice(&payload);
        let mut bytes = BytesMut::from(&[0x10, u8::try_from(body.len()).unwrap()][..]);
        bytes.extend_from_slice(&body);
        conn.read_mut(&mut bytes, 1 << 20).unwrap();
        conn
    }

    /// The broker accepted the connection: its CONNACK goes through the codec.
    fn accept(conn: &AclProtocol) {
        let ack = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
            },
            None,
        );
        conn.write(ack, &mut BytesMut::new()).unwrap();
    }

    struct Kicker {
        kicks: std::sync::mpsc::Receiver<String>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start_kicker(
        registry: &Arc<Registry>,
        sessions: &Arc<Sessions>,
        revocations: broadcast::Receiver<Arc<str>>,
    ) -> Kicker {
        let (tx, kicks) = std::sync::mpsc::channel();
        let tx = Arc::new(std::sync::Mutex::new(tx));
        let kick = move |id: &str| {
            tx.lock().unwrap().send(id.to_owned()).unwrap();
            Ok(())
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(kick_revoked(
            registry.clone(),
            sessions.clone(),
            revocations,
            kick,
            Arc::new(Metrics::default()),
            stop.clone(),
        ));
        Kicker { kicks, stop, task }
    }

    impl Kicker {
        /// The kicks so far, after giving the kicker time to act.
        async fn kicks(&self) -> Vec<String> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.kicks.try_iter().collect()
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    fn shared(registry: &Arc<Registry>, sessions: &Arc<Sessions>) -> Arc<Shared> {
        Arc::new(Shared {
            registry: registry.clone(),
            metrics: Arc::new(Metrics::default()),
            sessions: sessions.clone(),
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The device is disabled after the auth handler accepted it and before the router
    /// registered it: the revocation finds nothing to kick (here: the kicker never even
    /// sees it), and the CONNACK's re-check kicks the connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_between_authentication_and_registration_still_kicks() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, tokens) = registry(dir.path(), &["d1", "d2"]);
        let sessions = Arc::new(Sessions::default());
        let shared = shared(&registry, &sessions);
        let conn = connecting(&shared, "d1", &tokens[0]);
        let bystander = connecting(&shared, "d2", &tokens[1]);
        accept(&bystander);
        registry
            .update(
                "d1",
                |f| {
                    Ok(DeviceFields {
                        enabled: false,
                        ..f.clone()
                    })
                },
                None,
            )
            .unwrap();
        let kicker = start_kicker(&registry, &sessions, registry.revocations());
        assert_eq!(kicker.kicks().await, Vec::<String>::new());
        accept(&conn);
        assert_eq!(kicker.kicks().await, ["d1"]);
        // Kicked once, however often it is re-checked.
        sessions.request_recheck();
        assert_eq!(kicker.kicks().await, Vec::<String>::new());
        assert_eq!(sessions.len(), 2);
        drop(conn);
        assert_eq!(sessions.len(), 1);
        kicker.stop().await;
    }

    /// More revocations than the channel holds arrive before the kicker reads: the
    /// re-key of a still-enabled device is among the missed ones and is still kicked,
    /// and nobody else is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_re_key_missed_by_a_lagged_revocation_channel_still_kicks() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, tokens) = registry(dir.path(), &["d1", "d2", "noisy"]);
        let sessions = Arc::new(Sessions::default());
        let shared = shared(&registry, &sessions);
        let conn = connecting(&shared, "d1", &tokens[0]);
        accept(&conn);
        let bystander = connecting(&shared, "d2", &tokens[1]);
        accept(&bystander);
        let revocations = registry.revocations();
        registry.rotate_token("d1", None).unwrap();
        // The channel holds 1,024 revocations; these push d1's out of it.
        for _ in 0..1_100 {
            registry.rotate_token("noisy", None).unwrap();
        }
        let kicker = start_kicker(&registry, &sessions, revocations);
        assert_eq!(kicker.kicks().await, ["d1"]);
        kicker.stop().await;
        drop((conn, bystander));
        assert_eq!(sessions.len(), 0);
    }

    /// A takeover and a kick are independent marks: a connection marked as taken over
    /// by a newer login can still be kicked.
    #[test]
    fn a_takeover_mark_never_prevents_a_kick() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, tokens) = registry(dir.path(), &["d1"]);
        let sessions = Sessions::default();
        let fate = sessions.accepted(Arc::from("d1"), crate::registry::secret::hash(&tokens[0]));
        sessions.successor_authenticated("d1");
        assert!(fate.taken_over());
        registry.rotate_token("d1", None).unwrap();
        let kicked: Vec<Arc<str>> = sessions.revoked(&registry, Some("d1"));
        assert_eq!(kicked, [Arc::from("d1")]);
        assert!(fate.kicked());
        assert!(sessions.revoked(&registry, None).is_empty());
    }
}
