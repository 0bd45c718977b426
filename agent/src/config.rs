//! The agent's configuration: a TOML file, or the embedded defaults (observe everything, no
//! services) when none is given.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use breakwater_common::defaults;
use serde::{Deserialize, Serialize};

use crate::{
    core::{
        features::Feature,
        policy::{parse_duration, PolicySpec, Rules},
        service::{parse_endpoints, ServiceTable},
    },
    error::{Error, Result},
};

pub const DEFAULT_SOCKET: &str = "/run/breakwater/agent.sock";
/// Where the agent pins its programs, links and maps (on bpffs), so that enforcement and the
/// breakers' state survive an agent restart.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/breakwater";

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    pub maps: MapSizes,
    pub breaker: BreakerScope,
    pub metrics: MetricsConfig,
    pub features: FeaturesConfig,
    pub fleet: FleetConfig,
    #[serde(rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `[fleet]`: services, policies and trips shared with other nodes through etcd, and this
/// node's breakers published there. Off without `etcd`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd endpoints, e.g. `["https://10.0.0.5:2379"]`.
    pub etcd: Vec<String>,
    /// Where the fleet's keys live [default: /breakwater/v1].
    pub prefix: Option<String>,
    /// This node's name in the fleet [default: the hostname].
    pub node_name: Option<String>,
    /// This node's labels, which records select nodes by.
    pub labels: std::collections::BTreeMap<String, String>,
    /// CA certificate(s) etcd's certificate must chain to.
    pub etcd_ca: Option<PathBuf>,
    /// The agent's client certificate and key for etcd.
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
}

impl FleetConfig {
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }

    fn validate(&self) -> Result<()> {
        for url in &self.etcd {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::invalid(format!(
                    "[fleet] etcd {url:?}: expected http://HOST:PORT or https://HOST:PORT"
                )));
            }
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return Err(Error::invalid("[fleet] etcd_cert and etcd_key go together"));
        }
        if let Some(prefix) = &self.prefix {
            crate::fleet::schema::Keys::new(prefix)?;
        }
        if let Some(node) = &self.node_name {
            crate::fleet::schema::check_node_name(node)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the gRPC API listens (a unix socket, mode `socket_mode`).
    pub socket: PathBuf,
    /// The socket's permission bits, octal ("0600": root only; "0666": anyone may read).
    pub socket_mode: String,
    /// The socket's group (a name or a numeric gid); none = root's.
    pub socket_group: Option<String>,
    /// bpffs directory of the pinned programs, links and maps.
    pub pin_dir: PathBuf,
    /// HOST:PORT to also serve the API on over TCP, with TLS and verified client certificates
    /// (needs `tls_cert`, `tls_key` and `tls_client_ca`).
    pub listen: Option<String>,
    /// HOST:PORT to serve the API on over plain TCP: no TLS, no identity (reads only, unless
    /// `authz.insecure_writers`).
    pub insecure_listen: Option<String>,
    /// HOST:PORT to serve `grpc.health.v1.Health` on, alone, over plain TCP (for probes that
    /// cannot do mTLS, e.g. Kubernetes gRPC probes); none = off.
    pub health_listen: Option<String>,
    /// The agent's certificate chain (PEM) for `listen`.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    pub tls_client_ca: Option<PathBuf>,
    /// Who may change state through the API.
    pub authz: AuthzConfig,
    /// `text` (plain, coloured only on a terminal) or `json` (one object a line, for log
    /// shippers).
    pub log_format: LogFormat,
    /// How often the agent looks for what the kernel still keeps of connections whose socket
    /// is gone, and frees it (`conns_reaped`): a walk of every namespace's sockets, so not too
    /// often on a node with very many (e.g. "60s", at least "1s").
    pub connection_sweep: String,
}

/// How the agent writes its log.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            socket_mode: DEFAULT_SOCKET_MODE.into(),
            socket_group: None,
            pin_dir: DEFAULT_PIN_DIR.into(),
            listen: None,
            insecure_listen: None,
            health_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            authz: AuthzConfig::default(),
            log_format: LogFormat::Text,
            connection_sweep: "60s".into(),
        }
    }
}

