//! When a client of the match connects again, as the JS client (`clients/js/src/index.ts`) decides
//! it: at the node's time when the node sent `reconnect` with `after_ms` (it spread its clients
//! over its drain window), else after a full-jitter pause, uniform in `[0, min(cap, base·2^n)]`
//! for the `n`-th attempt in a row, `n` starting again from 0 once a connection opens. A 503 with
//! `Retry-After` (which a browser cannot see, but a phone's own stack can) is waited out first.
//! Pure: the random draw is given, so the rule is tested without a clock.

use std::time::Duration;

/// What the last connection or try said about coming back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Nothing: a close, a reset, a refused or failed try.
    None,
    /// The node's `reconnect` frame: come back this long from now (what is left of `after_ms`).
    ComeBackIn(Duration),
    /// A 503 answer to the upgrade with `Retry-After`.
    RetryAfter(Duration),
}

/// One client's reconnect state.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    /// A connection opened: the next loss starts from the first ceiling again.
    pub fn opened(&mut self) {
        self.attempt = 0;
    }

    /// The longest pause of the next attempt without a hint: `min(cap, base·2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        // Past 2^20 every base of a millisecond or more is over any sensible cap.
        self.base.saturating_mul(1 << self.attempt.min(20)).min(self.cap)
    }

    /// The pause before the next attempt, given what the last connection said and `draw`, uniform
    /// in `[0, 1)`; counts the attempt.
    pub fn next(&mut self, hint: Hint, draw: f64) -> Duration {
        let jitter = self.ceiling().mul_f64(draw.clamp(0.0, 1.0));
        self.attempt = self.attempt.saturating_add(1);
        match hint {
            Hint::ComeBackIn(left) => left,
            Hint::RetryAfter(at_least) => at_least.max(jitter),
            Hint::None => jitter,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn full_jitter_doubles_its_ceiling_up_to_the_cap_and_starts_again_once_open() {
        let mut b = Backoff::new(MS(500), MS(4000));
        let ceilings: Vec<Duration> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                assert_eq!(b.next(Hint::None, 0.999_999), c.mul_f64(0.999_999));
                c
            })
            .collect();
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 4000, 4000].map(MS));
        assert_eq!(b.next(Hint::None, 0.0), Duration::ZERO, "full jitter starts at 0");
        b.opened();
        assert_eq!(b.ceiling(), MS(500));
        assert_eq!(b.next(Hint::None, 0.5), MS(250));
    }

    #[test]
    fn the_nodes_time_is_obeyed_and_retry_after_waited_out() {
        let mut b = Backoff::new(MS(500), MS(20_000));
        assert_eq!(b.next(Hint::ComeBackIn(MS(1234)), 0.9), MS(1234), "no jitter on top");
        assert_eq!(b.ceiling(), MS(1000), "it still counts as an attempt");
        assert_eq!(b.next(Hint::RetryAfter(MS(3000)), 0.5), MS(3000));
        // A ceiling past Retry-After can draw longer.
        let mut long = Backoff::new(MS(10_000), MS(20_000));
        assert_eq!(long.next(Hint::RetryAfter(MS(1000)), 0.5), MS(5000));
        let mut many = Backoff::new(MS(1), MS(20_000));
        for _ in 0..100 {
            many.next(Hint::None, 0.1);
        }
        assert_eq!(many.ceiling(), MS(20_000), "no overflow after many attempts");
    }
}
