//! Commands across nodes over NATS: [`NatsRoute`] is the command component's
//! [`Remote`] port (what this node asks of others), [`CommandRelay`] the component that
//! answers other nodes' requests with the local [`Commands`] handle, feeds their state
//! changes into the local listeners, and publishes this node's.
//!
//! Subjects (`subject`): requests to node `n` on `fluxgate.commands.{n}` (NATS
//! request/reply, JSON, each answered within [`REQUEST_TIMEOUT`] or counted as failed);
//! state changes on `fluxgate.command_events` and reachability notices on
//! `fluxgate.command_reachable` (plain publish: at most once, which is what live
//! streams promise; `?wait` is answered by the owner, whose own changes never travel).
//!
//! Bounds and full-policies: outgoing changes and notices wait in one queue of
//! [`PUBLISH_QUEUE`] (full: dropped, counted `event_dropped`); requests from other
//! nodes are served [`MAX_SERVING`] at a time (more wait in the NATS subscription, whose
//! own bound drops the excess as a slow consumer, after which the asking node counts a
//! failed request and retries or answers the device `unavailable`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::kv::Store;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{presence, subject};
use crate::commands::{
    Commands, CommandsError, Confirm, Offered, Remote, RemoteFuture, RemoteOffer, ReplyRefused, Via,
};
use crate::model::{Command, CommandState, Outgoing, Reply};
use crate::observe::{CommandRouteFailure, Event, Metrics};
use crate::registry::Registry;

/// How long a request to another node may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// State changes and reachability notices waiting to be published.
pub const PUBLISH_QUEUE: usize = 4096;
/// Requests of other nodes served at once.
pub const MAX_SERVING: usize = 64;

/// A request to a node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// From the owner: deliver this if the device is connected here.
    Offer {
        owner: String,
        device: String,
        id: String,
        name: String,
        params: serde_json::Value,
        timeout_ms: u64,
    },
    /// From a holder: the device confirmed receipt (no `reply`) or answered.
    Confirm {
        from: String,
        device: String,
        id: String,
        reply: Option<WireReply>,
    },
    /// From a holder: its transport lost the command.
    Lost {
        from: String,
        device: String,
        id: String,
    },
    /// From the owner: do you still hold this command (taken, not yet confirmed)?
    Holding { id: String },
    /// From any node: an operator cancels the command.
    Cancel { device: String, id: String },
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
enum Answer {
    /// An offer was taken (`via`: push, ws, poll).
    Taken { via: String },
    /// An offer was not taken.
    NotTaken,
    /// Done (a confirmation recorded, a loss noted).
    Ok,
    /// A confirmation refused: `unknown`, `not_sent`, `unavailable`.
    Refused { reason: String },
    /// Whether the command is held here.
    Holds { held: bool },
    /// A cancel done: the command as it stands.
    Cancelled { command: Box<WireCommand> },
    /// A cancel refused: `not_found`, `conflict` (with the state), `unavailable`.
    CancelRefused {
        reason: String,
        state: Option<String>,
    },
}

/// A reply on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    result: Option<serde_json::Value>,
    error: Option<String>,
}

/// A command on the wire (state changes, cancel answers).
#[derive(Debug, Serialize, Deserialize)]
struct WireCommand {
    seq: i64,
    id: String,
    device: String,
    name: String,
    params: serde_json::Value,
    timeout_ms: u64,
    ttl_ms: u64,
    state: String,
    created_ms: u64,
    sent_ms: Option<u64>,
    delivered_ms: Option<u64>,
    finished_ms: Option<u64>,
    result: Option<serde_json::Value>,
    error: Option<String>,
    node: String,
}

impl From<&Command> for WireCommand {
    fn from(c: &Command) -> Self {
        WireCommand {
            seq: c.seq,
            id: c.id.clone(),
            device: c.device.clone(),
            name: c.name.clone(),
            params: c.params.clone(),
            timeout_ms: c.timeout_ms,
            ttl_ms: c.ttl_ms,
            state: c.state.as_str().to_owned(),
            created_ms: c.created_ms,
            sent_ms: c.sent_ms,
            delivered_ms: c.delivered_ms,
            finished_ms: c.finished_ms,
            result: c.result.clone(),
            error: c.error.clone(),
            node: c.node.clone(),
        }
    }
}

