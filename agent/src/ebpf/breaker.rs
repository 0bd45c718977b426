//! The breaker's side of the loader: pinning under bpffs, attaching the gate and the outcome
//! counter to the enforced cgroups, and the agent's handles on the breaker maps (read and
//! written in `domain.rs`).
//!
//! Maps in `names::PINNED_MAPS` and the cgroup links are pinned in the agent's pin directory,
//! so enforcement goes on without the agent and the next agent picks the state up again.

use std::{fs::File, os::unix::ffi::OsStrExt as _, path::Path};

use aya::{
    maps::{Array, MapData},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSockAddr, SockOps,
    },
    Ebpf,
};
use breakwater_common::{
    breaker::{
        BreakerEntry, DestBreaker, DestBreakerKey, DestPolicy, MoreTotals, Policy, SvcMeta, Totals,
    },
    names, SvcLpmData,
};
use tracing::{info, warn};

use super::{program, refused, Kernel, LoadError};
use crate::core::{features::Feature, service::Endpoint};

/// `BPF_F_LOCK`: map reads and writes that take the entry's spin lock.
pub(super) const F_LOCK: u64 = 4;
const LINK_PREFIX: &str = "link-";
/// The programs attached to each enforced cgroup, with what `info` calls their attach point.
const SCOPE_PROGRAMS: [(&str, &str); 3] = [
    (names::PROG_CONNECT4, "cgroup/connect4"),
    (names::PROG_CONNECT6, "cgroup/connect6"),
    (names::PROG_SOCKOPS, "sock_ops"),
];

/// Handles on the breaker maps.
pub struct BreakerMaps {
    pub(super) policies: Array<MapData, Policy>,
    pub(super) breakers: Array<MapData, BreakerEntry>,
    pub(super) totals: Array<MapData, Totals>,
    pub(super) meta: Array<MapData, SvcMeta>,
    pub(super) dest_breakers: aya::maps::HashMap<MapData, DestBreakerKey, DestBreaker>,
    pub(super) dest_policies: Array<MapData, DestPolicy>,
    pub(super) more_totals: Array<MapData, MoreTotals>,
}

impl BreakerMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            policies: super::take(ebpf, names::MAP_POLICIES)?,
            breakers: super::take(ebpf, names::MAP_BREAKERS)?,
            totals: super::take(ebpf, names::MAP_BREAKER_TOTALS)?,
            meta: super::take(ebpf, names::MAP_SVC_META)?,
            dest_breakers: super::take(ebpf, names::MAP_DEST_BREAKERS)?,
            dest_policies: super::take(ebpf, names::MAP_DEST_POLICIES)?,
            more_totals: super::take(ebpf, names::MAP_MORE_TOTALS)?,
        })
    }
}

