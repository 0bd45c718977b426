//! TLS material read from PEM files, and its rotation: the agent's mTLS listener (`--tls-cert`,
//! `--tls-key`, `--tls-client-ca`) and its etcd client (`--etcd-ca`, `--etcd-cert`,
//! `--etcd-key`).
//!
//! A [`Rotating`] holds what was built from the files' contents last time it worked. It reads
//! the files again on every config reload ([`Rotating::prepare`] then [`Rotating::commit`]: a
//! reload that cannot use them changes nothing and says why) and every [`WATCH_EVERY`]
//! ([`Rotating::poll`]), comparing contents, not times: cert-manager and kubelet swap a secret
//! volume's files through a symlink, and whatever writes them, the content is what counts. New
//! material is published on a watch channel; what reads it (the listener's handshakes, the
//! etcd client) uses it for new connections only, so no connection in flight is dropped. Bad
//! material (unreadable, not PEM, a key that does not match its certificate) is never
//! published: the last good one stays, and a warning says why, once per content.

use std::{
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio::sync::watch;
use tracing::{info, warn};

/// How often the files are read again to see if they changed.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// A TLS file that cannot be used; nothing is changed for it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {path} holds no PEM {expected}")]
    NoPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the {what} {path} is not valid PEM: {why}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("the {what} {path}: {why}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("the key {key} does not match the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// One file of a set: what it is (for messages) and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PemFile {
    pub what: &'static str,
    pub path: PathBuf,
}

impl PemFile {
    pub fn new(what: &'static str, path: impl Into<PathBuf>) -> Self {
        Self {
            what,
            path: path.into(),
        }
    }

    fn read(&self) -> Result<Vec<u8>, TlsError> {
        std::fs::read(&self.path).map_err(|source| TlsError::Read {
            what: self.what,
            path: self.path.clone(),
            source,
        })
    }

    /// Every certificate in `pem`; at least one.
    pub fn certificates(&self, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: self.what,
                path: self.path.clone(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoPem {
                what: self.what,
                path: self.path.clone(),
                expected: "certificate",
            });
        }
        Ok(certs)
    }

    /// The private key in `pem` (PKCS#8, PKCS#1 or SEC1).
    pub fn private_key(&self, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPem {
                what: self.what,
                path: self.path.clone(),
                expected: "private key",
            },
            e => TlsError::Pem {
                what: self.what,
                path: self.path.clone(),
                why: e.to_string(),
            },
        })
    }

    /// The CA certificates in `pem`, as trust anchors; every one must be usable.
    pub fn roots(&self, pem: &[u8]) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certificates(pem)? {
            roots.add(cert).map_err(|e| TlsError::Invalid {
                what: self.what,
                path: self.path.clone(),
                why: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(roots)
    }
}

/// The crypto provider tonic uses (its `tls-ring` feature).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks that `key` is the private key of the first certificate of `chain`.
pub fn check_pair(
    cert: &PemFile,
    chain: Vec<CertificateDer<'static>>,
    key_file: &PemFile,
    key: PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .map(drop)
        .map_err(|e| pair_error(cert, key_file, &e))
}

fn pair_error(cert: &PemFile, key: &PemFile, e: &rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: cert.path.clone(),
            key: key.path.clone(),
        },
        e => TlsError::Invalid {
            what: key.what,
            path: key.path.clone(),
            why: e.to_string(),
        },
    }
}

/// The server side of mutual TLS, as the `--listen` listener uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl ServerFiles {
    fn files(&self) -> [PemFile; 3] {
        [
            PemFile::new("certificate (agent.tls_cert, --tls-cert)", &self.cert),
            PemFile::new("key (agent.tls_key, --tls-key)", &self.key),
            PemFile::new(
                "client CA (agent.tls_client_ca, --tls-client-ca)",
                &self.client_ca,
            ),
        ]
    }
}

/// A built server config, with the leaf it presents (for the log).
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub leaf: String,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("leaf", &self.leaf)
            .finish_non_exhaustive()
    }
}

impl Material for ServerTls {
    type Files = ServerFiles;
    const WHAT: &'static str = "the API's TLS certificate (--listen)";

    fn files(files: &ServerFiles) -> Vec<PemFile> {
        files.files().to_vec()
    }

    /// Client certificates are required and verified against the client CA; the agent
    /// presents the certificate and key; HTTP/2 by ALPN, as tonic's own acceptor.
    fn build(files: &ServerFiles, contents: &[Vec<u8>]) -> Result<Self, TlsError> {
        let [cert_file, key_file, ca_file] = files.files();
        let chain = cert_file.certificates(&contents[0])?;
        let key = key_file.private_key(&contents[1])?;
        let roots = ca_file.roots(&contents[2])?;
        let leaf = describe(&chain[0]);
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .map_err(|e| TlsError::Invalid {
                what: ca_file.what,
                path: ca_file.path.clone(),
                why: e.to_string(),
            })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                what: cert_file.what,
                path: cert_file.path.clone(),
                why: e.to_string(),
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| pair_error(&cert_file, &key_file, &e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            leaf,
        })
    }

    fn describe(&self) -> String {
        self.leaf.clone()
    }
}

