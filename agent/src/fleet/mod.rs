//! The fleet: desired state (services, policies, trips) shared through etcd, and each node's
//! breakers published there. See [`schema`] for the keys.
//!
//! One task per agent ([`run`]) keeps a session with etcd: it lists the desired state at a
//! revision, applies it through the core as [`Owner::Fleet`] (the local API's code path),
//! registers the node on a lease, publishes its breakers, and then follows a watch from the
//! next revision. Any error (etcd gone, lease lost, watch compacted) ends the session; the next
//! one, after a backoff, lists and applies everything again. Meanwhile the kernel keeps
//! enforcing what was last applied, trips' TTLs included.

pub mod schema;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use std::path::PathBuf;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use tracing::{info, warn};

use self::schema::{BreakerRecord, Keys, Kind, NodeRecord, Record, TripRecord};
use crate::{
    config::FleetConfig,
    core::{breakers::BreakerView, owners::Owner, Core, FleetLink},
    error::{Error, Result},
    tls::{Material, PemFile, Rotating, TlsError},
};

/// The node's lease: its keys go this long after the agent stops renewing it.
const NODE_TTL_S: i64 = 10;
/// Counters are published at most this often, and only when they changed.
const COUNTERS_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Shared = Arc<Mutex<Core>>;

/// The fleet settings the agent runs with, resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub keys: Keys,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The etcd client's TLS material (None: plain http), read again on reload and when its
    /// files change; each connect uses what is current.
    pub tls: Arc<Rotating<EtcdTls>>,
}

/// The etcd client's TLS files (`[fleet] etcd_ca`, `etcd_cert`, `etcd_key`), each optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdFiles {
    pub fn of(config: &FleetConfig) -> Self {
        Self {
            ca: config.etcd_ca.clone(),
            cert: config.etcd_cert.clone(),
            key: config.etcd_key.clone(),
        }
    }

    /// The files of `config` when it uses TLS: for https:// endpoints, and whenever a file is
    /// given.
    pub fn wanted(config: &FleetConfig) -> Option<Self> {
        let tls = config.etcd.iter().any(|u| u.starts_with("https://"))
            || config.etcd_ca.is_some()
            || config.etcd_cert.is_some();
        tls.then(|| Self::of(config))
    }
}

/// The etcd client's TLS options, built from checked files: the CA's certificates parse, the
/// client certificate parses and its key matches it.
#[derive(Clone)]
pub struct EtcdTls {
    pub options: TlsOptions,
    described: String,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.described)
    }
}

impl Material for EtcdTls {
    type Files = EtcdFiles;
    const WHAT: &'static str = "the etcd client's TLS files ([fleet] etcd_ca, etcd_cert, etcd_key)";

