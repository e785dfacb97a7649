//! The life of one command as a pure state machine: which step may move it where, and
//! which timestamps and fields each move sets. The dispatcher decides when steps
//! happen; this file decides whether they are allowed.
//!
//! ```text
//! queued --send--> sent --delivered--> delivered --reply--> replied | failed
//!   │  ^             │  \______________________reply________/   ^
//!   │  └────lost─────┘                                         │
//!   ├──ttl────> expired        sent | delivered ──timeout──────┘
//!   └──cancel─> cancelled
//! ```
//!
//! A reply implies delivery (a WS device may answer without `received`, and a PUBACK
//! may be read after the reply). `lost` (the transport dropped it before the device
//! confirmed) returns a sent command to the queue, so it is sent again, in order.

use crate::model::{Command, CommandState, Reply};

/// Something that happens to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Handed to a transport.
    Send,
    /// The device confirmed receipt.
    Delivered,
    /// The device answered.
    Reply(Reply),
    /// The transport lost it before the device confirmed.
    Lost,
    /// Its `ttl` passed while it waited.
    Expire,
    /// Its `timeout` passed without a reply.
    Timeout,
    /// An operator cancelled it.
    Cancel,
}

/// A step that the command's state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not allowed in state {}", from.as_str())]
pub struct Illegal {
    /// The state it was in.
    pub from: CommandState,
}

/// The error text of a command that failed for want of a reply.
pub const TIMEOUT_ERROR: &str = "timeout";
/// The error text of a command that expired.
pub const TTL_ERROR: &str = "ttl";

