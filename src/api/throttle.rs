//! The per-address throttle of authentication failures: a client address that presents
//! bad credentials too often gets 429 with `Retry-After` for a while, before its
//! credential is looked at, so a flood of made-up keys or tokens costs one map lookup
//! each instead of a hash, a cache probe and maybe a database query.
//!
//! One token bucket per address: it holds `burst` failures, one comes back every
//! `refill`. A bad credential takes one; an address whose bucket is empty is throttled
//! until the next one comes back. Where checking a credential costs something (an
//! unknown operator key: a database lookup), the token is taken before the check and
//! given back if the credential was valid, so a burst of concurrent requests cannot all
//! pass before the first has failed. A throttled request takes nothing (so waiting out
//! the `Retry-After` always works), and credentials the cache knows as valid are never
//! throttled. IPv6 addresses are tracked per /64, the block one host
//! usually controls, so an attacker cannot get a fresh bucket per address.
//!
//! The table is bounded (`max_addresses`). Full-policy: evict the address that entered
//! the table first (the oldest entry), counted by the caller. An attacker with more
//! addresses than the table holds can thus get some of its buckets reset; that costs it
//! `max_addresses` failing requests per reset and is visible on the eviction counter.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// The throttle's limits.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleSettings {
    /// Failures an address may have in a burst before it is throttled.
    pub burst: u32,
    /// One failure is forgiven per `refill`.
    pub refill: Duration,
    /// Addresses tracked at once.
    pub max_addresses: usize,
}

struct Bucket {
    /// Failures the address may still have (fractional while refilling).
    tokens: f64,
    updated: Instant,
    /// Insertion number, to recognise this entry's slot in the eviction order.
    generation: u64,
}

struct Table {
    buckets: HashMap<IpAddr, Bucket>,
    order: VecDeque<(IpAddr, u64)>,
    next_generation: u64,
}

/// Authentication failures per client address.
pub struct FailureThrottle {
    settings: ThrottleSettings,
    table: Mutex<Table>,
}

impl FailureThrottle {
    /// An empty throttle.
    pub fn new(settings: ThrottleSettings) -> Self {
        Self {
            settings: ThrottleSettings {
                burst: settings.burst.max(1),
                max_addresses: settings.max_addresses.max(1),
                ..settings
            },
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                order: VecDeque::new(),
                next_generation: 0,
            }),
        }
    }

    /// Charge one failure to `addr` before its credential is checked: `Err(retry_after)`
    /// when its bucket is empty (throttled: nothing is charged), otherwise one token is
    /// taken and `Ok` carries how many other addresses were evicted to make room. A
    /// credential that turns out valid gives the token back ([`FailureThrottle::refund`]).
    /// Charging first means concurrent requests from one address cannot all pass a check
    /// before any of them has failed.
    pub fn charge(&self, addr: IpAddr, now: Instant) -> Result<u64, Duration> {
        let addr = key(addr);
        let mut table = lock(&self.table);
        if let Some(bucket) = table.buckets.get(&addr) {
            let tokens = self.refilled(bucket, now);
            if tokens < 1.0 {
                return Err(self.settings.refill.mul_f64(1.0 - tokens));
            }
            if let Some(b) = table.buckets.get_mut(&addr) {
                b.tokens = tokens - 1.0;
                b.updated = now;
            }
            return Ok(0);
        }
        let generation = table.next_generation;
        table.next_generation += 1;
        table.buckets.insert(
            addr,
            Bucket {
                tokens: f64::from(self.settings.burst) - 1.0,
                updated: now,
                generation,
            },
        );
        table.order.push_back((addr, generation));
        let mut evicted = 0;
        while table.order.len() > self.settings.max_addresses {
            if let Some((old, g)) = table.order.pop_front()
                && table.buckets.get(&old).is_some_and(|b| b.generation == g)
            {
                table.buckets.remove(&old);
                evicted += 1;
            }
        }
        Ok(evicted)
    }

    /// Give back the token [`FailureThrottle::charge`] took: the credential was valid.
    pub fn refund(&self, addr: IpAddr, now: Instant) {
        let addr = key(addr);
        let mut table = lock(&self.table);
        let Some(bucket) = table.buckets.get(&addr) else {
            return;
        };
        let tokens = self.refilled(bucket, now);
        if let Some(b) = table.buckets.get_mut(&addr) {
            b.tokens = (tokens + 1.0).min(f64::from(self.settings.burst));
            b.updated = now;
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        lock(&self.table).buckets.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated);
        let refill = self.settings.refill.as_secs_f64();
        let back = if refill > 0.0 {
            elapsed.as_secs_f64() / refill
        } else {
            f64::INFINITY
        };
        (bucket.tokens + back).min(f64::from(self.settings.burst))
    }
}

