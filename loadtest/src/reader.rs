//! A feed reader: one subscriber of a `--feed` stadium, as a browser would read it. It connects
//! through [`crate::rawws`] (offering permessage-deflate when its [`Reading`] says so), joins the
//! room (with `"delta":true` when it says so), rebuilds every value ([`crate::rebuild`]), checks it
//! against what its publisher published ([`crate::feeds::Published`]), and counts the bytes its
//! socket read beside the bytes of the values ([`WireTally`]). Deliveries, losses and latency are
//! counted as for every other connection ([`Outcome`]); it follows the run's [`Phase`] the same way.

use std::sync::{atomic::Ordering, Arc};

use tokio::{sync::watch, time::timeout};

use crate::{
    conn::{self, Ctx, Outcome, Phase, Spec},
    feeds::Check,
    rawws::{self, Message, RawWs, ReadError},
    rebuild::{Broken, Form, Rebuild},
    stats::{Reading, WireTally},
    wire::{self, Inbound},
};

/// The id of the join (its `ok` carries it).
const JOIN_ID: i64 = 1;

/// Runs one feed reader until [`Phase::Finish`] or until the node ends it.
pub async fn run(spec: Spec, ctx: Arc<Ctx>, mut phase: watch::Receiver<Phase>) -> Outcome {
    let reading = spec.reading.unwrap_or_default();
    let mut r = Reader {
        spec: &spec,
        ctx: &ctx,
        out: Outcome::default(),
        wire: WireTally {
            readers: 1,
            ..WireTally::default()
        },
        rebuild: Rebuild::default(),
    };
    let ws = match timeout(ctx.connect_timeout, r.establish(reading)).await {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(e)) => {
            r.out.failure = Some(conn::class(&e));
            None
        }
        Err(_) => {
            r.out.failure = Some("timeout".into());
            None
        }
    };
    let Some(mut ws) = ws else {
        ctx.failed.fetch_add(1, Ordering::Relaxed);
        return r.out;
    };
    // As for every member: one that joined once the run had started missed what came before.
    if !matches!(*phase.borrow(), Phase::Ramp) {
        r.out.failure = Some("joined after the run started".into());
        ctx.failed.fetch_add(1, Ordering::Relaxed);
        return r.out;
    }
    r.out.connected = true;
    ctx.ready.fetch_add(1, Ordering::Relaxed);
    r.wire.negotiated = u64::from(ws.negotiated.deflate);
    let joined_at = ws.read_bytes;
    let ended = loop {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow_and_update() == Phase::Finish {
                    break None;
                }
            }
            msg = ws.next() => match msg {
                Ok(m) => r.on_message(&m),
                Err(e) => break Some(why(&e)),
            },
        }
    };
    r.wire.read_bytes = ws.read_bytes - joined_at;
    r.out.wire = Some((reading, r.wire));
    match ended {
        Some(why) => {
            r.out.closed = Some(why);
            ctx.closed.fetch_add(1, Ordering::Relaxed);
        }
        None => ws.close().await,
    }
    r.out
}

/// How the node ended a connection, as the report counts it.
fn why(e: &ReadError) -> String {
    match e {
        ReadError::Closed(code) => code.map_or("close".into(), |c| c.to_string()),
        ReadError::Eof => "eof".into(),
        ReadError::Io(e) => format!("error: {}", e.kind()),
        ReadError::Protocol(what) => format!("error: {what}"),
    }
}

struct Reader<'a> {
    spec: &'a Spec,
    ctx: &'a Ctx,
    out: Outcome,
    wire: WireTally,
    rebuild: Rebuild,
}

impl Reader<'_> {
    /// Connects and joins, trying again after a pause (at most `connect_attempts` tries).
    async fn establish(&mut self, reading: Reading) -> anyhow::Result<RawWs> {
        let (spec, ctx) = (self.spec, self.ctx);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tried = async {
                let mut ws = rawws::open(&ctx.nodes[spec.node], spec.source, &spec.user, reading.deflate).await?;
                self.join(&mut ws, reading.delta).await?;
                anyhow::Ok(ws)
            }
            .await;
            match tried {
                Err(_) if attempt < ctx.connect_attempts => {
                    self.out.retries += 1;
                    tokio::time::sleep(conn::retry_pause(spec.idx, attempt)).await;
                }
                done => break done,
            }
        }
    }

    async fn join(&mut self, ws: &mut RawWs, delta: bool) -> anyhow::Result<()> {
        let room = self.spec.join.as_deref().unwrap_or_default();
        let delta = if delta { r#","delta":true"# } else { "" };
        ws.send_text(&format!(r#"{{"op":"join","room":"{room}","id":{JOIN_ID}{delta}}}"#))
            .await?;
        loop {
            let m = ws
                .next()
                .await
                .map_err(|e| anyhow::anyhow!("closed during join: {}", why(&e)))?;
            let text = std::str::from_utf8(&m.data).unwrap_or_default();
            match wire::scan_json(text) {
                Inbound::Ok(JOIN_ID) => return Ok(()),
                Inbound::Error(_) => anyhow::bail!("join refused"),
                _ => {}
            }
        }
    }

    /// A message read: a value rebuilt and checked, or an answer or notice counted.
    fn on_message(&mut self, m: &Message) {
        self.wire.compressed += u64::from(m.compressed);
        let Ok(text) = std::str::from_utf8(&m.data) else {
            self.out.unparsed += 1;
            return;
        };
        match self.rebuild.value(text) {
            Ok((value, form)) => {
                self.wire.messages += 1;
                self.wire.payload_bytes += value.len() as u64;
                match form {
                    Form::Delta => self.wire.deltas += 1,
                    Form::Whole => self.wire.wholes += 1,
                    Form::Plain => {}
                }
                let Some(stamp) = wire::value_stamp(&value) else {
                    self.wire.corrupted += 1;
                    return;
                };
                let published = self.ctx.feed.as_ref().map(|f| &f.published);
                match published.map(|p| p.check(stamp.publisher, stamp.seq, &value)) {
                    Some(Check::Same) => {}
                    Some(Check::Different) => self.wire.corrupted += 1,
                    Some(Check::Unknown) | None => self.wire.unchecked += 1,
                }
                self.out.delivered(self.ctx, self.spec.idx, stamp);
            }
            Err(Broken::NoData) => match wire::scan_json(text) {
                Inbound::Error(_) => self.out.error_frames += 1,
                Inbound::Reconnect(_) => self.out.reconnects += 1,
                Inbound::Ok(_) => {}
                _ => self.out.unparsed += 1,
            },
            Err(Broken::BadString | Broken::NoBase | Broken::DeltaFails) => self.wire.corrupted += 1,
        }
    }
}
