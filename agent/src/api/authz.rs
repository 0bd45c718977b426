//! Who may change state through the API: one tower layer in front of every listener.
//!
//! Reading is open to every caller that gets a connection (over TLS that means a client
//! certificate the agent verified). Calls that change state ([`MUTATING`]) need an identity on
//! the `[agent.authz]` allow-list: a client certificate's SAN (DNS or URI) or CN over TLS, the
//! peer's uid, primary gid (SO_PEERCRED) or a supplementary group (SO_PEERGROUPS) on the unix
//! socket. Callers of the insecure TCP listener have no identity: they may change state only
//! with `insecure_writers = true`.
//! A refused call gets `PermissionDenied` and never reaches the service; an allowed one is
//! logged with its caller and outcome.

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use tonic::{
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tracing::{info, warn};

use crate::{config::AuthzConfig, error::Error};

/// The methods that change state; everything else is a read.
pub const MUTATING: &[&str] = &[
    "/breakwater.v1.Agent/Trip",
    "/breakwater.v1.Agent/Reset",
    "/breakwater.v1.Agent/SetPolicy",
    "/breakwater.v1.Agent/ClearPolicy",
    "/breakwater.v1.Agent/PutService",
    "/breakwater.v1.Agent/DeleteService",
    "/breakwater.v1.Agent/ReloadConfig",
];

/// Who is calling, from the connection the request came on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The unix socket: the peer process's credentials when it connected.
    Unix {
        uid: u32,
        gid: u32,
        /// Supplementary groups.
        groups: Vec<u32>,
        pid: Option<i32>,
    },
    /// TLS: the names in the verified client certificate.
    Certificate(CertNames),
    /// Plain TCP (`insecure_listen`): only an address.
    Anonymous { peer: Option<std::net::SocketAddr> },
    /// Nothing known about the connection (e.g. an in-process transport).
    Unknown,
}

/// The identities a client certificate carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertNames {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub cn: Option<String>,
}

impl CertNames {
    /// Reads the SANs and the subject CN of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let mut names = CertNames {
            cn: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            ..Default::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => names.uris.push((*u).to_owned()),
                    GeneralName::DNSName(d) => names.dns.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        Ok(names)
    }

    fn all(&self) -> impl Iterator<Item = &str> {
        self.uris
            .iter()
            .chain(&self.dns)
            .map(String::as_str)
            .chain(self.cn.as_deref())
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unix {
                uid,
                gid,
                groups,
                pid,
            } => {
                write!(f, "uid {uid} gid {gid}")?;
                if !groups.is_empty() {
                    write!(f, " groups {groups:?}")?;
                }
                if let Some(pid) = pid {
                    write!(f, " (pid {pid})")?;
                }
                Ok(())
            }
            Caller::Certificate(names) => {
                let mut parts: Vec<String> =
                    names.uris.iter().map(|u| format!("URI {u}")).collect();
                parts.extend(names.dns.iter().map(|d| format!("DNS {d}")));
                parts.extend(names.cn.iter().map(|c| format!("CN {c}")));
                if parts.is_empty() {
                    write!(f, "client certificate without names")
                } else {
                    write!(f, "client certificate [{}]", parts.join(", "))
                }
            }
            Caller::Anonymous { peer: Some(peer) } => {
                write!(f, "unauthenticated TCP client {peer}")
            }
            Caller::Anonymous { peer: None } => write!(f, "unauthenticated TCP client"),
            Caller::Unknown => write!(f, "unknown caller"),
        }
    }
}

impl Caller {
    /// The caller of a request, from the connect info tonic put in its extensions.
    pub fn of(extensions: &http::Extensions) -> Self {
        if let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
            // The agent only serves TLS with required, verified client certificates: a request
            // here always has one. The leaf is the first.
            return match tls.peer_certs().as_deref().and_then(|c| c.first()) {
                Some(leaf) => match CertNames::from_der(leaf) {
                    Ok(names) => Caller::Certificate(names),
                    Err(why) => {
                        warn!(%why, "client certificate names unreadable");
                        Caller::Certificate(CertNames::default())
                    }
                },
                None => Caller::Anonymous {
                    peer: tls.get_ref().remote_addr(),
                },
            };
        }
        if let Some(UnixCaller(caller)) = extensions.get::<UnixCaller>() {
            return caller.clone();
        }
        if let Some(tcp) = extensions.get::<TcpConnectInfo>() {
            return Caller::Anonymous {
                peer: tcp.remote_addr(),
            };
        }
        Caller::Unknown
    }
}

/// The caller on a unix socket connection, read when it was accepted (`serve::UnixConn`):
/// tonic's own connect info has no supplementary groups.
#[derive(Clone, Debug)]
pub struct UnixCaller(pub Caller);