pub const DEFAULT_SOCKET_MODE: &str = "0600";

/// `[agent.authz]`: reading is open to every caller that can connect (and, over TLS,
/// authenticates); changing state (trip, reset, policies, services, reload) only to these.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzConfig {
    /// Client-certificate identities allowed to change state: a SAN (DNS name or URI, e.g.
    /// "spiffe://example.org/ops") or the subject's CN, matched exactly.
    pub writers: Vec<String>,
    /// Unix-socket callers (SO_PEERCRED) allowed to change state, by uid ...
    pub writer_uids: Vec<u32>,
    /// ... or by gid, primary or supplementary.
    pub writer_gids: Vec<u32>,
    /// Let callers of `insecure_listen` (who have no identity) change state too.
    pub insecure_writers: bool,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        Self {
            writers: Vec::new(),
            writer_uids: vec![0],
            writer_gids: Vec::new(),
            insecure_writers: false,
        }
    }
}

impl AgentConfig {
    /// `socket_mode` as permission bits.
    pub fn socket_mode(&self) -> Result<u32> {
        let text = self.socket_mode.trim();
        u32::from_str_radix(text.strip_prefix("0o").unwrap_or(text), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "agent.socket_mode {:?} is not an octal mode (e.g. \"0600\", \"0660\", \"0666\")",
                    self.socket_mode
                ))
            })
    }

    /// `connection_sweep` as a duration.
    pub fn connection_sweep(&self) -> Result<Duration> {
        let d = parse_duration("agent.connection_sweep", &self.connection_sweep)?;
        if d < Duration::from_secs(1) {
            return Err(Error::invalid(format!(
                "agent.connection_sweep {:?} is shorter than 1s",
                self.connection_sweep
            )));
        }
        Ok(d)
    }

    fn validate(&self) -> Result<()> {
        self.socket_mode()?;
        self.connection_sweep()?;
        for (key, addr) in [
            ("listen", &self.listen),
            ("insecure_listen", &self.insecure_listen),
            ("health_listen", &self.health_listen),
        ] {
            if let Some(addr) = addr {
                check_host_port(addr)
                    .map_err(|why| Error::invalid(format!("agent.{key} {addr:?}: {why}")))?;
            }
        }
        if self.listen.is_some() {
            let missing: Vec<&str> = [
                ("tls_cert", &self.tls_cert),
                ("tls_key", &self.tls_key),
                ("tls_client_ca", &self.tls_client_ca),
            ]
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
            if !missing.is_empty() {
                return Err(Error::invalid(format!(
                    "agent.listen (--listen) serves only TLS with verified client certificates: \
                     it needs {} (--{})",
                    missing
                        .iter()
                        .map(|k| format!("agent.{k}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    missing
                        .iter()
                        .map(|k| k.replace('_', "-"))
                        .collect::<Vec<_>>()
                        .join(", --")
                )));
            }
        }
        Ok(())
    }
}

/// The remote-access flags (and their env vars), which win over the file's `[agent]` keys, at
/// start and on every reload.
#[derive(Clone, Debug, Default)]
pub struct RemoteOverrides {
    pub socket_mode: Option<String>,
    pub listen: Option<String>,
    pub insecure_listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
}

impl RemoteOverrides {
    pub fn apply(&self, a: &mut AgentConfig) {
        if let Some(mode) = &self.socket_mode {
            a.socket_mode.clone_from(mode);
        }
        for (flag, key) in [
            (&self.listen, &mut a.listen),
            (&self.insecure_listen, &mut a.insecure_listen),
        ] {
            if flag.is_some() {
                key.clone_from(flag);
            }
        }
        for (flag, key) in [
            (&self.tls_cert, &mut a.tls_cert),
            (&self.tls_key, &mut a.tls_key),
            (&self.tls_client_ca, &mut a.tls_client_ca),
        ] {
            if flag.is_some() {
                key.clone_from(flag);
            }
        }
    }
}

/// What flags and environment set over the file; they still win after a reload.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub pin_dir: Option<std::path::PathBuf>,
    pub scope: Vec<String>,
    /// --listen, --tls-*, --socket-mode, ...
    pub remote: RemoteOverrides,
    pub health_listen: Option<String>,
    pub metrics_listen: Option<String>,
    /// --disable-feature: added to the file's `[features] disable`.
    pub disable_features: Vec<Feature>,
    /// --etcd, --node-name, --etcd-ca, --etcd-cert, --etcd-key.
    pub etcd: Vec<String>,
    pub node_name: Option<String>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
}

