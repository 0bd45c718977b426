//! Runs `iter/tcp` programs once per network namespace: an iterator only walks the namespace of
//! the thread that creates it, so each walk runs on its own thread after `setns`.

use std::{fs::File, io::Read as _};

use aya::programs::Iter;
use nix::sched::{setns, CloneFlags};
use tracing::{debug, warn};

use crate::netns::NetNs;

use super::LoadError;

/// What one namespace's walk produced.
pub struct Walk<T> {
    pub netns: u32,
    /// What the program wrote.
    pub bytes: Vec<u8>,
    /// What `inside` returned, run on the walking thread inside the namespace with what the
    /// program wrote (e.g. the namespace's `/proc/sys/net` settings, which are per namespace).
    pub inside: T,
}

/// Walks every namespace's TCP sockets with `prog`. A namespace that vanished meanwhile is
/// skipped.
pub fn walk_all<T: Send + 'static>(
    prog: &mut Iter,
    namespaces: &[NetNs],
    inside: impl Fn(&[u8]) -> T + Clone + Send + 'static,
) -> Result<Vec<Walk<T>>, LoadError> {
    let walked = in_each(prog, namespaces, move |mut file| {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("read: {e}"))?;
        let inside = inside(&bytes);
        Ok((bytes, inside))
    })?;
    Ok(walked
        .into_iter()
        .map(|(netns, (bytes, inside))| {
            debug!(netns, bytes = bytes.len(), "walked");
            Walk {
                netns,
                bytes,
                inside,
            }
        })
        .collect())
}

/// Runs `prog`, which writes nothing, in every namespace: true if every one was walked (none
/// vanished or failed meanwhile).
pub fn run_all(prog: &mut Iter, namespaces: &[NetNs]) -> Result<bool, LoadError> {
    Ok(walk_all(prog, namespaces, |_| ())?.len() == namespaces.len())
}

/// Creates `prog`'s iterator in every namespace (on a thread inside each) and hands back the
/// open files, to be read where and as the caller likes: the namespace is fixed when the file is
/// created, so reading it in pieces elsewhere keeps the agent from holding a whole walk in
/// memory at once. A namespace that vanished meanwhile is skipped.
pub fn open_all(prog: &mut Iter, namespaces: &[NetNs]) -> Result<Vec<(u32, File)>, LoadError> {
    in_each(prog, namespaces, Ok)
}

/// Runs `f` with `prog`'s iterator file, created on a thread that has entered each namespace
/// in turn (never a tokio worker). A namespace where that fails is skipped with a warning.
fn in_each<R: Send + 'static>(
    prog: &mut Iter,
    namespaces: &[NetNs],
    f: impl FnOnce(File) -> Result<R, String> + Clone + Send + 'static,
) -> Result<Vec<(u32, R)>, LoadError> {
    let mut out = Vec::with_capacity(namespaces.len());
    for ns in namespaces {
        let link_id = prog
            .attach()
            .map_err(LoadError::program("iter/tcp attach"))?;
        let link = prog
            .take_link(link_id)
            .map_err(LoadError::program("iter/tcp link"))?;
        let path = ns.path.clone();
        let f = f.clone();
        let result = std::thread::spawn(move || -> Result<R, String> {
            let ns = File::open(&path).map_err(|e| format!("open: {e}"))?;
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
            f(link.into_file().map_err(|e| format!("iterator: {e}"))?)
        })
        .join()
        .map_err(|_| LoadError::Seed("iterator thread panicked".into()))?;
        match result {
            Ok(r) => out.push((ns.inode, r)),
            Err(e) => {
                warn!(netns = ns.inode, path = %ns.path.display(), error = %e, "cannot walk namespace")
            }
        }
    }
    Ok(out)
}