impl UnixCaller {
    /// The peer's credentials as the kernel recorded them when it connected.
    pub fn of(stream: &tokio::net::UnixStream) -> Self {
        use std::os::fd::AsRawFd as _;
        let caller = match stream.peer_cred() {
            Ok(cred) => Caller::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                groups: peer_groups(stream.as_raw_fd()).unwrap_or_else(|e| {
                    warn!(error = %e, "SO_PEERGROUPS: judging the caller by uid and gid only");
                    Vec::new()
                }),
                pid: cred.pid(),
            },
            Err(e) => {
                warn!(error = %e, "SO_PEERCRED: caller unknown");
                Caller::Unknown
            }
        };
        Self(caller)
    }
}

/// `SO_PEERGROUPS` (asm-generic/socket.h; not exported by libc for every target).
const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups of a unix socket's peer, as they were when it connected.
fn peer_groups(fd: std::os::fd::RawFd) -> std::io::Result<Vec<u32>> {
    let size = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len =
            libc::socklen_t::try_from(groups.len() * size).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` is `len` bytes long; the kernel writes at most that and sets `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // Too small: the kernel said how much it needs (at most NGROUPS_MAX).
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

/// The allow-list, as configured.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    writers: HashSet<String>,
    uids: HashSet<u32>,
    gids: HashSet<u32>,
    insecure_writers: bool,
}

impl From<&AuthzConfig> for Policy {
    fn from(c: &AuthzConfig) -> Self {
        Self {
            writers: c.writers.iter().cloned().collect(),
            uids: c.writer_uids.iter().copied().collect(),
            gids: c.writer_gids.iter().copied().collect(),
            insecure_writers: c.insecure_writers,
        }
    }
}

impl Policy {
    /// May `caller` call `method` (a gRPC path)? Reads always; changes if on the list.
    pub fn check(&self, caller: &Caller, method: &str) -> Result<(), Error> {
        if !MUTATING.contains(&method) {
            return Ok(());
        }
        let (allowed, how) = match caller {
            Caller::Unix {
                uid, gid, groups, ..
            } => (
                self.uids.contains(uid)
                    || self.gids.contains(gid)
                    || groups.iter().any(|g| self.gids.contains(g)),
                "neither its uid nor any of its groups is in agent.authz.writer_uids / writer_gids",
            ),
            Caller::Certificate(names) => (
                names.all().any(|n| self.writers.contains(n)),
                "none of its names is in agent.authz.writers",
            ),
            Caller::Anonymous { .. } => (
                self.insecure_writers,
                "the insecure listener has no identity (agent.authz.insecure_writers is off)",
            ),
            Caller::Unknown => (false, "the caller has no identity"),
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "permission denied: {caller} may not call {method}: {how}"
            )))
        }
    }
}

/// The policy every listener's layer reads; `update` swaps it (on a config reload).
#[derive(Clone, Debug, Default)]
pub struct Authz(Arc<RwLock<Policy>>);

impl Authz {
    pub fn new(config: &AuthzConfig) -> Self {
        Self(Arc::new(RwLock::new(config.into())))
    }

    pub fn update(&self, config: &AuthzConfig) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config.into();
    }

    pub fn check(&self, caller: &Caller, method: &str) -> Result<(), Error> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check(caller, method)
    }
}

impl<S> tower::Layer<S> for Authz {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            inner,
            authz: self.clone(),
        }
    }
}

