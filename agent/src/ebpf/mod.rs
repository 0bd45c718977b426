//! Loading, attaching and reading the eBPF programs and maps; one module per hook family,
//! mirroring `agent-ebpf/src`.

pub mod breaker;
pub mod btf;
pub mod iter;
pub mod tracepoints;

use std::path::{Path, PathBuf};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{links::PinnedLink, Iter, ProgramError},
    Ebpf, EbpfLoader,
};
use breakwater_common::{
    conn_flags, counter, direction, hist_kind, names, svc_hist_index, svc_stats_index, ConnRecord,
    ConnState, ConnStats, DestKey, HistKey, SockRecord, SvcLpmData, HIST_BUCKETS,
};
use tracing::info;

use crate::{
    config::MapSizes,
    error::{Error, Result},
    features::{Feature, Features, Status},
    netns,
    netns::NetSettings,
    service::Endpoint,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/breakwater"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("{what}: {source}")]
    Program {
        what: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("seeding from existing sockets: {0}")]
    Seed(String),
    /// Pinning, cgroups, bpffs: the breaker's setup around the programs.
    #[error("{0}")]
    Setup(String),
    #[error(
        "pin directory {}: not on a bpf filesystem; pins live on bpffs: use a directory under \
         /sys/fs/bpf, or mount bpffs where they should go (mount -t bpf bpf DIR)",
        .0.display()
    )]
    NotBpffs(PathBuf),
    /// A core feature cannot run on this kernel: what is missing, and what brings it.
    #[error("this kernel cannot run breakwater: {0}")]
    Unsupported(String),
    #[error(
        "pin directory {} is in use by another running agent: stop it, or give this one its own --pin-dir",
        .0.display()
    )]
    PinDirInUse(PathBuf),
}

impl LoadError {
    fn program<E: Into<ProgramError>>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Self::Program {
            what,
            source: e.into(),
        }
    }
}

/// Why the kernel refused a program, in a line: the verifier's verdict (the last line of its
/// log that is not statistics) with, for the refusals older kernels are known for, the kernel
/// that lifts them. The whole log goes to the debug log.
pub fn refused(e: &ProgramError) -> String {
    let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = e
    else {
        return crate::error::chain(e);
    };
    let log = verifier_log.to_string();
    tracing::debug!(verifier_log = %log, "program refused");
    let verdict = log.lines().map(str::trim).rev().find(|l| {
        !l.is_empty()
            && ![
                "verification time",
                "stack depth",
                "processed ",
                "max_states",
            ]
            .iter()
            .any(|stat| l.starts_with(stat))
    });
    const KNOWN: [(&str, &str); 3] = [
        (
            "unknown func bpf_sk_storage_get",
            "tracing programs may use socket-local storage from Linux 5.11",
        ),
        (
            "unknown func bpf_set_retval",
            "bpf_set_retval came in Linux 5.18",
        ),
        (
            "function calls are not allowed while holding a lock",
            "this kernel's verifier allows no call under a spin lock",
        ),
    ];
    match verdict {
        None => format!("BPF_PROG_LOAD: {io_error}"),
        Some(v) => match KNOWN.iter().find(|(pattern, _)| v.contains(pattern)) {
            Some((_, hint)) => format!("the verifier refused it: {v} ({hint})"),
            None => format!("the verifier refused it: {v}"),
        },
    }
}

/// How `info` shows the socket iterators' hook.
fn iter_hook() -> String {
    format!("iter/{}", names::ITER_TCP)
}

/// A program of the object by name, as its concrete type.
fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    kind: &'static str,
) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(LoadError::program(kind))
}

/// Counts per bucket (see `breakwater_common::hist_bucket`).
pub type Histogram = [u64; HIST_BUCKETS as usize];

/// Fixed-size records an iterator wrote.
fn records<T: aya::Pod>(bytes: &[u8]) -> Vec<T> {
    bytes
        .chunks_exact(std::mem::size_of::<T>())
        .map(|chunk| {
            // SAFETY: T is plain old data, and the chunk is exactly its size.
            unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) }
        })
        .collect()
}

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

