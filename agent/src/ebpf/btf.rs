//! Kernel struct offsets from the running kernel's BTF. aya's Rust programs get no CO-RE field
//! relocations, so the loader resolves the few fields the programs read and hands them over in
//! the `BW_OFFSETS` global.

use std::{
    borrow::Cow,
    ffi::CStr,
    fs::File,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

use breakwater_common::Offsets;
use btf_rs::{Backend, Btf, Type};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {st} has no member {path}")]
    NoMember { st: String, path: String },
    #[error("kernel BTF: {st}.{path} is a bitfield")]
    Bitfield { st: String, path: String },
}

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The running kernel's BTF: struct offsets, and what the loader probes before choosing a hook.
/// Mapped, not parsed: btf_rs's parsed form of a 5.5 MB vmlinux BTF (every type and string on
/// the heap) takes about 40 MB; mapped, about 1 MB, and the few dozen lookups made at start
/// each scan the types (about 1 ms).
pub struct KernelBtf(Btf);

impl KernelBtf {
    pub fn read(path: &Path) -> Result<Self, BtfError> {
        // sysfs lets the kernel's BTF be mapped from Linux 6.16; before, a copy in memory is.
        Btf::from_file_with_backend(path, Backend::Mmap)
            .or_else(|_| Self::map_copy(path))
            .map(Self)
            .map_err(|source| BtfError::Read {
                path: path.display().to_string(),
                source,
            })
    }

    /// Maps a copy of the file in a memfd (its 5.5 MB count in the RSS), freed with the mapping.
    fn map_copy(path: &Path) -> Result<Btf, btf_rs::Error> {
        const NAME: &CStr = c"breakwater-btf";
        let mut file = File::open(path)?;
        let memfd: OwnedFd =
            nix::sys::memfd::memfd_create(NAME, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .map_err(std::io::Error::from)?;
        let mut copy = File::from(memfd);
        std::io::copy(&mut file, &mut copy)?;
        // btf_rs maps only a path: the memory file's, which the mapping keeps alive.
        Btf::from_file_with_backend(format!("/proc/self/fd/{}", copy.as_raw_fd()), Backend::Mmap)
    }

    pub fn offsets(&self) -> Result<Offsets, BtfError> {
        resolve_offsets(&self.0)
    }

    /// How many arguments the `tp_btf` tracepoint `name` passes (its `btf_trace_<name>`
    /// typedef, less the context pointer every one starts with); None when the kernel lacks it.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let btf = &self.0;
        let types = btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .ok()?;
        let Some(Type::Typedef(td)) = types.into_iter().find(|t| matches!(t, Type::Typedef(_)))
        else {
            return None;
        };
        let Type::Ptr(ptr) = btf.resolve_chained_type(&td).ok()? else {
            return None;
        };
        match btf.resolve_chained_type(&ptr).ok()? {
            Type::FuncProto(proto) => Some(proto.parameters.len().saturating_sub(1)),
            _ => None,
        }
    }

    /// Whether the kernel has a function `name` that `fentry` could attach to.
    pub fn has_function(&self, name: &str) -> bool {
        self.0
            .resolve_types_by_name(name)
            .is_ok_and(|types| types.iter().any(|t| matches!(t, Type::Func(_))))
    }
}

fn resolve_offsets(btf: &Btf) -> Result<Offsets, BtfError> {
    // Each struct is looked up once: a lookup by name scans every type.
    let within = |st: &'static str| {
        find_struct(btf, st).map(|root| move |p: &[&str]| offset_of(btf, st, &root, p))
    };
    let sc = within("sock_common")?;
    let sk = within("sock")?;
    let tcp = within("tcp_sock")?;
    let net = within("net")?;
    Ok(Offsets {
        skc_daddr: sc(&["skc_daddr"])?,
        skc_rcv_saddr: sc(&["skc_rcv_saddr"])?,
        skc_dport: sc(&["skc_dport"])?,
        skc_num: sc(&["skc_num"])?,
        skc_family: sc(&["skc_family"])?,
        skc_state: sc(&["skc_state"])?,
        skc_net: sc(&["skc_net", "net"])?,
        skc_v6_daddr: sc(&["skc_v6_daddr"])?,
        skc_v6_rcv_saddr: sc(&["skc_v6_rcv_saddr"])?,
        net_inum: net(&["ns", "inum"])?,
        // `struct sock` starts with its `sock_common`; these two are sock's own.
        sk_protocol: sk(&["sk_protocol"])?,
        sk_err: sk(&["sk_err"])?,
        skc_node_pprev: sc(&["skc_nulls_node", "pprev"])?,
        tcp_srtt_us: tcp(&["srtt_us"])?,
        tcp_bytes_acked: tcp(&["bytes_acked"])?,
        tcp_bytes_received: tcp(&["bytes_received"])?,
        tcp_mstamp: tcp(&["tcp_mstamp"])?,
        ready: 1,
    })
}

