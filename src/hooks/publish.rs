//! The publish hook (`--hook-publish GLOB=URL`): a message to a matching room goes to the app's
//! backend before the bus, as `{"user":U,"room":R,"data":D}` (and `"key"` where it has one; `data`
//! as JSON whatever the publisher's encoding). The backend answers `{"ok":true}` (publish it),
//! `{"data":D2}` (publish D2 instead: masking) or `{"error":{"code":…,"message":…}}` (publish
//! nothing; the publisher gets that error).
//!
//! The order of a sender's messages is the caller's to keep ([`crate::publish::outbox`]).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{route, settings::OnError, AppError, Hooks, Refusal};

/// What the backend made of a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Moderated {
    /// Publish it as it is.
    AsIs,
    /// Publish this JSON instead.
    Replaced(Bytes),
}

#[derive(Serialize)]
struct Ask<'a> {
    user: &'a str,
    room: &'a str,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer<'a> {
    ok: Option<bool>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    error: Option<AppError>,
}

/// One of the three answers, or why the body is none of them.
fn answer(body: &[u8]) -> Result<Result<Moderated, Refusal>, String> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("not a publish answer: {e}"))?;
    match (a.ok, a.data, a.error) {
        (Some(true), None, None) => Ok(Ok(Moderated::AsIs)),
        (None, Some(data), None) => Ok(Ok(Moderated::Replaced(Bytes::copy_from_slice(data.get().as_bytes())))),
        (None, None, Some(e)) => Ok(Err(e.refusal()?)),
        _ => Err(r#"expected one of {"ok":true}, {"data":D} or {"error":{"code":C,"message":M}}"#.into()),
    }
}

impl Hooks {
    /// Whether a publish to `room` goes to a backend first.
    pub fn moderates(&self, room: &str) -> bool {
        route(&self.inner.publish, room).is_some()
    }

    /// What the backend makes of `data` (JSON) from `user` to `room`; as it is when no hook
    /// matches the room, or when the backend fails and `--hook-on-error publish=allow`.
    pub async fn publish(
        &self,
        user: &str,
        room: &str,
        data: &RawValue,
        key: Option<&str>,
    ) -> Result<Moderated, Refusal> {
        let Some(backend) = route(&self.inner.publish, room) else {
            return Ok(Moderated::AsIs);
        };
        let ask = Ask { user, room, data, key };
        // Serializing strings and a JSON value already checked cannot fail.
        let body = serde_json::to_vec(&ask).unwrap_or_default();
        match backend.ask(self.client(), "publish", body, answer).await {
            Ok(said) => said,
            Err(_) if self.settings().on_error.publish == OnError::Allow => Ok(Moderated::AsIs),
            Err(e) => Err(Refusal::Failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_answers_read_and_every_other_shape_is_an_error() {
        assert_eq!(answer(br#"{"ok":true}"#).unwrap().unwrap(), Moderated::AsIs);
        assert_eq!(
            answer(br#"{"data":{"text":"***"}}"#).unwrap().unwrap(),
            Moderated::Replaced(Bytes::from_static(br#"{"text":"***"}"#))
        );
        match answer(br#"{"error":{"code":"slur","message":"mind your words"}}"#).unwrap() {
            Err(Refusal::App { code, message }) => {
                assert_eq!((code.as_str(), message.as_str()), ("slur", "mind your words"))
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &b"not json"[..],
            br#"{"ok":false}"#,
            br#"{}"#,
            br#"[]"#,
            br#"{"ok":true,"data":1}"#,
            br#"{"ok":true,"extra":1}"#,
            br#"{"error":{"code":"Bad Code"}}"#,
            br#"{"error":"no"}"#,
        ] {
            assert!(answer(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
