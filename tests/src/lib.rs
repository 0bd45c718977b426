//! Harness for the privileged integration tests: starts the real agent binary, talks to it over
//! its real unix socket (gRPC and the CLI), and reads ground truth from `ss`.
//!
//! Every test takes [`serial`] (they share the kernel) and [`require_root`]: outside CI a
//! non-root run skips with a printed reason; under `CI=true` it fails.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use breakwater_proto::v1::{self as pb, agent_client::AgentClient};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod cgroup;
pub mod etcd;
pub mod netns;
pub mod prom;

static SERIAL: Mutex<()> = Mutex::new(());

/// Tests touch shared kernel state: one at a time, even if the runner is not told so.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// True if the test may go on. Without root: a skip outside CI, a failure in CI.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "privileged integration tests must run as root in CI"
    );
    eprintln!("skipped: needs root (run `sudo cargo xtask test`)");
    false
}

/// The agent binary under test: $BREAKWATER_BIN, else the workspace's release build.
pub fn agent_bin() -> PathBuf {
    let bin = std::env::var_os("BREAKWATER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/breakwater")
        });
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo xtask build` or set BREAKWATER_BIN",
        bin.display()
    );
    bin
}

/// A running agent on its own socket, pin directory and enforced cgroup (a child cgroup made
/// for it, never the machine's root); stopped (SIGTERM) and everything removed on drop.
pub struct Agent {
    /// None only while being built.
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    rt: tokio::runtime::Runtime,
    pin_dir: PathBuf,
    config: Option<PathBuf>,
    extra: Vec<String>,
    // Dropped after the agent is stopped and the pins removed.
    cgroup: cgroup::CgroupGuard,
}

impl Agent {
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    /// Starts the agent with a TOML config (None: embedded defaults) and waits until its API
    /// answers.
    pub fn start_with_config(config: Option<&str>) -> Self {
        Self::start_with(config, &[])
    }

    /// As `start_with_config`, with more `breakwater agent` arguments.
    pub fn start_with(config: Option<&str>, extra: &[&str]) -> Self {
        cgroup::mount_bpffs_if_needed();
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let cgroup = cgroup::CgroupGuard::new();
        // The scope goes into the file (unless the test's config sets one), not on the command
        // line, so that a reload can change it: flags win over the file.
        let config = config.map(|text| {
            let path = dir.path().join("breakwater.toml");
            let text = if text.contains("[breaker]") {
                text.to_owned()
            } else {
                format!("[breaker]\nscope = [\"{}\"]\n{text}", cgroup.relative())
            };
            std::fs::write(&path, text).expect("write config");
            path
        });
        // Multi-threaded so that client connections are driven (and closed) between calls.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut agent = Self {
            child: None,
            dir,
            socket,
            rt,
            pin_dir: cgroup::pin_dir(),
            config,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            cgroup,
        };
        agent.spawn();
        agent
    }

    /// Starts the agent process (again) with the same socket, config, pins and scope, and
    /// waits until its API answers.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("agent")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(&self.extra);
        match &self.config {
            Some(path) => cmd.arg("--config").arg(path),
            None => cmd.arg("--scope").arg(self.cgroup.relative()),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("agent log");
        self.child = Some(
            cmd.env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn agent"),
        );
        // Loading every program takes most of a minute in a TCG guest on a busy 2-CPU host.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"));
            if let Some(status) = exited {
                panic!("agent exited during start-up: {status}\n{}", self.log());
            }
            if self.socket.exists() && self.try_info().is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer within 90 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cgroup the agent's breakers apply to; `enter` it before creating client sockets.
    pub fn cgroup(&mut self) -> &mut cgroup::CgroupGuard {
        &mut self.cgroup
    }

    /// The enforced cgroup, relative to the cgroup2 mount.
    pub fn scope(&self) -> &str {
        self.cgroup.relative()
    }

    /// The config file the agent was started with (rewrite it, then reload).
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Runs `breakwater watch ARGS -o json` against this agent: the process (kill it when done)
    /// and its output lines as they come.
    pub fn watch(&self, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
        let mut child = Command::new(agent_bin())
            .args(["--agent", &self.address(), "watch"])
            .args(args)
            .args(["-o", "json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run breakwater watch");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        // Time for it to subscribe before the caller makes something happen.
        thread::sleep(Duration::from_millis(300));
        (child, rx)
    }

    /// SIGKILL: no clean-up at all, as when the agent crashes.
    pub fn kill(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent started").id()
    }

    /// A gRPC client over the agent's unix socket.
    pub fn client(&self) -> AgentClient<Channel> {
        let path = self.socket.clone();
        let channel = self
            .rt
            .block_on(
                Endpoint::from_static("http://agent.invalid").connect_with_connector(
                    tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }),
                ),
            )
            .expect("connect to agent socket");
        AgentClient::new(channel)
    }

    /// Runs a future (a gRPC call) to completion.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn try_info(&self) -> Result<pb::GetAgentInfoResponse, String> {
        let path = self.socket.clone();
        self.rt.block_on(async move {
            let channel = Endpoint::from_static("http://agent.invalid")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| e.to_string())?;
            AgentClient::new(channel)
                .get_agent_info(pb::GetAgentInfoRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.to_string())
        })
    }

    pub fn info(&self) -> pb::GetAgentInfoResponse {
        self.try_info().expect("GetAgentInfo")
    }

    /// Runs the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .arg("--agent")
            .arg(self.address())
            .args(args)
            .output()
            .expect("run CLI")
    }

    /// Runs the CLI with `-o json` and parses its output; panics on a non-zero exit.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "breakwater {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// One destination from `breakwater destinations -o json`, by address, port, direction and
    /// (if given) namespace.
    pub fn destination(
        &self,
        addr: &str,
        port: u16,
        direction: &str,
        netns: Option<u32>,
    ) -> Option<serde_json::Value> {
        let v = self.cli_json(&["destinations"]);
        v["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| {
                d["address"] == addr
                    && d["port"] == port
                    && d["direction"] == direction
                    && netns.is_none_or(|n| d["netns"] == n)
            })
            .cloned()
    }

    /// Runs of the state-change program the kernel skipped (recursion on one CPU): state
    /// changes no counter saw.
    pub fn state_misses(&self) -> u64 {
        self.info()
            .programs
            .iter()
            .filter(|p| p.name == "bw_sock_state")
            .map(|p| p.recursion_misses)
            .sum()
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.info()
            .counters
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.value)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Stops the agent with SIGTERM and waits for it; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child
            .as_mut()
            .expect("agent started")
            .wait()
            .expect("wait agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if running {
            self.stop();
        }
        // What the agent pinned (links and maps) outlives it on purpose: remove it.
        cgroup::remove_pin_dir(&self.pin_dir);
        if thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// Reads a numeric field of a JSON destination (0 when absent).
pub fn field(d: &serde_json::Value, name: &str) -> u64 {
    d[name].as_u64().unwrap_or(0)
}

/// Polls `f` until it returns Some or the timeout passes (kernel work after close() is async).
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Ground truth: TCP sockets in `state` (as `ss` names it) whose destination is `dst`, as `ss`
/// counts them (in network namespace `netns` if given, by its name under /run/netns).
pub fn ss_count(state: &str, dst: SocketAddr, netns: Option<&str>) -> usize {
    let mut cmd = Command::new("ss");
    if let Some(ns) = netns {
        cmd.arg("-N").arg(ns);
    }
    let out = cmd
        .args(["-Htan", "state", state, "dst", &dst.to_string()])
        .output()
        .expect("run ss (Debian package iproute2)");
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

pub fn ss_established_to(dst: SocketAddr, netns: Option<&str>) -> usize {
    ss_count("established", dst, netns)
}

pub fn ss_time_wait_to(dst: SocketAddr, netns: Option<&str>) -> usize {
    ss_count("time-wait", dst, netns)
}

/// Opens `n` connections to `listener`'s address, closes them from the client side first, then
/// the accepted side: the client's sockets end in TIME_WAIT.
pub fn churn_to_time_wait(listener: &TcpListener, n: usize) {
    let addr = listener.local_addr().unwrap();
    let clients: Vec<_> = (0..n)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let accepted: Vec<_> = (0..n)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    drop(clients);
    thread::sleep(Duration::from_millis(100));
    drop(accepted);
    thread::sleep(Duration::from_millis(100));
}

/// A listener that accepts connections on a thread and keeps them until dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<TcpStream>>>,
}

impl Server {
    pub fn start(bind: &str) -> Self {
        Self::from_listener(TcpListener::bind(bind).expect("bind server"))
    }

    pub fn from_listener(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            held
        });
        Self {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops accepting and closes every accepted connection and the listener.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            drop(h.join().expect("server thread"));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Opens `n` connections to `addr` from a thread named `bw-client` (its comm in the kernel).
pub fn connect_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    thread::Builder::new()
        .name("bw-client".into())
        .spawn(move || {
            (0..n)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect()
        })
        .unwrap()
        .join()
        .unwrap()
}

/// A port on 127.0.0.1 with nothing listening (bound once, then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// An IPv4 TCP socket whose connect gives up after one SYN retry (`TCP_SYNCNT=1`).
pub fn one_syn_retry_socket() -> socket2::Socket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a properly sized int.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_SYNCNT");
    s
}

/// A listener whose accept queue is full: further SYNs are dropped, so connects time out.
pub fn full_queue() -> (socket2::Socket, SocketAddr, TcpStream) {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect(addr).expect("first connection fills the queue");
    (listener, addr, filler)
}

/// An echo server on 127.0.0.1 (in the calling thread's network namespace), on threads of its
/// own for the rest of the test process.
pub fn echo_server() -> SocketAddr {
    use std::io::{Read as _, Write as _};
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = echo.local_addr().unwrap();
    thread::spawn(move || {
        for conn in echo.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
