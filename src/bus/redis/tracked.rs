//! The sharded channels the Redis bus has subscribed: each channel once, how many live in each
//! hash slot, and the master each slot's channels were last subscribed on (so the reconciler knows
//! what to subscribe again when a slot moves or a connection is rebuilt).
//!
//! A node holds one inbox channel per connected user, so this is per-connection memory: a set of
//! names and two fixed arrays over the 16,384 slots, about 60 bytes per channel. (A map of slots
//! to sets of names, with a map of slots to masters beside it, cost about 220.)
//!
//! It also counts the channels subscribed on each master, which Redis counts too (`ssub` in
//! `CLIENT INFO`): where Redis has fewer, some were dropped (a slot moved) and the node has not
//! noticed yet (see `links::watch`).

use std::collections::HashSet;

use fred::{prelude::Server, util::redis_keyslot};

/// Hash slots of a Redis Cluster.
pub(super) const SLOTS: usize = 16384;
/// No master: the slot has no channels.
const NONE: u32 = u32::MAX;

pub struct Tracked {
    channels: HashSet<Box<str>>,
    /// Channels tracked in each slot.
    per_slot: Box<[u32]>,
    /// Index into `servers` of the master each slot's channels were subscribed on.
    owner: Box<[u32]>,
    /// Every master seen, each once (a cluster's nodes: a handful, whatever the failovers).
    servers: Vec<Server>,
    /// Channels subscribed on each of `servers`, by index.
    on_server: Vec<u32>,
    /// Slots to subscribe again (their connection was rebuilt or a command failed).
    stale: HashSet<u16>,
}

impl Default for Tracked {
    fn default() -> Tracked {
        Tracked {
            channels: HashSet::new(),
            per_slot: vec![0; SLOTS].into_boxed_slice(),
            owner: vec![NONE; SLOTS].into_boxed_slice(),
            servers: Vec::new(),
            on_server: Vec::new(),
            stale: HashSet::new(),
        }
    }
}

impl Tracked {
    /// Channels tracked.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// Whether every tracked slot is subscribed where it was last asked to be.
    pub fn settled(&self) -> bool {
        self.stale.is_empty()
    }

    fn intern(&mut self, server: &Server) -> u32 {
        match self.servers.iter().position(|s| s == server) {
            Some(i) => i as u32,
            None => {
                self.servers.push(server.clone());
                self.on_server.push(0);
                (self.servers.len() - 1) as u32
            }
        }
    }

    /// How many tracked channels were subscribed on `server`.
    pub fn count_on(&self, server: &Server) -> u32 {
        match self.servers.iter().position(|s| s == server) {
            Some(i) => self.on_server[i],
            None => 0,
        }
    }

    /// `slot`'s channels are now counted on `server` (`NONE`: on none).
    fn set_owner(&mut self, slot: u16, server: u32) {
        let (old, n) = (self.owner[slot as usize], self.per_slot[slot as usize]);
        if let Some(count) = self.on_server.get_mut(old as usize) {
            *count -= n;
        }
        if let Some(count) = self.on_server.get_mut(server as usize) {
            *count += n;
        }
        self.owner[slot as usize] = server;
    }

    fn owner_of(&self, slot: u16) -> Option<&Server> {
        self.servers.get(self.owner[slot as usize] as usize)
    }

    /// `channels` (all of `slot`) were subscribed on `server`. The slot's other channels, if they
    /// were subscribed on another master (the slot moved, and they were not subscribed again
    /// yet), are to be subscribed again on this one.
    pub fn add(&mut self, slot: u16, channels: Vec<String>, server: &Server) {
        let index = self.intern(server);
        let before = self.owner[slot as usize];
        if before != NONE && before != index && self.per_slot[slot as usize] > 0 {
            self.stale.insert(slot);
        }
        let mut added = 0;
        for c in channels {
            if self.channels.insert(c.into_boxed_str()) {
                added += 1;
            }
        }
        self.set_owner(slot, index);
        self.per_slot[slot as usize] += added;
        self.on_server[index as usize] += added;
    }

    /// Stops tracking `channels` (all of `slot`); returns the master they were subscribed on, to
    /// unsubscribe them there, or `None` when none of them was tracked. A slot left empty forgets
    /// its master and its staleness.
    pub fn remove(&mut self, slot: u16, channels: &[String]) -> Option<Server> {
        let mut removed = 0;
        for c in channels {
            if self.channels.remove(c.as_str()) {
                removed += 1;
            }
        }
        if removed == 0 {
            return None;
        }
        let owner = self.owner_of(slot).cloned();
        if let Some(count) = self.on_server.get_mut(self.owner[slot as usize] as usize) {
            *count -= removed;
        }
        let left = &mut self.per_slot[slot as usize];
        *left -= removed;
        if *left == 0 {
            self.owner[slot as usize] = NONE;
            self.stale.remove(&slot);
        }
        owner
    }

    /// Every slot whose channels were subscribed on `server` is to be subscribed again.
    pub fn mark_stale(&mut self, server: &Server) {
        let Some(index) = self.servers.iter().position(|s| s == server) else {
            return;
        };
        let slots =
            (0..SLOTS as u16).filter(|s| self.per_slot[*s as usize] > 0 && self.owner[*s as usize] == index as u32);
        self.stale.extend(slots);
    }

