//! The table of open device connections, shared by every connection task, the kicker
//! and the command handle: client id -> the credentials it logged in with and its
//! [`Link`], the few atomics and the outbox through which others reach the connection.
//!
//! It exists because the registry's revocation broadcast can lag (a bounded channel) and
//! a revocation can land while a device is between authentication and registration.
//! With the credentials of every open connection at hand, "who must go" is always
//! answerable by re-checking them against the registry, whatever was missed: a disabled
//! or deleted device, and a re-keyed one (its token hash changed).
//!
//! It also holds what MQTT keeps of a `clean_session = false` session between two
//! connections: the command subscription and the commands sent but not acknowledged,
//! which the next connection sends again (DUP set, same packet id). Those sessions are
//! bounded by `mqtt.max_connections` (the oldest goes first, its commands reported
//! lost).
//!
//! Open connections: at most one entry per client id (a newer connection takes the
//! place of the older, which is told to close), so the table is bounded by
//! `mqtt.max_connections`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

use crate::registry::{DeviceCredential, Registry};
use crate::sync::lock;

/// What became of a connection, decided by someone other than the connection itself.
/// The marks are independent bits, so no mark can keep another from being set (a
/// takeover never prevents a kick).
#[derive(Debug, Default)]
pub(super) struct Fate(AtomicU8);

impl Fate {
    const KICKED: u8 = 1;
    const TAKEN_OVER: u8 = 2;

    /// Its device was revoked (or sent above its rate with `disconnect`).
    pub(super) fn kicked(&self) -> bool {
        self.0.load(Ordering::Acquire) & Self::KICKED != 0
    }

    /// A newer connection with the same client id replaces it.
    pub(super) fn taken_over(&self) -> bool {
        self.0.load(Ordering::Acquire) & Self::TAKEN_OVER != 0
    }

    /// Set a mark; true when it was not set before.
    fn mark(&self, mark: u8) -> bool {
        self.0.fetch_or(mark, Ordering::AcqRel) & mark == 0
    }
}

/// How a command sent to a device ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The device acknowledged it (PUBACK).
    Acked,
    /// The connection ended before the PUBACK, and no session keeps the command for
    /// the next one (`clean_session = true`, a reconnect with a clean session, an
    /// evicted session, or the gateway stopped).
    Lost,
}

/// A command on its way to a device: the payload, the packet id once it was sent
/// (kept across reconnects of a persistent session), and who waits for the outcome.
pub(super) struct Outbound {
    pub(super) payload: Bytes,
    pub(super) pkid: Option<u16>,
    pub(super) done: oneshot::Sender<Delivery>,
}

impl Outbound {
    /// Report the outcome (the caller may have stopped waiting).
    pub(super) fn finish(self, outcome: Delivery) {
        let _ = self.done.send(outcome);
    }
}

/// A connection as others reach it: its fate, a wake-up, whether it subscribed to its
/// command topic, and the commands queued for it. Small on purpose: one per open
/// connection.
#[derive(Default)]
pub(super) struct Link {
    pub(super) fate: Fate,
    /// Wakes the connection task: its fate changed, or a command was queued.
    pub(super) wake: Notify,
    pub(super) subscribed: AtomicBool,
    /// Commands waiting to be sent.
    pub(super) outbox: Mutex<VecDeque<Outbound>>,
    /// Commands sent and not yet acknowledged (kept by the connection task).
    pub(super) unacked: AtomicUsize,
}

struct Session {
    credential: DeviceCredential,
    link: Arc<Link>,
    /// Whether this connection keeps its session (`clean_session = false`).
    persistent: bool,
}

/// What a persistent session keeps while its device is not connected.
struct Kept {
    subscribed: bool,
    unacked: Vec<Outbound>,
}

/// What a new connection starts with.
pub(super) struct Registered {
    pub(super) link: Arc<Link>,
    /// A session was kept from an earlier connection (CONNACK `session_present`).
    pub(super) session_present: bool,
    /// Commands the previous connection sent without an acknowledgement: send again,
    /// with DUP set.
    pub(super) resend: Vec<Outbound>,
}

/// Why a command was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The device has no open MQTT connection.
    #[error("the device is not connected over MQTT")]
    Offline,
    /// The device is connected but not subscribed to its command topic.
    #[error("the device has not subscribed to its command topic")]
    NotSubscribed,
    /// `mqtt.max_outbound` commands are already queued or unacknowledged.
    #[error("too many commands waiting for this device (mqtt.max_outbound)")]
    Full,
}

/// The open device connections and the kept sessions (see the module docs).
pub(super) struct Sessions {
    open: Mutex<HashMap<Arc<str>, Session>>,
    kept: Mutex<KeptSessions>,
    /// Wakes the kicker to re-check every open connection.
    recheck: Notify,
    max_kept: usize,
    max_outbound: usize,
}

#[derive(Default)]
struct KeptSessions {
    by_id: HashMap<Arc<str>, Kept>,
    /// Insertion order, for evicting the oldest; may name ids that were taken back.
    order: VecDeque<Arc<str>>,
}

impl Sessions {
    pub(super) fn new(max_kept: usize, max_outbound: usize) -> Self {
        Self {
            open: Mutex::default(),
            kept: Mutex::default(),
            recheck: Notify::new(),
            max_kept,
            max_outbound,
        }
    }

