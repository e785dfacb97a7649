//! Downlink commands: an operator's command to one device, queued until the device is
//! reachable, delivered in order over whichever transport the device uses, and
//! finished by its reply, a timeout, its `ttl`, or a cancel.
//!
//! One concept per file: `machine.rs` (the states and the steps between them, pure),
//! `dispatcher.rs` (the task that owns the unfinished commands: queues, delivery,
//! deadlines; every step is committed to the registry database first), `expiry.rs`
//! (the deadlines), `error.rs`. [`Commands`] is the cheap handle the API and the
//! transports use; `app` starts the [`Dispatcher`] with the push transports (MQTT).
//!
//! Bounds and full-policies: the request queue holds [`REQUEST_QUEUE`] requests
//! (full-policy: the caller waits; reachability hints are dropped instead, and the
//! dispatcher's once-a-second retry covers them); a device has at most
//! `commands.max_queued` unfinished commands (one more is refused, 429, counted); each
//! WebSocket connection's command queue holds [`WS_QUEUE`] (full: the command stays
//! queued); one HTTP long poll waits per device; the state-change broadcast holds
//! [`EVENT_QUEUE`] (a lagging listener is told, and re-reads the database).

mod dispatcher;
mod error;
mod expiry;
pub mod machine;
pub mod remote;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

pub use dispatcher::{Dispatcher, MAX_HELD, MAX_OFFERS};
pub use error::{CommandsError, ReplyRefused};
pub use remote::{Confirm, Offered, Remote, RemoteFuture, RemoteOffer, Via};

use crate::config::CommandsConfig;
use crate::model::{Command, CommandState, Outgoing, Reply, now_ms};
use crate::observe::{CommandRefusal, Event, Metrics};
use crate::registry::Registry;
use dispatcher::{Answer, Request};

/// Requests waiting for the dispatcher.
pub const REQUEST_QUEUE: usize = 1024;
/// State changes buffered for each listener (live streams, waiting requests).
pub const EVENT_QUEUE: usize = 1024;
/// Commands buffered for one WebSocket ingest connection.
pub const WS_QUEUE: usize = 4;
/// Largest `params` object, serialised.
pub const MAX_PARAMS_BYTES: usize = 16 * 1024;

/// A command as an operator asks for it.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// A JSON object (absent: `{}`).
    pub params: Option<serde_json::Value>,
    /// Reply deadline after sending (absent: `commands.default_timeout`).
    pub timeout: Option<Duration>,
    /// Queueing deadline after creation (absent: `commands.default_ttl`).
    pub ttl: Option<Duration>,
}

/// The handle to the command component (cheap to clone).
#[derive(Clone)]
pub struct Commands {
    tx: mpsc::Sender<Request>,
    events: broadcast::Sender<Arc<Command>>,
    config: Arc<CommandsConfig>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    remote: Option<Arc<dyn Remote>>,
}

