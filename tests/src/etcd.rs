//! A real etcd for the fleet tests: Debian's `/usr/bin/etcd` (3.4, package etcd-server, which
//! `cargo xtask setup` installs), one single-member cluster per [`Etcd`], on free 127.0.0.1
//! ports, in a temporary directory removed on drop. [`Etcd::start_tls`] serves its clients over
//! mutual TLS with certificates made here.
//!
//! The async [`Client`]s it hands out live on the harness's runtime: drive them with
//! [`Etcd::block_on`]. The sync helpers ([`Etcd::put`], [`Etcd::get`], ...) panic on any error.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Debian's etcd-server puts it there.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

const HOW_TO_INSTALL: &str = "run `cargo xtask setup` as root: it installs Debian's etcd-server \
                              and etcd-client, and leaves no system etcd running";

/// How long etcd may take to answer after a start (a single member elects itself in ~1 s).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Each sync helper's call, so that a test never hangs on a dead server.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports for a start whose ports were taken between picking and binding them.
const START_ATTEMPTS: usize = 3;

/// True if `/usr/bin/etcd` runs. Without it: a skip (false, the reason printed) outside CI, a
/// failure under `CI=true`.
pub fn available() -> bool {
    let runs = Command::new(ETCD_BIN)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if runs {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but {ETCD_BIN} is missing: {HOW_TO_INSTALL}"
    );
    eprintln!("skipped: {ETCD_BIN} is missing ({HOW_TO_INSTALL})");
    false
}