    fn files(files: &EtcdFiles) -> Vec<PemFile> {
        let mut out = Vec::new();
        if let Some(ca) = &files.ca {
            out.push(PemFile::new("etcd CA ([fleet] etcd_ca, --etcd-ca)", ca));
        }
        if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
            out.push(PemFile::new(
                "etcd client certificate ([fleet] etcd_cert, --etcd-cert)",
                cert,
            ));
            out.push(PemFile::new(
                "etcd client key ([fleet] etcd_key, --etcd-key)",
                key,
            ));
        }
        out
    }

    fn build(files: &EtcdFiles, contents: &[Vec<u8>]) -> std::result::Result<Self, TlsError> {
        let pems = Self::files(files);
        let mut options = TlsOptions::new();
        let mut described = Vec::new();
        let mut next = pems.iter().zip(contents);
        if files.ca.is_some() {
            let (file, pem) = next.next().expect("the CA's file");
            let roots = file.roots(pem)?;
            described.push(format!("{} CA certificate(s)", roots.len()));
            options = options.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some((cert_file, cert)), Some((key_file, key))) = (next.next(), next.next()) {
            let chain = cert_file.certificates(cert)?;
            described.push(format!(
                "client certificate {}",
                crate::tls::describe(&chain[0])
            ));
            crate::tls::check_pair(cert_file, chain, key_file, key_file.private_key(key)?)?;
            options = options.identity(Identity::from_pem(cert, key));
        }
        Ok(Self {
            options,
            described: if described.is_empty() {
                "TLS with the system's roots".into()
            } else {
                described.join(", ")
            },
        })
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

impl Settings {
    /// The etcd endpoints as destinations no breaker may refuse (each host name resolved now;
    /// one that does not resolve is left out with a warning).
    pub fn protected(&self) -> Vec<crate::core::protected::Protected> {
        use std::net::ToSocketAddrs as _;
        let mut out = Vec::new();
        for url in &self.endpoints {
            let hostport = url
                .split_once("://")
                .map_or(url.as_str(), |(_, rest)| rest)
                .trim_end_matches('/');
            match hostport.to_socket_addrs() {
                Ok(addrs) => {
                    for addr in addrs {
                        out.extend(crate::core::protected::of_address(addr, "the fleet's etcd"));
                    }
                }
                Err(e) => {
                    warn!(endpoint = url, error = %e, "etcd endpoint not resolved: not protected")
                }
            }
        }
        out
    }

    /// From `[fleet]` (flags applied); None when no etcd is configured. Reads the TLS files.
    pub fn from_config(config: &FleetConfig) -> Result<Option<Self>> {
        if !config.enabled() {
            return Ok(None);
        }
        let keys = Keys::new(config.prefix.as_deref().unwrap_or(schema::DEFAULT_PREFIX))?;
        let node = match &config.node_name {
            Some(n) => n.clone(),
            None => nix::sys::utsname::uname()
                .map_err(|e| Error::invalid(format!("node name: hostname: {e}")))?
                .nodename()
                .to_string_lossy()
                .into_owned(),
        };
        schema::check_node_name(&node)?;
        let files = EtcdFiles::wanted(config);
        let tls = Rotating::new(files.as_ref()).map_err(Error::from)?;
        Ok(Some(Self {
            endpoints: config.etcd.clone(),
            keys,
            node,
            labels: config.labels.clone(),
            tls: Arc::new(tls),
        }))
    }

    /// A new client, with the TLS material `tls` (the current one, from [`Settings::tls`]).
    async fn connect(
        &self,
        tls: Option<&EtcdTls>,
    ) -> std::result::Result<Client, etcd_client::Error> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        if let Some(tls) = tls {
            options = options.with_tls(tls.options.clone());
        }
        Client::connect(&self.endpoints, Some(options)).await
    }

    /// A client with new TLS material that etcd answers (a read of this node's key), for the
    /// session to go on with.
    async fn reconnect(&self, tls: Option<&EtcdTls>) -> std::result::Result<Client, String> {
        let mut client = self.connect(tls).await.map_err(|e| e.to_string())?;
        client
            .get(
                self.keys.node(&self.node),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(client)
    }
}

/// What this node was when it started, for its node record.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub kernel: String,
    pub features: Vec<String>,
    pub started_at: String,
}

/// What the fleet has applied on this node: the records, by name, as last applied.
#[derive(Debug, Default)]
struct Applied {
    services: BTreeMap<String, Vec<String>>,
    policies: BTreeMap<String, crate::config::BreakerConfig>,
    /// Trips by the revision of the record that made them.
    trips: BTreeMap<String, i64>,
    /// Invalid records seen, by key and revision: each is counted once.
    invalid: std::collections::BTreeSet<(String, i64)>,
}

/// What the fleet's nodes say, for the quorum rule: who is alive, who tripped what by itself.
#[derive(Debug, Default)]
struct Peers {
    nodes: BTreeSet<String>,
    /// Nodes whose breaker tripped by itself within the quorum window, by service.
    autotrips: BTreeMap<String, BTreeSet<String>>,
    /// Services this node opened because the quorum was reached, until it is no longer.
    quorum_open: BTreeSet<String>,
}

impl Peers {
    /// Notes a change of `P/nodes/` or `P/autotrips/`; false for any other key.
    fn note(&mut self, keys: &Keys, key: &str, put: bool) -> bool {
        if let Some(node) = keys.parse_node(key) {
            if put {
                self.nodes.insert(node.to_owned());
            } else {
                self.nodes.remove(node);
            }
        } else if let Some((service, node)) = keys.parse_autotrip(key) {
            let nodes = self.autotrips.entry(service.to_owned()).or_default();
            if put {
                nodes.insert(node.to_owned());
            } else {
                nodes.remove(node);
            }
        } else {
            return false;
        }
        true
    }
}

/// A desired record with what etcd says of it.
#[derive(Clone, Debug)]
struct Desired {
    record: Record,
    mod_revision: i64,
    lease: i64,
}

type DesiredState = BTreeMap<(Kind, String), Desired>;