/// The loaded programs and the agent's handles on their maps. Dropping it detaches everything.
pub struct Kernel {
    ebpf: Ebpf,
    dests: HashMap<MapData, DestKey, ConnStats>,
    dest_hist: HashMap<MapData, HistKey, u64>,
    conns: HashMap<MapData, u64, ConnState>,
    svc_hist: Array<MapData, u64>,
    svc_lpm: LpmTrie<MapData, SvcLpmData, u32>,
    svc_stats: Array<MapData, ConnStats>,
    counters: PerCpuArray<MapData, u64>,
    brk: breaker::BreakerMaps,
    events: Option<RingBuf<MapData>>,
    audit: Array<MapData, u32>,
    conn_events: Option<RingBuf<MapData>>,
    sizes: MapSizes,
    programs: Vec<ProgramSummary>,
    features: Features,
    /// The kernel's BTF, from `load` until the hooks are chosen.
    btf: Option<btf::KernelBtf>,
    /// Whether sock_diag can destroy a connection here (tried once, before attaching).
    destroy_probe: Option<Result<(), String>>,
    /// Optional features the operator turned off (`[features] disable`).
    disabled: Vec<Feature>,
    pin_dir: PathBuf,
    _pin_lock: breaker::PinLock,
    /// Pinned cgroup links by the cgroup they enforce on; dropping them leaves the pins (and so
    /// the enforcement) in place.
    links: Vec<(String, PinnedLink)>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoadError> {
    let map = ebpf
        .take_map(name)
        .ok_or(LoadError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// What the attached programs do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Hooks {
    /// Track, measure and enforce.
    #[default]
    Work,
    /// Return at once: nothing is counted or enforced. What the kernel's hooks cost by
    /// themselves, for the bench to set against [`Hooks::Work`].
    Empty,
}

impl Kernel {
    /// Loads the programs with the given map sizes; nothing is attached yet. The maps in
    /// `names::PINNED_MAPS` are taken from `pin_dir` if a previous agent pinned them there,
    /// else created and pinned.
    pub fn load(sizes: &MapSizes, pin_dir: &Path, hooks: Hooks) -> Result<Self, LoadError> {
        let kbtf = btf::KernelBtf::read(Path::new(btf::VMLINUX)).map_err(|e| {
            LoadError::Unsupported(format!(
                "{e}: breakwater reads kernel structures through BTF, which needs a kernel built \
                 with CONFIG_DEBUG_INFO_BTF=y"
            ))
        })?;
        let offsets = kbtf.offsets()?;
        breaker::prepare_pin_dir(pin_dir)?;
        let pin_lock = breaker::lock_pin_dir(pin_dir)?;
        let layout = breaker::check_layout(pin_dir)?;
        breaker::check_pins(pin_dir, sizes)?;
        let mut loader = EbpfLoader::new();
        for name in names::PINNED_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        // Service ids run 1..=max_services; slot 0 is "no service".
        for name in [
            names::MAP_POLICIES,
            names::MAP_BREAKERS,
            names::MAP_BREAKER_TOTALS,
            names::MAP_SVC_META,
        ] {
            loader.map_max_entries(name, sizes.max_services + 1);
        }
        let mut ebpf = loader
            .override_global(names::GLOBAL_OFFSETS, &offsets, true)
            .override_global(names::GLOBAL_EMPTY, &u32::from(hooks == Hooks::Empty), true)
            .map_max_entries(names::MAP_DESTS, sizes.max_destinations)
            .map_max_entries(names::MAP_SVC_LPM, sizes.max_service_endpoints)
            // Service ids run 1..=max_services; slot 0 is "no service".
            .map_max_entries(names::MAP_SVC_STATS, (sizes.max_services + 1) * 2)
            .map_max_entries(names::MAP_DEST_HIST, sizes.max_histogram_buckets)
            .map_max_entries(names::MAP_CONNS, sizes.max_connections)
            .map_max_entries(
                names::MAP_SVC_HIST,
                (sizes.max_services + 1) * hist_kind::COUNT * HIST_BUCKETS,
            )
            .load(OBJECT)?;
        for name in names::ALL_MAPS {
            if ebpf.map(name).is_none() {
                return Err(LoadError::Missing { kind: "map", name });
            }
        }
        breaker::stamp_layout(&mut ebpf)?;
        if layout == breaker::Layout::Unstamped {
            info!(pin_dir = %pin_dir.display(), "pinned state from before layout stamps: stamped");
        }
        Ok(Self {
            dests: take(&mut ebpf, names::MAP_DESTS)?,
            dest_hist: take(&mut ebpf, names::MAP_DEST_HIST)?,
            conns: take(&mut ebpf, names::MAP_CONNS)?,
            svc_hist: take(&mut ebpf, names::MAP_SVC_HIST)?,
            svc_lpm: take(&mut ebpf, names::MAP_SVC_LPM)?,
            svc_stats: take(&mut ebpf, names::MAP_SVC_STATS)?,
            counters: take(&mut ebpf, names::MAP_COUNTERS)?,
            brk: breaker::BreakerMaps::take(&mut ebpf)?,
            events: Some(take(&mut ebpf, names::MAP_BREAKER_EVENTS)?),
            audit: take(&mut ebpf, names::MAP_AUDIT)?,
            conn_events: Some(take(&mut ebpf, names::MAP_CONN_EVENTS)?),
            ebpf,
            sizes: sizes.clone(),
            programs: Vec::new(),
            features: Features::default(),
            btf: Some(kbtf),
            destroy_probe: None,
            disabled: Vec::new(),
            pin_dir: pin_dir.to_owned(),
            _pin_lock: pin_lock,
            links: Vec::new(),
        })
    }

    /// Attaches the tracking programs, each feature through the best hook this kernel has,
    /// then seeds the gauges from the sockets that already exist in every network namespace
    /// (after attaching, so that nothing falls in between). Optional features the kernel cannot
    /// run, or that `disabled` names, are off; connection tracking is core: without it,
    /// `LoadError::Unsupported`.
    pub fn attach(&mut self, disabled: &[Feature]) -> Result<(), LoadError> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| LoadError::Program {
            what: "kernel BTF",
            source: ProgramError::Btf(e),
        })?;
        let kbtf = self.kernel_btf()?;
        // Before anything is attached: the probe's own connection must not be counted.
        self.destroy_probe = Some(crate::destroy::probe());

        let (_, state) =
            tracepoints::attach_first(&mut self.ebpf, &kbtf, &btf, tracepoints::SOCK_STATE)
                .map_err(|why| {
                    LoadError::Unsupported(format!("connection tracking cannot run: {why}"))
                })?;
        let state_hook = state.attach.clone();
        self.programs.push(state);
        if !disabled.contains(&Feature::FirstResponseLatency) {
            self.attach_first_response(&kbtf, &btf)?;
        }
        if !disabled.contains(&Feature::Retransmits) {
            match tracepoints::attach_first(&mut self.ebpf, &kbtf, &btf, tracepoints::RETRANSMIT) {
                Ok((_, p)) => {
                    self.features.on(Feature::Retransmits, p.attach.clone());
                    self.programs.push(p);
                }
                Err(why) => self.features.off(Feature::Retransmits, why),
            }
        }
        let iter_hook = iter_hook();
        for name in [
            names::PROG_SEED_TCP,
            names::PROG_LIST_TCP,
            names::PROG_SOCKS_TCP,
        ] {
            match self.load_iter(name, &btf)? {
                Ok(summary) => self.programs.push(summary),
                Err(why) if name == names::PROG_SOCKS_TCP => {
                    self.features.off(Feature::TimeWait, why)
                }
                Err(why) => {
                    return Err(LoadError::Unsupported(format!(
                        "connection tracking needs BPF iterators over TCP sockets ({why}): Linux \
                         5.9 or later"
                    )))
                }
            }
        }
        self.features.on(
            Feature::ConnectionTracking,
            format!("{state_hook}, {iter_hook}"),
        );
        self.features
            .on(Feature::ConnectLatency, state_hook.clone());
        self.features.on(Feature::TcpStats, state_hook.clone());
        if self
            .programs
            .iter()
            .any(|p| p.name == names::PROG_SOCKS_TCP)
        {
            self.features
                .on(Feature::TimeWait, format!("{state_hook}, {iter_hook}"));
        }
        self.features.on(
            Feature::AuditStream,
            format!("ringbuf {}", names::MAP_CONN_EVENTS),
        );

        self.disabled = disabled.to_vec();
        self.features.disable(disabled);
        self.btf = Some(kbtf);

        let namespaces = netns::all();
        let walked = iter::walk_all(self.iter(names::PROG_SEED_TCP)?, &namespaces, |_| ())?;
        info!(
            namespaces = walked.len(),
            seeded = self.counter(counter::SEEDED),
            "seeded from existing sockets"
        );
        Ok(())
    }