impl WireCommand {
    fn into_command(self) -> Option<Command> {
        Some(Command {
            seq: self.seq,
            id: self.id,
            device: self.device,
            name: self.name,
            params: self.params,
            timeout_ms: self.timeout_ms,
            ttl_ms: self.ttl_ms,
            state: CommandState::parse(&self.state)?,
            created_ms: self.created_ms,
            sent_ms: self.sent_ms,
            delivered_ms: self.delivered_ms,
            finished_ms: self.finished_ms,
            result: self.result,
            error: self.error,
            node: self.node,
        })
    }
}

/// A reachability notice on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Reachable {
    device: String,
    node: String,
}

/// Something for the relay to publish.
enum Outbound {
    Changed(Box<WireCommand>),
    Reachable(String),
}

/// The [`Remote`] port over NATS (built by `app` in cluster mode).
pub struct NatsRoute {
    client: Client,
    node_id: String,
    presence: Store,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    outbound: mpsc::Sender<Outbound>,
}

/// The other half of [`NatsRoute`]: what it queued for publishing.
pub struct Outbox(mpsc::Receiver<Outbound>);

impl NatsRoute {
    /// The port, and the queue its changes wait in for the [`CommandRelay`].
    pub fn new(
        client: Client,
        node_id: String,
        presence: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (NatsRoute, Outbox) {
        let (outbound, rx) = mpsc::channel(PUBLISH_QUEUE);
        let route = NatsRoute {
            client,
            node_id,
            presence,
            registry,
            metrics,
            outbound,
        };
        (route, Outbox(rx))
    }

    /// Queue for publishing; full: dropped and counted.
    fn publish(&self, what: Outbound, id: &str) {
        if self.outbound.try_send(what).is_err() {
            self.metrics.emit(Event::CommandRouteFailed {
                id,
                node: "",
                reason: CommandRouteFailure::EventDropped,
            });
        }
    }
}

/// Send `request` to `node` and read its answer; `None` (counted with `reason`) when
/// it did not come.
async fn ask(
    client: &Client,
    metrics: &Metrics,
    node: &str,
    request: &Request,
    id: &str,
    reason: CommandRouteFailure,
) -> Option<Answer> {
    let failed = |detail: String| {
        tracing::debug!(node, id, detail, "command request failed");
        metrics.emit(Event::CommandRouteFailed { id, node, reason });
        None
    };
    let body = match serde_json::to_vec(request) {
        Ok(b) => b,
        Err(e) => return failed(e.to_string()),
    };
    let sent = client.request(subject::commands(node), body.into());
    let msg = match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
        Ok(Ok(msg)) => msg,
        Ok(Err(e)) => return failed(e.to_string()),
        Err(_) => return failed("no answer in time".to_owned()),
    };
    match serde_json::from_slice::<Answer>(&msg.payload) {
        Ok(a) => Some(a),
        Err(e) => {
            metrics.emit(Event::CommandRouteFailed {
                id,
                node,
                reason: CommandRouteFailure::BadMessage,
            });
            tracing::debug!(node, id, error = %e, "unreadable answer");
            None
        }
    }
}

/// Run `f` as its own task, so that the port's futures are `Sync` whatever the NATS
/// client's are; `or` when the task is gone (the runtime stops).
fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
    or: fn() -> T,
) -> RemoteFuture<T> {
    let task = tokio::spawn(f);
    Box::pin(async move { task.await.unwrap_or_else(|_| or()) })
}

impl Remote for NatsRoute {
    fn node(&self) -> &str {
        &self.node_id
    }

    fn offer(
        &self,
        device: &str,
        holder: Option<&str>,
        offer: RemoteOffer,
    ) -> Option<RemoteFuture<Offered>> {
        // Only a device that some node reports connected is worth asking about.
        if holder.is_none() && !self.registry.get(device).is_some_and(|d| d.online) {
            return None;
        }
        let (client, bucket, metrics) = (
            self.client.clone(),
            self.presence.clone(),
            self.metrics.clone(),
        );
        let me = self.node_id.clone();
        let holder = holder.map(str::to_owned);
        let device = device.to_owned();
        Some(detached(
            async move {
                let node = match holder {
                    Some(n) => n,
                    None => match presence::holder(&bucket, &device).await {
                        Some(n) => n,
                        None => return Offered::NotTaken,
                    },
                };
                if node == me {
                    return Offered::NotTaken;
                }
                let id = offer.out.id.clone();
                let request = Request::Offer {
                    owner: offer.owner,
                    device,
                    id: offer.out.id,
                    name: offer.out.name,
                    params: offer.out.params,
                    timeout_ms: offer.timeout_ms,
                };
                let answer = ask(
                    &client,
                    &metrics,
                    &node,
                    &request,
                    &id,
                    CommandRouteFailure::OfferFailed,
                )
                .await;
                match answer.and_then(|a| match a {
                    Answer::Taken { via } => Via::parse(&via),
                    _ => None,
                }) {
                    Some(via) => Offered::Taken { node, via },
                    None => Offered::NotTaken,
                }
            },
            || Offered::NotTaken,
        ))
    }

