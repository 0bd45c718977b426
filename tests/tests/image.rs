//! The agent's OCI image (`cargo xtask image`), run the way deploy/kubernetes/daemonset.yaml
//! runs it — its command and args, its capabilities (not privileged), host PID and network, a
//! read-only root, its host mounts and its ConfigMap's config — with podman, and used from the
//! host over the unix socket with the CLI ($BREAKWATER_BIN): `info`, a connection counted, and
//! a tripped breaker refusing a connect in the test's cgroup.
//!
//! The image is `$BREAKWATER_IMAGE` (the "image" stage of `cargo xtask test` sets it), else
//! `localhost/breakwater:<version>`; it must hold the very binary under test. What this test
//! starts (the container, pins, its cgroup, temporary files) is removed on drop; the image is
//! the build's, as the binary is. Host-only: the VMs have no podman (xtask/src/vm.rs).

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use breakwater_tests::{agent_bin, cgroup, eventually, field, require_root, serial, Server};
use serde_json::Value;

/// A missing tool or image: a skip with the reason outside CI, a failure under `CI=true`.
fn missing(what: &str, how: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {what}: {how}"
    );
    eprintln!("skipped: {what} ({how})");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"))
}

/// Runs `podman ARGS`; panics with its stderr unless it exits 0. Returns stdout.
fn podman(args: &[&str]) -> String {
    let out = run(Command::new("podman").args(args));
    assert!(
        out.status.success(),
        "podman {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The tests' Python venv (`cargo xtask setup`), for PyYAML: the parser deploy.rs reads the
/// manifests with.
fn venv_python() -> Option<PathBuf> {
    let dir = std::env::var_os("BREAKWATER_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/breakwater/venv"))
        })?;
    let python = dir.join("bin/python");
    if python.is_file() {
        return Some(python);
    }
    missing(
        &format!("the tests' Python venv is missing ({})", dir.display()),
        "run `cargo xtask setup`",
    );
    None
}

/// A one-document YAML file as JSON.
fn yaml(python: &Path, path: &Path) -> Value {
    let out = run(Command::new(python)
        .arg("-c")
        .arg("import json, sys, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1]))))")
        .arg(path));
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("PyYAML printed JSON")
}

fn image_name() -> String {
    std::env::var("BREAKWATER_IMAGE")
        .unwrap_or_else(|_| format!("localhost/breakwater:{}", env!("CARGO_PKG_VERSION")))
}

/// podman and runc on PATH and the image in root's storage; otherwise why not.
fn prerequisites(image: &str) -> Result<(), (String, String)> {
    for tool in ["podman", "runc"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err((
                format!("{tool} is missing"),
                "run `cargo xtask setup` as root".into(),
            ));
        }
    }
    let exists = run(Command::new("podman").args(["image", "exists", image]));
    if !exists.status.success() {
        return Err((
            format!("the image {image} is not in root's container storage"),
            "build it with `cargo xtask image`, or set BREAKWATER_IMAGE".into(),
        ));
    }
    Ok(())
}

/// `ulimit -H` of this process for `resource`, capped: podman's runc refuses the container
/// unless nofile and nproc are given explicitly (their defaults exceed what this machine
/// grants), and here refused nproc values above 32768 whatever the hard limit.
fn ulimit(resource: libc::__rlimit_resource_t, cap: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(resource, &mut limit) }, 0);
    limit.rlim_max.min(cap)
}

/// A free TCP port on the host (bound once, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `--name=value` among the args, rewritten to `--name=HOST:port` (a free port: other agents on
/// this machine share the host network); returns the port.
fn move_listener(args: &mut [String], name: &str) -> u16 {
    let prefix = format!("{name}=");
    let arg = args
        .iter_mut()
        .find(|a| a.starts_with(&prefix))
        .unwrap_or_else(|| panic!("the DaemonSet passes no {name}"));
    let (host, _) = arg[prefix.len()..].rsplit_once(':').expect("HOST:PORT");
    let host = host.to_owned();
    let port = free_port();
    *arg = format!("{prefix}{host}:{port}");
    port
}