impl Commands {
    /// The handle and the dispatcher it talks to (started by `app`).
    pub fn new(
        config: CommandsConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (Commands, Dispatcher) {
        Commands::with_remote(config, registry, metrics, None)
    }

    /// [`new`](Self::new), in cluster mode: `remote` reaches the other nodes.
    pub fn with_remote(
        config: CommandsConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        remote: Option<Arc<dyn Remote>>,
    ) -> (Commands, Dispatcher) {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let config = Arc::new(config);
        let dispatcher = Dispatcher::new(
            registry.clone(),
            metrics.clone(),
            config.clone(),
            rx,
            events.clone(),
            remote.clone(),
        );
        let commands = Commands {
            tx,
            events,
            config,
            registry,
            metrics,
            remote,
        };
        (commands, dispatcher)
    }

    /// The settings.
    pub fn config(&self) -> &CommandsConfig {
        &self.config
    }

    /// Check and queue a command for `device`; it goes out at once when the device is
    /// reachable. Returns it as it stands after that first offer.
    pub async fn create(&self, device: &str, new: NewCommand) -> Result<Command, CommandsError> {
        let cmd = self.build(device, new)?;
        self.call(|resp| Request::Create { cmd, resp }).await?
    }

    /// Cancel a queued command (in cluster mode, another node's command is cancelled by
    /// that node).
    pub async fn cancel(&self, device: &str, id: &str) -> Result<Command, CommandsError> {
        match self.cancel_at(device, id).await? {
            Answer::Here(r) => r,
            Answer::Owner(owner) => match &self.remote {
                Some(remote) => remote.cancel(&owner, device, id).await,
                None => Err(CommandsError::NotFound(id.to_owned())),
            },
            Answer::Unknown => Err(CommandsError::NotFound(id.to_owned())),
        }
    }

    /// A cancel that another node forwarded: answered here, never forwarded again.
    pub async fn cancel_forwarded(&self, device: &str, id: &str) -> Result<Command, CommandsError> {
        match self.cancel_at(device, id).await? {
            Answer::Here(r) => r,
            Answer::Owner(_) | Answer::Unknown => Err(CommandsError::NotFound(id.to_owned())),
        }
    }

    async fn cancel_at(
        &self,
        device: &str,
        id: &str,
    ) -> Result<Answer<Result<Command, CommandsError>>, CommandsError> {
        let (device, id) = (device.to_owned(), id.to_owned());
        self.call(|resp| Request::Cancel { device, id, resp }).await
    }

    /// `device` confirmed receipt of command `id` (WS `received`).
    pub async fn received(&self, device: &str, id: &str) -> Result<(), ReplyRefused> {
        self.confirm(device, id, Confirm::Received, None).await
    }

    /// `device` answered command `id`.
    pub async fn reply(&self, device: &str, id: &str, reply: Reply) -> Result<(), ReplyRefused> {
        self.confirm(device, id, Confirm::Reply(reply), None).await
    }

    /// A receipt or reply that node `from` (the holder) forwarded: answered here, never
    /// forwarded again (so two nodes can never send one back and forth).
    pub async fn confirm_forwarded(
        &self,
        from: &str,
        device: &str,
        id: &str,
        what: Confirm,
    ) -> Result<(), ReplyRefused> {
        self.confirm(device, id, what, Some(from.to_owned())).await
    }

    /// `from`: the holder that forwarded it (`None`: the device is connected here, and
    /// the answer may be forwarded to the owner).
    async fn confirm(
        &self,
        device: &str,
        id: &str,
        what: Confirm,
        from: Option<String>,
    ) -> Result<(), ReplyRefused> {
        let forward = from.is_none();
        let (d, i) = (device.to_owned(), id.to_owned());
        let answer = self
            .call(|resp| Request::Confirm {
                device: d,
                id: i,
                what: what.clone(),
                from,
                resp,
            })
            .await
            .unwrap_or(Answer::Here(Err(ReplyRefused::ShuttingDown)));
        let owner = match answer {
            Answer::Here(r) => return r,
            Answer::Owner(owner) => Some(owner),
            // Neither this node's nor delivered by it: the row names the owner (the
            // registry is shared in cluster mode), e.g. after this node restarted.
            Answer::Unknown if forward => self.owner_of(device, id).await,
            Answer::Unknown => None,
        };
        match (owner, &self.remote) {
            (Some(owner), Some(remote)) if forward => {
                remote.confirm(&owner, device, id, what).await
            }
            _ => {
                self.metrics.emit(Event::CommandRefused {
                    device,
                    id,
                    reason: CommandRefusal::UnknownCommand,
                });
                Err(ReplyRefused::Unknown)
            }
        }
    }

    /// The node that owns `device`'s unfinished command `id`, when another node does.
    async fn owner_of(&self, device: &str, id: &str) -> Option<String> {
        let remote = self.remote.as_ref()?;
        let reg = self.registry.clone();
        let (d, i) = (device.to_owned(), id.to_owned());
        let row = tokio::task::spawn_blocking(move || reg.command_get(&d, &i))
            .await
            .ok()?
            .ok()??;
        (!row.state.is_final() && !row.node.is_empty() && row.node != remote.node())
            .then_some(row.node)
    }

    /// Another node (the owner) offers its command for `device`: handed to a
    /// transport here, or `None` when the device is not reachable here.
    pub async fn offer_here(&self, device: &str, offer: RemoteOffer) -> Option<Via> {
        let device = device.to_owned();
        self.call(|resp| Request::Offer {
            device,
            offer,
            resp,
        })
        .await
        .ok()
        .flatten()
    }

    /// Whether this node holds another owner's command `id` (delivered here, the
    /// device's reply not yet forwarded).
    pub async fn holds(&self, id: &str) -> bool {
        let id = id.to_owned();
        self.call(|resp| Request::Holds { id, resp })
            .await
            .unwrap_or(false)
    }

    /// Node `node` (a holder) lost this node's command `id` before the device
    /// confirmed it: it is queued again.
    pub async fn lost_at(&self, node: &str, device: &str, id: &str) {
        let _ = self
            .tx
            .send(Request::Lost {
                node: node.to_owned(),
                device: device.to_owned(),
                id: id.to_owned(),
            })
            .await;
    }

    /// Another node says `device` may be reachable there: its queued commands here are
    /// offered to it. Never waits (full queue: dropped, the retry tick covers it).
    pub fn reachable_at(&self, device: &str, node: &str) {
        let _ = self.tx.try_send(Request::ReachableAt {
            device: device.to_owned(),
            node: node.to_owned(),
        });
    }

    /// Another node's command changed state: told to this node's listeners (live
    /// streams, waiting requests) like a change here.
    pub fn changed_elsewhere(&self, cmd: Command) {
        let _ = self.events.send(Arc::new(cmd));
    }

    /// A WebSocket ingest connection of `device` opened: commands for it arrive on the
    /// receiver (at most [`WS_QUEUE`] buffered) until it is dropped.
    pub async fn attach_ws(&self, device: &str) -> mpsc::Receiver<Outgoing> {
        let (tx, rx) = mpsc::channel(WS_QUEUE);
        let _ = self
            .tx
            .send(Request::AttachWs {
                device: device.to_owned(),
                tx,
            })
            .await;
        rx
    }

    /// An HTTP long poll of `device`: the receiver gets its next command (delivered the
    /// moment it is sent), or closes when a newer poll of the device replaced this one
    /// or the gateway stops. Drop it to stop waiting.
    pub async fn poll(&self, device: &str) -> oneshot::Receiver<Outgoing> {
        let (tx, rx) = oneshot::channel();
        let _ = self
            .tx
            .send(Request::Poll {
                device: device.to_owned(),
                tx,
            })
            .await;
        rx
    }

    /// A hint that `device` may be reachable now (an MQTT device subscribed to its
    /// command topic). Never waits: when the queue is full the hint is dropped, and the
    /// dispatcher's once-a-second retry offers the command anyway.
    pub fn reachable(&self, device: &str) {
        let _ = self.tx.try_send(Request::Reachable {
            device: device.to_owned(),
        });
    }

    /// Every state change from now on (the live streams and `?wait` listen).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Command>> {
        self.events.subscribe()
    }

