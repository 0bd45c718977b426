//! Every call of the service, made directly on it over the in-memory kernel: the messages it
//! answers with, and the status (code and message) of each bad request.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use breakwater_common::{counter, hist_kind, tcp_state, v4_mapped, SockRecord};
use futures::StreamExt as _;
use tonic::{Code, Request};

use super::*;
use crate::{
    config::{Config, Overrides},
    core::{
        features::{Feature, Features},
        memory::{MemoryKernel, Outcome, NETNS},
        Kernel as _,
    },
    netns::NetSettings,
};

const UP: &str = "127.0.0.1:1001";
const CLOSED: &str = "127.0.0.1:1002";
const OTHER: &str = "127.0.0.1:2000";

fn addr(a: &str) -> SocketAddr {
    a.parse().unwrap()
}

struct Rig {
    kernel: MemoryKernel,
    core: Arc<Mutex<Core>>,
    api: AgentService,
    authz: authz::Authz,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        Self::with(MemoryKernel::new(), "")
    }

    /// An agent started with `toml` as its config file.
    fn with(kernel: MemoryKernel, toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("breakwater.toml");
        std::fs::write(&path, toml).unwrap();
        let config = Config::load(&path).unwrap();
        let mut core = Core::new(
            kernel.clone(),
            config.clone(),
            Some(path.clone()),
            Overrides::default(),
        );
        core.apply_config(&config).unwrap();
        let authz = authz::Authz::new(&config.agent.authz);
        let core = Arc::new(Mutex::new(core.into_dyn()));
        let api = AgentService::new(core.clone(), authz.clone(), NETNS, Some(path.clone()));
        Self {
            kernel,
            core,
            api,
            authz,
            config: path,
            _dir: dir,
        }
    }

    /// What the ring buffers carried, to the core.
    fn deliver(&self) {
        let mut core = self.core.lock().unwrap();
        core.on_kernel_events(&self.kernel.take_events());
        core.on_connection_events(&self.kernel.take_conn_events());
    }

    async fn put(&self, name: &str, endpoints: &[&str]) -> Result<pb::PutServiceResponse, Status> {
        self.api
            .put_service(Request::new(pb::PutServiceRequest {
                name: name.into(),
                endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            }))
            .await
            .map(Response::into_inner)
    }

    async fn set_policy(&self, req: pb::SetPolicyRequest) -> Result<pb::Breaker, Status> {
        self.api
            .set_policy(Request::new(req))
            .await
            .map(|r| r.into_inner().breaker.unwrap())
    }

    async fn breaker(&self, service: &str) -> Result<pb::Breaker, Status> {
        self.api
            .get_breaker(Request::new(pb::GetBreakerRequest {
                service: service.into(),
            }))
            .await
            .map(|r| r.into_inner().breaker.unwrap())
    }

    async fn destinations(
        &self,
        req: pb::ListDestinationsRequest,
    ) -> Result<Vec<pb::Destination>, Status> {
        self.api
            .list_destinations(Request::new(req))
            .await
            .map(|r| r.into_inner().destinations)
    }

    async fn reload(&self, toml: &str) -> Result<pb::ReloadConfigResponse, Status> {
        std::fs::write(&self.config, toml).unwrap();
        self.api
            .reload_config(Request::new(pb::ReloadConfigRequest {}))
            .await
            .map(Response::into_inner)
    }

    fn service_names(&self) -> Vec<String> {
        let core = self.core.lock().unwrap();
        core.services().iter().map(|s| s.name.clone()).collect()
    }
}