    /// A connection of `device` logged in with `credential`: it becomes the device's
    /// connection, and an older one is told to close (MQTT's rule for duplicate client
    /// ids). With `persistent` (`clean_session = false`) it takes over what a kept
    /// session holds; without, any kept session is discarded.
    pub(super) fn register(
        &self,
        device: Arc<str>,
        credential: DeviceCredential,
        persistent: bool,
    ) -> Registered {
        let link = Arc::new(Link::default());
        let kept = lock(&self.kept).by_id.remove(&device);
        let (session_present, resend) = match kept {
            Some(k) if persistent => {
                link.subscribed.store(k.subscribed, Ordering::Release);
                (true, k.unacked)
            }
            Some(k) => {
                for o in k.unacked {
                    o.finish(Delivery::Lost);
                }
                (false, Vec::new())
            }
            None => (false, Vec::new()),
        };
        let old = lock(&self.open).insert(
            device,
            Session {
                credential,
                link: link.clone(),
                persistent,
            },
        );
        if let Some(old) = old {
            old.link.fate.mark(Fate::TAKEN_OVER);
            old.link.wake.notify_one();
        }
        Registered {
            link,
            session_present,
            resend,
        }
    }

    /// The connection with `link` ended, leaving `unacked` commands. Its entry goes
    /// unless a newer connection of the same device already replaced it. The commands
    /// go to the newer connection if it keeps the session, are kept for the next one if
    /// this connection's session persists, and are reported lost otherwise.
    pub(super) fn ended(&self, device: &Arc<str>, link: &Arc<Link>, unacked: Vec<Outbound>) {
        let mut open = lock(&self.open);
        let current = open.get(device);
        let successor = current.filter(|s| !Arc::ptr_eq(&s.link, link));
        if let Some(next) = successor {
            if next.persistent {
                if link.subscribed.load(Ordering::Acquire) {
                    next.link.subscribed.store(true, Ordering::Release);
                }
                let mut outbox = lock(&next.link.outbox);
                // Sent before anything the new connection queued: they go out first.
                for o in unacked.into_iter().rev() {
                    outbox.push_front(o);
                }
                drop(outbox);
                next.link.wake.notify_one();
            } else {
                lost(unacked);
            }
            return;
        }
        let persistent = current.is_some_and(|s| s.persistent);
        open.remove(device);
        drop(open);
        if !persistent {
            lost(unacked);
            return;
        }
        let kept = Kept {
            subscribed: link.subscribed.load(Ordering::Acquire),
            unacked,
        };
        let mut sessions = lock(&self.kept);
        sessions.by_id.insert(device.clone(), kept);
        sessions.order.push_back(device.clone());
        while sessions.by_id.len() > self.max_kept {
            let Some(oldest) = sessions.order.pop_front() else {
                break;
            };
            if let Some(k) = sessions.by_id.remove(&oldest) {
                lost(k.unacked);
            }
        }
        // The order queue may hold ids taken back since; keep it from growing past
        // twice the bound by dropping those.
        if sessions.order.len() > 2 * self.max_kept.max(1) {
            let KeptSessions { by_id, order } = &mut *sessions;
            order.retain(|id| by_id.contains_key(id));
        }
    }

    /// Queue a command for `device`'s connection.
    pub(super) fn send(
        &self,
        device: &str,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<Delivery>, CommandError> {
        let link = lock(&self.open)
            .get(device)
            .map(|s| s.link.clone())
            .ok_or(CommandError::Offline)?;
        if !link.subscribed.load(Ordering::Acquire) {
            return Err(CommandError::NotSubscribed);
        }
        let (done, outcome) = oneshot::channel();
        {
            let mut outbox = lock(&link.outbox);
            if outbox.len() + link.unacked.load(Ordering::Acquire) >= self.max_outbound {
                return Err(CommandError::Full);
            }
            outbox.push_back(Outbound {
                payload,
                pkid: None,
                done,
            });
        }
        link.wake.notify_one();
        Ok(outcome)
    }

    /// The most commands a connection holds, queued and unacknowledged together.
    pub(super) fn max_outbound(&self) -> usize {
        self.max_outbound
    }

    /// Ask the kicker to re-check every open connection (a connection noticed that its
    /// own credentials were revoked while it was being registered).
    pub(super) fn request_recheck(&self) {
        // `notify_one` keeps a permit when the kicker is busy, so no request is lost.
        self.recheck.notify_one();
    }

    /// Resolves when a re-check was requested.
    pub(super) async fn recheck_requested(&self) {
        self.recheck.notified().await;
    }

    /// Close the open connections whose credentials the registry no longer accepts
    /// (only `device`'s, when given): each is marked as kicked, so it is taken once and
    /// its end is counted as a kick, and woken. Returns the kicked ids.
    pub(super) fn kick_revoked(&self, registry: &Registry, device: Option<&str>) -> Vec<Arc<str>> {
        let open = lock(&self.open);
        let check = |(id, s): (&Arc<str>, &Session)| {
            (!registry.credential_valid(id, &s.credential) && kick(&s.link)).then(|| id.clone())
        };
        match device {
            Some(d) => open.get_key_value(d).and_then(check).into_iter().collect(),
            None => open.iter().filter_map(check).collect(),
        }
    }

    /// Close `device`'s open connection whatever its credentials (over its rate with
    /// `limits.device_rate_action = "disconnect"`). True when one was open.
    pub(super) fn kick(&self, device: &str) -> bool {
        lock(&self.open).get(device).is_some_and(|s| kick(&s.link))
    }

    /// Open device connections.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.open).len()
    }
}

/// Mark a link kicked and wake it; false when it was kicked already.
fn kick(link: &Link) -> bool {
    let first = link.fate.mark(Fate::KICKED);
    if first {
        link.wake.notify_one();
    }
    first
}

fn lost(unacked: Vec<Outbound>) {
    for o in unacked {
        o.finish(Delivery::Lost);
    }
}
