//! deploy/: the systemd unit and the Kubernetes manifests, checked with real validators
//! (`systemd-analyze`, the `kubernetes-validate` schemas) and against the real agent: its flags
//! (`breakwater agent --help`) and its config parser. No root needed. A validator that is missing
//! skips its test with the reason outside CI and fails it under `CI=true`; `cargo xtask setup`
//! installs kubernetes-validate (with PyYAML, which these tests also use to read the YAML) into
//! `~/.cache/breakwater/venv`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use breakwater_tests::agent_bin;
use serde_json::Value;

/// Kubernetes versions the manifests must validate against: the oldest they support
/// (`securityContext.appArmorProfile` is 1.30) and the newest the pinned validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// What the unit and the DaemonSet grant; each is explained where it is granted.
const CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy(path: &str) -> PathBuf {
    repo().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// False (and a printed reason) if `what` is missing outside CI; a failure under `CI=true`.
fn validator_missing(what: &str, how: &str) -> bool {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {what} is missing: {how}"
    );
    eprintln!("skipped: {what} is missing ({how})");
    false
}

/// The tests' Python venv: $BREAKWATER_VENV, else `~/.cache/breakwater/venv`, if it has
/// kubernetes-validate.
fn venv() -> Option<PathBuf> {
    let dir = std::env::var_os("BREAKWATER_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/breakwater/venv"))
        })?;
    if dir.join("bin/kubernetes-validate").is_file() {
        return Some(dir);
    }
    validator_missing(
        &format!("kubernetes-validate ({})", dir.join("bin").display()),
        "run `cargo xtask setup`",
    );
    None
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every document of a YAML file, as JSON (PyYAML from the venv: the parser the validator
/// itself uses).
fn yaml_docs(venv: &Path, path: &Path) -> Vec<Value> {
    let out = run(Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         with open(sys.argv[1]) as f:\n    \
             print(json.dumps([d for d in yaml.safe_load_all(f) if d is not None]))",
        )
        .arg(path));
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("PyYAML printed JSON")
}

fn yaml_doc(venv: &Path, path: &Path) -> Value {
    let mut docs = yaml_docs(venv, path);
    assert_eq!(docs.len(), 1, "{}: one document", path.display());
    docs.remove(0)
}

/// deploy/kubernetes/*.yaml, sorted.
fn kubernetes_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(deploy("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/kubernetes");
    files
}

fn is_kustomization(path: &Path) -> bool {
    path.file_stem().is_some_and(|s| s == "kustomization")
}

/// The Kubernetes resources (every manifest but kustomization.yaml).
fn resource_files() -> Vec<PathBuf> {
    kubernetes_files()
        .into_iter()
        .filter(|p| !is_kustomization(p))
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn kubernetes_manifests_pass_schema_validation() {
    let Some(venv) = venv() else { return };
    let files = resource_files();
    for version in KUBERNETES_VERSIONS {
        // --strict: unknown fields (a misspelt key) are errors, not silently dropped.
        let out = run(Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(&files));
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "kubernetes-validate {version} refused the manifests:\n{report}"
        );
        // A kind or apiVersion without a schema only warns: every document must have passed.
        assert!(
            !report.contains("WARN") && !report.contains("ERROR"),
            "kubernetes-validate {version}:\n{report}"
        );
        for file in &files {
            let docs = yaml_docs(&venv, file).len();
            let passed = report
                .lines()
                .filter(|l| l.contains(&format!("{} passed", file.display())))
                .count();
            assert_eq!(
                passed,
                docs,
                "kubernetes-validate {version}: {} has {docs} documents, {passed} passed:\n{report}",
                file.display()
            );
        }
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let Some(venv) = venv() else { return };
    let k = yaml_doc(&venv, &deploy("kubernetes/kustomization.yaml"));
    assert_eq!(k["kind"], "Kustomization");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file name").to_owned())
        .collect();
    let present: BTreeSet<String> = resource_files().iter().map(|p| file_name(p)).collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs deploy/kubernetes"
    );
    // Kinds that do not depend on others come first, for `kubectl apply -f` in this order too.
    assert_eq!(k["resources"][0], "namespace.yaml");
}

