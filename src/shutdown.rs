//! The drain sequence, in one place. On shutdown the node: turns `/readyz` to 503 and refuses new
//! upgrades (HTTP keeps answering so the load balancer sees it), tells every client to reconnect,
//! closes each socket with 4001, waits for them to go (bounded), then leaves the bus.

use std::time::Duration;

use crate::{close::code, frame::Reply, node::Node};

/// Runs the drain phases; returns when every session is gone or the deadline passed.
pub async fn drain(node: &Node) {
    node.start_draining();
    let members = node.hub().members();
    tracing::info!(sessions = members.len(), "draining");
    // Spread reconnects over the jitter window so the rest of the fleet sees no storm.
    let jitter_ms = node.config().drain_jitter.as_millis() as u64;
    for member in &members {
        let after_ms = if jitter_ms == 0 {
            0
        } else {
            rand::random_range(0..=jitter_ms)
        };
        let notice = Reply {
            after_ms: Some(after_ms),
            ..Reply::op("reconnect", None)
        };
        member.gate.push(notice.encode(member.encoding));
        member.gate.close(Some((code::DRAIN, "node draining")));
    }
    let deadline = tokio::time::Instant::now() + node.config().drain_timeout;
    while node.hub().sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
