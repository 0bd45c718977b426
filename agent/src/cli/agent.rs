//! `breakwater agent`: load, attach, serve until SIGINT/SIGTERM.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio_stream::StreamExt as _;
use tracing::{error, info, warn};

use super::{AgentArgs, CliError, OnUnsupportedKernel};
use crate::{
    api::{authz::Authz, health::Health, serve, AgentService},
    config::{Config, Overrides, RemoteOverrides},
    core::{
        features::{Features, Status},
        protected, Core, Kernel as _,
    },
    ebpf::{breaker, events, Hooks, Kernel, LoadError},
    netns,
};

/// The log format the agent runs with, for [`say`].
static LOG_FORMAT: std::sync::OnceLock<crate::config::LogFormat> = std::sync::OnceLock::new();

/// A line for people on stderr (where to reach the agent, why it waits), beside the log: left
/// out when the log is JSON, so that every line of stderr is a JSON object.
fn say(line: std::fmt::Arguments) {
    if LOG_FORMAT.get() != Some(&crate::config::LogFormat::Json) {
        eprintln!("{line}");
    }
}

/// The agent's log on stderr: plain text, coloured only when stderr is a terminal (not a file,
/// journald or `kubectl logs`), or JSON.
fn init_logging(format: crate::config::LogFormat) {
    use std::io::IsTerminal as _;
    let _ = LOG_FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        crate::config::LogFormat::Text => log.with_ansi(std::io::stderr().is_terminal()).init(),
        crate::config::LogFormat::Json => log.json().with_ansi(false).init(),
    }
}

/// glibc's allocator tuned for a long-running agent, before any thread starts. With its defaults
/// (an arena per thread up to 8 per CPU, and mmap and trim thresholds that rise after every large
/// free) each arena kept the peak of the whole-map reads that ran on it: the soak's agent grew
/// from 79 to 100 MB over a 10 MB heap; with these it stays near 35 MB (README, "Soak").
/// `MALLOC_*` variables or `GLIBC_TUNABLES` in the environment win.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        const THRESHOLD: libc::c_int = 128 * 1024;
        const ENV: [&str; 4] = [
            "GLIBC_TUNABLES",
            "MALLOC_ARENA_MAX",
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_",
        ];
        if ENV.iter().any(|k| std::env::var_os(k).is_some()) {
            return;
        }
        for (param, value) in [
            (libc::M_ARENA_MAX, 2),
            // Fixed thresholds: large buffers go back to the system when freed.
            (libc::M_MMAP_THRESHOLD, THRESHOLD),
            (libc::M_TRIM_THRESHOLD, THRESHOLD),
        ] {
            // SAFETY: mallopt only sets allocator parameters; no thread has started yet.
            unsafe { libc::mallopt(param, value) };
        }
    }
}

