//! The bench's peer arms: bpftrace scripts (`xtask/bpftrace/`) on the tracepoint breakwater
//! tracks connections at (`sock:inet_sock_set_state`), run beside the connect loop as breakwater
//! is, for scale: `tcplife.bt` (one line per closed connection, written to a file) and
//! `counter.bt` (a bare count per port and state).

use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Debian's bpftrace (`cargo xtask setup` installs it).
const BPFTRACE: &str = "/usr/bin/bpftrace";
/// What both scripts print from BEGIN, which bpftrace runs once every probe is attached. Its
/// own "Attaching N probes..." comes before the programs are even loaded.
const MARKER: &str = "Tracing ";
/// Compiling a script (LLVM) and attaching it, on a busy machine.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// bpftrace runs END and prints what is left in its buffers after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per map for `counter.bt`: a churning client's sockets key it by ephemeral port (~28k)
/// and state (~5), past bpftrace's default 4096; a full map would drop updates, and look cheap.
const COUNTER_KEYS: &str = "262144";

/// A bpftrace script of `xtask/bpftrace/`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Script {
    Tcplife,
    Counter,
}

impl Script {
    fn file(self) -> &'static str {
        match self {
            Self::Tcplife => "tcplife.bt",
            Self::Counter => "counter.bt",
        }
    }

    fn path(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bpftrace")
            .join(self.file())
    }
}

/// Fails early, before any measurement, without bpftrace.
pub fn check() -> Result<()> {
    if !Path::new(BPFTRACE).is_file() {
        bail!("{BPFTRACE} is missing: `cargo xtask setup` (as root) installs Debian's bpftrace");
    }
    for script in [Script::Tcplife, Script::Counter] {
        let path = script.path();
        if !path.is_file() {
            bail!("{} is missing", path.display());
        }
    }
    Ok(())
}

/// A running `bpftrace SCRIPT`, its output in a file; killed when dropped before `stop`.
pub struct Bpftrace {
    script: Script,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Bpftrace {
    /// Starts `script` with its stdout and stderr in files under `dir`, and waits until it is
    /// attached (its BEGIN line is out).
    pub fn start(script: Script, dir: &Path) -> Result<Self> {
        let stem = script.file().trim_end_matches(".bt");
        let out = dir.join(format!("bpftrace-{stem}.out"));
        let err = dir.join(format!("bpftrace-{stem}.err"));
        let stdout = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        let stderr = File::create(&err).with_context(|| format!("creating {}", err.display()))?;
        let mut cmd = Command::new(BPFTRACE);
        if script == Script::Counter {
            cmd.env("BPFTRACE_MAP_KEYS_MAX", COUNTER_KEYS);
        }
        let child = cmd
            .arg(script.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {BPFTRACE} {}", script.path().display()))?;
        let mut bt = Self {
            script,
            child,
            out,
            err,
        };
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if head(&bt.out).contains(MARKER) {
                return Ok(bt);
            }
            if let Some(status) = bt.child.try_wait()? {
                bail!(
                    "bpftrace {} exited before it was attached ({status}): {}",
                    script.file(),
                    bt.said()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "bpftrace {} was not attached within {}s: {}",
                    script.file(),
                    ATTACH_TIMEOUT.as_secs(),
                    bt.said()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then waits for bpftrace to exit. A note for the round's line: the connections
    /// tcplife printed (one line per closed socket: both ends of each), and the events bpftrace
    /// reports lost, if any.
    pub fn stop(mut self) -> Result<String> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGINT to bpftrace");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!(
                    "bpftrace {} did not exit within {}s of SIGINT",
                    self.script.file(),
                    STOP_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!(
                "bpftrace {} exited with {status}: {}",
                self.script.file(),
                self.said()
            );
        }
        let records = count_records(&self.out)?;
        let lost = lost_events(&fs::read_to_string(&self.err).unwrap_or_default())
            + lost_events(&tail(&self.out));
        let _ = fs::remove_file(&self.out);
        let mut note = match self.script {
            Script::Tcplife => format!("{records} lines"),
            Script::Counter => String::new(),
        };
        if lost > 0 {
            if !note.is_empty() {
                note.push_str(", ");
            }
            note.push_str(&format!("{lost} events lost"));
        }
        Ok(note)
    }

    /// What bpftrace printed on stderr, and the start of its stdout, for errors.
    fn said(&self) -> String {
        let err = fs::read_to_string(&self.err).unwrap_or_default();
        format!("{} {}", err.trim(), head(&self.out).trim())
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.out);
    }
}

/// The first 4 KiB of a file (lossy), or "".
fn head(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(4096).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last 64 KiB of a file (lossy), or "": where bpftrace's exit messages are.
fn tail(path: &Path) -> String {
    use std::io::{Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        if f.seek(SeekFrom::Start(len.saturating_sub(65536))).is_ok() {
            let _ = f.read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Lines that start with a digit: tcplife's connections (its pid first), not bpftrace's
/// "Attaching" line, the header or the blank lines its cleared maps print at exit.
fn count_records(path: &Path) -> Result<u64> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut records = 0;
    for line in BufReader::with_capacity(1 << 20, f).split(b'\n') {
        if line?.first().is_some_and(u8::is_ascii_digit) {
            records += 1;
        }
    }
    Ok(records)
}

/// The sum of bpftrace's "Lost N events" lines (its perf buffer was full).
fn lost_events(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("Lost ")?
                .strip_suffix(" events")?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_events_are_summed() {
        assert_eq!(
            lost_events("Attaching 3 probes...\nLost 12 events\nx\nLost 3 events\n"),
            15
        );
        assert_eq!(lost_events("PID COMM\n"), 0);
    }

    #[test]
    fn only_tcplife_records_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tcplife.out");
        fs::write(
            &out,
            "Attaching 3 probes...\nTracing TCP connections' lifespans. Hit Ctrl-C to end.\n\
             PID     COMM   LADDR\n29372   python3 127.0.0.1\n29372   python3 127.0.0.1\n\n\n\n",
        )
        .unwrap();
        assert_eq!(count_records(&out).unwrap(), 2);
    }

    #[test]
    fn scripts_are_in_the_repository() {
        for script in [Script::Tcplife, Script::Counter] {
            let text = fs::read_to_string(script.path()).unwrap();
            assert!(text.contains("tracepoint:sock:inet_sock_set_state"));
            assert!(
                text.contains(MARKER.trim()),
                "{} has no marker",
                script.file()
            );
        }
    }
}