    fn reachable(&self, device: &str) {
        self.publish(Outbound::Reachable(device.to_owned()), "");
    }

    fn confirm(
        &self,
        owner: &str,
        device: &str,
        id: &str,
        what: Confirm,
    ) -> RemoteFuture<Result<(), ReplyRefused>> {
        let reply = match what {
            Confirm::Received => None,
            Confirm::Reply(Reply::Ok(result)) => Some(WireReply {
                ok: true,
                result: Some(result),
                error: None,
            }),
            Confirm::Reply(Reply::Err(error)) => Some(WireReply {
                ok: false,
                result: None,
                error: Some(error),
            }),
        };
        let request = Request::Confirm {
            from: self.node_id.clone(),
            device: device.to_owned(),
            id: id.to_owned(),
            reply,
        };
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        let (owner, id) = (owner.to_owned(), id.to_owned());
        detached(
            async move {
                let answer = ask(
                    &client,
                    &metrics,
                    &owner,
                    &request,
                    &id,
                    CommandRouteFailure::ForwardFailed,
                )
                .await;
                match answer {
                    Some(Answer::Ok) => Ok(()),
                    Some(Answer::Refused { reason }) => Err(match reason.as_str() {
                        "unknown" => ReplyRefused::Unknown,
                        "not_sent" => ReplyRefused::NotSent,
                        _ => ReplyRefused::OwnerUnreachable,
                    }),
                    _ => Err(ReplyRefused::OwnerUnreachable),
                }
            },
            || Err(ReplyRefused::ShuttingDown),
        )
    }

    fn holding(&self, holder: &str, id: &str) -> RemoteFuture<bool> {
        let request = Request::Holding { id: id.to_owned() };
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        let (holder, id) = (holder.to_owned(), id.to_owned());
        detached(
            async move {
                let Ok(body) = serde_json::to_vec(&request) else {
                    return true;
                };
                let sent = client.request(subject::commands(&holder), body.into());
                match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
                    Ok(Ok(msg)) => match serde_json::from_slice::<Answer>(&msg.payload) {
                        Ok(Answer::Holds { held }) => held,
                        _ => true,
                    },
                    // Nobody serves the holder's subject: it is gone, and its
                    // connection to the device with it.
                    Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => false,
                    Ok(Err(_)) | Err(_) => {
                        metrics.emit(Event::CommandRouteFailed {
                            id: &id,
                            node: &holder,
                            reason: CommandRouteFailure::OfferFailed,
                        });
                        true
                    }
                }
            },
            || true,
        )
    }

    fn lost(&self, owner: &str, device: &str, id: &str) -> RemoteFuture<()> {
        let request = Request::Lost {
            from: self.node_id.clone(),
            device: device.to_owned(),
            id: id.to_owned(),
        };
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        let (owner, id) = (owner.to_owned(), id.to_owned());
        detached(
            async move {
                ask(
                    &client,
                    &metrics,
                    &owner,
                    &request,
                    &id,
                    CommandRouteFailure::ForwardFailed,
                )
                .await;
            },
            || (),
        )
    }

    fn cancel(
        &self,
        owner: &str,
        device: &str,
        id: &str,
    ) -> RemoteFuture<Result<Command, CommandsError>> {
        let request = Request::Cancel {
            device: device.to_owned(),
            id: id.to_owned(),
        };
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        let (owner, id) = (owner.to_owned(), id.to_owned());
        detached(
            async move {
                let unreachable = || CommandsError::OwnerUnreachable(id.clone());
                let answer = ask(
                    &client,
                    &metrics,
                    &owner,
                    &request,
                    &id,
                    CommandRouteFailure::ForwardFailed,
                )
                .await;
                match answer {
                    Some(Answer::Cancelled { command }) => {
                        (*command).into_command().ok_or_else(unreachable)
                    }
                    Some(Answer::CancelRefused { reason, state }) => {
                        match (
                            reason.as_str(),
                            state.as_deref().and_then(CommandState::parse),
                        ) {
                            ("not_found", _) => Err(CommandsError::NotFound(id.clone())),
                            ("conflict", Some(state)) => Err(CommandsError::Conflict {
                                id: id.clone(),
                                state,
                            }),
                            _ => Err(unreachable()),
                        }
                    }
                    _ => Err(unreachable()),
                }
            },
            || Err(CommandsError::ShuttingDown),
        )
    }

    fn changed(&self, cmd: &Command) {
        self.publish(Outbound::Changed(Box::new(WireCommand::from(cmd))), &cmd.id);
    }
}

