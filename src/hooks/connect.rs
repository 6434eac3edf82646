//! The connect hook (`--hook-connect URL`): an upgrade that carries no valid token asks the app's
//! backend with `{"addr":A,"query":{…},"headers":{…}}` (and `"user":U` when the URL named one),
//! `headers` only those named by `--hook-forward-headers` (the app's own session cookie, say). It
//! answers `{"user":U,"rooms":[globs],"pub":B,"expire_at":T}`, which grants exactly what a token
//! with those claims would (`sub`, `rooms`, `pub`, `exp`), or `{"reject":{"status":401|403,
//! "reason":…}}`, which refuses the upgrade with that status.

use std::collections::{BTreeMap, HashMap};

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use super::{settings::OnError, HookError, Hooks};
use crate::{
    auth::{Grants, MAX_CLAIM_SECS},
    names,
};

/// What the connect hook decided.
#[derive(Debug)]
pub enum Verdict {
    /// The socket's rights.
    Granted(Grants),
    /// Refuse the upgrade with `status` (401 or 403).
    Rejected { status: u16, reason: String },
    /// The backend failed and `--hook-on-error connect=deny`: refuse the upgrade, 503.
    Unavailable(HookError),
    /// The backend failed and `--hook-on-error connect=allow`: admit the socket as a node without
    /// auth would.
    Allowed,
}

/// The upgrade request as the backend sees it.
pub struct Upgrade<'a> {
    pub addr: String,
    pub query: &'a HashMap<String, String>,
    pub headers: &'a HeaderMap,
}

#[derive(Serialize)]
struct Ask<'a> {
    addr: &'a str,
    query: BTreeMap<&'a str, &'a str>,
    headers: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    user: Option<String>,
    rooms: Option<Vec<String>>,
    #[serde(rename = "pub")]
    publish: Option<bool>,
    expire_at: Option<u64>,
    reject: Option<Reject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reject {
    status: u16,
    #[serde(default)]
    reason: String,
}

fn answer(body: &[u8]) -> Result<Verdict, String> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| format!("not a connect answer: {e}"))?;
    if let Some(reject) = a.reject {
        if a.user.is_some() || a.rooms.is_some() || a.publish.is_some() || a.expire_at.is_some() {
            return Err("reject comes alone".into());
        }
        if !matches!(reject.status, 401 | 403) {
            return Err(format!("reject.status must be 401 or 403, not {}", reject.status));
        }
        if reject.reason.len() > 1024 {
            return Err("reject.reason over 1024 bytes".into());
        }
        return Ok(Verdict::Rejected {
            status: reject.status,
            reason: reject.reason,
        });
    }
    let user = a.user.ok_or(r#"expected {"user":U,…} or {"reject":{…}}"#)?;
    names::check(&user).map_err(|e| format!("user {e}"))?;
    let rooms = a
        .rooms
        .map(|globs| {
            globs
                .iter()
                .map(|g| glob::Pattern::new(g).map_err(|e| format!("rooms pattern {g:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    if a.expire_at.is_some_and(|t| t > MAX_CLAIM_SECS) {
        return Err(format!("expire_at past {MAX_CLAIM_SECS}"));
    }
    Ok(Verdict::Granted(Grants::granted(
        user.into(),
        rooms,
        a.publish.unwrap_or(false),
        a.expire_at,
    )))
}

impl Hooks {
    /// Whether upgrades without a valid token ask a backend.
    pub fn connects(&self) -> bool {
        self.inner.connect.is_some()
    }

    /// What the backend grants the socket `upgrade` asks for (see [`Hooks::connects`] first).
    pub async fn connect(&self, upgrade: Upgrade<'_>) -> Verdict {
        let Some(backend) = &self.inner.connect else {
            return Verdict::Allowed;
        };
        let forwarded = &self.settings().forward_headers;
        let headers = upgrade
            .headers
            .iter()
            .filter(|(name, _)| forwarded.iter().any(|f| f == name.as_str()))
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
            .collect();
        let ask = Ask {
            addr: &upgrade.addr,
            query: upgrade.query.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            headers,
            user: upgrade.query.get("user").map(String::as_str),
        };
        let body = serde_json::to_vec(&ask).unwrap_or_default();
        match backend.ask(self.client(), "connect", body, answer).await {
            Ok(verdict) => verdict,
            Err(_) if self.settings().on_error.connect == OnError::Allow => Verdict::Allowed,
            Err(e) => Verdict::Unavailable(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_a_tokens_claims_and_a_reject_is_401_or_403() {
        let Verdict::Granted(g) =
            answer(br#"{"user":"ann","rooms":["members:*"],"pub":true,"expire_at":4000000000}"#).unwrap()
        else {
            panic!("granted")
        };
        assert_eq!(&*g.user, "ann");
        assert!(g.may_join("members:1") && !g.may_join("lobby") && g.may_publish());
        assert_eq!(g.expires, Some(4_000_000_000));
        let Verdict::Granted(g) = answer(br#"{"user":"bob"}"#).unwrap() else {
            panic!("granted")
        };
        assert!(
            g.may_join("anything") && !g.may_publish(),
            "as a token without rooms or pub"
        );
        assert!(matches!(
            answer(br#"{"reject":{"status":403,"reason":"banned"}}"#).unwrap(),
            Verdict::Rejected { status: 403, .. }
        ));
        for bad in [
            &br#"{"reject":{"status":500}}"#[..],
            br#"{"reject":{"status":401},"user":"x"}"#,
            br#"{"rooms":["a"]}"#,
            br#"{"user":""}"#,
            br#"{"user":"u","rooms":["[bad"]}"#,
            br#"{"user":"u","expire_at":99999999999999}"#,
            br#"{"user":"u","admin":true}"#,
        ] {
            assert!(answer(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