impl Overrides {
    pub fn apply(&self, config: &mut Config) -> Result<()> {
        if let Some(dir) = &self.pin_dir {
            config.agent.pin_dir = dir.clone();
        }
        if !self.scope.is_empty() {
            config.breaker.scope = self.scope.clone();
        }
        self.remote.apply(&mut config.agent);
        if self.health_listen.is_some() {
            config.agent.health_listen.clone_from(&self.health_listen);
        }
        if self.metrics_listen.is_some() {
            config.metrics.listen.clone_from(&self.metrics_listen);
        }
        config.features.add(&self.disable_features);
        if !self.etcd.is_empty() {
            config.fleet.etcd = self.etcd.clone();
        }
        for (to, from) in [
            (&mut config.fleet.etcd_ca, &self.etcd_ca),
            (&mut config.fleet.etcd_cert, &self.etcd_cert),
            (&mut config.fleet.etcd_key, &self.etcd_key),
        ] {
            if from.is_some() {
                to.clone_from(from);
            }
        }
        if self.node_name.is_some() {
            config.fleet.node_name.clone_from(&self.node_name);
        }
        config.validate()
    }
}

/// HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 address.
pub fn check_host_port(addr: &str) -> std::result::Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or("expected HOST:PORT, e.g. 0.0.0.0:7443 or [::]:7443")?;
    port.parse::<u16>()
        .map_err(|_| format!("invalid port {port:?}"))?;
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    match bare {
        Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => Ok(()),
        Some(_) => Err(format!("invalid IPv6 address {host:?}")),
        None if host.is_empty() || host.contains(':') => {
            Err("expected HOST:PORT (an IPv6 address goes in brackets: [::1]:7443)".into())
        }
        None => Ok(()),
    }
}

/// `[metrics]`: Prometheus metrics over plain HTTP (`GET /metrics`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// HOST:PORT to serve them on; none = off.
    pub listen: Option<String>,
    /// Per-destination series for the N destinations with the most opened connections (0 =
    /// none): labels stay bounded.
    pub top_destinations: u32,
}

pub const DEFAULT_TOP_DESTINATIONS: u32 = 20;
/// More per-destination series than this is no longer a bounded label set.
pub const MAX_TOP_DESTINATIONS: u32 = 1000;

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            top_destinations: DEFAULT_TOP_DESTINATIONS,
        }
    }
}

impl MetricsConfig {
    fn validate(&self) -> Result<()> {
        if let Some(addr) = &self.listen {
            check_host_port(addr)
                .map_err(|why| Error::invalid(format!("metrics.listen {addr:?}: {why}")))?;
        }
        if self.top_destinations > MAX_TOP_DESTINATIONS {
            return Err(Error::invalid(format!(
                "metrics.top_destinations = {} is out of range (0..={MAX_TOP_DESTINATIONS})",
                self.top_destinations
            )));
        }
        Ok(())
    }
}

/// `[features]`: optional features the operator turns off, whatever the kernel offers. Read at
/// start: a reload that changes it is applied at the next start.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesConfig {
    /// Names of optional features (`crate::core::features::Feature::name`); a core feature cannot be
    /// disabled.
    pub disable: Vec<String>,
}