/// The `--flag` names in a line of arguments (`--a=b` and `--a b` both give `--a`).
fn flags_in(line: &str) -> Vec<String> {
    line.split_whitespace()
        .map(|w| w.trim_matches(['"', '\'', ',', '[', ']']))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap().to_owned())
        .collect()
}

/// `(file, flag)` for every agent flag the deploy files use, commented-out alternatives
/// included (they are documentation a user will uncomment).
fn deploy_flags() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let unit = read(&deploy("systemd/breakwater.service"));
    for line in unit.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(cmd) = line.strip_prefix("ExecStart=") {
            assert!(
                cmd.starts_with("/usr/local/bin/breakwater agent "),
                "unit: {line}"
            );
            for f in flags_in(cmd) {
                found.push(("breakwater.service".to_owned(), f));
            }
        }
    }
    let ds = read(&deploy("kubernetes/daemonset.yaml"));
    for line in ds.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if let Some(arg) = line.strip_prefix("- --") {
            for f in flags_in(&format!("--{arg}")) {
                found.push(("daemonset.yaml".to_owned(), f));
            }
        }
    }
    let containerfile = read(&deploy("Containerfile"));
    for line in containerfile.lines() {
        if let Some(cmd) = line.strip_prefix("CMD ") {
            for f in flags_in(cmd) {
                found.push(("Containerfile".to_owned(), f));
            }
        }
    }
    found
}

