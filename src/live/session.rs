//! One live client's stream, independent of its transport: how it starts (snapshot,
//! replay from the ring, gap-fill from the store, or reset), then deliveries, conflation
//! notices and per-series rate limiting. SSE and WebSocket only turn [`Outgoing`]
//! messages into their frames.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::filter::Filter;
use super::hub::Start;
use super::{
    Hub, LiveError, LiveQuery, LiveReading, MAX_FRAME_READINGS, Position, Subscription,
    conflated_json, delivery_json, gapfill_json, reset_json, snapshot_json,
};
use crate::commands::Commands;
use crate::model::{Command, DeviceId, MetricName};
use crate::observe::{Event, Metrics, ResumeSource};
use crate::store::{StoreError, StoreReader};

/// One message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The message type (SSE event name).
    pub event: &'static str,
    /// The position to resume from after this message (SSE `id`), if it carries one.
    pub id: Option<String>,
    /// The JSON text.
    pub data: String,
}

/// Per-series rate limit: at most one reading per `interval` per series; readings that
/// come sooner are held (the newest replaces an older held one, counted as conflated)
/// and sent when the series' slot comes.
struct Throttle {
    interval: Duration,
    next_ok: HashMap<(DeviceId, MetricName), Instant>,
    held: HashMap<(DeviceId, MetricName), Arc<LiveReading>>,
    replaced: u64,
}

impl Throttle {
    fn new(max_rate: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / max_rate),
            next_ok: HashMap::new(),
            held: HashMap::new(),
            replaced: 0,
        }
    }

    fn admit(&mut self, readings: Vec<Arc<LiveReading>>, now: Instant) -> Vec<Arc<LiveReading>> {
        let mut out = Vec::with_capacity(readings.len());
        for l in readings {
            let key = (l.reading.device.clone(), l.reading.metric.clone());
            match self.next_ok.get(&key) {
                Some(t) if *t > now => {
                    if self.held.insert(key, l).is_some() {
                        self.replaced += 1;
                    }
                }
                _ => {
                    self.next_ok.insert(key, now + self.interval);
                    out.push(l);
                }
            }
        }
        out
    }

    fn due(&mut self, now: Instant) -> Vec<Arc<LiveReading>> {
        let ready: Vec<_> = self
            .held
            .keys()
            .filter(|k| self.next_ok.get(*k).is_none_or(|t| *t <= now))
            .cloned()
            .collect();
        let mut out: Vec<Arc<LiveReading>> = ready
            .into_iter()
            .filter_map(|k| {
                let l = self.held.remove(&k)?;
                self.next_ok.insert(k, now + self.interval);
                Some(l)
            })
            .collect();
        out.sort_by_key(|l| l.seq);
        out
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.held
            .keys()
            .filter_map(|k| self.next_ok.get(k))
            .min()
            .copied()
    }
}

/// What a session takes from the gateway. The transport handler builds it; the session
/// knows nothing of HTTP.
pub struct SessionDeps {
    /// The live hub.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The embedded store's reader for gap-fill, when the store is enabled.
    pub store: Option<StoreReader>,
    /// Most readings one gap-fill replays from the store.
    pub max_gap_fill: usize,
    /// Command state changes, for the `command` events of the selected devices.
    pub commands: Option<Commands>,
}

/// A client's live stream.
pub struct LiveSession {
    sub: Subscription,
    hub: Arc<Hub>,
    throttle: Option<Throttle>,
    pending: VecDeque<Outgoing>,
    metrics: Arc<Metrics>,
    /// The subscription's filters (the hub keeps its own copy for readings): a command
    /// event goes out when one of them selects its device, whatever its metrics.
    filters: std::sync::Mutex<Vec<(String, Filter)>>,
    /// Command state changes (a broadcast: a lagging session is told how many it
    /// missed, and never holds the sender up).
    commands: Option<broadcast::Receiver<Arc<Command>>>,
}