/// Where bpffs usually is; the agent mounts it there if nothing is.
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` type of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes the pin directory, on a bpf filesystem: bpffs is mounted at /sys/fs/bpf if the
/// directory is under it and nothing is mounted there; anywhere else it must be on bpffs
/// already (never mounted over a directory the operator named).
pub fn prepare_pin_dir(dir: &Path) -> Result<(), LoadError> {
    let io = |e: std::io::Error| LoadError::Setup(format!("pin directory {}: {e}", dir.display()));
    let bpffs = Path::new(BPFFS);
    if dir.starts_with(bpffs) && !breakwater_common::mounts::is_mounted("bpf", bpffs).map_err(io)? {
        std::fs::create_dir_all(bpffs).map_err(io)?;
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io(e.into()))?;
        info!(path = BPFFS, "mounted bpffs");
    }
    // The directory, or where it will be made.
    let on = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = nix::sys::statfs::statfs(on).map_err(|e| io(e.into()))?;
    if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(LoadError::NotBpffs(dir.to_owned()));
    }
    std::fs::create_dir_all(dir).map_err(io)
}

/// Holds `dir` for this agent: an exclusive `flock` on the directory, released when the agent
/// exits (however it exits). Two agents on one pin directory would each replace the other's
/// links and share its maps.
pub fn lock_pin_dir(dir: &Path) -> Result<PinLock, LoadError> {
    let file = std::fs::File::open(dir)
        .map_err(|e| LoadError::Setup(format!("pin directory {}: {e}", dir.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => LoadError::PinDirInUse(dir.to_owned()),
            e => LoadError::Setup(format!("locking pin directory {}: {e}", dir.display())),
        },
    )
}

/// See [`lock_pin_dir`].
pub type PinLock = nix::fcntl::Flock<std::fs::File>;

/// What a pin directory's layout stamp says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Nothing pinned yet.
    Fresh,
    /// Maps pinned by an agent from before stamps: layout 1; migrated (stamped) on load.
    Unstamped,
    /// An older layout this agent reads as its own: migrated (stamped) on load.
    Older(u32),
    /// Stamped with this agent's layout.
    Current,
}

/// Reads the layout stamp of the state pinned in `dir`, and refuses state of another layout:
/// reading it as this one's would misread every breaker. Layouts this agent can migrate
/// (`layout::MIGRATES_FROM` and up, and unstamped state, which is layout 1) are migrated on load.
pub fn check_layout(dir: &Path) -> Result<Layout, LoadError> {
    use breakwater_common::layout;
    let stamp = dir.join(names::MAP_LAYOUT);
    if !stamp.exists() {
        let pinned = names::PINNED_MAPS
            .iter()
            .any(|name| dir.join(name).exists());
        return Ok(if pinned {
            Layout::Unstamped
        } else {
            Layout::Fresh
        });
    }
    let unreadable = |e: &dyn std::fmt::Display| {
        LoadError::Setup(format!("layout stamp {}: {e}", stamp.display()))
    };
    let map = aya::maps::MapData::from_pin(&stamp).map_err(|e| unreadable(&e))?;
    let map: Array<MapData, u32> =
        Array::try_from(aya::maps::Map::Array(map)).map_err(|e| unreadable(&e))?;
    match read_stamp(map.get(&0, 0).ok(), map.get(&1, 0).ok()) {
        Ok(layout) => Ok(layout),
        Err(StampError::NotAStamp) => Err(LoadError::Setup(format!(
            "{} is not a breakwater layout stamp: this pin directory was not made by \
             breakwater; give the agent its own --pin-dir, or remove it with `breakwater \
             uninstall --pin-dir {}`",
            stamp.display(),
            dir.display()
        ))),
        Err(StampError::CannotMigrate(version)) => {
            let made_by = if version > layout::VERSION {
                "a newer agent"
            } else {
                "an older agent"
            };
            Err(LoadError::Setup(format!(
                "the state pinned in {} has layout {version} ({made_by} made it) and this agent \
                 reads layout {}, which it cannot migrate to: run the agent that made it, or run \
                 `breakwater uninstall --pin-dir {}` (which drops the breakers' state) and start \
                 again",
                dir.display(),
                layout::VERSION,
                dir.display()
            )))
        }
    }
}

/// Why a layout stamp is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StampError {
    /// No magic (or an entry that cannot be read): not a breakwater stamp.
    NotAStamp,
    /// A breakwater layout this agent cannot read or migrate.
    CannotMigrate(u32),
}

/// What the two entries of a layout stamp (`None`: the entry could not be read) say: the
/// decision of [`check_layout`], without the map.
pub fn read_stamp(magic: Option<u32>, version: Option<u32>) -> Result<Layout, StampError> {
    use breakwater_common::layout;
    let version = match (magic, version) {
        (Some(layout::MAGIC), Some(v)) => v,
        _ => return Err(StampError::NotAStamp),
    };
    if version == layout::VERSION {
        Ok(Layout::Current)
    } else if (layout::MIGRATES_FROM..layout::VERSION).contains(&version) {
        Ok(Layout::Older(version))
    } else {
        Err(StampError::CannotMigrate(version))
    }
}

/// Stamps the pinned maps with this agent's layout (after loading, which made or reused them).
pub fn stamp_layout(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    use breakwater_common::layout;
    let mut map: Array<MapData, u32> = super::take(ebpf, names::MAP_LAYOUT)?;
    let set = |map: &mut Array<MapData, u32>, i, v| {
        map.set(i, v, 0).map_err(|source| LoadError::Map {
            name: names::MAP_LAYOUT,
            source,
        })
    };
    // The version first: a magic with no version would read as layout 0.
    set(&mut map, 1, layout::VERSION)?;
    set(&mut map, 0, layout::MAGIC)
}

/// Checks that maps a previous agent pinned fit this agent: the same layouts (a different
/// version may have changed them) and the sizes the config asks for. Reusing a map that does
/// not fit would corrupt its state or fail later with a less clear error.
pub fn check_pins(dir: &Path, sizes: &crate::config::MapSizes) -> Result<(), LoadError> {
    use std::mem::size_of;
    let slots = sizes.max_services + 1;
    let expected = [
        (
            names::MAP_SVC_LPM,
            sizes.max_service_endpoints,
            4,
            "maps.max_service_endpoints",
        ),
        (
            names::MAP_SVC_META,
            slots,
            size_of::<SvcMeta>(),
            "maps.max_services",
        ),
        (
            names::MAP_POLICIES,
            slots,
            size_of::<Policy>(),
            "maps.max_services",
        ),
        (
            names::MAP_BREAKERS,
            slots,
            size_of::<BreakerEntry>(),
            "maps.max_services",
        ),
        (
            names::MAP_BREAKER_TOTALS,
            slots,
            size_of::<Totals>(),
            "maps.max_services",
        ),
        (
            names::MAP_DEST_POLICIES,
            slots,
            size_of::<DestPolicy>(),
            "maps.max_services",
        ),
        (
            names::MAP_MORE_TOTALS,
            slots,
            size_of::<MoreTotals>(),
            "maps.max_services",
        ),
        (
            names::MAP_DEST_BREAKERS,
            sizes.max_destination_breakers,
            size_of::<DestBreaker>(),
            "maps.max_destination_breakers",
        ),
    ];
    for (name, entries, value_size, key) in expected {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(|e| LoadError::Setup(format!("pinned map {}: {e}", path.display())))?;
        let misfit = if info.value_size() as usize != value_size {
            Some(format!(
                "holds {}-byte values where this agent needs {value_size} (another version made it)",
                info.value_size()
            ))
        } else if info.max_entries() != entries {
            Some(format!(
                "has {} entries where the config ({key}) asks for {entries}",
                info.max_entries()
            ))
        } else {
            None
        };
        if let Some(why) = misfit {
            return Err(LoadError::Setup(format!(
                "pinned map {} {why}: keep the old setting, or run `breakwater uninstall --pin-dir {}` (which drops the breakers' state) and start again",
                path.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Removes everything pinned in `dir`: enforcement stops once no agent holds the links.
pub fn release(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl Kernel {
    /// Attaches the gate (`connect4/6`) and the outcome counter (`sock_ops`) to each enforced
    /// cgroup (paths relative to the cgroup2 mount), pinning the links. Links a previous agent
    /// pinned are replaced.
    pub fn attach_breaker(&mut self, scope: &[String]) -> Result<(), LoadError> {
        // Old links first: two gates at once would count every connect twice.
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .as_bytes()
                    .starts_with(LINK_PREFIX.as_bytes())
                {
                    match PinnedLink::from_pin(entry.path()) {
                        Ok(old) => drop(old.unpin()),
                        Err(e) => {
                            warn!(path = %entry.path().display(), error = %e, "stale link pin")
                        }
                    }
                }
            }
        }
        for (name, hook) in &SCOPE_PROGRAMS[..2] {
            program::<CgroupSockAddr>(&mut self.ebpf, name, "cgroup/connect")?
                .load()
                .map_err(|e| {
                    LoadError::Unsupported(format!(
                        "the breaker's gate ({hook}) does not load: {}; it needs cgroup v2 with \
                         CONFIG_CGROUP_BPF=y and bpf_set_retval (Linux 5.18 or later)",
                        refused(&e)
                    ))
                })?;
        }
        self.features.on(
            Feature::BreakerGate,
            format!("{}, {}", SCOPE_PROGRAMS[0].1, SCOPE_PROGRAMS[1].1),
        );
        let outcomes = if self.disabled.contains(&Feature::BreakerOutcomes) {
            Ok(())
        } else {
            program::<SockOps>(&mut self.ebpf, names::PROG_SOCKOPS, "sock_ops")?.load()
        };
        match outcomes {
            Ok(()) => self
                .features
                .on(Feature::BreakerOutcomes, SCOPE_PROGRAMS[2].1),
            Err(e) => self.features.off(
                Feature::BreakerOutcomes,
                format!(
                    "{}: {}: breakers trip only by hand",
                    SCOPE_PROGRAMS[2].1,
                    refused(&e)
                ),
            ),
        }
        program::<aya::programs::SchedClassifier>(&mut self.ebpf, names::PROG_DEST_CMD, "tc")?
            .load()
            .map_err(|e| {
                LoadError::Unsupported(format!(
                    "destination breakers' commands ({}, a tc program run with \
                     BPF_PROG_TEST_RUN) do not load: {}",
                    names::PROG_DEST_CMD,
                    refused(&e)
                ))
            })?;
        for (name, _) in SCOPE_PROGRAMS {
            if !self.loaded(name) {
                continue;
            }
            let id = self
                .ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .map(|i| i.id())
                .unwrap_or_default();
            self.programs.push(super::ProgramSummary {
                name,
                id,
                ..Default::default()
            });
        }
        for rel in scope {
            self.attach_cgroup(rel)?;
        }
        let btf = self.kernel_btf()?;
        let loaded = self.load_iter(names::PROG_BREAKER_TCP, &btf)?;
        // The last program that needs it is loaded: the parsed BTF (megabytes) goes.
        drop(btf);
        let probed = self
            .destroy_probe
            .take()
            .unwrap_or_else(crate::destroy::probe);
        match (loaded, probed) {
            (Ok(summary), Ok(())) => {
                let hook = format!("{}, sock_diag SOCK_DESTROY", summary.attach);
                self.programs.push(summary);
                self.features.on(Feature::TerminateOnTrip, hook);
            }
            (Err(why), _) | (_, Err(why)) => self.features.off(Feature::TerminateOnTrip, why),
        }
        let disabled = std::mem::take(&mut self.disabled);
        self.features.disable(&disabled);
        Ok(())
    }

    /// Whether the program `name` was loaded into the kernel.
    fn loaded(&self, name: &str) -> bool {
        self.ebpf.program(name).is_some_and(|p| p.fd().is_ok())
    }

    /// Enforces the breakers on one more cgroup (a path relative to the cgroup2 mount).
    pub fn attach_cgroup(&mut self, rel: &str) -> Result<(), LoadError> {
        use std::os::unix::fs::MetadataExt as _;
        let root = crate::cgroup::mount().map_err(|e| LoadError::Setup(format!("cgroup2: {e}")))?;
        let path = root.join(rel.trim_start_matches('/'));
        let cgroup = File::open(&path)
            .map_err(|e| LoadError::Setup(format!("cgroup {}: {e}", path.display())))?;
        let ino = cgroup
            .metadata()
            .map_err(|e| LoadError::Setup(format!("cgroup {}: {e}", path.display())))?
            .ino();
        let to_fd = |e: aya::programs::links::LinkError| LoadError::Setup(e.to_string());
        // As links, cgroup programs always stack with others' (BPF_F_ALLOW_MULTI is implied, and
        // bpf_link_create refuses it as a flag): `Single` here means no flags.
        for (name, _) in SCOPE_PROGRAMS {
            if !self.loaded(name) {
                continue;
            }
            let link: FdLink = if name == names::PROG_SOCKOPS {
                let prog: &mut SockOps = program(&mut self.ebpf, name, "sock_ops")?;
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(LoadError::program("sock_ops attach"))?;
                prog.take_link(id)
                    .map_err(LoadError::program("sock_ops link"))?
                    .try_into()
                    .map_err(to_fd)?
            } else {
                let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name, "cgroup/connect")?;
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(LoadError::program("cgroup/connect attach"))?;
                prog.take_link(id)
                    .map_err(LoadError::program("cgroup/connect link"))?
                    .try_into()
                    .map_err(to_fd)?
            };
            // Named by the cgroup's inode: unique, and stable across agents.
            let pin = self.pin_dir.join(format!("{LINK_PREFIX}{name}-{ino}"));
            let pinned = link
                .pin(&pin)
                .map_err(|e| LoadError::Setup(format!("pinning {}: {e}", pin.display())))?;
            self.links.push(super::ScopeLink {
                cgroup: rel.to_owned(),
                spare: PinnedLink::from_pin(&pin).ok(),
                path: pin,
                link: pinned,
            });
        }
        self.describe_scope();
        info!(cgroup = %path.display(), "breaker enforced");
        Ok(())
    }

    /// Stops enforcing on a cgroup: its links are unpinned and detached.
    pub fn detach_cgroup(&mut self, rel: &str) -> Result<(), LoadError> {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|l| l.cgroup == rel);
        self.links = kept;
        for l in gone {
            // Dropping the last fd of an unpinned link detaches it.
            drop(l.spare);
            match std::fs::remove_file(&l.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LoadError::Setup(format!("unpinning a link of {rel}: {e}"))),
            }
            drop(l.link);
        }
        self.describe_scope();
        info!(cgroup = rel, "breaker no longer enforced");
        Ok(())
    }

    /// The cgroups enforced now, in the order they were attached.
    pub fn scope(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for l in &self.links {
            if !out.contains(&l.cgroup) {
                out.push(l.cgroup.clone());
            }
        }
        out
    }

    fn describe_scope(&mut self) {
        let scope = self.scope().join(" ");
        for p in &mut self.programs {
            if let Some((_, attach)) = SCOPE_PROGRAMS.iter().find(|(n, _)| *n == p.name) {
                p.attach = format!("{attach} {scope}");
            }
        }
    }

    /// The ring buffer the kernel reports transitions through (once; the reader owns it).
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.events.take()
    }
}

/// A `SvcMeta` text (name or reason) of `len` bytes; `None` if empty.
pub fn meta_text(bytes: &[u8], len: u16) -> Option<String> {
    let len = (len as usize).min(bytes.len());
    if len == 0 {
        return None;
    }
    Some(String::from_utf8_lossy(&bytes[..len]).into_owned())
}

/// The services pinned in `BW_SVC_LPM` (its entries: prefix length, key data, service id) and
/// `BW_SVC_META` (`meta`: the entry of an id, if there is one), as a previous agent left them:
/// each id's endpoints, sorted, under the name its meta entry holds; ids without a name are
/// left out.
pub fn pinned_services(
    lpm: impl IntoIterator<Item = (u32, SvcLpmData, u32)>,
    meta: impl Fn(u32) -> Option<SvcMeta>,
) -> Vec<crate::core::kernel::PinnedService> {
    let mut by_id = std::collections::BTreeMap::<u32, Vec<Endpoint>>::new();
    for (prefix_len, data, id) in lpm {
        if let Some(e) = Endpoint::from_lpm_key(prefix_len, &data) {
            by_id.entry(id).or_default().push(e);
        }
    }
    by_id
        .into_iter()
        .filter_map(|(id, mut endpoints)| {
            let meta = meta(id)?;
            let name = meta_text(&meta.name, meta.name_len)?;
            endpoints.sort();
            Some((id, name, endpoints))
        })
        .collect()
}

impl Endpoint {
    /// The endpoint a `BW_SVC_LPM` key stands for (the inverse of `lpm_key`). The trie
    /// compares only a key's first `prefix_len` bits: address bits past the prefix, which a
    /// damaged or foreign writer may have left set, are cleared (an endpoint with them set
    /// would be one no API call can name, and look different from the same network in the
    /// config).
    pub fn from_lpm_key(prefix_len: u32, data: &SvcLpmData) -> Option<Self> {
        let bits =
            u8::try_from(prefix_len.checked_sub(breakwater_common::SVC_LPM_PORT_BITS)?).ok()?;
        let addr = std::net::Ipv6Addr::from(data.addr);
        let net = match addr.to_ipv4_mapped() {
            Some(v4) if bits >= 96 => {
                ipnet::IpNet::V4(ipnet::Ipv4Net::new(v4, bits - 96).ok()?.trunc())
            }
            _ => ipnet::IpNet::V6(ipnet::Ipv6Net::new(addr, bits).ok()?.trunc()),
        };
        Some(Self {
            net,
            port: u16::from_be_bytes(data.port_be),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_keys_round_trip() {
        for s in [
            "10.0.0.0/8:80",
            "127.0.0.1:9",
            "[::1]:443",
            "[fd00::/64]:8080",
        ] {
            let e: Endpoint = s.parse().unwrap();
            let (len, data) = e.lpm_key();
            assert_eq!(Endpoint::from_lpm_key(len, &data), Some(e), "{s}");
        }
    }

    /// Found by the `pinned` fuzz target: a key whose address has bits set past its prefix
    /// read as `255.255.255.255/24:5432`, which `service put` refuses and which differs from
    /// the config's `255.255.255.0/24:5432` although the kernel holds them as one key.
    #[test]
    fn lpm_keys_with_host_bits_read_as_their_network() {
        let mut addr = [0xff; 16];
        addr[..10].fill(0);
        let data = SvcLpmData {
            port_be: 5432u16.to_be_bytes(),
            addr,
        };
        let e = Endpoint::from_lpm_key(16 + 96 + 24, &data).unwrap();
        assert_eq!(e, "255.255.255.0/24:5432".parse().unwrap());
        assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        // No key is that long: not /24 (the length wrapped around a byte).
        assert_eq!(Endpoint::from_lpm_key(16 + 256 + 24, &data), None);
        let v6 = SvcLpmData {
            port_be: 80u16.to_be_bytes(),
            addr: [0xfd; 16],
        };
        let e = Endpoint::from_lpm_key(16 + 64, &v6).unwrap();
        assert_eq!(e.to_string(), "[fdfd:fdfd:fdfd:fdfd::/64]:80");
        assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
    }
}
