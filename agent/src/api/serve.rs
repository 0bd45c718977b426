//! Serving the API: on a unix socket, and optionally over TCP (TLS with verified client
//! certificates, or plain for an explicit insecure listener). Every listener serves the same
//! services behind the same authorization layer ([`super::authz`]).

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use breakwater_proto::v1::agent_server::AgentServer;
use futures::FutureExt as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, UnixListener, UnixStream},
};
use tokio_stream::{
    wrappers::{TcpListenerStream, UnixListenerStream},
    StreamExt as _,
};
use tonic::{
    service::Routes,
    transport::{server::Connected, Certificate, Identity, Server, ServerTlsConfig},
};

use super::authz::{Authz, UnixCaller};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    ListenTcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent.socket_group {0:?}: no such group")]
    NoGroup(String),
    #[error("cannot read the {what} {path}: {source}")]
    ReadTls {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup (--tls-cert, --tls-key, --tls-client-ca): {0}")]
    Tls(String),
    #[error("another agent already serves unix://{0}: stop it first, or pick another --socket")]
    InUse(PathBuf),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Fails if a live agent answers on `path`: a second agent must not take its socket over.
pub fn ensure_free(path: &Path) -> Result<(), ServeError> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse(path.to_owned())),
        Err(_) => Ok(()),
    }
}

/// Binds the socket with permission bits `mode` (0600: only root may talk to the agent) and,
/// if given, group `group` (a name or a gid), replacing a stale one.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Listen {
        path: path.to_owned(),
        source,
    };
    let gid = group.map(group_id).transpose()?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // Owner and group first, then the mode: until the mode is set only root can connect.
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| err(e.into()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

fn group_id(group: &str) -> Result<nix::unistd::Gid, ServeError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(gid));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        _ => Err(ServeError::NoGroup(group.to_owned())),
    }
}

/// Binds a TCP listener on HOST:PORT.
pub async fn bind_tcp(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::ListenTcp {
            addr: addr.to_owned(),
            source,
        })
}

/// The server side of mutual TLS: the agent's certificate and key, and the CA that client
/// certificates must chain to (a client without one is refused in the handshake).
pub fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<ServerTlsConfig, ServeError> {
    let read = |what, path: &Path| {
        fs::read(path).map_err(|source| ServeError::ReadTls {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("certificate (--tls-cert)", cert)?,
            read("key (--tls-key)", key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(
            "client CA (--tls-client-ca)",
            client_ca,
        )?))
        .client_auth_optional(false)
        .timeout(Duration::from_secs(10));
    // Parse everything now, so that a bad file stops the start, not the first client.
    Server::builder()
        .tls_config(config.clone())
        .map_err(|e| ServeError::Tls(crate::error::chain(&e)))?;
    Ok(config)
}

/// A connection on the unix socket, with its caller read once, when it was accepted.
struct UnixConn {
    stream: UnixStream,
    caller: UnixCaller,
}

impl UnixConn {
    fn new(stream: UnixStream) -> Self {
        let caller = UnixCaller::of(&stream);
        Self { stream, caller }
    }
}

impl Connected for UnixConn {
    type ConnectInfo = UnixCaller;

    fn connect_info(&self) -> UnixCaller {
        self.caller.clone()
    }
}

impl AsyncRead for UnixConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Where the API is served.
pub struct Listeners {
    pub unix: UnixListener,
    /// `--listen`: TLS, client certificates required.
    pub tls: Option<(TcpListener, ServerTlsConfig)>,
    /// `--insecure-listen`: plain TCP.
    pub insecure: Option<TcpListener>,
}

/// The services every listener serves.
/// The services every listener serves: the Agent service, `grpc.health.v1.Health` and server
/// reflection ([`super::health`]).
fn routes(service: super::AgentService, health: &super::health::Health) -> Routes {
    let (reflection_v1, reflection_v1alpha) = super::health::reflection();
    Routes::new(AgentServer::new(service))
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
}

pub async fn serve(
    listeners: Listeners,
    service: super::AgentService,
    health: &super::health::Health,
    authz: Authz,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let routes = routes(service, health);
    let shutdown = shutdown.shared();
    let unix = Server::builder()
        .layer(authz.clone())
        .add_routes(routes.clone())
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listeners.unix).map(|conn| conn.map(UnixConn::new)),
            shutdown.clone(),
        );
    let tls = async {
        let Some((listener, config)) = listeners.tls else {
            return Ok(());
        };
        Server::builder()
            .tls_config(config)?
            .layer(authz.clone())
            .add_routes(routes.clone())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.clone())
            .await
    };
    let insecure = async {
        let Some(listener) = listeners.insecure else {
            return Ok(());
        };
        Server::builder()
            .layer(authz.clone())
            .add_routes(routes.clone())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.clone())
            .await
    };
    tokio::try_join!(unix, tls, insecure)?;
    Ok(())
}
