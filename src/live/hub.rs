//! The live hub: sequence numbers, the last-value cache, the resume ring and the
//! registry of subscribers (their queues are in `queue`, their filters in `filter`).
//!
//! `publish` is called by the pipeline and never waits on a subscriber: it takes one
//! short lock, appends to bounded in-memory structures and wakes subscribers. A
//! subscriber whose queue is full gets its pending readings conflated to the latest per
//! series (and a count of how many were replaced) instead of slowing anyone down.
//!
//! Resuming: every reading gets a position `{epoch}:{seq}`. A subscriber that passes the
//! position it last saw is served, atomically with its registration, from the ring (a
//! bounded window of recent readings); when the ring no longer reaches back that far, it
//! is told the time window to gap-fill from the store; when even that is impossible
//! (another epoch, or older than the hub remembers), it gets a reset and a snapshot.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::error::LiveError;
use super::filter::Filter;
use super::position::{LiveReading, Position};
use super::queue::{ClientQueue, series_hash};
use crate::model::{DeviceId, DeviceLabels, MetricName, Reading, now_ms};
use crate::observe::{Event, Metrics, Queue, ResumeSource};
use crate::sync::lock;

/// Hub limits.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Readings kept for resume.
    pub ring_capacity: usize,
    /// Bytes (approximate) the ring may hold.
    pub ring_bytes: usize,
    /// Readings queued per subscriber before conflation.
    pub client_queue: usize,
    /// Concurrent subscribers.
    pub max_subscribers: usize,
    /// Selectors per subscription.
    pub max_filters: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
}

struct Subscriber {
    queue: Mutex<ClientQueue>,
    notify: Notify,
}

struct SubEntry {
    sub: Arc<Subscriber>,
    filters: Vec<(String, Filter)>,
    /// Some filter selects everything (no selector at all): no lookups needed.
    all: bool,
    /// Per device: bit i set when filter i selects it. Valid for `cache_version`.
    cache: HashMap<DeviceId, u64>,
    cache_version: u64,
}

impl SubEntry {
    fn matches(&mut self, r: &Reading, labels: &dyn DeviceLabels) -> bool {
        if self.all {
            return true;
        }
        let version = labels.version();
        if version != self.cache_version {
            self.cache.clear();
            self.cache_version = version;
        }
        let filters = &self.filters;
        let bits = match self.cache.get(&*r.device) {
            Some(b) => *b,
            None => {
                let b = filters
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, f))| f.selects_device(&r.device, labels))
                    .fold(0u64, |acc, (i, _)| acc | (1 << i));
                // Bounded: a subscriber remembers at most this many devices.
                if self.cache.len() < 100_000 {
                    self.cache.insert(r.device.clone(), b);
                }
                b
            }
        };
        bits != 0
            && filters
                .iter()
                .enumerate()
                .any(|(i, (_, f))| bits & (1 << i) != 0 && f.selects_metric(&r.metric))
    }
}

#[derive(Default)]
struct State {
    seq: u64,
    latest: foldhash::HashMap<DeviceId, foldhash::HashMap<MetricName, Arc<LiveReading>>>,
    ring: VecDeque<Arc<LiveReading>>,
    ring_bytes: usize,
    /// One per second of arrivals: the first seq of that second and the range of
    /// reading timestamps seen in it, to turn a span of old positions into the
    /// timestamp window a gap-fill from the store must cover.
    checkpoints: VecDeque<Checkpoint>,
    subscribers: HashMap<u64, SubEntry>,
    /// Subscribers whose filters only list device ids, by device: publishing looks up
    /// the reading's device instead of asking every subscriber.
    by_device: foldhash::HashMap<String, Vec<u64>>,
    /// Subscribers with any other filter (globs, labels, all devices): asked per reading.
    scan: Vec<u64>,
    next_id: u64,
}

