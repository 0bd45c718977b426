//! Kernel struct offsets from the running kernel's BTF. aya's Rust programs get no CO-RE field
//! relocations, so the loader resolves the few fields the programs read and hands them over in
//! the `BW_OFFSETS` global.

use std::path::Path;

use breakwater_common::Offsets;
use btf_rs::{Btf, Type};

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

pub fn resolve_offsets(path: &Path) -> Result<Offsets, BtfError> {
    let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let sc = |p: &[&str]| offset_of(&btf, "sock_common", p);
    let sk = |p: &[&str]| offset_of(&btf, "sock", p);
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
        net_inum: offset_of(&btf, "net", &["ns", "inum"])?,
        // `struct sock` starts with its `sock_common`; these two are sock's own.
        sk_protocol: sk(&["sk_protocol"])?,
        sk_err: sk(&["sk_err"])?,
        skc_node_pprev: sc(&["skc_nulls_node", "pprev"])?,
        tcp_srtt_us: offset_of(&btf, "tcp_sock", &["srtt_us"])?,
        tcp_bytes_acked: offset_of(&btf, "tcp_sock", &["bytes_acked"])?,
        tcp_bytes_received: offset_of(&btf, "tcp_sock", &["bytes_received"])?,
        tcp_mstamp: offset_of(&btf, "tcp_sock", &["tcp_mstamp"])?,
        ready: 1,
    })
}

/// Byte offset of `path` (a chain of member names) inside struct `st`. Members of anonymous
/// structs and unions are found as if they were direct members, as in C.
fn offset_of(btf: &Btf, st: &str, path: &[&str]) -> Result<u32, BtfError> {
    let root = btf
        .resolve_types_by_name(st)
        .ok()
        .and_then(|types| {
            types.into_iter().find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
        })
        .ok_or_else(|| BtfError::NoStruct(st.to_owned()))?;
    let no_member = || BtfError::NoMember {
        st: st.to_owned(),
        path: path.join("."),
    };
    let mut current = root;
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
            current = composite(btf, &member).ok_or_else(no_member)?;
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
        let o = resolve_offsets(path).unwrap();
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert_eq!(o.skc_dport, 12);
        assert_eq!(o.skc_num, 14);
        assert_eq!(o.skc_family, 16);
        assert_eq!(o.skc_state, 18);
        assert!(o.skc_v6_rcv_saddr > o.skc_v6_daddr);
        assert!(o.sk_protocol > o.skc_v6_rcv_saddr);
        assert_eq!(o.ready, 1);
    }
}