    /// First-response timing needs both a send hook and a receive hook; with only one, neither
    /// stays attached.
    fn attach_first_response(
        &mut self,
        kbtf: &btf::KernelBtf,
        btf: &aya::Btf,
    ) -> Result<(), LoadError> {
        let send = tracepoints::attach_first(&mut self.ebpf, kbtf, btf, tracepoints::SEND);
        let ready = tracepoints::attach_first(&mut self.ebpf, kbtf, btf, tracepoints::DATA_READY);
        match (send, ready) {
            (Ok((_, send)), Ok((_, ready))) => {
                let mut hooks = vec![send.attach.clone()];
                self.programs.push(send);
                let mut missed = None;
                if kbtf.has_function(names::FUNC_SOCK_SENDPAGES) {
                    match tracepoints::attach_first(
                        &mut self.ebpf,
                        kbtf,
                        btf,
                        tracepoints::SENDPAGES,
                    ) {
                        Ok((_, pages)) => {
                            hooks.push(pages.attach.clone());
                            self.programs.push(pages);
                        }
                        Err(why) => missed = Some(why),
                    }
                }
                hooks.push(ready.attach.clone());
                let hooks = hooks.join(", ");
                match missed {
                    None => self.features.on(Feature::FirstResponseLatency, hooks),
                    Some(why) => self.features.set(
                        Feature::FirstResponseLatency,
                        Status::Degraded,
                        hooks,
                        format!("requests sent by sendfile() or splice() are not timed ({why})"),
                    ),
                }
                self.programs.push(ready);
            }
            (send, ready) => {
                let mut why = Vec::new();
                for half in [send, ready] {
                    match half {
                        Ok((hook, _)) => hook.detach(&mut self.ebpf)?,
                        Err(e) => why.push(e),
                    }
                }
                self.features.off(
                    Feature::FirstResponseLatency,
                    format!("no hook for {}", why.join("; and none for ")),
                );
            }
        }
        Ok(())
    }

