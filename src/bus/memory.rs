//! The embedded bus: one node, no Redis. A publish goes straight to this node's delivery workers
//! when the channel is subscribed, exactly as a Redis message would arrive.

use bytes::Bytes;
use dashmap::DashSet;

use super::{BusError, Dispatch};
use crate::metrics as m;

pub struct MemoryBus {
    channels: DashSet<String, ahash::RandomState>,
    dispatch: Dispatch,
}

impl MemoryBus {
    pub fn new(dispatch: Dispatch) -> MemoryBus {
        MemoryBus {
            channels: DashSet::with_hasher(ahash::RandomState::new()),
            dispatch,
        }
    }

    pub fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BusError> {
        if self.channels.contains(channel) {
            self.dispatch.dispatch(channel.as_bytes(), payload);
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