pub async fn run(args: AgentArgs) -> Result<(), CliError> {
    // The config first, for its log format; its errors are printed by the caller.
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    init_logging(args.log_format.unwrap_or(config.agent.log_format));
    let overrides = Overrides {
        pin_dir: args.pin_dir.clone(),
        scope: args.scope.clone(),
        remote: RemoteOverrides {
            socket_mode: args.socket_mode.clone(),
            listen: args.listen.clone(),
            insecure_listen: args.insecure_listen.clone(),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            tls_client_ca: args.tls_client_ca.clone(),
        },
        health_listen: args.health_listen.clone(),
        metrics_listen: args.metrics_listen.clone(),
        disable_features: args.disable_features.clone(),
        etcd: args.etcd.clone(),
        node_name: args.node_name.clone(),
        etcd_ca: args.etcd_ca.clone(),
        etcd_cert: args.etcd_cert.clone(),
        etcd_key: args.etcd_key.clone(),
    };
    overrides.apply(&mut config)?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| config.agent.socket.clone());
    if !nix::unistd::geteuid().is_root() {
        return Err(CliError::Usage(
            "breakwater agent must run as root (it loads eBPF programs)".into(),
        ));
    }
    // Validates the config's services before anything is loaded.
    config.service_table()?;
    // The fleet's settings too (its TLS files are read now).
    let fleet = crate::fleet::Settings::from_config(&config.fleet)?;
    serve::ensure_free(&socket).map_err(anyhow::Error::from)?;
    // Certificates are read and TCP ports bound before anything is loaded: a bad file or a
    // taken port stops the start cleanly.
    let health = Health::new().await;
    let (remote, incoming) = remote_listeners(&config, fleet.as_ref())?;
    serve_health(incoming.health, &health);
    // The agent's own control paths: never refused by a breaker, from before the first one.
    let own = remote.own(None);

    let pin_dir = config.agent.pin_dir.clone();
    let hooks = if args.empty_hooks {
        warn!("--empty-hooks: every hook returns at once; nothing is counted or enforced");
        Hooks::Empty
    } else {
        Hooks::Work
    };
    let authz = Authz::new(&config.agent.authz);
    let started = start_kernel(&config, &args, overrides, hooks, own);
    let (core, events, conn_events) = match started {
        Ok(started) => started,
        Err(CliError::UnsupportedKernel(why))
            if args.on_unsupported_kernel == OnUnsupportedKernel::Wait =>
        {
            // Everything loaded so far was dropped with the error (the pin directory's lock
            // too). Nothing will serve the API or the metrics: close their listeners, so that
            // clients and scrapers are refused at once instead of left waiting; only the health
            // listener stays.
            remote.close_api();
            return wait_unsupported(why, &health).await;
        }
        Err(e) => return Err(e),
    };
    log_features(core.kernel().features());
    // Loading parsed the kernel's BTF (megabytes) and is done with it: give the memory back.
    crate::api::trim_heap();

    let listener = serve::bind(
        &socket,
        config.agent.socket_mode()?,
        config.agent.socket_group.as_deref(),
    )
    .map_err(serve_error)?;
    let host_netns = netns::current().unwrap_or_default();
    let node = crate::fleet::NodeInfo {
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        features: core
            .kernel()
            .features()
            .iter()
            .filter(|f| f.status != crate::core::features::Status::Off)
            .map(|f| f.feature.name().to_owned())
            .collect(),
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let core = Arc::new(Mutex::new(core.into_dyn()));
    if let Some(fleet) = fleet {
        tokio::spawn(crate::fleet::run(fleet, node, core.clone()));
    }
    if let Some(ring) = conn_events {
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = events::read_connection_events(core, ring).await {
                warn!(error = %e, "connection events: reader stopped");
            }
        });
    }
    // Once a second: the audit programs write only while someone watches; pins removed by hand
    // are made again; idle destinations are reaped and the live ones counted (the ejection cap
    // is a share of them). Every
    // `connection_sweep`: the entries of connections whose socket is gone are reaped.
    let watched = Arc::downgrade(&core);
    let sweep_every = config.agent.connection_sweep()?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            let Some(core) = watched.upgrade() else { break };
            let Ok(mut guard) = core.lock() else { break };
            guard.update_audit();
            guard.restore_pins();
            if let Err(e) = guard.reap_destinations() {
                warn!(error = %e, "destination breakers: not reaped");
            }
            if last_sweep.elapsed() >= sweep_every {
                last_sweep = tokio::time::Instant::now();
                guard.sweep_connections();
            }
        }
    });
    // The TLS files are read again every few seconds: a rotated certificate is used without a
    // reload.
    let polled = remote.clone();
    crate::tls::watch_files(move || polled.poll());
    // SIGHUP reloads the config file, like ReloadConfig.
    let reloading = core.clone();
    let reloading_authz = authz.clone();
    let reloading_remote = remote.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let core = reloading.clone();
            let authz = reloading_authz.clone();
            let remote = reloading_remote.clone();
            let result = tokio::task::spawn_blocking(move || {
                core.lock()
                    .map_err(|_| crate::error::Error::Internal("core lock poisoned".into()))
                    .and_then(|mut c| crate::api::reload(&mut c, &authz, Some(&remote)))
            })
            .await;
            match result {
                Ok(Ok(_)) => info!("SIGHUP: config reloaded"),
                Ok(Err(e)) => {
                    warn!(error = %e, "SIGHUP: config not reloaded; the running one stays")
                }
                Err(e) => warn!(error = %e, "SIGHUP: reload failed"),
            }
        }
    });
    if let Some(ring) = events {
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = events::read_breaker_events(core, ring).await {
                warn!(error = %e, "breaker events: reader stopped");
            }
        });
    }
    // Connection rates for the advisor: snapshots of `opened` on a thread of their own.
    let sampled = Arc::downgrade(&core);
    std::thread::spawn(move || loop {
        std::thread::sleep(crate::core::aggregate::RateWindow::SAMPLE_EVERY);
        let Some(core) = sampled.upgrade() else { break };
        if let Ok(mut guard) = core.lock() {
            guard.sample();
        };
    });
    let metrics = crate::metrics::Metrics::new(core.clone(), config.metrics.top_destinations);
    // Like the health listener, it answers until the process ends (a reload may move it).
    tokio::spawn(crate::metrics::serve(
        incoming.metrics,
        Arc::new(metrics),
        std::future::pending(),
    ));
    let service = AgentService::new(core, authz.clone(), host_netns, args.config.clone())
        .with_remote(remote.clone());
    info!(socket = %socket.display(), services = config.services.len(), "breakwater agent ready");
    say(format_args!(
        "breakwater agent listening on unix://{0}\ntry: breakwater --agent unix://{0} destinations",
        socket.display()
    ));
    for (scheme, addr) in [
        ("https", remote.listen.local_addr()),
        ("http", remote.insecure.local_addr()),
    ] {
        if let Some(addr) = addr {
            say(format_args!(
                "breakwater agent listening on {scheme}://{addr}"
            ));
        }
    }
    // The programs are attached and every listener is bound.
    health.set_serving(true).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping_health = health.clone();
    let stopping_remote = remote.clone();
    let stopping = async move {
        shutdown().await;
        stopping_health.set_serving(false).await;
        // A moment for health watchers and probes to see it before the listeners close.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        stopping_remote.close_api();
        let _ = stop_tx.send(true);
    };
    let served = serve::serve(
        listener,
        (incoming.listen, incoming.insecure),
        &remote,
        service,
        &health,
        authz,
        async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|s| *s).await;
        },
    );
    // Graceful shutdown waits for clients to hang up; a client that keeps its connection open
    // must not keep the agent alive.
    let result = tokio::select! {
        r = served => r,
        _ = async {
            stopping.await;
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        } => Ok(()),
    };
    let _ = std::fs::remove_file(&socket);
    if args.release_on_exit {
        breaker::release(&pin_dir).context("releasing the pinned programs and maps")?;
        info!(pin_dir = %pin_dir.display(), "released: enforcement removed");
    }
    info!("breakwater agent stopped");
    result.map_err(|e| CliError::Failed(e.into()))
}