/// A service behind the allow-list.
#[derive(Clone, Debug)]
pub struct Authorized<S> {
    inner: S,
    authz: Authz,
}

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        if !MUTATING.contains(&method.as_str()) {
            return Box::pin(self.inner.call(request));
        }
        let caller = Caller::of(request.extensions());
        if let Err(e) = self.authz.check(&caller, &method) {
            warn!(%caller, %method, "refused: {e}");
            let status = tonic::Status::from(e);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // The readied service answers this call; a clone takes its place (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            // An error comes back at once in the headers ("trailers-only"); success in the
            // trailers, after the body.
            let outcome = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(|code| tonic::Code::from_bytes(code.as_bytes()))
                .unwrap_or(tonic::Code::Ok);
            info!(%caller, %method, ?outcome, "change requested by {caller}");
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> Policy {
        let c: AuthzConfig = toml::from_str(toml).unwrap();
        (&c).into()
    }

    #[test]
    fn reads_are_open_and_changes_need_the_list() {
        let p = policy("writers = [\"spiffe://x/ops\", \"ops.example.com\"]\nwriter_gids = [50]");
        let cert = |uris: &[&str], dns: &[&str], cn: Option<&str>| {
            Caller::Certificate(CertNames {
                uris: uris.iter().map(|s| s.to_string()).collect(),
                dns: dns.iter().map(|s| s.to_string()).collect(),
                cn: cn.map(str::to_owned),
            })
        };
        let unix = |uid, gid| Caller::Unix {
            uid,
            gid,
            groups: vec![],
            pid: Some(7),
        };
        let anon = Caller::Anonymous { peer: None };
        let trip = "/breakwater.v1.Agent/Trip";
        let read = "/breakwater.v1.Agent/ListServices";
        for caller in [
            cert(&[], &[], None),
            unix(1000, 1000),
            anon.clone(),
            Caller::Unknown,
        ] {
            assert!(p.check(&caller, read).is_ok(), "{caller}");
            let err = p.check(&caller, trip).unwrap_err();
            assert!(matches!(err, Error::PermissionDenied(_)));
            let msg = err.to_string();
            assert!(
                msg.contains(&caller.to_string()) && msg.contains(trip),
                "{msg}"
            );
        }
        assert!(p.check(&cert(&["spiffe://x/ops"], &[], None), trip).is_ok());
        assert!(p
            .check(&cert(&[], &["ops.example.com"], None), trip)
            .is_ok());
        assert!(p
            .check(&cert(&[], &[], Some("ops.example.com")), trip)
            .is_ok());
        assert!(p
            .check(
                &cert(
                    &["spiffe://x/ops/more"],
                    &["x.ops.example.com"],
                    Some("ops")
                ),
                trip
            )
            .is_err());
        // The default list: root, by uid; here also gid 50.
        assert!(p.check(&unix(0, 0), trip).is_ok());
        assert!(p
            .check(&unix(1000, 50), "/breakwater.v1.Agent/ReloadConfig")
            .is_ok());
        assert!(policy("insecure_writers = true").check(&anon, trip).is_ok());
        assert!(policy("writer_uids = []").check(&unix(0, 0), trip).is_err());
        assert_eq!(
            p.check(&unix(65534, 65534), "/breakwater.v1.Agent/PutService")
                .unwrap_err()
                .to_string(),
            "permission denied: uid 65534 gid 65534 (pid 7) may not call \
             /breakwater.v1.Agent/PutService: neither its uid nor any of its groups is in \
             agent.authz.writer_uids / writer_gids"
        );
        // A supplementary group counts as much as the primary one.
        let member = |groups: Vec<u32>| Caller::Unix {
            uid: 1000,
            gid: 1000,
            groups,
            pid: None,
        };
        assert!(p.check(&member(vec![4, 50]), trip).is_ok());
        let outsider = member(vec![4, 27]);
        let err = p.check(&outsider, trip).unwrap_err().to_string();
        assert!(err.contains("uid 1000 gid 1000 groups [4, 27]"), "{err}");
        let status = tonic::Status::from(p.check(&anon, trip).unwrap_err());
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn certificate_names_are_its_sans_and_cn() {
        let mut params = rcgen::CertificateParams::new(vec![
            "ops.example.com".to_owned(),
            "spiffe://x/ops".to_owned(),
        ])
        .unwrap();
        // rcgen takes a name with a scheme for a DNS name: make it a URI.
        params.subject_alt_names[1] = rcgen::SanType::URI("spiffe://x/ops".try_into().unwrap());
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ops-cli");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let names = CertNames::from_der(cert.der()).unwrap();
        assert_eq!(names.dns, ["ops.example.com"]);
        assert_eq!(names.uris, ["spiffe://x/ops"]);
        assert_eq!(names.cn.as_deref(), Some("ops-cli"));
        assert_eq!(
            Caller::Certificate(names).to_string(),
            "client certificate [URI spiffe://x/ops, DNS ops.example.com, CN ops-cli]"
        );
        assert!(CertNames::from_der(b"not a certificate").is_err());
    }

    /// A new RPC must be classified: a change left off `MUTATING` would be open to every reader.
    #[test]
    fn every_rpc_is_either_a_read_or_a_change() {
        use prost::Message as _;
        const READS: &[&str] = &[
            "ListServices",
            "ListDestinations",
            "ListConnections",
            "StreamConnections",
            "GetAgentInfo",
            "GetTimeWait",
            "GetLatency",
            "Advise",
            "ListBreakers",
            "GetBreaker",
            "WatchBreakerEvents",
            "WatchConnections",
        ];
        let fds =
            prost_types::FileDescriptorSet::decode(breakwater_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for f in fds.file.iter().filter(|f| f.package() == "breakwater.v1") {
            for svc in &f.service {
                for m in &svc.method {
                    let path = format!("/{}.{}/{}", f.package(), svc.name(), m.name());
                    let change = MUTATING.contains(&path.as_str());
                    let read = READS.contains(&m.name());
                    assert!(
                        change != read,
                        "{path}: list it once, in MUTATING if it changes state, else in READS"
                    );
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, READS.len() + MUTATING.len());
    }
}
