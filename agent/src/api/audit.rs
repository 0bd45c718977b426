//! The connection audit stream (`WatchConnections`): the kernel's connection events, with the
//! process, cgroup, container and service each belongs to.
//!
//! The programs write events only while someone watches (`Kernel::set_audit`), so the stream
//! costs nothing when unused; counts never depend on it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use breakwater_common::{conn_event, counter, direction, fail_reason, ConnEvent};
use breakwater_proto::v1 as pb;
use tokio::io::unix::AsyncFd;

use super::Core;
use crate::core::{policy::errno_name, service::display_addr};

/// The stream `WatchConnections` answers with.
pub type ConnectionEventStream = super::EventStream<pb::ConnectionEvent>;

/// Events from `rx` (only `service`'s, unless empty), each with the number this subscriber lost
/// just before it added to what the kernel lost.
pub fn connection_events(
    rx: tokio::sync::broadcast::Receiver<pb::ConnectionEvent>,
    service: String,
) -> ConnectionEventStream {
    super::filtered_events(
        rx,
        service,
        |e| &e.service,
        |mut e, lost| {
            e.lost += lost;
            e
        },
    )
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
            self.root = crate::ebpf::breaker::cgroup2_mount().ok();
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

fn comm(bytes: &[u8; 16]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

impl Core {
    /// One kernel event as the API reports it.
    fn connection_event(&mut self, e: &ConnEvent, time_unix_ms: u64) -> pb::ConnectionEvent {
        let (kind, reason) = match e.kind {
            conn_event::OPENED => (pb::ConnectionEventKind::Opened, String::new()),
            conn_event::CLOSED => (pb::ConnectionEventKind::Closed, String::new()),
            conn_event::FAILED => (
                pb::ConnectionEventKind::Failed,
                match e.reason {
                    fail_reason::REFUSED => "refused",
                    fail_reason::TIMEOUT => "timeout",
                    _ => "other",
                }
                .to_owned(),
            ),
            conn_event::REJECTED => (pb::ConnectionEventKind::Rejected, errno_name(e.errno)),
            _ => (pb::ConnectionEventKind::Unspecified, String::new()),
        };
        let service = match self.services.name_of(e.svc) {
            Some(name) if e.svc != 0 => name.to_owned(),
            _ => String::new(),
        };
        let cgroup = self.cgroups.path_of(e.cgroup_id).unwrap_or_default();
        pb::ConnectionEvent {
            kind: kind.into(),
            reason,
            direction: if e.direction == direction::INBOUND {
                pb::Direction::Inbound
            } else {
                pb::Direction::Outbound
            }
            .into(),
            local_address: if e.saddr == [0; 16] {
                String::new()
            } else {
                display_addr(&e.saddr).to_string()
            },
            local_port: e.sport.into(),
            remote_address: display_addr(&e.daddr).to_string(),
            remote_port: e.dport.into(),
            netns: e.netns,
            pid: e.pid,
            comm: comm(&e.comm),
            cgroup_id: e.cgroup_id,
            container_id: container_id(&cgroup).unwrap_or_default(),
            cgroup,
            service,
            time_unix_ms,
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            duration_us: e.duration_us,
            lost: 0,
        }
    }

    /// Turns the audit programs on while anyone watches, off when the last one has gone.
    pub fn update_audit(&mut self) {
        let watched = self.audit.receiver_count() > 0;
        if let Err(e) = self.kernel.set_audit(watched) {
            tracing::warn!(error = %e, "cannot switch the audit stream");
        }
    }
}

/// Reads the kernel's connection events as they come and fans them out to the subscribers.
pub async fn read_events(core: Arc<Mutex<Core>>, ring: RingBuf<MapData>) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, while the AsyncFd
    // owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    let mut kernel_lost = 0;
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut batch = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if item.len() >= std::mem::size_of::<ConnEvent>() {
                // SAFETY: the kernel wrote a `ConnEvent` (plain old data) here.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ConnEvent>()) });
            }
        }
        guard.clear_ready();
        if batch.is_empty() {
            continue;
        }
        let Ok(mut core) = core.lock() else {
            return Ok(());
        };
        let lost_now = core.kernel.counter(counter::AUDIT_LOST);
        let mut lost = lost_now.saturating_sub(kernel_lost);
        kernel_lost = lost_now;
        let mono_now = crate::clock::monotonic_ns();
        let wall_now = UNIX_EPOCH.elapsed().unwrap_or_default().as_millis() as u64;
        for e in &batch {
            let ago_ms = mono_now.saturating_sub(e.time_ns) / 1_000_000;
            let mut ev = core.connection_event(e, wall_now.saturating_sub(ago_ms));
            ev.lost = std::mem::take(&mut lost);
            // No subscribers (the last one just left) is no error.
            let _ = core.audit.send(ev);
        }
    }
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