/// `breakwater agent --help`.
fn agent_help() -> String {
    let bin = agent_bin();
    let out = run(Command::new(&bin).args(["agent", "--help"]));
    assert!(
        out.status.success(),
        "{} agent --help: {}",
        bin.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The environment variables `breakwater agent --help` names (`[env: NAME=...]`).
fn agent_env_vars() -> BTreeSet<String> {
    let help = agent_help();
    let vars: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    assert!(
        vars.contains("BREAKWATER_CONFIG"),
        "no [env: ...] in --help: {help}"
    );
    vars
}

/// The fleet variables the deploy files set, with the agent's checks of their values (URLs,
/// node name, certificate with key); the files they name are not read.
const FLEET_VARS: &[&str] = &[
    "BREAKWATER_ETCD",
    "BREAKWATER_NODE_NAME",
    "BREAKWATER_ETCD_CA",
    "BREAKWATER_ETCD_CERT",
    "BREAKWATER_ETCD_KEY",
];

fn check_fleet_values(vars: &BTreeMap<String, String>, what: &str) {
    let get = |name: &str| vars.get(name).cloned();
    let overrides = breakwater::config::Overrides {
        etcd: get("BREAKWATER_ETCD")
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        node_name: get("BREAKWATER_NODE_NAME"),
        etcd_ca: get("BREAKWATER_ETCD_CA").map(PathBuf::from),
        etcd_cert: get("BREAKWATER_ETCD_CERT").map(PathBuf::from),
        etcd_key: get("BREAKWATER_ETCD_KEY").map(PathBuf::from),
        ..Default::default()
    };
    let mut config = breakwater::config::Config::default();
    overrides
        .apply(&mut config)
        .unwrap_or_else(|e| panic!("{what}: the agent refuses {vars:?}: {e}"));
    assert!(config.fleet.enabled(), "{what}: no etcd endpoint");
}

#[test]
fn every_flag_in_the_deploy_files_is_one_the_agent_accepts() {
    let bin = agent_bin();
    let help = agent_help();
    let known: BTreeSet<String> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect();

    let used = deploy_flags();
    let used_names: BTreeSet<&str> = used.iter().map(|(_, f)| f.as_str()).collect();
    for expected in ["--config", "--metrics-listen", "--health-listen"] {
        assert!(
            used_names.contains(expected),
            "no deploy file uses {expected}"
        );
    }
    // The state must outlive a restart or an upgrade of the agent.
    assert!(
        !used_names.contains("--release-on-exit"),
        "a deploy file passes --release-on-exit: {used:?}"
    );
    let unknown: Vec<String> = used
        .iter()
        .filter(|(_, f)| !known.contains(f))
        .map(|(file, f)| format!("{f} ({file})"))
        .collect();
    assert!(
        unknown.is_empty(),
        "flags used in deploy/ that `{} agent --help` does not list: {}\nknown: {known:?}",
        bin.display(),
        unknown.join(", ")
    );
}

/// `(key, value)` of a unit file's section, comments and blank lines skipped.
fn unit_section(unit: &str, section: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']).to_owned();
        } else if current == section {
            let (k, v) = line.split_once('=').expect("key=value");
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn unit_value<'a>(entries: &'a [(String, String)], key: &str) -> &'a str {
    let values: Vec<&str> = entries
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(values.len(), 1, "one {key}= in the unit, found {values:?}");
    values[0]
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let Ok(analyze) = which("systemd-analyze") else {
        validator_missing(
            "systemd-analyze",
            "install the Debian package systemd (it ships /usr/bin/systemd-analyze)",
        );
        return;
    };
    let bin = agent_bin();
    let bin = fs::canonicalize(&bin).unwrap_or(bin);
    let unit = read(&deploy("systemd/breakwater.service"));
    // `verify` checks that ExecStart's binary exists: the installed path becomes the built one.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("breakwater.service");
    fs::write(
        &copy,
        unit.replace("/usr/local/bin/breakwater", &bin.to_string_lossy()),
    )
    .unwrap();

    let out = run(Command::new(&analyze).arg("verify").arg(&copy));
    let stderr = text(&out.stderr);
    // Unknown keys and unparsable values are only warnings (exit 0): any line about the unit fails.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("breakwater"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        copy.display(),
        out.status
    );

    // The exposure score (0-10, shown as 3.6 when this was written) must not creep up: 40 is
    // the 0-100 scale's 4.0.
    let out = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
        .arg(&copy));
    assert!(
        out.status.success(),
        "systemd-analyze security: exposure above 4.0:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let service = unit_section(&unit, "Service");
    let caps: BTreeSet<String> = unit_value(&service, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.strip_prefix("CAP_").expect("CAP_ names").to_owned())
        .collect();
    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|c| c.to_string()).collect();
    assert_eq!(caps, expected, "CapabilityBoundingSet");
    assert_eq!(unit_value(&service, "Restart"), "on-failure");
    // A refused config and an unsupported kernel fail the same way every time.
    let prevent: BTreeSet<String> = unit_value(&service, "RestartPreventExitStatus")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let unsupported = breakwater::cli::EXIT_UNSUPPORTED_KERNEL.to_string();
    assert_eq!(prevent, BTreeSet::from(["2".to_owned(), unsupported]));
    assert_eq!(
        unit_value(&service, "ExecReload"),
        "/bin/kill -HUP $MAINPID"
    );
    assert_eq!(unit_value(&service, "RuntimeDirectory"), "breakwater");
    let writable: Vec<&str> = unit_value(&service, "ReadWritePaths")
        .split_whitespace()
        .collect();
    assert_eq!(unit_value(&service, "ProtectSystem"), "strict");

    // What the config says the agent writes is writable; what would break it is not set.
    let config = agent_config(&read(&deploy("systemd/breakwater.toml")), "systemd");
    assert!(
        writable.iter().any(|w| config.agent.pin_dir.starts_with(w)),
        "pin_dir {} is not under ReadWritePaths {writable:?}",
        config.agent.pin_dir.display()
    );
    let socket_dir = config.agent.socket.parent().unwrap();
    assert_eq!(socket_dir, Path::new("/run/breakwater"));
    for (key, breaks) in [
        (
            "PrivateNetwork",
            "the agent must see the host's network namespace",
        ),
        (
            "PrivateUsers",
            "capabilities must hold in the host's user namespace",
        ),
        (
            "ProtectKernelTunables",
            "it makes /sys, and bpffs under it, read-only",
        ),
        (
            "ProtectProc",
            "the agent opens /proc/<pid>/ns/net of every process",
        ),
        ("ProcSubset", "the advisor reads /proc/sys/net"),
        ("SystemCallFilter=@", "an allow list drops bpf() or setns()"),
    ] {
        let (key, prefix) = key.split_once('=').unwrap_or((key, ""));
        assert!(
            !service
                .iter()
                .any(|(k, v)| k == key && (prefix.is_empty() || v.starts_with(prefix))),
            "{key}= set: {breaks}"
        );
    }
    let namespaces = unit_value(&service, "RestrictNamespaces");
    assert!(
        namespaces.split_whitespace().any(|n| n == "net"),
        "RestrictNamespaces={namespaces} forbids setns() into network namespaces"
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The agent's own parser (unknown keys are errors there) accepts `text`.
fn agent_config(text: &str, what: &str) -> breakwater::config::Config {
    breakwater::config::Config::from_toml(text)
        .unwrap_or_else(|e| panic!("the agent refuses the {what} config: {e}"))
}

/// The DaemonSet's agent container.
fn agent_container(ds: &Value) -> &Value {
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// `--name=value` among a container's args.
fn arg_value<'a>(args: &'a [Value], name: &str) -> &'a str {
    let prefix = format!("{name}=");
    let values: Vec<&str> = args
        .iter()
        .filter_map(|a| a.as_str()?.strip_prefix(&prefix))
        .collect();
    assert_eq!(
        values.len(),
        1,
        "one {prefix}... in the args, found {values:?}"
    );
    values[0]
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr} has no port"))
}