/// The PEM files of a TLS etcd: its CA, its server certificate, and a client certificate the
/// server trusts.
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, under `dir`.
    fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir).expect("create the PKI directory");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "breakwater test etcd CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = dir.join("ca.pem");
        fs::write(&ca, params.self_signed(&key).expect("CA cert").pem()).expect("write CA");
        let issuer = Issuer::new(params, key);
        // etcd's own gRPC gateway dials the client port with the server's certificate, so it
        // is a client certificate too (else etcd logs a rejected handshake at every start).
        let (server_cert, server_key) = leaf(
            dir,
            "server",
            &issuer,
            "etcd",
            vec![
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::DnsName("localhost".try_into().expect("DNS name")),
            ],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_cert, client_key) = leaf(
            dir,
            "client",
            &issuer,
            "breakwater",
            vec![SanType::DnsName(
                "client.breakwater.test".try_into().expect("DNS name"),
            )],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        Self {
            dir: dir.to_owned(),
            issuer,
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// A certificate signed by `issuer` and its key, written to `dir/NAME.pem` and `dir/NAME.key`.
fn leaf(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.extended_key_usages = usages;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    fs::write(&cert_path, cert.pem()).expect("write certificate");
    fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}

/// A free port on 127.0.0.1 (bound once, then released: another process may take it before
/// etcd binds it, which [`Etcd::start`] retries).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A running etcd: one member, its data in a temporary directory; killed and everything removed
/// on drop.
pub struct Etcd {
    /// None when killed.
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    pki: Option<Pki>,
    rt: tokio::runtime::Runtime,
    /// The sync helpers' client, made at first use, dropped when the server is killed.
    client: Mutex<Option<Client>>,
    /// Set when a panic message already carries the log, so that drop does not print it again.
    log_shown: bool,
}

impl Etcd {
    /// etcd over plain HTTP, answering.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// etcd whose client port takes only TLS clients with a certificate of its CA
    /// ([`Etcd::ca_path`], [`Etcd::client_cert_path`], [`Etcd::client_key_path`]), answering.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        assert!(
            Path::new(ETCD_BIN).is_file(),
            "{ETCD_BIN} is missing: {HOW_TO_INSTALL}"
        );
        let dir = tempfile::Builder::new()
            .prefix("breakwater-etcd-")
            .tempdir()
            .expect("etcd temporary directory");
        let pki = tls.then(|| Pki::new(&dir.path().join("pki")));
        // Multi-threaded so that client connections are driven between calls (as Agent's).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut etcd = Self {
            child: None,
            dir,
            client_port: 0,
            peer_port: 0,
            pki,
            rt,
            client: Mutex::new(None),
            log_shown: false,
        };
        for attempt in 1..=START_ATTEMPTS {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            let logged = etcd.log().len();
            match etcd.spawn() {
                Ok(()) => return etcd,
                Err(why)
                    if attempt < START_ATTEMPTS
                        && etcd.log()[logged..].contains("address already in use") =>
                {
                    eprintln!("etcd start attempt {attempt}: {why}; again on other ports");
                    // etcd binds before it writes any data; should it not, the next member
                    // must not find this one's.
                    let _ = fs::remove_dir_all(etcd.data_dir());
                }
                Err(why) => etcd.fail(&why),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts etcd again after [`Etcd::kill`] (or kills it first), on the same ports and data
    /// directory, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(why) = self.spawn() {
            self.fail(&why);
        }
    }

    /// Kills etcd and starts it again on the same ports with its data gone: a member rebuilt
    /// from nothing (a lost disk, a cluster recreated), its revisions starting over.
    pub fn restart_empty(&mut self) {
        self.kill();
        fs::remove_dir_all(self.data_dir()).expect("remove etcd's data");
        if let Err(why) = self.spawn() {
            self.fail(&why);
        }
    }

    /// SIGKILL, then waits for the process: a crash, no clean shutdown.
    pub fn kill(&mut self) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The client URL: `http://127.0.0.1:PORT`, `https://` for [`Etcd::start_tls`].
    pub fn url(&self) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// A new CA, server and client certificate: etcd restarts with them and trusts only the
    /// new CA; [`Etcd::ca_path`] and the client paths are the new ones.
    pub fn rotate_tls(&mut self) {
        let n = fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or_default();
        self.pki = Some(Pki::new(&self.dir.path().join(format!("pki-{n}"))));
        self.restart();
    }

    /// Another client certificate of the current CA, and its key.
    pub fn issue_client_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let pki = self.pki();
        leaf(
            &pki.dir,
            name,
            &pki.issuer,
            name,
            vec![SanType::DnsName(
                format!("{name}.breakwater.test")
                    .try_into()
                    .expect("DNS name"),
            )],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    /// The CA that signed the server's and the client's certificates (PEM).
    pub fn ca_path(&self) -> &Path {
        &self.pki().ca
    }

    /// A client certificate the server accepts (PEM), with [`Etcd::client_key_path`].
    pub fn client_cert_path(&self) -> &Path {
        &self.pki().client_cert
    }

    pub fn client_key_path(&self) -> &Path {
        &self.pki().client_key
    }

    fn pki(&self) -> &Pki {
        self.pki
            .as_ref()
            .expect("not a TLS etcd: start it with Etcd::start_tls")
    }

    /// What etcd logged so far (every start, warnings and up, and whatever it printed).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Options for [`Client::connect`] to this server: a connect timeout, and for the TLS
    /// variant its CA and the client certificate. Add to them (`with_timeout`, ...) as needed.
    pub fn connect_options(&self) -> ConnectOptions {
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        match &self.pki {
            None => options,
            Some(pki) => {
                let read = |path: &Path| {
                    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
                };
                options.with_tls(
                    TlsOptions::new()
                        .ca_certificate(Certificate::from_pem(read(&pki.ca)))
                        .identity(Identity::from_pem(
                            read(&pki.client_cert),
                            read(&pki.client_key),
                        )),
                )
            }
        }
    }

    /// An async client (connected lazily); it lives on the harness's runtime: drive it with
    /// [`Etcd::block_on`].
    pub fn client(&self) -> Client {
        let options = self.connect_options();
        self.rt
            .block_on(Client::connect([self.url()], Some(options)))
            .unwrap_or_else(|e| panic!("etcd client for {}: {e}", self.url()))
    }

    /// Runs a future (an etcd call) to completion on the harness's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn put(&self, key: &str, value: &str) {
        self.call("put", key, |mut c| async move {
            c.put(key, value, None).await.map(drop)
        });
    }

    /// The value of `key`, None when there is none.
    pub fn get(&self, key: &str) -> Option<String> {
        let response = self.call("get", key, |mut c| async move { c.get(key, None).await });
        response.kvs().first().map(|kv| utf8(kv.value(), key))
    }

    /// Every key under `prefix` with its value, in key order.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let response = self.call("get --prefix", prefix, |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        });
        response
            .kvs()
            .iter()
            .map(|kv| {
                let key = utf8(kv.key(), prefix);
                let value = utf8(kv.value(), &key);
                (key, value)
            })
            .collect()
    }

    /// Deletes `key`; true if it was there.
    pub fn delete(&self, key: &str) -> bool {
        let response = self.call(
            "delete",
            key,
            |mut c| async move { c.delete(key, None).await },
        );
        response.deleted() > 0
    }

    /// One call with the sync helpers' client, within [`CALL_TIMEOUT`]; panics on an error.
    fn call<T, Fut>(&self, what: &str, key: &str, f: impl FnOnce(Client) -> Fut) -> T
    where
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = {
            let mut cached = self.client.lock().unwrap_or_else(|e| e.into_inner());
            cached.get_or_insert_with(|| self.client()).clone()
        };
        match self.rt.block_on(within(CALL_TIMEOUT, f(client))) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("etcd {what} {key:?} at {}: {e}", self.url()),
            Err(_) => panic!(
                "etcd {what} {key:?} at {}: no answer within {CALL_TIMEOUT:?}",
                self.url()
            ),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the process on the chosen ports and waits until it answers; on an error the
    /// process is gone.
    fn spawn(&mut self) -> Result<(), String> {
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log");
        {
            use std::io::Write as _;
            let _ = writeln!(
                log,
                "=== harness: {ETCD_BIN}, client {client_url}, peer {peer_url}"
            );
        }
        let mut cmd = Command::new(ETCD_BIN);
        // ETCD_* variables are flags to etcd: none from the test's environment.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(name);
            }
        }
        cmd.arg("--name=breakwater-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=breakwater-test={peer_url}"))
            // Warnings and errors only, on stderr, which goes to the log file with anything
            // else etcd prints (a Go panic, a bad flag).
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"]);
        if let Some(pki) = &self.pki {
            cmd.arg(format!("--cert-file={}", pki.server_cert.display()))
                .arg(format!("--key-file={}", pki.server_key.display()))
                .arg(format!("--trusted-ca-file={}", pki.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD_BIN}: {e}"));
        self.child = Some(child);
        let ready = self.wait_ready();
        if ready.is_err() {
            self.kill();
        }
        ready
    }

    /// Polls with a fresh client until a linearizable get succeeds (so a leader is elected).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let options = self
            .connect_options()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(1));
        let url = self.url();
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait etcd"));
            if let Some(status) = exited {
                return Err(format!("etcd exited during start-up ({status})"));
            }
            let probe = async {
                let mut client = Client::connect([url.as_str()], Some(options.clone())).await?;
                client.get("breakwater-harness-probe", None).await
            };
            let last = match self.rt.block_on(within(Duration::from_secs(2), probe)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 2 s".to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd at {url} did not answer within {READY_TIMEOUT:?} (last: {last})"
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        self.log_shown = true;
        panic!("{why}\n--- etcd log ---\n{}", self.log());
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() && !self.log_shown {
            eprintln!("--- etcd log ---\n{}", self.log());
        }
    }
}

/// `f` within `limit` (a timer made inside the runtime, where it must be made).
async fn within<F: std::future::Future>(
    limit: Duration,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, f).await
}

fn utf8(bytes: &[u8], key: &str) -> String {
    String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| {
        panic!("etcd: {key:?} is not UTF-8 (read it with Etcd::client for the bytes)")
    })
}
