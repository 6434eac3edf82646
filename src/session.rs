//! One WebSocket connection: a reader that runs the client's commands and a writer that drains the
//! socket's gate, in one task. The session ends when either side does; its [`Membership`] guard
//! then takes it out of every topic, even if the task panicked or the upgrade never completed.

use std::{
    collections::{HashSet, VecDeque},
    pin::pin,
    sync::Arc,
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{stream::SplitSink, SinkExt, StreamExt};

use crate::{
    close::{code, CloseReason, ErrorCode},
    envelope::{self, Envelope, Kind},
    frame::{decode_binary, decode_text, Command, Data, Encoding, FrameError, Reply, Request},
    gate::{Gate, Next},
    hub::{Hub, SessionId, Topic},
    metrics as m,
    node::Node,
};

/// Tungstenite's read chunk. Its default (128 KiB) suits a few busy sockets; a stadium node holds
/// many mostly idle ones, and client frames are small.
pub const READ_BUFFER_BYTES: usize = 4 << 10;
/// How much tungstenite gathers before writing to the socket mid-batch; the writer flushes at the
/// end of every batch anyway, so this only bounds the buffer a burst leaves behind.
pub const WRITE_BUFFER_BYTES: usize = 16 << 10;

/// A registered socket's place in the hub; leaving every topic on drop.
pub struct Membership {
    hub: Hub,
    id: SessionId,
    user: Arc<str>,
    rooms: HashSet<Arc<str>>,
}

impl Membership {
    pub fn new(hub: Hub, id: SessionId, user: Arc<str>) -> Membership {
        Membership {
            hub,
            id,
            user,
            rooms: HashSet::new(),
        }
    }

    pub fn user_topic(&self) -> Topic {
        Topic::User(self.user.clone())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let topics = self
            .rooms
            .drain()
            .map(Topic::Room)
            .chain([Topic::User(self.user.clone())]);
        self.hub.unregister(self.id, topics);
    }
}

/// Runs a connection until it closes.
pub async fn serve(
    socket: WebSocket,
    node: Node,
    gate: Arc<Gate>,
    encoding: Encoding,
    mut membership: Membership,
) {
    m::connection_opened();
    let (sink, mut stream) = socket.split();
    let grace = node.config().close_grace;
    let mut writer = pin!(write(sink, gate.clone(), grace));
    let reason = {
        let reader = read(&mut stream, &node, &gate, encoding, &mut membership);
        tokio::select! {
            end = &mut writer => end,
            reason = reader => {
                match reason {
                    CloseReason::FrameTooLarge => gate.close(Some((code::FRAME_TOO_LARGE, "frame too large"))),
                    CloseReason::Normal => gate.close(None),
                    _ => gate.close(Some((code::NORMAL, ""))),
                }
                let _ = tokio::time::timeout(grace, &mut writer).await;
                reason
            }
        }
    };
    m::connection_closed(reason);
    drop(membership);
}

async fn read(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    node: &Node,
    gate: &Gate,
    encoding: Encoding,
    membership: &mut Membership,
) -> CloseReason {
    while let Some(msg) = stream.next().await {
        let request = match msg {
            Ok(Message::Text(t)) => decode_text(&t),
            Ok(Message::Binary(b)) => decode_binary(&b),
            // Tungstenite answers pings by itself; pongs need nothing.
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) => return CloseReason::Normal,
            Err(e) => return classify(e),
        };
        let reply = match request {
            Ok(request) => run(request, node, membership).await,
            Err(e) => Err(e),
        };
        let frame = match &reply {
            Ok(Some(reply)) => reply.encode(encoding),
            Ok(None) => continue,
            Err(e) => {
                m::bad_frame(e.code.as_str());
                Reply::error(e).encode(encoding)
            }
        };
        gate.push(frame);
    }
    CloseReason::Normal
}

fn classify(e: axum::Error) -> CloseReason {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match e.into_inner().downcast::<WsError>() {
        Ok(e) if matches!(*e, WsError::Capacity(_)) => CloseReason::FrameTooLarge,
        Ok(e) if matches!(*e, WsError::ConnectionClosed | WsError::AlreadyClosed) => {
            CloseReason::Normal
        }
        _ => CloseReason::Error,
    }
}

