//! Kicks: closing the MQTT connections of devices that were disabled, deleted or
//! re-keyed, and of devices the pipeline asked to disconnect for sending above their
//! rate.
//!
//! Who to kick comes from the session table (`sessions`): a revocation names one
//! device; a lagged revocation channel, or a connection that saw its own credentials
//! revoked while it was being registered, asks for a re-check of every open connection.
//! A kick marks the connection's link and wakes its task, which closes the socket at
//! once and frees its slot; there is nothing else to release.

use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::sessions::Sessions;
use crate::model::Transport;
use crate::observe::{Event, Metrics};
use crate::registry::Registry;

/// Close the MQTT connections of revoked devices until `shutdown`.
pub(super) async fn kick_revoked(
    registry: Arc<Registry>,
    sessions: Arc<Sessions>,
    mut revocations: broadcast::Receiver<Arc<str>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let ids = tokio::select! {
            () = shutdown.cancelled() => return,
            () = sessions.recheck_requested() => sessions.kick_revoked(&registry, None),
            r = revocations.recv() => match r {
                Ok(id) => sessions.kick_revoked(&registry, Some(&id)),
                // Missed revocations: re-check the credentials of every open connection,
                // which also finds re-keyed devices that are still enabled.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "revocation channel lagged; re-checking every MQTT connection");
                    sessions.kick_revoked(&registry, None)
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        for id in ids {
            metrics.emit(Event::DeviceKicked {
                device: &id,
                transport: Transport::Mqtt,
            });
        }
    }
}

/// Close the MQTT connections of devices the pipeline asked to disconnect (over
/// `limits.device_rate` with `device_rate_action = "disconnect"`). Their credentials stay
/// valid: they may connect again, and are refused again while over the rate.
pub(super) async fn kick_requested(
    registry: Arc<Registry>,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
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
        if sessions.kick(&id) {
            metrics.emit(Event::DeviceKicked {
                device: &id,
                transport: Transport::Mqtt,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::registry::secret::hash;
    use crate::registry::{DeviceCredential, DeviceFields};

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

    struct Kicker {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start_kicker(
        registry: &Arc<Registry>,
        sessions: &Arc<Sessions>,
        revocations: broadcast::Receiver<Arc<str>>,
    ) -> Kicker {
        let stop = CancellationToken::new();
        let task = tokio::spawn(kick_revoked(
            registry.clone(),
            sessions.clone(),
            revocations,
            Arc::new(Metrics::default()),
            stop.clone(),
        ));
        Kicker { stop, task }
    }

    impl Kicker {
        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    /// Give the kicker time to act.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// The device is disabled after it authenticated and before its connection was
    /// registered: the revocation finds nothing to kick, and the connection's own check
    /// after registering (what the connection task does) has the kicker close it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_between_authentication_and_registration_still_kicks() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, tokens) = registry(dir.path(), &["d1", "d2"]);
        let sessions = Arc::new(Sessions::new(100, 4));
        let bystander = sessions.register(
            Arc::from("d2"),
            DeviceCredential::Token(hash(&tokens[1])),
            false,
        );
        let kicker = start_kicker(&registry, &sessions, registry.revocations());
        // d1 authenticated here; now it is disabled before it registers.
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
        settle().await;
        let conn = sessions.register(
            Arc::from("d1"),
            DeviceCredential::Token(hash(&tokens[0])),
            false,
        );
        assert!(!conn.link.fate.kicked());
        if !registry.still_valid("d1", &hash(&tokens[0])) {
            sessions.request_recheck();
        }
        settle().await;
        assert!(conn.link.fate.kicked());
        assert!(!bystander.link.fate.kicked());
        assert_eq!(sessions.len(), 2);
        sessions.ended(&Arc::from("d1"), &conn.link, Vec::new());
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
        let sessions = Arc::new(Sessions::new(100, 4));
        let conn = sessions.register(
            Arc::from("d1"),
            DeviceCredential::Token(hash(&tokens[0])),
            false,
        );
        let bystander = sessions.register(
            Arc::from("d2"),
            DeviceCredential::Token(hash(&tokens[1])),
            false,
        );
        let revocations = registry.revocations();
        registry.rotate_token("d1", None).unwrap();
        // The channel holds 1,024 revocations; these push d1's out of it.
        for _ in 0..1_100 {
            registry.rotate_token("noisy", None).unwrap();
        }
        let kicker = start_kicker(&registry, &sessions, revocations);
        settle().await;
        assert!(conn.link.fate.kicked());
        assert!(!bystander.link.fate.kicked());
        kicker.stop().await;
    }

    /// A takeover and a kick are independent marks: a connection marked as taken over
    /// by a newer login can still be kicked, and a kick is taken once.
    #[test]
    fn a_takeover_mark_never_prevents_a_kick() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, tokens) = registry(dir.path(), &["d1"]);
        let sessions = Sessions::new(100, 4);
        let old = sessions.register(
            Arc::from("d1"),
            DeviceCredential::Token(hash(&tokens[0])),
            false,
        );
        let new = sessions.register(
            Arc::from("d1"),
            DeviceCredential::Token(hash(&tokens[0])),
            false,
        );
        assert!(old.link.fate.taken_over());
        assert!(!new.link.fate.taken_over());
        registry.rotate_token("d1", None).unwrap();
        assert_eq!(
            sessions.kick_revoked(&registry, Some("d1")),
            [Arc::from("d1")]
        );
        assert!(new.link.fate.kicked());
        assert!(sessions.kick_revoked(&registry, None).is_empty());
        // The old connection ending leaves the newer one's entry alone.
        sessions.ended(&Arc::from("d1"), &old.link, Vec::new());
        assert_eq!(sessions.len(), 1);
    }
}