/// The unit an address is tracked as: IPv4 addresses as they are, IPv6 per /64 (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn settings(burst: u32, max_addresses: usize) -> ThrottleSettings {
        ThrottleSettings {
            burst,
            refill: Duration::from_secs(1),
            max_addresses,
        }
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(i))
    }

    #[test]
    fn a_burst_of_failures_throttles_until_one_refills() {
        let t0 = Instant::now();
        let throttle = FailureThrottle::new(settings(3, 10));
        let a = v4(1);
        for _ in 0..3 {
            assert_eq!(throttle.charge(a, t0), Ok(0));
        }
        assert_eq!(throttle.charge(a, t0), Err(Duration::from_secs(1)));
        // Other addresses are not affected.
        assert_eq!(throttle.charge(v4(2), t0), Ok(0));
        // Half a refill later: still throttled, half a second to go.
        let half = t0 + Duration::from_millis(500);
        assert_eq!(throttle.charge(a, half), Err(Duration::from_millis(500)));
        // One failure is forgiven per second: one more try, then throttled again.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(throttle.charge(a, later), Ok(0));
        assert!(throttle.charge(a, later).is_err());
        // A valid credential gives its token back.
        let much_later = later + Duration::from_secs(3);
        for _ in 0..3 {
            assert_eq!(throttle.charge(a, much_later), Ok(0));
        }
        throttle.refund(a, much_later);
        assert_eq!(throttle.charge(a, much_later), Ok(0));
        assert!(throttle.charge(a, much_later).is_err());
        // Refunds never exceed the burst.
        for _ in 0..10 {
            throttle.refund(v4(2), much_later);
        }
        for _ in 0..3 {
            assert_eq!(throttle.charge(v4(2), much_later), Ok(0));
        }
        assert!(throttle.charge(v4(2), much_later).is_err());
    }

    #[test]
    fn the_table_stays_bounded_and_evicts_the_oldest() {
        let t0 = Instant::now();
        let throttle = FailureThrottle::new(settings(1, 100));
        let mut evicted = 0;
        for i in 0..10_000 {
            evicted += throttle.charge(v4(i), t0).unwrap();
            assert!(throttle.len() <= 100);
        }
        assert_eq!(throttle.len(), 100);
        assert_eq!(evicted, 9_900);
        assert!(throttle.charge(v4(9_999), t0).is_err());
        assert!(throttle.charge(v4(9_900), t0).is_err());
        // Evicted: the oldest addresses start over (and evict the next oldest).
        assert_eq!(throttle.charge(v4(0), t0), Ok(1));
    }

    #[test]
    fn ipv6_is_tracked_per_64() {
        let t0 = Instant::now();
        let throttle = FailureThrottle::new(settings(2, 10));
        let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1));
        let b = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0xffff, 2, 3, 4));
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert_eq!(throttle.charge(a, t0), Ok(0));
        assert_eq!(throttle.charge(b, t0), Ok(0));
        assert!(throttle.charge(a, t0).is_err());
        assert!(throttle.charge(b, t0).is_err());
        assert_eq!(throttle.charge(other, t0), Ok(0));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(throttle.charge(mapped, t0), Ok(0));
        assert_eq!(
            throttle.charge(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), t0),
            Ok(0)
        );
        assert!(
            throttle
                .charge(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), t0)
                .is_err()
        );
        // The /64 of `a` and `b`, `other`'s /64, and 10.0.0.1 in either notation.
        assert_eq!(throttle.len(), 3);
    }
}