/// The code and message of a refused call.
fn refused<T>(r: Result<T, Status>) -> (Code, String) {
    match r {
        Ok(_) => panic!("the call was not refused"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

fn invalid(message: &str) -> (Code, String) {
    (Code::InvalidArgument, message.to_owned())
}

fn policy(service: &str) -> pb::SetPolicyRequest {
    pb::SetPolicyRequest {
        service: service.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn services_are_put_listed_and_deleted() {
    let rig = Rig::new();
    let r = rig
        .put("db", &["127.0.0.1:5432", "10.0.0.0/24:5432"])
        .await
        .unwrap();
    assert!(!r.replaced);
    let s = r.service.unwrap();
    assert_eq!(s.name, "db");
    assert_eq!(s.endpoints, ["10.0.0.0/24:5432", "127.0.0.1:5432"]);
    assert_eq!(s.outbound, Some(pb::ConnCounts::default()));
    assert!(rig.put("db", &["127.0.0.1:5432"]).await.unwrap().replaced);
    for (name, endpoints, want) in [
        (
            "bad name",
            &["127.0.0.1:1"][..],
            "invalid service name \"bad name\": use 1-63 characters of A-Z a-z 0-9 . _ -, \
             starting with a letter or digit",
        ),
        (
            "web",
            &["127.0.0.1"],
            "invalid endpoint \"127.0.0.1\": missing \":port\" (expected IP:port, CIDR:port, \
             [IPv6]:port or [CIDR6]:port)",
        ),
        ("web", &[], "service \"web\" has no endpoints"),
        (
            "web",
            &["127.0.0.1:5432"],
            "endpoint 127.0.0.1:5432 already belongs to service \"db\"",
        ),
    ] {
        assert_eq!(refused(rig.put(name, endpoints).await), invalid(want));
    }
    assert_eq!(rig.service_names(), ["db"]);

    let list = rig
        .api
        .list_services(Request::new(pb::ListServicesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.services.len(), 1);
    assert_eq!(list.services[0].endpoints, ["127.0.0.1:5432"]);

    let delete = |name: &str| {
        rig.api
            .delete_service(Request::new(pb::DeleteServiceRequest { name: name.into() }))
    };
    delete("db").await.unwrap();
    assert_eq!(
        refused(delete("db").await),
        (Code::NotFound, "no service named \"db\"".into())
    );
    assert!(rig.service_names().is_empty());
}

#[tokio::test]
async fn services_beyond_the_maps_are_refused() {
    let rig = Rig::with(MemoryKernel::new(), "[maps]\nmax_services = 1\n");
    rig.put("db", &[UP]).await.unwrap();
    assert_eq!(
        refused(rig.put("web", &[OTHER]).await),
        (
            Code::ResourceExhausted,
            "all 1 service slots are in use (maps.max_services)".into()
        )
    );
}

#[tokio::test]
async fn services_report_their_counts_and_connect_latency() {
    let rig = Rig::new();
    rig.put("db", &[UP, CLOSED]).await.unwrap();
    let c = rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    rig.kernel.close(c);
    rig.kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    rig.kernel.add_samples(addr(UP), hist_kind::CONNECT, 40, 10);
    let s = rig
        .api
        .list_services(Request::new(pb::ListServicesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .services
        .remove(0);
    assert_eq!(
        s.outbound,
        Some(pb::ConnCounts {
            active: 1,
            opened: 2,
            closed: 1,
            failed_refused: 1,
            ..Default::default()
        })
    );
    assert_eq!(s.inbound, Some(pb::ConnCounts::default()));
    assert!(s.connect_p50_us >= 40 && s.connect_p50_us < 50, "{s:?}");
}

#[tokio::test]
async fn destinations_are_filtered_sorted_and_limited() {
    let rig = Rig::new();
    rig.put("db", &[UP, CLOSED]).await.unwrap();
    let c = rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    rig.kernel.close(c);
    for _ in 0..3 {
        rig.kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    }
    rig.kernel.connect(addr(OTHER), Outcome::Timeout).unwrap();
    rig.kernel.connect(addr(OTHER), Outcome::Other).unwrap();
    let ports = |d: &[pb::Destination]| d.iter().map(|d| d.port).collect::<Vec<_>>();

    let all = rig.destinations(Default::default()).await.unwrap();
    // By active, then by address and port.
    assert_eq!(ports(&all), [1001, 1002, 2000]);
    assert_eq!(
        all[0],
        pb::Destination {
            address: "127.0.0.1".into(),
            port: 1001,
            service: "db".into(),
            direction: pb::Direction::Outbound.into(),
            netns: NETNS,
            active: 1,
            opened: 2,
            closed: 1,
            ..Default::default()
        }
    );
    assert_eq!(all[2].service, "");
    let sorted = |sort: pb::DestinationSort| pb::ListDestinationsRequest {
        sort: sort.into(),
        ..Default::default()
    };
    let failed = rig
        .destinations(sorted(pb::DestinationSort::Failed))
        .await
        .unwrap();
    assert_eq!(ports(&failed), [1002, 2000, 1001]);
    let opened = rig
        .destinations(sorted(pb::DestinationSort::Opened))
        .await
        .unwrap();
    assert_eq!(ports(&opened), [1001, 1002, 2000]);
    let req = pb::ListDestinationsRequest {
        service: "db".into(),
        limit: 1,
        sort: pb::DestinationSort::Failed.into(),
        ..Default::default()
    };
    assert_eq!(ports(&rig.destinations(req).await.unwrap()), [1002]);
    let inbound = pb::ListDestinationsRequest {
        direction: pb::Direction::Inbound.into(),
        ..Default::default()
    };
    assert!(rig.destinations(inbound).await.unwrap().is_empty());

    for (req, want) in [
        (
            pb::ListDestinationsRequest {
                sort: 9,
                ..Default::default()
            },
            invalid("sort: unknown value 9"),
        ),
        (
            pb::ListDestinationsRequest {
                direction: 7,
                ..Default::default()
            },
            invalid("direction: unknown value 7"),
        ),
        (
            pb::ListDestinationsRequest {
                service: "web".into(),
                ..Default::default()
            },
            (Code::NotFound, "no service named \"web\"".into()),
        ),
    ] {
        assert_eq!(refused(rig.destinations(req).await), want);
    }
}

#[tokio::test]
async fn connections_are_listed_oldest_first() {
    let rig = Rig::new();
    rig.put("db", &[UP]).await.unwrap();
    rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    rig.kernel.advance(Duration::from_secs(2));
    rig.kernel
        .connect(addr(OTHER), Outcome::Established)
        .unwrap();
    let list = |service: &str, limit| {
        rig.api
            .list_connections(Request::new(pb::ListConnectionsRequest {
                service: service.into(),
                limit,
            }))
    };
    let all = list("", 0).await.unwrap().into_inner().connections;
    assert_eq!(all.len(), 2);
    let c = &all[0];
    assert_eq!(
        (c.remote_address.as_str(), c.remote_port, c.age_ms),
        ("127.0.0.1", 1001, 2000)
    );
    assert_eq!(
        (c.state.as_str(), c.service.as_str(), c.comm.as_str(), c.pid),
        (tcp_state::name(tcp_state::ESTABLISHED), "db", "test", 4242)
    );
    assert_eq!(c.direction(), pb::Direction::Outbound);
    assert_eq!((all[1].service.as_str(), all[1].age_ms), ("", 0));
    let db = list("db", 0).await.unwrap().into_inner().connections;
    assert_eq!(db.len(), 1);
    let oldest = list("", 1).await.unwrap().into_inner().connections;
    assert_eq!(oldest[0].remote_port, 1001);
    assert_eq!(
        refused(list("web", 0).await),
        (Code::NotFound, "no service named \"web\"".into())
    );
}

/// `StreamConnections`' messages, or its status.
async fn streamed(
    rig: &Rig,
    service: &str,
    limit: u32,
) -> Result<Vec<Vec<pb::Connection>>, Status> {
    let stream = rig
        .api
        .stream_connections(Request::new(pb::StreamConnectionsRequest {
            service: service.into(),
            limit,
        }))
        .await?
        .into_inner();
    stream
        .map(|m| m.map(|m| m.connections))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[tokio::test]
async fn connections_are_streamed_in_chunks_as_listed() {
    let rig = Rig::new();
    rig.put("db", &[UP]).await.unwrap();
    rig.put("idle", &["127.0.0.1:3000"]).await.unwrap();
    // 2,500, of which 500 to db; many of the same age, so that the cookie orders them.
    for i in 0..2500 {
        if i > 0 && i % 100 == 0 {
            rig.kernel.advance(Duration::from_millis(3));
        }
        let to = if i % 5 == 0 { UP } else { OTHER };
        rig.kernel.connect(addr(to), Outcome::Established).unwrap();
    }
    let unary = |service: &str, limit| {
        rig.api
            .list_connections(Request::new(pb::ListConnectionsRequest {
                service: service.into(),
                limit,
            }))
    };
    let sizes = |chunks: &[Vec<pb::Connection>]| chunks.iter().map(Vec::len).collect::<Vec<_>>();

    let chunks = streamed(&rig, "", 0).await.unwrap();
    assert_eq!(sizes(&chunks), [1000, 1000, 500]);
    let all: Vec<pb::Connection> = chunks.concat();
    assert_eq!(all, unary("", 0).await.unwrap().into_inner().connections);
    // Oldest first, then by cookie, across the chunks.
    assert!(all
        .windows(2)
        .all(|w| (w[0].age_ms, w[1].cookie) > (w[1].age_ms, w[0].cookie)));
    assert_eq!((all[0].age_ms, all[2499].age_ms), (72, 0));

    let db = streamed(&rig, "db", 0).await.unwrap().concat();
    assert_eq!(db.len(), 500);
    assert!(db
        .iter()
        .all(|c| c.service == "db" && c.remote_port == 1001));
    assert_eq!(db, unary("db", 0).await.unwrap().into_inner().connections);

    for limit in [1, 999, 1000, 1001, 2500, 3000] {
        let chunks = streamed(&rig, "", limit).await.unwrap();
        let n = (limit as usize).min(2500);
        assert_eq!(chunks.concat(), all[..n], "limit {limit}");
        assert!(chunks.iter().all(|c| (1..=1000).contains(&c.len())));
        assert_eq!(
            unary("", limit).await.unwrap().into_inner().connections,
            all[..n]
        );
    }
    let db_limited = streamed(&rig, "db", 20).await.unwrap().concat();
    assert_eq!(db_limited, db[..20]);

    // Nothing to list: no message. An unknown service: refused before any.
    assert_eq!(
        streamed(&rig, "idle", 0).await.unwrap(),
        Vec::<Vec<_>>::new()
    );
    assert_eq!(
        refused(streamed(&rig, "web", 0).await),
        (Code::NotFound, "no service named \"web\"".into())
    );
}

/// The largest a connection can encode to, times a message's count, is far from the 4 MiB a
/// client with default settings accepts.
#[test]
fn a_stream_message_fits_a_default_client() {
    use prost::Message as _;
    let row = crate::core::listing::ConnRow {
        cookie: u64::MAX,
        age_ms: u64::MAX,
        cgroup_id: u64::MAX,
        saddr: [0xff; 16],
        daddr: [0xfe; 16],
        // Not UTF-8: each byte becomes a 3-byte replacement character.
        comm: [0xff; 16],
        netns: u32::MAX,
        pid: u32::MAX,
        service: 1,
        sport: u16::MAX,
        dport: u16::MAX,
        state: tcp_state::CLOSE_WAIT,
        direction: breakwater_common::direction::INBOUND,
    };
    let name = "s".repeat(63);
    crate::core::service::validate_name(&name).unwrap();
    let c = convert::connection_message(&crate::core::listing::Connection {
        row: &row,
        service: &name,
    });
    assert_eq!(c.comm.len(), 48);
    let largest = c.encoded_len() + 3;
    assert!(largest < 300, "{largest}");
    assert!(largest * CONNECTIONS_PER_MESSAGE < (4 << 20) / 10);
}

/// 60 ports from 10.0.0.1 to 10.0.0.9:5432 in a namespace of 100 ephemeral ports, 40 of them
/// in TIME_WAIT.
fn pressured_namespace() -> (u32, Vec<SockRecord>, NetSettings) {
    let settings = NetSettings {
        port_range: (50000, 50099),
        ..Default::default()
    };
    let socks = (0..60)
        .map(|i| SockRecord {
            saddr: v4_mapped([10, 0, 0, 1]),
            daddr: v4_mapped([10, 0, 0, 9]),
            sport: 50000 + i,
            dport: 5432,
            state: if i < 40 {
                tcp_state::TIME_WAIT
            } else {
                tcp_state::ESTABLISHED
            },
            ..Default::default()
        })
        .collect();
    (7, socks, settings)
}

#[tokio::test]
async fn time_wait_and_port_pressure_name_their_services() {
    let rig = Rig::new();
    rig.put("db", &["10.0.0.0/24:5432"]).await.unwrap();
    rig.kernel.set_sockets(vec![pressured_namespace()]);
    let r = rig
        .api
        .get_time_wait(Request::new(pb::GetTimeWaitRequest { limit: 0 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.destinations,
        [pb::TimeWaitDestination {
            address: "10.0.0.9".into(),
            port: 5432,
            direction: pb::Direction::Outbound.into(),
            netns: 7,
            service: "db".into(),
            time_wait: 40,
            entered_per_s: 0.0,
        }]
    );
    let p = &r.pressure[0];
    assert_eq!(
        (
            p.source_address.as_str(),
            p.address.as_str(),
            p.service.as_str()
        ),
        ("10.0.0.1", "10.0.0.9", "db")
    );
    assert_eq!(
        (p.ports_in_use, p.time_wait, p.level()),
        (60, 40, pb::PressureLevel::Warn)
    );
    assert_eq!((p.port_range_low, p.port_range_high), (50000, 50099));
    assert!((p.ratio - 0.6).abs() < 1e-9);
    assert_eq!(
        r.services,
        [pb::ServiceTimeWait {
            service: "db".into(),
            outbound: 40,
            inbound: 0
        }]
    );
}

#[tokio::test]
async fn the_advisor_finds_port_pressure() {
    let rig = Rig::new();
    rig.kernel.set_sockets(vec![pressured_namespace()]);
    let r = rig
        .api
        .advise(Request::new(pb::AdviseRequest {}))
        .await
        .unwrap()
        .into_inner();
    let f = r
        .findings
        .iter()
        .find(|f| f.kind == "port_pressure")
        .expect("a port_pressure finding");
    assert_eq!((f.severity(), f.netns), (pb::Severity::Warn, 7));
    assert!(f.evidence.contains("60 of 100 ephemeral ports"), "{f:?}");
    let n = &r.namespaces[0];
    assert_eq!((n.netns, n.sockets, n.time_wait), (7, 60, 40));
    assert_eq!((n.port_range_low, n.port_range_high), (50000, 50099));
}

#[tokio::test]
async fn latency_of_a_service_or_a_destination() {
    let mut features = MemoryKernel::new().features().clone();
    features.off(Feature::FirstResponseLatency, "no send hook");
    let rig = Rig::with(MemoryKernel::with_features(features), "");
    rig.put("db", &[UP]).await.unwrap();
    rig.kernel.add_samples(addr(UP), hist_kind::CONNECT, 40, 20);
    let latency = |service: &str, destination: &str, kinds: &[&str]| {
        rig.api.get_latency(Request::new(pb::GetLatencyRequest {
            service: service.into(),
            destination: destination.into(),
            netns: 0,
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
        }))
    };
    let r = latency("db", "", &[]).await.unwrap().into_inner();
    let kinds: Vec<&str> = r.histograms.iter().map(|h| h.kind.as_str()).collect();
    assert_eq!(kinds, ["connect", "srtt", "lifetime"]);
    assert_eq!(r.histograms[0].count, 20);
    assert_eq!(r.features_off.len(), 1);
    assert_eq!(
        (
            r.features_off[0].name.as_str(),
            r.features_off[0].reason.as_str()
        ),
        ("first_response_latency", "no send hook")
    );
    let r = latency("", UP, &["connect"]).await.unwrap().into_inner();
    assert_eq!((r.histograms.len(), r.histograms[0].count), (1, 20));
    let b = &r.histograms[0].buckets[0];
    assert_eq!((b.count, b.low_us <= 40, b.high_us > 40), (20, true, true));

    for (service, destination, kinds, want) in [
        (
            "",
            "",
            &[][..],
            invalid("give either a service or a destination (IP:port), not both and not neither"),
        ),
        (
            "",
            "10.0.0.0/8:80",
            &[],
            invalid("destination \"10.0.0.0/8:80\" must be one address, not a network"),
        ),
        (
            "db",
            "",
            &["rtt"],
            invalid(
                "unknown latency kind \"rtt\" (known: connect, first_response, srtt, lifetime)",
            ),
        ),
        (
            "db",
            "",
            &["first_response"],
            (
                Code::FailedPrecondition,
                "first_response_latency is off: no send hook".into(),
            ),
        ),
        (
            "web",
            "",
            &[],
            (Code::NotFound, "no service named \"web\"".into()),
        ),
    ] {
        assert_eq!(refused(latency(service, destination, kinds).await), want);
    }
}

#[tokio::test]
async fn agent_info_reports_the_kernel_side() {
    let rig = Rig::new();
    rig.kernel.set_counter(counter::UNDERFLOWS, 2);
    let r = rig
        .api
        .get_agent_info(Request::new(pb::GetAgentInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        (r.host_netns, r.config_path.clone()),
        (NETNS, rig.config.display().to_string())
    );
    assert_eq!(r.features.len(), Feature::ALL.len());
    assert!(r
        .features
        .iter()
        .all(|f| f.status() == pb::FeatureStatus::On));
    assert_eq!(r.programs[0].name, "bw_memory");
    assert_eq!(r.maps[0].name, "BW_DESTS");
    let counters: Vec<&str> = r.counters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(counters, counter::NAMES);
    assert_eq!(r.counters[counter::UNDERFLOWS as usize].value, 2);
}

#[tokio::test]
async fn policies_are_set_read_and_cleared() {
    let rig = Rig::new();
    rig.put("db", &[UP, CLOSED]).await.unwrap();
    let no_policy = invalid(
        "service \"db\" has no breaker policy (set one with `breakwater policy set db --preset \
         gobreaker`)",
    );
    assert_eq!(refused(rig.breaker("db").await), no_policy);
    assert_eq!(
        refused(rig.breaker("web").await),
        invalid("no service named \"web\"")
    );

    let b = rig
        .set_policy(pb::SetPolicyRequest {
            preset: "nginx".into(),
            open_timeout_ms: Some(5000),
            ..policy("db")
        })
        .await
        .unwrap();
    assert_eq!(
        (b.service.as_str(), b.state()),
        ("db", pb::BreakerState::Closed)
    );
    let p = b.policy.unwrap();
    assert_eq!(
        (p.max_failures, p.interval_ms, p.open_timeout_ms),
        (3, 30_000, 5000)
    );
    assert_eq!(rig.breaker("db").await.unwrap().policy, Some(p.clone()));
    let list = rig
        .api
        .list_breakers(Request::new(pb::ListBreakersRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.breakers.len(), 1);

    for (req, want) in [
        (
            pb::SetPolicyRequest {
                failure_ratio: Some(1.5),
                ..policy("db")
            },
            invalid("failure_ratio 1.5 is outside 0..=1"),
        ),
        (
            pb::SetPolicyRequest {
                errno: Some("ETIMEDOUT".into()),
                ..policy("db")
            },
            invalid("unknown errno \"ETIMEDOUT\" (allowed: ECONNREFUSED, EHOSTUNREACH, EPERM)"),
        ),
        (policy("web"), invalid("no service named \"web\"")),
    ] {
        assert_eq!(refused(rig.set_policy(req).await), want);
    }
    // The refused ones changed nothing.
    assert_eq!(rig.breaker("db").await.unwrap().policy, Some(p));

    let clear = |service: &str| {
        rig.api.clear_policy(Request::new(pb::ClearPolicyRequest {
            service: service.into(),
        }))
    };
    clear("db").await.unwrap();
    assert_eq!(refused(rig.breaker("db").await), no_policy);
    assert_eq!(refused(clear("db").await), no_policy);
}

#[tokio::test]
async fn trips_and_resets() {
    let rig = Rig::new();
    rig.put("db", &[UP, CLOSED]).await.unwrap();
    rig.set_policy(policy("db")).await.unwrap();
    rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    let trip = |ttl_ms, reason: &str| {
        rig.api.trip(Request::new(pb::TripRequest {
            service: "db".into(),
            ttl_ms,
            reason: reason.into(),
            ..Default::default()
        }))
    };
    assert_eq!(
        refused(trip(Some(0), "").await),
        invalid("ttl_ms must be more than 0 (leave it unset to trip until reset)")
    );
    assert_eq!(
        refused(trip(None, &"x".repeat(129)).await),
        invalid("reason is 129 bytes long (at most 128)")
    );
    let r = trip(Some(30_000), "maintenance")
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.terminated, r.not_terminated.as_str()), (1, ""));
    assert_eq!(rig.kernel.live(), 0);
    let b = r.breaker.unwrap();
    assert_eq!(
        (b.state(), b.forced, b.trips),
        (pb::BreakerState::Open, true, 1)
    );
    assert_eq!(
        (b.reason.as_str(), b.open_remaining_ms),
        ("maintenance", 30_000)
    );
    assert_eq!(
        rig.kernel.connect(addr(UP), Outcome::Established),
        Err(libc::ECONNREFUSED)
    );
    assert_eq!(rig.breaker("db").await.unwrap().rejected, 1);

    let reset = |service: &str| {
        rig.api.reset(Request::new(pb::ResetRequest {
            service: service.into(),
            ..Default::default()
        }))
    };
    let b = reset("db").await.unwrap().into_inner().breaker.unwrap();
    assert_eq!(
        (b.state(), b.forced, b.reason.as_str()),
        (pb::BreakerState::Closed, false, "")
    );
    assert_eq!(
        refused(reset("web").await),
        invalid("no service named \"web\"")
    );
}

#[tokio::test]
async fn a_trip_says_why_it_kept_the_connections() {
    let mut features = MemoryKernel::new().features().clone();
    features.off(Feature::TerminateOnTrip, "no SOCK_DESTROY");
    let rig = Rig::with(MemoryKernel::with_features(features), "");
    rig.put("db", &[UP]).await.unwrap();
    rig.set_policy(policy("db")).await.unwrap();
    rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    let r = rig
        .api
        .trip(Request::new(pb::TripRequest {
            service: "db".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.terminated, r.not_terminated.as_str()),
        (0, "terminate_on_trip is off: no SOCK_DESTROY")
    );
    assert_eq!(rig.kernel.live(), 1);
    assert_eq!(r.breaker.unwrap().state(), pb::BreakerState::Open);
}

#[tokio::test]
async fn breaker_events_are_watched() {
    let rig = Rig::new();
    rig.put("db", &[UP, CLOSED]).await.unwrap();
    rig.put("web", &[OTHER]).await.unwrap();
    for s in ["db", "web"] {
        rig.set_policy(pb::SetPolicyRequest {
            consecutive_failures: Some(1),
            ..policy(s)
        })
        .await
        .unwrap();
    }
    let watch = |service: &str| {
        rig.api
            .watch_breaker_events(Request::new(pb::WatchBreakerEventsRequest {
                service: service.into(),
            }))
    };
    assert_eq!(
        refused(watch("x").await),
        (Code::NotFound, "no service named \"x\"".into())
    );
    let mut events = watch("db").await.unwrap().into_inner();
    rig.kernel.connect(addr(OTHER), Outcome::Refused).unwrap();
    rig.kernel.connect(addr(CLOSED), Outcome::Refused).unwrap();
    rig.deliver();
    let e = events.next().await.unwrap().unwrap();
    assert_eq!(e.service, "db");
    assert_eq!(
        (e.from(), e.to(), e.cause()),
        (
            pb::BreakerState::Closed,
            pb::BreakerState::Open,
            pb::BreakerCause::ConsecutiveFailures
        )
    );
    assert_eq!((e.requests, e.failures, e.lost), (1, 1, 0));
}

#[tokio::test]
async fn connection_events_are_watched() {
    let rig = Rig::new();
    rig.put("db", &[UP]).await.unwrap();
    let watch = |service: &str| {
        rig.api
            .watch_connections(Request::new(pb::WatchConnectionsRequest {
                service: service.into(),
            }))
    };
    assert_eq!(
        refused(watch("x").await),
        (Code::NotFound, "no service named \"x\"".into())
    );
    let mut events = watch("db").await.unwrap().into_inner();
    let c = rig.kernel.connect(addr(UP), Outcome::Established).unwrap();
    rig.kernel.close(c);
    rig.deliver();
    let opened = events.next().await.unwrap().unwrap();
    assert_eq!(opened.kind(), pb::ConnectionEventKind::Opened);
    assert_eq!(
        (
            opened.remote_address.as_str(),
            opened.remote_port,
            opened.service.as_str()
        ),
        ("127.0.0.1", 1001, "db")
    );
    assert_eq!(
        (opened.local_address.as_str(), opened.netns),
        ("127.0.0.1", NETNS)
    );
    let closed = events.next().await.unwrap().unwrap();
    assert_eq!(closed.kind(), pb::ConnectionEventKind::Closed);

    let mut features = Features::default();
    features.off(
        Feature::AuditStream,
        "disabled by configuration (features.disable)",
    );
    let off = Rig::with(MemoryKernel::with_features(features), "");
    let r = off
        .api
        .watch_connections(Request::new(pb::WatchConnectionsRequest::default()))
        .await;
    assert_eq!(
        refused(r),
        (
            Code::FailedPrecondition,
            "audit_stream is off: disabled by configuration (features.disable)".into()
        )
    );
}

#[tokio::test]
async fn a_reload_applies_the_difference() {
    let rig = Rig::with(
        MemoryKernel::new(),
        &format!("[[service]]\nname = \"db\"\nendpoints = [\"{UP}\"]\n\n[[service]]\nname = \"old\"\nendpoints = [\"{OTHER}\"]\n"),
    );
    rig.kernel.add_cgroup("/app");
    let r = rig
        .reload(&format!(
            "[breaker]\nscope = [\"/\", \"/app\"]\n\n\
             [[service]]\nname = \"db\"\nendpoints = [\"{UP}\", \"{CLOSED}\"]\n\
             [service.breaker]\npreset = \"nginx\"\n\n\
             [[service]]\nname = \"web\"\nendpoints = [\"10.0.0.1:80\"]\n"
        ))
        .await
        .unwrap();
    assert_eq!(
        r,
        pb::ReloadConfigResponse {
            config_path: rig.config.display().to_string(),
            services_added: vec!["web".into()],
            services_changed: vec!["db".into()],
            services_removed: vec!["old".into()],
            policies_changed: vec!["db".into()],
            scope_added: vec!["/app".into()],
            scope_removed: vec![],
            applied: vec![],
            pending_restart: vec![],
        }
    );
    assert_eq!(rig.service_names(), ["db", "web"]);
    assert_eq!(rig.kernel.scope(), ["/app"]);
    assert_eq!(
        rig.breaker("db")
            .await
            .unwrap()
            .policy
            .unwrap()
            .max_failures,
        3
    );
}

#[tokio::test]
async fn a_reload_that_cannot_apply_changes_nothing() {
    let rig = Rig::with(
        MemoryKernel::new(),
        &format!("[[service]]\nname = \"db\"\nendpoints = [\"{UP}\"]\n"),
    );
    let path = rig.config.display().to_string();
    for (toml, want) in [
        (
            "[maps]\nmax_services = 7\n".to_owned(),
            format!("{path}: [maps] changed: map sizes take effect only when the agent restarts"),
        ),
        (
            "[breaker]\nscope = [\"/\", \"/nowhere\"]\n".to_owned(),
            format!("{path}: breaker.scope \"/nowhere\": no such cgroup (memory)"),
        ),
        (
            format!("[[service]]\nname = \"web\"\nendpoints = [\"{UP}\", \"10.0.0.1\"]\n"),
            format!(
                "{path}: invalid endpoint \"10.0.0.1\": missing \":port\" (expected IP:port, \
                 CIDR:port, [IPv6]:port or [CIDR6]:port)"
            ),
        ),
    ] {
        let (code, message) = refused(rig.reload(&toml).await);
        assert_eq!(code, Code::InvalidArgument, "{toml}");
        assert!(message.starts_with(&want), "{toml}: {message}");
        assert_eq!(rig.service_names(), ["db"], "{toml}");
    }
    assert!(rig.kernel.scope().is_empty());

    let core = Core::new(
        MemoryKernel::new(),
        Config::default(),
        None,
        Overrides::default(),
    );
    let api = AgentService::new(
        Arc::new(Mutex::new(core.into_dyn())),
        authz::Authz::new(&Config::default().agent.authz),
        NETNS,
        None,
    );
    let r = api
        .reload_config(Request::new(pb::ReloadConfigRequest {}))
        .await;
    assert_eq!(
        refused(r),
        invalid("the agent was started without --config: there is no file to reload")
    );
}

#[tokio::test]
async fn a_reload_changes_who_may_write() {
    let rig = Rig::new();
    let caller = authz::Caller::Unix {
        uid: 1000,
        gid: 1000,
        groups: vec![],
        pid: None,
    };
    let trip = "/breakwater.v1.Agent/Trip";
    assert!(rig.authz.check(&caller, trip).is_err());
    rig.reload("[agent.authz]\nwriter_uids = [0, 1000]\n")
        .await
        .unwrap();
    assert!(rig.authz.check(&caller, trip).is_ok());
}

#[test]
fn errors_keep_their_status_codes() {
    let code = |e: Error| Status::from(e).code();
    assert_eq!(code(Error::invalid("x")), tonic::Code::InvalidArgument);
    assert_eq!(code(Error::NotFound("x".into())), tonic::Code::NotFound);
    assert_eq!(
        code(Error::ResourceExhausted("x".into())),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(code(Error::Internal("x".into())), tonic::Code::Internal);
    assert_eq!(
        code(Error::FeatureOff("x".into())),
        tonic::Code::FailedPrecondition
    );
}
