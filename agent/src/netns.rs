//! Network namespaces on the node: every namespace some process is in, plus the named ones
//! under /run/netns (which may have no process at all).

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// A namespace by its inode (as in `/proc/PID/ns/net`) and a path that opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNs {
    pub inode: u32,
    pub path: PathBuf,
}

/// Inode of the namespace a path refers to.
pub fn inode_of(path: &Path) -> std::io::Result<u32> {
    Ok(fs::metadata(path)?.ino() as u32)
}

pub fn current() -> std::io::Result<u32> {
    inode_of(Path::new("/proc/self/ns/net"))
}

/// A namespace's TCP settings and listen-queue counters, read from inside it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetSettings {
    /// `net.ipv4.ip_local_port_range`, inclusive.
    pub port_range: (u16, u16),
    /// `net.ipv4.tcp_tw_reuse` (0 off, 1 on, 2 loopback only).
    pub tcp_tw_reuse: u8,
    pub somaxconn: u32,
    pub tcp_max_tw_buckets: u32,
    pub tcp_fin_timeout: u32,
    /// `TcpExt: ListenOverflows` and `ListenDrops` since the namespace was made.
    pub listen_overflows: u64,
    pub listen_drops: u64,
}

impl NetSettings {
    /// Reads `/proc/sys/net` and `/proc/thread-self/net`, which show the calling thread's
    /// namespace: call it on a thread that has entered the namespace.
    pub fn read() -> Self {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        let number = |path: &str| read(path).trim().parse().unwrap_or(0);
        let range: Vec<u16> = read("/proc/sys/net/ipv4/ip_local_port_range")
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let netstat = read("/proc/thread-self/net/netstat");
        Self {
            port_range: match range[..] {
                [lo, hi] => (lo, hi),
                _ => (0, 0),
            },
            tcp_tw_reuse: number("/proc/sys/net/ipv4/tcp_tw_reuse") as u8,
            somaxconn: number("/proc/sys/net/core/somaxconn"),
            tcp_max_tw_buckets: number("/proc/sys/net/ipv4/tcp_max_tw_buckets"),
            tcp_fin_timeout: number("/proc/sys/net/ipv4/tcp_fin_timeout"),
            listen_overflows: snmp(&netstat, "TcpExt:", "ListenOverflows"),
            listen_drops: snmp(&netstat, "TcpExt:", "ListenDrops"),
        }
    }
}

/// A counter from a /proc/net/netstat or snmp text: a header line of names and a line of values.
pub fn snmp(text: &str, prefix: &str, name: &str) -> u64 {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

pub fn all() -> Vec<NetNs> {
    let mut found = BTreeMap::new();
    let mut add = |path: PathBuf| {
        // Processes come and go while we look: skip what vanished.
        if let Ok(inode) = inode_of(&path) {
            found.entry(inode).or_insert(path);
        }
    };
    add(PathBuf::from("/proc/self/ns/net"));
    if let Ok(named) = fs::read_dir("/run/netns") {
        for e in named.flatten() {
            add(e.path());
        }
    }
    if let Ok(procs) = fs::read_dir("/proc") {
        for e in procs.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    found
        .into_iter()
        .map(|(inode, path)| NetNs { inode, path })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_counters_are_found_by_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 22 333\nIpExt: A\nIpExt: 9\n";
        assert_eq!(snmp(text, "TcpExt:", "ListenOverflows"), 22);
        assert_eq!(snmp(text, "TcpExt:", "ListenDrops"), 333);
        assert_eq!(snmp(text, "TcpExt:", "Nope"), 0);
        assert_eq!(snmp(text, "IpExt:", "A"), 9);
    }

    #[test]
    fn reads_this_namespaces_settings() {
        let s = NetSettings::read();
        assert!(
            s.port_range.0 > 0 && s.port_range.0 <= s.port_range.1,
            "{s:?}"
        );
        assert!(s.somaxconn > 0);
    }

    #[test]
    fn finds_our_own_namespace_once() {
        let me = current().unwrap();
        let all = all();
        assert_eq!(all.iter().filter(|n| n.inode == me).count(), 1);
    }
}
