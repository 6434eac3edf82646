//! The drain sequence, in one place. On shutdown the node: turns `/readyz` to 503 and refuses new
//! upgrades (HTTP keeps answering so the load balancer sees it), tells every client to reconnect,
//! closes each socket with 4001, waits for them to go (bounded), then leaves the bus.

use std::time::Duration;

use crate::{close::code, frame::Reply, node::Node};

/// How long the node waits for its sockets to close before leaving anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the drain phases; returns when every session is gone or the deadline passed.
pub async fn drain(node: &Node) {
    node.start_draining();
    let members = node.hub().members();
    tracing::info!(sessions = members.len(), "draining");
    let notice = Reply {
        after_ms: Some(0),
        ..Reply::op("reconnect", None)
    };
    for member in &members {
        member.gate.push(notice.encode(member.encoding));
        member.gate.close(Some((code::DRAIN, "node draining")));
    }
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while node.hub().sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
