//! cgroup v2 and bpffs fixtures for the tests that attach cgroup programs (the breakers).
//!
//! A test creates a [`CgroupGuard`], attaches there, and either moves the whole test process into
//! it ([`CgroupGuard::enter`]) or places single child processes into a cgroup of its choice
//! ([`spawn_in_cgroup`], [`connect_from_cgroup`]). A socket keeps the cgroup it was created in,
//! so what counts is where the process was when it called `socket()`.
//!
//! The cgroup2 mount is read from /proc/self/mounts (it is /sys/fs/cgroup/unified on some
//! machines, /sys/fs/cgroup on most): never hard-coded.

use std::{
    ffi::CString,
    fs, io,
    net::SocketAddr,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Numbers the cgroups and pin directories this process creates.
static NEXT: AtomicUsize = AtomicUsize::new(1);

fn unique_name() -> String {
    format!(
        "breakwater-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where cgroup v2 is mounted. Panics if it is not.
pub fn cgroup2_mount() -> PathBuf {
    breakwater_common::mounts::find("cgroup2")
        .expect("read /proc/self/mounts")
        .expect("cgroup v2 is not mounted (no cgroup2 line in /proc/self/mounts): the breaker tests need it")
}

/// Absolute path of a cgroup given relative to the cgroup2 mount ("/" is the root).
pub fn cgroup_path(relative: &str) -> PathBuf {
    cgroup2_mount().join(relative.trim_start_matches('/'))
}

/// The cgroup v2 path of this process relative to the mount: the `0::/...` line of
/// /proc/self/cgroup.
pub fn current_cgroup() -> String {
    let text = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 (0::) line in /proc/self/cgroup:\n{text}"))
        .to_string()
}

/// Moves process `pid` (0: the caller) into the cgroup at `dir` (absolute).
fn move_pid(dir: &Path, pid: u32) -> io::Result<()> {
    fs::write(dir.join("cgroup.procs"), pid.to_string())
}

fn procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// A child cgroup `breakwater-test-<pid>-<n>` directly under the cgroup2 mount, removed on drop
/// (after moving this process back out if it [entered](Self::enter) and moving out, or killing,
/// any process left in it).
pub struct CgroupGuard {
    path: PathBuf,
    relative: String,
    /// The cgroup this process left in `enter` (relative), to go back to on drop.
    origin: Option<String>,
}

impl CgroupGuard {
    /// Creates the cgroup. Panics if cgroup v2 is not mounted or the directory cannot be made.
    pub fn new() -> Self {
        let mount = cgroup2_mount();
        let name = unique_name();
        let path = mount.join(&name);
        if path.exists() {
            // Left by an earlier process with the same pid.
            let _ = fs::remove_dir(&path);
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self {
            path,
            relative: format!("/{name}"),
            origin: None,
        }
    }

    /// Absolute path, e.g. /sys/fs/cgroup/breakwater-test-123-1 (what a program attaches to).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup2 mount, e.g. "/breakwater-test-123-1" (what /proc/PID/cgroup
    /// shows for a member).
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// The cgroup this process was in before [`enter`](Self::enter), if it entered.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// Moves the whole test process (every thread) into this cgroup. Sockets created from now on
    /// belong to it. Panics if the move fails.
    pub fn enter(&mut self) {
        if self.origin.is_none() {
            self.origin = Some(current_cgroup());
        }
        move_pid(&self.path, std::process::id())
            .unwrap_or_else(|e| panic!("moving this process into {}: {e}", self.path.display()));
    }

    /// Moves the test process back to where it was before [`enter`](Self::enter) (no-op if it
    /// did not enter). Drop does this too.
    pub fn leave(&mut self) {
        if let Some(origin) = self.origin.take() {
            if let Err(e) = move_pid(&cgroup_path(&origin), std::process::id()) {
                eprintln!("cgroup guard: moving this process back to {origin}: {e}");
                self.origin = Some(origin);
            }
        }
    }

    /// Processes now in the cgroup.
    pub fn procs(&self) -> Vec<u32> {
        procs(&self.path)
    }
}

impl Default for CgroupGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let back_to = self.origin.clone().unwrap_or_else(|| "/".to_string());
        self.leave();

        // Strays (children a test left running): move them out, kill those that will not move.
        let me = std::process::id();
        let target = cgroup_path(&back_to);
        for pid in procs(&self.path) {
            if pid == me {
                continue;
            }
            if move_pid(&target, pid).is_err() {
                // SAFETY: kill(2) on a pid we just read from our own test cgroup.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }

        // A process that just exited keeps the cgroup populated for a moment: EBUSY, retry.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!(
                        "cgroup guard: removing {} (members: {:?}): {e}",
                        self.path.display(),
                        procs(&self.path)
                    );
                    return;
                }
            }
        }
    }
}

/// The pre-opened `cgroup.procs` path of a cgroup, for use between fork and exec.
fn procs_cstring(cgroup_rel: &str) -> CString {
    let path = cgroup_path(cgroup_rel).join("cgroup.procs");
    CString::new(path.as_os_str().as_bytes()).expect("cgroup path without NUL")
}

