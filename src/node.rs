//! The handle every part of a running node shares: configuration, hub, bus, channel naming, the
//! backend hooks, the handshakes in progress and the drain flag. Cheap to clone.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    auth::Verifier,
    bus::{Bus, Naming},
    config::Config,
    history::reads::Reads,
    hooks::Hooks,
    hub::Hub,
    presence::Presence,
    upgrade::Handshakes,
};

#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    hub: Hub,
    bus: Arc<Bus>,
    naming: Naming,
    metrics: PrometheusHandle,
    verifier: Option<Verifier>,
    hooks: Hooks,
    history: Arc<Reads>,
    presence: Option<Arc<Presence>>,
    handshakes: Handshakes,
    draining: AtomicBool,
}

impl Node {
    pub fn new(
        config: Config,
        hub: Hub,
        bus: Arc<Bus>,
        naming: Naming,
        metrics: PrometheusHandle,
        verifier: Option<Verifier>,
        hooks: Hooks,
    ) -> Node {
        let draining = AtomicBool::new(false);
        let history = Reads::new(bus.clone());
        let presence = config
            .presence
            .then(|| Arc::new(Presence::new(&config, bus.clone(), naming.clone())));
        let handshakes = Handshakes::new(config.max_handshakes);
        Node {
            inner: Arc::new(Inner {
                config,
                hub,
                bus,
                naming,
                metrics,
                verifier,
                hooks,
                history,
                presence,
                handshakes,
                draining,
            }),
        }
    }

    /// Shared reads of rooms' history.
    pub fn history(&self) -> &Arc<Reads> {
        &self.inner.history
    }

    /// Presence, unless `--presence false`.
    pub fn presence(&self) -> Option<&Arc<Presence>> {
        self.inner.presence.as_ref()
    }

    /// The WebSocket handshakes in progress, at most `--max-handshakes`.
    pub fn handshakes(&self) -> &Handshakes {
        &self.inner.handshakes
    }

    /// The token checker, when auth is configured.
    pub fn verifier(&self) -> Option<&Verifier> {
        self.inner.verifier.as_ref()
    }

    /// The app's backend hooks (each off unless configured).
    pub fn hooks(&self) -> &Hooks {
        &self.inner.hooks
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    pub fn naming(&self) -> &Naming {
        &self.inner.naming
    }

    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    /// Ready for traffic: not draining and the bus usable.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.inner.bus.is_ready()
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }
}