/// One GET over HTTP/1.0; the whole response.
fn http_get(port: u16, path: &str) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to the listener");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(conn, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read response");
    response
}

/// A "pod": a process (with every capability, as the node's runtimes and kubelet have) in a
/// network namespace of its own, unnamed (reachable only as /proc/PID/ns/net), holding a
/// loopback connection there. Killed on drop.
struct Pod {
    child: std::process::Child,
    /// The port its connection goes to.
    port: u16,
    /// Its namespace's inode (the `netns` of the agent's listings).
    netns: u64,
}

impl Pod {
    fn start(python: &Path) -> Self {
        use std::{io::BufRead as _, os::unix::fs::MetadataExt as _, process::Stdio};
        let script = "import socket, sys\n\
                      l = socket.create_server(('127.0.0.1', 0))\n\
                      c = socket.create_connection(l.getsockname())\n\
                      a = l.accept()\n\
                      print(l.getsockname()[1], flush=True)\n\
                      sys.stdin.read()\n";
        let mut child = Command::new("unshare")
            .args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" -c \"$1\"",
            ])
            .arg(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the pod's port");
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the pod printed {line:?}, not its port")
        });
        let netns = fs::metadata(format!("/proc/{}/ns/net", child.id()))
            .expect("the pod's namespace")
            .ino();
        Self { child, port, netns }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container and the pins its agent made, removed on drop (before the test's cgroup, which
/// is declared earlier and so dropped later).
struct Container {
    name: String,
    pin_dir: PathBuf,
}

impl Container {
    fn logs(&self) -> String {
        let out = run(Command::new("podman").args(["logs", &self.name]));
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    fn state(&self) -> Value {
        let out = podman(&["inspect", "--format", "{{json .State}}", &self.name]);
        serde_json::from_str(&out).expect("podman inspect printed JSON")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- container log ---\n{}", self.logs());
        }
        let _ = run(Command::new("podman").args(["rm", "--force", "--time", "0", &self.name]));
        cgroup::remove_pin_dir(&self.pin_dir);
    }
}

/// The image holds exactly the binary under test, at the DaemonSet's command.
fn assert_image_holds(image: &str, binary: &str) {
    let root = podman(&["image", "mount", image]);
    let root = PathBuf::from(root.trim());
    let in_image = fs::read(root.join(binary.trim_start_matches('/')));
    let _ = run(Command::new("podman").args(["image", "unmount", image]));
    let in_image = in_image.unwrap_or_else(|e| panic!("{binary} in {image}: {e}"));
    let under_test = fs::read(agent_bin()).expect("read BREAKWATER_BIN");
    assert!(
        in_image == under_test,
        "{image} holds another {binary} than {} (a stale image: `cargo xtask image`)",
        agent_bin().display()
    );
}

/// The argument of the Containerfile's last `INSTRUCTION` (the runtime stage's).
fn containerfile_instruction(instruction: &str) -> String {
    let file = fs::read_to_string(repo().join("deploy/Containerfile")).expect("Containerfile");
    let prefix = format!("{instruction} ");
    file.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {instruction} in deploy/Containerfile"))
        .to_owned()
}

/// ENTRYPOINT or CMD of the Containerfile, as JSON.
fn containerfile_exec_form(instruction: &str) -> Value {
    serde_json::from_str(&containerfile_instruction(instruction)).expect("exec form (a JSON array)")
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let image = image_name();
    if let Err((what, how)) = prerequisites(&image) {
        return missing(&what, &how);
    }
    let Some(python) = venv_python() else { return };
    let ds = yaml(&python, &repo().join("deploy/kubernetes/daemonset.yaml"));
    let cm = yaml(&python, &repo().join("deploy/kubernetes/configmap.yaml"));
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];

    // The image: the binary under test, started as the DaemonSet and the Containerfile say.
    let command = c["command"].as_array().expect("command");
    let binary = command[0].as_str().expect("a path");
    assert_image_holds(&image, binary);
    let config: Value = serde_json::from_str(&podman(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &image,
    ]))
    .expect("image config");
    assert_eq!(
        config["Entrypoint"], c["command"],
        "the DaemonSet's command"
    );
    assert_eq!(config["Entrypoint"], containerfile_exec_form("ENTRYPOINT"));
    assert_eq!(config["Cmd"], containerfile_exec_form("CMD"));
    assert_eq!(config["User"], "0");
    assert_eq!(
        config["Env"],
        serde_json::json!([containerfile_instruction("ENV")])
    );

    // Own pins, socket directory and enforced cgroup, as every test agent has; the rest is the
    // DaemonSet's.
    let scope = cgroup::CgroupGuard::new();
    let pin_dir = cgroup::pin_dir();
    let name = format!("breakwater-image-test-{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let _ = run(Command::new("podman").args(["rm", "--force", "--time", "0", &name]));
    let container = Container {
        name: name.clone(),
        pin_dir: pin_dir.clone(),
    };

    let (config_key, config_text) = cm["data"]
        .as_object()
        .expect("ConfigMap data")
        .iter()
        .next()
        .expect("one file");
    let mut agent_config: toml::Table =
        toml::from_str(config_text.as_str().expect("a string")).expect("the ConfigMap's TOML");
    let socket_in_container = PathBuf::from(
        agent_config["agent"]["socket"]
            .as_str()
            .expect("[agent] socket"),
    );
    let agent = agent_config["agent"].as_table_mut().expect("[agent]");
    agent.insert(
        "pin_dir".into(),
        pin_dir.to_string_lossy().into_owned().into(),
    );
    agent_config["breaker"]
        .as_table_mut()
        .expect("[breaker]")
        .insert("scope".into(), vec![scope.relative().to_owned()].into());

    let mut podman_run: Vec<String> = [
        "run",
        "--detach",
        "--name",
        &name,
        "--runtime",
        "runc",
        "--ulimit",
        &format!("nofile={0}:{0}", ulimit(libc::RLIMIT_NOFILE, 1 << 20)),
        "--ulimit",
        &format!("nproc={0}:{0}", ulimit(libc::RLIMIT_NPROC, 32768)),
    ]
    .map(String::from)
    .to_vec();
    let mut add = |args: &[&str]| podman_run.extend(args.iter().map(|a| a.to_string()));

    if pod["hostNetwork"] == true {
        add(&["--network", "host"]);
    }
    if pod["hostPID"] == true {
        add(&["--pid", "host"]);
    }
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    add(&["--stop-timeout", &grace.to_string()]);

    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false, "capabilities, not privileged");
    for cap in sc["capabilities"]["drop"].as_array().expect("drop") {
        add(&["--cap-drop", cap.as_str().unwrap()]);
    }
    for cap in sc["capabilities"]["add"].as_array().expect("add") {
        add(&["--cap-add", cap.as_str().unwrap()]);
    }
    if sc["readOnlyRootFilesystem"] == true {
        add(&["--read-only"]);
    }
    add(&[
        "--user",
        &sc["runAsUser"].as_u64().expect("runAsUser").to_string(),
    ]);
    assert_eq!(
        sc["seccompProfile"]["type"], "RuntimeDefault",
        "podman's default profile"
    );
    if sc["appArmorProfile"]["type"] == "Unconfined" {
        add(&["--security-opt", "apparmor=unconfined"]);
    }
    let memory = c["resources"]["limits"]["memory"]
        .as_str()
        .expect("memory limit");
    let mib = memory.strip_suffix("Mi").expect("a limit in Mi");
    add(&["--memory", &format!("{mib}m")]);

    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap();
        let from = &var["valueFrom"];
        if let Some(value) = var["value"].as_str() {
            add(&["--env", &format!("{name}={value}")]);
        } else if from["fieldRef"]["fieldPath"] == "spec.nodeName" {
            add(&["--env", &format!("{name}=image-test-node")]);
        } else {
            // The fleet's ConfigMap is opt-in: no ConfigMap, no variable.
            assert_eq!(from["configMapKeyRef"]["optional"], true, "{name}");
        }
    }

    // Volumes: the node's paths (the socket's directory excepted: this test's own), the
    // ConfigMap as files, the optional etcd Secret as the empty directory Kubernetes gives.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let socket_dir = socket_in_container.parent().expect("socket directory");
    let host_socket_dir = dir.path().join("run");
    let config_dir = dir.path().join("config");
    let secret_dir = dir.path().join("secret");
    for d in [&host_socket_dir, &config_dir, &secret_dir] {
        fs::create_dir(d).expect("mkdir");
    }
    let mut mounted = Vec::new();
    for mount in c["volumeMounts"].as_array().expect("volumeMounts") {
        let target = mount["mountPath"].as_str().unwrap();
        let volume = volumes[mount["name"].as_str().unwrap()];
        let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
            if Path::new(target) == socket_dir {
                host_socket_dir.clone()
            } else {
                if volume["hostPath"]["type"] == "DirectoryOrCreate" {
                    fs::create_dir_all(path).expect("DirectoryOrCreate");
                }
                PathBuf::from(path)
            }
        } else if volume["configMap"]["name"] == cm["metadata"]["name"] {
            fs::write(
                config_dir.join(config_key),
                toml::to_string(&agent_config).unwrap(),
            )
            .expect("write config");
            config_dir.clone()
        } else if volume["secret"]["optional"] == true {
            secret_dir.clone()
        } else {
            panic!("volume {volume} is neither a host path, the ConfigMap nor optional");
        };
        let mut options = Vec::new();
        if mount["readOnly"] == true {
            options.push("ro");
        }
        match mount["mountPropagation"].as_str() {
            Some("HostToContainer") => options.push("rslave"),
            None => {}
            Some(other) => panic!("mountPropagation {other} at {target}"),
        }
        let spec = format!("{}:{target}", source.display());
        let spec = if options.is_empty() {
            spec
        } else {
            format!("{spec}:{}", options.join(","))
        };
        add(&["--volume", &spec]);
        mounted.push(target);
    }
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup"] {
        assert!(mounted.contains(&path), "the DaemonSet mounts {path}");
    }

    add(&["--entrypoint", &serde_json::to_string(command).unwrap()]);
    add(&[&image]);
    let mut args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let metrics_port = move_listener(&mut args, "--metrics-listen");
    move_listener(&mut args, "--health-listen");
    podman_run.extend(args);

    let started = Instant::now();
    podman(&podman_run.iter().map(String::as_str).collect::<Vec<_>>());

    // From the host, over the socket the container made in the mounted directory.
    let socket = host_socket_dir.join(socket_in_container.file_name().unwrap());
    let address = format!("unix://{}", socket.display());
    let cli = |args: &[&str]| -> Output {
        run(Command::new(agent_bin())
            .args(["--agent", &address])
            .args(args))
    };
    let cli_json = |args: &[&str]| -> Value {
        let out = cli(&[args, &["-o", "json"]].concat());
        assert!(
            out.status.success(),
            "breakwater {args:?}: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let info = loop {
        let out = cli(&["info", "-o", "json"]);
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).expect("JSON");
        }
        let state = container.state();
        assert!(
            state["Running"] == true,
            "the container stopped (exit code {}) before its agent answered",
            state["ExitCode"]
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent did not answer within 60 s: {}",
            text(&out.stderr)
        );
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "agent in the container answered after {:?}",
        started.elapsed()
    );

    // Every feature on, with the DaemonSet's capabilities only.
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let release = nix::sys::utsname::uname().unwrap();
    assert_eq!(info["kernel"], release.release().to_string_lossy().as_ref());
    let features = info["features"].as_array().expect("features");
    assert!(!features.is_empty());
    for f in features {
        assert_eq!(f["status"], "on", "feature {f}");
    }
    assert!(!info["programs"].as_array().expect("programs").is_empty());
    // The pins are on the node's bpffs.
    assert!(
        pin_dir.join("BW_BREAKERS").exists(),
        "pins in the host's {}",
        pin_dir.display()
    );

    // A connection from the host, counted by the container's programs.
    let up = Server::start("127.0.0.1:0");
    let ip = up.addr.ip().to_string();
    let port = up.addr.port();
    cgroup::connect_from_cgroup(scope.relative(), up.addr).expect("connect before any breaker");
    let opened = eventually(Duration::from_secs(5), || {
        let v = cli_json(&["destinations"]);
        v["destinations"]
            .as_array()?
            .iter()
            .find(|d| {
                d["address"] == ip.as_str() && d["port"] == port && d["direction"] == "outbound"
            })
            .map(|d| field(d, "opened"))
            .filter(|&n| n >= 1)
    });
    assert_eq!(opened, Some(1), "the connect is counted");

    // A pod's namespace, found through the node's /proc (hostPID) and entered with the
    // DaemonSet's capabilities: its connection is listed.
    let pod = Pod::start(&python);
    let conns = cli_json(&["conns"]);
    let in_pod: Vec<&Value> = conns["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|c| c["netns"] == pod.netns)
        .collect();
    assert!(
        in_pod
            .iter()
            .any(|c| c["remote_port"] == pod.port && c["state"] == "ESTAB"),
        "the pod's connection to port {} in netns {}: {in_pod:?}",
        pod.port,
        pod.netns
    );
    drop(pod);

    // A breaker tripped over the socket refuses connects in the scope, not outside it.
    let endpoint = up.addr.to_string();
    for args in [
        &["service", "put", "upstream", "--endpoint", &endpoint][..],
        &["policy", "set", "upstream", "--preset", "gobreaker"][..],
        &["trip", "upstream"][..],
    ] {
        let out = cli(args);
        assert!(
            out.status.success(),
            "breakwater {args:?}: {}",
            text(&out.stderr)
        );
    }
    let err = cgroup::connect_from_cgroup(scope.relative(), up.addr).expect_err("tripped");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
    TcpStream::connect(up.addr).expect("outside the scope: connected");
    let breakers = cli_json(&["breakers", "--service", "upstream"]);
    let breaker = &breakers["breakers"][0];
    assert_eq!(breaker["state"], "open", "{breakers}");
    assert_eq!(field(breaker, "rejected"), 1, "{breakers}");

    // Inside the pod, as `kubectl exec`: `breakwater` on PATH, the default socket.
    let out = run(Command::new("podman").args(["exec", &name, "breakwater", "services"]));
    assert!(
        out.status.success(),
        "breakwater services in the container: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("upstream"),
        "{}",
        text(&out.stdout)
    );

    // Prometheus' port on the node's network.
    let metrics = http_get(metrics_port, "/metrics");
    assert!(
        metrics.starts_with("HTTP/1.1 200") || metrics.starts_with("HTTP/1.0 200"),
        "{metrics}"
    );
    assert!(metrics.contains("breakwater_"), "{metrics}");

    // `podman stop` (SIGTERM, as the kubelet): exit 0, and the pins stay for the next pod.
    podman(&["stop", &name]);
    let state = container.state();
    assert_eq!(state["ExitCode"], 0, "{state}");
    assert!(
        pin_dir.join("BW_BREAKERS").exists(),
        "pins outlive the container"
    );
    // Still tripped with the agent gone: the gate is the kernel's.
    let err = cgroup::connect_from_cgroup(scope.relative(), up.addr).expect_err("still tripped");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));

    drop(container);
    assert!(!pin_dir.exists(), "pins removed");
}