#[test]
fn configmap_is_the_systemd_config_and_the_agent_accepts_it() {
    let Some(venv) = venv() else { return };
    let cm = yaml_doc(&venv, &deploy("kubernetes/configmap.yaml"));
    assert_eq!(cm["kind"], "ConfigMap");
    let data = cm["data"].as_object().expect("data");
    assert_eq!(data.len(), 1, "one file in the ConfigMap");
    let (key, kube) = data.iter().next().unwrap();
    let kube = kube.as_str().expect("a string");
    let systemd = read(&deploy("systemd/breakwater.toml"));
    agent_config(kube, "ConfigMap");
    agent_config(&systemd, "deploy/systemd");
    // The same settings (comments may differ).
    let kube_value: toml::Value = toml::from_str(kube).unwrap();
    let systemd_value: toml::Value = toml::from_str(&systemd).unwrap();
    assert_eq!(
        kube_value, systemd_value,
        "deploy/kubernetes/configmap.yaml and deploy/systemd/breakwater.toml differ"
    );

    // The DaemonSet mounts this ConfigMap where --config points.
    let ds = yaml_doc(&venv, &deploy("kubernetes/daemonset.yaml"));
    let c = agent_container(&ds);
    let config_path = PathBuf::from(arg_value(c["args"].as_array().unwrap(), "--config"));
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("a volume of the ConfigMap");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the ConfigMap's volume is mounted");
    assert_eq!(
        Path::new(mount["mountPath"].as_str().unwrap()).join(key),
        config_path
    );
    assert_eq!(
        cm["metadata"]["namespace"], ds["metadata"]["namespace"],
        "ConfigMap and DaemonSet in one namespace"
    );
}

