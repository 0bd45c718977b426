//! What the bench and the soak share: a [`Sandbox`] (a cgroup this process joins, where the
//! agents' breakers enforce, and a pin directory), and [`Agent`], a `breakwater agent` started
//! in it, ready once `info` answers, stopped with SIGTERM.

use std::{
    ffi::OsString,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How long the agent may take to answer `info` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What every agent of one bench (or soak) run is started with.
pub struct Env<'a> {
    pub bin: &'a Path,
    /// Temporary directory: the agent's socket, log and config.
    pub dir: &'a Path,
    pub sandbox: &'a Sandbox,
    /// `--agent-args`.
    pub extra: &'a [&'a str],
}

impl Env<'_> {
    pub fn agent(&self) -> Result<Agent> {
        Agent::start(self, None)
    }

    /// As [`Env::agent`], with every hook returning at once.
    pub fn empty_agent(&self) -> Result<Agent> {
        Agent::start_with(self, None, &self.sandbox.relative, true)
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.dir.join("agent.sock").display())
    }

    /// `breakwater --agent <url> ARGS` (stdin closed).
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(self.bin);
        cmd.args(["--agent", &self.url()]).stdin(Stdio::null());
        cmd
    }
}

/// A running `breakwater agent`; killed when dropped before `stop`.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
    /// Its API: `unix://<socket>`.
    url: String,
}

/// How [`Agent::launch`] starts an agent.
pub struct Launch<'a> {
    /// Its socket and log are `<dir>/<name>.sock` and `<dir>/<name>.log`.
    pub name: &'a str,
    pub config: Option<&'a Path>,
    /// Where its breakers enforce: a cgroup relative to the cgroup2 mount.
    pub scope: &'a str,
    pub pin_dir: &'a Path,
    /// Every hook returning at once.
    pub empty_hooks: bool,
    /// More arguments for `breakwater agent`.
    pub args: &'a [String],
}

impl Agent {
    /// Starts the agent with its API on `<dir>/agent.sock`, confined to the sandbox, and waits
    /// until `info` answers.
    pub fn start(env: &Env, config: Option<&Path>) -> Result<Self> {
        Self::start_with(env, config, &env.sandbox.relative, false)
    }

    /// As [`Agent::start`], with breakers enforcing on `scope` (relative to the cgroup2 mount),
    /// and with every hook returning at once if `empty_hooks`.
    pub fn start_with(
        env: &Env,
        config: Option<&Path>,
        scope: &str,
        empty_hooks: bool,
    ) -> Result<Self> {
        Self::launch(
            env,
            &Launch {
                name: "agent",
                config,
                scope,
                pin_dir: &env.sandbox.pin_dir,
                empty_hooks,
                args: &[],
            },
        )
    }

    /// Starts an agent as `how` says, with `--agent-args` last, and waits until `info` answers.
    pub fn launch(env: &Env, how: &Launch) -> Result<Self> {
        Self::launch_within(env, how, READY_TIMEOUT)
    }

    /// As [`Agent::launch`], waiting up to `ready_timeout` for `info` to answer (a config of
    /// thousands of services takes longer to apply).
    pub fn launch_within(env: &Env, how: &Launch, ready_timeout: Duration) -> Result<Self> {
        let bin = env.bin;
        let socket = env.dir.join(format!("{}.sock", how.name));
        let log = env.dir.join(format!("{}.log", how.name));
        let _ = fs::remove_file(&socket);
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("agent")
            .arg("--socket")
            .arg(&socket)
            .args(Sandbox::agent_args(how.scope, how.pin_dir))
            .args(how.args);
        if let Some(config) = how.config {
            cmd.arg("--config").arg(config);
        }
        if how.empty_hooks {
            cmd.arg("--empty-hooks");
        }
        let child = cmd
            .args(env.extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} agent", bin.display()))?;
        let url = format!("unix://{}", socket.display());
        let mut agent = Self {
            child,
            log,
            url: url.clone(),
        };

        let deadline = Instant::now() + ready_timeout;
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited before it was ready ({status}){}",
                    agent.log_tail()
                );
            }
            let ready = Command::new(bin)
                .args(["--agent", &url, "info"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running {} --agent {url} info", bin.display()))?
                .success();
            if ready {
                return Ok(agent);
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{} --agent {url} info` did not succeed within {}s{}",
                    bin.display(),
                    ready_timeout.as_secs(),
                    agent.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `breakwater --agent <this agent> ARGS` (stdin closed).
    pub fn cli(&self, env: &Env) -> Command {
        let mut cmd = Command::new(env.bin);
        cmd.args(["--agent", &self.url]).stdin(Stdio::null());
        cmd
    }

    fn status_kib(&self, field: &str) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the agent has used (user + system, every thread), from `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command (which may hold spaces), from field 3: utime is 14, stime 15.
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().skip(11).take(2))
            .into_iter()
            .flatten()
            .filter_map(|v| v.parse::<u64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        Duration::from_millis(ticks * 1000 / hz.max(1))
    }

    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    pub fn hwm_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Resets the peak (`VmHWM`) to the resident set now (`clear_refs` 5), so that what
    /// `hwm_kib` reports next is the peak from here on.
    pub fn reset_peak(&self) -> Result<()> {
        fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5")
            .context("resetting the agent's peak resident set")
    }

    /// SIGTERM, then wait (SIGKILL after `STOP_TIMEOUT`).
    pub fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGTERM to the agent");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    println!(
                        "warning: the agent exited with {status} after SIGTERM{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                println!(
                    "warning: the agent did not exit within {}s of SIGTERM; killing it{}",
                    STOP_TIMEOUT.as_secs(),
                    self.log_tail()
                );
                self.child.kill()?;
                self.child.wait()?;
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the agent's output, for error messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("\nlast lines of {}:\n{tail}", self.log.display())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The cgroup2 mount point, from /proc/self/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    breakwater_common::mounts::find("cgroup2")
        .context("reading /proc/self/mounts")?
        .context("cgroup v2 is not mounted (no cgroup2 line in /proc/self/mounts)")
}

