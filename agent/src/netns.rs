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
    fn finds_our_own_namespace_once() {
        let me = current().unwrap();
        let all = all();
        assert_eq!(all.iter().filter(|n| n.inode == me).count(), 1);
    }
}
