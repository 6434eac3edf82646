//! The HTTP/1.1 client every hook shares: keep-alive connections pooled per backend, each request
//! a signed JSON POST, and every way an answer can be wrong an error: a redirect (never followed),
//! a status other than 2xx, a body past [`MAX_ANSWER_BYTES`], a backend slower than
//! `--hook-timeout` (connecting, sending and reading the whole answer included). Whether the answer
//! means anything is the hook's to judge.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use reqwest::{header, redirect, Url};

use super::{settings::Settings, sign};

/// The largest answer read from a backend: room for a replaced message (at most
/// `--max-frame-bytes`, 64 KiB by default) escaped in JSON, and little more.
pub const MAX_ANSWER_BYTES: usize = 256 << 10;
/// How long a pooled connection to a backend may sit idle before it is closed.
const IDLE: Duration = Duration::from_secs(60);

/// Why a hook had no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered {0} (a redirect, not followed)")]
    Redirect(u16),
    #[error("answered {0}")]
    Status(u16),
    #[error("answer over {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    #[error("bad answer: {0}")]
    Answer(String),
    #[error("circuit open after repeated failures")]
    Open,
    #[error("too many requests in flight (--hook-max-inflight)")]
    Busy,
}

impl HookError {
    /// The label of `shardcast_hook_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            HookError::Timeout(_) => "timeout",
            HookError::Request(_) => "request",
            HookError::Redirect(_) => "redirect",
            HookError::Status(_) => "status",
            HookError::TooLarge => "too_large",
            HookError::Answer(_) => "answer",
            HookError::Open => "open",
            HookError::Busy => "busy",
        }
    }
}

/// Pooled connections to every backend, and how requests are made and signed.
pub struct Client {
    http: reqwest::Client,
    secret: Option<Vec<u8>>,
    timeout: Duration,
}

impl Client {
    /// The client `settings` describe: their timeout and signing key; as many connections kept
    /// open to one backend between requests as it may have in flight; for https backends, the
    /// public certificate authorities and those of `--hook-ca-file`.
    pub fn new(settings: &Settings) -> Result<Client, HookError> {
        let (timeout, secret, idle_per_backend) = (settings.timeout, settings.secret.as_deref(), settings.max_inflight);
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &settings.authorities {
            for ca in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| HookError::Request(e.to_string()))? {
                builder = builder.add_root_certificate(ca);
            }
        }
        let http = builder
            .http1_only()
            .redirect(redirect::Policy::none())
            // Never through a proxy named by the environment: hooks go where they are configured.
            .no_proxy()
            .pool_idle_timeout(IDLE)
            .pool_max_idle_per_host(idle_per_backend)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| HookError::Request(e.to_string()))?;
        Ok(Client {
            http,
            secret: secret.map(|s| s.as_bytes().to_vec()),
            timeout,
        })
    }

    /// POSTs `body` (JSON) to `url`, signed; the answer's body when it came with a 2xx in time.
    pub async fn post(&self, url: &Url, body: Vec<u8>) -> Result<Bytes, HookError> {
        match tokio::time::timeout(self.timeout, self.exchange(url, body)).await {
            Ok(answer) => answer,
            Err(_) => Err(HookError::Timeout(self.timeout)),
        }
    }

    async fn exchange(&self, url: &Url, body: Vec<u8>) -> Result<Bytes, HookError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let timestamp = now.to_string();
        let mut request = self
            .http
            .post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(sign::TIMESTAMP, &timestamp);
        if let Some(secret) = &self.secret {
            request = request.header(sign::SIGNATURE, sign::signature(secret, &timestamp, &body));
        }
        let mut response = request
            .body(body)
            .send()
            .await
            .map_err(|e| HookError::Request(e.to_string()))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(HookError::Redirect(status.as_u16()));
        }
        if !status.is_success() {
            return Err(HookError::Status(status.as_u16()));
        }
        if response.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
            return Err(HookError::TooLarge);
        }
        let mut answer = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| HookError::Request(e.to_string()))? {
            if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(HookError::TooLarge);
            }
            answer.extend_from_slice(&chunk);
        }
        Ok(answer.freeze())
    }
}
