//! The domain core: what the agent knows and decides, in its own types, over a kernel it
//! reaches only through [`Kernel`]. The gRPC API (`api`), the metrics and the CLI read it; it
//! reads none of them.
//!
//! [`Core`] holds the service table and everything that changes with it: services, breakers
//! (policies, trips, resets, the events they make), the aggregates the API and the metrics
//! report (destinations, connections, latency, TIME_WAIT and port pressure, the advisor), the
//! audit stream's subscriptions and the config's reload.

pub mod advise;
pub mod aggregate;
pub mod audit;
pub mod breakers;
pub mod conformance;
pub mod counters;
pub mod features;
pub mod kernel;
pub mod latency;
pub mod listing;
// Also for the fuzz targets (cargo-fuzz builds with `--cfg fuzzing`): the `rpc` target calls
// the API over it.
#[cfg(any(test, fuzzing))]
pub mod memory;
pub mod owners;
pub mod policy;
pub mod protected;
pub mod reload;
pub mod service;
#[cfg(test)]
mod tests;
pub mod timewait;

use std::path::PathBuf;

use breakwater_common::breaker::policy_flags;
use tracing::info;

pub use self::kernel::{Histogram, Kernel, MapSummary, ProgramSummary};
use self::{
    audit::ConnectionEvent,
    breakers::BreakerEvent,
    owners::{Owner, Owners, Shadowed, Verdict},
    service::{parse_endpoints, Service, ServiceTable},
};
use crate::{
    cgroup::CgroupPaths,
    config::{Config, Overrides},
    error::Result,
};

/// The service table and the kernel, changed together; what the API, the metrics and the event
/// readers serve from. `K` is the kernel: `ebpf::Kernel` while the agent starts (it attaches
/// after the config's services are in), then any [`Kernel`].
pub struct Core<K: Kernel + ?Sized = dyn Kernel> {
    services: ServiceTable,
    rates: aggregate::RateWindow,
    /// Breaker state changes, fanned out to `WatchBreakerEvents` subscribers.
    events: tokio::sync::broadcast::Sender<BreakerEvent>,
    /// Connection events, fanned out to `WatchConnections` subscribers: shared, not copied
    /// per subscriber (a churning node makes 100k+ a second).
    audit: tokio::sync::broadcast::Sender<std::sync::Arc<ConnectionEvent>>,
    /// The kernel's count of connection events it had no room for, as last seen.
    audit_lost: u64,
    cgroups: CgroupPaths,
    /// The config last applied (at start or by a reload): a reload applies the difference.
    config: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    /// Who made each service and policy.
    owners: Owners,
    /// The link to the fleet's etcd, when the agent has one.
    fleet: Option<FleetLink>,
    /// Fleet quorum rules of breaker policies, by service.
    quorums: std::collections::BTreeMap<String, policy::Quorum>,
    /// Operators' trips of destinations: reason and who, by service id and destination (the
    /// kernel keeps the state; this is lost on restart).
    dest_trips: std::collections::HashMap<(u32, std::net::SocketAddr), (String, Owner)>,
    /// The agent's own control paths, never refused (see `protected`).
    own_protected: Vec<protected::Protected>,
    kernel: Box<K>,
}

/// The state of the agent's link to the fleet (etcd), for `info` and the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetLink {
    pub node: String,
    pub endpoints: Vec<String>,
    pub connected: bool,
    /// Since when it is connected, or not.
    pub since: std::time::SystemTime,
    /// The etcd revision of the desired state last applied.
    pub applied_revision: i64,
    /// Records read from etcd that were invalid (not applied).
    pub invalid_records: u64,
    /// Valid records that could not be applied on this node.
    pub not_applied: u64,
    /// Why the link is down.
    pub last_error: String,
}

impl Default for FleetLink {
    fn default() -> Self {
        Self {
            node: String::new(),
            endpoints: Vec::new(),
            connected: false,
            since: std::time::SystemTime::now(),
            applied_revision: 0,
            invalid_records: 0,
            not_applied: 0,
            last_error: "not connected yet".into(),
        }
    }
}

