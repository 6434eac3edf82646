//! What the benches share: a stand-in for sockets, so gates can be flushed without system calls.

use std::{
    io::{self, IoSlice},
    sync::Arc,
    task::{Context, Poll},
};

use shardcast::fanout::gate::{Gate, Outlet};

/// A socket whose kernel buffer takes every byte at once.
struct Discard;

impl Outlet for Discard {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }

    fn poll_write_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A gate with `budget` bytes whose socket takes everything.
pub fn gate(budget: usize) -> Arc<Gate> {
    let gate = Arc::new(Gate::new(budget));
    gate.attach(Box::new(Discard));
    gate
}
