//! [`Dispatcher`]: the one task that owns every unfinished command. Requests (create,
//! cancel, receipts, replies, devices becoming reachable) arrive on one bounded queue
//! and are handled one at a time, so a command's steps are ordered without locks; each
//! step is committed to the registry database before an operator hears of it (the
//! answer to the API, the live event). A device may get a command before its `sent` is
//! committed: a crash in between sends it again after the restart (at least once).
//!
//! Delivery, per device, in creation order and one command at a time: the head of the
//! device's queue is offered to the push transports (MQTT), then to the device's open
//! WebSocket ingest connections, then to a waiting HTTP long poll; the first that takes
//! it makes it `sent`. The next command goes once the device confirmed this one
//! (`delivered`), or it finished. A loss (the MQTT connection ended before the PUBACK,
//! the WebSocket closed before `received`) puts it back at the head of the queue.
//! Nothing here waits for a device: MQTT outcomes are futures polled by the loop, WS
//! connections are checked for closing by the once-a-second tick, which also retries
//! devices with queued commands (a reachability hint may have been dropped).
//!
//! Cluster mode (with a [`Remote`] port): a command this node owns and cannot deliver
//! itself is offered to the node that holds the device (one offer at a time per device,
//! at most [`MAX_OFFERS`] in the air; the device counts as busy meanwhile, and the
//! command turns `sent` when the holder took it). As the holder, this dispatcher hands
//! other owners' commands to its transports and remembers them (at most [`MAX_HELD`];
//! full: the offer is declined, counted) until the device replied, the transport lost
//! it, or the command's timeout passed, so that the device's receipt, reply or loss is
//! forwarded to the owner.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::{CommandsError, ReplyRefused};
use super::expiry::{Deadlines, instant_of};
use super::machine::{self, Step};
use super::remote::{Confirm, Offered, Remote, RemoteFuture, RemoteOffer, Via};
use crate::config::CommandsConfig;
use crate::model::{Command, CommandState, Downlink, Outgoing, now_ms};
use crate::observe::{CommandRefusal, CommandRouteFailure, Event, Metrics};
use crate::registry::{Registry, RegistryError};

/// How often queued commands are offered again and WS deliveries checked for a closed
/// connection.
const TICK: Duration = Duration::from_secs(1);

/// Offers to other nodes waiting for their answer; more devices wait for a later tick.
pub const MAX_OFFERS: usize = 256;
/// Other owners' commands this node delivered and still forwards for.
pub const MAX_HELD: usize = 16 * 1024;
/// How long a command sent through another node may stay unconfirmed before the owner
/// asks whether that node still holds it (a holder that stopped cannot report the loss).
const PROBE_AFTER: Duration = Duration::from_secs(5);
/// How long past its timeout a held delivery is remembered (a late reply is still
/// forwarded, and the owner decides).
const HELD_GRACE: Duration = Duration::from_secs(60);

/// An answer that another node may have to give.
pub(super) enum Answer<T> {
    /// This node's answer.
    Here(T),
    /// The command belongs to this node (the owner): ask it.
    Owner(String),
    /// Not a command of this node, nor one it delivered (cluster mode only): the
    /// registry row may name its owner.
    Unknown,
}

/// A request to the dispatcher.
pub(super) enum Request {
    Create {
        cmd: Command,
        resp: oneshot::Sender<Result<Command, CommandsError>>,
    },
    Cancel {
        device: String,
        id: String,
        resp: oneshot::Sender<Answer<Result<Command, CommandsError>>>,
    },
    Confirm {
        device: String,
        id: String,
        what: Confirm,
        /// The holder that forwarded it (`None`: the device is connected here).
        from: Option<String>,
        resp: oneshot::Sender<Answer<Result<(), ReplyRefused>>>,
    },
    /// From another node (the owner): deliver this command if its device is connected
    /// here.
    Offer {
        device: String,
        offer: RemoteOffer,
        resp: oneshot::Sender<Option<Via>>,
    },
    /// From another node (an owner): does this node hold command `id`?
    Holds {
        id: String,
        resp: oneshot::Sender<bool>,
    },
    /// From another node: `device` may be reachable there now.
    ReachableAt {
        device: String,
        node: String,
    },
    /// From another node (the holder): its transport lost command `id`.
    Lost {
        node: String,
        device: String,
        id: String,
    },
    AttachWs {
        device: String,
        tx: mpsc::Sender<Outgoing>,
    },
    Poll {
        device: String,
        tx: oneshot::Sender<Outgoing>,
    },
    Reachable {
        device: String,
    },
}

/// How an in-flight command went out.
enum Route {
    /// A push transport; its outcome future is in `outcomes`.
    Push,
    /// A WebSocket connection: lost if it closes before `received` or a reply.
    Ws(mpsc::Sender<Outgoing>),
    /// Another node's transport (the holder, named): it reports a loss.
    Remote(String),
}