/// Writes "0" (the calling process) to `procs`. Only async-signal-safe calls: runs after fork.
fn join_cgroup_raw(procs: &CString) -> io::Result<()> {
    // SAFETY: plain syscalls on a NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// Makes `cmd`'s child join the cgroup `cgroup_rel` (relative to the cgroup2 mount, e.g. "/" or
/// a guard's [`relative`](CgroupGuard::relative)) before it execs. Returns `cmd` for chaining.
pub fn in_cgroup<'a>(cmd: &'a mut Command, cgroup_rel: &str) -> &'a mut Command {
    let procs = procs_cstring(cgroup_rel);
    // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close).
    unsafe { cmd.pre_exec(move || join_cgroup_raw(&procs)) }
}

/// Spawns `cmd` inside the cgroup `cgroup_rel` (e.g. the test's original cgroup "/" while the
/// test process itself sits in a [`CgroupGuard`]). A failure to join fails the spawn.
pub fn spawn_in_cgroup(cmd: &mut Command, cgroup_rel: &str) -> io::Result<Child> {
    in_cgroup(cmd, cgroup_rel).spawn()
}

/// How long [`connect_from_cgroup`] waits for a connection (SO_SNDTIMEO on the socket).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP connect to `addr` from a forked child placed in the cgroup `cgroup_rel` before it
/// creates its socket. `Ok(())` if it connected; otherwise the child's connect errno as an
/// `io::Error` (`ECONNREFUSED` → `ConnectionRefused`, `EPERM` → `PermissionDenied`, a timeout
/// after [`CONNECT_TIMEOUT`] → `TimedOut`). The child closes the connection as it exits.
///
/// Implementation: fork + raw syscalls in the child (open/write to `cgroup.procs`, socket,
/// setsockopt, connect, write the result to a pipe, `_exit`), all async-signal-safe, so it is
/// sound from a multi-threaded test and reports the exact errno, unlike `bash`'s `/dev/tcp`.
///
/// Panics if the harness itself fails (pipe, fork, joining the cgroup, creating the socket).
pub fn connect_from_cgroup(cgroup_rel: &str, addr: SocketAddr) -> io::Result<()> {
    let procs = procs_cstring(cgroup_rel);
    let (storage, len) = sockaddr(addr);
    let family = i32::from(storage.ss_family);
    let timeout = libc::timeval {
        tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };

    let mut fds = [0 as libc::c_int; 2];
    assert_eq!(
        // SAFETY: pipe2 fills the two descriptors.
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        0,
        "pipe2: {}",
        io::Error::last_os_error()
    );
    let [read_fd, write_fd] = fds;

    // SAFETY: the child runs only async-signal-safe syscalls on data prepared before the fork,
    // then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // [stage, errno]: stage 0 = connected, 1 = joining the cgroup, 2 = socket, 3 = connect.
        let report = |stage: i32, errno: i32| -> ! {
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&stage.to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            // SAFETY: write + _exit in the forked child.
            unsafe {
                libc::write(write_fd, msg.as_ptr().cast(), msg.len());
                libc::_exit(0)
            }
        };
        let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if join_cgroup_raw(&procs).is_err() {
            report(1, errno());
        }
        // SAFETY: raw socket syscalls in the child.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                report(2, errno());
            }
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
            if libc::connect(fd, (&raw const storage).cast(), len) != 0 {
                report(3, errno());
            }
        }
        report(0, 0);
    }
    // SAFETY: closing our copy of the write end; the child holds its own.
    unsafe { libc::close(write_fd) };
    assert!(pid > 0, "fork: {}", io::Error::last_os_error());

    let mut msg = [0u8; 8];
    let mut got = 0;
    while got < msg.len() {
        // SAFETY: reading into the rest of a local buffer.
        let n = unsafe { libc::read(read_fd, msg[got..].as_mut_ptr().cast(), msg.len() - got) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    let mut status = 0;
    // SAFETY: reaping our own child; closing our read end.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
        libc::close(read_fd);
    }
    assert_eq!(
        got,
        msg.len(),
        "connect_from_cgroup: the child died without reporting (wait status {status})"
    );
    let stage = i32::from_ne_bytes(msg[..4].try_into().unwrap());
    let errno = i32::from_ne_bytes(msg[4..].try_into().unwrap());
    match stage {
        0 => Ok(()),
        3 if errno == libc::EINPROGRESS => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {CONNECT_TIMEOUT:?}"),
        )),
        3 => Err(io::Error::from_raw_os_error(errno)),
        1 => panic!(
            "connect_from_cgroup: joining cgroup {cgroup_rel}: {}",
            io::Error::from_raw_os_error(errno)
        ),
        _ => panic!(
            "connect_from_cgroup: socket(): {}",
            io::Error::from_raw_os_error(errno)
        ),
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A unique bpffs directory for one test agent's pins, /sys/fs/bpf/breakwater-test-<pid>-<n>
/// (not created: the agent makes it).
pub fn pin_dir() -> PathBuf {
    Path::new("/sys/fs/bpf").join(unique_name())
}

/// Removes a pin directory and everything pinned in it; a missing directory is fine.
pub fn remove_pin_dir(path: &Path) {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing pin dir {}: {e}", path.display()),
    }
}

/// Mounts a bpf filesystem at /sys/fs/bpf unless one is there already (pinning needs it).
pub fn mount_bpffs_if_needed() {
    let bpffs = Path::new("/sys/fs/bpf");
    if breakwater_common::mounts::is_mounted("bpf", bpffs).expect("read /proc/self/mounts") {
        return;
    }
    nix::mount::mount(
        Some("bpf"),
        bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("mounting bpffs at /sys/fs/bpf: {e}"));
}
