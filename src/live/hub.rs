//! The live hub: positions, the last-value cache, the resume ring and subscriber queues.
//!
//! `publish` is called by the pipeline and never waits on a subscriber: it takes one
//! short lock, appends to bounded in-memory structures and wakes subscribers. A
//! subscriber whose queue is full gets its pending readings conflated to the latest per
//! series (and a count of how many were replaced) instead of slowing anyone down.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::model::{DeviceId, MetricName, Reading};
use crate::observe::{Event, Metrics};

/// A reading with its stream position.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveReading {
    /// Sequence number within this gateway run's epoch (starts at 1).
    pub seq: u64,
    /// The reading.
    pub reading: Reading,
}

/// Which readings a subscriber wants. Empty sets mean "all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Device ids; empty = every device.
    pub devices: HashSet<String>,
    /// Metric names; empty = every metric.
    pub metrics: HashSet<String>,
}

impl Filter {
    /// Whether a reading passes this filter.
    pub fn matches(&self, r: &Reading) -> bool {
        (self.devices.is_empty() || self.devices.contains(&*r.device))
            && (self.metrics.is_empty() || self.metrics.contains(&*r.metric))
    }
}

/// Errors of subscribing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// The gateway has as many subscribers as it allows.
    #[error("too many live subscribers (limit {limit})")]
    TooManySubscribers {
        /// The configured limit.
        limit: usize,
    },
    /// The filter names more devices and metrics than allowed.
    #[error("too many filters in one subscription ({count}, limit {limit})")]
    TooManyFilters {
        /// Filters requested.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// Hub limits.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Readings kept for resume.
    pub ring_capacity: usize,
    /// Readings queued per subscriber before conflation.
    pub client_queue: usize,
    /// Concurrent subscribers.
    pub max_subscribers: usize,
    /// Device ids plus metric names per subscription.
    pub max_filters: usize,
}

#[derive(Default)]
struct ClientQueue {
    items: VecDeque<Arc<LiveReading>>,
    conflated: u64,
}

struct Subscriber {
    filter: Filter,
    queue: Mutex<ClientQueue>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    seq: u64,
    latest: HashMap<DeviceId, HashMap<MetricName, Arc<LiveReading>>>,
    ring: VecDeque<Arc<LiveReading>>,
    subscribers: HashMap<u64, Arc<Subscriber>>,
    next_id: u64,
}