/// Another owner's command that this node delivered (see the module docs).
struct Held {
    owner: String,
    device: String,
    /// Which delivery this is (an outcome of an earlier one is stale).
    token: u64,
    /// A WS delivery: lost if the connection closes before the receipt.
    ws: Option<mpsc::Sender<Outgoing>>,
    /// The device confirmed it (nothing is lost any more).
    received: bool,
    /// Forgotten after this.
    until: Instant,
}

struct Entry {
    cmd: Command,
    /// Sends so far; an outcome of an earlier send is stale.
    attempt: u32,
    /// The deadline currently armed (`ttl` while queued, `timeout` once sent).
    deadline: Instant,
    /// When `ttl` runs out (a lost command waits again until then).
    ttl_deadline: Instant,
    route: Option<Route>,
}

#[derive(Default)]
struct DeviceQueue {
    /// Queued commands, oldest first.
    queued: VecDeque<String>,
    /// The command sent and not yet confirmed.
    in_flight: Option<String>,
    /// The command offered to another node, waiting for its answer.
    offering: Option<String>,
    /// Unfinished commands (queued, sent, delivered): the `max_queued` count.
    open: usize,
}

type OutcomeFuture = Pin<Box<dyn Future<Output = (String, u32, bool)> + Send + Sync>>;
type OfferFuture = Pin<Box<dyn Future<Output = (String, String, u32, Offered)> + Send + Sync>>;
type HeldFuture = Pin<Box<dyn Future<Output = (String, u64, bool)> + Send + Sync>>;
type ProbeFuture = Pin<Box<dyn Future<Output = (String, u32, bool)> + Send + Sync>>;

/// The command component's task (see the module docs). Built with
/// [`Commands::new`](super::Commands::new), started by `app` with [`Dispatcher::run`].
pub struct Dispatcher {
    pub(super) registry: Arc<Registry>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) config: Arc<CommandsConfig>,
    pub(super) requests: mpsc::Receiver<Request>,
    pub(super) events: broadcast::Sender<Arc<Command>>,
    entries: HashMap<String, Entry>,
    devices: HashMap<String, DeviceQueue>,
    deadlines: Deadlines,
    /// Open WebSocket ingest connections per device (closed ones are dropped when
    /// seen).
    ws: HashMap<String, Vec<mpsc::Sender<Outgoing>>>,
    /// The waiting HTTP long poll per device (a newer poll replaces an older one).
    pollers: HashMap<String, oneshot::Sender<Outgoing>>,
    outcomes: FuturesUnordered<OutcomeFuture>,
    /// Cluster mode: the other nodes.
    remote: Option<Arc<dyn Remote>>,
    /// Offers to other nodes, waiting for their answers (at most [`MAX_OFFERS`]).
    offers: FuturesUnordered<OfferFuture>,
    /// Other owners' commands delivered here, by id (at most [`MAX_HELD`]).
    held: HashMap<String, Held>,
    /// Push outcomes of held deliveries.
    held_outcomes: FuturesUnordered<HeldFuture>,
    /// Questions to holders whether they still hold a command (at most [`MAX_OFFERS`]).
    probes: FuturesUnordered<ProbeFuture>,
    /// Receipts and losses on their way to owners (one per held delivery at most).
    notices: FuturesUnordered<RemoteFuture<()>>,
    next_token: u64,
}