type Started = (
    Core<Kernel>,
    Option<aya::maps::RingBuf<aya::maps::MapData>>,
    Option<aya::maps::RingBuf<aya::maps::MapData>>,
);

/// Loads and attaches everything: the core, and the ring buffers of breaker and connection
/// events for their readers.
fn start_kernel(
    config: &Config,
    args: &AgentArgs,
    overrides: Overrides,
    hooks: Hooks,
    own: Vec<protected::Protected>,
) -> Result<Started, CliError> {
    let pin_dir = &config.agent.pin_dir;
    let fresh = matches!(breaker::check_layout(pin_dir), Ok(breaker::Layout::Fresh));
    let started = start_kernel_in(config, args, overrides, hooks, own);
    if fresh && matches!(started, Err(CliError::UnsupportedKernel(_))) {
        // Nothing will ever use what this start pinned on a kernel that cannot run it.
        if let Err(e) = breaker::release(pin_dir) {
            warn!(pin_dir = %pin_dir.display(), error = %e, "cannot remove the pin directory");
        }
    }
    started
}

fn start_kernel_in(
    config: &Config,
    args: &AgentArgs,
    overrides: Overrides,
    hooks: Hooks,
    own: Vec<protected::Protected>,
) -> Result<Started, CliError> {
    let disabled = config.features.disabled()?;
    let mut kernel = Kernel::load(&config.maps, &config.agent.pin_dir, hooks, &disabled)
        .map_err(|e| load_error("loading eBPF programs", e))?;
    let events = kernel.take_events();
    let conn_events = kernel.take_conn_events();
    let mut core = Core::new(kernel, config.clone(), args.config.clone(), overrides);
    core.set_own_protected(own);
    if config.fleet.enabled() {
        // In a fleet from the start: the config's quorum rules need it.
        core.fleet_link_mut();
    }
    // Services go into the kernel before attaching, so seeded sockets get theirs too.
    core.apply_config(config)?;
    core.kernel_mut()
        .attach(&disabled)
        .map_err(|e| load_error("attaching eBPF programs", e))?;
    core.kernel_mut()
        .attach_breaker(&config.breaker.scope)
        .map_err(|e| load_error("attaching the circuit breaker", e))?;
    Ok((core, events, conn_events))
}

