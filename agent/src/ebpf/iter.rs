//! Runs `iter/tcp` programs once per network namespace: an iterator only walks the namespace of
//! the thread that creates it, so each walk runs on its own thread after `setns`.

use std::{fs::File, io::Read as _, path::Path};

use aya::programs::{iter::IterLink, Iter};
use nix::sched::{setns, CloneFlags};
use tracing::{debug, warn};

use crate::netns::NetNs;

use super::LoadError;

/// Walks every namespace's TCP sockets with `prog` and returns what the program wrote, per
/// namespace. A namespace that vanished meanwhile is skipped.
pub fn walk_all(prog: &mut Iter, namespaces: &[NetNs]) -> Result<Vec<(u32, Vec<u8>)>, LoadError> {
    let mut out = Vec::with_capacity(namespaces.len());
    for ns in namespaces {
        let link_id = prog
            .attach()
            .map_err(LoadError::program("iter/tcp attach"))?;
        let link = prog
            .take_link(link_id)
            .map_err(LoadError::program("iter/tcp link"))?;
        let path = ns.path.clone();
        let result = std::thread::spawn(move || walk_in(&path, link))
            .join()
            .map_err(|_| LoadError::Seed("iterator thread panicked".into()))?;
        match result {
            Ok(bytes) => {
                debug!(netns = ns.inode, path = %ns.path.display(), bytes = bytes.len(), "walked");
                out.push((ns.inode, bytes));
            }
            Err(e) => {
                warn!(netns = ns.inode, path = %ns.path.display(), error = %e, "cannot walk namespace")
            }
        }
    }
    Ok(out)
}

fn walk_in(path: &Path, link: IterLink) -> Result<Vec<u8>, String> {
    let ns = File::open(path).map_err(|e| format!("open: {e}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
    let mut file = link.into_file().map_err(|e| format!("iterator: {e}"))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("read: {e}"))?;
    Ok(bytes)
}
