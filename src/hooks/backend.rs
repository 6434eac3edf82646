//! One backend URL as the hooks see it: its [`Breaker`], the bound on its requests in flight
//! (`--hook-max-inflight`), its metrics, and its log, which says what went wrong at most once per
//! [`LOG_EVERY`] (with how many failures it did not say) instead of once per request.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use reqwest::Url;
use tokio::sync::Semaphore;

use super::{
    breaker::Breaker,
    client::{Client, HookError},
};
use crate::metrics as m;

/// How often a failing backend's errors are logged.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A hook's name: the label of its metrics, and what its log lines say.
pub type Hook = &'static str;

pub struct Backend {
    url: Url,
    /// The hooks that call this URL: an open breaker is counted under each.
    hooks: Vec<Hook>,
    // A std Mutex: held only to read or flip a few fields, never across an await.
    breaker: Mutex<Breaker>,
    inflight: Arc<Semaphore>,
    log: Mutex<Quiet>,
}

/// What the log held back since it last spoke.
#[derive(Default)]
struct Quiet {
    last: Option<Instant>,
    held: u64,
}

impl Backend {
    pub fn new(url: Url, hooks: Vec<Hook>, max_inflight: usize) -> Backend {
        Backend {
            url,
            hooks,
            breaker: Mutex::new(Breaker::default()),
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            log: Mutex::new(Quiet::default()),
        }
    }

    /// Asks the backend for `hook`: POSTs `body`, then reads its answer with `answer`. Fails at
    /// once when the breaker is open or the backend has `--hook-max-inflight` requests out; a
    /// failure (an answer `answer` refuses included) counts towards opening the breaker.
    pub async fn ask<T>(
        &self,
        client: &Client,
        hook: Hook,
        body: Vec<u8>,
        answer: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<T, HookError> {
        let result = self.call(client, hook, body, answer).await;
        if let Err(e) = &result {
            m::hook_error(hook, e.kind());
            self.complain(hook, e);
        }
        result
    }

    async fn call<T>(
        &self,
        client: &Client,
        hook: Hook,
        body: Vec<u8>,
        answer: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<T, HookError> {
        if !self.lock_breaker().admit(Instant::now()) {
            return Err(HookError::Open);
        }
        let Ok(_permit) = self.inflight.try_acquire() else {
            // A backend with every place taken is overloaded: a failure like any other.
            self.settle(false);
            return Err(HookError::Busy);
        };
        let started = Instant::now();
        let result = client
            .post(&self.url, body)
            .await
            .and_then(|bytes| answer(&bytes).map_err(HookError::Answer));
        m::hook_request(hook, started.elapsed());
        self.settle(result.is_ok());
        result
    }

    /// Records an outcome in the breaker, and a breaker that opened or closed in the gauge.
    fn settle(&self, ok: bool) {
        let changed = {
            let mut breaker = self.lock_breaker();
            if ok {
                breaker.succeeded().then_some(false)
            } else {
                breaker.failed(Instant::now()).then_some(true)
            }
        };
        if let Some(open) = changed {
            for hook in &self.hooks {
                m::hook_breaker(hook, open);
            }
            if open {
                tracing::warn!(url = %self.url, "hook backend failing: circuit open, requests fail at once for a cool-down");
            } else {
                tracing::info!(url = %self.url, "hook backend answering again: circuit closed");
            }
        }
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // A panic while the lock was held left a breaker of plain counters: still usable.
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a failure unless one was logged within [`LOG_EVERY`]; then counts it for the next line.
    /// Whether it logged.
    fn complain(&self, hook: Hook, e: &HookError) -> bool {
        let now = Instant::now();
        let held = {
            let mut quiet = self.log.lock().unwrap_or_else(|e| e.into_inner());
            if quiet.last.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
                quiet.held += 1;
                return false;
            }
            quiet.last = Some(now);
            std::mem::take(&mut quiet.held)
        };
        tracing::warn!(hook, url = %self.url, error = %e, not_logged = held, "hook failed (failures are logged at most once per 10s)");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_backend_is_logged_once_per_interval_not_once_per_request() {
        let backend = Backend::new(Url::parse("http://127.0.0.1:9/hook").unwrap(), vec!["publish"], 1);
        let spoke: Vec<bool> = (0..100)
            .map(|_| backend.complain("publish", &HookError::Status(500)))
            .collect();
        assert_eq!(
            spoke.iter().filter(|s| **s).count(),
            1,
            "one line for a burst of failures"
        );
        assert_eq!(
            backend.log.lock().unwrap().held,
            99,
            "the rest counted for the next line"
        );
    }
}