/// A loader error as the agent exits with it: a kernel that cannot run a core feature has an
/// exit code of its own ([`super::EXIT_UNSUPPORTED_KERNEL`]); anything else is a failure.
fn load_error(what: &'static str, e: LoadError) -> CliError {
    match e {
        LoadError::Unsupported(_) => CliError::UnsupportedKernel(e.to_string()),
        // A --pin-dir (or agent.pin_dir) off bpffs is bad input.
        LoadError::NotBpffs(_) => CliError::Usage(e.to_string()),
        other => CliError::Failed(anyhow::Error::new(other).context(what)),
    }
}

/// `--on-unsupported-kernel=wait`: says why, then stays up, alive and never ready, until
/// SIGINT/SIGTERM; then exits with the unsupported kernel's code all the same.
async fn wait_unsupported(why: String, health: &Health) -> Result<(), CliError> {
    error!(
        reason = %why,
        "not running: waiting to be stopped (--on-unsupported-kernel=wait); health \"\" \
         SERVING, breakwater.v1.Agent NOT_SERVING"
    );
    say(format_args!(
        "error: {why}\nbreakwater agent: not running; waiting to be stopped"
    ));
    health.set_unsupported().await;
    shutdown().await;
    Err(CliError::UnsupportedKernel(why))
}

/// One line per feature that is not fully on: a warning if off, information if degraded.
fn log_features(features: &Features) {
    for s in features.iter() {
        let (feature, status) = (s.feature.name(), s.status.name());
        let (hook, reason) = (s.hook.as_str(), s.reason.as_str());
        match s.status {
            Status::On => {}
            Status::Degraded => info!(feature, status, hook, reason, "feature degraded"),
            Status::Off => warn!(feature, status, hook, reason, "feature off"),
        }
    }
}

