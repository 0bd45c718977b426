//! Remote access and the fleet CLI: mutual TLS with certificates made here (rcgen), the
//! writers' allow-list over TLS and on the unix socket (SO_PEERCRED), the insecure listener,
//! and one command fanned out to several agents.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use breakwater_proto::v1::{self as pb, agent_client::AgentClient};
use breakwater_tests::{agent_bin, closed_port, require_root, serial, Agent};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code,
};

const WRITER: &str = "spiffe://breakwater.test/ops";

/// A free TCP port on 127.0.0.1 (bound once, then released).
fn free_port() -> u16 {
    closed_port()
}

/// A certificate and its key, written as PEM files.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1, a client on the writers' list, a trusted client
/// that is not, and a client of another CA that carries the writer's very name.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: Pem,
    writer: Pem,
    reader: Pem,
    rogue: Pem,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn leaf(
    dir: &Path,
    file: &str,
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Pem {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer).unwrap();
    let pem = Pem {
        cert: dir.join(format!("{file}.pem")),
        key: dir.join(format!("{file}.key")),
    };
    std::fs::write(&pem.cert, cert.pem()).unwrap();
    std::fs::write(&pem.key, key.serialize_pem()).unwrap();
    pem
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (params, key, ca_pem) = ca("breakwater test CA");
        let ca_path = d.join("ca.pem");
        std::fs::write(&ca_path, ca_pem).unwrap();
        let issuer = Issuer::new(params, key);
        let uri = |u: &str| SanType::URI(u.try_into().unwrap());
        let dns = |n: &str| SanType::DnsName(n.try_into().unwrap());
        let server = leaf(
            d,
            "server",
            &issuer,
            "breakwater agent",
            vec![SanType::IpAddress([127, 0, 0, 1].into())],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let writer = leaf(
            d,
            "writer",
            &issuer,
            "ops",
            vec![uri(WRITER)],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let reader = leaf(
            d,
            "reader",
            &issuer,
            "reader",
            vec![dns("reader.breakwater.test")],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (rogue_params, rogue_key, _) = ca("another CA");
        let rogue = leaf(
            d,
            "rogue",
            &Issuer::new(rogue_params, rogue_key),
            "ops",
            vec![uri(WRITER)],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Self {
            _dir: dir,
            ca: ca_path,
            server,
            writer,
            reader,
            rogue,
        }
    }
}

/// The service every agent here has, with a breaker, on a port where nothing listens.
fn service_config(port: u16) -> String {
    format!(
        "[[service]]\nname = \"svc\"\nendpoints = [\"127.0.0.1:{port}\"]\n\
         [service.breaker]\npreset = \"gobreaker\"\n"
    )
}

/// A gRPC client over mutual TLS (or TLS without a client certificate).
fn tls_client(
    agent: &Agent,
    port: u16,
    ca: &Path,
    client: Option<&Pem>,
) -> Result<AgentClient<Channel>, String> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some(p) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&p.cert).unwrap(),
            std::fs::read(&p.key).unwrap(),
        ));
    }
    agent.block_on(async move {
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(AgentClient::new(channel))
    })
}

fn breaker_state(agent: &Agent, service: &str) -> pb::BreakerState {
    let mut c = agent.client();
    let b = agent
        .block_on(c.get_breaker(pb::GetBreakerRequest {
            service: service.into(),
        }))
        .expect("GetBreaker")
        .into_inner()
        .breaker
        .expect("a breaker");
    pb::BreakerState::try_from(b.state).unwrap()
}

fn service_names(agent: &Agent) -> Vec<String> {
    let mut c = agent.client();
    agent
        .block_on(c.list_services(pb::ListServicesRequest {}))
        .expect("ListServices")
        .into_inner()
        .services
        .into_iter()
        .map(|s| s.name)
        .collect()
}

