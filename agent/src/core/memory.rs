//! A kernel in memory, for unit tests of the core and of the API without root.
//!
//! It keeps what the programs keep, and moves it as they do for the events a test makes happen
//! ([`MemoryKernel::connect`], [`MemoryKernel::close`], [`MemoryKernel::reset_by_peer`],
//! [`MemoryKernel::advance`]):
//! - the service trie, matched by port and longest prefix with the `service` module's own
//!   matcher ([`service::longest_match`]), which is what the table and the kernel agree on;
//! - the breaker's gate and outcomes with agent-common's state machine (`Counts::on_connect`,
//!   `Counts::on_outcome`), its totals (rejected, probes, trips), its transitions as events
//!   ([`MemoryKernel::take_events`], what the ring buffer carries) and the policy's errno;
//! - per-destination and per-service counts of outbound connections (opened, active, closed,
//!   failed by reason), the connections alive for the listing, and termination on trip;
//! - the audit stream's events while it is switched on ([`MemoryKernel::take_conn_events`]).
//!
//! It does not model: inbound connections, TIME_WAIT (a test gives the sockets a walk finds,
//! [`MemoryKernel::set_sockets`]) or what enters it, retransmits and bytes, latency (a test
//! adds samples, [`MemoryKernel::add_samples`]), pending first responses, slow connects, map
//! capacities and LRU eviction, seeding, the programs' error counters (a test sets counters),
//! ring buffers that fill up, and concurrency (the spin lock: every connect here runs alone).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use breakwater_common::{
    breaker::{self as brk, policy_flags, state, Admission, Counts, Policy, Totals, Transition},
    conn_event, conn_flags, direction, fail_reason, hist_bucket, tcp_state, ConnEvent, ConnInfo,
    ConnRecord, ConnStats, DestKey, HIST_BUCKETS,
};

use super::{
    features::{Feature, Features},
    kernel::{PinnedService, Walked},
    service::{self, Endpoint},
    Histogram, Kernel, MapSummary, ProgramSummary,
};
use crate::error::{Error, Result};

/// The network namespace the connections are made in.
pub const NETNS: u32 = 4026531840;

/// How a connect ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Established,
    /// RST: ECONNREFUSED.
    Refused,
    /// SYN retries ran out: ETIMEDOUT.
    Timeout,
    /// Anything else in SYN-SENT (unreachable, aborted).
    Other,
}

/// A live (established) connection.
#[derive(Clone, Debug)]
struct Conn {
    cookie: u64,
    info: ConnInfo,
    /// Service the gate admitted it to, with its breaker generation if it was counted.
    admitted: Option<(u32, Option<u64>)>,
}

#[derive(Default)]
struct State {
    now_ns: u64,
    endpoints: BTreeMap<Endpoint, u32>,
    meta: HashMap<u32, (String, String)>,
    owners: HashMap<u32, [u8; 3]>,
    svc_stats: HashMap<(u32, u8), ConnStats>,
    svc_hist: HashMap<(u32, u32), Histogram>,
    /// In the order they were first counted, as a map walk would find them.
    dests: Vec<(DestKey, ConnStats)>,
    dest_hist: HashMap<(DestKey, u32), Histogram>,
    policies: HashMap<u32, Policy>,
    counts: HashMap<u32, Counts>,
    totals: HashMap<u32, Totals>,
    /// Destination granularity: the rules, the number ejected (`BreakerEntry::ejected`), totals
    /// and breakers. Connects here count at service granularity only; commands run as the
    /// kernel's `bw_dest_cmd` does.
    dest_policies: HashMap<u32, brk::DestPolicy>,
    ejected: HashMap<u32, u32>,
    more_totals: HashMap<u32, brk::MoreTotals>,
    dest_breakers: BTreeMap<(u32, u16, [u8; 16]), brk::DestBreaker>,
    protected: Vec<Endpoint>,
    events: Vec<brk::Event>,
    conn_events: Vec<ConnEvent>,
    conns: Vec<Conn>,
    sockets: Vec<Walked>,
    counters: HashMap<u32, u64>,
    cgroups: BTreeSet<String>,
    scope: Vec<String>,
    audit: bool,
    next_cookie: u64,
    next_port: u16,
}