impl<K: Kernel> Core<K> {
    /// A core over `kernel`, with the services a previous agent left in it. Nothing of
    /// `config` is applied yet (see [`Core::apply_config`]); a reload reads `config_path`.
    pub fn new(
        kernel: K,
        config: Config,
        config_path: Option<PathBuf>,
        overrides: Overrides,
    ) -> Self {
        let mut services =
            ServiceTable::new(config.maps.max_services, config.maps.max_service_endpoints);
        let mut owners = Owners::default();
        for (id, name, endpoints) in kernel.pinned_services() {
            info!(service = name, id, "service kept from the previous agent");
            services.restore(id, &name, endpoints);
            let has_policy = kernel
                .policy(id)
                .is_ok_and(|p| p.flags & policy_flags::ENABLED != 0);
            owners.restore(&name, kernel.owners(id), has_policy);
        }
        Self {
            services,
            rates: Default::default(),
            events: tokio::sync::broadcast::channel(1024).0,
            // ~0.1 s of a churning node's events for a subscriber that falls behind.
            audit: tokio::sync::broadcast::channel(16_384).0,
            audit_lost: 0,
            cgroups: CgroupPaths::default(),
            config,
            config_path,
            overrides,
            owners,
            fleet: None,
            quorums: Default::default(),
            dest_trips: Default::default(),
            own_protected: Vec::new(),
            kernel: Box::new(kernel),
        }
    }

    /// The same core over the kernel as a [`Kernel`] object.
    pub fn into_dyn(self) -> Core
    where
        K: 'static,
    {
        Core {
            services: self.services,
            rates: self.rates,
            events: self.events,
            audit: self.audit,
            audit_lost: self.audit_lost,
            cgroups: self.cgroups,
            config: self.config,
            config_path: self.config_path,
            overrides: self.overrides,
            owners: self.owners,
            fleet: self.fleet,
            quorums: self.quorums,
            dest_trips: self.dest_trips,
            own_protected: self.own_protected,
            kernel: self.kernel,
        }
    }
}

impl<K: Kernel + ?Sized> Core<K> {
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    pub fn services(&self) -> &ServiceTable {
        &self.services
    }

    /// Who made each service and policy.
    pub fn owners(&self) -> &Owners {
        &self.owners
    }

    /// The link to the fleet, if the agent has one.
    pub fn fleet_link(&self) -> Option<&FleetLink> {
        self.fleet.as_ref()
    }

    /// The link to the fleet, made on first use.
    pub fn fleet_link_mut(&mut self) -> &mut FleetLink {
        self.fleet.get_or_insert_with(FleetLink::default)
    }

    /// The config last applied.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies the config over what a previous agent left pinned (at start, before seeding):
    /// its services are put, and its breaker policies set where they differ from the pinned
    /// ones (an unchanged policy keeps the breaker's state across the restart).
    pub fn apply_config(&mut self, config: &Config) -> Result<()> {
        self.apply_protected(config)?;
        for s in &config.services {
            self.put_service(Owner::Config, &s.name, &s.endpoints)?;
        }
        for (name, policy) in config.policies()? {
            let id = self.services.require(&name)?.id;
            let mut enabled = policy;
            enabled.policy.flags |= policy_flags::ENABLED;
            if self.rules(id)? != enabled {
                self.set_policy(Owner::Config, &name, enabled)?;
            } else {
                self.owners.set_policy(&name, Owner::Config);
                self.save_owners(&name)?;
            }
        }
        for (name, quorum) in config.quorums()? {
            self.set_quorum(Owner::Config, &name, quorum)?;
        }
        Ok(())
    }

