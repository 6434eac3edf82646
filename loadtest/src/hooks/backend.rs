//! The app backend of the `hooks` run: an HTTP/1.1 server on loopback that answers the node's
//! publish hook as a moderated chat's backend would. It allows every line (`{"ok":true}`) except
//! every tenth ([`masks`]), which it masks (`{"data":…}` with the text replaced by
//! [`MASK`]). It records which lines it masked, when it answered, and how long it took over each
//! answer, which is the latency the node may add to.
//!
//! It can be stopped mid-run (listener and every kept-alive connection closed, so the node sees
//! refused connections) and started again on the same port with the same records.

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// The text of a masked line.
pub const MASK: &str = "***";

/// Whether the backend masks line `seq` of `publisher`: every tenth line, spread over the senders
/// (a chat member sends few lines in a run, so a rule on `seq` alone would mask none).
pub fn masks(publisher: u32, seq: u64) -> bool {
    (u64::from(publisher) + seq) % 10 == 9
}

/// The answer to a publish hook's body `{"user":U,"room":R,"data":[publisher, seq, ts, text]}`:
/// the line masked when [`masks`] says so, else allowed; `None` for a body of another shape.
/// The answer comes with the line it masked, (publisher, seq).
pub fn answer(body: &[u8]) -> Option<(String, Option<(u32, u64)>)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let data = v.get("data")?.as_array()?;
    let publisher = u32::try_from(data.first()?.as_u64()?).ok()?;
    let seq = data.get(1)?.as_u64()?;
    if !masks(publisher, seq) {
        return Some((r#"{"ok":true}"#.into(), None));
    }
    let mut masked = data.clone();
    *masked.get_mut(3)? = MASK.into();
    Some((
        serde_json::json!({ "data": masked }).to_string(),
        Some((publisher, seq)),
    ))
}

/// What the backend answered, over all its lives.
#[derive(Default)]
struct Records {
    latency_us: Option<Histogram<u64>>,
    allowed: u64,
    masked: HashSet<(u32, u64)>,
    /// When it answered each request, µs since the epoch.
    answered_at_us: Vec<u64>,
    bad: u64,
}

/// What the backend answered, for the report.
pub struct Answered {
    pub latency_us: Histogram<u64>,
    pub allowed: u64,
    /// The lines it masked, (publisher, seq).
    pub masked: HashSet<(u32, u64)>,
    pub answered_at_us: Vec<u64>,
    pub bad: u64,
}

/// A running backend; [`Backend::stop`] closes it, [`Backend::start`] on its port opens it again.
pub struct Backend {
    addr: SocketAddr,
    records: Arc<Mutex<Records>>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Backend {
    /// Listens on `port` of 127.0.0.1 (0: any free one), keeping `records` of an earlier life.
    async fn listen(port: u16, records: Arc<Mutex<Records>>) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept(listener, records.clone(), stopped));
        Ok(Backend {
            addr,
            records,
            stop,
            accept,
        })
    }

    /// A new backend on a free port.
    pub async fn start() -> anyhow::Result<Backend> {
        Backend::listen(0, Arc::default()).await
    }

    /// The URL of its publish hook.
    pub fn url(&self) -> String {
        format!("http://{}/publish", self.addr)
    }

    /// Closes the listener and every connection; what it answered stays.
    pub async fn stop(self) -> Stopped {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        Stopped {
            port: self.addr.port(),
            records: self.records,
        }
    }

    /// What it answered so far.
    pub fn answered(&self) -> Answered {
        let r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        Answered {
            latency_us: r.latency_us.clone().unwrap_or_else(histogram),
            allowed: r.allowed,
            masked: r.masked.clone(),
            answered_at_us: r.answered_at_us.clone(),
            bad: r.bad,
        }
    }
}

/// A stopped backend: its port and records, to start it again.
pub struct Stopped {
    port: u16,
    records: Arc<Mutex<Records>>,
}

impl Stopped {
    /// Listens again on the same port.
    pub async fn start(self) -> anyhow::Result<Backend> {
        Backend::listen(self.port, self.records).await
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Accepts until stopped; each connection is served until it ends or the backend stops.
async fn accept(listener: TcpListener, records: Arc<Mutex<Records>>, mut stopped: watch::Receiver<bool>) {
    let mut conns = Vec::new();
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let records = records.clone();
                let service = service_fn(move |req| serve(req, records.clone()));
                conns.push(tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }));
                conns.retain(|c: &JoinHandle<()>| !c.is_finished());
            }
        }
    }
    // Dropping a connection's task closes its socket: the node's pooled connections see it.
    for c in conns {
        c.abort();
    }
}

/// One hook request: read whole, answered, timed from its headers to its answer.
async fn serve(req: Request<Incoming>, records: Arc<Mutex<Records>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let began = Instant::now();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let answer = answer(&body);
    let took = began.elapsed().as_micros() as u64;
    {
        let mut r = records.lock().unwrap_or_else(|p| p.into_inner());
        match &answer {
            Some((_, Some(line))) => {
                r.masked.insert(*line);
            }
            Some((_, None)) => r.allowed += 1,
            None => r.bad += 1,
        }
        r.answered_at_us.push(crate::wire::now_us());
        r.latency_us
            .get_or_insert_with(histogram)
            .saturating_record(took.max(1));
    }
    let resp = match answer {
        Some((text, _)) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text))),
        None => Response::builder().status(400).body(Full::new(Bytes::new())),
    };
    Ok(resp.expect("a valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tenth_line_is_masked_and_the_rest_allowed() {
        let body = |seq: u64| format!(r#"{{"user":"u","room":"r","data":[3,{seq},17,"xxxx"]}}"#);
        assert_eq!(answer(body(0).as_bytes()), Some((r#"{"ok":true}"#.into(), None)));
        assert_eq!(answer(body(5).as_bytes()).map(|a| a.1), Some(None));
        assert_eq!(
            answer(body(6).as_bytes()),
            Some((r#"{"data":[3,6,17,"***"]}"#.into(), Some((3, 6)))),
            "the stamp kept, the text masked"
        );
        assert_eq!(
            answer(body(16).as_bytes()).map(|a| a.1),
            Some(Some((3, 16))),
            "publisher 3's line 16"
        );
        let lines = (0..1000u32).flat_map(|p| (0..4u64).map(move |s| (p, s)));
        assert_eq!(
            lines.filter(|(p, s)| masks(*p, *s)).count(),
            400,
            "a tenth of 1000 senders' 4 lines"
        );
        assert_eq!(answer(br#"{"data":"text"}"#), None);
        assert_eq!(answer(b"not json"), None);
    }
}