    /// The kernel's BTF as `load` read it (read again if it was let go).
    fn kernel_btf(&mut self) -> Result<btf::KernelBtf, LoadError> {
        match self.btf.take() {
            Some(b) => Ok(b),
            None => Ok(btf::KernelBtf::read(Path::new(btf::VMLINUX))?),
        }
    }

    /// What this kernel lets the agent do, as probed while loading and attaching.
    pub fn features(&self) -> &Features {
        &self.features
    }

    fn iter(&mut self, name: &'static str) -> Result<&mut Iter, LoadError> {
        program(&mut self.ebpf, name, "iter/tcp")
    }

    /// Loads the `iter/tcp` program `name`: its summary, or why the kernel refused it.
    fn load_iter(
        &mut self,
        name: &'static str,
        btf: &aya::Btf,
    ) -> Result<Result<ProgramSummary, String>, LoadError> {
        let prog = self.iter(name)?;
        Ok(match prog.load(names::ITER_TCP, btf) {
            Ok(()) => Ok(ProgramSummary {
                name,
                attach: iter_hook(),
                id: prog.info().map(|i| i.id()).unwrap_or_default(),
                ..Default::default()
            }),
            Err(e) => Err(format!("{}: {}", iter_hook(), refused(&e))),
        })
    }

    /// The attached programs with their kernel run statistics now.
    pub fn programs(&self) -> Vec<ProgramSummary> {
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

    pub fn put_endpoints(&mut self, id: u32, added: &[Endpoint]) -> Result<()> {
        for e in added {
            let (len, data) = e.lpm_key();
            self.svc_lpm
                .insert(&Key::new(len, data), id, 0)
                .map_err(Error::map(names::MAP_SVC_LPM))?;
        }
        Ok(())
    }

    pub fn remove_endpoints(&mut self, removed: &[Endpoint]) -> Result<()> {
        for e in removed {
            let (len, data) = e.lpm_key();
            match self.svc_lpm.remove(&Key::new(len, data)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map(names::MAP_SVC_LPM)(e)),
            }
        }
        Ok(())
    }