/// The relay component (see the module docs).
pub struct CommandRelay {
    /// The NATS connection.
    pub client: Client,
    /// This node's id.
    pub node_id: String,
    /// The local command component.
    pub commands: Commands,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl CommandRelay {
    /// Serve until shutdown. `outbox` is the [`NatsRoute`]'s queue.
    pub async fn run(self, outbox: Outbox, shutdown: CancellationToken) {
        let Outbox(mut outbox) = outbox;
        let subscribed = async {
            Ok::<_, async_nats::SubscribeError>((
                self.client
                    .subscribe(subject::commands(&self.node_id))
                    .await?,
                self.client.subscribe(subject::COMMAND_EVENTS).await?,
                self.client.subscribe(subject::COMMAND_REACHABLE).await?,
            ))
        };
        let (mut requests, mut events, mut reachable) = match subscribed.await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to the command subjects: commands stay on this node");
                return;
            }
        };
        let mut serving = FuturesUnordered::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(()) = serving.next(), if !serving.is_empty() => {}
                msg = requests.next(), if serving.len() < MAX_SERVING => {
                    let Some(msg) = msg else { break };
                    serving.push(self.serve(msg));
                }
                msg = events.next() => {
                    let Some(msg) = msg else { break };
                    self.heard_change(&msg.payload);
                }
                msg = reachable.next() => {
                    let Some(msg) = msg else { break };
                    match serde_json::from_slice::<Reachable>(&msg.payload) {
                        Ok(r) if r.node != self.node_id => self.commands.reachable_at(&r.device, &r.node),
                        Ok(_) => {}
                        Err(_) => self.bad_message(""),
                    }
                }
                out = outbox.recv() => {
                    let Some(out) = out else { break };
                    self.send(out).await;
                }
            }
        }
    }

    fn bad_message(&self, node: &str) {
        self.metrics.emit(Event::CommandRouteFailed {
            id: "",
            node,
            reason: CommandRouteFailure::BadMessage,
        });
    }

    /// Publish a change or notice of this node.
    async fn send(&self, out: Outbound) {
        let (subject, body, id) = match out {
            Outbound::Changed(c) => {
                let id = c.id.clone();
                (subject::COMMAND_EVENTS, serde_json::to_vec(&*c), id)
            }
            Outbound::Reachable(device) => (
                subject::COMMAND_REACHABLE,
                serde_json::to_vec(&Reachable {
                    device,
                    node: self.node_id.clone(),
                }),
                String::new(),
            ),
        };
        let sent = match body {
            Ok(body) => self.client.publish(subject, body.into()).await.is_ok(),
            Err(_) => false,
        };
        if !sent {
            self.metrics.emit(Event::CommandRouteFailed {
                id: &id,
                node: "",
                reason: CommandRouteFailure::EventDropped,
            });
        }
    }

    /// Another node's state change: told to the local listeners.
    fn heard_change(&self, payload: &[u8]) {
        match serde_json::from_slice::<WireCommand>(payload)
            .ok()
            .and_then(WireCommand::into_command)
        {
            Some(c) if c.node != self.node_id => self.commands.changed_elsewhere(c),
            Some(_) => {}
            None => self.bad_message(""),
        }
    }

    /// Answer one request of another node.
    fn serve(&self, msg: async_nats::Message) -> impl std::future::Future<Output = ()> + use<> {
        let (client, commands, metrics) = (
            self.client.clone(),
            self.commands.clone(),
            self.metrics.clone(),
        );
        async move {
            let Some(reply_to) = msg.reply.clone() else {
                return;
            };
            let answer = match serde_json::from_slice::<Request>(&msg.payload) {
                Ok(request) => answer(&commands, request).await,
                Err(_) => {
                    metrics.emit(Event::CommandRouteFailed {
                        id: "",
                        node: "",
                        reason: CommandRouteFailure::BadMessage,
                    });
                    return;
                }
            };
            if let Ok(body) = serde_json::to_vec(&answer) {
                // The asker counts an answer that does not arrive.
                let _ = client.publish(reply_to, body.into()).await;
            }
        }
    }
}

