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

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

pub use dispatcher::Dispatcher;
pub use error::{CommandsError, ReplyRefused};

use crate::config::CommandsConfig;
use crate::model::{Command, CommandState, Outgoing, Reply, now_ms};
use crate::observe::Metrics;
use crate::registry::Registry;
use dispatcher::Request;

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
}

impl Commands {
    /// The handle and the dispatcher it talks to (started by `app`).
    pub fn new(
        config: CommandsConfig,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (Commands, Dispatcher) {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let config = Arc::new(config);
        let dispatcher = Dispatcher::new(registry, metrics, config.clone(), rx, events.clone());
        (Commands { tx, events, config }, dispatcher)
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

    /// Cancel a queued command.
    pub async fn cancel(&self, device: &str, id: &str) -> Result<Command, CommandsError> {
        let (device, id) = (device.to_owned(), id.to_owned());
        self.call(|resp| Request::Cancel { device, id, resp })
            .await?
    }

    /// `device` confirmed receipt of command `id` (WS `received`).
    pub async fn received(&self, device: &str, id: &str) -> Result<(), ReplyRefused> {
        let (device, id) = (device.to_owned(), id.to_owned());
        self.call(|resp| Request::Received { device, id, resp })
            .await
            .unwrap_or(Err(ReplyRefused::ShuttingDown))
    }

    /// `device` answered command `id`.
    pub async fn reply(&self, device: &str, id: &str, reply: Reply) -> Result<(), ReplyRefused> {
        let (device, id) = (device.to_owned(), id.to_owned());
        self.call(|resp| Request::Reply {
            device,
            id,
            reply,
            resp,
        })
        .await
        .unwrap_or(Err(ReplyRefused::ShuttingDown))
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