    /// The slots to subscribe again, with their channels and the master to subscribe them on:
    /// those whose master in `routes` is not the one they were subscribed on, and the stale ones.
    /// Slots with no master in `routes` wait.
    pub fn to_resubscribe(&self, routes: &[Option<Server>]) -> Vec<(u16, Vec<String>, Server)> {
        let mut work: Vec<(u16, Vec<String>, Server)> = Vec::new();
        for slot in 0..SLOTS as u16 {
            if self.per_slot[slot as usize] == 0 {
                continue;
            }
            let Some(now) = &routes[slot as usize] else {
                continue;
            };
            if self.owner_of(slot) != Some(now) || self.stale.contains(&slot) {
                work.push((slot, Vec::new(), now.clone()));
            }
        }
        if work.is_empty() {
            return work;
        }
        // Rare (a slot moved, a connection was rebuilt): one pass over every name.
        let mut index = vec![u32::MAX; SLOTS];
        for (i, (slot, _, _)) in work.iter().enumerate() {
            index[*slot as usize] = i as u32;
        }
        for c in &self.channels {
            if let Some((_, names, _)) = work.get_mut(index[redis_keyslot(c.as_bytes()) as usize] as usize) {
                names.push(c.to_string());
            }
        }
        work
    }

    /// `slot`'s channels were subscribed again, on `server`.
    pub fn resubscribed(&mut self, slot: u16, server: &Server) {
        self.stale.remove(&slot);
        let index = self.intern(server);
        self.set_owner(slot, index);
    }

    /// Subscribing `slot`'s channels again failed; the next round tries once more.
    pub fn failed(&mut self, slot: u16) {
        if self.per_slot[slot as usize] > 0 {
            self.stale.insert(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(port: u16) -> Server {
        Server::new("127.0.0.1", port)
    }

    /// Channels of one slot: a hash tag puts them there.
    fn names(tag: &str, n: usize) -> (u16, Vec<String>) {
        let names: Vec<String> = (0..n).map(|i| format!("ws:user:{{{tag}}}{i}")).collect();
        (redis_keyslot(names[0].as_bytes()), names)
    }

    fn routes_to(port: u16) -> Vec<Option<Server>> {
        vec![Some(server(port)); SLOTS]
    }

    #[test]
    fn counts_each_channel_once_and_unsubscribes_where_it_was_subscribed() {
        let mut t = Tracked::default();
        let (slot, chans) = names("a", 3);
        t.add(slot, chans.clone(), &server(7000));
        t.add(slot, chans[..1].to_vec(), &server(7000));
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove(slot, &chans[..2]), Some(server(7000)));
        assert_eq!(t.len(), 1);
        // Not tracked (any more): nothing to unsubscribe.
        assert_eq!(t.remove(slot, &chans[..2]), None);
        assert_eq!(t.count_on(&server(7000)), 1);
        assert_eq!(t.remove(slot, &chans[2..]), Some(server(7000)));
        assert_eq!(t.len(), 0);
        assert_eq!(t.count_on(&server(7000)), 0);
        assert!(
            t.to_resubscribe(&routes_to(7001)).is_empty(),
            "an empty slot has nothing to move"
        );
    }

    #[test]
    fn a_moved_slot_is_resubscribed_on_its_new_master_with_all_its_channels() {
        let mut t = Tracked::default();
        let (a, chans_a) = names("a", 2);
        let (b, chans_b) = names("b", 1);
        t.add(a, chans_a.clone(), &server(7000));
        t.add(b, chans_b, &server(7000));
        assert!(t.to_resubscribe(&routes_to(7000)).is_empty());
        let mut routes = routes_to(7000);
        routes[a as usize] = Some(server(7001));
        let work = t.to_resubscribe(&routes);
        assert_eq!(work.len(), 1);
        let (slot, mut got, to) = work.into_iter().next().unwrap();
        got.sort();
        assert_eq!((slot, got, to), (a, chans_a, server(7001)));
        assert_eq!((t.count_on(&server(7000)), t.count_on(&server(7001))), (3, 0));
        t.resubscribed(a, &server(7001));
        assert_eq!((t.count_on(&server(7000)), t.count_on(&server(7001))), (1, 2));
        assert!(t.to_resubscribe(&routes).is_empty());
        // A slot without a master waits.
        routes[b as usize] = None;
        t.mark_stale(&server(7000));
        assert!(t.to_resubscribe(&routes).is_empty());
    }

    #[test]
    fn a_rebuilt_connection_makes_only_its_slots_stale_until_resubscribed() {
        let mut t = Tracked::default();
        let (a, chans_a) = names("a", 1);
        let (b, chans_b) = names("b", 1);
        t.add(a, chans_a, &server(7000));
        t.add(b, chans_b.clone(), &server(7001));
        let mut routes = routes_to(7000);
        routes[b as usize] = Some(server(7001));
        t.mark_stale(&server(7001));
        assert!(!t.settled());
        let work = t.to_resubscribe(&routes);
        assert_eq!(work, [(b, chans_b.clone(), server(7001))]);
        t.failed(b);
        assert_eq!(
            t.to_resubscribe(&routes),
            work,
            "a failed resubscription is tried again"
        );
        t.resubscribed(b, &server(7001));
        assert!(t.settled());
        // Leaving the last channel of a stale slot settles it too.
        t.mark_stale(&server(7001));
        assert_eq!(t.remove(b, &chans_b), Some(server(7001)));
        assert!(t.settled());
    }

    #[test]
    fn a_channel_subscribed_on_a_slots_new_master_brings_the_slots_others_along() {
        let mut t = Tracked::default();
        let (a, chans) = names("a", 3);
        t.add(a, chans[..2].to_vec(), &server(7000));
        // The slot moved; a join subscribes a new channel of it on the new master before the
        // reconciler noticed: the two before it were dropped by the old one.
        t.add(a, chans[2..].to_vec(), &server(7001));
        assert_eq!((t.count_on(&server(7000)), t.count_on(&server(7001))), (0, 3));
        let mut work = t.to_resubscribe(&routes_to(7001));
        work[0].1.sort();
        assert_eq!(work, [(a, chans, server(7001))]);
    }
}
