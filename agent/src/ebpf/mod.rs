//! Loading, attaching and reading the eBPF programs and maps; one module per hook family,
//! mirroring `agent-ebpf/src`.

pub mod breaker;
pub mod btf;
mod domain;
pub mod events;
pub mod iter;
mod mapped;
pub mod tracepoints;

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{links::PinnedLink, Iter, ProgramError},
    Ebpf, EbpfLoader,
};
use breakwater_common::{
    counter, hist_kind, names, ConnState, ConnStats, DestKey, HistKey, SvcLpmData, HIST_BUCKETS,
};
use tracing::info;

use crate::{
    config::MapSizes,
    core::{
        features::{Feature, Features, Status},
        Kernel as _, ProgramSummary,
    },
    netns,
};

/// `BW_DEST_HIST`'s size when `destination_latency` is disabled (an LRU map is not made
/// smaller than a few entries per CPU).
const DEST_HIST_UNUSED: u32 = 1024;

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

/// The kernel's BTF as aya parses it: what the loader relocates against and the tracing
/// programs and iterators load with.
fn aya_btf() -> Result<aya::Btf, LoadError> {
    aya::Btf::from_sys_fs().map_err(|e| LoadError::Program {
        what: "kernel BTF",
        source: ProgramError::Btf(e),
    })
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

/// A cgroup link of the breaker's gate, pinned so that it outlives the agent.
pub(crate) struct ScopeLink {
    /// The cgroup it enforces on, relative to the cgroup2 mount.
    cgroup: String,
    path: PathBuf,
    link: PinnedLink,
    /// A second reference, opened from the pin: what pins the link again if its pin is
    /// removed (pinning consumes it).
    spare: Option<PinnedLink>,
}

/// The loaded programs and the agent's handles on their maps. Dropping it detaches everything.
pub struct Kernel {
    ebpf: Ebpf,
    dests: HashMap<MapData, DestKey, ConnStats>,
    dest_hist: HashMap<MapData, HistKey, u64>,
    conns: HashMap<MapData, u64, ConnState>,
    svc_hist: Array<MapData, u64>,
    svc_lpm: LpmTrie<MapData, SvcLpmData, u32>,
    protected: LpmTrie<MapData, SvcLpmData, u32>,
    svc_stats: Array<MapData, ConnStats>,
    counters: PerCpuArray<MapData, u64>,
    brk: breaker::BreakerMaps,
    events: Option<RingBuf<MapData>>,
    audit: Array<MapData, u32>,
    conn_events: Option<RingBuf<MapData>>,
    sizes: MapSizes,
    programs: Vec<ProgramSummary>,
    features: Features,
    /// The kernel's BTF as aya parses it (about 13 MB), from `load` until the last program is
    /// loaded (`attach_breaker`).
    btf: Option<aya::Btf>,
    /// What the kernel's BTF says of the tracing hooks, from `load` until `attach`.
    probed: Option<tracepoints::Probed>,
    /// Whether sock_diag can destroy a connection here (tried once, before attaching).
    destroy_probe: Option<Result<(), String>>,
    /// Optional features the operator turned off (`[features] disable`).
    disabled: Vec<Feature>,
    pin_dir: PathBuf,
    _pin_lock: breaker::PinLock,
    /// Pinned cgroup links by the cgroup they enforce on; dropping them leaves the pins (and so
    /// the enforcement) in place.
    links: Vec<ScopeLink>,
    /// A reference to each map of `names::PINNED_MAPS`, to pin it again if its pin goes.
    pinned_maps: Vec<(&'static str, MapData)>,
    /// When the last complete sweep of `BW_CONNS` began (`sweep_connections`).
    last_sweep_ns: Option<u64>,
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
    /// else created and pinned. What `disabled` names is left out of the programs where it
    /// can be (`destination_latency`); `attach` turns the rest off.
    pub fn load(
        sizes: &MapSizes,
        pin_dir: &Path,
        hooks: Hooks,
        disabled: &[Feature],
    ) -> Result<Self, LoadError> {
        let dest_hist = !disabled.contains(&Feature::DestinationLatency);
        let kbtf = btf::KernelBtf::read(Path::new(btf::VMLINUX)).map_err(|e| {
            LoadError::Unsupported(format!(
                "{e}: breakwater reads kernel structures through BTF, which needs a kernel built \
                 with CONFIG_DEBUG_INFO_BTF=y"
            ))
        })?;
        let offsets = kbtf.offsets()?;
        let probed = tracepoints::Probed::new(&kbtf);
        // Not held while aya parses its own.
        drop(kbtf);
        breaker::prepare_pin_dir(pin_dir)?;
        let pin_lock = breaker::lock_pin_dir(pin_dir)?;
        let layout = breaker::check_layout(pin_dir)?;
        breaker::check_pins(pin_dir, sizes)?;
        let mut loader = EbpfLoader::new();
        // EbpfLoader::new parses the kernel's BTF (for relocations) itself: its copy goes
        // before ours, kept for the programs' loads, is parsed and lent to it.
        loader.btf(None);
        let kernel_btf = aya_btf()?;
        loader.btf(Some(&kernel_btf));
        for name in names::PINNED_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        // Service ids run 1..=max_services; slot 0 is "no service".
        for name in [
            names::MAP_POLICIES,
            names::MAP_BREAKERS,
            names::MAP_BREAKER_TOTALS,
            names::MAP_SVC_META,
            names::MAP_DEST_POLICIES,
            names::MAP_MORE_TOTALS,
        ] {
            loader.map_max_entries(name, sizes.max_services + 1);
        }
        loader.map_max_entries(names::MAP_DEST_BREAKERS, sizes.max_destination_breakers);
        let mut ebpf = loader
            .override_global(names::GLOBAL_OFFSETS, &offsets, true)
            .override_global(names::GLOBAL_EMPTY, &u32::from(hooks == Hooks::Empty), true)
            .override_global(names::GLOBAL_DEST_HIST, &u32::from(dest_hist), true)
            .map_max_entries(names::MAP_DESTS, sizes.max_destinations)
            .map_max_entries(names::MAP_SVC_LPM, sizes.max_service_endpoints)
            // Service ids run 1..=max_services; slot 0 is "no service".
            .map_max_entries(names::MAP_SVC_STATS, (sizes.max_services + 1) * 2)
            // Unused without destination histograms: its preallocated memory is not.
            .map_max_entries(
                names::MAP_DEST_HIST,
                if dest_hist {
                    sizes.max_histogram_buckets
                } else {
                    DEST_HIST_UNUSED
                },
            )
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
        let pinned_maps = names::PINNED_MAPS
            .into_iter()
            .map(|name| {
                let path = pin_dir.join(name);
                MapData::from_pin(&path)
                    .map(|map| (name, map))
                    .map_err(|source| LoadError::Map { name, source })
            })
            .collect::<Result<_, _>>()?;
        match layout {
            breaker::Layout::Unstamped => {
                info!(pin_dir = %pin_dir.display(), "pinned state from before layout stamps: stamped");
            }
            breaker::Layout::Older(from) => {
                info!(pin_dir = %pin_dir.display(), from, to = breakwater_common::layout::VERSION, "pinned state of an older layout: migrated");
            }
            breaker::Layout::Fresh | breaker::Layout::Current => {}
        }
        Ok(Self {
            dests: take(&mut ebpf, names::MAP_DESTS)?,
            dest_hist: take(&mut ebpf, names::MAP_DEST_HIST)?,
            conns: take(&mut ebpf, names::MAP_CONNS)?,
            svc_hist: take(&mut ebpf, names::MAP_SVC_HIST)?,
            svc_lpm: take(&mut ebpf, names::MAP_SVC_LPM)?,
            protected: take(&mut ebpf, names::MAP_PROTECTED)?,
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
            btf: Some(kernel_btf),
            probed: Some(probed),
            destroy_probe: None,
            disabled: Vec::new(),
            pin_dir: pin_dir.to_owned(),
            _pin_lock: pin_lock,
            links: Vec::new(),
            pinned_maps,
            last_sweep_ns: None,
        })
    }

    /// Attaches the tracking programs, each feature through the best hook this kernel has,
    /// then seeds the gauges from the sockets that already exist in every network namespace
    /// (after attaching, so that nothing falls in between). Optional features the kernel cannot
    /// run, or that `disabled` names, are off; connection tracking is core: without it,
    /// `LoadError::Unsupported`.
    pub fn attach(&mut self, disabled: &[Feature]) -> Result<(), LoadError> {
        let btf = self.kernel_btf()?;
        let probed = self.probed()?;
        // Before anything is attached: the probe's own connection must not be counted.
        self.destroy_probe = Some(crate::destroy::probe());

        let (_, state) =
            tracepoints::attach_first(&mut self.ebpf, &probed, &btf, tracepoints::SOCK_STATE)
                .map_err(|why| {
                    LoadError::Unsupported(format!("connection tracking cannot run: {why}"))
                })?;
        let state_hook = state.attach.clone();
        self.programs.push(state);
        if !disabled.contains(&Feature::FirstResponseLatency) {
            self.attach_first_response(&probed, &btf)?;
        }
        if !disabled.contains(&Feature::Retransmits) {
            match tracepoints::attach_first(&mut self.ebpf, &probed, &btf, tracepoints::RETRANSMIT)
            {
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
            names::PROG_STAMP_TCP,
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
        self.features
            .on(Feature::DestinationLatency, state_hook.clone());
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
        // For the breaker's iterator (`attach_breaker`).
        self.btf = Some(btf);

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
        probed: &tracepoints::Probed,
        btf: &aya::Btf,
    ) -> Result<(), LoadError> {
        let send = tracepoints::attach_first(&mut self.ebpf, probed, btf, tracepoints::SEND);
        let ready = tracepoints::attach_first(&mut self.ebpf, probed, btf, tracepoints::DATA_READY);
        match (send, ready) {
            (Ok((_, send)), Ok((_, ready))) => {
                let mut hooks = vec![send.attach.clone()];
                self.programs.push(send);
                let mut missed = None;
                if probed.any(tracepoints::SENDPAGES) {
                    match tracepoints::attach_first(
                        &mut self.ebpf,
                        probed,
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

    /// The kernel's BTF as `load` parsed it (parsed again if it was let go).
    fn kernel_btf(&mut self) -> Result<aya::Btf, LoadError> {
        match self.btf.take() {
            Some(b) => Ok(b),
            None => aya_btf(),
        }
    }

    /// What `load` read of the kernel's BTF for the tracing hooks (read again if it was let go).
    fn probed(&mut self) -> Result<tracepoints::Probed, LoadError> {
        match self.probed.take() {
            Some(p) => Ok(p),
            None => {
                let kbtf = btf::KernelBtf::read(Path::new(btf::VMLINUX))?;
                Ok(tracepoints::Probed::new(&kbtf))
            }
        }
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

    /// Pins again what was unpinned while the agent ran (the pin directory or files in it
    /// removed by hand), from the agent's own references, so that the state and the
    /// enforcement outlive this process as they should. Returns what was pinned again.
    pub fn pin_again(&mut self) -> Result<Vec<PathBuf>, LoadError> {
        let present = |path: &Path| std::fs::symlink_metadata(path).is_ok();
        if !self.pin_dir.is_dir() {
            breaker::prepare_pin_dir(&self.pin_dir)?;
            // The lock was on the directory that went.
            self._pin_lock = breaker::lock_pin_dir(&self.pin_dir)?;
        }
        let mut restored = Vec::new();
        for (name, map) in &self.pinned_maps {
            let path = self.pin_dir.join(name);
            if !present(&path) {
                map.pin(&path).map_err(|e| {
                    LoadError::Setup(format!("pinning {} again: {e}", path.display()))
                })?;
                restored.push(path);
            }
        }
        for l in &mut self.links {
            if present(&l.path) {
                continue;
            }
            let Some(spare) = l.spare.take() else {
                continue;
            };
            // If this fails, `link` still holds the gate attached while the agent runs.
            let pinned = aya::programs::links::FdLink::from(spare)
                .pin(&l.path)
                .map_err(|e| {
                    LoadError::Setup(format!("pinning {} again: {e}", l.path.display()))
                })?;
            l.spare = Some(pinned);
            restored.push(l.path.clone());
        }
        Ok(restored)
    }

    /// The ring buffer of connection events (once; the reader owns it).
    pub fn take_conn_events(&mut self) -> Option<RingBuf<MapData>> {
        self.conn_events.take()
    }
}
