//! What the core needs of the kernel, and nothing more: the maps it reads and writes, the walks
//! of every namespace's sockets, and the kernel's clock. `ebpf::Kernel` is the real one; tests
//! use `core::memory::MemoryKernel`, which runs the same breaker state machine and the same
//! service matching in memory.

use std::collections::HashMap;

use breakwater_common::{
    breaker::{
        Counts, DestBreaker, DestBreakerKey, DestCommand, DestPolicy, MoreTotals, Policy, Totals,
    },
    counter, ConnRecord, ConnStats, DestKey, SockRecord, HIST_BUCKETS,
};

use super::{features::Features, service::Endpoint};
use crate::{error::Result, netns::NetSettings};

/// Counts per bucket (see `breakwater_common::hist_bucket`).
pub type Histogram = [u64; HIST_BUCKETS as usize];

/// One network namespace's sockets, from a walk of every namespace: its inode, every TCP
/// socket in it (TIME_WAIT included) and its port settings.
pub type Walked = (u32, Vec<SockRecord>, NetSettings);

/// A program as loaded into the kernel.
#[derive(Clone, Debug, Default)]
pub struct ProgramSummary {
    pub name: &'static str,
    pub attach: String,
    pub id: u32,
    /// From the program fd's fdinfo; run count and time need `kernel.bpf_stats_enabled=1`.
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped because the program was already running on that CPU.
    pub recursion_misses: u64,
}

/// Fill of one map.
#[derive(Clone, Debug)]
pub struct MapSummary {
    pub name: &'static str,
    pub capacity: u32,
    pub entries: u64,
    pub evictions: u64,
}

/// A service a previous agent left in the kernel: its id, name and endpoints.
pub type PinnedService = (u32, String, Vec<Endpoint>);

/// The kernel as the core sees it. Service ids index the per-service maps (1-based; 0 is "no
/// service"); directions and histogram kinds are `breakwater_common::direction` and
/// `hist_kind`.
pub trait Kernel: Send {
    /// CLOCK_MONOTONIC in ns, the clock of the programs' timestamps and of the breakers'
    /// deadlines.
    fn now_ns(&self) -> u64;