/// Where the bench's (or the soak's) agents enforce and pin: a cgroup
/// `<cgroup2>/breakwater-<task>-<pid>` that this process joins (so its connects, and its
/// children's, are in scope) and a pin directory `/sys/fs/bpf/breakwater-<task>-<pid>`. Dropping it releases whatever is still pinned, moves
/// this process (and anything left) back to the cgroup it came from and removes both.
pub struct Sandbox {
    bin: PathBuf,
    /// `bench` or `soak`: in names and messages.
    task: &'static str,
    /// The cgroup, absolute.
    pub cgroup: PathBuf,
    /// The cgroup relative to the mount, for `--scope`.
    pub relative: String,
    /// An empty sibling cgroup, for agents whose breakers must not touch the bench's connects.
    idle: PathBuf,
    pub idle_relative: String,
    /// The cgroup this process was in, absolute.
    origin: PathBuf,
    pub pin_dir: PathBuf,
}

impl Sandbox {
    /// `task` names it: `breakwater-<task>-<pid>`.
    pub fn new(bin: &Path, task: &'static str) -> Result<Self> {
        let mount = cgroup2_mount()?;
        let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let origin = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 (0::) line in /proc/self/cgroup")?;
        let name = format!("breakwater-{task}-{}", std::process::id());
        let cgroup = mount.join(&name);
        let pin_dir = Path::new("/sys/fs/bpf").join(&name);
        if pin_dir.exists() {
            bail!(
                "{} exists already (a {task} with this pid?)",
                pin_dir.display()
            );
        }
        fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let idle = mount.join(format!("{name}-idle"));
        let sandbox = Self {
            bin: bin.to_owned(),
            task,
            relative: format!("/{name}"),
            idle_relative: format!("/{name}-idle"),
            idle,
            origin: mount.join(origin.trim_start_matches('/')),
            cgroup,
            pin_dir,
        };
        fs::create_dir(&sandbox.idle)
            .with_context(|| format!("creating cgroup {}", sandbox.idle.display()))?;
        // A socket keeps the cgroup of the process that created it: join before any socket.
        fs::write(
            sandbox.cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("moving this process into {}", sandbox.cgroup.display()))?;
        Ok(sandbox)
    }

    /// `--scope SCOPE --pin-dir DIR --release-on-exit`.
    fn agent_args(scope: &str, pin_dir: &Path) -> [OsString; 5] {
        [
            "--scope".into(),
            scope.into(),
            "--pin-dir".into(),
            pin_dir.into(),
            "--release-on-exit".into(),
        ]
    }
}

/// Releases what agents left pinned in `pin_dir` (an agent that was killed had no chance to;
/// `uninstall` does it) and removes the directory.
pub fn release_pins(bin: &Path, pin_dir: &Path) {
    if pin_dir.exists() {
        let _ = Command::new(bin)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(pin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(pin_dir);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        release_pins(&self.bin, &self.pin_dir);
        let back = self.origin.join("cgroup.procs");
        let _ = fs::write(&back, std::process::id().to_string());
        for _ in 0..50 {
            // Anything still inside is one of our children: move it out with us.
            for pid in fs::read_to_string(self.cgroup.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                let _ = fs::write(&back, pid);
            }
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_dir(&self.idle);
        for (what, path) in [
            ("cgroup", &self.cgroup),
            ("cgroup", &self.idle),
            ("pin directory", &self.pin_dir),
        ] {
            if path.exists() {
                eprintln!(
                    "warning: could not remove the {}'s {what} {}",
                    self.task,
                    path.display()
                );
            }
        }
    }
}