impl State {
    /// Put a subscriber into the publish index according to its filters.
    fn index(&mut self, id: u64) {
        self.unindex(id);
        let Some(entry) = self.subscribers.get_mut(&id) else {
            return;
        };
        entry.all = entry.filters.iter().any(|(_, f)| f.size() == 0);
        let entry = &*entry;
        let by_ids = !entry.filters.is_empty()
            && entry
                .filters
                .iter()
                .all(|(_, f)| f.globs.is_empty() && f.labels.is_empty() && !f.devices.is_empty());
        if by_ids {
            let devices: HashSet<String> = entry
                .filters
                .iter()
                .flat_map(|(_, f)| f.devices.iter().cloned())
                .collect();
            for d in devices {
                self.by_device.entry(d).or_default().push(id);
            }
        } else {
            self.scan.push(id);
        }
    }

    fn unindex(&mut self, id: u64) {
        self.scan.retain(|s| *s != id);
        self.by_device.retain(|_, subs| {
            subs.retain(|s| *s != id);
            !subs.is_empty()
        });
    }
}

#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    first_seq: u64,
    arrival_s: u64,
    min_ts: i64,
    max_ts: i64,
}

/// Most checkpoints kept (one per second with traffic: a bit over a day).
const MAX_CHECKPOINTS: usize = 100_000;

/// How a new subscription starts.
#[derive(Debug)]
pub enum Start {
    /// No position given: the latest value of every matching series.
    Snapshot(Vec<Arc<LiveReading>>),
    /// Resumed from the ring: exactly the matching readings after the position.
    Replay(Vec<Arc<LiveReading>>),
    /// The ring does not reach back far enough: fetch readings with timestamps in
    /// `[from_ms, to_ms)` from the store, then these ring readings follow.
    GapFill {
        /// Start of the window, ms.
        from_ms: i64,
        /// End of the window, ms.
        to_ms: i64,
        /// The matching ring readings, after the gap.
        then: Vec<Arc<LiveReading>>,
    },
    /// The position cannot be served: start over from this snapshot.
    Reset {
        /// Why (for the client).
        reason: &'static str,
        /// A fresh snapshot.
        snapshot: Vec<Arc<LiveReading>>,
    },
}