    /// What this kernel lets the agent do.
    fn features(&self) -> &Features;
    /// The attached programs with their run statistics now.
    fn programs(&self) -> Vec<ProgramSummary>;
    fn maps(&self) -> Vec<MapSummary>;
    /// One of the programs' counters (`breakwater_common::counter`), summed over CPUs.
    fn counter(&self, index: u32) -> u64;
    /// Every counter, by name.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, self.counter(i as u32)))
            .collect()
    }

    /// Services a previous agent left in the pinned maps.
    fn pinned_services(&self) -> Vec<PinnedService>;
    /// Endpoints that now match service `id`.
    fn put_endpoints(&mut self, id: u32, added: &[Endpoint]) -> Result<()>;
    /// Endpoints that match no service any more.
    fn remove_endpoints(&mut self, removed: &[Endpoint]) -> Result<()>;
    /// Zeroes a service's counters and histograms (a new service starts from zero).
    fn reset_service_stats(&mut self, id: u32) -> Result<()>;
    /// What the kernel keeps of a service beside its maps: its name (to rebuild the table after
    /// a restart) and the reason of an operator's trip.
    fn set_service_meta(&mut self, id: u32, name: &str, reason: &str) -> Result<()>;
    /// The reason an operator gave for the service's current trip.
    fn trip_reason(&self, id: u32) -> String;
    /// Who made the service, its policy and its forced trip (`breakwater_common::breaker::owner`
    /// codes), kept beside its name so that they survive a restart; `set_service_meta` keeps
    /// them.
    fn owners(&self, id: u32) -> [u8; 3];
    fn set_owners(&mut self, id: u32, owners: [u8; 3]) -> Result<()>;
    fn service_stats(&self, id: u32, direction: u8) -> Result<ConnStats>;
    /// A service's histogram of one kind.
    fn service_histogram(&self, id: u32, kind: u32) -> Result<Histogram>;
    /// Many services' counts (outbound, inbound) and histograms of one kind, handed to `f` with
    /// the position of their id in `ids`: for answers about every service, which a read per
    /// slot would make slow (and a copy of every histogram, large).
    fn service_figures(
        &self,
        ids: &[u32],
        kind: u32,
        f: &mut dyn FnMut(usize, [ConnStats; 2], &Histogram),
    ) -> Result<()> {
        for (i, &id) in ids.iter().enumerate() {
            let stats = [
                self.service_stats(id, breakwater_common::direction::OUTBOUND)?,
                self.service_stats(id, breakwater_common::direction::INBOUND)?,
            ];
            f(i, stats, &self.service_histogram(id, kind)?);
        }
        Ok(())
    }

    /// Every destination's counts (entries the LRU evicts while they are read are left out).
    fn destinations(&self) -> Vec<(DestKey, ConnStats)>;
    /// Every destination's histogram of one kind.
    fn destination_histograms(&self, kind: u32) -> HashMap<DestKey, Histogram>;

    /// Visits the tracked live connections of every network namespace.
    fn for_each_connection(&mut self, f: &mut dyn FnMut(&ConnRecord)) -> Result<()>;
    /// Pins again what was unpinned while the agent ran (removed by hand), from the agent's
    /// own references; returns the paths pinned again.
    fn restore_pins(&mut self) -> Result<Vec<std::path::PathBuf>>;
    /// Frees what the kernel keeps of connections whose socket is gone (a program that did not
    /// run to the end left it): walks every namespace to mark the live ones, then removes the
    /// entries that neither this walk nor the previous complete one found and that are older
    /// than the previous one. Returns how many went, or None when some namespace could not be
    /// walked (nothing is removed then: its sockets would look gone).
    fn sweep_connections(&mut self) -> Result<Option<u64>>;
    /// Every TCP socket of every network namespace, with each namespace's port settings.
    fn sockets(&mut self) -> Result<Vec<Walked>>;

    fn policy(&self, id: u32) -> Result<Policy>;
    fn set_policy(&mut self, id: u32, policy: &Policy) -> Result<()>;
    /// A consistent copy of the breaker's counts (read under its lock).
    fn counts(&self, id: u32) -> Result<Counts>;
    /// Replaces the breaker's counts under its lock.
    fn set_counts(&mut self, id: u32, counts: Counts) -> Result<()>;
    fn totals(&self, id: u32) -> Result<Totals>;
    /// Counts a trip made from user space (the kernel counts its own).
    fn count_trip(&mut self, id: u32) -> Result<()>;
    /// Forgets everything about a service's breaker (the service is gone or its id reused).
    fn clear_breaker(&mut self, id: u32) -> Result<()>;
    /// Destroys the established connections the gate admitted to service `id` (only those to
    /// `dest`, an address and port, if given), in every network namespace; returns how many.
    fn terminate(&mut self, id: u32, dest: Option<([u8; 16], u16)>) -> Result<usize>;

    /// What destination granularity adds to a service's policy, with the agent's count of its
    /// live destinations.
    fn dest_policy(&self, id: u32) -> Result<DestPolicy>;
    fn set_dest_policy(&mut self, id: u32, dest: &DestPolicy) -> Result<()>;
    fn more_totals(&self, id: u32) -> Result<MoreTotals>;
    /// Every destination breaker, of every service.
    fn dest_breakers(&self) -> Vec<(DestBreakerKey, DestBreaker)>;
    /// Has the kernel run `cmd` on a destination's breaker, under its service's lock as for
    /// every change; returns a `breakwater_common::breaker::dest_op` code.
    fn dest_command(&mut self, cmd: &DestCommand) -> Result<i32>;

    /// Whether the breakers could be enforced on a cgroup (a path relative to the cgroup2
    /// mount): InvalidArgument naming it if there is no such cgroup.
    fn check_scope(&self, cgroup: &str) -> Result<()>;
    /// Enforces the breakers on one more cgroup.
    fn attach_scope(&mut self, cgroup: &str) -> Result<()>;
    /// Stops enforcing on a cgroup.
    fn detach_scope(&mut self, cgroup: &str) -> Result<()>;

    /// The destinations the gate never refuses, replacing the previous set.
    fn set_protected(&mut self, endpoints: &[Endpoint]) -> Result<()>;

    /// Switches the programs' connection events (the audit stream) on or off.
    fn set_audit(&mut self, on: bool) -> Result<()>;
}