impl FeaturesConfig {
    /// The features to turn off, each once, in `Feature::ALL` order.
    pub fn disabled(&self) -> Result<Vec<Feature>> {
        let named = self
            .disable
            .iter()
            .map(|name| {
                Feature::optional(name)
                    .map_err(|why| Error::invalid(format!("features.disable: {why}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Feature::ALL
            .into_iter()
            .filter(|f| named.contains(f))
            .collect())
    }

    /// Adds `more` (the `--disable-feature` flags) to the list.
    pub fn add(&mut self, more: &[Feature]) {
        for f in more {
            if !self.disable.iter().any(|n| n == f.name()) {
                self.disable.push(f.name().to_owned());
            }
        }
    }
}

/// Where breakers are enforced: the connects of processes in these cgroups (and their
/// descendants) are counted and, while a breaker is open, refused.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerScope {
    /// Cgroup paths relative to the cgroup2 mount ("/" = every process on the node).
    pub scope: Vec<String>,
    /// Destinations (`IP|CIDR:port`) no breaker ever refuses, whatever service covers them
    /// (the kube-apiserver, DNS, SSH): beside the agent's own control paths, which always are.
    pub protected: Vec<String>,
}

impl Default for BreakerScope {
    fn default() -> Self {
        Self {
            scope: vec!["/".into()],
            protected: Vec::new(),
        }
    }
}

impl BreakerScope {
    /// `protected`, parsed.
    pub fn protected(&self) -> Result<Vec<crate::core::service::Endpoint>> {
        self.protected
            .iter()
            .map(|e| {
                e.trim()
                    .parse()
                    .map_err(|e| Error::invalid(format!("breaker.protected: {e}")))
            })
            .collect()
    }
}

impl BreakerScope {
    fn validate(&self) -> Result<()> {
        if self.scope.is_empty() {
            return Err(Error::invalid(
                "breaker.scope is empty: give at least one cgroup (\"/\" for the whole node)",
            ));
        }
        for path in &self.scope {
            if !path.starts_with('/') {
                return Err(Error::invalid(format!(
                    "breaker.scope {path:?} must be absolute (a cgroup path under the cgroup2 \
                     mount, starting with \"/\")"
                )));
            }
            if path.split('/').any(|c| c == "..") {
                return Err(Error::invalid(format!(
                    "breaker.scope {path:?} must not contain \"..\""
                )));
            }
        }
        let protected = self.protected()?;
        if protected.len() > 512 {
            return Err(Error::invalid(format!(
                "breaker.protected has {} entries (at most 512)",
                protected.len()
            )));
        }
        Ok(())
    }
}

/// Capacities of the kernel maps. The LRU maps drop their least recently used entries when full
/// (and the agent reports those evictions); the others refuse new entries.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MapSizes {
    /// Distinct destinations and local endpoints tracked (LRU).
    pub max_destinations: u32,
    pub max_services: u32,
    /// Endpoints over all services (LPM trie entries).
    pub max_service_endpoints: u32,
    /// Latency histogram buckets in use over all destinations (LRU; one entry per non-empty
    /// bucket of a destination's histogram).
    pub max_histogram_buckets: u32,
    /// Connections tracked at once, both directions (hash entries, made at connect and accept);
    /// past this, new connections are left uncounted (`conns_full`).
    pub max_connections: u32,
    /// Destination breakers over all services with granularity destination (hash entries;
    /// an ejected destination is never evicted; past this, new destinations pass uncounted).
    pub max_destination_breakers: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_destinations: defaults::MAX_DESTS,
            max_services: defaults::MAX_SERVICES,
            max_service_endpoints: defaults::MAX_SERVICE_ENDPOINTS,
            max_histogram_buckets: defaults::MAX_HIST_BUCKETS,
            max_connections: defaults::MAX_CONNS,
            max_destination_breakers: defaults::MAX_DEST_BREAKERS,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub endpoints: Vec<String>,
    /// The service's circuit-breaker policy; none = its connects are only observed.
    pub breaker: Option<BreakerConfig>,
}

/// `[service.breaker]`: a preset, explicit fields, or a preset with some fields overridden
/// (the same fields and checks as the API's `SetPolicy`). Durations are written "30s", "500ms".
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_open_max: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_connect: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminate_established: Option<bool>,
    /// Fleet quorum: "3" nodes, or "50%" of the live ones (needs `[fleet] etcd`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_quorum: Option<String>,
    /// How recent the nodes' own trips must be to count [default: 60s].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_quorum_window: Option<String>,
    /// "service" (one breaker) or "destination" (one per address:port) [default: service].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<String>,
    /// Destination granularity: at most this percent ejected at once [default: 50].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Cap of the open timeout growing with consecutive trips [default: 300s per destination,
    /// 0 (no growth) per service].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_open_timeout: Option<String>,
    /// Destination granularity: idle destinations are forgotten after this [default: 10m].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_ttl: Option<String>,
    /// "enforce" or "audit": count and report what would be refused, refuse nothing
    /// [default: enforce].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl BreakerConfig {
    pub fn spec(&self) -> Result<PolicySpec> {
        let duration = |field: &str, v: &Option<String>| {
            v.as_deref().map(|t| parse_duration(field, t)).transpose()
        };
        Ok(PolicySpec {
            preset: self.preset.clone(),
            min_requests: self.min_requests,
            failure_ratio: self.failure_ratio,
            consecutive_failures: self.consecutive_failures,
            max_failures: self.max_failures,
            interval: duration("interval", &self.interval)?,
            open_timeout: duration("open_timeout", &self.open_timeout)?,
            half_open_max: self.half_open_max,
            errno: self.errno.clone(),
            slow_connect: duration("slow_connect", &self.slow_connect)?,
            terminate_established: self.terminate_established,
            fleet_quorum: self.fleet_quorum.clone(),
            fleet_quorum_window: duration("fleet_quorum_window", &self.fleet_quorum_window)?,
            granularity: self.granularity.clone(),
            max_ejection_percent: self.max_ejection_percent,
            max_open_timeout: duration("max_open_timeout", &self.max_open_timeout)?,
            destination_ttl: duration("destination_ttl", &self.destination_ttl)?,
            mode: self.mode.clone(),
        })
    }

    /// The kernel's policy and its destination rules; the quorum rule is checked too.
    pub fn policy(&self) -> Result<Rules> {
        let spec = self.spec()?;
        spec.quorum()?;
        spec.rules()
    }
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::invalid(format!("invalid config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<()> {
        let m = &self.maps;
        for (name, v, min) in [
            ("maps.max_destinations", m.max_destinations, 16),
            ("maps.max_services", m.max_services, 1),
            ("maps.max_service_endpoints", m.max_service_endpoints, 1),
            ("maps.max_histogram_buckets", m.max_histogram_buckets, 16),
            ("maps.max_connections", m.max_connections, 16),
            (
                "maps.max_destination_breakers",
                m.max_destination_breakers,
                16,
            ),
        ] {
            if v < min || v > 1 << 24 {
                return Err(Error::invalid(format!(
                    "{name} = {v} is out of range ({min}..={})",
                    1 << 24
                )));
            }
        }
        self.agent.validate()?;
        self.metrics.validate()?;
        self.breaker.validate()?;
        self.fleet.validate()?;
        if !self.fleet.enabled() {
            let quorum = self
                .services
                .iter()
                .find(|s| s.breaker.as_ref().is_some_and(|b| b.fleet_quorum.is_some()));
            if let Some(s) = quorum {
                return Err(Error::invalid(format!(
                    "service {:?}: breaker: fleet_quorum needs [fleet] etcd (or --etcd)",
                    s.name
                )));
            }
        }
        self.features.disabled()?;
        self.service_table()?;
        self.policies().map(drop)
    }

    /// The resolved breaker policy of every service that has one, in file order.
    pub fn policies(&self) -> Result<Vec<(String, Rules)>> {
        self.services
            .iter()
            .filter_map(|s| s.breaker.as_ref().map(|b| (s, b)))
            .map(|(s, b)| {
                b.policy()
                    .map(|p| (s.name.clone(), p))
                    .map_err(|e| Error::invalid(format!("service {:?}: breaker: {e}", s.name)))
            })
            .collect()
    }

    /// The fleet quorum rules of the configured policies, by service.
    pub fn quorums(&self) -> Result<Vec<(String, Option<crate::core::policy::Quorum>)>> {
        self.services
            .iter()
            .filter_map(|s| s.breaker.as_ref().map(|b| (s, b)))
            .map(|(s, b)| Ok((s.name.clone(), b.spec()?.quorum()?)))
            .collect()
    }

    /// The configured services as a table (checks names, endpoints, conflicts and limits).
    pub fn service_table(&self) -> Result<ServiceTable> {
        let mut table = ServiceTable::new(self.maps.max_services, self.maps.max_service_endpoints);
        for s in &self.services {
            if table.get(&s.name).is_some() {
                return Err(Error::invalid(format!(
                    "service {:?} is defined twice",
                    s.name
                )));
            }
            table.put(&s.name, parse_endpoints(&s.name, &s.endpoints)?)?;
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.agent.socket, Path::new(DEFAULT_SOCKET));
        assert!(c.services.is_empty());
    }

    #[test]
    fn services_and_sizes_parse() {
        let c = Config::from_toml(
            r#"
            [agent]
            socket = "/tmp/bw.sock"
            [maps]
            max_destinations = 1024
            [[service]]
            name = "inventory"
            endpoints = ["10.0.0.7:5000", "[fd00::/64]:5000"]
            [[service]]
            name = "db"
            endpoints = ["10.1.0.0/16:5432"]
            "#,
        )
        .unwrap();
        assert_eq!(c.maps.max_destinations, 1024);
        assert_eq!(c.maps.max_services, defaults::MAX_SERVICES);
        let t = c.service_table().unwrap();
        assert_eq!(t.get("inventory").unwrap().endpoints.len(), 2);
        assert_eq!(t.get("db").unwrap().id, 2);
    }

    /// The example in the repository stays a valid config that says what the defaults are.
    #[test]
    fn example_config_is_valid_and_shows_the_defaults() {
        let example = include_str!("../../config/breakwater.example.toml");
        let c = Config::from_toml(example).unwrap();
        assert_eq!(c.agent, AgentConfig::default());
        assert_eq!(c.maps, MapSizes::default());
        // Every map size is written out (the destructuring fails to compile on a new one).
        let MapSizes {
            max_destinations: _,
            max_services: _,
            max_service_endpoints: _,
            max_histogram_buckets: _,
            max_connections: _,
            max_destination_breakers: _,
        } = c.maps;
        for key in [
            "max_destinations",
            "max_services",
            "max_service_endpoints",
            "max_histogram_buckets",
            "max_connections",
            "max_destination_breakers",
        ] {
            assert!(
                example.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "the example's [maps] lacks {key}"
            );
        }
        assert_eq!(c.breaker, BreakerScope::default());
        assert_eq!(c.metrics, MetricsConfig::default());
        assert_eq!(c.features, FeaturesConfig::default());
        assert_eq!(c.service_table().unwrap().iter().count(), 2);
        let policies = c.policies().unwrap();
        assert_eq!(policies.len(), 2);
        assert_eq!(
            policies[0],
            (
                "inventory".into(),
                PolicySpec {
                    preset: Some("gobreaker".into()),
                    ..Default::default()
                }
                .rules()
                .unwrap()
            )
        );
    }

    /// The example's commented `[fleet]` table, uncommented, is valid and sets every key: the
    /// destructuring fails to compile when `FleetConfig` gains a field the example lacks.
    #[test]
    fn example_fleet_table_shows_every_key() {
        let example = include_str!("../../config/breakwater.example.toml");
        assert_eq!(
            Config::from_toml(example).unwrap().fleet,
            FleetConfig::default()
        );
        let block: Vec<&str> = example
            .lines()
            .skip_while(|l| *l != "# [fleet]")
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            // The settings, not the prose between them.
            .filter(|l| {
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            })
            .collect();
        assert_eq!(
            block.first(),
            Some(&"[fleet]"),
            "no `# [fleet]` in the example"
        );
        let FleetConfig {
            etcd,
            prefix,
            node_name,
            labels,
            etcd_ca,
            etcd_cert,
            etcd_key,
        } = Config::from_toml(&block.join("\n"))
            .unwrap_or_else(|e| panic!("the example's [fleet] table: {e}\n{}", block.join("\n")))
            .fleet;
        assert!(!etcd.is_empty());
        assert_eq!(
            prefix.as_deref(),
            Some(crate::fleet::schema::DEFAULT_PREFIX)
        );
        assert!(node_name.is_some());
        assert!(!labels.is_empty());
        assert!(etcd_ca.is_some() && etcd_cert.is_some() && etcd_key.is_some());
    }

    #[test]
    fn breakers_parse_and_resolve() {
        let c = Config::from_toml(
            r#"
            [agent]
            pin_dir = "/sys/fs/bpf/bw-test"
            [breaker]
            scope = ["/system.slice/app.service", "/kubepods"]
            [[service]]
            name = "a"
            endpoints = ["10.0.0.1:80"]
            [service.breaker]
            preset = "nginx"
            open_timeout = "1m 30s"
            errno = "eperm"
            [[service]]
            name = "b"
            endpoints = ["10.0.0.2:80"]
            [[service]]
            name = "c"
            endpoints = ["10.0.0.3:80"]
            [service.breaker]
            failure_ratio = 0.5
            min_requests = 10
            consecutive_failures = 0
            interval = "10s"
            slow_connect = "250ms"
            terminate_established = false
            "#,
        )
        .unwrap();
        assert_eq!(c.agent.pin_dir, Path::new("/sys/fs/bpf/bw-test"));
        assert_eq!(c.breaker.scope, ["/system.slice/app.service", "/kubepods"]);
        let p = c.policies().unwrap();
        assert_eq!(
            p.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(p[0].1.policy.max_failures, 3);
        assert_eq!(p[0].1.policy.open_timeout_ns, 90_000_000_000);
        assert_eq!(p[0].1.policy.errno, 1);
        assert_eq!(p[1].1.policy.failure_ratio_ppm, 500_000);
        assert_eq!(p[1].1.policy.slow_connect_ns, 250_000_000);
        assert_eq!(
            p[1].1.policy.flags,
            breakwater_common::breaker::policy_flags::ENABLED
        );
    }

    #[test]
    fn bad_configs_say_why() {
        let cases = [
            ("[agent]\nsockett = \"x\"", "unknown field `sockett`"),
            ("[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.4\"]", "invalid endpoint \"1.2.3.4\""),
            ("[[service]]\nname = \"a\"\nendpoints = []", "has no endpoints"),
            (
                "[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.4:1\"]\n[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.5:1\"]",
                "defined twice",
            ),
            ("[maps]\nmax_services = 0", "maps.max_services = 0 is out of range"),
            ("[breaker]\nscope = []", "breaker.scope is empty"),
            ("[breaker]\nscope = [\"kubepods\"]", "breaker.scope \"kubepods\" must be absolute"),
            ("[breaker]\nscope = [\"/a/../b\"]", "must not contain \"..\""),
            ("[metrics]\nlisten = \"9100\"", "metrics.listen \"9100\": expected HOST:PORT"),
            ("[metrics]\ntop_destinations = 5000", "metrics.top_destinations = 5000 is out of range"),
            ("[agent]\nhealth_listen = \":x\"", "agent.health_listen \":x\": "),
        ];
        for (text, why) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err:?} lacks {why:?}");
        }
    }

    #[test]
    fn features_to_disable_parse_and_only_optional_ones_are_accepted() {
        let c = Config::from_toml(
            "[features]\ndisable = [\"audit_stream\", \"first_response_latency\", \"audit_stream\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.features.disabled().unwrap(),
            [Feature::FirstResponseLatency, Feature::AuditStream]
        );
        let mut f = c.features.clone();
        f.add(&[Feature::AuditStream, Feature::Retransmits]);
        assert_eq!(
            f.disabled().unwrap(),
            [
                Feature::FirstResponseLatency,
                Feature::Retransmits,
                Feature::AuditStream
            ]
        );
        assert!(Config::default().features.disabled().unwrap().is_empty());
        for (text, why) in [
            (
                "[features]\ndisable = [\"nonsense\"]",
                "features.disable: unknown feature \"nonsense\" (optional features: time_wait,",
            ),
            (
                "[features]\ndisable = [\"connection_tracking\"]",
                "features.disable: connection_tracking is a core feature and cannot be disabled",
            ),
            ("[features]\nenable = []", "unknown field `enable`"),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err:?} lacks {why:?}");
        }
    }

