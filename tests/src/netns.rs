//! Network namespaces the tests create with `ip netns` and remove on drop.

use std::{fs::File, process::Command, thread};

use nix::sched::{setns, CloneFlags};

/// Inode of the calling thread's network namespace.
pub fn own_inode() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("/proc/thread-self/ns/net")
        .ino() as u32
}

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A new, uniquely named namespace with `lo` up.
    pub fn new(tag: &str) -> Self {
        let name = format!("bw-test-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["netns", "add", &name]);
        run(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Inode of the namespace (what the agent reports as `netns`).
    pub fn inode(&self) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path()).expect("netns file").ino() as u32
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates stay there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        thread::Builder::new()
            .name("bw-client".into())
            .spawn(move || {
                let ns = File::open(&path).expect("open netns");
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .unwrap()
            .join()
            .expect("netns thread")
    }
}

impl NetNs {
    /// Sets a sysctl inside the namespace (`net.*` settings are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        run(&[
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
