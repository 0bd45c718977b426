//! A throwaway single-member etcd (Debian's `/usr/bin/etcd`, which `cargo xtask setup`
//! installs) on free loopback ports, its data in a directory of the caller's: the bench's fleet
//! part and the soak start one. It can be stopped and started again on the same ports and
//! data (the soak takes it away from its agent and brings it back). Ready means its `/health`
//! answers `"health":"true"` (a leader is elected); no etcd client needed.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Debian's etcd-server (`cargo xtask setup` installs it).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long etcd may take to answer after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd; killed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    /// `--name`, and the data directory's name under `dir`.
    name: String,
    pub client_port: u16,
    peer_port: u16,
    /// Starts so far (each has its own log, `etcd-<n>.log`).
    starts: u32,
    /// "etcd X.Y.Z", from `etcd --version`.
    pub version: String,
}

impl EtcdServer {
    /// Starts etcd `name` with its data and logs under `dir` on two free loopback ports, and
    /// waits until it is healthy.
    pub fn start(dir: &Path, name: &str) -> Result<Self> {
        if !Path::new(ETCD_BIN).is_file() {
            bail!(
                "{ETCD_BIN} is missing: `cargo xtask setup` (as root) installs Debian's etcd-server"
            );
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let version = crate::output(Command::new(ETCD_BIN).arg("--version"))?
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("etcd Version: "))
            .map_or_else(|| "etcd".to_owned(), |v| format!("etcd {v}"));
        let free_port =
            || -> Result<u16> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        let mut last = String::new();
        // Another process may take a port between picking and binding it: retry on others.
        for _ in 1..=3 {
            let mut etcd = Self {
                child: None,
                dir: dir.to_owned(),
                name: name.to_owned(),
                client_port: free_port()?,
                peer_port: free_port()?,
                starts: 0,
                version: version.clone(),
            };
            match etcd.start_again() {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    last = format!("{e:#}");
                    if !last.contains("address already in use") {
                        break;
                    }
                    // A fresh data directory for the next ports.
                    let _ = fs::remove_dir_all(etcd.data_dir());
                }
            }
        }
        bail!("etcd did not start: {last}")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("{}.etcd", self.name))
    }

    /// Kills it (SIGKILL: as a crashed or partitioned etcd, nothing said to its clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it (again) on the same ports and data, and waits until it is healthy; the error
    /// carries its log.
    pub fn start_again(&mut self) -> Result<()> {
        self.stop();
        self.starts += 1;
        let log = self.dir.join(format!("etcd-{}.log", self.starts));
        let out = fs::File::create(&log)?;
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(ETCD_BIN);
        // ETCD_* variables are flags to etcd: none from our environment.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(name);
            }
        }
        let child = cmd
            .arg(format!("--name={}", self.name))
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={}={peer_url}", self.name))
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {ETCD_BIN}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "etcd exited during start-up ({status}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "etcd at {client_url} was not healthy within {READY_TIMEOUT:?}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET /health` says `"health":"true"`.
    pub fn healthy(&self) -> bool {
        self.get("/health")
            .is_ok_and(|body| body.contains(r#""health":"true""#))
    }

    /// The body of `GET path` on the client port (etcd serves `/health` and `/metrics` there).
    pub fn get(&self, path: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.client_port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text
            .split_once("\r\n\r\n")
            .map_or(text.as_str(), |(_, body)| body)
            .to_owned())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
