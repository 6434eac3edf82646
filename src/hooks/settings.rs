//! The hooks' settings as [`crate::config`] reads them from flags, variables and the TOML file:
//! which backend URL each hook calls, how long it may take, what its failure means, and the key
//! requests are signed with. Parsed here so that the config stays one list of flags.

use std::time::Duration;

/// What a hook's failure (timeout, refused connection, bad answer, open breaker) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Refuse what was asked: the connection, the join, the publish.
    Deny,
    /// Let it through as if the backend had said yes.
    Allow,
}

/// `--hook-on-error` for each hook that decides something; the disconnect hook decides nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policies {
    pub connect: OnError,
    pub join: OnError,
    pub publish: OnError,
}

/// Rooms whose commands a backend decides, first match wins.
pub type Routes = Vec<(glob::Pattern, reqwest::Url)>;

/// Every hook setting; a hook whose URL is unset is off.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--hook-connect`: asked on every upgrade that no valid token carries.
    pub connect: Option<reqwest::Url>,
    /// `--hook-join`: asked on a join of a matching room.
    pub join: Routes,
    /// `--hook-publish`: asked before a publish to a matching room goes out.
    pub publish: Routes,
    /// `--hook-disconnect`: told, in batches, of every socket that closed.
    pub disconnect: Option<reqwest::Url>,
    /// `--hook-batch`: how often the disconnects gathered are sent.
    pub batch: Duration,
    /// `--hook-forward-headers`: request headers the connect hook is given, lower case.
    pub forward_headers: Vec<String>,
    /// `--hook-timeout`: the longest a backend may take to answer, body included.
    pub timeout: Duration,
    pub on_error: Policies,
    /// `--hook-max-inflight`: requests one backend URL may have in flight at once.
    pub max_inflight: usize,
    /// `--hook-join-cache`: how long a join answer holds for its (user, room); zero: not kept.
    pub join_cache: Duration,
    /// `--hook-secret`: the key each request's signature is made with.
    pub secret: Option<String>,
    /// `--hook-ca-file`: certificate authorities trusted for https backends besides the public
    /// ones, as PEM.
    pub authorities: Option<Vec<u8>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect: None,
            join: Vec::new(),
            publish: Vec::new(),
            disconnect: None,
            batch: Duration::from_secs(1),
            forward_headers: Vec::new(),
            timeout: Duration::from_secs(1),
            on_error: Policies {
                connect: OnError::Deny,
                join: OnError::Deny,
                publish: OnError::Deny,
            },
            max_inflight: 1000,
            join_cache: Duration::ZERO,
            secret: None,
            authorities: None,
        }
    }
}

impl Settings {
    /// The URLs requests go to, each once: the backends that get a breaker and a bound of their own.
    pub fn urls(&self) -> Vec<&reqwest::Url> {
        let mut urls: Vec<&reqwest::Url> = self
            .connect
            .iter()
            .chain(self.join.iter().map(|(_, u)| u))
            .chain(self.publish.iter().map(|(_, u)| u))
            .chain(self.disconnect.iter())
            .collect();
        urls.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        urls.dedup();
        urls
    }
}

/// A backend URL: `http://HOST[:PORT]/PATH` or `https://…` (its certificate checked against the
/// public authorities and `--hook-ca-file`).
pub fn url(s: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("{e} (expected http://HOST:PORT/PATH)"))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(url),
        _ => Err("expected an http:// or https:// URL".into()),
    }
}

/// `--hook-ca-file`: a PEM file of one or more CA certificates; read and checked at start-up.
pub fn authorities(path: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        Ok(_) => Err(format!("{path} holds no PEM certificate")),
        Err(e) => Err(format!("{path}: {e}")),
    }
}

/// `NAME_GLOB=URL`: rooms matching the glob go to the URL.
pub fn route(s: &str) -> Result<(glob::Pattern, reqwest::Url), String> {
    let (glob, rest) = s
        .split_once('=')
        .ok_or("expected NAME_GLOB=URL, such as chat:*=http://127.0.0.1:9000/publish")?;
    let pattern = glob::Pattern::new(glob).map_err(|e| format!("NAME_GLOB: {e}"))?;
    Ok((pattern, url(rest)?))
}

/// A hook that decides something: its `--hook-on-error` applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deciding {
    Connect,
    Join,
    Publish,
}

impl Policies {
    pub fn set(&mut self, hook: Deciding, policy: OnError) {
        match hook {
            Deciding::Connect => self.connect = policy,
            Deciding::Join => self.join = policy,
            Deciding::Publish => self.publish = policy,
        }
    }
}

/// `HOOK=deny|allow`, HOOK one of `connect`, `join`, `publish`.
pub fn on_error(s: &str) -> Result<(Deciding, OnError), String> {
    let (hook, policy) = s
        .split_once('=')
        .ok_or("expected HOOK=deny|allow, such as publish=allow")?;
    let policy = match policy {
        "deny" => OnError::Deny,
        "allow" => OnError::Allow,
        _ => return Err("expected deny or allow after =".into()),
    };
    let hook = match hook {
        "connect" => Deciding::Connect,
        "join" => Deciding::Join,
        "publish" => Deciding::Publish,
        _ => return Err("HOOK must be connect, join or publish".into()),
    };
    Ok((hook, policy))
}

/// A header name to forward, lower case.
pub fn header(s: &str) -> Result<String, String> {
    reqwest::header::HeaderName::from_bytes(s.as_bytes())
        .map(|h| h.as_str().to_owned())
        .map_err(|_| "expected a header name such as Cookie".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_routes_and_policies_parse_and_bad_ones_say_why() {
        assert_eq!(url("http://127.0.0.1:9000/hook").unwrap().port(), Some(9000));
        for bad in ["ftp://x/y", "127.0.0.1:9000", "http://", "unix:/tmp/s"] {
            assert!(url(bad).is_err(), "{bad}");
        }
        assert_eq!(url("https://app.example/hook").unwrap().scheme(), "https");
        assert!(authorities("/nonexistent/ca.pem").unwrap_err().contains("cannot read"));
        let (glob, to) = route("chat:*=http://127.0.0.1:1/p?a=b").unwrap();
        assert!(glob.matches("chat:1") && !glob.matches("odds"));
        assert_eq!(to.query(), Some("a=b"));
        assert!(route("chat:*").is_err() && route("chat:*=ws://x").is_err());
        let mut p = Settings::default().on_error;
        let (hook, policy) = on_error("publish=allow").unwrap();
        p.set(hook, policy);
        assert_eq!(
            (p.connect, p.join, p.publish),
            (OnError::Deny, OnError::Deny, OnError::Allow)
        );
        for bad in ["publish", "publish=maybe", "disconnect=allow"] {
            assert!(on_error(bad).is_err(), "{bad}");
        }
        assert_eq!(header("Cookie").unwrap(), "cookie");
        assert!(header("bad header").is_err());
    }
}
