//! The embedded bus: one node, no Redis. A publish goes straight to this node's delivery workers
//! when the channel is subscribed, exactly as a Redis message would arrive.

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashSet;

use super::{BusError, Sink};
use crate::metrics as m;

pub struct MemoryBus {
    channels: DashSet<String, ahash::RandomState>,
    sink: Arc<dyn Sink>,
}

impl MemoryBus {
    pub fn new(sink: Arc<dyn Sink>) -> MemoryBus {
        MemoryBus {
            channels: DashSet::with_hasher(ahash::RandomState::new()),
            sink,
        }
    }

    pub fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BusError> {
        if self.channels.contains(channel) {
            self.sink.receive(channel.as_bytes(), payload);
        }
        Ok(())
    }

    pub fn subscribe(&self, topics: &[Vec<String>]) -> Vec<Result<(), BusError>> {
        for c in topics.iter().flatten() {
            self.channels.insert(c.clone());
        }
        m::subscriptions(self.channels.len());
        topics.iter().map(|_| Ok(())).collect()
    }

    pub fn unsubscribe(&self, channels: Vec<String>) -> Result<(), BusError> {
        for c in &channels {
            self.channels.remove(c);
        }
        m::subscriptions(self.channels.len());
        Ok(())
    }
}
