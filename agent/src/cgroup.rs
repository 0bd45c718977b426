//! cgroup v2: where it is mounted, and the paths of the cgroup ids the kernel reports.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The cgroup2 mount point, from /proc/self/mounts (it is not always /sys/fs/cgroup).
pub fn mount() -> std::io::Result<PathBuf> {
    breakwater_common::mounts::find("cgroup2")?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 mount"))
}

/// cgroup ids (the cgroup directory's inode) to paths under the cgroup2 mount, learnt by
/// walking the hierarchy when an unknown id shows up (at most once a second).
#[derive(Default)]
pub struct CgroupPaths {
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    walked: Option<Instant>,
}

impl CgroupPaths {
    /// Paths under `root` rather than the cgroup2 mount.
    pub fn at(root: PathBuf) -> Self {
        Self {
            root: Some(root),
            ..Default::default()
        }
    }

    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.paths.get(&id) {
            return Some(p.clone());
        }
        if self
            .walked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.walked = Some(Instant::now());
        if self.root.is_none() {
            self.root = mount().ok();
        }
        let root = self.root.clone()?;
        self.paths.clear();
        walk(&root, &root, 0, &mut self.paths);
        self.paths.get(&id).cloned()
    }
}

fn walk(root: &Path, dir: &Path, depth: usize, out: &mut HashMap<u64, String>) {
    use std::os::unix::fs::MetadataExt as _;
    if depth > 16 {
        return;
    }
    if let Ok(meta) = std::fs::metadata(dir) {
        let rel = dir.strip_prefix(root).unwrap_or(dir);
        out.insert(meta.ino(), format!("/{}", rel.display()));
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &e.path(), depth + 1, out);
        }
    }
}

/// A container id in a cgroup path: the 64 hex digits that docker (`docker-<id>.scope`,
/// `/docker/<id>`), containerd (`cri-containerd-<id>.scope`), CRI-O (`crio-<id>.scope`) and
/// podman (`libpod-<id>.scope`) put in it.
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|part| {
        let part = part.strip_suffix(".scope").unwrap_or(part);
        let id = part.rsplit(['-', ':']).next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_from_the_usual_cgroup_layouts() {
        let id = "4f1e0a6c2b8d9e3f4f1e0a6c2b8d9e3f4f1e0a6c2b8d9e3f4f1e0a6c2b8d9e3f";
        for path in [
            format!("/system.slice/docker-{id}.scope"),
            format!("/docker/{id}"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{id}.scope"),
            format!("/kubepods/besteffort/pod1/{id}"),
            format!("/machine.slice/libpod-{id}.scope"),
            format!("/kubepods.slice/crio-{id}.scope"),
        ] {
            assert_eq!(container_id(&path).as_deref(), Some(id), "{path}");
        }
        for path in [
            "/",
            "/user.slice/user-0.slice/session-1.scope",
            "/system.slice/ssh.service",
        ] {
            assert_eq!(container_id(path), None, "{path}");
        }
    }
}
