//! Where each slot lives, and keeping up with it: the slot map read from `CLUSTER SLOTS`, and the
//! reconciler that re-reads it, links every master in it (letting go of the others), gives each
//! link a probe channel on its own master, and subscribes again every tracked slot whose master
//! changed or whose connection was rebuilt.

use std::{sync::Arc, time::Duration};

use fred::{
    interfaces::{ClientLike, ClusterInterface, PubsubInterface},
    prelude::{Server, Value},
    util::redis_keyslot,
};
use futures_util::future::join_all;

use super::{
    bounded,
    links::{self, build, Link},
    lock, read,
    tracked::SLOTS,
    Inner,
};
use crate::metrics as m;

/// How often the reconciler re-reads the cluster topology; faster while something is broken, so
/// a promoted replica is picked up soon after the cluster elects it.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
const RECONCILE_WHILE_DOWN: Duration = Duration::from_millis(200);

/// The master of every slot, as last read from the cluster.
#[derive(Debug, PartialEq)]
pub(super) struct Routes {
    pub(super) by_slot: Vec<Option<Server>>,
    /// The servers that own slots, each once: what readiness checks, without walking every slot
    /// (`is_ready` runs on every upgrade).
    pub(super) masters: Vec<Server>,
    /// Every slot has a master.
    pub(super) complete: bool,
}

impl Routes {
    /// Before the cluster was read: no slot has a master.
    pub(super) fn unknown() -> Routes {
        Routes {
            by_slot: vec![None; SLOTS],
            masters: Vec::new(),
            complete: false,
        }
    }
}

/// Parses `CLUSTER SLOTS` into the master of every slot.
fn parse_slots(value: Value) -> Option<Routes> {
    let Value::Array(ranges) = value else { return None };
    let mut by_slot = vec![None; SLOTS];
    let mut masters = Vec::new();
    for range in ranges {
        let Value::Array(fields) = range else { return None };
        let (start, end) = (fields.first()?.as_i64()?, fields.get(1)?.as_i64()?);
        let Value::Array(master) = fields.get(2)? else {
            return None;
        };
        let host = master.first()?.as_string()?;
        let port = u16::try_from(master.get(1)?.as_i64()?).ok()?;
        let server = Server::new(host, port);
        for slot in start.max(0)..=end.min(SLOTS as i64 - 1) {
            by_slot[slot as usize] = Some(server.clone());
        }
        if !masters.contains(&server) {
            masters.push(server);
        }
    }
    // A later range may have taken every slot of an earlier one's master.
    masters.retain(|m| by_slot.contains(&Some(m.clone())));
    let complete = by_slot.iter().all(Option::is_some);
    Some(Routes {
        by_slot,
        masters,
        complete,
    })
}

impl Inner {
    /// Reads the slot map, links every master in it and lets go of the others, and gives each
    /// link a probe channel on its own master. True when the topology was read.
    pub(super) async fn refresh(self: &Arc<Self>) -> bool {
        self.refresh_via(None).await
    }

    /// [`Inner::refresh`], reading the slot map through `first`'s link first when it has one.
    async fn refresh_via(self: &Arc<Self>, first: Option<Server>) -> bool {
        let Some(routes) = self.read_routes(first).await else {
            return false;
        };
        self.relink(&routes.masters);
        let probes = self.probes_to_place(&routes);
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
        // A command that found no master for its slot, or no link yet, may find one now. The map
        // is in place before any probe waits on its master, so a master slow to answer (frozen,
        // still coming up) holds back no command to the others.
        self.links_changed();
        self.place_probes(probes).await;
        true
    }

    /// `CLUSTER SLOTS` through any answering link (`first`'s before the others), else through a
    /// seed.
    async fn read_routes(&self, first: Option<Server>) -> Option<Routes> {
        let mut candidates: Vec<Arc<Link>> = lock(&self.links).values().cloned().collect();
        candidates.sort_by_key(|l| Some(&l.server) != first.as_ref());
        for link in candidates.iter().filter(|l| l.publisher.is_connected()) {
            let read = tokio::time::timeout(self.timeout, link.publisher.cluster_slots::<Value>()).await;
            if let Some(routes) = read.ok().and_then(Result::ok).and_then(parse_slots) {
                return Some(routes);
            }
        }
        for seed in &self.seeds {
            let Ok(client) = build(seed, false, self.timeout, false) else {
                continue;
            };
            client.connect();
            let read = tokio::time::timeout(self.timeout, async {
                client.wait_for_connect().await.ok()?;
                client.cluster_slots::<Value>().await.ok()
            })
            .await;
            let _ = client.quit().await;
            if let Some(routes) = read.ok().flatten().and_then(parse_slots) {
                return Some(routes);
            }
        }
        None
    }

    /// Links every master not linked yet; a server that is no longer a master (failed, or demoted
    /// to replica) is let go.
    fn relink(self: &Arc<Self>, masters: &[Server]) {
        let mut links = lock(&self.links);
        for server in masters {
            if !links.contains_key(server) {
                match Link::start(self, server.clone()) {
                    Ok(link) => drop(links.insert(server.clone(), link)),
                    Err(e) => tracing::warn!(%server, error = %e, "cannot link a master"),
                }
            }
        }
        let gone: Vec<Server> = links.keys().filter(|s| !masters.contains(*s)).cloned().collect();
        for server in gone {
            if let Some(link) = links.remove(&server) {
                tracing::info!(%server, "no longer a master; closing its link");
                let timeout = self.timeout;
                self.tracker.spawn(async move { link.quit(timeout).await });
            }
        }
    }