impl LiveSession {
    /// Subscribe and prepare the first messages (snapshot, replay, gap-fill or reset).
    pub async fn open(
        deps: SessionDeps,
        query: LiveQuery,
        id: &str,
    ) -> Result<LiveSession, LiveError> {
        let hub = deps.hub.clone();
        let filter = query.filter.clone();
        // Subscribed before the readings, so a command's changes from here on are seen.
        let commands = deps.commands.as_ref().map(Commands::subscribe);
        let (sub, start, at) = hub.subscribe(id.to_owned(), query.filter, query.since)?;
        let mut session = LiveSession {
            sub,
            hub,
            throttle: query.max_rate.map(Throttle::new),
            pending: VecDeque::new(),
            metrics: deps.metrics.clone(),
            filters: std::sync::Mutex::new(vec![(id.to_owned(), filter.clone())]),
            commands,
        };
        match start {
            Start::Snapshot(s) => session.push_snapshot(at, &s),
            Start::Replay(r) => session.push_readings(r),
            Start::Reset { reason, snapshot } => {
                session.push_reset(reason);
                session.push_snapshot(at, &snapshot);
            }
            Start::GapFill {
                from_ms,
                to_ms,
                then,
            } => match session.gap_fill(&deps, &filter, from_ms, to_ms).await {
                Some(msg) => {
                    session.pending.push_back(msg);
                    session.push_readings(then);
                }
                None => {
                    // The store could not serve it after all: count it as a reset.
                    session.metrics.emit(Event::Resumed {
                        source: ResumeSource::Reset,
                    });
                    session.push_reset("the gap is too large or the store is unavailable");
                    let (snapshot, at) = session.hub.snapshot_now(&filter);
                    session.push_snapshot(at, &snapshot);
                }
            },
        }
        Ok(session)
    }

    async fn gap_fill(
        &self,
        deps: &SessionDeps,
        filter: &Filter,
        from: i64,
        to: i64,
    ) -> Option<Outgoing> {
        let store = deps.store.as_ref()?;
        let (hub, filter) = (self.hub.clone(), filter.clone());
        let select = move |device: &str, metric: &str| filter.selects(device, metric, hub.labels());
        match store.window(select, from, to, deps.max_gap_fill).await {
            Ok(Some(rows)) => Some(Outgoing {
                event: "gapfill",
                id: None,
                data: gapfill_json(&rows),
            }),
            Ok(None) => None,
            Err(StoreError::Busy) => {
                self.metrics.emit(Event::StoreQueryRejected);
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "live gap-fill from the store failed");
                None
            }
        }
    }

    fn push_snapshot(&mut self, at: Position, readings: &[Arc<LiveReading>]) {
        self.pending.push_back(Outgoing {
            event: "snapshot",
            id: Some(at.to_string()),
            data: snapshot_json(at, readings),
        });
    }

    fn push_reset(&mut self, reason: &str) {
        self.pending.push_back(Outgoing {
            event: "reset",
            id: None,
            data: reset_json(reason),
        });
    }

    fn push_readings(&mut self, readings: Vec<Arc<LiveReading>>) {
        let epoch = self.hub.epoch();
        for chunk in readings.chunks(MAX_FRAME_READINGS) {
            let Some(last) = chunk.last() else { continue };
            self.metrics.emit(Event::LiveSent {
                readings: chunk.len(),
            });
            self.pending.push_back(Outgoing {
                event: "readings",
                id: Some(
                    Position {
                        epoch,
                        seq: last.seq,
                    }
                    .to_string(),
                ),
                data: delivery_json(epoch, chunk),
            });
        }
    }

    /// The next message. Cancel-safe: a message is only taken from the queue when it is
    /// returned.
    pub async fn next(&mut self) -> Outgoing {
        loop {
            if let Some(msg) = self.pending.pop_front() {
                return msg;
            }
            let deadline = self.throttle.as_ref().and_then(Throttle::next_deadline);
            let delivery = tokio::select! {
                d = self.sub.next(MAX_FRAME_READINGS) => Some(d),
                () = sleep_until(deadline), if deadline.is_some() => None,
                c = next_command(&mut self.commands) => {
                    self.push_command(c);
                    continue;
                }
            };
            let now = Instant::now();
            let (mut readings, mut conflated) = match delivery {
                Some(d) => (d.readings, d.conflated),
                None => (Vec::new(), 0),
            };
            if let Some(t) = &mut self.throttle {
                let mut due = t.due(now);
                due.extend(t.admit(readings, now));
                due.sort_by_key(|l| l.seq);
                readings = due;
                conflated += std::mem::take(&mut t.replaced);
            }
            if conflated > 0 {
                self.pending.push_back(Outgoing {
                    event: "conflated",
                    id: None,
                    data: conflated_json(conflated),
                });
            }
            self.push_readings(readings);
        }
    }

    /// A command event for a selected device, or the notice of missed ones.
    fn push_command(&mut self, c: Result<Arc<Command>, u64>) {
        match c {
            Ok(cmd) => {
                let labels = self.hub.labels();
                let selected = crate::sync::lock(&self.filters)
                    .iter()
                    .any(|(_, f)| f.selects_device(&cmd.device, labels));
                if selected {
                    self.pending.push_back(Outgoing {
                        event: "command",
                        id: None,
                        data: command_json(&cmd),
                    });
                }
            }
            Err(missed) => self.pending.push_back(Outgoing {
                event: "commands_missed",
                id: None,
                data: format!("{{\"type\":\"commands_missed\",\"count\":{missed}}}"),
            }),
        }
    }

    /// Add a named filter (WebSocket `subscribe`); returns its snapshot message.
    pub fn add_filter(&self, id: String, filter: Filter) -> Result<Outgoing, LiveError> {
        let snapshot = self.sub.add_filter(id.clone(), filter.clone())?;
        {
            let mut filters = crate::sync::lock(&self.filters);
            filters.retain(|(i, _)| *i != id);
            filters.push((id, filter));
        }
        let at = self.hub.position();
        Ok(Outgoing {
            event: "snapshot",
            id: Some(at.to_string()),
            data: snapshot_json(at, &snapshot),
        })
    }

    /// Remove a named filter (WebSocket `unsubscribe`).
    pub fn remove_filter(&self, id: &str) -> bool {
        crate::sync::lock(&self.filters).retain(|(i, _)| i != id);
        self.sub.remove_filter(id)
    }
}

