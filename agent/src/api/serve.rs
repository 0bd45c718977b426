//! Serving the API: on a unix socket, and optionally over TCP (TLS with verified client
//! certificates, or plain for an explicit insecure listener). Every listener serves the same
//! services behind the same authorization layer ([`super::authz`]).
//!
//! The TCP listeners ([`Remote`]) can change while the agent runs: a reload moves a listener
//! whose address changed ([`Rebindable`]: the new socket is bound first, then the old one stops
//! accepting; connections it accepted go on), and the TLS listener's certificate, key and client
//! CA are read again on reload and when the files change ([`crate::tls::Rotating`]): each
//! connection's handshake uses the material current when it arrives, so the connections
//! already made keep theirs.

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use breakwater_proto::v1::agent_server::AgentServer;
use futures::FutureExt as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{mpsc, watch},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::{
    wrappers::{ReceiverStream, UnixListenerStream},
    StreamExt as _,
};
use tonic::{
    service::Routes,
    transport::{server::Connected, Server},
};
use tracing::{debug, info, warn};

use super::authz::{Authz, UnixCaller};
use crate::{
    config::{AgentConfig, Config},
    core::protected::{self, Protected},
    tls::{Prepared, Rotating, ServerFiles, ServerTls, TlsError},
};

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
    #[error(transparent)]
    Tls(#[from] TlsError),
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

/// How many accepted connections wait for their server at most.
const QUEUE: usize = 64;
/// A TLS client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP listener that a reload can move: its connections come out of one channel, from
/// whichever socket is bound now.
pub struct Rebindable {
    /// The config key, for messages.
    key: &'static str,
    tx: mpsc::Sender<TcpStream>,
    bound: Mutex<Option<Bound>>,
}

/// A bound socket and the task accepting on it; dropping it closes the socket (new
/// connections are refused) and leaves the accepted ones alone.
struct Bound {
    /// As configured (HOST:PORT).
    addr: String,
    local: Option<SocketAddr>,
    accepting: tokio::task::AbortHandle,
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// What a reload does to one listener.
pub enum Rebind {
    Keep,
    Stop,
    /// Bound already, accepting from the commit on.
    Move {
        addr: String,
        listener: std::net::TcpListener,
    },
}

impl Rebind {
    fn changes(&self) -> bool {
        !matches!(self, Rebind::Keep)
    }
}

impl Rebindable {
    /// Not bound yet; its connections come out of the receiver.
    pub fn new(key: &'static str) -> (Self, mpsc::Receiver<TcpStream>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let this = Self {
            key,
            tx,
            bound: Mutex::new(None),
        };
        (this, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Bound>> {
        self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address it accepts on now.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.lock().as_ref().and_then(|b| b.local)
    }

    /// Binds `addr` if it is not the address bound now (None: stop listening). Nothing changes
    /// until [`Rebindable::commit`]; an address that cannot be bound is an error, and the
    /// listener stays where it is.
    pub fn prepare(&self, addr: Option<&str>) -> Result<Rebind, ServeError> {
        let current = self.lock().as_ref().map(|b| b.addr.clone());
        match addr {
            None if current.is_none() => Ok(Rebind::Keep),
            None => Ok(Rebind::Stop),
            Some(a) if current.as_deref() == Some(a) => Ok(Rebind::Keep),
            Some(a) => {
                let listener =
                    std::net::TcpListener::bind(a).map_err(|source| ServeError::ListenTcp {
                        addr: format!("{a} ({})", self.key),
                        source,
                    })?;
                Ok(Rebind::Move {
                    addr: a.to_owned(),
                    listener,
                })
            }
        }
    }

    /// The address a prepared change leaves it on.
    fn local_after(&self, change: &Rebind) -> Option<SocketAddr> {
        match change {
            Rebind::Keep => self.local_addr(),
            Rebind::Stop => None,
            Rebind::Move { listener, .. } => listener.local_addr().ok(),
        }
    }

    /// Applies a prepared change: the new socket accepts, the old one closes. Needs the
    /// runtime (a task accepts).
    pub fn commit(&self, change: Rebind) -> Result<(), ServeError> {
        let mut bound = self.lock();
        match change {
            Rebind::Keep => {}
            Rebind::Stop => {
                if let Some(old) = bound.take() {
                    info!(key = self.key, addr = old.addr, "no longer listening");
                }
            }
            Rebind::Move { addr, listener } => {
                let err = |source| ServeError::ListenTcp {
                    addr: addr.clone(),
                    source,
                };
                listener.set_nonblocking(true).map_err(err)?;
                let listener = TcpListener::from_std(listener).map_err(err)?;
                let local = listener.local_addr().ok();
                let task = tokio::spawn(accept(listener, self.tx.clone(), self.key));
                if let Some(old) = bound.as_ref() {
                    info!(
                        key = self.key,
                        from = old.addr,
                        to = addr,
                        "listening on the new address; the old one accepts no more connections \
                         (those it accepted go on)"
                    );
                }
                *bound = Some(Bound {
                    addr,
                    local,
                    accepting: task.abort_handle(),
                });
            }
        }
        Ok(())
    }

    /// Binds `addr` now (at start).
    pub fn bind(&self, addr: &str) -> Result<SocketAddr, ServeError> {
        let change = self.prepare(Some(addr))?;
        self.commit(change)?;
        Ok(self.local_addr().expect("just bound"))
    }

    /// Stops accepting.
    pub fn close(&self) {
        self.lock().take();
    }
}

/// Accepts on `listener` and hands the connections over, until aborted or nobody serves them.
async fn accept(listener: TcpListener, tx: mpsc::Sender<TcpStream>, key: &'static str) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                if tx.send(stream).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: try again shortly.
                warn!(key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The connections each TCP listener accepted, for their servers.
pub struct Incoming {
    pub listen: mpsc::Receiver<TcpStream>,
    pub insecure: mpsc::Receiver<TcpStream>,
    pub health: mpsc::Receiver<TcpStream>,
    pub metrics: mpsc::Receiver<TcpStream>,
}

/// The agent's TCP listeners and the material they use, as a reload may change them: `--listen`
/// (TLS), `--insecure-listen`, `--health-listen`, `--metrics-listen`, and the etcd client's
/// certificates.
pub struct Remote {
    pub tls: Rotating<ServerTls>,
    pub listen: Rebindable,
    pub insecure: Rebindable,
    pub health: Rebindable,
    pub metrics: Rebindable,
    /// The fleet's etcd client certificates, when in a fleet.
    pub etcd_tls: Option<Arc<Rotating<crate::fleet::EtcdTls>>>,
    /// The fleet's etcd endpoints, never refused.
    pub fleet_protected: Vec<Protected>,
}

/// What a reload changes in [`Remote`]: all of it checked (files read, addresses bound) before
/// anything is applied.
pub struct RemoteChange {
    tls: Option<Prepared<ServerTls>>,
    listen: Rebind,
    insecure: Rebind,
    health: Rebind,
    metrics: Rebind,
    etcd_tls: Option<Prepared<crate::fleet::EtcdTls>>,
}

impl RemoteChange {
    /// The listeners' changes, each with its config key.
    fn rebinds(&self) -> [(&'static str, &Rebind); 4] {
        [
            ("agent.listen", &self.listen),
            ("agent.insecure_listen", &self.insecure),
            ("agent.health_listen", &self.health),
            ("metrics.listen", &self.metrics),
        ]
    }
}

/// The TLS files of `[agent]`, when `listen` is set.
pub fn server_files(a: &AgentConfig) -> Option<ServerFiles> {
    a.listen.as_ref()?;
    // validate() made sure all three are there.
    Some(ServerFiles {
        cert: a.tls_cert.clone()?,
        key: a.tls_key.clone()?,
        client_ca: a.tls_client_ca.clone()?,
    })
}

impl Remote {
    /// Nothing bound, with the TLS material of `config` read (a bad file stops the start).
    pub fn new(
        config: &Config,
        etcd_tls: Option<Arc<Rotating<crate::fleet::EtcdTls>>>,
        fleet_protected: Vec<Protected>,
    ) -> Result<(Self, Incoming), ServeError> {
        let tls = Rotating::new(server_files(&config.agent).as_ref())?;
        let (listen, listen_rx) = Rebindable::new("agent.listen");
        let (insecure, insecure_rx) = Rebindable::new("agent.insecure_listen");
        let (health, health_rx) = Rebindable::new("agent.health_listen");
        let (metrics, metrics_rx) = Rebindable::new("metrics.listen");
        let remote = Self {
            tls,
            listen,
            insecure,
            health,
            metrics,
            etcd_tls,
            fleet_protected,
        };
        let incoming = Incoming {
            listen: listen_rx,
            insecure: insecure_rx,
            health: health_rx,
            metrics: metrics_rx,
        };
        Ok((remote, incoming))
    }

    /// Reads what `next` names and binds the addresses that changed; applies nothing.
    pub fn prepare(&self, next: &Config) -> Result<RemoteChange, ServeError> {
        let a = &next.agent;
        let tls = self.tls.prepare(server_files(a).as_ref())?;
        // The fleet itself (endpoints, on or off) changes at the next start: its TLS files
        // only while it stays on.
        let etcd_tls = match &self.etcd_tls {
            Some(r) if next.fleet.enabled() => {
                r.prepare(crate::fleet::EtcdFiles::wanted(&next.fleet).as_ref())?
            }
            _ => None,
        };
        Ok(RemoteChange {
            tls,
            listen: self.listen.prepare(a.listen.as_deref())?,
            insecure: self.insecure.prepare(a.insecure_listen.as_deref())?,
            health: self.health.prepare(a.health_listen.as_deref())?,
            metrics: self.metrics.prepare(next.metrics.listen.as_deref())?,
            etcd_tls,
        })
    }

    /// The agent's own destinations, never refused: its listeners (after `change`, if given)
    /// and the fleet's etcd.
    pub fn own(&self, change: Option<&RemoteChange>) -> Vec<Protected> {
        let keep = Rebind::Keep;
        let after = |r: &Rebindable, c: Option<&Rebind>| r.local_after(c.unwrap_or(&keep));
        let mut own = Vec::new();
        for (addr, why) in [
            (
                after(&self.listen, change.map(|c| &c.listen)),
                "the agent's API (TLS)",
            ),
            (
                after(&self.insecure, change.map(|c| &c.insecure)),
                "the agent's API",
            ),
            (
                after(&self.metrics, change.map(|c| &c.metrics)),
                "the agent's metrics",
            ),
            (
                after(&self.health, change.map(|c| &c.health)),
                "the agent's health",
            ),
        ] {
            if let Some(addr) = addr {
                own.extend(protected::of_address(addr, why));
            }
        }
        own.extend(self.fleet_protected.iter().cloned());
        own
    }

    /// What a prepared change does, for the reload's answer: "agent.listen: now 127.0.0.1:9090".
    pub fn describe(change: &RemoteChange) -> Vec<String> {
        let mut out = Vec::new();
        for (key, rebind) in change.rebinds() {
            match rebind {
                Rebind::Keep => {}
                Rebind::Stop => out.push(format!("{key}: no longer listening")),
                Rebind::Move { addr, .. } => out.push(format!("{key}: now {addr}")),
            }
        }
        if change.tls.is_some() {
            out.push("agent.tls_cert, tls_key, tls_client_ca: re-read".to_owned());
        }
        if change.etcd_tls.is_some() {
            out.push("fleet.etcd_ca, etcd_cert, etcd_key: re-read".to_owned());
        }
        out
    }

    /// Applies a prepared change; the listeners it moved are logged.
    pub fn commit(&self, change: RemoteChange) -> Result<(), ServeError> {
        let moved = change.rebinds().iter().any(|(_, c)| c.changes());
        if let Some(tls) = change.tls {
            self.tls.commit(tls);
        }
        if let (Some(r), Some(prepared)) = (&self.etcd_tls, change.etcd_tls) {
            r.commit(prepared);
        }
        self.listen.commit(change.listen)?;
        self.insecure.commit(change.insecure)?;
        self.health.commit(change.health)?;
        self.metrics.commit(change.metrics)?;
        if moved {
            info!(
                listen = ?self.listen.local_addr(),
                insecure_listen = ?self.insecure.local_addr(),
                health_listen = ?self.health.local_addr(),
                metrics_listen = ?self.metrics.local_addr(),
                "listeners moved"
            );
        }
        Ok(())
    }

    /// Reads the TLS files in use again (see [`crate::tls::WATCH_EVERY`]).
    pub fn poll(&self) {
        self.tls.poll();
        if let Some(r) = &self.etcd_tls {
            r.poll();
        }
    }

    /// Stops accepting API connections (the health listener stays).
    pub fn close_api(&self) {
        self.listen.close();
        self.insecure.close();
        self.metrics.close();
    }
}

/// The services every listener serves: the Agent service, `grpc.health.v1.Health` and server
/// reflection ([`super::health`]).
fn routes(service: super::AgentService, health: &super::health::Health) -> Routes {
    let (reflection_v1, reflection_v1alpha) = super::health::reflection();
    Routes::new(AgentServer::new(service))
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
}

/// The TLS handshakes of `--listen`: each with the server config current when its connection
/// came, concurrently, within [`HANDSHAKE_TIMEOUT`]; the connections that complete one are
/// handed to the server.
async fn handshakes(
    mut tcp: mpsc::Receiver<TcpStream>,
    config: watch::Receiver<Option<Arc<ServerTls>>>,
    tls: mpsc::Sender<TlsStream<TcpStream>>,
) {
    while let Some(stream) = tcp.recv().await {
        let Some(current) = config.borrow().clone() else {
            // Not configured any more: the listener is closing.
            continue;
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let peer = stream.peer_addr().ok();
            let acceptor = tokio_rustls::TlsAcceptor::from(current.config.clone());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _ = tls.send(stream).await;
                }
                Ok(Err(e)) => debug!(?peer, error = %e, "TLS handshake failed"),
                Err(_) => debug!(?peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Serves the API on the unix socket, on `--listen` (TLS) and `--insecure-listen` until
/// `shutdown`; the TCP connections come from `remote`'s listeners.
pub async fn serve(
    unix: UnixListener,
    incoming: (mpsc::Receiver<TcpStream>, mpsc::Receiver<TcpStream>),
    remote: &Remote,
    service: super::AgentService,
    health: &super::health::Health,
    authz: Authz,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let (listen, insecure) = incoming;
    let routes = routes(service, health);
    let shutdown = shutdown.shared();
    let unix = Server::builder()
        .layer(authz.clone())
        .add_routes(routes.clone())
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(unix).map(|conn| conn.map(UnixConn::new)),
            shutdown.clone(),
        );
    let (tls_tx, tls_rx) = mpsc::channel(QUEUE);
    let handshaking = tokio::spawn(handshakes(listen, remote.tls.subscribe(), tls_tx));
    let tls = Server::builder()
        .layer(authz.clone())
        .add_routes(routes.clone())
        .serve_with_incoming_shutdown(
            ReceiverStream::new(tls_rx).map(Ok::<_, io::Error>),
            shutdown.clone(),
        );
    let insecure = Server::builder()
        .layer(authz.clone())
        .add_routes(routes.clone())
        .serve_with_incoming_shutdown(
            ReceiverStream::new(insecure).map(Ok::<_, io::Error>),
            shutdown.clone(),
        );
    let served = tokio::try_join!(unix, tls, insecure);
    handshaking.abort();
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A client connection and the server's end of it, from `incoming`.
    async fn connect(
        addr: SocketAddr,
        incoming: &mut mpsc::Receiver<TcpStream>,
    ) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(addr).await.unwrap();
        let server = incoming.recv().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_moved_listener_refuses_on_the_old_address_and_keeps_its_connections() {
        let (l, mut incoming) = Rebindable::new("agent.listen");
        let first = l.bind("127.0.0.1:0").unwrap();
        let (mut held, mut held_server) = connect(first, &mut incoming).await;

        // Unchanged: nothing to do; a taken address: an error, and it stays.
        assert!(matches!(
            l.prepare(Some("127.0.0.1:0")).unwrap(),
            Rebind::Keep
        ));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = taken.local_addr().unwrap().to_string();
        let e = l.prepare(Some(&taken)).err().unwrap().to_string();
        assert!(
            e.starts_with(&format!("cannot listen on {taken} (agent.listen): ")),
            "{e}"
        );
        assert_eq!(l.local_addr(), Some(first));

        // Another address of lo.
        let change = l.prepare(Some("127.0.0.2:0")).unwrap();
        assert!(matches!(change, Rebind::Move { .. }));
        l.commit(change).unwrap();
        let second = l.local_addr().unwrap();
        assert_ne!(second, first);
        let (_client, _server) = connect(second, &mut incoming).await;
        // The old socket closes once its task is gone.
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(first).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "{first} still accepts");
        // The connection it accepted goes on.
        held.write_all(b"ping").await.unwrap();
        let mut buf = [0; 4];
        held_server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        assert!(matches!(l.prepare(None).unwrap(), Rebind::Stop));
        l.close();
        assert_eq!(l.local_addr(), None);
        assert!(matches!(l.prepare(None).unwrap(), Rebind::Keep));
    }
}