impl Dispatcher {
    pub(super) fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        config: Arc<CommandsConfig>,
        requests: mpsc::Receiver<Request>,
        events: broadcast::Sender<Arc<Command>>,
        remote: Option<Arc<dyn Remote>>,
    ) -> Self {
        Self {
            registry,
            metrics,
            config,
            requests,
            events,
            entries: HashMap::new(),
            devices: HashMap::new(),
            deadlines: Deadlines::default(),
            ws: HashMap::new(),
            pollers: HashMap::new(),
            outcomes: FuturesUnordered::new(),
            remote,
            offers: FuturesUnordered::new(),
            held: HashMap::new(),
            held_outcomes: FuturesUnordered::new(),
            notices: FuturesUnordered::new(),
            probes: FuturesUnordered::new(),
            next_token: 0,
        }
    }

    /// This node's id as an owner (empty on a single node).
    fn node(&self) -> &str {
        self.remote.as_ref().map_or("", |r| r.node())
    }

    /// Load the unfinished commands, then serve requests until shutdown (or until every
    /// handle is gone). `downlinks` are the push transports, tried in order.
    pub async fn run(mut self, downlinks: Vec<Arc<dyn Downlink>>, shutdown: CancellationToken) {
        // Subscribed before loading, so no deletion falls in between.
        let mut revocations = self.registry.revocations();
        self.load().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.deadlines.next();
            // Biased: a device deletion (already broadcast when a later request about
            // that id was sent) is handled before the requests queued after it.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                r = revocations.recv() => match r {
                    Ok(device) => self.purge_deleted(Some(&device)).await,
                    // Missed revocations: look at every device with commands.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.purge_deleted(None).await,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                r = self.requests.recv() => match r {
                    Some(r) => self.request(r, &downlinks).await,
                    None => break,
                },
                Some((id, attempt, acked)) = self.outcomes.next(), if !self.outcomes.is_empty() => {
                    self.outcome(&id, attempt, acked, &downlinks).await;
                }
                Some((device, id, attempt, offered)) = self.offers.next(), if !self.offers.is_empty() => {
                    self.offered(&device, &id, attempt, offered, &downlinks).await;
                }
                Some((id, token, acked)) = self.held_outcomes.next(), if !self.held_outcomes.is_empty() => {
                    self.held_outcome(&id, token, acked);
                }
                Some(()) = self.notices.next(), if !self.notices.is_empty() => {}
                Some((id, attempt, held)) = self.probes.next(), if !self.probes.is_empty() => {
                    self.probed(&id, attempt, held, &downlinks).await;
                }
                () = sleep_until(next) => self.expire(&downlinks).await,
                _ = tick.tick() => self.retry(&downlinks).await,
            }
        }
    }

    /// The unfinished commands of the database: a command that was `sent` when the
    /// gateway stopped is queued again (its device may not have it; it carries its id
    /// for that reason), a `delivered` one waits for its reply until its timeout.
    async fn load(&mut self) {
        let reg = self.registry.clone();
        let node = self.node().to_owned();
        let open = match tokio::task::spawn_blocking(move || reg.commands_open(&node)).await {
            Ok(Ok(open)) => open,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot load the unfinished commands");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the unfinished commands");
                return;
            }
        };
        let (wall, now) = (now_ms(), Instant::now());
        for mut cmd in open {
            let ttl_deadline = instant_of(cmd.created_ms.saturating_add(cmd.ttl_ms), wall, now);
            if cmd.state == CommandState::Sent {
                let _ = machine::apply(&mut cmd, Step::Lost, wall);
                self.persist(&cmd).await;
            }
            let deadline = match cmd.state {
                CommandState::Delivered => instant_of(
                    cmd.sent_ms.unwrap_or(wall).saturating_add(cmd.timeout_ms),
                    wall,
                    now,
                ),
                _ => ttl_deadline,
            };
            let q = self.devices.entry(cmd.device.clone()).or_default();
            q.open += 1;
            if cmd.state == CommandState::Queued {
                q.queued.push_back(cmd.id.clone());
            }
            self.deadlines.arm(deadline, &cmd.id);
            self.entries.insert(
                cmd.id.clone(),
                Entry {
                    cmd,
                    attempt: 0,
                    deadline,
                    ttl_deadline,
                    route: None,
                },
            );
        }
    }

    async fn request(&mut self, r: Request, downlinks: &[Arc<dyn Downlink>]) {
        match r {
            Request::Create { cmd, resp } => {
                let device = cmd.device.clone();
                let result = match self.create(cmd).await {
                    Ok(created) => {
                        self.dispatch(&device, downlinks).await;
                        // Its state after the first offer (it may have gone out).
                        Ok(self
                            .entries
                            .get(&created.id)
                            .map_or(created, |e| e.cmd.clone()))
                    }
                    Err(e) => Err(e),
                };
                let _ = resp.send(result);
            }
            Request::Cancel { device, id, resp } => {
                let _ = resp.send(self.cancel(&device, &id).await);
            }
            Request::Confirm {
                device,
                id,
                what,
                from,
                resp,
            } => {
                if let Some(node) = from {
                    self.settle_offer(&device, &id, node, downlinks).await;
                }
                let r = if self
                    .entries
                    .get(&id)
                    .is_some_and(|e| e.cmd.device == device)
                {
                    let step = match what {
                        Confirm::Received => Step::Delivered,
                        Confirm::Reply(reply) => Step::Reply(reply),
                    };
                    Answer::Here(self.confirm(&device, &id, step, downlinks).await)
                } else {
                    self.confirm_held(&device, &id, &what)
                };
                let _ = resp.send(r);
            }
            Request::Holds { id, resp } => {
                // Held, confirmed or not: the device has it, so the owner must not send
                // it again because a forwarded receipt went missing.
                let _ = resp.send(self.held.contains_key(&id));
            }
            Request::Offer {
                device,
                offer,
                resp,
            } => {
                let _ = resp.send(self.offer_here(&device, offer, downlinks));
            }
            Request::Lost { node, device, id } => {
                self.settle_offer(&device, &id, node.clone(), downlinks)
                    .await;
                let by_it = self.entries.get(&id).is_some_and(|e| {
                    e.cmd.device == device
                        && matches!(&e.route, Some(Route::Remote(n)) if *n == node)
                });
                if by_it {
                    self.lost(&id).await;
                    self.dispatch(&device, downlinks).await;
                }
            }
            Request::AttachWs { device, tx } => {
                let conns = self.ws.entry(device.clone()).or_default();
                conns.retain(|c| !c.is_closed());
                conns.push(tx);
                self.dispatch(&device, downlinks).await;
                self.tell_reachable(&device);
            }
            Request::Poll { device, tx } => {
                // A newer poll of the same device replaces the older, which then
                // answers 204 at once: one waiting poll per device at most.
                self.pollers.insert(device.clone(), tx);
                self.dispatch(&device, downlinks).await;
                self.tell_reachable(&device);
            }
            Request::Reachable { device } => {
                self.dispatch(&device, downlinks).await;
                self.tell_reachable(&device);
            }
            Request::ReachableAt { device, node } => {
                let next = self
                    .devices
                    .get(&device)
                    .filter(|q| q.in_flight.is_none() && q.offering.is_none())
                    .and_then(|q| q.queued.front().cloned());
                if let Some(id) = next {
                    self.offer_remote(&device, &id, Some(&node));
                }
            }
        }
    }

    async fn create(&mut self, mut cmd: Command) -> Result<Command, CommandsError> {
        cmd.node = self.node().to_owned();
        let max = self.config.max_queued;
        let open = self.devices.get(&cmd.device).map_or(0, |q| q.open);
        if open >= max {
            self.metrics.emit(Event::CommandRefused {
                device: &cmd.device,
                id: &cmd.id,
                reason: CommandRefusal::QueueFull,
            });
            return Err(CommandsError::QueueFull {
                device: cmd.device,
                max,
            });
        }
        let reg = self.registry.clone();
        let keep = self.config.history;
        let c = cmd.clone();
        let seq = tokio::task::spawn_blocking(move || reg.command_insert(&c, keep))
            .await
            .map_err(|e| {
                CommandsError::Registry(RegistryError::Invalid {
                    field: "command".into(),
                    detail: e.to_string(),
                })
            })?
            .map_err(|e| match e {
                RegistryError::NotFound(_) => CommandsError::DeviceNotFound(cmd.device.clone()),
                e => CommandsError::Registry(e),
            })?;
        cmd.seq = seq;
        let now = Instant::now();
        let ttl_deadline = now + Duration::from_millis(cmd.ttl_ms);
        let q = self.devices.entry(cmd.device.clone()).or_default();
        q.open += 1;
        q.queued.push_back(cmd.id.clone());
        self.deadlines.arm(ttl_deadline, &cmd.id);
        let id = cmd.id.clone();
        self.changed(&cmd);
        let created = cmd.clone();
        self.entries.insert(
            id,
            Entry {
                cmd,
                attempt: 0,
                deadline: ttl_deadline,
                ttl_deadline,
                route: None,
            },
        );
        Ok(created)
    }

    async fn cancel(&mut self, device: &str, id: &str) -> Answer<Result<Command, CommandsError>> {
        let Some(entry) = self.entries.get_mut(id).filter(|e| e.cmd.device == device) else {
            // Finished (a conflict), another node's, or unknown: the database knows
            // which.
            let reg = self.registry.clone();
            let (d, i) = (device.to_owned(), id.to_owned());
            let found = tokio::task::spawn_blocking(move || reg.command_get(&d, &i))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            return match found {
                Some(c) if !c.state.is_final() && !c.node.is_empty() && c.node != self.node() => {
                    Answer::Owner(c.node)
                }
                Some(c) => Answer::Here(Err(CommandsError::Conflict {
                    id: c.id,
                    state: c.state,
                })),
                None => Answer::Here(Err(CommandsError::NotFound(id.to_owned()))),
            };
        };
        if let Err(e) = machine::apply(&mut entry.cmd, Step::Cancel, now_ms()) {
            return Answer::Here(Err(CommandsError::Conflict {
                id: id.to_owned(),
                state: e.from,
            }));
        }
        let cmd = entry.cmd.clone();
        if let Some(q) = self.devices.get_mut(device) {
            q.queued.retain(|c| c != id);
        }
        self.finish(&cmd).await;
        Answer::Here(Ok(cmd))
    }

    /// A receipt or reply for a command this node does not own: forwarded to its owner
    /// when this node delivered it; otherwise unknown here.
    fn confirm_held(
        &mut self,
        device: &str,
        id: &str,
        what: &Confirm,
    ) -> Answer<Result<(), ReplyRefused>> {
        let Some(held) = self.held.get_mut(id).filter(|h| h.device == device) else {
            if self.remote.is_some() {
                return Answer::Unknown;
            }
            self.metrics.emit(Event::CommandRefused {
                device,
                id,
                reason: CommandRefusal::UnknownCommand,
            });
            return Answer::Here(Err(ReplyRefused::Unknown));
        };
        let owner = held.owner.clone();
        match what {
            Confirm::Received => held.received = true,
            // The reply is the device's last word on it.
            Confirm::Reply(_) => {
                self.held.remove(id);
            }
        }
        Answer::Owner(owner)
    }

    /// Another owner's command for `device`, offered here: handed to the first local
    /// transport that takes it (push, WebSocket, long poll), and remembered.
    fn offer_here(
        &mut self,
        device: &str,
        offer: RemoteOffer,
        downlinks: &[Arc<dyn Downlink>],
    ) -> Option<Via> {
        let id = offer.out.id.clone();
        if self.held.len() >= MAX_HELD && !self.held.contains_key(&id) {
            self.metrics.emit(Event::CommandRouteFailed {
                id: &id,
                node: &offer.owner,
                reason: CommandRouteFailure::HeldFull,
            });
            return None;
        }
        let out = offer.out;
        let mut via = None;
        let mut ws = None;
        let token = self.next_token;
        for d in downlinks {
            if let Some(outcome) = d.offer(device, out.mqtt_payload()) {
                let id = id.clone();
                self.held_outcomes
                    .push(Box::pin(async move { (id, token, outcome.await) }));
                via = Some(Via::Push);
                break;
            }
        }
        if via.is_none()
            && let Some(conns) = self.ws.get_mut(device)
        {
            conns.retain(|c| !c.is_closed());
            for c in conns.iter() {
                if c.try_send(out.clone()).is_ok() {
                    via = Some(Via::Ws);
                    ws = Some(c.clone());
                    break;
                }
            }
        }
        if via.is_none()
            && let Some(poller) = self.pollers.remove(device)
            && poller.send(out).is_ok()
        {
            via = Some(Via::Poll);
        }
        let via = via?;
        self.next_token += 1;
        self.held.insert(
            id,
            Held {
                owner: offer.owner,
                device: device.to_owned(),
                token,
                ws,
                received: via == Via::Poll,
                until: Instant::now() + Duration::from_millis(offer.timeout_ms) + HELD_GRACE,
            },
        );
        Some(via)
    }

    /// The push outcome of a held delivery: the receipt or the loss goes to the owner.
    fn held_outcome(&mut self, id: &str, token: u64, acked: bool) {
        let Some(held) = self.held.get_mut(id).filter(|h| h.token == token) else {
            return;
        };
        let Some(remote) = self.remote.clone() else {
            return;
        };
        if acked {
            if held.received {
                return;
            }
            held.received = true;
            let f = remote.confirm(&held.owner, &held.device, id, Confirm::Received);
            self.notices.push(Box::pin(async move {
                let _ = f.await;
            }));
        } else if let Some(held) = self.held.remove(id) {
            self.notices
                .push(remote.lost(&held.owner, &held.device, id));
        }
    }

    /// Node `node` speaks of command `id` while its offer is still waiting for the
    /// answer (the device's receipt can overtake it): the offer was taken.
    async fn settle_offer(
        &mut self,
        device: &str,
        id: &str,
        node: String,
        downlinks: &[Arc<dyn Downlink>],
    ) {
        let offering = self
            .devices
            .get(device)
            .is_some_and(|q| q.offering.as_deref() == Some(id));
        let Some(attempt) = self
            .entries
            .get(id)
            .filter(|e| offering && e.cmd.state == CommandState::Queued)
            .map(|e| e.attempt + 1)
        else {
            return;
        };
        let taken = Offered::Taken {
            node,
            via: Via::Push,
        };
        self.offered(device, id, attempt, taken, downlinks).await;
    }

    /// The holder's answer to an offer of this node's command `id`.
    async fn offered(
        &mut self,
        device: &str,
        id: &str,
        attempt: u32,
        offered: Offered,
        downlinks: &[Arc<dyn Downlink>],
    ) {
        if let Some(q) = self.devices.get_mut(device)
            && q.offering.as_deref() == Some(id)
        {
            q.offering = None;
        }
        let current = self
            .entries
            .get(id)
            .is_some_and(|e| e.attempt + 1 == attempt && e.cmd.state == CommandState::Queued);
        // Taken after it was cancelled or expired meanwhile: the device may run it;
        // its reply is refused as unknown (see ARCHITECTURE "Commands across nodes").
        let Offered::Taken { node, via } = offered else {
            self.forget(device);
            return;
        };
        if !current {
            self.forget(device);
            return;
        }
        let now = now_ms();
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if machine::apply(&mut entry.cmd, Step::Send, now).is_err() {
            return;
        }
        entry.attempt = attempt;
        entry.route = Some(Route::Remote(node));
        entry.deadline = Instant::now() + Duration::from_millis(entry.cmd.timeout_ms);
        self.deadlines.arm(entry.deadline, id);
        let sent = entry.cmd.clone();
        let q = self.devices.entry(device.to_owned()).or_default();
        q.queued.retain(|c| c != id);
        q.in_flight = Some(id.to_owned());
        if via == Via::Poll {
            // As with a local long poll: the answer is the delivery.
            let Some(entry) = self.entries.get_mut(id) else {
                return;
            };
            let _ = machine::apply(&mut entry.cmd, Step::Delivered, now);
            let delivered = entry.cmd.clone();
            if let Some(q) = self.devices.get_mut(device) {
                q.in_flight = None;
            }
            self.persist(&delivered).await;
            self.changed(&sent);
            self.changed(&delivered);
            self.dispatch(device, downlinks).await;
            return;
        }
        self.persist(&sent).await;
        self.changed(&sent);
    }

    /// A receipt or a reply from `device` for command `id`.
    async fn confirm(
        &mut self,
        device: &str,
        id: &str,
        step: Step,
        downlinks: &[Arc<dyn Downlink>],
    ) -> Result<(), ReplyRefused> {
        let refused = |me: &Self, reason: ReplyRefused, counted: CommandRefusal| {
            me.metrics.emit(Event::CommandRefused {
                device,
                id,
                reason: counted,
            });
            Err(reason)
        };
        // Another device's command is unknown to this one: a device only ever sees
        // and answers its own commands.
        let Some(entry) = self.entries.get_mut(id).filter(|e| e.cmd.device == device) else {
            return refused(self, ReplyRefused::Unknown, CommandRefusal::UnknownCommand);
        };
        match machine::apply(&mut entry.cmd, step, now_ms()) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(_) => return refused(self, ReplyRefused::NotSent, CommandRefusal::NotSent),
        }
        entry.route = None;
        let cmd = entry.cmd.clone();
        let q = self.devices.entry(device.to_owned()).or_default();
        if q.in_flight.as_deref() == Some(id) {
            q.in_flight = None;
        }
        if cmd.state.is_final() {
            self.finish(&cmd).await;
        } else {
            self.persist(&cmd).await;
            self.changed(&cmd);
        }
        self.dispatch(device, downlinks).await;
        Ok(())
    }

    /// The outcome of a push delivery.
    async fn outcome(
        &mut self,
        id: &str,
        attempt: u32,
        acked: bool,
        downlinks: &[Arc<dyn Downlink>],
    ) {
        let current = self
            .entries
            .get(id)
            .is_some_and(|e| e.attempt == attempt && e.cmd.state == CommandState::Sent);
        if !current {
            return;
        }
        let device = self.entries[id].cmd.device.clone();
        if acked {
            let _ = self.confirm(&device, id, Step::Delivered, downlinks).await;
        } else {
            self.lost(id).await;
            self.dispatch(&device, downlinks).await;
        }
    }

    /// A sent command was lost by its transport: back to the head of its queue, waiting
    /// until its `ttl` again.
    async fn lost(&mut self, id: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if !matches!(
            machine::apply(&mut entry.cmd, Step::Lost, now_ms()),
            Ok(true)
        ) {
            return;
        }
        entry.route = None;
        entry.deadline = entry.ttl_deadline;
        self.deadlines.arm(entry.deadline, id);
        let cmd = entry.cmd.clone();
        let q = self.devices.entry(cmd.device.clone()).or_default();
        if q.in_flight.as_deref() == Some(id) {
            q.in_flight = None;
        }
        q.queued.push_front(id.to_owned());
        self.persist(&cmd).await;
        self.changed(&cmd);
    }

    /// Offer `device`'s next command to its transports, as long as one takes it and
    /// the device confirms at once (an HTTP poll).
    async fn dispatch(&mut self, device: &str, downlinks: &[Arc<dyn Downlink>]) {
        loop {
            let Some(q) = self.devices.get(device) else {
                return;
            };
            if q.in_flight.is_some() || q.offering.is_some() {
                return;
            }
            let Some(id) = q.queued.front().cloned() else {
                self.forget(device);
                return;
            };
            let Some(entry) = self.entries.get(&id) else {
                if let Some(q) = self.devices.get_mut(device) {
                    q.queued.pop_front();
                }
                continue;
            };
            let out = entry.cmd.outgoing();
            let attempt = entry.attempt + 1;
            let mut route = None;
            for d in downlinks {
                if let Some(outcome) = d.offer(device, out.mqtt_payload()) {
                    let id = id.clone();
                    self.outcomes
                        .push(Box::pin(async move { (id, attempt, outcome.await) }));
                    route = Some(Some(Route::Push));
                    break;
                }
            }
            if route.is_none()
                && let Some(conns) = self.ws.get_mut(device)
            {
                conns.retain(|c| !c.is_closed());
                for c in conns.iter() {
                    // A full connection queue (the device does not read) is passed
                    // over; the command stays queued for the next chance.
                    if c.try_send(out.clone()).is_ok() {
                        route = Some(Some(Route::Ws(c.clone())));
                        break;
                    }
                }
            }
            let mut polled = false;
            if route.is_none()
                && let Some(poller) = self.pollers.remove(device)
                && poller.send(out).is_ok()
            {
                route = Some(None);
                polled = true;
            }
            let Some(route) = route else {
                self.offer_remote(device, &id, None);
                return;
            };
            let now = now_ms();
            let Some(entry) = self.entries.get_mut(&id) else {
                return;
            };
            if machine::apply(&mut entry.cmd, Step::Send, now).is_err() {
                return;
            }
            entry.attempt = attempt;
            entry.route = route;
            entry.deadline = Instant::now() + Duration::from_millis(entry.cmd.timeout_ms);
            self.deadlines.arm(entry.deadline, &id);
            let sent = entry.cmd.clone();
            if let Some(q) = self.devices.get_mut(device) {
                q.queued.pop_front();
                q.in_flight = Some(id.clone());
            }
            if polled {
                // The long poll's answer is the delivery (HTTP has no other receipt):
                // both steps are committed together, then announced.
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                let _ = machine::apply(&mut entry.cmd, Step::Delivered, now);
                let delivered = entry.cmd.clone();
                if let Some(q) = self.devices.get_mut(device) {
                    q.in_flight = None;
                }
                self.persist(&delivered).await;
                self.changed(&sent);
                self.changed(&delivered);
                continue;
            }
            self.persist(&sent).await;
            self.changed(&sent);
            return;
        }
    }

    /// Offer `device`'s next command `id` to the node that holds the device, if another
    /// node does and the offers in the air leave room.
    fn offer_remote(&mut self, device: &str, id: &str, holder: Option<&str>) {
        let Some(remote) = self.remote.clone() else {
            return;
        };
        if self.offers.len() >= MAX_OFFERS {
            return;
        }
        let Some(entry) = self.entries.get(id) else {
            return;
        };
        let offer = RemoteOffer {
            owner: remote.node().to_owned(),
            out: entry.cmd.outgoing(),
            timeout_ms: entry.cmd.timeout_ms,
        };
        let attempt = entry.attempt + 1;
        let Some(answer) = remote.offer(device, holder, offer) else {
            return;
        };
        if let Some(q) = self.devices.get_mut(device) {
            q.offering = Some(id.to_owned());
        }
        let (device, id) = (device.to_owned(), id.to_owned());
        self.offers
            .push(Box::pin(async move { (device, id, attempt, answer.await) }));
    }

    /// Cluster mode: tell the other nodes that `device` may be reachable here.
    fn tell_reachable(&self, device: &str) {
        if let Some(remote) = &self.remote {
            remote.reachable(device);
        }
    }

    /// Deadlines that came due: `ttl` of queued commands, `timeout` of sent ones.
    async fn expire(&mut self, downlinks: &[Arc<dyn Downlink>]) {
        for (at, id) in self.deadlines.take_due(Instant::now()) {
            let Some(entry) = self.entries.get_mut(&id).filter(|e| e.deadline == at) else {
                continue;
            };
            let step = if entry.cmd.state == CommandState::Queued {
                Step::Expire
            } else {
                Step::Timeout
            };
            if machine::apply(&mut entry.cmd, step, now_ms()).is_err() {
                continue;
            }
            entry.route = None;
            let cmd = entry.cmd.clone();
            if let Some(q) = self.devices.get_mut(&cmd.device) {
                q.queued.retain(|c| *c != id);
                if q.in_flight.as_deref() == Some(id.as_str()) {
                    q.in_flight = None;
                }
            }
            self.finish(&cmd).await;
            self.dispatch(&cmd.device, downlinks).await;
        }
    }

    /// Once a second: WS deliveries whose connection closed are lost; devices with
    /// queued commands and nothing in flight are offered them again.
    async fn retry(&mut self, downlinks: &[Arc<dyn Downlink>]) {
        let closed: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(&e.route, Some(Route::Ws(tx)) if tx.is_closed()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in closed {
            self.lost(&id).await;
        }
        self.held_tick();
        self.probe();
        self.pollers.retain(|_, p| !p.is_closed());
        self.ws.retain(|_, conns| {
            conns.retain(|c| !c.is_closed());
            !conns.is_empty()
        });
        let waiting: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, q)| q.in_flight.is_none() && q.offering.is_none() && !q.queued.is_empty())
            .map(|(d, _)| d.clone())
            .collect();
        for device in waiting {
            self.dispatch(&device, downlinks).await;
        }
    }

    /// Commands sent through another node and unconfirmed for [`PROBE_AFTER`]: ask
    /// that node whether it still holds them (one question per command per tick).
    fn probe(&mut self) {
        let Some(remote) = self.remote.clone() else {
            return;
        };
        if !self.probes.is_empty() {
            return;
        }
        let due = now_ms().saturating_sub(PROBE_AFTER.as_millis() as u64);
        let asks: Vec<(String, u32, String)> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.cmd.state == CommandState::Sent && e.cmd.sent_ms.is_some_and(|s| s <= due)
            })
            .filter_map(|(id, e)| match &e.route {
                Some(Route::Remote(node)) => Some((id.clone(), e.attempt, node.clone())),
                _ => None,
            })
            .take(MAX_OFFERS)
            .collect();
        for (id, attempt, node) in asks {
            let held = remote.holding(&node, &id);
            self.probes
                .push(Box::pin(async move { (id, attempt, held.await) }));
        }
    }

    /// A holder's answer whether it still holds command `id`: if not, it was lost.
    async fn probed(
        &mut self,
        id: &str,
        attempt: u32,
        held: bool,
        downlinks: &[Arc<dyn Downlink>],
    ) {
        let same = self.entries.get(id).is_some_and(|e| {
            e.attempt == attempt
                && e.cmd.state == CommandState::Sent
                && matches!(e.route, Some(Route::Remote(_)))
        });
        if held || !same {
            return;
        }
        let device = self.entries[id].cmd.device.clone();
        self.lost(id).await;
        self.dispatch(&device, downlinks).await;
    }

    /// Held deliveries whose WebSocket closed before the receipt are lost (the owner is
    /// told); those past their time are forgotten.
    fn held_tick(&mut self) {
        let now = Instant::now();
        let lost: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| !h.received && h.ws.as_ref().is_some_and(|tx| tx.is_closed()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            if let (Some(h), Some(remote)) = (self.held.remove(&id), self.remote.as_ref()) {
                self.notices.push(remote.lost(&h.owner, &h.device, &id));
            }
        }
        self.held.retain(|_, h| h.until > now);
    }

    /// A command reached a final state: stored, announced, and forgotten here.
    async fn finish(&mut self, cmd: &Command) {
        self.persist(cmd).await;
        self.changed(cmd);
        self.entries.remove(&cmd.id);
        if let Some(q) = self.devices.get_mut(&cmd.device) {
            q.open = q.open.saturating_sub(1);
        }
        self.forget(&cmd.device);
    }

    /// After a revocation of `device` (all devices: `None`): the commands whose rows
    /// are gone were deleted with their device; forget them here too, so that a new
    /// device with the same id never receives them. (A disabled or re-keyed device
    /// keeps its commands.)
    async fn purge_deleted(&mut self, device: Option<&str>) {
        let ids: Vec<(String, String)> = self
            .entries
            .values()
            .filter(|e| device.is_none_or(|d| e.cmd.device == d))
            .map(|e| (e.cmd.device.clone(), e.cmd.id.clone()))
            .collect();
        if ids.is_empty() {
            return;
        }
        let reg = self.registry.clone();
        let gone = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .filter(|(d, id)| matches!(reg.command_get(d, id), Ok(None)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (device, id) in gone {
            self.entries.remove(&id);
            if let Some(q) = self.devices.get_mut(&device) {
                q.queued.retain(|c| *c != id);
                if q.in_flight.as_deref() == Some(id.as_str()) {
                    q.in_flight = None;
                }
                q.open = q.open.saturating_sub(1);
            }
            self.forget(&device);
        }
    }

    /// Drop a device's queue entry when nothing of it is left.
    fn forget(&mut self, device: &str) {
        if self.devices.get(device).is_some_and(|q| {
            q.open == 0 && q.queued.is_empty() && q.in_flight.is_none() && q.offering.is_none()
        }) {
            self.devices.remove(device);
        }
    }

    async fn persist(&self, cmd: &Command) {
        let reg = self.registry.clone();
        let c = cmd.clone();
        let result = tokio::task::spawn_blocking(move || reg.command_update(&c)).await;
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        self.metrics.emit(Event::CommandStoreFailed {
            id: &cmd.id,
            error: &error,
        });
    }

    /// Count and log a new state, and tell the live streams and waiting requests.
    fn changed(&self, cmd: &Command) {
        let since_sent = |at: Option<u64>| {
            cmd.sent_ms
                .zip(at)
                .map(|(s, a)| Duration::from_millis(a.saturating_sub(s)))
        };
        let delivery = match cmd.state {
            CommandState::Delivered => since_sent(cmd.delivered_ms),
            _ => None,
        };
        let reply = match cmd.state {
            CommandState::Replied => since_sent(cmd.finished_ms),
            CommandState::Failed if cmd.error.as_deref() != Some(machine::TIMEOUT_ERROR) => {
                since_sent(cmd.finished_ms)
            }
            _ => None,
        };
        self.metrics.emit(Event::CommandChanged {
            device: &cmd.device,
            id: &cmd.id,
            name: &cmd.name,
            state: cmd.state,
            delivery,
            reply,
        });
        if let Some(remote) = &self.remote {
            remote.changed(cmd);
        }
        // Nobody listening is fine; a lagging listener is told by the channel.
        let _ = self.events.send(Arc::new(cmd.clone()));
    }
}

/// Sleep until `at`, or forever without a deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