/// A certificate's subject, serial and end of validity, for the log.
pub fn describe(cert: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::FromDer as _;
    match x509_parser::certificate::X509Certificate::from_der(cert) {
        Ok((_, c)) => format!(
            "subject {}, serial {}, valid until {}",
            c.subject(),
            c.raw_serial_as_string(),
            c.validity()
                .not_after
                .to_rfc2822()
                .unwrap_or_else(|_| c.validity().not_after.to_string())
        ),
        Err(e) => format!("unreadable certificate: {e}"),
    }
}

/// What is built from a set of PEM files.
pub trait Material: Sized + Send + Sync + 'static {
    /// Where the files are.
    type Files: Clone + PartialEq + fmt::Debug + Send + Sync + 'static;
    /// What it is, for the log.
    const WHAT: &'static str;
    /// The files to read, in the order `build` gets their contents.
    fn files(files: &Self::Files) -> Vec<PemFile>;
    fn build(files: &Self::Files, contents: &[Vec<u8>]) -> Result<Self, TlsError>;
    /// A line for the log when it is applied.
    fn describe(&self) -> String;
}

/// The files' contents as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Read<F> {
    files: F,
    contents: Vec<Vec<u8>>,
}

fn read<M: Material>(files: &M::Files) -> Result<Read<M::Files>, TlsError> {
    let contents = M::files(files)
        .iter()
        .map(PemFile::read)
        .collect::<Result<_, _>>()?;
    Ok(Read {
        files: files.clone(),
        contents,
    })
}

struct State<M: Material> {
    /// What is published: None while the files are not configured.
    applied: Option<Read<M::Files>>,
    /// The last contents that could not be used, and why: warned about once.
    rejected: Option<(Option<Read<M::Files>>, String)>,
}

/// Material rebuilt when its files change; see the module's documentation.
pub struct Rotating<M: Material> {
    state: Mutex<State<M>>,
    current: watch::Sender<Option<Arc<M>>>,
}

impl<M: Material> fmt::Debug for Rotating<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rotating")
            .field("what", &M::WHAT)
            .field(
                "files",
                &self.lock().applied.as_ref().map(|r| r.files.clone()),
            )
            .finish_non_exhaustive()
    }
}

