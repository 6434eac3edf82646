//! Backend hooks: the app's own backend decides who connects ([`connect`]), who joins a room
//! ([`join`]) and what a published line becomes ([`publish`]), and hears of every socket that
//! closed ([`disconnect`]), over HTTP/1.1 with JSON; request and answer bodies are listed in
//! docs/protocol.md.
//!
//! Every request goes through its URL's [`backend::Backend`]: a [`breaker::Breaker`], a bound on
//! requests in flight, and a log that speaks once per interval. Requests are signed ([`sign`])
//! and made by one pooled [`client::Client`]. A hook that fails (timeout, bad answer, open breaker)
//! is answered by its `--hook-on-error` policy ([`settings::OnError`]).
//!
//! What a hook decides is this module's; applying it is the caller's: the upgrade route turns a
//! connect answer into grants, `join` and `publish` turn a refusal into the client's `error`.

pub mod backend;
pub mod breaker;
pub mod client;
pub mod connect;
pub mod disconnect;
pub mod join;
pub mod publish;
pub mod settings;
pub mod sign;

use std::{collections::HashMap, sync::Arc};

use backend::{Backend, Hook};
pub use client::HookError;
use settings::Settings;

use crate::{close::ErrorCode, frame::FrameError};

/// The hooks of a node. Cheap to clone; with no hook configured every check passes at once.
#[derive(Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    client: client::Client,
    connect: Option<Arc<Backend>>,
    join: Vec<(glob::Pattern, Arc<Backend>)>,
    publish: Vec<(glob::Pattern, Arc<Backend>)>,
    joins: join::Cache,
    disconnects: Option<disconnect::Disconnects>,
}

/// Why a hook said no.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The backend refused, with its own `code` and `message` for the client.
    App { code: String, message: String },
    /// The backend failed and `--hook-on-error` is `deny`.
    Failed(HookError),
}

impl Refusal {
    /// The client's `error` for the command `id` that `hook` refused: the app's own code (counted
    /// as `forbidden`), or `unavailable` when the backend failed.
    pub fn frame_error(self, id: Option<i64>, hook: &str) -> FrameError {
        match self {
            Refusal::App { code, message } => FrameError {
                app_code: Some(code),
                ..FrameError::new(id, ErrorCode::Forbidden, message)
            },
            Refusal::Failed(e) => FrameError::new(id, ErrorCode::Unavailable, format!("{hook} hook: {e}")),
        }
    }
}

impl Hooks {
    pub fn new(settings: Settings) -> Result<Hooks, HookError> {
        let client = client::Client::new(&settings)?;
        // One backend per URL, whichever hooks share it: one breaker, one bound.
        let mut backends: HashMap<String, Arc<Backend>> = HashMap::new();
        let mut uses: HashMap<String, Vec<Hook>> = HashMap::new();
        let hooked = settings
            .connect
            .iter()
            .map(|u| ("connect", u))
            .chain(settings.join.iter().map(|(_, u)| ("join", u)))
            .chain(settings.publish.iter().map(|(_, u)| ("publish", u)))
            .chain(settings.disconnect.iter().map(|u| ("disconnect", u)));
        for (hook, url) in hooked {
            let hooks = uses.entry(url.to_string()).or_default();
            if !hooks.contains(&hook) {
                hooks.push(hook);
            }
        }
        for url in settings.urls() {
            let hooks = uses.remove(url.as_str()).unwrap_or_default();
            backends.insert(
                url.to_string(),
                Arc::new(Backend::new(url.clone(), hooks, settings.max_inflight)),
            );
        }
        let backend = |url: &reqwest::Url| backends[url.as_str()].clone();
        let routes = |routes: &settings::Routes| {
            routes
                .iter()
                .map(|(glob, url)| (glob.clone(), backend(url)))
                .collect::<Vec<_>>()
        };
        Ok(Hooks {
            inner: Arc::new(Inner {
                connect: settings.connect.as_ref().map(backend),
                join: routes(&settings.join),
                publish: routes(&settings.publish),
                joins: join::Cache::new(settings.join_cache),
                disconnects: settings
                    .disconnect
                    .as_ref()
                    .map(|url| disconnect::Disconnects::new(backend(url))),
                client,
                settings,
            }),
        })
    }

    fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    fn client(&self) -> &client::Client {
        &self.inner.client
    }
}

/// The backend of the first route whose glob matches `room`.
fn route<'a>(routes: &'a [(glob::Pattern, Arc<Backend>)], room: &str) -> Option<&'a Arc<Backend>> {
    routes.iter().find(|(glob, _)| glob.matches(room)).map(|(_, b)| b)
}

/// An app's error `code`: what a client program matches on, so short and plain.
fn app_code(code: &str) -> Result<String, String> {
    let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    if code.is_empty() || code.len() > 64 || !code.chars().all(plain) {
        return Err("error.code must be 1 to 64 of a-z, 0-9 and _".into());
    }
    Ok(code.to_owned())
}

/// The app's refusal `{"code":…,"message":…}`, checked.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AppError {
    code: String,
    #[serde(default)]
    message: String,
}

impl AppError {
    fn refusal(self) -> Result<Refusal, String> {
        if self.message.len() > 1024 {
            return Err("error.message over 1024 bytes".into());
        }
        Ok(Refusal::App {
            code: app_code(&self.code)?,
            message: self.message,
        })
    }
}