/// The hub. Shared as `Arc<Hub>`.
pub struct Hub {
    epoch: u64,
    limits: HubLimits,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a hub lock cannot leave the plain data inside inconsistent
    // in a way that matters more than stopping the live view, so recover the guard.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    /// A hub for a gateway run identified by `epoch`.
    pub fn new(epoch: u64, limits: HubLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            epoch,
            limits,
            state: Mutex::new(State::default()),
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
        if readings.is_empty() {
            return;
        }
        let mut state = lock(&self.state);
        let state = &mut *state;
        let mut positioned = Vec::with_capacity(readings.len());
        for r in readings {
            state.seq += 1;
            let live = Arc::new(LiveReading {
                seq: state.seq,
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
            if state.ring.len() == self.limits.ring_capacity {
                state.ring.pop_front();
            }
            state.ring.push_back(live.clone());
            positioned.push(live);
        }
        for sub in state.subscribers.values() {
            let mut matched = positioned
                .iter()
                .filter(|l| sub.filter.matches(&l.reading))
                .peekable();
            if matched.peek().is_none() {
                continue;
            }
            let mut q = lock(&sub.queue);
            q.items.extend(matched.cloned());
            if q.items.len() > self.limits.client_queue {
                let before = q.items.len();
                conflate(&mut q.items);
                let replaced = (before - q.items.len()) as u64;
                q.conflated += replaced;
                self.metrics.emit(Event::Conflated { count: replaced });
            }
            drop(q);
            sub.notify.notify_one();
        }
    }

    /// Subscribe: returns the subscription and a snapshot of the latest value of every
    /// matching series, taken atomically with registration so nothing falls between the
    /// snapshot and the stream.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: Filter,
    ) -> Result<(Subscription, Vec<Arc<LiveReading>>), LiveError> {
        let count = filter.devices.len() + filter.metrics.len();
        if count > self.limits.max_filters {
            return Err(LiveError::TooManyFilters {
                count,
                limit: self.limits.max_filters,
            });
        }
        let mut state = lock(&self.state);
        if state.subscribers.len() >= self.limits.max_subscribers {
            return Err(LiveError::TooManySubscribers {
                limit: self.limits.max_subscribers,
            });
        }
        let mut snapshot: Vec<Arc<LiveReading>> = if filter.devices.is_empty() {
            state
                .latest
                .values()
                .flat_map(|m| m.values())
                .cloned()
                .collect()
        } else {
            filter
                .devices
                .iter()
                .filter_map(|d| state.latest.get(d.as_str()))
                .flat_map(|m| m.values())
                .cloned()
                .collect()
        };
        snapshot.retain(|l| filter.matches(&l.reading));
        snapshot.sort_by_key(|l| l.seq);
        let id = state.next_id;
        state.next_id += 1;
        let sub = Arc::new(Subscriber {
            filter,
            queue: Mutex::new(ClientQueue::default()),
            notify: Notify::new(),
        });
        state.subscribers.insert(id, sub.clone());
        drop(state);
        self.metrics.add_live_subscribers(1);
        Ok((
            Subscription {
                hub: self.clone(),
                id,
                sub,
            },
            snapshot,
        ))
    }

    /// The latest sequence number assigned.
    pub fn last_seq(&self) -> u64 {
        lock(&self.state).seq
    }
}

/// Keep only the newest queued reading of each series, in stream order.
fn conflate(items: &mut VecDeque<Arc<LiveReading>>) {
    let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(items.len());
    let mut keep = vec![false; items.len()];
    for (i, l) in items.iter().enumerate().rev() {
        keep[i] = seen.insert((&l.reading.device, &l.reading.metric));
    }
    let mut i = 0;
    items.retain(|_| {
        i += 1;
        keep[i - 1]
    });
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
                if !q.items.is_empty() {
                    let n = q.items.len().min(max);
                    let conflated = std::mem::take(&mut q.conflated);
                    let more = q.items.len() > n;
                    let readings = q.items.drain(..n).collect();
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
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.hub.state).subscribers.remove(&self.id);
        self.hub.metrics.add_live_subscribers(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Value;

    fn hub(client_queue: usize) -> Arc<Hub> {
        Arc::new(Hub::new(
            7,
            HubLimits {
                ring_capacity: 100,
                client_queue,
                max_subscribers: 2,
                max_filters: 3,
            },
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

    #[tokio::test]
    async fn snapshot_then_stream_with_filter() {
        let hub = hub(100);
        hub.publish(&[
            r("a", "t", 1),
            r("b", "t", 1),
            r("a", "h", 1),
            r("a", "t", 2),
        ]);
        let filter = Filter {
            devices: ["a".to_owned()].into(),
            metrics: ["t".to_owned()].into(),
        };
        let (sub, snap) = hub.subscribe(filter).expect("subscribe");
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
        let hub = hub(4);
        let (sub, _) = hub.subscribe(Filter::default()).expect("subscribe");
        for ts in 0..10 {
            hub.publish(&[r("a", "t", ts), r("b", "t", ts)]);
        }
        let d = sub.next(100).await;
        let got: Vec<_> = d
            .readings
            .iter()
            .map(|l| (l.reading.device.to_string(), l.reading.ts_ms))
            .collect();
        // Conflation runs whenever the queue passes 4 items; what survives always
        // includes the newest reading of each series.
        assert!(got.contains(&("a".into(), 9)) && got.contains(&("b".into(), 9)));
        assert_eq!(d.conflated as usize + got.len(), 20);
        assert!(d.conflated > 0);
    }

    #[test]
    fn limits_are_enforced() {
        let hub = hub(10);
        let too_many = Filter {
            devices: ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect(),
            metrics: HashSet::new(),
        };
        assert!(matches!(
            hub.subscribe(too_many),
            Err(LiveError::TooManyFilters { count: 4, limit: 3 })
        ));
        let _a = hub.subscribe(Filter::default()).expect("1");
        let b = hub.subscribe(Filter::default()).expect("2");
        assert!(matches!(
            hub.subscribe(Filter::default()),
            Err(LiveError::TooManySubscribers { limit: 2 })
        ));
        drop(b);
        assert!(hub.subscribe(Filter::default()).is_ok());
    }
}
