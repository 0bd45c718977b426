//! `breakwater agent`: load, attach, serve until SIGINT/SIGTERM.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tracing::{info, warn};

use super::{AgentArgs, CliError};
use crate::{
    api::{serve, AgentService, Core},
    config::Config,
    ebpf::{breaker, Kernel},
    netns,
    service::ServiceTable,
};

pub async fn run(args: AgentArgs) -> Result<(), CliError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &args.pin_dir {
        config.agent.pin_dir = dir.clone();
    }
    if !args.scope.is_empty() {
        config.breaker.scope = args.scope.clone();
        config.validate()?;
    }
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
    serve::ensure_free(&socket).map_err(anyhow::Error::from)?;

    let pin_dir = config.agent.pin_dir.clone();
    let mut kernel = Kernel::load(&config.maps, &pin_dir).context("loading eBPF programs")?;
    let mut services =
        ServiceTable::new(config.maps.max_services, config.maps.max_service_endpoints);
    for (id, name, endpoints) in kernel.pinned_services() {
        info!(service = name, id, "service kept from the previous agent");
        services.restore(id, &name, endpoints);
    }
    let events = kernel.take_events();
    let mut core = Core {
        kernel,
        services,
        rates: Default::default(),
        events: tokio::sync::broadcast::channel(1024).0,
    };
    // Services go into the kernel before attaching, so seeded sockets get theirs too.
    core.apply_config(&config)?;
    core.kernel.attach().context("attaching eBPF programs")?;
    core.kernel
        .attach_breaker(&config.breaker.scope)
        .context("attaching the circuit breaker")?;
    // Loading parsed the kernel's BTF (megabytes) and is done with it: give the memory back.
    crate::api::trim_heap();

    let listener = serve::bind(&socket).map_err(anyhow::Error::from)?;
    let host_netns = netns::current().unwrap_or_default();
    let core = Arc::new(Mutex::new(core));
    if let Some(ring) = events {
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::api::enforce::read_events(core, ring).await {
                warn!(error = %e, "breaker events: reader stopped");
            }
        });
    }
    // Connection rates for the advisor: snapshots of `opened` on a thread of their own.
    let sampled = Arc::downgrade(&core);
    std::thread::spawn(move || loop {
        std::thread::sleep(crate::api::RateWindow::SAMPLE_EVERY);
        let Some(core) = sampled.upgrade() else { break };
        if let Ok(mut guard) = core.lock() {
            guard.sample();
        };
    });
    let service = AgentService::new(core, host_netns, args.config.clone());
    info!(socket = %socket.display(), services = config.services.len(), "breakwater agent ready");
    eprintln!(
        "breakwater agent listening on unix://{0}\ntry: breakwater --agent unix://{0} destinations",
        socket.display()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = async move {
        shutdown().await;
        let _ = stop_tx.send(true);
    };
    let served = serve::serve(listener, service, async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|s| *s).await;
    });
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
    breaker::release(pin_dir)
        .with_context(|| format!("removing {}", pin_dir.display()))
        .map_err(CliError::Failed)?;
    println!("removed {}", pin_dir.display());
    Ok(())
}
