//! `ping`: answered `pong`, always (with the command's id when it had one).

use crate::wire::Reply;

pub fn run(id: Option<i64>) -> Reply<'static> {
    Reply::op("pong", id)
}