/// Runs the fleet link until the process ends.
pub async fn run(settings: Settings, node: NodeInfo, core: Shared) {
    info!(
        node = settings.node,
        etcd = ?settings.endpoints,
        prefix = settings.keys.prefix(),
        "fleet: joining through etcd"
    );
    set_link(&core, |l| {
        l.node.clone_from(&settings.node);
        l.endpoints.clone_from(&settings.endpoints);
    });
    let mut applied = seed(&core);
    let mut backoff = BACKOFF_MIN;
    let mut client = None;
    loop {
        let error = match session(
            &settings,
            &node,
            &core,
            &mut applied,
            &mut backoff,
            client.take(),
        )
        .await
        {
            Ended::Rotated(new) => {
                // Connected and answered with the new files: the next session goes on at once
                // with that client; the link stays up.
                info!("fleet: the etcd client's TLS files changed: reconnected with them");
                client = Some(*new);
                continue;
            }
            Ended::Failed(error) => error,
        };
        let was_up = set_link(&core, |l| {
            let up = l.connected;
            if up {
                l.connected = false;
                l.since = SystemTime::now();
            }
            l.last_error.clone_from(&error);
            up
        });
        if was_up {
            warn!(
                error,
                "fleet: link to etcd lost; enforcing what was last applied"
            );
        } else {
            warn!(error, retry_in = ?backoff, "fleet: cannot reach etcd");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Why a session ended.
enum Ended {
    /// An error (etcd gone, lease lost, watch compacted): why.
    Failed(String),
    /// The TLS files changed and a client with them works: the next session uses it (boxed:
    /// a client is large).
    Rotated(Box<Client>),
}

impl From<String> for Ended {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

impl From<&str> for Ended {
    fn from(why: &str) -> Self {
        Self::Failed(why.to_owned())
    }
}

fn set_link<T>(core: &Shared, f: impl FnOnce(&mut FleetLink) -> T) -> T {
    let mut guard = core.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.fleet_link_mut())
}

/// One session with etcd (on `client` if given, else a new one): list and apply, register, then
/// follow the watch. It ends only with why it ended.
async fn session(
    settings: &Settings,
    node: &NodeInfo,
    core: &Shared,
    applied: &mut Applied,
    backoff: &mut Duration,
    client: Option<Client>,
) -> Ended {
    match session_inner(settings, node, core, applied, backoff, client).await {
        Ok(never) => match never {},
        Err(ended) => ended,
    }
}

async fn session_inner(
    settings: &Settings,
    node: &NodeInfo,
    core: &Shared,
    applied: &mut Applied,
    backoff: &mut Duration,
    client: Option<Client>,
) -> std::result::Result<std::convert::Infallible, Ended> {
    let etcd_err = |what: &str| {
        let what = what.to_owned();
        move |e: etcd_client::Error| format!("{what}: {e}")
    };
    // New TLS files from here on are a reason to reconnect.
    let mut rotated = settings.tls.subscribe();
    let tls = rotated.borrow_and_update().clone();
    let mut client = match client {
        Some(client) => client,
        None => settings
            .connect(tls.as_deref())
            .await
            .map_err(etcd_err("connect"))?,
    };
    let keys = &settings.keys;

    // The desired state at one revision, then everything after it through the watch.
    let mut desired = DesiredState::new();
    let first = client
        .get(
            keys.kind(Kind::Service),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd_err("list"))?;
    let revision = first.header().map_or(0, |h| h.revision());
    let mut lists = vec![(Kind::Service, first)];
    for kind in [Kind::Policy, Kind::Trip] {
        let r = client
            .get(
                keys.kind(kind),
                Some(GetOptions::new().with_prefix().with_revision(revision)),
            )
            .await
            .map_err(etcd_err("list"))?;
        lists.push((kind, r));
    }
    for (_, list) in &lists {
        for kv in list.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            let Some((kind, name)) = keys.parse(key) else {
                continue;
            };
            let slot = (kind, name.to_owned());
            if let Some(d) = read_record(
                core,
                applied,
                keys,
                key,
                kv.value(),
                kv.mod_revision(),
                kv.lease(),
            ) {
                desired.insert(slot, d);
            }
        }
    }
    let leases = trip_remainders(&mut client, &desired).await;
    reconcile(settings, core, &desired, applied, &leases);
    let mut peers = Peers::default();
    for prefix in [keys.nodes(), keys.all_autotrips()] {
        let list = client
            .get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_revision(revision),
                ),
            )
            .await
            .map_err(etcd_err("list peers"))?;
        for kv in list.kvs() {
            if let Ok(key) = kv.key_str() {
                peers.note(keys, key, true);
            }
        }
    }

    // Register the node, on its own lease.
    let lease = client
        .lease_grant(NODE_TTL_S, None)
        .await
        .map_err(etcd_err("lease"))?
        .id();
    let (mut keeper, mut kept) = client
        .lease_keep_alive(lease)
        .await
        .map_err(etcd_err("lease keep-alive"))?;
    let on_lease = || Some(PutOptions::new().with_lease(lease));
    let record = NodeRecord {
        version: env!("CARGO_PKG_VERSION").into(),
        kernel: node.kernel.clone(),
        features: node.features.clone(),
        labels: settings.labels.clone(),
        started_at: node.started_at.clone(),
        applied_revision: revision,
    };
    client
        .put(keys.node(&settings.node), json(&record), on_lease())
        .await
        .map_err(etcd_err("register node"))?;
    // This node's breakers, all of them, then only what changes.
    let mut published: BTreeMap<String, BreakerRecord> = BTreeMap::new();
    let stale = client
        .get(
            keys.node_breakers(&settings.node),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .map_err(etcd_err("list breakers"))?;
    for kv in stale.kvs() {
        client
            .delete(kv.key(), None)
            .await
            .map_err(etcd_err("delete stale breaker"))?;
    }
    publish_breakers(&mut client, settings, core, &mut published, lease, true).await?;

    let [(start, end), (start2, end2)] = keys.watched();
    let from = |end: String| {
        Some(
            WatchOptions::new()
                .with_range(end)
                .with_start_revision(revision + 1),
        )
    };
    let mut watch = client
        .watch(start, from(end))
        .await
        .map_err(etcd_err("watch"))?;
    watch
        .watch(start2, from(end2))
        .await
        .map_err(etcd_err("watch"))?;
    let events = core
        .lock()
        .map_err(|_| "core lock poisoned".to_owned())?
        .watch_breakers("")
        .map_err(|e| e.to_string())?
        .stream();
    let mut events = std::pin::pin!(events);
    set_link(core, |l| {
        l.connected = true;
        l.since = SystemTime::now();
        l.applied_revision = revision;
        l.last_error.clear();
    });
    info!(revision, node = settings.node, "fleet: in sync with etcd");
    *backoff = BACKOFF_MIN;

    let mut renew = tokio::time::interval(Duration::from_secs((NODE_TTL_S / 3).max(1) as u64));
    let mut counters = tokio::time::interval(COUNTERS_EVERY);
    let mut node_record = record;
    use futures::StreamExt as _;
    loop {
        tokio::select! {
            message = watch.message() => {
                let message = message
                    .map_err(etcd_err("watch"))?
                    .ok_or("watch ended")?;
                if message.canceled() || message.compact_revision() > 0 {
                    return Err(format!(
                        "watch canceled ({}; compacted at {}): listing again",
                        message.cancel_reason(),
                        message.compact_revision()
                    )
                    .into());
                }
                let mut changed = false;
                let mut peers_changed = false;
                let mut revision = node_record.applied_revision;
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    let Ok(key) = kv.key_str() else { continue };
                    if peers.note(keys, key, event.event_type() == EventType::Put) {
                        peers_changed = true;
                        continue;
                    }
                    let Some((kind, name)) = keys.parse(key) else { continue };
                    changed = true;
                    let slot = (kind, name.to_owned());
                    match event.event_type() {
                        EventType::Put => {
                            // An invalid record is not applied; the one before it stays
                            // applied until a valid one or a delete replaces it.
                            if let Some(d) = read_record(core, applied, keys, key, kv.value(), kv.mod_revision(), kv.lease()) {
                                desired.insert(slot, d);
                            }
                        }
                        EventType::Delete => {
                            desired.remove(&slot);
                        }
                    }
                }
                if let Some(h) = message.header() {
                    revision = revision.max(h.revision());
                }
                if changed {
                    // A trip that arrives now has all of its TTL left.
                    reconcile(settings, core, &desired, applied, &BTreeMap::new());
                    publish_breakers(&mut client, settings, core, &mut published, lease, false).await?;
                    node_record.applied_revision = revision;
                    client
                        .put(keys.node(&settings.node), json(&node_record), on_lease())
                        .await
                        .map_err(etcd_err("node record"))?;
                    set_link(core, |l| l.applied_revision = revision);
                }
                if peers_changed || changed {
                    quorum(settings, core, &mut peers);
                }
            }
            event = events.next() => {
                let Some((event, _)) = event else {
                    return Err("breaker events ended".into());
                };
                let t = event.transition;
                let window = {
                    let core = core.lock().map_err(|_| "core lock poisoned".to_owned())?;
                    core.quorums().get(&event.service).map(|q| q.window)
                };
                if let (Some(window), true) = (window, tripped_by_itself(&t)) {
                    // Counted by every node for the quorum window: the key goes with its lease.
                    let lease = client
                        .lease_grant(window.as_secs() as i64, None)
                        .await
                        .map_err(etcd_err("autotrip lease"))?
                        .id();
                    let record = schema::AutoTripRecord {
                        cause: crate::core::policy::cause_name(t.cause).to_owned(),
                    };
                    client
                        .put(
                            keys.autotrip(&event.service, &settings.node),
                            json(&record),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await
                        .map_err(etcd_err("autotrip"))?;
                }
                // A state change is published at once, with the counts it came with.
                publish_breakers(&mut client, settings, core, &mut published, lease, false).await?;
            }
            _ = counters.tick() => {
                publish_breakers(&mut client, settings, core, &mut published, lease, true).await?;
            }
            _ = renew.tick() => {
                keeper.keep_alive().await.map_err(etcd_err("lease keep-alive"))?;
            }
            reply = kept.message() => {
                match reply.map_err(etcd_err("lease keep-alive"))? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Err("the node's lease expired".into()),
                }
            }
            Ok(()) = rotated.changed() => {
                // This connection goes on until a new one works with the new files: etcd may
                // not trust them yet.
                let tls = rotated.borrow_and_update().clone();
                match settings.reconnect(tls.as_deref()).await {
                    Ok(client) => return Err(Ended::Rotated(Box::new(client))),
                    Err(e) => warn!(
                        error = e,
                        "fleet: etcd does not take the new TLS files yet; staying on the current \
                         connection (the next one uses them)"
                    ),
                }
            }
        }
    }
}