/// The hub. Shared as `Arc<Hub>`.
pub struct Hub {
    epoch: u64,
    limits: HubLimits,
    state: Mutex<State>,
    labels: Arc<dyn DeviceLabels>,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub for a gateway run identified by `epoch`.
    pub fn new(
        epoch: u64,
        limits: HubLimits,
        labels: Arc<dyn DeviceLabels>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            epoch,
            limits,
            state: Mutex::new(State::default()),
            labels,
            metrics,
        }
    }

    /// This run's epoch (changes when the gateway restarts).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Publish readings: assign positions, update the cache and ring, queue them for
    /// matching subscribers. Never waits on a subscriber.
    pub fn publish(&self, readings: &[Reading]) {
        self.publish_with(readings, None);
    }

    /// Publish readings at given sequence numbers (cluster mode: derived from the
    /// stream, so every node gives a reading the same position). `seqs` has one entry
    /// per reading, increasing; readings at or below the hub's latest sequence are
    /// already published and skipped.
    pub fn publish_at(&self, readings: &[Reading], seqs: &[u64]) {
        debug_assert_eq!(readings.len(), seqs.len());
        self.publish_with(readings, Some(seqs));
    }

    fn publish_with(&self, readings: &[Reading], seqs: Option<&[u64]>) {
        if readings.is_empty() || seqs.is_some_and(|s| s.len() != readings.len()) {
            return;
        }
        let arrival_ms = now_ms();
        let mut state = lock(&self.state);
        let state = &mut *state;
        if state
            .checkpoints
            .back()
            .is_none_or(|c| c.arrival_s != arrival_ms / 1000)
        {
            if state.checkpoints.len() == MAX_CHECKPOINTS {
                state.checkpoints.pop_front();
            }
            let next = state.seq + 1;
            state.checkpoints.push_back(Checkpoint {
                first_seq: seqs
                    .and_then(|s| s.iter().copied().find(|&q| q >= next))
                    .unwrap_or(next),
                arrival_s: arrival_ms / 1000,
                min_ts: i64::MAX,
                max_ts: i64::MIN,
            });
        }
        if let Some(c) = state.checkpoints.back_mut() {
            for r in readings {
                c.min_ts = c.min_ts.min(r.ts_ms);
                c.max_ts = c.max_ts.max(r.ts_ms);
            }
        }
        let mut positioned = Vec::with_capacity(readings.len());
        for (i, r) in readings.iter().enumerate() {
            match seqs {
                Some(s) if s[i] <= state.seq => continue,
                Some(s) => state.seq = s[i],
                None => state.seq += 1,
            }
            let live = Arc::new(LiveReading {
                seq: state.seq,
                series: series_hash(&r.device, &r.metric),
                arrival_ms,
                reading: r.clone(),
            });
            let per_device = match state.latest.get_mut(&*r.device) {
                Some(m) => m,
                None => state.latest.entry(r.device.clone()).or_default(),
            };
            match per_device.get_mut(&*r.metric) {
                Some(slot) => {
                    // Out-of-order backfill must not replace a newer latest value.
                    if slot.reading.ts_ms <= r.ts_ms {
                        *slot = live.clone();
                    }
                }
                None => {
                    per_device.insert(r.metric.clone(), live.clone());
                }
            }
            state.ring_bytes += live.size();
            state.ring.push_back(live.clone());
            while state.ring.len() > self.limits.ring_capacity
                || state.ring_bytes > self.limits.ring_bytes
            {
                match state.ring.pop_front() {
                    Some(old) => state.ring_bytes -= old.size(),
                    None => break,
                }
            }
            positioned.push(live);
        }
        let labels = &*self.labels;
        let State {
            subscribers,
            by_device,
            scan,
            ..
        } = state;
        // Subscribers indexed by device id: look up each reading's device.
        let mut matched: HashMap<u64, Vec<Arc<LiveReading>>> = HashMap::new();
        for l in &positioned {
            for id in by_device
                .get(&*l.reading.device)
                .map_or(&[][..], Vec::as_slice)
            {
                if let Some(entry) = subscribers.get_mut(id)
                    && entry.matches(&l.reading, labels)
                {
                    matched.entry(*id).or_default().push(l.clone());
                }
            }
        }
        for (id, readings) in matched {
            if let Some(entry) = subscribers.get(&id) {
                self.enqueue(entry, readings);
            }
        }
        // Subscribers with globs, labels or no device filter: ask each one about every
        // reading, filling its queue under one lock.
        for id in scan.iter() {
            let Some(entry) = subscribers.get_mut(id) else {
                continue;
            };
            let readings: Vec<Arc<LiveReading>> = positioned
                .iter()
                .filter(|l| entry.matches(&l.reading, labels))
                .cloned()
                .collect();
            self.enqueue(entry, readings);
        }
    }

    /// Append readings to one subscriber's queue (conflating past its capacity), update
    /// the gauges and wake it.
    fn enqueue(&self, entry: &SubEntry, readings: Vec<Arc<LiveReading>>) {
        if readings.is_empty() {
            return;
        }
        let added = readings.len() as i64;
        let mut replaced = 0;
        let mut q = lock(&entry.sub.queue);
        for l in readings {
            replaced += q.push(l, self.limits.client_queue);
        }
        drop(q);
        self.metrics
            .add_queue_depth(Queue::Live, added - replaced as i64);
        if replaced > 0 {
            self.metrics.emit(Event::Conflated { count: replaced });
        }
        entry.sub.notify.notify_one();
    }

    fn check_filter(&self, filter: &Filter) -> Result<(), LiveError> {
        let count = filter.size();
        if count > self.limits.max_filters {
            return Err(LiveError::TooManyFilters {
                count,
                limit: self.limits.max_filters,
            });
        }
        Ok(())
    }

    fn snapshot(&self, state: &State, filter: &Filter) -> Vec<Arc<LiveReading>> {
        let labels = &*self.labels;
        let mut snapshot: Vec<Arc<LiveReading>> =
            if filter.globs.is_empty() && filter.labels.is_empty() && !filter.devices.is_empty() {
                filter
                    .devices
                    .iter()
                    .filter_map(|d| state.latest.get(d.as_str()))
                    .flat_map(|m| m.values())
                    .cloned()
                    .collect()
            } else {
                state
                    .latest
                    .iter()
                    .filter(|(d, _)| filter.selects_device(d, labels))
                    .flat_map(|(_, m)| m.values())
                    .cloned()
                    .collect()
            };
        snapshot.retain(|l| filter.selects_metric(&l.reading.metric));
        snapshot.sort_by_key(|l| l.seq);
        snapshot
    }

    /// Subscribe with one filter (named `id`), optionally resuming after `since`.
    /// Registration and the start data are taken under one lock, so nothing falls
    /// between them and nothing is delivered twice.
    pub fn subscribe(
        self: &Arc<Self>,
        id: String,
        filter: Filter,
        since: Option<Position>,
    ) -> Result<(Subscription, Start, Position), LiveError> {
        self.check_filter(&filter)?;
        let mut state = lock(&self.state);
        let at = Position {
            epoch: self.epoch,
            seq: state.seq,
        };
        if state.subscribers.len() >= self.limits.max_subscribers {
            return Err(LiveError::TooManySubscribers {
                limit: self.limits.max_subscribers,
            });
        }
        let start = self.start(&state, &filter, since);
        let sub_id = state.next_id;
        state.next_id += 1;
        let sub = Arc::new(Subscriber {
            queue: Mutex::new(ClientQueue::default()),
            notify: Notify::new(),
        });
        state.subscribers.insert(
            sub_id,
            SubEntry {
                sub: sub.clone(),
                all: filter.size() == 0,
                filters: vec![(id, filter)],
                cache: HashMap::new(),
                cache_version: u64::MAX,
            },
        );
        state.index(sub_id);
        drop(state);
        self.metrics.add_live_subscribers(1);
        if let Some(source) = match &start {
            Start::Snapshot(_) => None,
            Start::Replay(_) => Some(ResumeSource::Ring),
            Start::GapFill { .. } => Some(ResumeSource::Store),
            Start::Reset { .. } => Some(ResumeSource::Reset),
        } {
            self.metrics.emit(Event::Resumed { source });
        }
        Ok((
            Subscription {
                hub: self.clone(),
                id: sub_id,
                sub,
            },
            start,
            at,
        ))
    }

    /// A snapshot for `filter` now, with the position it reflects.
    pub fn snapshot_now(&self, filter: &Filter) -> (Vec<Arc<LiveReading>>, Position) {
        let state = lock(&self.state);
        let at = Position {
            epoch: self.epoch,
            seq: state.seq,
        };
        (self.snapshot(&state, filter), at)
    }

    fn start(&self, state: &State, filter: &Filter, since: Option<Position>) -> Start {
        let Some(pos) = since else {
            return Start::Snapshot(self.snapshot(state, filter));
        };
        let reset = |reason| Start::Reset {
            reason,
            snapshot: self.snapshot(state, filter),
        };
        if pos.epoch != self.epoch {
            return reset("the gateway restarted since that position (new epoch)");
        }
        if pos.seq > state.seq {
            return reset("that position is ahead of the stream");
        }
        let labels = &*self.labels;
        let after = |from: u64| -> Vec<Arc<LiveReading>> {
            let skip = state.ring.partition_point(|l| l.seq <= from);
            state
                .ring
                .range(skip..)
                .filter(|l| filter.matches(&l.reading, labels))
                .cloned()
                .collect()
        };
        let ring_first = state.ring.front().map_or(state.seq + 1, |l| l.seq);
        if pos.seq + 1 >= ring_first {
            return Start::Replay(after(pos.seq));
        }
        // The ring starts later than the position: the readings in between (seq in
        // (pos, ring_first)) are in the store. The checkpoints covering that span of
        // positions give the range of their timestamps, which is the window to read
        // (it may include readings the client already has; clients remove duplicates by
        // device, metric and ts).
        let Some(first) = state
            .checkpoints
            .partition_point(|c| c.first_seq <= pos.seq + 1)
            .checked_sub(1)
        else {
            return reset("that position is older than the gateway remembers");
        };
        let (from_ms, to_ms) = state
            .checkpoints
            .range(first..)
            .take_while(|c| c.first_seq < ring_first)
            .fold((i64::MAX, i64::MIN), |(lo, hi), c| {
                (lo.min(c.min_ts), hi.max(c.max_ts))
            });
        if from_ms > to_ms {
            return reset("that position is older than the gateway remembers");
        }
        Start::GapFill {
            from_ms,
            to_ms: to_ms.saturating_add(1),
            then: after(pos.seq),
        }
    }

    /// The latest position assigned.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: lock(&self.state).seq,
        }
    }

    /// The label source (for filters evaluated outside the hub, e.g. gap-fill).
    pub fn labels(&self) -> &dyn DeviceLabels {
        &*self.labels
    }
}

