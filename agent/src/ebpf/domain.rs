//! The loaded programs and maps as the domain core sees them: `impl core::Kernel for Kernel`.

use std::collections::HashMap;

use aya::maps::lpm_trie::Key;
use breakwater_common::{
    breaker::{
        BreakerEntry, Counts, DestBreaker, DestBreakerKey, DestCommand, DestPolicy, MoreTotals,
        Policy, SvcMeta, Totals,
    },
    counter, direction, hist_kind, names, svc_hist_index, svc_stats_index, BreakerSockRecord,
    ConnRecord, ConnState, ConnStats, DestKey, HIST_BUCKETS,
};
use tracing::warn;

use super::{breaker, iter, mapped::Mapped, records, Kernel};
use crate::{
    clock,
    core::{
        features::Features,
        kernel::{PinnedService, Walked},
        service::Endpoint,
        Histogram, MapSummary, ProgramSummary,
    },
    error::{Error, Result},
    netns,
    netns::NetSettings,
};

impl crate::core::Kernel for Kernel {
    fn now_ns(&self) -> u64 {
        clock::monotonic_ns()
    }

    fn features(&self) -> &Features {
        &self.features
    }

    fn programs(&self) -> Vec<ProgramSummary> {
        self.programs
            .iter()
            .map(|p| {
                let mut p = p.clone();
                let fdinfo = self
                    .ebpf
                    .program(p.name)
                    .and_then(|prog| prog.fd().ok())
                    .and_then(|fd| {
                        use std::os::fd::{AsFd as _, AsRawFd as _};
                        let raw = fd.as_fd().as_raw_fd();
                        std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).ok()
                    })
                    .unwrap_or_default();
                let field = |name: &str| {
                    fdinfo
                        .lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0)
                };
                p.run_count = field("run_cnt");
                p.run_time_ns = field("run_time_ns");
                p.recursion_misses = field("recursion_misses");
                p
            })
            .collect()
    }

    fn maps(&self) -> Vec<MapSummary> {
        // The insert counters before the walks: read after, they count the keys inserted
        // during the walk, which it may not have seen, as evictions (the soak saw 22 in a
        // map 11% full, gone from the next answer: a counter going backwards). Read before, an
        // eviction may show late, never one that did not happen.
        let (dest_inserts, hist_inserts) = (
            self.counter(counter::DEST_INSERTS),
            self.counter(counter::HIST_INSERTS),
        );
        let dests = self.dests.keys().filter(|k| k.is_ok()).count() as u64;
        let hist = self.dest_hist.keys().filter(|k| k.is_ok()).count() as u64;
        let lpm = self.svc_lpm.keys().filter(|k| k.is_ok()).count() as u64;
        let conns = self.conns.keys().filter(|k| k.is_ok()).count() as u64;
        vec![
            MapSummary {
                name: names::MAP_DESTS,
                capacity: self.sizes.max_destinations,
                entries: dests,
                // Nothing deletes destinations but the LRU.
                evictions: dest_inserts.saturating_sub(dests),
            },
            MapSummary {
                name: names::MAP_DEST_HIST,
                capacity: self.sizes.max_histogram_buckets,
                entries: hist,
                // Nothing deletes histogram buckets but the LRU.
                evictions: hist_inserts.saturating_sub(hist),
            },
            MapSummary {
                name: names::MAP_SVC_LPM,
                capacity: self.sizes.max_service_endpoints,
                entries: lpm,
                evictions: 0,
            },
            MapSummary {
                name: names::MAP_CONNS,
                capacity: self.sizes.max_connections,
                entries: conns,
                // Never evicted: a connection that finds it full is left uncounted (`conns_full`).
                evictions: 0,
            },
        ]
    }

    fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or_default()
    }

    fn pinned_services(&self) -> Vec<PinnedService> {
        breaker::pinned_services(
            self.svc_lpm
                .iter()
                .filter_map(|r| r.ok())
                .map(|(key, id)| (key.prefix_len(), key.data(), id)),
            |id| self.brk.meta.get(&id, 0).ok(),
        )
    }

    fn put_endpoints(&mut self, id: u32, added: &[Endpoint]) -> Result<()> {
        for e in added {
            let (len, data) = e.lpm_key();
            self.svc_lpm
                .insert(&Key::new(len, data), id, 0)
                .map_err(Error::map(names::MAP_SVC_LPM))?;
        }
        Ok(())
    }

    fn remove_endpoints(&mut self, removed: &[Endpoint]) -> Result<()> {
        for e in removed {
            let (len, data) = e.lpm_key();
            match self.svc_lpm.remove(&Key::new(len, data)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map(names::MAP_SVC_LPM)(e)),
            }
        }
        Ok(())
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<()> {
        for kind in 0..hist_kind::COUNT {
            for b in 0..HIST_BUCKETS {
                self.svc_hist
                    .set(svc_hist_index(id, kind, b), 0, 0)
                    .map_err(Error::map(names::MAP_SVC_HIST))?;
            }
        }
        for dir in [
            breakwater_common::direction::OUTBOUND,
            breakwater_common::direction::INBOUND,
        ] {
            self.svc_stats
                .set(svc_stats_index(id, dir), ConnStats::default(), 0)
                .map_err(Error::map(names::MAP_SVC_STATS))?;
        }
        Ok(())
    }

    fn set_service_meta(&mut self, id: u32, name: &str, reason: &str) -> Result<()> {
        let [owner, policy_owner, tripped_by] = self.owners(id);
        let mut meta = SvcMeta {
            owner,
            policy_owner,
            tripped_by,
            ..SvcMeta::default()
        };
        let n = name.len().min(meta.name.len());
        meta.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        meta.name_len = n as u16;
        let r = reason.len().min(meta.reason.len());
        meta.reason[..r].copy_from_slice(&reason.as_bytes()[..r]);
        meta.reason_len = r as u16;
        self.brk
            .meta
            .set(id, meta, 0)
            .map_err(Error::map(names::MAP_SVC_META))
    }

    fn owners(&self, id: u32) -> [u8; 3] {
        self.brk
            .meta
            .get(&id, 0)
            .map(|m| [m.owner, m.policy_owner, m.tripped_by])
            .unwrap_or_default()
    }

    fn set_owners(&mut self, id: u32, [owner, policy_owner, tripped_by]: [u8; 3]) -> Result<()> {
        let meta = self
            .brk
            .meta
            .get(&id, 0)
            .map_err(Error::map(names::MAP_SVC_META))?;
        let meta = SvcMeta {
            owner,
            policy_owner,
            tripped_by,
            ..meta
        };
        self.brk
            .meta
            .set(id, meta, 0)
            .map_err(Error::map(names::MAP_SVC_META))
    }

    fn trip_reason(&self, id: u32) -> String {
        self.brk
            .meta
            .get(&id, 0)
            .ok()
            .and_then(|m| breaker::meta_text(&m.reason, m.reason_len))
            .unwrap_or_default()
    }

    fn service_stats(&self, id: u32, direction: u8) -> Result<ConnStats> {
        self.svc_stats
            .get(&svc_stats_index(id, direction), 0)
            .map_err(Error::map(names::MAP_SVC_STATS))
    }

    fn service_histogram(&self, id: u32, kind: u32) -> Result<Histogram> {
        let mut h = [0u64; HIST_BUCKETS as usize];
        for (b, slot) in h.iter_mut().enumerate() {
            *slot = self
                .svc_hist
                .get(&svc_hist_index(id, kind, b as u32), 0)
                .map_err(Error::map(names::MAP_SVC_HIST))?;
        }
        Ok(h)
    }

    fn service_figures(
        &self,
        ids: &[u32],
        kind: u32,
        f: &mut dyn FnMut(usize, [ConnStats; 2], &Histogram),
    ) -> Result<()> {
        use aya::maps::IterableMap as _;
        let (Some(&low), Some(&high)) = (ids.iter().min(), ids.iter().max()) else {
            return Ok(());
        };
        let stats = Mapped::<ConnStats>::new(
            self.svc_stats.map(),
            svc_stats_index(low, 0) as usize..svc_stats_index(high + 1, 0) as usize,
        )
        .map_err(|e| Error::mmap(names::MAP_SVC_STATS, e))?;
        let hist = Mapped::<u64>::new(
            self.svc_hist.map(),
            svc_hist_index(low, 0, 0) as usize..svc_hist_index(high + 1, 0, 0) as usize,
        )
        .map_err(|e| Error::mmap(names::MAP_SVC_HIST, e))?;
        let stat = |id, dir| {
            stats
                .get(svc_stats_index(id, dir) as usize)
                .unwrap_or_default()
        };
        for (i, &id) in ids.iter().enumerate() {
            f(
                i,
                [stat(id, direction::OUTBOUND), stat(id, direction::INBOUND)],
                &hist
                    .array(svc_hist_index(id, kind, 0) as usize)
                    .unwrap_or([0; HIST_BUCKETS as usize]),
            );
        }
        Ok(())
    }

    fn destinations(&self) -> Vec<(DestKey, ConnStats)> {
        // Entries may be evicted while we walk: skip the ones that vanish.
        self.dests.iter().filter_map(|r| r.ok()).collect()
    }

    fn destination_histograms(&self, kind: u32) -> HashMap<DestKey, Histogram> {
        let mut out = HashMap::<DestKey, Histogram>::new();
        for (k, count) in self.dest_hist.iter().filter_map(|r| r.ok()) {
            if k.kind == kind && k.bucket < HIST_BUCKETS {
                out.entry(k.dest).or_insert([0; HIST_BUCKETS as usize])[k.bucket as usize] += count;
            }
        }
        out
    }

    // The listing iterator is read a piece at a time: on a node with 100k sockets, a copy of
    // the whole walk would be megabytes more at the agent's peak.
    fn for_each_connection(&mut self, f: &mut dyn FnMut(&ConnRecord)) -> Result<()> {
        use std::io::Read as _;
        const SIZE: usize = std::mem::size_of::<ConnRecord>();
        let namespaces = netns::all();
        let prog = self
            .iter(names::PROG_LIST_TCP)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let files =
            iter::open_all(prog, &namespaces).map_err(|e| Error::Internal(e.to_string()))?;
        let mut buf = vec![0u8; SIZE * 512];
        for (netns, mut file) in files {
            let mut filled = 0;
            loop {
                let n = match file.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(netns, error = %e, "cannot read the connection list");
                        break;
                    }
                };
                filled += n;
                let whole = filled / SIZE * SIZE;
                for chunk in buf[..whole].chunks_exact(SIZE) {
                    // SAFETY: ConnRecord is plain old data, and the chunk is exactly its size.
                    f(&unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<ConnRecord>()) });
                }
                buf.copy_within(whole..filled, 0);
                filled -= whole;
            }
        }
        Ok(())
    }

    fn restore_pins(&mut self) -> Result<Vec<std::path::PathBuf>> {
        self.pin_again().map_err(|e| Error::Internal(e.to_string()))
    }

    fn sweep_connections(&mut self) -> Result<Option<u64>> {
        let started = self.now_ns();
        let namespaces = netns::all();
        let prog = self
            .iter(names::PROG_STAMP_TCP)
            .map_err(|e| Error::Internal(e.to_string()))?;
        if !iter::run_all(prog, &namespaces).map_err(|e| Error::Internal(e.to_string()))? {
            return Ok(None);
        }
        let Some(previous) = self.last_sweep_ns.replace(started) else {
            return Ok(Some(0));
        };
        // Stamps are whole seconds: one made during the previous walk is at least this.
        let previous_s = (previous / 1_000_000_000) as u32;
        let gone = |st: &ConnState| st.start_ns < previous && st.seen_s < previous_s;
        let stale: Vec<u64> = self
            .conns
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(_, st)| gone(st))
            .map(|(key, _)| key)
            .collect();
        let mut reaped = 0;
        for key in stale {
            // A new socket at the same address may have taken the key meanwhile.
            if self.conns.get(&key, 0).is_ok_and(|st| gone(&st)) && self.conns.remove(&key).is_ok()
            {
                reaped += 1;
            }
        }
        if reaped > 0 {
            let index = counter::CONNS_REAPED;
            let mut values: Vec<u64> = self
                .counters
                .get(&index, 0)
                .map_err(Error::map(names::MAP_COUNTERS))?
                .to_vec();
            values[0] += reaped;
            let values = aya::maps::PerCpuValues::try_from(values)
                .map_err(|e| Error::Internal(format!("per-CPU values: {e}")))?;
            self.counters
                .set(index, values, 0)
                .map_err(Error::map(names::MAP_COUNTERS))?;
        }
        Ok(Some(reaped))
    }

    fn sockets(&mut self) -> Result<Vec<Walked>> {
        let namespaces = netns::all();
        let prog = self
            .iter(names::PROG_SOCKS_TCP)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let walked = iter::walk_all(prog, &namespaces, |_| NetSettings::read())
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(walked
            .into_iter()
            .map(|w| (w.netns, records(&w.bytes), w.inside))
            .collect())
    }

    fn policy(&self, id: u32) -> Result<Policy> {
        self.brk
            .policies
            .get(&id, 0)
            .map_err(Error::map(names::MAP_POLICIES))
    }

    fn set_policy(&mut self, id: u32, policy: &Policy) -> Result<()> {
        self.brk
            .policies
            .set(id, policy, 0)
            .map_err(Error::map(names::MAP_POLICIES))
    }

    fn counts(&self, id: u32) -> Result<Counts> {
        self.brk
            .breakers
            .get(&id, breaker::F_LOCK)
            .map(|e| e.counts)
            .map_err(Error::map(names::MAP_BREAKERS))
    }

    fn set_counts(&mut self, id: u32, counts: Counts) -> Result<()> {
        let entry = BreakerEntry {
            counts,
            ..Default::default()
        };
        self.brk
            .breakers
            .set(id, entry, breaker::F_LOCK)
            .map_err(Error::map(names::MAP_BREAKERS))
    }

    fn totals(&self, id: u32) -> Result<Totals> {
        self.brk
            .totals
            .get(&id, 0)
            .map_err(Error::map(names::MAP_BREAKER_TOTALS))
    }

    fn count_trip(&mut self, id: u32) -> Result<()> {
        let mut t = self.totals(id)?;
        t.trips += 1;
        self.brk
            .totals
            .set(id, t, 0)
            .map_err(Error::map(names::MAP_BREAKER_TOTALS))
    }

    fn clear_breaker(&mut self, id: u32) -> Result<()> {
        self.set_policy(id, &Policy::default())?;
        self.set_counts(id, Counts::default())?;
        self.brk
            .totals
            .set(id, Totals::default(), 0)
            .map_err(Error::map(names::MAP_BREAKER_TOTALS))?;
        self.set_dest_policy(id, &DestPolicy::default())?;
        self.brk
            .more_totals
            .set(id, MoreTotals::default(), 0)
            .map_err(Error::map(names::MAP_MORE_TOTALS))?;
        self.brk
            .meta
            .set(id, SvcMeta::default(), 0)
            .map_err(Error::map(names::MAP_SVC_META))
    }

    fn dest_policy(&self, id: u32) -> Result<DestPolicy> {
        self.brk
            .dest_policies
            .get(&id, 0)
            .map_err(Error::map(names::MAP_DEST_POLICIES))
    }

    fn set_dest_policy(&mut self, id: u32, dest: &DestPolicy) -> Result<()> {
        self.brk
            .dest_policies
            .set(id, dest, 0)
            .map_err(Error::map(names::MAP_DEST_POLICIES))
    }

    fn more_totals(&self, id: u32) -> Result<MoreTotals> {
        self.brk
            .more_totals
            .get(&id, 0)
            .map_err(Error::map(names::MAP_MORE_TOTALS))
    }

    fn dest_breakers(&self) -> Vec<(DestBreakerKey, DestBreaker)> {
        // Entries removed while they are walked are left out.
        self.brk
            .dest_breakers
            .iter()
            .filter_map(|r| r.ok())
            .collect()
    }

    fn dest_command(&mut self, cmd: &DestCommand) -> Result<i32> {
        use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
        // The packet: the command, padded to an Ethernet header's length at least.
        let mut packet = [0u8; 64];
        // SAFETY: `DestCommand` is plain old data of 40 bytes, copied into a 64-byte buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                std::ptr::from_ref(cmd).cast::<u8>(),
                packet.as_mut_ptr(),
                std::mem::size_of::<DestCommand>(),
            );
        }
        let prog: &SchedClassifier = self
            .ebpf
            .program(names::PROG_DEST_CMD)
            .ok_or_else(|| Error::Internal(format!("{} is not loaded", names::PROG_DEST_CMD)))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| Error::Internal(e.to_string()))?;
        let run = prog
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                ..Default::default()
            })
            .map_err(|e| Error::Internal(format!("{}: {e}", names::PROG_DEST_CMD)))?;
        Ok(run.return_value as i32)
    }

    fn terminate(&mut self, id: u32, dest: Option<([u8; 16], u16)>) -> Result<usize> {
        let namespaces = netns::all();
        let prog = self
            .iter(names::PROG_BREAKER_TCP)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let walked = iter::walk_all(prog, &namespaces, move |bytes| {
            let conns: Vec<_> = records::<BreakerSockRecord>(bytes)
                .into_iter()
                .filter(|r| r.svc == id)
                .filter(|r| {
                    dest.is_none_or(|(addr, port)| r.sock.daddr == addr && r.sock.dport == port)
                })
                .map(|r| {
                    let s = &r.sock;
                    (
                        std::net::SocketAddr::new(
                            crate::core::service::display_addr(&s.saddr),
                            s.sport,
                        ),
                        std::net::SocketAddr::new(
                            crate::core::service::display_addr(&s.daddr),
                            s.dport,
                        ),
                    )
                })
                .collect();
            if conns.is_empty() {
                return Ok(crate::destroy::DestroyReport::default());
            }
            crate::destroy::destroy_tcp(&conns)
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        let mut destroyed = 0;
        for w in walked {
            match w.inside {
                Ok(r) => destroyed += r.destroyed,
                Err(e) => warn!(netns = w.netns, error = %e, "cannot destroy connections"),
            }
        }
        Ok(destroyed)
    }

    fn check_scope(&self, cgroup: &str) -> Result<()> {
        let root = crate::cgroup::mount().map_err(|e| Error::Internal(format!("cgroup2: {e}")))?;
        let dir = root.join(cgroup.trim_start_matches('/'));
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "breaker.scope {cgroup:?}: no such cgroup ({})",
                dir.display()
            )));
        }
        Ok(())
    }

    fn attach_scope(&mut self, cgroup: &str) -> Result<()> {
        self.attach_cgroup(cgroup)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    fn detach_scope(&mut self, cgroup: &str) -> Result<()> {
        self.detach_cgroup(cgroup)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    fn set_audit(&mut self, on: bool) -> Result<()> {
        self.audit
            .set(0, u32::from(on), 0)
            .map_err(Error::map(names::MAP_AUDIT))
    }

    fn set_protected(&mut self, endpoints: &[Endpoint]) -> Result<()> {
        let old: Vec<_> = self.protected.keys().filter_map(|k| k.ok()).collect();
        for e in endpoints {
            let (len, data) = e.lpm_key();
            self.protected
                .insert(&Key::new(len, data), 1, 0)
                .map_err(Error::map(names::MAP_PROTECTED))?;
        }
        // Then what is no longer protected: never a moment with less protection than asked.
        for k in old {
            let kept = endpoints.iter().any(|e| {
                let (len, data) = e.lpm_key();
                len == k.prefix_len() && data == k.data()
            });
            if !kept {
                let _ = self.protected.remove(&k);
            }
        }
        Ok(())
    }
}