    async fn call<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, CommandsError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(request(tx))
            .await
            .map_err(|_| CommandsError::ShuttingDown)?;
        rx.await.map_err(|_| CommandsError::ShuttingDown)
    }

    /// Validate a new command and give it an id and its deadlines.
    fn build(&self, device: &str, new: NewCommand) -> Result<Command, CommandsError> {
        let invalid = |field, detail: String| CommandsError::Invalid { field, detail };
        fluxgate_proto::validate_metric_name(&new.name)
            .map_err(|e| invalid("name", format!("{e} (names are [A-Za-z0-9_.-]{{1,64}})")))?;
        let params = new.params.unwrap_or_else(|| serde_json::json!({}));
        if !params.is_object() {
            return Err(invalid("params", "must be a JSON object".into()));
        }
        let size = params.to_string().len();
        if size > MAX_PARAMS_BYTES {
            return Err(invalid(
                "params",
                format!("{size} bytes serialised; at most {MAX_PARAMS_BYTES}"),
            ));
        }
        let max = self.config.max_ttl;
        let timeout = new.timeout.unwrap_or(self.config.default_timeout);
        if timeout.is_zero() || timeout > max {
            return Err(invalid(
                "timeout",
                format!(
                    "must be more than 0 and at most {} (commands.max_ttl)",
                    humantime::format_duration(max)
                ),
            ));
        }
        let ttl = new.ttl.unwrap_or(self.config.default_ttl);
        if ttl > max {
            return Err(invalid(
                "ttl",
                format!(
                    "must be at most {} (commands.max_ttl)",
                    humantime::format_duration(max)
                ),
            ));
        }
        let id = new_id().map_err(|e| invalid("id", e))?;
        Ok(Command {
            seq: 0,
            id,
            device: device.to_owned(),
            name: new.name,
            params,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            state: CommandState::Queued,
            created_ms: now_ms(),
            sent_ms: None,
            delivered_ms: None,
            finished_ms: None,
            result: None,
            error: None,
            node: String::new(),
        })
    }
}

/// A new command id: 12 characters of base64url (72 random bits), safe in URLs and
/// MQTT topics.
fn new_id() -> Result<String, String> {
    use base64::Engine as _;
    let mut bytes = [0u8; 9];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests;