/// What this node answers to `request`.
async fn answer(commands: &Commands, request: Request) -> Answer {
    match request {
        Request::Offer {
            owner,
            device,
            id,
            name,
            params,
            timeout_ms,
        } => {
            let offer = RemoteOffer {
                owner,
                out: Outgoing { id, name, params },
                timeout_ms,
            };
            match commands.offer_here(&device, offer).await {
                Some(via) => Answer::Taken {
                    via: via.as_str().to_owned(),
                },
                None => Answer::NotTaken,
            }
        }
        Request::Confirm {
            from,
            device,
            id,
            reply,
        } => {
            let what = match reply {
                None => Confirm::Received,
                Some(r) => match Reply::from_parts(r.ok, r.result, r.error) {
                    Ok(reply) => Confirm::Reply(reply),
                    Err(_) => {
                        return Answer::Refused {
                            reason: "malformed".to_owned(),
                        };
                    }
                },
            };
            match commands.confirm_forwarded(&from, &device, &id, what).await {
                Ok(()) => Answer::Ok,
                Err(e) => Answer::Refused {
                    reason: match e {
                        ReplyRefused::Unknown => "unknown",
                        ReplyRefused::NotSent => "not_sent",
                        ReplyRefused::Malformed => "malformed",
                        ReplyRefused::ShuttingDown | ReplyRefused::OwnerUnreachable => {
                            "unavailable"
                        }
                    }
                    .to_owned(),
                },
            }
        }
        Request::Holding { id } => Answer::Holds {
            held: commands.holds(&id).await,
        },
        Request::Lost { from, device, id } => {
            commands.lost_at(&from, &device, &id).await;
            Answer::Ok
        }
        Request::Cancel { device, id } => match commands.cancel_forwarded(&device, &id).await {
            Ok(c) => Answer::Cancelled {
                command: Box::new(WireCommand::from(&c)),
            },
            Err(e) => {
                let (reason, state) = match e {
                    CommandsError::NotFound(_) | CommandsError::DeviceNotFound(_) => {
                        ("not_found", None)
                    }
                    CommandsError::Conflict { state, .. } => ("conflict", Some(state.as_str())),
                    _ => ("unavailable", None),
                };
                Answer::CancelRefused {
                    reason: reason.to_owned(),
                    state: state.map(str::to_owned),
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_on_the_wire() {
        let c = Command {
            seq: 7,
            id: "abc".into(),
            device: "d.1".into(),
            name: "reboot".into(),
            params: serde_json::json!({"a": 1}),
            timeout_ms: 1000,
            ttl_ms: 2000,
            state: CommandState::Replied,
            created_ms: 1,
            sent_ms: Some(2),
            delivered_ms: Some(3),
            finished_ms: Some(4),
            result: Some(serde_json::json!([1, 2])),
            error: None,
            node: "a".into(),
        };
        let text = serde_json::to_vec(&WireCommand::from(&c)).unwrap_or_default();
        let back = serde_json::from_slice::<WireCommand>(&text)
            .ok()
            .and_then(WireCommand::into_command);
        assert_eq!(back, Some(c));
        // An unknown state is refused, not guessed.
        let bad = String::from_utf8_lossy(&text).replace("\"replied\"", "\"gone\"");
        let parsed = serde_json::from_str::<WireCommand>(&bad)
            .ok()
            .and_then(WireCommand::into_command);
        assert_eq!(parsed, None);
    }

    #[test]
    fn requests_are_tagged_by_op() {
        let r = Request::Cancel {
            device: "d".into(),
            id: "c".into(),
        };
        let text = serde_json::to_string(&r).unwrap_or_default();
        assert_eq!(text, r#"{"op":"cancel","device":"d","id":"c"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }
}