    /// Each link probes on a channel of a slot its master owns: the links whose probe channel is
    /// missing or moved away, each with a new one.
    fn probes_to_place(&self, routes: &Routes) -> Vec<(Arc<Link>, String)> {
        let links: Vec<Arc<Link>> = lock(&self.links).values().cloned().collect();
        links
            .into_iter()
            .filter_map(|link| {
                let owned =
                    |c: &String| routes.by_slot[redis_keyslot(c.as_bytes()) as usize].as_ref() == Some(&link.server);
                if lock(&link.probe).as_ref().is_some_and(owned) || !routes.masters.contains(&link.server) {
                    return None;
                }
                let channel = (0u32..)
                    .map(|n| format!("{}{n}", self.probe_prefix))
                    .find(owned)
                    .expect("every master owns some slot");
                Some((link, channel))
            })
            .collect()
    }

    /// Subscribes the new probe channels, all at once: a master slow to answer holds back no
    /// other's.
    async fn place_probes(&self, probes: Vec<(Arc<Link>, String)>) {
        join_all(probes.into_iter().map(|(link, channel)| async move {
            if bounded(self.timeout, link.subscriber.ssubscribe(channel.clone()))
                .await
                .is_ok()
            {
                *lock(&link.probe) = Some(channel);
            }
        }))
        .await;
    }
}

/// Keeps the topology fresh, every tracked channel subscribed on its slot's master, and every
/// link probed.
pub(super) async fn reconcile(bus: Arc<Inner>) {
    let mut was_ready = false;
    loop {
        let every = if was_ready {
            RECONCILE_EVERY
        } else {
            RECONCILE_WHILE_DOWN
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = bus.wake.notified() => {}
            _ = bus.cancel.cancelled() => return,
        }
        let suspect = lock(&bus.suspect).take();
        bus.refresh_via(suspect).await;
        resubscribe_moved(&bus).await;
        links::probe(&bus).await;
        let ready = bus.is_ready();
        if ready != was_ready {
            m::bus_up(ready);
            was_ready = ready;
        }
    }
}

/// Subscribes every tracked slot again whose master changed or whose connection was rebuilt, on
/// its master now; a slot that fails stays stale for the next round.
async fn resubscribe_moved(bus: &Inner) {
    let _op = bus.ops.lock().await;
    let work: Vec<(u16, Vec<String>, Arc<Link>)> = {
        let work = lock(&bus.tracked).to_resubscribe(&read(&bus.routes).by_slot);
        let links = lock(&bus.links);
        work.into_iter()
            .filter_map(|(slot, channels, server)| Some((slot, channels, links.get(&server)?.clone())))
            .collect()
    };
    if work.is_empty() {
        return;
    }
    let results = join_all(work.into_iter().map(|(slot, channels, link)| async move {
        let n = channels.len();
        let r = bounded(bus.timeout, link.subscriber.ssubscribe(channels)).await;
        (slot, n, link.server.clone(), r)
    }))
    .await;
    let mut t = lock(&bus.tracked);
    for (slot, n, server, r) in results {
        match r {
            Ok(()) => {
                t.resubscribed(slot, &server);
                tracing::info!(slot, %server, channels = n, "resubscribed");
                m::resubscribed(n);
            }
            Err(e) => {
                tracing::warn!(slot, error = %e, "resubscription failed; retrying");
                t.failed(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: i64) -> Value {
        Value::Array(vec![Value::from("127.0.0.1"), Value::Integer(port), Value::from("id")])
    }

    #[test]
    fn cluster_slots_parse_into_a_full_map() {
        let v = Value::Array(vec![
            Value::Array(vec![Value::Integer(0), Value::Integer(5460), node(7000), node(7003)]),
            Value::Array(vec![Value::Integer(5461), Value::Integer(16383), node(7001)]),
        ]);
        let routes = parse_slots(v).unwrap();
        assert_eq!(routes.by_slot[0], Some(Server::new("127.0.0.1", 7000)));
        assert_eq!(routes.by_slot[5460], Some(Server::new("127.0.0.1", 7000)));
        assert_eq!(routes.by_slot[5461], Some(Server::new("127.0.0.1", 7001)));
        assert_eq!(routes.by_slot[16383], Some(Server::new("127.0.0.1", 7001)));
        assert_eq!(
            routes.masters,
            [Server::new("127.0.0.1", 7000), Server::new("127.0.0.1", 7001)]
        );
        assert!(routes.complete);
        assert!(parse_slots(Value::Integer(1)).is_none());
    }

    #[test]
    fn a_map_with_a_slot_unowned_is_incomplete_and_lists_only_owners() {
        // 7002's range is taken over entirely by 7001's, and slot 16383 has no master.
        let v = Value::Array(vec![
            Value::Array(vec![Value::Integer(0), Value::Integer(99), node(7000)]),
            Value::Array(vec![Value::Integer(100), Value::Integer(199), node(7002)]),
            Value::Array(vec![Value::Integer(100), Value::Integer(16382), node(7001)]),
        ]);
        let routes = parse_slots(v).unwrap();
        assert!(!routes.complete);
        assert_eq!(
            routes.masters,
            [Server::new("127.0.0.1", 7000), Server::new("127.0.0.1", 7001)]
        );
        assert_eq!(routes.by_slot[16383], None);
    }
}
