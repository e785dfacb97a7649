//! Downlink commands in the registry database (`commands` table; SQL in the backends):
//! insert, state updates, the open ones at start, and the reads of the command API. The command
//! component (`commands`) owns the life of a command; this file only stores it.
//!
//! The table is bounded: when a command is created, the device's finished commands
//! beyond the newest `keep_finished` are deleted (`commands.history`), and a device's
//! commands go with the device.

use super::{Registry, RegistryError};
use crate::model::{Command, CommandState};

impl Registry {
    /// Store a new command (its device must exist) and trim the device's finished
    /// commands to the newest `keep_finished`. Returns its `seq`.
    pub fn command_insert(&self, c: &Command, keep_finished: usize) -> Result<i64, RegistryError> {
        self.backend.command_insert(c, keep_finished)
    }

    /// Store a command's new state and timestamps.
    pub fn command_update(&self, c: &Command) -> Result<(), RegistryError> {
        self.backend.command_update(c)
    }

    /// Every command of `node` (its owner; empty on a single node) that has not
    /// finished, in creation order (loaded at start: a node resumes its own commands).
    pub fn commands_open(&self, node: &str) -> Result<Vec<Command>, RegistryError> {
        self.backend.commands_open(node)
    }

    /// One command of `device`.
    pub fn command_get(&self, device: &str, id: &str) -> Result<Option<Command>, RegistryError> {
        self.backend.command_get(device, id)
    }

    /// A page of `device`'s commands in creation order, after `after` (a `seq`), in
    /// `state` when given; the second value is the cursor of the next page.
    pub fn commands_list(
        &self,
        device: &str,
        state: Option<CommandState>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<Command>, Option<i64>), RegistryError> {
        self.backend.commands_list(
            device,
            state.map(CommandState::as_str),
            after.unwrap_or(0),
            limit,
        )
    }
}