fn cli(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("run CLI")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn mutual_tls_lets_everyone_trusted_read_and_only_writers_change() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let pki = Pki::new();
    let port = free_port();
    let p = |path: &Path| path.display().to_string();
    let config = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         tls_client_ca = \"{}\"\n[agent.authz]\nwriters = [\"{WRITER}\"]\n{}",
        p(&pki.server.cert),
        p(&pki.server.key),
        p(&pki.ca),
        service_config(closed_port())
    );
    let agent = Agent::start_with_config(Some(&config));
    let list = |c: &mut AgentClient<Channel>| {
        agent
            .block_on(c.list_services(pb::ListServicesRequest {}))
            .map(|r| r.into_inner())
    };

    // No client certificate, or one from another CA: refused in the handshake (or on the
    // first call, TLS 1.3 lets the client finish first).
    for (who, client) in [("no certificate", None), ("another CA", Some(&pki.rogue))] {
        let r = tls_client(&agent, port, &pki.ca, client)
            .and_then(|mut c| list(&mut c).map_err(|s| format!("{s:?}")));
        assert!(r.is_err(), "{who}: served {r:?}");
        let mut c = match tls_client(&agent, port, &pki.ca, client) {
            Ok(c) => c,
            Err(_) => continue,
        };
        let trip = agent.block_on(c.trip(pb::TripRequest {
            service: "svc".into(),
            ..Default::default()
        }));
        assert!(trip.is_err(), "{who}: trip answered");
    }
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);

    // Trusted, not a writer: reads, but every change is PermissionDenied and changes nothing.
    let mut reader = tls_client(&agent, port, &pki.ca, Some(&pki.reader)).expect("reader");
    assert_eq!(list(&mut reader).expect("reader lists").services.len(), 1);
    agent
        .block_on(reader.get_agent_info(pb::GetAgentInfoRequest {}))
        .expect("reader reads info");
    let denied = agent
        .block_on(reader.trip(pb::TripRequest {
            service: "svc".into(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("DNS reader.breakwater.test")
            && denied.message().contains("/breakwater.v1.Agent/Trip"),
        "{}",
        denied.message()
    );
    let denied = agent
        .block_on(reader.put_service(pb::PutServiceRequest {
            name: "sneaky".into(),
            endpoints: vec!["127.0.0.1:9".into()],
        }))
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
    assert_eq!(service_names(&agent), ["svc"]);

    // The writer: puts a service, sets its policy, trips it.
    let mut writer = tls_client(&agent, port, &pki.ca, Some(&pki.writer)).expect("writer");
    agent
        .block_on(writer.put_service(pb::PutServiceRequest {
            name: "svc2".into(),
            endpoints: vec![format!("127.0.0.1:{}", closed_port())],
        }))
        .expect("writer puts a service");
    agent
        .block_on(writer.set_policy(pb::SetPolicyRequest {
            service: "svc2".into(),
            preset: "nginx".into(),
            ..Default::default()
        }))
        .expect("writer sets a policy");
    agent
        .block_on(writer.trip(pb::TripRequest {
            service: "svc2".into(),
            ..Default::default()
        }))
        .expect("writer trips");
    assert_eq!(breaker_state(&agent, "svc2"), pb::BreakerState::Open);
    assert!(
        agent.log().contains(&format!(
            "change requested by client certificate [URI {WRITER}"
        )),
        "the change is logged with who made it:\n{}",
        agent.log()
    );

    // The CLI, over https.
    let https = format!("https://127.0.0.1:{port}");
    let as_client = |who: &Pem, args: &[&str]| {
        let mut all = vec![
            "--agent",
            &https,
            "--tls-ca",
            pki.ca.to_str().unwrap(),
            "--tls-cert",
            who.cert.to_str().unwrap(),
            "--tls-key",
            who.key.to_str().unwrap(),
        ];
        all.extend(args);
        cli(&all)
    };
    let out = as_client(&pki.reader, &["services", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 2);
    let out = as_client(&pki.reader, &["trip", "svc"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("permission denied"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
    let out = as_client(&pki.writer, &["trip", "svc", "--reason", "remote test"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("tripped svc"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Open);
    let out = as_client(&pki.writer, &["reset", "svc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
    // Without a client certificate the CLI fails (exit 1) and changes nothing.
    let out = cli(&[
        "--agent",
        &https,
        "--tls-ca",
        pki.ca.to_str().unwrap(),
        "trip",
        "svc",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
    // https:// without --tls-ca is bad input.
    let out = cli(&["--agent", &https, "services"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--tls-ca"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn listen_without_certificates_is_refused_at_start() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&[
        "agent",
        "--socket",
        dir.path().join("a.sock").to_str().unwrap(),
        "--pin-dir",
        "/sys/fs/bpf/breakwater-never-made",
        "--listen",
        "127.0.0.1:1",
        "--tls-cert",
        "/nonexistent.pem",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("needs agent.tls_key, agent.tls_client_ca"),
        "{}",
        text(&out.stderr)
    );
    assert!(!Path::new("/sys/fs/bpf/breakwater-never-made").exists());
}

/// The CLI binary where any user can run it.
fn public_bin(dir: &Path) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("breakwater");
    std::fs::copy(agent_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// The CLI as another user and group, without supplementary groups (util-linux `setpriv`).
fn cli_as(bin: &Path, uid: u32, gid: u32, agent: &Agent, args: &[&str]) -> Output {
    cli_as_member(bin, uid, gid, &[], agent, args)
}

/// As [`cli_as`], with supplementary `groups`.
fn cli_as_member(
    bin: &Path,
    uid: u32,
    gid: u32,
    groups: &[u32],
    agent: &Agent,
    args: &[&str],
) -> Output {
    let groups = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        format!("--groups={}", list.join(","))
    };
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(groups)
        .arg(bin)
        .arg("--agent")
        .arg(agent.address())
        .args(args)
        .output()
        .expect("run setpriv (Debian package util-linux)")
}

#[test]
fn unix_socket_opened_up_lets_anyone_read_and_only_writer_uids_and_gids_change() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let config = format!(
        "[agent]\nsocket_mode = \"0666\"\n[agent.authz]\nwriter_gids = [4242]\n{}",
        service_config(closed_port())
    );
    let agent = Agent::start_with_config(Some(&config));
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    // The harness's directory is private: let others reach the socket.
    let sock_dir = agent.socket.parent().unwrap();
    std::fs::set_permissions(sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = public_bin(bin_dir.path());

    let out = cli_as(&bin, 65534, 65534, &agent, &["services", "-o", "json"]);
    assert!(out.status.success(), "nobody reads: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"][0]["name"], "svc");
    for args in [
        &["trip", "svc"][..],
        &["service", "put", "x", "--endpoint", "127.0.0.1:9"],
        &["policy", "clear", "svc"],
    ] {
        let out = cli_as(&bin, 65534, 65534, &agent, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains("permission denied: uid 65534 gid 65534") && err.contains("may not call"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
    assert_eq!(service_names(&agent), ["svc"]);

    // A writer by gid, then root (uid 0, the default list).
    let out = cli_as(&bin, 65534, 4242, &agent, &["trip", "svc"]);
    assert!(
        out.status.success(),
        "gid 4242 trips: {}",
        text(&out.stderr)
    );
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Open);
    let out = agent.cli(&["reset", "svc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
    assert!(
        agent.log().contains("change requested by uid 0 gid 0"),
        "{}",
        agent.log()
    );

    // A supplementary group on the list is as good as the primary gid; one off it is not.
    let out = cli_as_member(&bin, 65534, 65534, &[4243], &agent, &["trip", "svc"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("permission denied: uid 65534 gid 65534 groups [4243]"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
    let out = cli_as_member(&bin, 65534, 65534, &[4242, 4243], &agent, &["trip", "svc"]);
    assert!(
        out.status.success(),
        "supplementary group 4242 trips: {}",
        text(&out.stderr)
    );
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Open);
    assert!(
        agent
            .log()
            .contains("change requested by uid 65534 gid 65534 groups [4242, 4243]"),
        "{}",
        agent.log()
    );
}

#[test]
fn insecure_listener_serves_reads_only_and_warns() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start_with(
        Some(&service_config(closed_port())),
        &["--insecure-listen", &addr],
    );
    let log = agent.log();
    assert!(
        log.contains("WARN") && log.contains("WITHOUT TLS") && log.contains(&addr),
        "{log}"
    );
    let http = format!("http://{addr}");
    let out = cli(&["--agent", &http, "services", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"][0]["name"], "svc");
    let out = cli(&["--agent", &http, "info"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = cli(&["--agent", &http, "trip", "svc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unauthenticated TCP client"),
        "{}",
        text(&out.stderr)
    );
    let mut c = agent.block_on(async {
        AgentClient::new(
            Endpoint::from_shared(http.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    });
    let denied = agent
        .block_on(c.delete_service(pb::DeleteServiceRequest { name: "svc".into() }))
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(service_names(&agent), ["svc"]);
    assert_eq!(breaker_state(&agent, "svc"), pb::BreakerState::Closed);
}

#[test]
fn one_command_fans_out_to_every_agent() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let config = service_config(closed_port());
    let agents: Vec<Agent> = (0..3)
        .map(|_| Agent::start_with_config(Some(&config)))
        .collect();
    let addrs: Vec<String> = agents.iter().map(Agent::address).collect();
    let dead = "unix:///nonexistent/x.sock";
    let mut args: Vec<&str> = Vec::new();
    for a in addrs.iter().map(String::as_str).chain([dead]) {
        args.extend(["--agent", a]);
    }

    // A table with a NODE column; the unreachable agent on stderr; exit 1.
    let mut services = args.clone();
    services.push("services");
    let out = cli(&services);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines[0].trim_start().starts_with("NODE"), "{stdout}");
    assert!(lines[0].contains("SERVICE"), "{stdout}");
    for a in &addrs {
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains(a.as_str()) && l.contains("svc"))
                .count(),
            1,
            "{a}: {stdout}"
        );
    }
    assert_eq!(lines.len(), 4, "{stdout}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(dead) && stderr.contains("cannot reach"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 4 agents failed"), "{stderr}");

    // JSON: every node, with its result or its error.
    services.extend(["-o", "json"]);
    let out = cli(&services);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    for (n, a) in nodes.iter().zip(&addrs) {
        assert_eq!(n["node"], a.as_str());
        assert_eq!(n["result"]["services"][0]["name"], "svc");
        assert!(n.get("error").is_none());
    }
    assert_eq!(nodes[3]["node"], dead);
    assert!(nodes[3]["error"].as_str().unwrap().contains("cannot reach"));

    // An agents file with names and comments; trip on all three.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents");
    std::fs::write(
        &file,
        format!(
            "# the fleet\nalpha={}\n\n  beta = {}   # second\ngamma={}\n",
            addrs[0], addrs[1], addrs[2]
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = cli(&["--agents-file", f, "services"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains("svc")),
            "{name}: {stdout}"
        );
    }
    let out = cli(&["--agents-file", f, "trip", "svc", "--reason", "fleet"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("tripped svc"), "{stdout}");
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains("open (forced)")),
            "{name}: {stdout}"
        );
    }
    for agent in &agents {
        assert_eq!(breaker_state(agent, "svc"), pb::BreakerState::Open);
    }
    // Reset everywhere, as JSON: one result per node.
    let out = cli(&["--agents-file", f, "reset", "svc", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    for agent in &agents {
        assert_eq!(breaker_state(agent, "svc"), pb::BreakerState::Closed);
    }
    // Exactly one agent: the usual output, no nodes array.
    let out = cli(&["--agent", &addrs[0], "services", "-o", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"][0]["name"], "svc");
}

#[test]
fn a_user_without_access_to_the_socket_is_told_who_may_use_it() {
    let _s = serial();
    if !require_root() {
        return;
    }
    // The default socket: root's alone (0600).
    let agent = Agent::start_with_config(Some(&service_config(closed_port())));
    let sock_dir = agent.socket.parent().unwrap();
    std::fs::set_permissions(sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = public_bin(bin_dir.path());
    let out = cli_as(&bin, 65534, 65534, &agent, &["services"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        err.contains("the agent is running") && err.contains("(mode 600) is open to root only"),
        "{err}"
    );
    assert!(err.contains("socket_group"), "{err}");
    assert!(
        !err.contains("start it with"),
        "the agent runs: starting it is no advice: {err}"
    );
}

/// The agent's TLS files, replaced as cert-manager and kubelet do: each new file written beside
/// and renamed over the old one.
struct Live {
    dir: tempfile::TempDir,
}

impl Live {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, content: &[u8]) {
        let tmp = self.path(&format!(".{name}.new"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }

    /// `pki`'s server certificate, key and CA (as the client CA) over the files.
    fn install(&self, pki: &Pki) {
        self.write("tls.crt", &std::fs::read(&pki.server.cert).unwrap());
        self.write("tls.key", &std::fs::read(&pki.server.key).unwrap());
        self.write("ca.crt", &std::fs::read(&pki.ca).unwrap());
    }

    /// A config that serves TLS on `port` with these files.
    fn config(&self, port: u16) -> String {
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             tls_client_ca = \"{}\"\n[agent.authz]\nwriters = [\"{WRITER}\"]\n{}",
            self.path("tls.crt").display(),
            self.path("tls.key").display(),
            self.path("ca.crt").display(),
            service_config(closed_port())
        )
    }
}

fn reload(agent: &Agent) -> Result<pb::ReloadConfigResponse, tonic::Status> {
    let mut client = agent.client();
    agent
        .block_on(client.reload_config(pb::ReloadConfigRequest {}))
        .map(|r| r.into_inner())
}

fn list(agent: &Agent, c: &mut AgentClient<Channel>) -> Result<usize, String> {
    agent
        .block_on(c.list_services(pb::ListServicesRequest {}))
        .map(|r| r.into_inner().services.len())
        .map_err(|s| format!("{s:?}"))
}

/// A new client trusting `ca` with `who`'s certificate lists services.
fn new_client_lists(agent: &Agent, port: u16, ca: &Path, who: &Pem) -> Result<usize, String> {
    tls_client(agent, port, ca, Some(who)).and_then(|mut c| list(agent, &mut c))
}

#[test]
fn certificates_rotate_on_reload_and_when_the_files_change_keeping_connections() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let (one, two, three) = (Pki::new(), Pki::new(), Pki::new());
    let live = Live::new();
    live.install(&one);
    let port = free_port();
    let agent = Agent::start_with_config(Some(&live.config(port)));
    let mut held = tls_client(&agent, port, &one.ca, Some(&one.reader)).expect("first client");
    assert_eq!(list(&agent, &mut held), Ok(1));
    // A stream open across every rotation below: it must still deliver at the end.
    let mut events = agent
        .block_on(held.watch_breaker_events(pb::WatchBreakerEventsRequest {
            service: "svc".into(),
        }))
        .expect("watch")
        .into_inner();

    // The files change, no reload: new clients of the new CAs get in once the agent saw them.
    live.install(&two);
    let served = breakwater_tests::eventually(std::time::Duration::from_secs(30), || {
        new_client_lists(&agent, port, &two.ca, &two.reader).ok()
    });
    assert_eq!(served, Some(1), "new files not served\n{}", agent.log());
    assert!(
        agent.log().contains("now in use: subject"),
        "the rotation is logged:\n{}",
        agent.log()
    );
    // A client that trusts only the old server CA, and one whose certificate chains only to
    // the old client CA, are refused.
    let r = new_client_lists(&agent, port, &one.ca, &one.reader);
    assert!(r.is_err(), "old server CA: {r:?}");
    let r = new_client_lists(&agent, port, &two.ca, &one.reader);
    assert!(r.is_err(), "old client CA: {r:?}");
    // The connection made before goes on (a new one would fail: its client trusts only the
    // old CA).
    assert_eq!(list(&agent, &mut held), Ok(1), "held connection dropped");

    // The files change and a reload: in use when it answers.
    live.install(&three);
    reload(&agent).expect("reload");
    assert_eq!(
        new_client_lists(&agent, port, &three.ca, &three.writer),
        Ok(1)
    );
    let r = new_client_lists(&agent, port, &three.ca, &two.reader);
    assert!(r.is_err(), "client CA two after the reload: {r:?}");

    // Bad files: the reload says why and changes nothing; the files in use stay.
    live.write("tls.key", &std::fs::read(&one.server.key).unwrap());
    let e = reload(&agent).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(&format!(
            "the key {} does not match the certificate {}",
            live.path("tls.key").display(),
            live.path("tls.crt").display()
        )) && e.message().ends_with("the running config stays"),
        "{}",
        e.message()
    );
    live.write("tls.key", &std::fs::read(&three.server.key).unwrap());
    live.write("ca.crt", b"not a certificate\n");
    let e = reload(&agent).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(&format!(
            "the client CA (agent.tls_client_ca, --tls-client-ca) {} holds no PEM certificate",
            live.path("ca.crt").display()
        )),
        "{}",
        e.message()
    );
    let warned = breakwater_tests::eventually(std::time::Duration::from_secs(30), || {
        agent
            .log()
            .contains("cannot be used; the ones in use stay")
            .then_some(())
    });
    assert!(warned.is_some(), "no warning:\n{}", agent.log());
    assert_eq!(
        new_client_lists(&agent, port, &three.ca, &three.reader),
        Ok(1),
        "the last good files stopped serving"
    );

    // The stream opened before the first rotation still delivers.
    let mut root = agent.client();
    agent
        .block_on(root.trip(pb::TripRequest {
            service: "svc".into(),
            reason: "rotation test".into(),
            ..Default::default()
        }))
        .expect("trip");
    let event = agent
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), events.message()).await
        })
        .expect("an event within 10 s")
        .expect("the stream is alive")
        .expect("an event");
    assert_eq!(event.service, "svc");
    assert_eq!(event.reason, "rotation test");
    assert_eq!(list(&agent, &mut held), Ok(1));
}

fn plain_client(agent: &Agent, port: u16) -> Result<AgentClient<Channel>, String> {
    agent.block_on(async move {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(AgentClient::new(channel))
    })
}

#[test]
fn a_reload_moves_the_listeners_and_keeps_their_connections() {
    let _s = serial();
    if !require_root() {
        return;
    }
    let pki = Pki::new();
    let live = Live::new();
    live.install(&pki);
    let (tls1, tls2, plain1, plain2) = (free_port(), free_port(), free_port(), free_port());
    let config = live.config(tls1).replacen(
        "[agent.authz]",
        &format!("insecure_listen = \"127.0.0.1:{plain1}\"\n[agent.authz]"),
        1,
    );
    let agent = Agent::start_with_config(Some(&config));
    let mut held_tls = tls_client(&agent, tls1, &pki.ca, Some(&pki.reader)).expect("TLS");
    let mut held_plain = plain_client(&agent, plain1).expect("plain");
    assert_eq!(list(&agent, &mut held_tls), Ok(1));
    assert_eq!(list(&agent, &mut held_plain), Ok(1));

    let path = agent.config_path().unwrap().to_owned();
    let file = std::fs::read_to_string(&path).unwrap();
    let moved = file
        .replace(&format!(":{tls1}\""), &format!(":{tls2}\""))
        .replace(&format!(":{plain1}\""), &format!(":{plain2}\""));
    std::fs::write(&path, &moved).unwrap();
    let r = reload(&agent).expect("reload");
    assert_eq!(
        r.applied,
        [
            format!("agent.listen: now 127.0.0.1:{tls2}"),
            format!("agent.insecure_listen: now 127.0.0.1:{plain2}")
        ],
        "{r:?}"
    );
    assert!(r.pending_restart.is_empty(), "{r:?}");
    // The new addresses serve at once.
    assert_eq!(new_client_lists(&agent, tls2, &pki.ca, &pki.reader), Ok(1));
    let mut plain = plain_client(&agent, plain2).expect("new plain address");
    assert_eq!(list(&agent, &mut plain), Ok(1));
    // The old ones refuse new connections (their sockets close as their tasks end).
    for port in [tls1, plain1] {
        let refused = breakwater_tests::eventually(std::time::Duration::from_secs(10), || {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
                _ => None,
            }
        });
        assert!(refused.is_some(), "127.0.0.1:{port} still accepts");
    }
    // What they accepted goes on.
    assert_eq!(list(&agent, &mut held_tls), Ok(1));
    assert_eq!(list(&agent, &mut held_plain), Ok(1));
    // The agent's own destinations, never refused, moved with them.
    let out = agent.cli(&[
        "service",
        "put",
        "cover",
        "--endpoint",
        &format!("127.0.0.1:{tls2}"),
        "--endpoint",
        &format!("127.0.0.1:{tls1}"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("127.0.0.1:{tls2} (the agent's API (TLS))"))
            && !said.contains(&format!("127.0.0.1:{tls1} (the agent's")),
        "{said}"
    );
    assert!(agent.cli(&["service", "delete", "cover"]).status.success());

    // An address that cannot be bound refuses the whole reload: the service added beside it
    // is not applied, and the listener stays where it is.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    std::fs::write(
        &path,
        format!(
            "{}\n[[service]]\nname = \"svc2\"\nendpoints = [\"127.0.0.1:{}\"]\n",
            moved.replace(&format!(":{tls2}\""), &format!(":{taken_port}\"")),
            closed_port()
        ),
    )
    .unwrap();
    let e = reload(&agent).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(&format!(
            "cannot listen on 127.0.0.1:{taken_port} (agent.listen)"
        )),
        "{}",
        e.message()
    );
    assert_eq!(service_names(&agent), ["svc"]);
    assert_eq!(new_client_lists(&agent, tls2, &pki.ca, &pki.reader), Ok(1));
}
