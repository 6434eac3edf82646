//! The join hook (`--hook-join GLOB=URL`): a join of a matching room asks the app's backend with
//! `{"user":U,"room":R}`; it answers `{"ok":true}` or `{"error":{"code":…,"message":…}}` (the
//! join's error). With `--hook-join-cache` an answer holds for its (user, room) that long, so a
//! client that rejoins after a reconnect does not ask again; a failure is never kept.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{route, settings::OnError, AppError, Hooks, Refusal};

/// The most answers the cache keeps; past it, the expired ones go, then all of them.
const MAX_CACHED: usize = 100_000;

/// A join answer kept, and until when.
type Kept = (Instant, Result<(), Refusal>);

/// Join answers by (user, room), each until it expires.
pub struct Cache {
    ttl: Duration,
    // A std Mutex: a lookup or an insert, never held across an await.
    answers: Mutex<HashMap<(String, String), Kept>>,
}

impl Cache {
    pub fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            answers: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, user: &str, room: &str) -> Option<Result<(), Refusal>> {
        if self.ttl.is_zero() {
            return None;
        }
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let (until, answer) = answers.get(&(user.to_owned(), room.to_owned()))?;
        (Instant::now() < *until).then(|| answer.clone())
    }

    fn put(&self, user: &str, room: &str, answer: &Result<(), Refusal>) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if answers.len() >= MAX_CACHED {
            answers.retain(|_, (until, _)| now < *until);
            if answers.len() >= MAX_CACHED {
                answers.clear();
            }
        }
        answers.insert((user.to_owned(), room.to_owned()), (now + self.ttl, answer.clone()));
    }
}

#[derive(Serialize)]
struct Ask<'a> {
    user: &'a str,
    room: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    ok: Option<bool>,
    error: Option<AppError>,
}

fn answer(body: &[u8]) -> Result<Result<(), Refusal>, String> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("not a join answer: {e}"))?;
    match (a.ok, a.error) {
        (Some(true), None) => Ok(Ok(())),
        (None, Some(e)) => Ok(Err(e.refusal()?)),
        _ => Err(r#"expected {"ok":true} or {"error":{"code":C,"message":M}}"#.into()),
    }
}

impl Hooks {
    /// Whether `user` may join `room`: yes at once when no hook matches the room.
    pub async fn join(&self, user: &str, room: &str) -> Result<(), Refusal> {
        let Some(backend) = route(&self.inner.join, room) else {
            return Ok(());
        };
        if let Some(answer) = self.inner.joins.get(user, room) {
            return answer;
        }
        let body = serde_json::to_vec(&Ask { user, room }).unwrap_or_default();
        match backend.ask(self.client(), "join", body, answer).await {
            Ok(said) => {
                self.inner.joins.put(user, room, &said);
                said
            }
            Err(_) if self.settings().on_error.join == OnError::Allow => Ok(()),
            Err(e) => Err(Refusal::Failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_and_are_kept_only_with_a_cache() {
        assert!(answer(br#"{"ok":true}"#).unwrap().is_ok());
        assert!(matches!(
            answer(br#"{"error":{"code":"forbidden","message":"members only"}}"#).unwrap(),
            Err(Refusal::App { .. })
        ));
        for bad in [&b"{}"[..], br#"{"ok":true,"error":{"code":"x"}}"#, b"<html>"] {
            assert!(answer(bad).is_err());
        }
        let off = Cache::new(Duration::ZERO);
        off.put("u", "r", &Ok(()));
        assert!(off.get("u", "r").is_none());
        let on = Cache::new(Duration::from_secs(60));
        on.put("u", "r", &Ok(()));
        assert!(on.get("u", "r").is_some_and(|a| a.is_ok()));
        assert!(on.get("u", "other").is_none() && on.get("v", "r").is_none());
    }
}
