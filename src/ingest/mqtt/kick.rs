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

use rumqttd::local::{LinkError, LinkTx};
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
pub(super) fn release_link(mut tx: LinkTx) -> Result<(), LinkError> {
    tx.buffer().push_back(Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    ));
    tx.unsubscribe("fluxgate/kick-release")?;
    Ok(())
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
            let (kick, client) = (kick.clone(), id.clone());
            let kicked = tokio::task::spawn_blocking(move || kick(&client)).await;
            match kicked {
                Ok(Ok(())) => metrics.emit(Event::DeviceKicked {
                    device: &id,
                    transport: Transport::Mqtt,
                }),
                Ok(Err(e)) => {
                    tracing::error!(device = &*id, error = %e, "could not close MQTT connection")
                }
                Err(e) => {
                    tracing::error!(device = &*id, error = %e, "could not close MQTT connection")
                }
            }
        }
    }
}
