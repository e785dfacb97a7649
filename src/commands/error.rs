//! [`CommandsError`]: why the command component refused a request of the API, and
//! [`ReplyRefused`]: why a device's reply (or receipt) was refused.

use crate::model::CommandState;
use crate::registry::RegistryError;

/// Why a create, cancel or read was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandsError {
    /// A field of the new command is invalid.
    #[error("{field}: {detail}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The device does not exist.
    #[error("device `{0}` not found")]
    DeviceNotFound(String),
    /// No such command for this device.
    #[error("command `{0}` not found")]
    NotFound(String),
    /// The device has `commands.max_queued` unfinished commands.
    #[error("device `{device}` has {max} unfinished commands (commands.max_queued)")]
    QueueFull {
        /// The device.
        device: String,
        /// The cap.
        max: usize,
    },
    /// The command is not in a state that allows this (cancel of a sent one).
    #[error("command `{id}` is {}; only a queued command can be cancelled", state.as_str())]
    Conflict {
        /// The command.
        id: String,
        /// Its state.
        state: CommandState,
    },
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// Cluster mode: the node that owns the command did not answer (try again).
    #[error("the node that owns command `{0}` cannot be reached now; try again")]
    OwnerUnreachable(String),
    /// The registry database failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Why a reply or receipt from a device was refused (counted by reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyRefused {
    /// The device has no unfinished command with this id (never existed, another
    /// device's, or already finished: a late or repeated reply).
    #[error("no unfinished command with this id for this device")]
    Unknown,
    /// The command has not been sent yet (it went back to the queue).
    #[error("the command has not been sent")]
    NotSent,
    /// The body is not a reply.
    #[error("malformed reply")]
    Malformed,
    /// The gateway is shutting down: the reply was not recorded (send it again).
    #[error("the gateway is shutting down; send the reply again")]
    ShuttingDown,
    /// Cluster mode: the node that owns the command did not answer; the reply was not
    /// recorded (send it again).
    #[error("the command's node cannot be reached now; send the reply again")]
    OwnerUnreachable,
}