#[test]
fn daemonset_gives_the_agent_what_it_needs() {
    let Some(venv) = venv() else { return };
    let ds = yaml_doc(&venv, &deploy("kubernetes/daemonset.yaml"));
    let pod = &ds["spec"]["template"]["spec"];
    let c = agent_container(&ds);
    assert_eq!(pod["hostNetwork"], true, "the node's network namespace");
    assert_eq!(pod["hostPID"], true, "/proc/<pid>/ns/net of every pod");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );

    // Capabilities instead of privileged, the same set as the systemd unit.
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(added, CAPABILITIES.iter().copied().collect());

    // Probes on the health port, Prometheus on the metrics port.
    let args = c["args"].as_array().unwrap();
    assert_eq!(args[0], "agent");
    let health = port_of(arg_value(args, "--health-listen"));
    let metrics = port_of(arg_value(args, "--metrics-listen"));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["grpc"]["port"], health, "{probe}");
    }
    assert_eq!(
        c["readinessProbe"]["grpc"]["service"],
        "breakwater.v1.Agent"
    );
    // On a kernel that cannot run the agent it waits, "" SERVING and breakwater.v1.Agent
    // NOT_SERVING: startup and liveness must ask for "" (a pod that fails them is restarted,
    // into the same kernel), readiness for the API.
    assert_eq!(arg_value(args, "--on-unsupported-kernel"), "wait");
    for probe in ["startupProbe", "livenessProbe"] {
        let service = &c[probe]["grpc"]["service"];
        assert!(
            service.is_null() || service == "",
            "{probe} asks for {service}"
        );
    }
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], metrics.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let ports: BTreeSet<u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, BTreeSet::from([health, metrics]));
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());

    // Host mounts: where the config pins and listens, and what the agent reads.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let host_mounts: BTreeMap<&str, (&str, &Value)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let host = volumes[m["name"].as_str()?]["hostPath"]["path"].as_str()?;
            Some((m["mountPath"].as_str()?, (host, m)))
        })
        .collect();
    let config = agent_config(&read(&deploy("systemd/breakwater.toml")), "deploy/systemd");
    for (path, why) in [
        ("/sys/fs/bpf", "pins that outlive the pod"),
        ("/sys/fs/cgroup", "the node's cgroup hierarchy"),
        ("/sys/kernel/btf", "kernel BTF"),
        ("/sys/kernel/tracing", "tracefs"),
        ("/run/netns", "named network namespaces"),
        ("/run/breakwater", "the API socket on the node"),
    ] {
        let (host, _) = host_mounts
            .get(path)
            .unwrap_or_else(|| panic!("no host mount at {path} ({why})"));
        assert_eq!(*host, path, "{path} mounts the node's own {path}");
    }
    assert!(config.agent.pin_dir.starts_with("/sys/fs/bpf"));
    assert!(config.agent.socket.starts_with("/run/breakwater"));
    // Mounts the node makes later (bpffs, `ip netns add`) must show up in the pod;
    // Bidirectional would need a privileged container.
    for path in ["/sys/fs/bpf", "/run/netns"] {
        assert_eq!(
            host_mounts[path].1["mountPropagation"], "HostToContainer",
            "{path}"
        );
    }
    assert_ne!(
        host_mounts["/sys/fs/bpf"].1["readOnly"], true,
        "pins are written"
    );
}

#[test]
fn systemd_fleet_settings_are_an_optional_environment_file() {
    let unit = read(&deploy("systemd/breakwater.service"));
    let service = unit_section(&unit, "Service");
    // "-": a missing file is no error, and the agent is on its own.
    let file = unit_value(&service, "EnvironmentFile");
    assert_eq!(file, "-/etc/breakwater/fleet.env");
    // Readable in the sandbox: ProtectSystem=strict leaves /etc read-only, ProtectHome hides
    // /home, /root and /run/user.
    assert_eq!(unit_value(&service, "ProtectSystem"), "strict");

    // The example: only commented assignments (installed as is it changes nothing), of
    // variables the agent reads, with values the agent accepts.
    let example = read(&deploy("systemd/fleet.env.example"));
    assert!(
        example.contains("/etc/breakwater/fleet.env"),
        "fleet.env.example says where it goes"
    );
    let known = agent_env_vars();
    let mut vars = BTreeMap::new();
    for line in example.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let Some(name) = name.strip_prefix('#') else {
            panic!("fleet.env.example sets {line:?}: the example must change nothing as is");
        };
        if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            continue; // prose
        }
        assert!(
            known.contains(name),
            "fleet.env.example: the agent reads no {name}"
        );
        vars.insert(name.to_owned(), value.to_owned());
    }
    let names: BTreeSet<&str> = vars.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        FLEET_VARS.iter().copied().collect(),
        "fleet.env.example"
    );
    for (name, value) in &vars {
        if name.starts_with("BREAKWATER_ETCD_") {
            assert!(
                value.starts_with("/etc/breakwater/"),
                "{name}={value}: keep it under /etc"
            );
        }
    }
    check_fleet_values(&vars, "fleet.env.example");
}