    /// Zeroes a service's counters and histograms (a new service starts from zero).
    pub fn reset_service_stats(&mut self, id: u32) -> Result<()> {
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

    pub fn service_stats(&self, id: u32, dir: u8) -> Result<ConnStats> {
        self.svc_stats
            .get(&svc_stats_index(id, dir), 0)
            .map_err(Error::map(names::MAP_SVC_STATS))
    }

    /// A service's histogram of one kind.
    pub fn service_histogram(&self, id: u32, kind: u32) -> Result<Histogram> {
        let mut h = [0u64; HIST_BUCKETS as usize];
        for (b, slot) in h.iter_mut().enumerate() {
            *slot = self
                .svc_hist
                .get(&svc_hist_index(id, kind, b as u32), 0)
                .map_err(Error::map(names::MAP_SVC_HIST))?;
        }
        Ok(h)
    }

    /// Histograms of one kind for the destinations `keep` selects, summed.
    pub fn destination_histogram(&self, kind: u32, keep: impl Fn(&DestKey) -> bool) -> Histogram {
        let mut h = [0u64; HIST_BUCKETS as usize];
        for (k, count) in self.dest_hist.iter().filter_map(|r| r.ok()) {
            if k.kind == kind && keep(&k.dest) && k.bucket < HIST_BUCKETS {
                h[k.bucket as usize] += count;
            }
        }
        h
    }

    /// The first-response samples live connections hold and the histograms do not have yet.
    pub fn pending_first_responses(&mut self) -> Result<PendingSamples> {
        let mut pending = PendingSamples::default();
        self.for_each_connection(|r| {
            let c = &r.info;
            if c.direction != direction::OUTBOUND || c.flags & conn_flags::COUNTED == 0 {
                return;
            }
            let dest = c.dest_key();
            for (&bucket, &count) in c.fr_bucket.iter().zip(&c.fr_count) {
                if count > 0 && u32::from(bucket) < HIST_BUCKETS {
                    pending.0.push((dest, c.svc, bucket, u64::from(count)));
                }
            }
        })?;
        Ok(pending)
    }

    /// Every destination's histogram of one kind, in one walk of the map.
    pub fn histograms_by_destination(
        &self,
        kind: u32,
    ) -> std::collections::HashMap<DestKey, Histogram> {
        let mut out = std::collections::HashMap::<DestKey, Histogram>::new();
        for (k, count) in self.dest_hist.iter().filter_map(|r| r.ok()) {
            if k.kind == kind && k.bucket < HIST_BUCKETS {
                out.entry(k.dest).or_insert([0; HIST_BUCKETS as usize])[k.bucket as usize] += count;
            }
        }
        out
    }

    pub fn destinations(&self) -> Vec<(DestKey, ConnStats)> {
        // Entries may be evicted while we walk: skip the ones that vanish.
        self.dests.iter().filter_map(|r| r.ok()).collect()
    }

    /// Visits the tracked live sockets of every network namespace, read with the listing
    /// iterator a piece at a time: on a node with 100k sockets, a copy of the whole walk would be
    /// megabytes more at the agent's peak.
    pub fn for_each_connection(&mut self, mut f: impl FnMut(&ConnRecord)) -> Result<()> {
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

    /// Every TCP socket of every network namespace (TIME_WAIT included), with each namespace's
    /// port settings.
    pub fn sockets(&mut self) -> Result<Vec<(u32, Vec<SockRecord>, NetSettings)>> {
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

    /// Switches the connection events of the audit stream on or off in the programs.
    pub fn set_audit(&mut self, on: bool) -> Result<()> {
        self.audit
            .set(0, u32::from(on), 0)
            .map_err(Error::map(names::MAP_AUDIT))
    }

    /// The ring buffer of connection events (once; the reader owns it).
    pub fn take_conn_events(&mut self) -> Option<RingBuf<MapData>> {
        self.conn_events.take()
    }

    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or_default()
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, self.counter(i as u32)))
            .collect()
    }

    pub fn maps(&self) -> Vec<MapSummary> {
        let dests = self.dests.keys().filter(|k| k.is_ok()).count() as u64;
        let hist = self.dest_hist.keys().filter(|k| k.is_ok()).count() as u64;
        let lpm = self.svc_lpm.keys().filter(|k| k.is_ok()).count() as u64;
        let conns = self.conns.keys().filter(|k| k.is_ok()).count() as u64;
        let c = |i| self.counter(i);
        vec![
            MapSummary {
                name: names::MAP_DESTS,
                capacity: self.sizes.max_destinations,
                entries: dests,
                // Nothing deletes destinations but the LRU.
                evictions: c(counter::DEST_INSERTS).saturating_sub(dests),
            },
            MapSummary {
                name: names::MAP_DEST_HIST,
                capacity: self.sizes.max_histogram_buckets,
                entries: hist,
                // Nothing deletes histogram buckets but the LRU.
                evictions: c(counter::HIST_INSERTS).saturating_sub(hist),
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
}

/// First-response samples still held by live connections (`ConnInfo::fr_count`): the
/// programs add them to the maps when a connection's buckets change or it closes, so a reader
/// adds them to what it read from the maps. Each is (destination, service, bucket, count).
#[derive(Default)]
pub struct PendingSamples(Vec<(DestKey, u32, u8, u64)>);

impl PendingSamples {
    /// Adds the samples of service `id` to `h`.
    pub fn add_service(&self, id: u32, h: &mut Histogram) {
        for (_, svc, bucket, count) in &self.0 {
            if *svc == id {
                h[usize::from(*bucket)] += count;
            }
        }
    }

    /// Adds the samples of the destinations `keep` selects to `h`.
    pub fn add_destinations(&self, keep: impl Fn(&DestKey) -> bool, h: &mut Histogram) {
        for (dest, _, bucket, count) in &self.0 {
            if keep(dest) {
                h[usize::from(*bucket)] += count;
            }
        }
    }
}
