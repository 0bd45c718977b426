//! The kernel the agent meets: one that cannot run its core stops it with exit 69 and the name of
//! what is missing (or, with `--on-unsupported-kernel=wait`, keeps it up, alive and never
//! ready); one that can, starts it. Run in every kernel of `cargo xtask vm-test`, Debian 11's
//! 5.10 among them, whose verifier refuses socket-local storage in tracing programs.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use breakwater_tests::{agent_bin, cgroup, require_root, serial, Agent};

/// `uname -r` as (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

/// Before 5.11 a tracing program may not use socket-local storage, which connection tracking
/// needs (the agent's own test of this is the verifier, not the version).
fn too_old_for_the_core() -> bool {
    kernel_version() < (5, 11)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_kernel_too_old_for_the_core_stops_the_agent_with_exit_69_and_the_reason() {
    let _s = serial();
    if !require_root() {
        return;
    }
    if !too_old_for_the_core() {
        // This kernel runs the core: the agent starts, and says so.
        let agent = Agent::start();
        let info = agent.info();
        assert!(
            info.features
                .iter()
                .filter(|f| f.name == "connection_tracking" || f.name == "breaker_gate")
                .all(|f| f.status() == breakwater_proto::v1::FeatureStatus::On),
            "{:?}",
            info.features
        );
        return;
    }
    cgroup::mount_bpffs_if_needed();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let pin_dir = cgroup::pin_dir();
    let started = Instant::now();
    let out = Command::new(agent_bin())
        .arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("connection tracking cannot run")
            && stderr.contains("bpf_sk_storage_get")
            && stderr.contains("Linux 5.11"),
        "{stderr}"
    );
    // One line says it, not the verifier's whole log.
    assert!(stderr.lines().count() <= 3, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(!socket.exists());
    let left = pin_dir.exists();
    cgroup::remove_pin_dir(&pin_dir);
    assert!(!left, "a start that cannot run leaves nothing pinned");
}

#[test]
fn on_a_kernel_too_old_the_wait_mode_is_alive_and_never_ready() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let _s = serial();
    if !require_root() {
        return;
    }
    if !too_old_for_the_core() {
        // Covered by the other kernels' suites: the agent starts and is ready.
        Agent::start_with(None, &["--on-unsupported-kernel", "wait"]).info();
        return;
    }
    cgroup::mount_bpffs_if_needed();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let pin_dir = cgroup::pin_dir();
    let port = free_port();
    let mut child = Command::new(agent_bin())
        .arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["--on-unsupported-kernel", "wait"])
        .args(["--health-listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = |service: &str| {
        rt.block_on(async {
            let channel =
                tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                    .unwrap()
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status())
                .map_err(|e| e.to_string())
        })
    };
    // Up once the load has failed: alive ("" SERVING), never ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ServingStatus::Serving) = status("") {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the agent exited");
        assert!(Instant::now() < deadline, "no SERVING for \"\" within 60 s");
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status("breakwater.v1.Agent"), Ok(ServingStatus::NotServing));
    assert!(!socket.exists(), "no API while the kernel is unsupported");
    thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "it keeps waiting");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("bpf_sk_storage_get"), "{stderr}");
    cgroup::remove_pin_dir(&pin_dir);
}