    #[test]
    fn remote_access_keys_parse_and_check() {
        let c = Config::from_toml(
            r#"
            [agent]
            socket_mode = "0660"
            socket_group = "breakwater"
            listen = "[::]:7443"
            tls_cert = "/etc/bw/agent.pem"
            tls_key = "/etc/bw/agent.key"
            tls_client_ca = "/etc/bw/ca.pem"
            insecure_listen = "localhost:7080"
            [agent.authz]
            writers = ["spiffe://x/ops", "ops.example.com"]
            writer_gids = [50]
            "#,
        )
        .unwrap();
        assert_eq!(c.agent.socket_mode().unwrap(), 0o660);
        assert_eq!(c.agent.listen.as_deref(), Some("[::]:7443"));
        assert_eq!(c.agent.authz.writers, ["spiffe://x/ops", "ops.example.com"]);
        // Unset lists keep their defaults: root may change state.
        assert_eq!(c.agent.authz.writer_uids, [0]);
        assert_eq!(c.agent.authz.writer_gids, [50]);
        assert!(!c.agent.authz.insecure_writers);
        assert_eq!(AgentConfig::default().socket_mode().unwrap(), 0o600);

        // Flags win over the file, key by key; what they leave unset stays the file's.
        let mut a = c.agent.clone();
        RemoteOverrides {
            socket_mode: Some("0666".into()),
            tls_key: Some("/run/secrets/agent.key".into()),
            ..Default::default()
        }
        .apply(&mut a);
        assert_eq!(a.socket_mode().unwrap(), 0o666);
        assert_eq!(
            a.tls_key.as_deref(),
            Some(Path::new("/run/secrets/agent.key"))
        );
        assert_eq!(a.tls_cert, c.agent.tls_cert);
        assert_eq!(a.listen, c.agent.listen);

        let cases = [
            (
                "[agent]\nsocket_mode = \"rw\"",
                "agent.socket_mode \"rw\" is not an octal mode",
            ),
            ("[agent]\nsocket_mode = \"01777\"", "is not an octal mode"),
            (
                "[agent]\nlisten = \"0.0.0.0:7443\"\ntls_cert = \"/a.pem\"",
                "it needs agent.tls_key, agent.tls_client_ca (--tls-key, --tls-client-ca)",
            ),
            (
                "[agent]\ninsecure_listen = \"7080\"",
                "agent.insecure_listen \"7080\": expected HOST:PORT",
            ),
            (
                "[agent]\ninsecure_listen = \"h:http\"",
                "invalid port \"http\"",
            ),
            ("[agent]\ninsecure_listen = \"::1:80\"", "in brackets"),
            ("[agent.authz]\nwriter = []", "unknown field `writer`"),
        ];
        for (text, why) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err:?} lacks {why:?}");
        }
    }

    #[test]
    fn bad_breakers_say_why() {
        let svc = "[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.4:1\"]\n[service.breaker]\n";
        let cases = [
            (
                "preset = \"hystrix\"",
                "service \"a\": breaker: unknown preset \"hystrix\" (known: gobreaker, nginx, envoy)",
            ),
            ("failure_ratio = 1.5", "failure_ratio 1.5 is outside 0..=1"),
            ("failure_ratio = nan", "failure_ratio NaN is outside 0..=1"),
            ("open_timeout = \"0s\"", "open_timeout must be more than 0"),
            (
                "open_timeout = \"30\"",
                "open_timeout: invalid duration \"30\"",
            ),
            ("half_open_max = 0", "half_open_max must be at least 1"),
            (
                "errno = \"EIO\"",
                "unknown errno \"EIO\" (allowed: ECONNREFUSED, EHOSTUNREACH, EPERM)",
            ),
            ("consecutive_failures = 0", "the policy has no trip rule"),
            ("treshold = 3", "unknown field `treshold`"),
        ];
        for (body, why) in cases {
            let text = format!("{svc}{body}");
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err:?} lacks {why:?}");
        }
    }
}
