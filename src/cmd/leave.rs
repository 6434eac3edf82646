//! `leave`: takes the socket out of a room it is in.

use super::{ok, Answer, Membership};
use crate::{close::ErrorCode, frame::FrameError};

pub fn run(id: Option<i64>, room: String, membership: &mut Membership) -> Answer {
    if !membership.leave(&room) {
        return Err(FrameError::new(
            id,
            ErrorCode::NotJoined,
            format!("not in room {room:?}"),
        ));
    }
    ok(id)
}
