//! [`Remote`]: the port through which the command component reaches other nodes in
//! cluster mode. The component stays free of any transport between nodes: `cluster`
//! implements the port over NATS (`cluster::commands`), `app` plugs it in, and without
//! it (a single node) nothing here is used.
//!
//! The roles, per command: its *owner* is the node whose API created it (its
//! dispatcher runs the command's state machine until it finishes, and the registry row
//! names it); the *holder* is the node a device is connected to. When the owner
//! cannot deliver a command itself, it offers it to the holder ([`Remote::offer`]);
//! the holder hands it to its local transports and forwards what the device says about
//! it (receipt, reply, loss) to the owner ([`Remote::confirm`], [`Remote::lost`]).

use std::future::Future;
use std::pin::Pin;

use super::error::{CommandsError, ReplyRefused};
use crate::model::{Command, Outgoing, Reply};

/// A boxed future of the port.
pub type RemoteFuture<T> = Pin<Box<dyn Future<Output = T> + Send + Sync>>;

/// A command offered to the node that holds its device.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteOffer {
    /// The node that owns it (where the holder forwards receipts and replies).
    pub owner: String,
    /// What the device gets.
    pub out: Outgoing,
    /// The command's reply timeout: the holder forgets the delivery after it.
    pub timeout_ms: u64,
}

/// How the holder delivered an offered command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A push transport (MQTT): the holder forwards the receipt (PUBACK) or the loss.
    Push,
    /// A WebSocket connection: the device's `received` or reply is forwarded, a close
    /// before it is a loss.
    Ws,
    /// An HTTP long poll: the answer is the delivery.
    Poll,
}

impl Via {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Push => "push",
            Via::Ws => "ws",
            Via::Poll => "poll",
        }
    }

    /// The route with this wire name.
    pub fn parse(s: &str) -> Option<Via> {
        [Via::Push, Via::Ws, Via::Poll]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// The answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered {
    /// Node `node` handed it to the device's transport.
    Taken {
        /// The holder.
        node: String,
        /// How.
        via: Via,
    },
    /// No node could deliver it now (the device is not connected anywhere else, the
    /// holder's transport was busy, or the holder did not answer): it stays queued and
    /// is offered again by the next retry tick.
    NotTaken,
}

/// What a device said about a command that another node owns.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirm {
    /// Receipt (WS `received`, MQTT PUBACK).
    Received,
    /// The answer.
    Reply(Reply),
}

/// The other nodes, as the command component sees them.
pub trait Remote: Send + Sync {
    /// This node's id: the owner written on the commands it creates.
    fn node(&self) -> &str;

    /// Offer `offer` for `device` to the node that holds its connection: `holder` when
    /// known (it said the device is reachable there), else the one presence names.
    /// `None` when no other node is known to hold it (checked without waiting), so there
    /// is nothing to ask.
    fn offer(
        &self,
        device: &str,
        holder: Option<&str>,
        offer: RemoteOffer,
    ) -> Option<RemoteFuture<Offered>>;

    /// `device` may be reachable here now (it connected, subscribed, or polls): the
    /// owners of its queued commands offer them at once. Never waits.
    fn reachable(&self, device: &str);

    /// Forward a device's receipt or reply to `owner`; its answer is the device's.
    fn confirm(
        &self,
        owner: &str,
        device: &str,
        id: &str,
        what: Confirm,
    ) -> RemoteFuture<Result<(), ReplyRefused>>;

    /// Tell `owner` that the transport here lost its command `id` before the device
    /// confirmed it (the owner queues it again). Best effort: an owner that never hears
    /// of it finds the command failed by its timeout.
    fn lost(&self, owner: &str, device: &str, id: &str) -> RemoteFuture<()>;

    /// Whether `holder` still holds this node's command `id` (it took it and the device
    /// has not confirmed it yet). False only when it said no or is gone (no node
    /// answers on its subject); an answer that does not come in time counts as yes, so
    /// a slow link never sends a command twice.
    fn holding(&self, holder: &str, id: &str) -> RemoteFuture<bool>;

    /// Forward an operator's cancel to `owner`.
    fn cancel(
        &self,
        owner: &str,
        device: &str,
        id: &str,
    ) -> RemoteFuture<Result<Command, CommandsError>>;

    /// A command this node owns changed state (every other node tells its own live
    /// streams and waiting requests). Never waits.
    fn changed(&self, cmd: &Command);
}