/// A file that cannot be used is bad input: the config names it.
impl From<TlsError> for crate::error::Error {
    fn from(e: TlsError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

/// Material read and built by [`Rotating::prepare`], applied by [`Rotating::commit`].
pub struct Prepared<M: Material> {
    read: Option<Read<M::Files>>,
    built: Option<Arc<M>>,
}

impl<M: Material> Rotating<M> {
    /// Reads and builds from `files` (None: nothing configured, nothing published).
    pub fn new(files: Option<&M::Files>) -> Result<Self, TlsError> {
        let (read, built) = match files {
            Some(files) => {
                let read = read::<M>(files)?;
                let built = M::build(files, &read.contents)?;
                (Some(read), Some(Arc::new(built)))
            }
            None => (None, None),
        };
        Ok(Self {
            state: Mutex::new(State {
                applied: read,
                rejected: None,
            }),
            current: watch::Sender::new(built),
        })
    }

    /// The material in use, and its changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<M>>> {
        self.current.subscribe()
    }

    /// The material in use.
    pub fn current(&self) -> Option<Arc<M>> {
        self.current.borrow().clone()
    }

    /// Reads `files` (a reload's; None: no longer configured) and builds from them if they
    /// changed; None if nothing changed. Nothing is applied until [`Rotating::commit`].
    pub fn prepare(&self, files: Option<&M::Files>) -> Result<Option<Prepared<M>>, TlsError> {
        let state = self.lock();
        let Some(files) = files else {
            return Ok(state.applied.is_some().then_some(Prepared {
                read: None,
                built: None,
            }));
        };
        let read = read::<M>(files)?;
        if state.applied.as_ref() == Some(&read) {
            return Ok(None);
        }
        let built = M::build(files, &read.contents)?;
        Ok(Some(Prepared {
            read: Some(read),
            built: Some(Arc::new(built)),
        }))
    }

    /// Applies what [`Rotating::prepare`] built: new connections use it.
    pub fn commit(&self, prepared: Prepared<M>) {
        let mut state = self.lock();
        self.apply(&mut state, prepared);
    }

    fn apply(&self, state: &mut State<M>, prepared: Prepared<M>) {
        match &prepared.built {
            Some(m) => info!(
                material = M::WHAT,
                "{}: now in use: {}",
                M::WHAT,
                m.describe()
            ),
            None => info!(material = M::WHAT, "{}: no longer configured", M::WHAT),
        }
        state.applied = prepared.read;
        state.rejected = None;
        self.current.send_replace(prepared.built);
    }

    /// Reads the files in use again and applies them if they changed and can be used; else
    /// keeps what is in use and warns once per content why.
    pub fn poll(&self) {
        let mut state = self.lock();
        let Some(files) = state.applied.as_ref().map(|r| r.files.clone()) else {
            return;
        };
        let read = match read::<M>(&files) {
            Ok(read) => read,
            Err(e) => return Self::reject(&mut state, None, &e),
        };
        if state.applied.as_ref() == Some(&read) {
            state.rejected = None;
            return;
        }
        match M::build(&files, &read.contents) {
            Ok(built) => {
                info!(material = M::WHAT, "{}: the files changed", M::WHAT);
                let prepared = Prepared {
                    read: Some(read),
                    built: Some(Arc::new(built)),
                };
                self.apply(&mut state, prepared);
            }
            Err(e) => Self::reject(&mut state, Some(read), &e),
        }
    }

    fn reject(state: &mut State<M>, read: Option<Read<M::Files>>, e: &TlsError) {
        let why = e.to_string();
        let seen = state
            .rejected
            .as_ref()
            .is_some_and(|(r, w)| r == &read && w == &why);
        if !seen {
            warn!(
                material = M::WHAT,
                error = %why,
                "{}: the files changed but cannot be used; the ones in use stay",
                M::WHAT
            );
            state.rejected = Some((read, why));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<M>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Polls `poll` every [`WATCH_EVERY`] on a blocking thread (file reads) until the returned task
/// is aborted or the runtime ends.
pub fn watch_files(poll: impl Fn() + Send + Sync + 'static) -> tokio::task::JoinHandle<()> {
    let poll = Arc::new(poll);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let poll = poll.clone();
            let _ = tokio::task::spawn_blocking(move || poll()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
    }

    fn ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        (rcgen::Issuer::new(params, key), pem)
    }

    fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    impl Pki {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn files(&self) -> ServerFiles {
            ServerFiles {
                cert: self.dir.path().join("tls.crt"),
                key: self.dir.path().join("tls.key"),
                client_ca: self.dir.path().join("ca.crt"),
            }
        }

        /// A new CA and a server certificate it signed, written over the files.
        fn write(&self, cn: &str) {
            let (issuer, ca_pem) = ca("CA");
            let (cert, key) = leaf(&issuer, cn);
            let f = self.files();
            std::fs::write(&f.cert, cert).unwrap();
            std::fs::write(&f.key, key).unwrap();
            std::fs::write(&f.client_ca, ca_pem).unwrap();
        }
    }

    fn leaf_of(r: &Rotating<ServerTls>) -> String {
        r.current().unwrap().leaf.clone()
    }

    #[test]
    fn changed_files_are_applied_and_bad_ones_are_not() {
        let pki = Pki::new();
        pki.write("one");
        let files = pki.files();
        let r = Rotating::<ServerTls>::new(Some(&files)).unwrap();
        let mut seen = r.subscribe();
        assert!(leaf_of(&r).contains("CN=one"), "{}", leaf_of(&r));
        // Unchanged: nothing to do.
        assert!(r.prepare(Some(&files)).unwrap().is_none());
        r.poll();
        assert!(!seen.has_changed().unwrap());

        // Changed: the poll applies it.
        pki.write("two");
        r.poll();
        assert!(seen.has_changed().unwrap());
        assert!(leaf_of(&r).contains("CN=two"));
        seen.mark_unchanged();

        // A key that does not match: refused, with why; the old stays.
        let (issuer, _) = ca("other");
        let (_, other_key) = leaf(&issuer, "three");
        std::fs::write(&files.key, &other_key).unwrap();
        let e = r.prepare(Some(&files)).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "the key {} does not match the certificate {}",
                files.key.display(),
                files.cert.display()
            )
        );
        r.poll();
        assert!(!seen.has_changed().unwrap());
        assert!(leaf_of(&r).contains("CN=two"));

        // Not PEM, empty, missing.
        std::fs::write(&files.cert, "garbage").unwrap();
        let e = r.prepare(Some(&files)).err().unwrap().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        std::fs::write(
            &files.cert,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = r.prepare(Some(&files)).err().unwrap().to_string();
        assert!(e.contains("is not valid PEM"), "{e}");
        std::fs::remove_file(&files.client_ca).unwrap();
        let e = r.prepare(Some(&files)).err().unwrap().to_string();
        assert!(
            e.starts_with("cannot read the client CA (agent.tls_client_ca, --tls-client-ca)"),
            "{e}"
        );
        r.poll();
        assert!(leaf_of(&r).contains("CN=two"));

        // Good again: prepared, then committed.
        pki.write("four");
        let prepared = r.prepare(Some(&files)).unwrap().expect("changed");
        assert!(leaf_of(&r).contains("CN=two"), "nothing before the commit");
        r.commit(prepared);
        assert!(leaf_of(&r).contains("CN=four"));
        // No longer configured.
        let off = r.prepare(None).unwrap().expect("a change");
        r.commit(off);
        assert!(r.current().is_none());
        assert!(r.prepare(None).unwrap().is_none());
    }
}
