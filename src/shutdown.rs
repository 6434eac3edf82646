//! The drain sequence, in one place. On shutdown the node:
//! 1. turns `/readyz` to 503 and refuses new upgrades with 503 (HTTP keeps answering, so the load
//!    balancer sees it);
//! 2. tells every client `{"op":"reconnect","after_ms":T}`, with T drawn over `--drain-jitter`, and
//!    closes each socket with 4001 at its T, so the fleet sees reconnects spread out, not a storm;
//! 3. waits for the sockets to go, up to `--drain-timeout` in all;
//! 4. returns, after which `run` leaves the bus (unsubscribe and quit) and the process exits 0.

use std::time::Duration;

use crate::{close::code, node::Node, wire::Reply};

/// Runs the drain phases; returns when every session is gone or the deadline passed.
pub async fn drain(node: &Node) {
    node.start_draining();
    let start = tokio::time::Instant::now();
    let deadline = start + node.config().drain_timeout;
    let jitter_ms = node.config().drain_jitter.as_millis() as u64;
    let mut members: Vec<_> = node
        .hub()
        .members()
        .into_iter()
        .map(|m| (rand::random_range(0..=jitter_ms), m))
        .collect();
    tracing::info!(sessions = members.len(), "draining");
    for (after_ms, member) in &members {
        let notice = Reply {
            after_ms: Some(*after_ms),
            ..Reply::op("reconnect", None)
        };
        member.send(notice.encode(member.encoding()));
    }
    members.sort_by_key(|(after_ms, _)| *after_ms);
    // Each gate is let go once closed: it owns its socket's write half, so the socket is shut down
    // as soon as its session ends, not when the last one of the drain does.
    for (after_ms, member) in members {
        tokio::time::sleep_until((start + Duration::from_millis(after_ms)).min(deadline)).await;
        member.close(Some((code::DRAIN, "node draining")));
    }
    while node.hub().sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