/// Apply `step` at `now_ms`. `Ok(true)`: the command changed; `Ok(false)`: the step
/// changes nothing (a repeated confirmation, a loss after the device confirmed).
pub fn apply(cmd: &mut Command, step: Step, now_ms: u64) -> Result<bool, Illegal> {
    use CommandState as S;
    let illegal = Err(Illegal { from: cmd.state });
    match (cmd.state, step) {
        (S::Queued, Step::Send) => {
            cmd.state = S::Sent;
            cmd.sent_ms = Some(now_ms);
        }
        (S::Sent, Step::Delivered) => {
            cmd.state = S::Delivered;
            cmd.delivered_ms = Some(now_ms);
        }
        (S::Delivered, Step::Delivered | Step::Lost) => return Ok(false),
        (S::Sent | S::Delivered, Step::Reply(reply)) => {
            cmd.delivered_ms.get_or_insert(now_ms);
            cmd.finished_ms = Some(now_ms);
            match reply {
                Reply::Ok(result) => {
                    cmd.state = S::Replied;
                    cmd.result = Some(result);
                }
                Reply::Err(error) => {
                    cmd.state = S::Failed;
                    cmd.error = Some(error);
                }
            }
        }
        (S::Sent, Step::Lost) => cmd.state = S::Queued,
        (S::Queued, Step::Expire) => {
            cmd.state = S::Expired;
            cmd.finished_ms = Some(now_ms);
            cmd.error = Some(TTL_ERROR.to_owned());
        }
        (S::Sent | S::Delivered, Step::Timeout) => {
            cmd.state = S::Failed;
            cmd.finished_ms = Some(now_ms);
            cmd.error = Some(TIMEOUT_ERROR.to_owned());
        }
        (S::Queued, Step::Cancel) => {
            cmd.state = S::Cancelled;
            cmd.finished_ms = Some(now_ms);
        }
        _ => return illegal,
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn fresh() -> Command {
        Command {
            seq: 1,
            id: "c1".into(),
            device: "d1".into(),
            name: "reboot".into(),
            params: serde_json::json!({}),
            timeout_ms: 1000,
            ttl_ms: 1000,
            state: CommandState::Queued,
            created_ms: 0,
            sent_ms: None,
            delivered_ms: None,
            finished_ms: None,
            result: None,
            error: None,
            node: String::new(),
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Send),
            Just(Step::Delivered),
            any::<bool>().prop_map(|ok| Step::Reply(if ok {
                Reply::Ok(serde_json::json!(1))
            } else {
                Reply::Err("no".into())
            })),
            Just(Step::Lost),
            Just(Step::Expire),
            Just(Step::Timeout),
            Just(Step::Cancel),
        ]
    }

    /// The model: the edges of the diagram in the module docs, nothing else.
    fn allowed(from: CommandState, to: CommandState) -> bool {
        use CommandState as S;
        matches!(
            (from, to),
            (S::Queued, S::Sent)
                | (S::Queued, S::Expired)
                | (S::Queued, S::Cancelled)
                | (S::Sent, S::Delivered)
                | (S::Sent, S::Queued)
                | (S::Sent, S::Replied)
                | (S::Sent, S::Failed)
                | (S::Delivered, S::Replied)
                | (S::Delivered, S::Failed)
        )
    }

    proptest! {
        #[test]
        fn only_the_diagrams_edges_are_taken(steps in proptest::collection::vec(step(), 0..30)) {
            let mut cmd = fresh();
            for (t, s) in steps.into_iter().enumerate() {
                let before = cmd.clone();
                let now = t as u64 + 1;
                match apply(&mut cmd, s, now) {
                    Ok(true) => prop_assert!(
                        allowed(before.state, cmd.state),
                        "{:?} -> {:?}", before.state, cmd.state
                    ),
                    // Refused or no-op: nothing changed at all.
                    Ok(false) | Err(_) => prop_assert_eq!(&cmd, &before),
                }
                if before.state.is_final() {
                    prop_assert_eq!(&cmd, &before);
                }
                // Timestamps: finished exactly in final states; in order when present.
                prop_assert_eq!(cmd.finished_ms.is_some(), cmd.state.is_final());
                if let (Some(s), Some(d)) = (cmd.sent_ms, cmd.delivered_ms) {
                    prop_assert!(s <= d);
                }
                if let (Some(d), Some(f)) = (cmd.delivered_ms, cmd.finished_ms) {
                    prop_assert!(d <= f);
                }
                prop_assert_eq!(cmd.result.is_some(), cmd.state == CommandState::Replied);
                if matches!(cmd.state, CommandState::Sent | CommandState::Delivered) {
                    prop_assert!(cmd.sent_ms.is_some());
                }
            }
        }
    }

    #[test]
    fn a_reply_implies_delivery_and_a_loss_requeues() {
        let mut cmd = fresh();
        assert_eq!(apply(&mut cmd, Step::Send, 5), Ok(true));
        assert_eq!(apply(&mut cmd, Step::Lost, 6), Ok(true));
        assert_eq!(cmd.state, CommandState::Queued);
        assert_eq!(apply(&mut cmd, Step::Send, 7), Ok(true));
        assert_eq!(
            apply(&mut cmd, Step::Reply(Reply::Err("busy".into())), 9),
            Ok(true)
        );
        assert_eq!(cmd.state, CommandState::Failed);
        assert_eq!(cmd.delivered_ms, Some(9));
        assert_eq!(cmd.error.as_deref(), Some("busy"));
        assert_eq!(
            apply(&mut cmd, Step::Cancel, 10),
            Err(Illegal {
                from: CommandState::Failed
            })
        );
    }

    #[test]
    fn only_a_queued_command_expires_or_is_cancelled() {
        let mut cmd = fresh();
        assert_eq!(
            apply(&mut cmd, Step::Timeout, 1).map_err(|e| e.from),
            Err(CommandState::Queued)
        );
        assert_eq!(apply(&mut cmd, Step::Expire, 2), Ok(true));
        assert_eq!(cmd.error.as_deref(), Some(TTL_ERROR));
        let mut cmd = fresh();
        apply(&mut cmd, Step::Send, 1).unwrap();
        assert!(apply(&mut cmd, Step::Cancel, 2).is_err());
        assert!(apply(&mut cmd, Step::Expire, 2).is_err());
        assert_eq!(apply(&mut cmd, Step::Timeout, 3), Ok(true));
        assert_eq!(cmd.error.as_deref(), Some(TIMEOUT_ERROR));
    }
}