/// What a subscriber takes from its queue at once.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Readings in stream order.
    pub readings: Vec<Arc<LiveReading>>,
    /// Readings replaced by newer ones of the same series since the last delivery.
    pub conflated: u64,
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    sub: Arc<Subscriber>,
}

impl Subscription {
    /// Wait until readings are queued, then take up to `max` of them.
    pub async fn next(&self, max: usize) -> Delivery {
        loop {
            let notified = self.sub.notify.notified();
            {
                let mut q = lock(&self.sub.queue);
                if q.len() > 0 {
                    let conflated = std::mem::take(&mut q.conflated);
                    let readings: Vec<_> = q.take(max);
                    let n = readings.len();
                    let more = q.len() > 0;
                    self.hub.metrics.add_queue_depth(Queue::Live, -(n as i64));
                    if more {
                        // Leave a permit so the next call does not wait.
                        self.sub.notify.notify_one();
                    }
                    return Delivery {
                        readings,
                        conflated,
                    };
                }
            }
            notified.await;
        }
    }

    /// Add a filter named `id` to this subscription; returns the snapshot of what it
    /// newly selects. Readings already selected by other filters are not duplicated.
    pub fn add_filter(
        &self,
        id: String,
        filter: Filter,
    ) -> Result<Vec<Arc<LiveReading>>, LiveError> {
        self.hub.check_filter(&filter)?;
        let mut state = lock(&self.hub.state);
        let snapshot = self.hub.snapshot(&state, &filter);
        let limit = self.hub.limits.max_subscriptions.min(64);
        let entry = state
            .subscribers
            .get_mut(&self.id)
            .ok_or(LiveError::Closed)?;
        entry.filters.retain(|(i, _)| *i != id);
        if entry.filters.len() >= limit {
            return Err(LiveError::TooManySubscriptions { limit });
        }
        entry.filters.push((id, filter));
        entry.cache.clear();
        state.index(self.id);
        Ok(snapshot)
    }