/// Runs one command; `Ok(None)` means nothing to answer.
async fn run(
    request: Request,
    node: &Node,
    membership: &mut Membership,
) -> Result<Option<Reply<'static>>, FrameError> {
    let id = request.id;
    let ok =
        |op: &'static str| Ok(Some(Reply::op(op, id)).filter(|_| id.is_some() || op == "pong"));
    match request.command {
        Command::Ping => ok("pong"),
        Command::Join { room } => {
            let room: Arc<str> = room.into();
            if membership.rooms.contains(&room) {
                return ok("ok");
            }
            let max = node.config().max_rooms_per_conn;
            if membership.rooms.len() >= max {
                return Err(FrameError::new(
                    id,
                    ErrorCode::TooManyRooms,
                    format!("a connection may be in at most {max} rooms"),
                ));
            }
            node.hub()
                .join(
                    Topic::Room(room.clone()),
                    membership.id,
                    node.config().join_timeout,
                )
                .await
                .map_err(|e| FrameError::new(id, ErrorCode::Unavailable, e.to_string()))?;
            membership.rooms.insert(room);
            ok("ok")
        }
        Command::Leave { room } => {
            let Some(room) = membership.rooms.take(room.as_str()) else {
                return Err(FrameError::new(
                    id,
                    ErrorCode::NotJoined,
                    format!("not in room {room:?}"),
                ));
            };
            node.hub().leave(&Topic::Room(room), membership.id);
            ok("ok")
        }
        Command::Pub { room, data } => {
            publish(node, Kind::Room, room, &membership.user, data, id).await?;
            m::published("ws");
            ok("ok")
        }
        Command::Dm { to, data } => {
            publish(node, Kind::Direct, to, &membership.user, data, id).await?;
            m::published("ws");
            ok("ok")
        }
    }
}

/// Wraps data in an envelope and hands it to the bus; every node (this one included) delivers it
/// to its local members from what the bus hands back.
pub async fn publish(
    node: &Node,
    kind: Kind,
    target: String,
    from: &str,
    data: Data,
    id: Option<i64>,
) -> Result<(), FrameError> {
    let topic = match kind {
        Kind::Room => Topic::Room(target.as_str().into()),
        Kind::Direct => Topic::User(target.as_str().into()),
    };
    let channel = node.naming().publish_channel(&topic, from);
    let env = Envelope {
        kind,
        origin: node.config().node_id.clone(),
        target,
        from: from.to_owned(),
        ts_us: envelope::now_us(),
        format: data.format,
        data: data.bytes,
    };
    node.bus()
        .publish(channel, env.encode())
        .await
        .map_err(|e| FrameError::new(id, ErrorCode::Unavailable, e.to_string()))
}

enum Flushed {
    Done(Result<(), axum::Error>),
    Overflow,
}

/// Drains the gate into the socket until the gate overflows or closes, or the socket fails.
async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    gate: Arc<Gate>,
    grace: Duration,
) -> CloseReason {
    let mut buf = VecDeque::new();
    loop {
        match gate.next(&mut buf).await {
            Next::Frames(bytes) => {
                let flushed = {
                    let io = async {
                        for frame in buf.drain(..) {
                            sink.feed(frame).await?;
                        }
                        sink.flush().await
                    };
                    // A client that stopped reading leaves the flush pending; overflow ends the wait.
                    tokio::select! {
                        r = io => Flushed::Done(r),
                        _ = gate.overflowed() => Flushed::Overflow,
                    }
                };
                buf.clear();
                match flushed {
                    Flushed::Done(Ok(())) => gate.release(bytes),
                    Flushed::Done(Err(_)) => return CloseReason::Error,
                    Flushed::Overflow => {
                        return close(
                            &mut sink,
                            code::SLOW_CONSUMER,
                            "slow consumer",
                            grace,
                            CloseReason::SlowConsumer,
                        )
                        .await
                    }
                }
            }
            Next::Overflow => {
                return close(
                    &mut sink,
                    code::SLOW_CONSUMER,
                    "slow consumer",
                    grace,
                    CloseReason::SlowConsumer,
                )
                .await
            }
            Next::Close(Some((c, why))) => {
                let reason = if c == code::DRAIN {
                    CloseReason::Drain
                } else {
                    CloseReason::Normal
                };
                return close(&mut sink, c, why, grace, reason).await;
            }
            Next::Close(None) => {
                let _ = tokio::time::timeout(grace, sink.close()).await;
                return CloseReason::Normal;
            }
        }
    }
}

/// Sends a close frame if the socket takes it within `grace`; the connection is dropped after.
async fn close(
    sink: &mut SplitSink<WebSocket, Message>,
    code: u16,
    reason: &'static str,
    grace: Duration,
    why: CloseReason,
) -> CloseReason {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(grace, sink.send(frame)).await;
    why
}