/// A trip the breaker made from its own counts (not an operator's, not a quorum's).
fn tripped_by_itself(t: &breakwater_common::breaker::Transition) -> bool {
    use breakwater_common::breaker::{cause, state};
    t.from == state::CLOSED
        && t.to == state::OPEN
        && matches!(
            t.cause,
            cause::FAILURE_RATIO | cause::CONSECUTIVE_FAILURES | cause::MAX_FAILURES
        )
}

/// The fleet quorum rule, as every node computes it from the same etcd state (no leader): a
/// service whose quorum of nodes tripped it by themselves within the window is opened here for
/// its `open_timeout`, forced, once until the count falls below the quorum again.
fn quorum(settings: &Settings, core: &Shared, peers: &mut Peers) {
    let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
    let live = peers.nodes.len();
    let quorums: Vec<_> = core
        .quorums()
        .iter()
        .map(|(s, q)| (s.clone(), *q))
        .collect();
    for (service, q) in quorums {
        let tripped = peers
            .autotrips
            .get(&service)
            .map_or(0, |n| n.intersection(&peers.nodes).count());
        let needed = q.needed(live);
        if tripped < needed {
            peers.quorum_open.remove(&service);
            continue;
        }
        if !peers.quorum_open.insert(service.clone()) {
            continue;
        }
        let reason = format!("fleet quorum: {tripped} of {live} nodes");
        let open_timeout = core
            .breaker(&service)
            .map(|b| Duration::from_nanos(b.policy.open_timeout_ns));
        let result =
            open_timeout.and_then(|ttl| core.trip(Owner::Fleet, &service, Some(ttl), &reason));
        match result {
            Ok(_) => info!(
                service,
                reason,
                node = settings.node,
                "fleet: quorum reached, breaker opened"
            ),
            Err(e) => warn!(service, error = %e, "fleet: quorum reached, breaker not opened"),
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}

/// A record from etcd, checked; None (logged and counted once) if it is invalid.
fn read_record(
    core: &Shared,
    applied: &mut Applied,
    keys: &Keys,
    key: &str,
    value: &[u8],
    mod_revision: i64,
    lease: i64,
) -> Option<Desired> {
    let (kind, name) = keys.parse(key)?;
    match Record::parse(kind, name, value) {
        Ok(record) => Some(Desired {
            record,
            mod_revision,
            lease,
        }),
        Err(e) => {
            if applied.invalid.insert((key.to_owned(), mod_revision)) {
                warn!(key, mod_revision, error = %e, "fleet: invalid record ignored");
                set_link(core, |l| l.invalid_records += 1);
            }
            None
        }
    }
}

/// How long each trip listed at the start of a session has left, by etcd's count of its
/// lease: a node that applies a trip late (it joined, or it was cut off) gets the remainder,
/// never one computed from its own clock. etcd gives whole seconds, rounded down: the middle of
/// that second is the estimate.
async fn trip_remainders(client: &mut Client, desired: &DesiredState) -> BTreeMap<i64, Duration> {
    let mut out = BTreeMap::new();
    for d in desired.values() {
        if matches!(d.record, Record::Trip(_)) && d.lease != 0 && !out.contains_key(&d.lease) {
            if let Ok(r) = client.lease_time_to_live(d.lease, None).await {
                let left = match r.ttl() {
                    ..=0 => Duration::ZERO,
                    s => Duration::from_secs(s as u64) + Duration::from_millis(500),
                };
                out.insert(d.lease, left);
            }
        }
    }
    out
}

/// Makes the core hold what the fleet wants on this node, through the same calls as the local
/// API, as [`Owner::Fleet`]. A record that cannot be applied here (an endpoint another service
/// has, a trip of a service without a policy) is logged and left for the next change.
fn reconcile(
    settings: &Settings,
    core: &Shared,
    desired: &DesiredState,
    applied: &mut Applied,
    leases: &BTreeMap<i64, Duration>,
) {
    let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
    let mine = |d: &&Desired| {
        d.record
            .selector()
            .selects(&settings.node, &settings.labels)
    };
    let of = |kind: Kind| {
        desired
            .iter()
            .filter(move |((k, _), _)| *k == kind)
            .map(|((_, name), d)| (name.as_str(), d))
            .filter(|(_, d)| mine(d))
    };
    let failed = |core: &mut Core, what: &str, name: &str, e: Error| {
        warn!(what, name, error = %e, "fleet: record not applied on this node");
        core.fleet_link_mut().not_applied += 1;
    };

    // Services: gone ones first (their endpoints may move to another), then new and changed.
    let wanted: BTreeMap<&str, &Vec<String>> = of(Kind::Service)
        .filter_map(|(n, d)| match &d.record {
            Record::Service(s) => Some((n, &s.endpoints)),
            _ => None,
        })
        .collect();
    let gone: Vec<String> = applied
        .services
        .keys()
        .filter(|n| !wanted.contains_key(n.as_str()))
        .cloned()
        .collect();
    for name in gone {
        applied.services.remove(&name);
        applied.policies.remove(&name);
        applied.trips.remove(&name);
        if core.owners().service(&name) == Some(Owner::Fleet) {
            match core.delete_service(Owner::Fleet, &name) {
                Ok(()) => info!(service = name, "fleet: service deleted"),
                Err(e) => failed(&mut core, "service", &name, e),
            }
        }
    }
    for (name, endpoints) in &wanted {
        let current = core.owners().service(name) == Some(Owner::Fleet);
        if current && applied.services.get(*name) == Some(*endpoints) {
            continue;
        }
        match core.put_service(Owner::Fleet, name, endpoints) {
            Ok(_) => {
                info!(service = name, ?endpoints, "fleet: service put");
                applied
                    .services
                    .insert(name.to_string(), endpoints.to_vec());
            }
            Err(e) => failed(&mut core, "service", name, e),
        }
    }

    // Policies, on services that exist here.
    let wanted: BTreeMap<&str, &crate::config::BreakerConfig> = of(Kind::Policy)
        .filter_map(|(n, d)| match &d.record {
            Record::Policy(p) => Some((n, &p.policy)),
            _ => None,
        })
        .collect();
    let gone: Vec<String> = applied
        .policies
        .keys()
        .filter(|n| !wanted.contains_key(n.as_str()))
        .cloned()
        .collect();
    for name in gone {
        applied.policies.remove(&name);
        if core.owners().policy(&name) == Some(Owner::Fleet) {
            match core.clear_policy(Owner::Fleet, &name) {
                Ok(()) => info!(service = name, "fleet: policy cleared"),
                Err(e) => failed(&mut core, "policy", &name, e),
            }
        }
    }
    for (name, config) in &wanted {
        if core.services().get(name).is_none() {
            applied.policies.remove(*name);
            continue;
        }
        let current = core.owners().policy(name) == Some(Owner::Fleet);
        if current && applied.policies.get(*name) == Some(*config) {
            continue;
        }
        if current && in_kernel_already(&core, name, config) {
            // A restarted agent's pinned breaker: kept as it is, state and all.
            applied.policies.insert(name.to_string(), (*config).clone());
            continue;
        }
        let set = config.spec().and_then(|spec| {
            let quorum = spec.quorum()?;
            core.set_policy(Owner::Fleet, name, spec.resolve()?)?;
            core.set_quorum(Owner::Fleet, name, quorum)
        });
        match set {
            Ok(_) => {
                info!(service = name, "fleet: policy set");
                applied.policies.insert(name.to_string(), (*config).clone());
                // A new policy starts Closed: a trip must be made again.
                applied.trips.remove(*name);
            }
            Err(e) => failed(&mut core, "policy", name, e),
        }
    }

    // Trips, on services with a breaker.
    let wanted: BTreeMap<&str, (&TripRecord, &Desired)> = of(Kind::Trip)
        .filter_map(|(n, d)| match &d.record {
            Record::Trip(t) => Some((n, (t, d))),
            _ => None,
        })
        .collect();
    let gone: Vec<String> = applied
        .trips
        .keys()
        .filter(|n| !wanted.contains_key(n.as_str()))
        .cloned()
        .collect();
    for name in gone {
        applied.trips.remove(&name);
        if let Ok((service, Some(destination))) = schema::trip_target(&name) {
            let forced_by_fleet = core.breaker(service).is_ok_and(|b| {
                b.destinations
                    .iter()
                    .any(|d| d.destination == destination && d.tripped_by == Some(Owner::Fleet))
            });
            if forced_by_fleet {
                match core.reset_destination(service, destination) {
                    Ok(_) => info!(service, %destination, "fleet: trip ended, destination reset"),
                    Err(e) => failed(&mut core, "trip", &name, e),
                }
            }
            continue;
        }
        let forced_by_fleet = core
            .breaker(&name)
            .is_ok_and(|b| b.tripped_by == Some(Owner::Fleet));
        if forced_by_fleet {
            match core.reset(&name) {
                Ok(_) => info!(service = name, "fleet: trip ended, breaker reset"),
                Err(e) => failed(&mut core, "trip", &name, e),
            }
        }
    }
    for (name, (trip, d)) in wanted {
        let Ok((service, destination)) = schema::trip_target(name) else {
            continue;
        };
        if applied.trips.get(name) == Some(&d.mod_revision) || core.breaker(service).is_err() {
            continue;
        }
        let ttl = trip.ttl_ms.map(|ms| {
            let given = Duration::from_millis(ms);
            leases.get(&d.lease).map_or(given, |left| given.min(*left))
        });
        if let Some(destination) = destination {
            if ttl == Some(Duration::ZERO) {
                continue;
            }
            match core.trip_destination(Owner::Fleet, service, destination, ttl, &trip.reason) {
                Ok(_) => {
                    info!(service, %destination, ?ttl, reason = trip.reason, "fleet: destination tripped");
                    applied.trips.insert(name.to_owned(), d.mod_revision);
                }
                Err(e) => failed(&mut core, "trip", name, e),
            }
            continue;
        }
        let held = core.breaker(name).is_ok_and(|b| {
            b.tripped_by == Some(Owner::Fleet)
                && b.open_remaining_ms == 0
                && b.reason == trip.reason
        });
        if trip.ttl_ms.is_none() && held {
            // Already forced open by the fleet until reset (a restarted agent's pinned trip).
            applied.trips.insert(name.to_owned(), d.mod_revision);
            continue;
        }
        if ttl == Some(Duration::ZERO) {
            // The lease has ended; its delete is on the way.
            continue;
        }
        match core.trip(Owner::Fleet, name, ttl, &trip.reason) {
            Ok(_) => {
                info!(
                    service = name,
                    ?ttl,
                    reason = trip.reason,
                    "fleet: breaker tripped"
                );
                applied.trips.insert(name.to_owned(), d.mod_revision);
            }
            Err(e) => failed(&mut core, "trip", name, e),
        }
    }
}

/// True if the kernel holds `config`'s policy (and the core its quorum rule) for `service`.
fn in_kernel_already(core: &Core, service: &str, config: &crate::config::BreakerConfig) -> bool {
    let Ok(spec) = config.spec() else {
        return false;
    };
    let (Ok(rules), Ok(quorum), Ok(b)) = (spec.rules(), spec.quorum(), core.breaker(service))
    else {
        return false;
    };
    let enabled = breakwater_common::breaker::policy_flags::ENABLED;
    let kept = breakwater_common::breaker::DestPolicy { live: 0, ..b.dest };
    b.policy.flags & enabled != 0
        && b.policy
            == breakwater_common::breaker::Policy {
                flags: rules.policy.flags | enabled,
                ..rules.policy
            }
        && kept == rules.dest
        && b.quorum == quorum
}

/// What a previous agent applied for the fleet, as the kernel kept it: so that the first
/// session after a restart removes what the fleet deleted meanwhile, and keeps the rest as it
/// is. A fleet trip until reset is kept as applied; one with a TTL ends by itself.
fn seed(core: &Shared) -> Applied {
    let core = core.lock().unwrap_or_else(|e| e.into_inner());
    let mut applied = Applied::default();
    for s in core.services().iter() {
        if core.owners().service(&s.name) == Some(Owner::Fleet) {
            let endpoints = s.endpoints.iter().map(ToString::to_string).collect();
            applied.services.insert(s.name.clone(), endpoints);
        }
    }
    for b in core.breakers().unwrap_or_default() {
        if b.policy_owner == Owner::Fleet {
            // Not the record (the kernel has the resolved policy): see in_kernel_already.
            applied
                .policies
                .insert(b.service.clone(), crate::config::BreakerConfig::default());
        }
        if b.tripped_by == Some(Owner::Fleet) && b.open_remaining_ms == 0 {
            applied.trips.insert(b.service.clone(), 0);
        }
    }
    applied
}

/// The record of one breaker as this node publishes it.
fn breaker_record(b: &BreakerView) -> BreakerRecord {
    BreakerRecord {
        state: breakwater_common::breaker::state::name(b.counts.state).to_owned(),
        forced: b.counts.forced != 0,
        reason: b.reason.clone(),
        tripped_by: b
            .tripped_by
            .map(|o| o.name().to_owned())
            .unwrap_or_default(),
        policy_owner: b.policy_owner.name().to_owned(),
        requests: b.counts.requests,
        failures: b.counts.failures,
        rejected: b.totals.rejected,
        trips: b.totals.trips,
    }
}

/// Writes each breaker whose record changed (only its state, unless `counters`), and deletes
/// the records of breakers that are gone.
async fn publish_breakers(
    client: &mut Client,
    settings: &Settings,
    core: &Shared,
    published: &mut BTreeMap<String, BreakerRecord>,
    lease: i64,
    counters: bool,
) -> std::result::Result<(), String> {
    let views = {
        let core = core.lock().map_err(|_| "core lock poisoned".to_owned())?;
        core.breakers().map_err(|e| e.to_string())?
    };
    let keys = &settings.keys;
    let mut now: BTreeMap<String, BreakerRecord> = BTreeMap::new();
    for b in &views {
        now.insert(b.service.clone(), breaker_record(b));
    }
    for (service, record) in &now {
        let write = match published.get(service) {
            None => true,
            Some(old) if counters => old != record,
            Some(old) => {
                (
                    &old.state,
                    old.forced,
                    &old.reason,
                    &old.tripped_by,
                    &old.policy_owner,
                ) != (
                    &record.state,
                    record.forced,
                    &record.reason,
                    &record.tripped_by,
                    &record.policy_owner,
                )
            }
        };
        if write {
            client
                .put(
                    keys.breaker(&settings.node, service),
                    json(record),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .map_err(|e| format!("publish breaker: {e}"))?;
            published.insert(service.clone(), record.clone());
        }
    }
    let gone: Vec<String> = published
        .keys()
        .filter(|s| !now.contains_key(*s))
        .cloned()
        .collect();
    for service in gone {
        client
            .delete(keys.breaker(&settings.node, &service), None)
            .await
            .map_err(|e| format!("delete breaker: {e}"))?;
        published.remove(&service);
    }
    Ok(())
}