    /// Remove the filter named `id`; false if there was none.
    pub fn remove_filter(&self, id: &str) -> bool {
        let mut state = lock(&self.hub.state);
        let Some(entry) = state.subscribers.get_mut(&self.id) else {
            return false;
        };
        let before = entry.filters.len();
        entry.filters.retain(|(i, _)| i != id);
        entry.cache.clear();
        let removed = entry.filters.len() != before;
        state.index(self.id);
        removed
    }

    /// Readings queued for this subscriber now.
    pub fn queued(&self) -> usize {
        lock(&self.sub.queue).len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = lock(&self.hub.state);
        state.subscribers.remove(&self.id);
        state.unindex(self.id);
        drop(state);
        let left = lock(&self.sub.queue).len() as i64;
        self.hub.metrics.add_queue_depth(Queue::Live, -left);
        self.hub.metrics.add_live_subscribers(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NoLabels, Value};

    fn hub(client_queue: usize, ring_capacity: usize) -> Arc<Hub> {
        Arc::new(Hub::new(
            7,
            HubLimits {
                ring_capacity,
                ring_bytes: 1 << 30,
                client_queue,
                max_subscribers: 2,
                max_filters: 3,
                max_subscriptions: 4,
            },
            Arc::new(NoLabels),
            Arc::new(Metrics::default()),
        ))
    }

    fn r(device: &str, metric: &str, ts: i64) -> Reading {
        Reading {
            device: device.into(),
            metric: metric.into(),
            ts_ms: ts,
            value: Value::I64(ts),
        }
    }

    fn only(devices: &[&str], metrics: &[&str]) -> Filter {
        Filter {
            devices: devices.iter().map(|s| s.to_string()).collect(),
            metrics: metrics.iter().map(|s| s.to_string()).collect(),
            ..Filter::default()
        }
    }

    #[tokio::test]
    async fn snapshot_then_stream_with_filter() {
        let hub = hub(100, 100);
        hub.publish(&[
            r("a", "t", 1),
            r("b", "t", 1),
            r("a", "h", 1),
            r("a", "t", 2),
        ]);
        let (sub, start, at) = hub
            .subscribe("s".into(), only(&["a"], &["t"]), None)
            .unwrap();
        assert_eq!(at, Position { epoch: 7, seq: 4 });
        let Start::Snapshot(snap) = start else {
            panic!("expected a snapshot")
        };
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].reading.ts_ms, 2);
        assert_eq!(snap[0].seq, 4);
        hub.publish(&[r("b", "t", 3), r("a", "t", 3)]);
        let d = sub.next(10).await;
        assert_eq!(d.readings.len(), 1);
        assert_eq!(d.readings[0].seq, 6);
        assert_eq!(d.conflated, 0);
    }

    #[tokio::test]
    async fn full_queue_conflates_to_latest_per_series() {
        let hub = hub(4, 100);
        let (sub, _, _) = hub.subscribe("s".into(), Filter::default(), None).unwrap();
        for ts in 0..10 {
            hub.publish(&[r("a", "t", ts), r("b", "t", ts)]);
        }
        let d = sub.next(100).await;
        let got: Vec<_> = d
            .readings
            .iter()
            .map(|l| (l.reading.device.to_string(), l.reading.ts_ms))
            .collect();
        assert!(got.contains(&("a".into(), 9)) && got.contains(&("b".into(), 9)));
        assert_eq!(d.conflated as usize + got.len(), 20);
        assert!(d.conflated > 0);
    }

    #[test]
    fn resume_from_ring_store_or_reset() {
        let hub = hub(100, 5);
        for ts in 1..=10 {
            hub.publish(&[r("a", "t", ts)]);
        }
        // The ring holds seq 6..=10. Position 7 replays 8, 9, 10.
        let pos = |seq| Some(Position { epoch: 7, seq });
        let (_s1, start, _) = hub
            .subscribe("s".into(), Filter::default(), pos(7))
            .unwrap();
        let Start::Replay(replay) = start else {
            panic!("expected a replay")
        };
        assert_eq!(replay.iter().map(|l| l.seq).collect::<Vec<_>>(), [8, 9, 10]);
        drop(_s1);
        // Position 5 is right before the ring: still a replay of all of it.
        let (s2, start, _) = hub
            .subscribe("s".into(), Filter::default(), pos(5))
            .unwrap();
        assert!(matches!(start, Start::Replay(ref v) if v.len() == 5));
        drop(s2);
        // Position 2 is older than the ring: gap-fill, then the ring.
        let (s3, start, _) = hub
            .subscribe("s".into(), Filter::default(), pos(2))
            .unwrap();
        let Start::GapFill {
            from_ms,
            to_ms,
            then,
        } = start
        else {
            panic!("expected a gap-fill")
        };
        assert!(from_ms < to_ms);
        assert_eq!(then.first().map(|l| l.seq), Some(6));
        drop(s3);
        // Another epoch: reset with a snapshot.
        let other = Some(Position { epoch: 6, seq: 9 });
        let (_s4, start, _) = hub.subscribe("s".into(), Filter::default(), other).unwrap();
        assert!(matches!(start, Start::Reset { ref snapshot, .. } if snapshot.len() == 1));
    }

    #[test]
    fn given_positions_let_a_subscriber_resume_on_another_hub() {
        // Two nodes' hubs fed the same records at the stream's positions.
        let (one, two) = (hub(100, 100), hub(100, 100));
        let readings = [r("a", "t", 1), r("a", "t", 2), r("b", "t", 3)];
        let seqs = [(5 << 16), (5 << 16) | 1, (9 << 16)];
        for h in [&one, &two] {
            h.publish_at(&readings[..2], &seqs[..2]);
        }
        let (_sub, _, at) = one.subscribe("s".into(), Filter::default(), None).unwrap();
        assert_eq!(
            at,
            Position {
                epoch: 7,
                seq: (5 << 16) | 1
            }
        );
        for h in [&one, &two] {
            h.publish_at(&readings[2..], &seqs[2..]);
            // Published again (a redelivery): skipped.
            h.publish_at(&readings[..1], &seqs[..1]);
        }
        assert_eq!(
            two.position(),
            Position {
                epoch: 7,
                seq: 9 << 16
            }
        );
        let (_s2, start, _) = two
            .subscribe("s".into(), Filter::default(), Some(at))
            .unwrap();
        let Start::Replay(missed) = start else {
            panic!("expected a replay")
        };
        let got: Vec<_> = missed.iter().map(|l| (l.seq, l.reading.ts_ms)).collect();
        assert_eq!(got, [(9 << 16, 3)]);
    }

    #[test]
    fn limits_are_enforced() {
        let hub = hub(10, 10);
        let too_many = only(&["a", "b", "c", "d"], &[]);
        assert!(matches!(
            hub.subscribe("s".into(), too_many, None),
            Err(LiveError::TooManyFilters { count: 4, limit: 3 })
        ));
        let _a = hub.subscribe("s".into(), Filter::default(), None).unwrap();
        let b = hub.subscribe("s".into(), Filter::default(), None).unwrap();
        assert!(matches!(
            hub.subscribe("s".into(), Filter::default(), None),
            Err(LiveError::TooManySubscribers { limit: 2 })
        ));
        drop(b);
        assert!(hub.subscribe("s".into(), Filter::default(), None).is_ok());
    }

    #[tokio::test]
    async fn filters_can_be_added_and_removed() {
        let hub = hub(100, 100);
        hub.publish(&[r("a", "t", 1), r("b", "t", 1)]);
        let (sub, _, _) = hub
            .subscribe("one".into(), only(&["a"], &[]), None)
            .unwrap();
        let snap = sub.add_filter("two".into(), only(&["b"], &[])).unwrap();
        assert_eq!(snap.len(), 1);
        hub.publish(&[r("a", "t", 2), r("b", "t", 2), r("c", "t", 2)]);
        assert_eq!(sub.next(10).await.readings.len(), 2);
        assert!(sub.remove_filter("two"));
        assert!(!sub.remove_filter("two"));
        hub.publish(&[r("b", "t", 3), r("a", "t", 3)]);
        let d = sub.next(10).await;
        assert_eq!(d.readings.len(), 1);
        assert_eq!(&*d.readings[0].reading.device, "a");
    }
}
