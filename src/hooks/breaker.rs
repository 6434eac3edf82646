//! A circuit breaker for one backend URL. After [`FAILURES`] failures in a row it opens: for
//! [`COOL_DOWN`] every request to that backend fails at once instead of waiting out its timeout,
//! so a dead backend costs the node nothing and the requests do not pile up against it. Once the
//! cool-down is over one request goes through as a probe (half-open): its success closes the
//! breaker, its failure opens it for another cool-down.
//!
//! Pure: the caller passes the time, and holds the breaker under its own lock.

use std::time::{Duration, Instant};

/// Failures in a row that open the breaker.
pub const FAILURES: u32 = 5;
/// How long an open breaker fails requests at once before it lets a probe through.
pub const COOL_DOWN: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Breaker {
    /// Failures since the last success.
    failures: u32,
    /// Open: no request goes through before this.
    closed_at: Option<Instant>,
}

impl Breaker {
    /// Whether a request may go to the backend now. The first one after a cool-down is the probe:
    /// the breaker stays shut to others for another cool-down while it is out.
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.closed_at {
            Some(at) if now < at => false,
            Some(_) => {
                self.closed_at = Some(now + COOL_DOWN);
                true
            }
            None => true,
        }
    }

    /// The backend answered: the breaker closes. True when it was open.
    pub fn succeeded(&mut self) -> bool {
        self.failures = 0;
        self.closed_at.take().is_some()
    }

    /// The backend failed: the breaker opens at the [`FAILURES`]th in a row (again after a failed
    /// probe). True when it opened now.
    pub fn failed(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.failures < FAILURES {
            return false;
        }
        let opened = self.closed_at.is_none();
        self.closed_at = Some(now + COOL_DOWN);
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_probes_after_the_cool_down_and_closes_on_success() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 1..FAILURES {
            assert!(b.admit(t0));
            assert!(!b.failed(t0));
        }
        // A success in between starts the count again.
        assert!(!b.succeeded());
        for _ in 1..FAILURES {
            assert!(!b.failed(t0));
        }
        assert!(b.failed(t0), "opens at the fifth in a row");
        assert!(!b.admit(t0 + COOL_DOWN / 2), "open: fails at once");
        let t1 = t0 + COOL_DOWN;
        assert!(b.admit(t1), "the probe");
        assert!(!b.admit(t1), "one probe at a time");
        assert!(!b.failed(t1), "a failed probe keeps it open");
        assert!(!b.admit(t1 + COOL_DOWN / 2));
        let t2 = t1 + COOL_DOWN;
        assert!(b.admit(t2));
        assert!(b.succeeded(), "a good probe closes it");
        assert!(b.admit(t2) && b.admit(t2));
    }
}
