//! A gRPC client of the agent over its unix socket (breakwater-proto's generated client, as the
//! CLI's), for what a CLI process would distort: `ListServices`' latency without a process
//! start-up or JSON printing, and `WatchConnections`' throughput without a printer's.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use breakwater_proto::v1::{
    agent_client::AgentClient, GetAgentInfoRequest, ListServicesRequest, WatchConnectionsRequest,
};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// 10,000 services are ~1 MB; room for more without tonic's 4 MiB default refusing it.
const MAX_RESPONSE: usize = 64 << 20;

pub struct Api {
    rt: tokio::runtime::Runtime,
    client: AgentClient<Channel>,
}

impl Api {
    /// Connects to the agent's socket; one connection (HTTP/2) for every call after it.
    pub fn connect(socket: &Path) -> Result<Self> {
        // One worker: a stream is read there while the caller's thread runs a loop.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting a tokio runtime")?;
        let path = socket.to_owned();
        let channel = rt
            .block_on(
                // The URI is required by tonic but unused: the connector dials the socket.
                Endpoint::from_static("http://agent.invalid").connect_with_connector(
                    tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }),
                ),
            )
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let client = AgentClient::new(channel).max_decoding_message_size(MAX_RESPONSE);
        Ok(Self { rt, client })
    }

    /// One `ListServices` call: its wall time, and the services it returned.
    pub fn list_services(&self) -> Result<(Duration, usize)> {
        let mut client = self.client.clone();
        let start = Instant::now();
        let services = self
            .rt
            .block_on(client.list_services(ListServicesRequest {}))
            .context("ListServices")?
            .into_inner()
            .services
            .len();
        Ok((start.elapsed(), services))
    }

    /// A kernel counter of `GetAgentInfo` (e.g. `audit_lost`).
    pub fn counter(&self, name: &str) -> Result<u64> {
        let mut client = self.client.clone();
        let info = self
            .rt
            .block_on(client.get_agent_info(GetAgentInfoRequest {}))
            .context("GetAgentInfo")?
            .into_inner();
        info.counters
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.value)
            .with_context(|| format!("no counter {name} in GetAgentInfo"))
    }

    /// Subscribes to `WatchConnections` (every service) and counts what it delivers, on the
    /// runtime's worker, until dropped.
    pub fn watch(&self) -> Result<Watch> {
        let mut client = self.client.clone();
        let mut stream = self
            .rt
            .block_on(client.watch_connections(WatchConnectionsRequest {
                service: String::new(),
            }))
            .context("WatchConnections")?
            .into_inner();
        let counts = Arc::new(Counts::default());
        let base = Instant::now();
        let c = counts.clone();
        let task = self.rt.spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                c.events.fetch_add(1, Ordering::Relaxed);
                c.lost.fetch_add(event.lost, Ordering::Relaxed);
                c.last_ns
                    .store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            c.ended.store(1, Ordering::Relaxed);
        });
        Ok(Watch { counts, base, task })
    }
}

#[derive(Default)]
struct Counts {
    events: AtomicU64,
    /// The `lost` of every event: what this subscriber missed just before it (it fell behind,
    /// or the kernel's ring buffer was full).
    lost: AtomicU64,
    /// When the last event came, since `Watch::base`.
    last_ns: AtomicU64,
    ended: AtomicU64,
}

/// A `WatchConnections` subscription being counted.
pub struct Watch {
    counts: Arc<Counts>,
    base: Instant,
    task: tokio::task::JoinHandle<()>,
}

/// Events delivered and lost so far, and when the last came.
#[derive(Clone, Copy)]
pub struct Tally {
    pub events: u64,
    pub lost: u64,
    pub last: Instant,
}

impl Watch {
    pub fn tally(&self) -> Tally {
        let c = &self.counts;
        Tally {
            events: c.events.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            last: self.base + Duration::from_nanos(c.last_ns.load(Ordering::Relaxed)),
        }
    }

    /// Waits until no event came for `quiet` (at most `timeout`); the tally then.
    pub fn settle(&self, quiet: Duration, timeout: Duration) -> Result<Tally> {
        let deadline = Instant::now() + timeout;
        let mut last = self.tally();
        let mut since = Instant::now();
        loop {
            if self.counts.ended.load(Ordering::Relaxed) != 0 {
                bail!("the WatchConnections stream ended");
            }
            std::thread::sleep(Duration::from_millis(20));
            let now = self.tally();
            if now.events != last.events {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the WatchConnections stream still delivered events after {}s",
                    timeout.as_secs()
                );
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
