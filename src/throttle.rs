//! Per-address token buckets for `POST /publish` (`--publish-rate`, `--publish-burst`): one client
//! address may publish a burst, then the rate; past it the request is answered 429 before its body
//! is read. A socket's own commands have their bucket in [`crate::session`].
//!
//! Addresses are IPv4 addresses and IPv6 /64 prefixes (one host usually holds a whole /64, so its
//! addresses share one bucket). Behind an HTTP proxy every publisher has the proxy's address and
//! shares its bucket: size the rate for that, or publish from behind a TCP (layer 4) balancer.
//!
//! Memory is bounded: at most [`MAX_TRACKED`] addresses are tracked. A bucket that has refilled
//! is forgotten when room is needed (a fresh bucket is the same); past that the longest idle are
//! forgotten early, and come back with a full burst.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Most addresses tracked at once (about 40 bytes each).
pub const MAX_TRACKED: usize = 16_384;

/// The bucket of one address.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Who shares a bucket: an IPv4 address, or the first 64 bits of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    V6(u64),
}

impl Key {
    fn of(ip: IpAddr) -> Key {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Key::V4(v4.to_bits()),
            IpAddr::V6(v6) => Key::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

pub struct Throttle {
    rate: f64,
    burst: f64,
    // A std Mutex: held for a map lookup and a little arithmetic, never across an await, and
    // taken once per HTTP publish, which is far from the node's hot path.
    buckets: Mutex<HashMap<Key, Bucket>>,
}

impl Throttle {
    pub fn new(rate: u32, burst: u32) -> Throttle {
        Throttle {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token from `ip`'s bucket; `Err` says how long until it has one.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = Key::of(ip);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= MAX_TRACKED {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        bucket.tokens = self.refilled(bucket, now);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.burst)
    }

    /// Forgets full buckets, then, if that freed less than a quarter, the longest idle down to
    /// half: each pass frees a quarter of the map at least, so the cost stays constant per request.
    fn make_room(&self, buckets: &mut HashMap<Key, Bucket>, now: Instant) {
        buckets.retain(|_, b| self.refilled(b, now) < self.burst);
        if buckets.len() > MAX_TRACKED * 3 / 4 {
            let mut idle: Vec<(Instant, Key)> = buckets.iter().map(|(k, b)| (b.last, *k)).collect();
            let keep = MAX_TRACKED / 2;
            let cut = idle.len() - keep;
            idle.select_nth_unstable_by_key(cut, |(last, _)| *last);
            for (_, key) in &idle[..cut] {
                buckets.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from_bits(n))
    }

    #[test]
    fn a_burst_then_the_rate() {
        let t = Throttle::new(10, 3);
        let t0 = Instant::now();
        let ip = v4(1);
        for _ in 0..3 {
            assert_eq!(t.admit(ip, t0), Ok(()));
        }
        let wait = t.admit(ip, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        // Another address has its own bucket.
        assert_eq!(t.admit(v4(2), t0), Ok(()));
        assert_eq!(t.admit(ip, t0 + Duration::from_millis(100)), Ok(()));
        // Refills up to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(t.admit(ip, later), Ok(()));
        }
        assert!(t.admit(ip, later).is_err());
    }

    #[test]
    fn ipv6_hosts_share_their_64_and_mapped_v4_is_v4() {
        let t = Throttle::new(1, 1);
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(t.admit(a, now).is_ok());
        assert!(t.admit(b, now).is_err(), "same /64");
        assert!(t.admit(other, now).is_ok());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(t.admit(mapped, now).is_ok());
        assert!(t.admit("192.0.2.7".parse().unwrap(), now).is_err());
    }

    #[test]
    fn the_map_stays_bounded() {
        let t = Throttle::new(1, 5);
        let t0 = Instant::now();
        // Addresses that keep their buckets partly spent: none is forgotten as full.
        for n in 0..(MAX_TRACKED as u32 * 3) {
            let _ = t.admit(v4(n), t0 + Duration::from_micros(u64::from(n)));
            assert!(t.tracked() <= MAX_TRACKED);
        }
        // The newest are still tracked, so a busy address keeps its spent bucket.
        let busy = v4(MAX_TRACKED as u32 * 3 - 1);
        let now = t0 + Duration::from_micros(u64::from(MAX_TRACKED as u32 * 3));
        for _ in 0..4 {
            assert!(t.admit(busy, now).is_ok());
        }
        assert!(t.admit(busy, now).is_err());
        // Idle, refilled buckets are forgotten first.
        let t = Throttle::new(1000, 1);
        for n in 0..MAX_TRACKED as u32 {
            let _ = t.admit(v4(n), t0);
        }
        assert_eq!(t.tracked(), MAX_TRACKED);
        let _ = t.admit(v4(u32::MAX), t0 + Duration::from_secs(1));
        assert_eq!(t.tracked(), 1);
    }
}