/// The next command state change: `Err(n)` when `n` were missed (the session lagged);
/// never resolves without a receiver or once the sender is gone.
async fn next_command(
    rx: &mut Option<broadcast::Receiver<Arc<Command>>>,
) -> Result<Arc<Command>, u64> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    match r.recv().await {
        Ok(c) => Ok(c),
        Err(broadcast::error::RecvError::Lagged(n)) => Err(n),
        Err(broadcast::error::RecvError::Closed) => {
            *rx = None;
            std::future::pending().await
        }
    }
}

/// The `command` event: `{"type":"command","id","device","name","state","at",
/// "result"|"error"}`, `at` in ms since the epoch (when it entered this state).
fn command_json(c: &Command) -> String {
    let at = c
        .finished_ms
        .or(c
            .delivered_ms
            .filter(|_| c.state == crate::model::CommandState::Delivered))
        .or(c
            .sent_ms
            .filter(|_| c.state == crate::model::CommandState::Sent))
        .unwrap_or(c.created_ms);
    let mut v = serde_json::json!({
        "type": "command", "id": c.id, "device": c.device, "name": c.name,
        "state": c.state.as_str(), "at": at,
    });
    if let Some(r) = &c.result {
        v["result"] = r.clone();
    }
    if let Some(e) = &c.error {
        v["error"] = e.clone().into();
    }
    v.to_string()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Reading, Value};

    fn live(seq: u64, device: &str) -> Arc<LiveReading> {
        Arc::new(LiveReading {
            seq,
            series: 0,
            arrival_ms: 0,
            reading: Reading {
                device: device.into(),
                metric: "t".into(),
                ts_ms: seq as i64,
                value: Value::I64(seq as i64),
            },
        })
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_holds_the_newest_per_series_until_its_slot() {
        let mut t = Throttle::new(2.0); // one reading per 500 ms per series
        let t0 = Instant::now();
        let sent = t.admit(
            vec![live(1, "a"), live(2, "a"), live(3, "a"), live(4, "b")],
            t0,
        );
        assert_eq!(sent.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 4]);
        assert_eq!(t.replaced, 1); // seq 2 was replaced by seq 3
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_millis(500)));
        assert!(t.due(t0 + Duration::from_millis(499)).is_empty());
        let due = t.due(t0 + Duration::from_millis(500));
        assert_eq!(due.iter().map(|l| l.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(t.next_deadline(), None);
    }
}
