//! Runs the `iter/tcp` seed program once per network namespace: an iterator only walks the
//! namespace of the thread that creates it, so each runs on its own thread after `setns`.

use std::{fs::File, io::Read as _};

use aya::programs::{iter::IterLink, Iter};
use nix::sched::{setns, CloneFlags};
use tracing::{debug, warn};

use crate::netns::NetNs;

use super::LoadError;

/// Walks every namespace's TCP sockets with the seed program; returns how many namespaces were
/// walked. A namespace that vanished meanwhile is skipped.
pub fn seed_all(prog: &mut Iter, namespaces: &[NetNs]) -> Result<usize, LoadError> {
    let mut walked = 0;
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
            .map_err(|_| LoadError::Seed("seed thread panicked".into()))?;
        match result {
            Ok(bytes) => {
                debug!(netns = ns.inode, path = %ns.path.display(), bytes, "seeded");
                walked += 1;
            }
            Err(e) => {
                warn!(netns = ns.inode, path = %ns.path.display(), error = %e, "cannot seed namespace")
            }
        }
    }
    Ok(walked)
}

fn walk_in(path: &std::path::Path, link: IterLink) -> Result<usize, String> {
    let ns = File::open(path).map_err(|e| format!("open: {e}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
    let mut file = link.into_file().map_err(|e| format!("iterator: {e}"))?;
    let mut sink = Vec::new();
    file.read_to_end(&mut sink)
        .map_err(|e| format!("read: {e}"))
}