    /// Creates or replaces a service as `owner`; true if it replaced one. On any error the
    /// table and the kernel stay as they were. A change to a fleet-owned service by the config
    /// is kept aside (see [`owners`]); by the local API it is refused.
    pub fn put_service<S: AsRef<str>>(
        &mut self,
        owner: Owner,
        name: &str,
        endpoints: &[S],
    ) -> Result<(Service, bool)> {
        let parsed = parse_endpoints(name, endpoints)?;
        let texts: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_owned()).collect();
        if self.owners.check_service(owner, name)? == Verdict::Shadow {
            self.owners.shadowed_services.insert(
                name.to_owned(),
                Shadowed {
                    owner,
                    value: texts,
                },
            );
            let svc = self.services.require(name)?.clone();
            return Ok((svc, true));
        }
        let previous = self.owners.service(name);
        // `put` checks everything before it changes the table; if the kernel then fails, the
        // table goes back to what it was (no copy of it: 10,000 services are put at start).
        let old = self.services.get(name).cloned();
        let change = self.services.put(name, parsed)?;
        if let Err(e) = self.apply_put(name, &change) {
            match &old {
                Some(o) => self.services.restore(o.id, &o.name, o.endpoints.clone()),
                None => drop(self.services.delete(name)),
            }
            return Err(e);
        }
        if owner == Owner::Fleet {
            if let (Some(p @ (Owner::Local | Owner::Config)), Some(old)) = (previous, &old) {
                let value = old.endpoints.iter().map(ToString::to_string);
                self.owners.shadowed_services.insert(
                    name.to_owned(),
                    Shadowed {
                        owner: p,
                        value: value.collect(),
                    },
                );
            }
        }
        self.owners.set_service(name, owner);
        self.save_owners(name)?;
        let svc = self.services.get(name).expect("just put").clone();
        Ok((svc, change.replaced))
    }

    /// The kernel's side of a service put: its slots zeroed if new, its endpoints.
    fn apply_put(&mut self, name: &str, change: &service::Change) -> Result<()> {
        if change.created {
            self.kernel.reset_service_stats(change.id)?;
            self.kernel.clear_breaker(change.id)?;
            self.kernel.set_service_meta(change.id, name, "")?;
        }
        self.kernel.put_endpoints(change.id, &change.added)?;
        self.kernel.remove_endpoints(&change.removed)
    }

    /// Deletes a service as `owner`. When the fleet deletes its own, the definition it hid
    /// comes back in its place.
    pub fn delete_service(&mut self, owner: Owner, name: &str) -> Result<()> {
        if self.owners.check_service(owner, name)? == Verdict::Shadow {
            if self.owners.shadowed_service(name) == Some(owner) {
                self.owners.shadowed_services.remove(name);
            }
            return Ok(());
        }
        if owner == Owner::Fleet && self.owners.service(name) == Some(Owner::Fleet) {
            if let Some(hidden) = self.owners.shadowed_services.remove(name) {
                // Back to the hidden endpoints; the breaker and its policy stay.
                self.owners.set_service(name, hidden.owner);
                self.put_service(hidden.owner, name, &hidden.value)?;
                return Ok(());
            }
        }
        let svc = self.services.require(name)?.clone();
        self.kernel.remove_endpoints(&svc.endpoints)?;
        self.kernel.reset_service_stats(svc.id)?;
        self.kernel.clear_breaker(svc.id)?;
        self.services.delete(name)?;
        self.owners.remove_service(name);
        self.quorums.remove(name);
        Ok(())
    }

    /// Writes `name`'s owners where the kernel keeps them, so that a restarted agent knows
    /// them even before the config or the fleet claims them again.
    fn save_owners(&mut self, name: &str) -> Result<()> {
        let Some(id) = self.services.get(name).map(|s| s.id) else {
            return Ok(());
        };
        let codes = self.owners.codes(name);
        self.kernel.set_owners(id, codes)
    }

    /// NotFound for a name that is neither empty (no filter) nor a service's.
    pub fn require_known(&self, name: &str) -> Result<()> {
        if !name.is_empty() {
            self.services.require(name)?;
        }
        Ok(())
    }

    /// The name of the service whose endpoint `addr:port` matches; empty if none.
    fn service_name(&self, addr: &[u8; 16], port: u16) -> String {
        self.services
            .match_endpoint(addr, port)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }
}