/// The in-memory kernel. Clones share one state: a test keeps one to drive it while the core
/// owns another.
#[derive(Clone)]
pub struct MemoryKernel {
    features: Features,
    state: Arc<Mutex<State>>,
}

impl Default for MemoryKernel {
    fn default() -> Self {
        Self::new()
    }
}

fn v6(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

impl MemoryKernel {
    /// Every feature on.
    pub fn new() -> Self {
        let mut features = Features::default();
        for f in Feature::ALL {
            features.on(f, "memory");
        }
        Self::with_features(features)
    }

    pub fn with_features(features: Features) -> Self {
        let state = State {
            // Not 0: a deadline of 0 means "never".
            now_ns: 1_000_000_000_000,
            next_cookie: 1,
            next_port: 40000,
            ..Default::default()
        };
        Self {
            features,
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets time pass.
    pub fn advance(&self, d: Duration) {
        self.state().now_ns += d.as_nanos() as u64;
    }

    /// A `connect()` from the enforced scope to `to`, ending as `outcome`: Err(errno) if an
    /// open breaker refused it, else the cookie of the connection (established ones stay
    /// alive until [`close`](Self::close)d).
    pub fn connect(&self, to: SocketAddr, outcome: Outcome) -> Result<u64, i32> {
        let mut s = self.state();
        let now = s.now_ns;
        let daddr = v6(to.ip());
        let svc = service::longest_match(
            s.endpoints.iter().map(|(e, id)| (e, *id)),
            &daddr,
            to.port(),
        )
        .unwrap_or(0);
        let sport = s.next_port;
        s.next_port = s.next_port.wrapping_add(1).max(40000);
        let cookie = s.next_cookie;
        s.next_cookie += 1;
        let mut info = ConnInfo {
            saddr: v6(IpAddr::from([127, 0, 0, 1])),
            daddr,
            start_ns: now,
            netns: NETNS,
            pid: 4242,
            sport,
            dport: to.port(),
            svc,
            direction: direction::OUTBOUND,
            flags: conn_flags::COUNTED,
            ..Default::default()
        };
        info.comm[..4].copy_from_slice(b"test");

        // The gate (cgroup/connect4|6), which passes protected destinations untouched.
        let mut generation = None;
        let guarded = !s
            .protected
            .iter()
            .any(|e| e.matches(&std::net::Ipv6Addr::from(daddr), to.port()));
        if let Some(policy) = s
            .policies
            .get(&svc)
            .copied()
            .filter(|p| guarded && p.flags & policy_flags::ENABLED != 0)
        {
            let counts = s.counts.entry(svc).or_default();
            let (admission, t) = counts.on_connect(&policy, now);
            if let Some(t) = t {
                s.emit(svc, &t, now);
            }
            match admission {
                Admission::Admit {
                    generation: g,
                    probe,
                } => {
                    generation = Some(g);
                    if probe {
                        s.totals.entry(svc).or_default().probes += 1;
                    }
                }
                Admission::Reject if policy.flags & policy_flags::AUDIT != 0 => {
                    s.more_totals.entry(svc).or_default().audited += 1;
                }
                Admission::Reject => {
                    s.totals.entry(svc).or_default().rejected += 1;
                    s.audit_event(&info, conn_event::REJECTED, 0, policy.errno, now);
                    return Err(policy.errno as i32);
                }
            }
        }

        // The state tracepoint's counts, and the outcome (sock_ops).
        let key = info.dest_key();
        let failed = match outcome {
            Outcome::Established => {
                s.count(key, svc, |c| {
                    c.opened += 1;
                    c.active += 1;
                });
                s.audit_event(&info, conn_event::OPENED, 0, 0, now);
                s.conns.push(Conn {
                    cookie,
                    info,
                    admitted: (svc != 0).then_some((svc, generation)),
                });
                false
            }
            Outcome::Refused | Outcome::Timeout | Outcome::Other => {
                let reason = match outcome {
                    Outcome::Refused => fail_reason::REFUSED,
                    Outcome::Timeout => fail_reason::TIMEOUT,
                    _ => fail_reason::OTHER,
                };
                s.count(key, svc, |c| match reason {
                    fail_reason::REFUSED => c.failed_refused += 1,
                    fail_reason::TIMEOUT => c.failed_timeout += 1,
                    _ => c.failed_other += 1,
                });
                s.audit_event(&info, conn_event::FAILED, reason, 0, now);
                true
            }
        };
        if let Some(g) = generation {
            s.outcome(svc, g, failed, false, now);
        }
        Ok(cookie)
    }

    /// Either side closes an established connection.
    pub fn close(&self, cookie: u64) {
        let mut s = self.state();
        let Some(i) = s.conns.iter().position(|c| c.cookie == cookie) else {
            return;
        };
        let conn = s.conns.remove(i);
        let now = s.now_ns;
        s.count(conn.info.dest_key(), conn.info.svc, |c| {
            c.closed += 1;
            c.active = c.active.saturating_sub(1);
        });
        s.audit_event(&conn.info, conn_event::CLOSED, 0, 0, now);
    }

    /// The peer resets an established connection: its success becomes a failure.
    pub fn reset_by_peer(&self, cookie: u64) {
        let admitted = {
            let s = self.state();
            s.conns
                .iter()
                .find(|c| c.cookie == cookie)
                .and_then(|c| c.admitted)
        };
        if let Some((svc, Some(g))) = admitted {
            let mut s = self.state();
            let now = s.now_ns;
            s.outcome(svc, g, true, true, now);
        }
        self.close(cookie);
    }

    /// The transitions the programs made since the last call (the breaker ring buffer).
    pub fn take_events(&self) -> Vec<brk::Event> {
        std::mem::take(&mut self.state().events)
    }

    /// The audit stream's events since the last call (the connection ring buffer).
    pub fn take_conn_events(&self) -> Vec<ConnEvent> {
        std::mem::take(&mut self.state().conn_events)
    }

    /// Adds `count` samples of `us` microseconds to the histograms of `to` (outbound) and of its
    /// service.
    pub fn add_samples(&self, to: SocketAddr, kind: u32, us: u64, count: u64) {
        let mut s = self.state();
        let daddr = v6(to.ip());
        let key = DestKey::of(direction::OUTBOUND, ([0; 16], 0), (daddr, to.port()), NETNS);
        let bucket = hist_bucket(us) as usize;
        s.dest_hist
            .entry((key, kind))
            .or_insert([0; HIST_BUCKETS as usize])[bucket] += count;
        let svc = service::longest_match(
            s.endpoints.iter().map(|(e, id)| (e, *id)),
            &daddr,
            to.port(),
        );
        if let Some(svc) = svc {
            s.svc_hist
                .entry((svc, kind))
                .or_insert([0; HIST_BUCKETS as usize])[bucket] += count;
        }
    }

    /// What a walk of every namespace's sockets finds from now on.
    pub fn set_sockets(&self, walked: Vec<Walked>) {
        self.state().sockets = walked;
    }

    pub fn set_counter(&self, index: u32, value: u64) {
        self.state().counters.insert(index, value);
    }

    /// A cgroup the breakers may be enforced on.
    pub fn add_cgroup(&self, cgroup: &str) {
        self.state().cgroups.insert(cgroup.to_owned());
    }

    /// The cgroups enforced now.
    pub fn scope(&self) -> Vec<String> {
        self.state().scope.clone()
    }

    /// Whether the programs write connection events.
    pub fn audit_on(&self) -> bool {
        self.state().audit
    }

    /// The established connections alive now.
    pub fn live(&self) -> usize {
        self.state().conns.len()
    }
}

impl State {
    /// Counts an event under its destination and, if it has one, its service.
    fn count(&mut self, key: DestKey, svc: u32, f: impl Fn(&mut ConnStats)) {
        match self.dests.iter_mut().find(|(k, _)| *k == key) {
            Some((_, c)) => f(c),
            None => {
                let mut c = ConnStats::default();
                f(&mut c);
                self.dests.push((key, c));
            }
        }
        if svc != 0 {
            f(self.svc_stats.entry((svc, key.direction)).or_default());
        }
    }

    fn outcome(&mut self, svc: u32, generation: u64, failed: bool, reset: bool, now: u64) {
        let Some(policy) = self.policies.get(&svc).copied() else {
            return;
        };
        if policy.flags & policy_flags::ENABLED == 0 {
            return;
        }
        let t = self
            .counts
            .entry(svc)
            .or_default()
            .on_outcome(&policy, generation, failed, reset, now);
        if let Some(t) = t {
            self.emit(svc, &t, now);
        }
    }

    /// A transition the programs made: counted if a trip, and sent to the agent.
    fn emit(&mut self, svc: u32, t: &Transition, now: u64) {
        if t.to == state::OPEN {
            self.totals.entry(svc).or_default().trips += 1;
        }
        self.events.push(brk::Event::new(now, svc, t));
    }

    fn audit_event(&mut self, c: &ConnInfo, kind: u8, reason: u8, errno: u32, now: u64) {
        if !self.audit {
            return;
        }
        self.conn_events.push(ConnEvent {
            time_ns: now,
            saddr: if kind == conn_event::REJECTED {
                [0; 16]
            } else {
                c.saddr
            },
            daddr: c.daddr,
            comm: c.comm,
            netns: c.netns,
            pid: c.pid,
            svc: c.svc,
            errno,
            sport: if kind == conn_event::REJECTED {
                0
            } else {
                c.sport
            },
            dport: c.dport,
            kind,
            reason,
            direction: c.direction,
            ..Default::default()
        });
    }
}

impl Kernel for MemoryKernel {
    fn now_ns(&self) -> u64 {
        self.state().now_ns
    }

    fn features(&self) -> &Features {
        &self.features
    }

    fn programs(&self) -> Vec<ProgramSummary> {
        vec![ProgramSummary {
            name: "bw_memory",
            attach: "memory".into(),
            id: 1,
            ..Default::default()
        }]
    }

    fn maps(&self) -> Vec<MapSummary> {
        let s = self.state();
        vec![MapSummary {
            name: breakwater_common::names::MAP_DESTS,
            capacity: 1024,
            entries: s.dests.len() as u64,
            evictions: 0,
        }]
    }

    fn counter(&self, index: u32) -> u64 {
        self.state().counters.get(&index).copied().unwrap_or(0)
    }

    fn pinned_services(&self) -> Vec<PinnedService> {
        let s = self.state();
        let mut by_id = BTreeMap::<u32, Vec<Endpoint>>::new();
        for (e, id) in &s.endpoints {
            by_id.entry(*id).or_default().push(*e);
        }
        by_id
            .into_iter()
            .filter_map(|(id, endpoints)| {
                let (name, _) = s.meta.get(&id).filter(|(n, _)| !n.is_empty())?;
                Some((id, name.clone(), endpoints))
            })
            .collect()
    }

    fn put_endpoints(&mut self, id: u32, added: &[Endpoint]) -> Result<()> {
        let mut s = self.state();
        for e in added {
            s.endpoints.insert(*e, id);
        }
        Ok(())
    }

    fn remove_endpoints(&mut self, removed: &[Endpoint]) -> Result<()> {
        let mut s = self.state();
        for e in removed {
            s.endpoints.remove(e);
        }
        Ok(())
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<()> {
        let mut s = self.state();
        s.svc_stats.retain(|(svc, _), _| *svc != id);
        s.svc_hist.retain(|(svc, _), _| *svc != id);
        Ok(())
    }

    fn set_service_meta(&mut self, id: u32, name: &str, reason: &str) -> Result<()> {
        self.state()
            .meta
            .insert(id, (name.to_owned(), reason.to_owned()));
        Ok(())
    }

    fn trip_reason(&self, id: u32) -> String {
        self.state()
            .meta
            .get(&id)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    fn owners(&self, id: u32) -> [u8; 3] {
        self.state().owners.get(&id).copied().unwrap_or_default()
    }

    fn set_owners(&mut self, id: u32, owners: [u8; 3]) -> Result<()> {
        self.state().owners.insert(id, owners);
        Ok(())
    }

    fn service_stats(&self, id: u32, direction: u8) -> Result<ConnStats> {
        Ok(self
            .state()
            .svc_stats
            .get(&(id, direction))
            .copied()
            .unwrap_or_default())
    }

    fn service_histogram(&self, id: u32, kind: u32) -> Result<Histogram> {
        Ok(self
            .state()
            .svc_hist
            .get(&(id, kind))
            .copied()
            .unwrap_or([0; HIST_BUCKETS as usize]))
    }

    fn destinations(&self) -> Vec<(DestKey, ConnStats)> {
        self.state().dests.clone()
    }

    fn destination_histograms(&self, kind: u32) -> HashMap<DestKey, Histogram> {
        self.state()
            .dest_hist
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .map(|((d, _), h)| (*d, *h))
            .collect()
    }

    fn restore_pins(&mut self) -> Result<Vec<std::path::PathBuf>> {
        Ok(Vec::new())
    }

    fn sweep_connections(&mut self) -> Result<Option<u64>> {
        // Connections here are only those the tests list: none is ever left behind.
        Ok(Some(0))
    }

    fn for_each_connection(&mut self, f: &mut dyn FnMut(&ConnRecord)) -> Result<()> {
        let conns = self.state().conns.clone();
        for c in &conns {
            f(&ConnRecord {
                cookie: c.cookie,
                info: c.info,
                state: u64::from(tcp_state::ESTABLISHED),
            });
        }
        Ok(())
    }

    fn sockets(&mut self) -> Result<Vec<Walked>> {
        Ok(self.state().sockets.clone())
    }

    fn policy(&self, id: u32) -> Result<Policy> {
        Ok(self.state().policies.get(&id).copied().unwrap_or_default())
    }

    fn set_policy(&mut self, id: u32, policy: &Policy) -> Result<()> {
        self.state().policies.insert(id, *policy);
        Ok(())
    }

    fn counts(&self, id: u32) -> Result<Counts> {
        Ok(self.state().counts.get(&id).copied().unwrap_or_default())
    }

    fn set_counts(&mut self, id: u32, counts: Counts) -> Result<()> {
        let mut s = self.state();
        s.counts.insert(id, counts);
        // As the kernel's entry is written whole: a new epoch, none ejected.
        s.ejected.remove(&id);
        Ok(())
    }

    fn totals(&self, id: u32) -> Result<Totals> {
        Ok(self.state().totals.get(&id).copied().unwrap_or_default())
    }

    fn count_trip(&mut self, id: u32) -> Result<()> {
        self.state().totals.entry(id).or_default().trips += 1;
        Ok(())
    }

    fn clear_breaker(&mut self, id: u32) -> Result<()> {
        let mut s = self.state();
        s.policies.remove(&id);
        s.counts.remove(&id);
        s.totals.remove(&id);
        s.dest_policies.remove(&id);
        s.more_totals.remove(&id);
        s.ejected.remove(&id);
        s.meta.remove(&id);
        s.owners.remove(&id);
        Ok(())
    }

    fn dest_policy(&self, id: u32) -> Result<brk::DestPolicy> {
        Ok(self
            .state()
            .dest_policies
            .get(&id)
            .copied()
            .unwrap_or_default())
    }

    fn set_dest_policy(&mut self, id: u32, dest: &brk::DestPolicy) -> Result<()> {
        self.state().dest_policies.insert(id, *dest);
        Ok(())
    }

    fn more_totals(&self, id: u32) -> Result<brk::MoreTotals> {
        Ok(self
            .state()
            .more_totals
            .get(&id)
            .copied()
            .unwrap_or_default())
    }

    fn dest_breakers(&self) -> Vec<(brk::DestBreakerKey, brk::DestBreaker)> {
        self.state()
            .dest_breakers
            .iter()
            .map(|(&(svc, port, addr), d)| {
                (
                    brk::DestBreakerKey {
                        svc,
                        port,
                        _pad: 0,
                        addr,
                    },
                    *d,
                )
            })
            .collect()
    }

    fn dest_command(&mut self, cmd: &brk::DestCommand) -> Result<i32> {
        use brk::dest_op;
        let mut s = self.state();
        let s = &mut *s;
        let k = cmd.key;
        let id = (k.svc, k.port, k.addr);
        let now = s.now_ns;
        let policy = s.policies.get(&k.svc).copied().unwrap_or_default();
        let dp = s.dest_policies.get(&k.svc).copied().unwrap_or_default();
        let mut entry = brk::BreakerEntry {
            counts: s.counts.get(&k.svc).copied().unwrap_or_default(),
            ejected: s.ejected.get(&k.svc).copied().unwrap_or_default(),
            ..Default::default()
        };
        let done = match cmd.op {
            dest_op::TRIP => {
                let d = s.dest_breakers.entry(id).or_default();
                d.trip(&mut entry, &policy, &dp, cmd.arg_ns, now);
                dest_op::DONE
            }
            dest_op::RESET => {
                let reset = s
                    .dest_breakers
                    .get_mut(&id)
                    .and_then(|d| d.reset(&mut entry, &policy, &dp, now));
                if reset.is_some() {
                    dest_op::DONE
                } else {
                    dest_op::UNCHANGED
                }
            }
            dest_op::REAP => match s.dest_breakers.get(&id) {
                Some(d) if d.reapable(&entry, cmd.arg_ns) => {
                    s.dest_breakers.remove(&id);
                    dest_op::DONE
                }
                _ => dest_op::UNCHANGED,
            },
            _ => dest_op::FAILED,
        };
        s.ejected.insert(k.svc, entry.ejected);
        Ok(done)
    }

    fn terminate(&mut self, id: u32, dest: Option<([u8; 16], u16)>) -> Result<usize> {
        let doomed: Vec<u64> = self
            .state()
            .conns
            .iter()
            .filter(|c| c.admitted.is_some_and(|(svc, _)| svc == id))
            .filter(|c| {
                dest.is_none_or(|(addr, port)| c.info.daddr == addr && c.info.dport == port)
            })
            .map(|c| c.cookie)
            .collect();
        // Destroyed by the agent: closed, and no failure for the breaker.
        for cookie in &doomed {
            self.close(*cookie);
        }
        Ok(doomed.len())
    }

    fn check_scope(&self, cgroup: &str) -> Result<()> {
        if self.state().cgroups.contains(cgroup) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "breaker.scope {cgroup:?}: no such cgroup (memory)"
            )))
        }
    }

    fn attach_scope(&mut self, cgroup: &str) -> Result<()> {
        self.check_scope(cgroup)?;
        self.state().scope.push(cgroup.to_owned());
        Ok(())
    }

    fn detach_scope(&mut self, cgroup: &str) -> Result<()> {
        self.state().scope.retain(|c| c != cgroup);
        Ok(())
    }

    fn set_audit(&mut self, on: bool) -> Result<()> {
        self.state().audit = on;
        Ok(())
    }

    fn set_protected(&mut self, endpoints: &[Endpoint]) -> Result<()> {
        self.state().protected = endpoints.to_vec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_counts_like_the_programs() {
        let k = MemoryKernel::new();
        let mut kk = k.clone();
        kk.put_endpoints(3, &["10.0.0.0/8:80".parse().unwrap()])
            .unwrap();
        let to: SocketAddr = "10.1.2.3:80".parse().unwrap();
        let c = k.connect(to, Outcome::Established).unwrap();
        k.connect(to, Outcome::Refused).unwrap();
        k.connect("10.1.2.3:81".parse().unwrap(), Outcome::Timeout)
            .unwrap();
        let dests = kk.destinations();
        assert_eq!(dests.len(), 2);
        assert_eq!(
            (
                dests[0].1.opened,
                dests[0].1.active,
                dests[0].1.failed_refused
            ),
            (1, 1, 1)
        );
        assert_eq!(dests[1].1.failed_timeout, 1);
        let svc = kk.service_stats(3, direction::OUTBOUND).unwrap();
        assert_eq!(
            (svc.opened, svc.failed_refused, svc.failed_timeout),
            (1, 1, 0)
        );
        k.close(c);
        let svc = kk.service_stats(3, direction::OUTBOUND).unwrap();
        assert_eq!((svc.active, svc.closed), (0, 1));
        assert_eq!(k.live(), 0);
    }
}