#[test]
fn daemonset_fleet_settings_are_opt_in() {
    let Some(venv) = venv() else { return };
    let path = deploy("kubernetes/daemonset.yaml");
    let ds = yaml_doc(&venv, &path);
    let pod = &ds["spec"]["template"]["spec"];
    let c = agent_container(&ds);
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    let known = agent_env_vars();
    for name in env.keys() {
        assert!(known.contains(*name), "the agent reads no {name}");
    }
    assert_eq!(
        env.keys().copied().collect::<BTreeSet<_>>(),
        FLEET_VARS.iter().copied().collect(),
        "the container's env"
    );

    // Always: the node's own name, which the agent only uses in a fleet.
    assert_eq!(
        env["BREAKWATER_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    // The rest only from an optional ConfigMap that deploy/kubernetes does not ship: without
    // it the variables are unset, no etcd and no certificate path the agent would refuse.
    let mut keys = BTreeMap::new();
    let mut configmaps = BTreeSet::new();
    for (name, e) in &env {
        if *name == "BREAKWATER_NODE_NAME" {
            continue;
        }
        assert!(
            e.get("value").is_none(),
            "{name} has a value: fleet mode must be opt-in"
        );
        let r = &e["valueFrom"]["configMapKeyRef"];
        assert_eq!(r["optional"], true, "{name}: an optional ConfigMap key");
        configmaps.insert(r["name"].as_str().unwrap());
        keys.insert(r["key"].as_str().unwrap(), *name);
    }
    assert_eq!(configmaps.len(), 1, "one ConfigMap: {configmaps:?}");
    let fleet_cm = configmaps.into_iter().next().unwrap();
    for file in resource_files() {
        for doc in yaml_docs(&venv, &file) {
            assert!(
                !(doc["kind"] == "ConfigMap" && doc["metadata"]["name"] == fleet_cm),
                "{} ships {fleet_cm}: fleet mode must be opt-in",
                file.display()
            );
        }
    }

    // etcd's TLS files from an optional Secret, read-only, on a mount point of its own.
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v.get("secret").is_some())
        .expect("a Secret volume for etcd's TLS files");
    assert_eq!(volume["secret"]["optional"], true, "the Secret is optional");
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = mounts
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the Secret's volume is mounted");
    assert_eq!(mount["readOnly"], true);
    let tls_dir = Path::new(mount["mountPath"].as_str().unwrap());
    for m in mounts {
        let other = Path::new(m["mountPath"].as_str().unwrap());
        assert!(
            other == tls_dir || !tls_dir.starts_with(other),
            "{} is inside the mount at {}",
            tls_dir.display(),
            other.display()
        );
    }

    // The commands in the comments create what the DaemonSet reads: every ConfigMap key with
    // a value the agent accepts, certificate paths in the Secret's mount, Secret keys that are
    // the files named.
    let ds_text = read(&path);
    let words: Vec<&str> = ds_text
        .split_whitespace()
        .map(|w| w.trim_end_matches('\\'))
        .collect();
    let secret = volume["secret"]["secretName"].as_str().unwrap();
    assert!(
        ds_text.contains(&format!("create secret generic {secret}")),
        "no command that creates {secret}"
    );
    assert!(
        ds_text.contains(&format!("create configmap {fleet_cm}")),
        "no command that creates {fleet_cm}"
    );
    let secret_files: BTreeSet<&str> = words
        .iter()
        .filter_map(|w| w.strip_prefix("--from-file="))
        .map(|f| f.split('=').next().unwrap())
        .collect();
    let mut vars = BTreeMap::new();
    for literal in words
        .iter()
        .filter_map(|w| w.strip_prefix("--from-literal="))
    {
        let (key, value) = literal.split_once('=').expect("--from-literal=KEY=VALUE");
        let var = keys
            .get(key)
            .unwrap_or_else(|| panic!("the DaemonSet reads no key {key} of {fleet_cm}"));
        if key != "etcd" {
            let file = Path::new(value);
            assert_eq!(file.parent(), Some(tls_dir), "{key}={value}");
            let name = file.file_name().unwrap().to_str().unwrap();
            assert!(
                secret_files.contains(name),
                "{key}={value}: {secret} has no {name}"
            );
        }
        vars.insert((*var).to_owned(), value.to_owned());
    }
    assert_eq!(
        vars.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        keys.values().copied().collect(),
        "the example ConfigMap sets every key"
    );
    vars.insert("BREAKWATER_NODE_NAME".into(), "node-1.example".into());
    check_fleet_values(&vars, "the DaemonSet's example ConfigMap");
}