/// Reads the TLS files and binds the TCP listeners the config asks for (before loading: a bad
/// file or a taken port stops the start cleanly): the API over TLS with client certificates
/// and over plain TCP, the health-only and the metrics listeners. The health listener starts
/// serving at once, NOT_SERVING until the programs are attached, and answers until the process
/// ends (NOT_SERVING while it shuts down); the others are served once the core exists.
fn remote_listeners(
    config: &Config,
    fleet: Option<&crate::fleet::Settings>,
) -> Result<(Arc<serve::Remote>, serve::Incoming), CliError> {
    let a = &config.agent;
    let (remote, incoming) = serve::Remote::new(
        config,
        fleet.map(|f| f.tls.clone()),
        fleet
            .map(crate::fleet::Settings::protected)
            .unwrap_or_default(),
    )
    .map_err(serve_error)?;
    if let Some(addr) = &a.listen {
        remote.listen.bind(addr).map_err(serve_error)?;
        info!(
            listen = %addr,
            writers = a.authz.writers.len(),
            "serving the API over TCP with TLS; client certificates required"
        );
    }
    if let Some(addr) = &a.insecure_listen {
        remote.insecure.bind(addr).map_err(serve_error)?;
        warn!(
            insecure_listen = %addr,
            insecure_writers = a.authz.insecure_writers,
            "serving the API over plain TCP WITHOUT TLS or authentication (--insecure-listen): \
             whoever reaches {addr} can read everything the agent sees{}",
            if a.authz.insecure_writers {
                " and change breakers and services (agent.authz.insecure_writers)"
            } else {
                ""
            }
        );
    }
    if let Some(addr) = &a.health_listen {
        let local = remote.health.bind(addr).map_err(serve_error)?;
        info!(health_listen = %local, "serving grpc.health.v1.Health alone over plain TCP");
        say(format_args!(
            "breakwater agent health on http://{local} (grpc.health.v1 only)"
        ));
    }
    if let Some(addr) = &config.metrics.listen {
        let local = remote.metrics.bind(addr).map_err(serve_error)?;
        info!(metrics_listen = %local, "serving Prometheus metrics");
        say(format_args!(
            "breakwater agent metrics on http://{local}/metrics"
        ));
    }
    Ok((Arc::new(remote), incoming))
}

/// Serves `grpc.health.v1` alone on the health listener's connections, even while it is off (a
/// reload may turn it on), until the process ends.
fn serve_health(incoming: tokio::sync::mpsc::Receiver<tokio::net::TcpStream>, health: &Health) {
    let health = health.clone();
    tokio::spawn(async move {
        let incoming =
            tokio_stream::wrappers::ReceiverStream::new(incoming).map(Ok::<_, std::io::Error>);
        let served =
            crate::api::health::serve_health_only(incoming, health, std::future::pending()).await;
        if let Err(e) = served {
            warn!(error = %e, "health listener stopped");
        }
    });
}

/// A bad certificate, key or group is bad input (exit 2); anything else a failure.
fn serve_error(e: serve::ServeError) -> CliError {
    match e {
        serve::ServeError::Tls(_) | serve::ServeError::NoGroup(_) => CliError::Usage(e.to_string()),
        other => CliError::Failed(other.into()),
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}

/// `breakwater uninstall`: removes what agents pinned in `pin_dir` (links and maps), which
/// ends enforcement once no agent runs.
pub fn uninstall(pin_dir: &std::path::Path) -> Result<(), CliError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(CliError::Usage(
            "breakwater uninstall must run as root".into(),
        ));
    }
    // A running agent holds its pin directory: removing its pins under it would leave it
    // enforcing with nothing pinned, and its next start without the state it kept.
    let _lock = match breaker::lock_pin_dir(pin_dir) {
        Ok(lock) => Some(lock),
        Err(crate::ebpf::LoadError::PinDirInUse(_)) => {
            return Err(CliError::Failed(anyhow::anyhow!(
                "an agent is running with pin directory {}: stop it first (it keeps enforcing while it runs)",
                pin_dir.display()
            )))
        }
        // Nothing there (or not a directory): nothing to hold, `release` says what it finds.
        Err(_) => None,
    };
    breaker::release(pin_dir)
        .with_context(|| format!("removing {}", pin_dir.display()))
        .map_err(CliError::Failed)?;
    println!("removed {}", pin_dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_kernel_has_an_exit_code_of_its_own() {
        let e = load_error(
            "attaching eBPF programs",
            LoadError::Unsupported("no BTF for the kernel (CONFIG_DEBUG_INFO_BTF)".into()),
        );
        assert_eq!(e.exit_code(), super::super::EXIT_UNSUPPORTED_KERNEL);
        assert_eq!(
            e.to_string(),
            "this kernel cannot run breakwater: no BTF for the kernel (CONFIG_DEBUG_INFO_BTF)"
        );
        let e = load_error("loading eBPF programs", LoadError::Seed("x".into()));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.to_string(),
            "loading eBPF programs: seeding from existing sockets: x"
        );
    }
}