/// The struct named `st` (its definition, not a forward declaration).
fn find_struct(btf: &Btf, st: &str) -> Result<btf_rs::Struct, BtfError> {
    btf.resolve_types_by_name(st)
        .ok()
        .and_then(|types| {
            types.into_iter().find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
        })
        .ok_or_else(|| BtfError::NoStruct(st.to_owned()))
}

/// Byte offset of `path` (a chain of member names) inside `root`, struct `st`. Members of
/// anonymous structs and unions are found as if they were direct members, as in C.
fn offset_of(btf: &Btf, st: &str, root: &btf_rs::Struct, path: &[&str]) -> Result<u32, BtfError> {
    let no_member = || BtfError::NoMember {
        st: st.to_owned(),
        path: path.join("."),
    };
    let mut current = Cow::Borrowed(root);
    let mut bits = 0u32;
    for (i, name) in path.iter().enumerate() {
        let (off, member) = find_member(btf, &current, name).ok_or_else(no_member)?;
        if member.bitfield_size().is_some_and(|s| s != 0) {
            return Err(BtfError::Bitfield {
                st: st.to_owned(),
                path: path.join("."),
            });
        }
        bits += off;
        if i + 1 < path.len() {
            current = Cow::Owned(composite(btf, &member).ok_or_else(no_member)?);
        }
    }
    Ok(bits / 8)
}

/// Finds a member by name, descending into anonymous members; returns its bit offset.
fn find_member(btf: &Btf, s: &btf_rs::Struct, name: &str) -> Option<(u32, btf_rs::Member)> {
    for m in &s.members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        if member_name == name {
            return Some((m.bit_offset(), m.clone()));
        }
        if member_name.is_empty() {
            if let Some(inner) = composite(btf, m) {
                if let Some((off, found)) = find_member(btf, &inner, name) {
                    return Some((m.bit_offset() + off, found));
                }
            }
        }
    }
    None
}

/// The struct or union a member's type resolves to, through typedefs and qualifiers.
fn composite(btf: &Btf, m: &btf_rs::Member) -> Option<btf_rs::Struct> {
    let mut t = btf.resolve_chained_type(m).ok()?;
    loop {
        match t {
            Type::Struct(s) | Type::Union(s) => return Some(s),
            Type::Typedef(ref x) => t = btf.resolve_chained_type(x).ok()?,
            Type::Volatile(ref x) => t = btf.resolve_chained_type(x).ok()?,
            Type::Const(ref x) => t = btf.resolve_chained_type(x).ok()?,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's kernel BTF; the layout facts below hold for every kernel since
    /// sock_common gained skc_cookie (4.x).
    #[test]
    fn resolves_sock_common_from_kernel_btf() {
        let path = Path::new(VMLINUX);
        if !path.exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{VMLINUX} missing in CI"
            );
            eprintln!("skipped: no {VMLINUX}");
            return;
        }
        let btf = KernelBtf::read(path).unwrap();
        let o = btf.offsets().unwrap();
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert_eq!(o.skc_dport, 12);
        assert_eq!(o.skc_num, 14);
        assert_eq!(o.skc_family, 16);
        assert_eq!(o.skc_state, 18);
        assert!(o.skc_v6_rcv_saddr > o.skc_v6_daddr);
        assert!(o.sk_protocol > o.skc_v6_rcv_saddr);
        assert_eq!(o.ready, 1);
        // Every kernel breakwater runs on has these; none has a tracepoint by this name.
        assert_eq!(btf.tracepoint_args("inet_sock_set_state"), Some(3));
        assert_eq!(btf.tracepoint_args("no_such_tracepoint"), None);
        assert!(btf.has_function("tcp_sendmsg_locked"));
        assert!(!btf.has_function("no_such_function"));
        // What kernels before 6.16 (no mapping of the sysfs file) read.
        let copy = KernelBtf(KernelBtf::map_copy(path).unwrap());
        assert_eq!(copy.offsets().unwrap(), o);
        assert_eq!(copy.tracepoint_args("inet_sock_set_state"), Some(3));
    }
}
