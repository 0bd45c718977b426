//! etcd for `breakwater fleet`: its endpoints and TLS from the flags (checked before anything is
//! dialed: bad ones exit 2), each call bounded in time, and etcd's errors as the CLI's: an etcd
//! that cannot be reached exits 1 with the endpoints named, one that refuses the caller exits 2.

use std::{future::Future, path::Path, time::Duration};

use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tonic::Code;

use super::{records::Write, FleetArgs};
use crate::cli::CliError;

/// How long etcd may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may take, whatever happens underneath (a channel with no endpoint ready
/// waits rather than fails).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where etcd is and how to talk to it, checked.
pub struct Settings {
    pub endpoints: Vec<String>,
    tls: Option<TlsOptions>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Settings {
    /// The etcd flags, checked: at least one endpoint, each http:// or https:// HOST:PORT, not
    /// both schemes, a CA for https://, certificate and key together and readable.
    pub fn new(args: &FleetArgs) -> Result<Self, CliError> {
        // BREAKWATER_ETCD= (set, empty) is none given.
        let given: Vec<&str> = args
            .etcd
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .collect();
        if given.is_empty() {
            return Err(CliError::Usage(
                "`breakwater fleet` needs etcd: --etcd URL (repeat for more) or \
                 BREAKWATER_ETCD=URL[,URL...], e.g. --etcd https://10.0.0.5:2379"
                    .into(),
            ));
        }
        let mut endpoints = Vec::new();
        for url in given {
            endpoints.push(check_url(url).map_err(CliError::Usage)?);
        }
        let https = endpoints
            .iter()
            .filter(|u| u.starts_with("https://"))
            .count();
        if https != 0 && https != endpoints.len() {
            return Err(CliError::Usage(format!(
                "--etcd {}: all http:// or all https://, not both",
                endpoints.join(",")
            )));
        }
        let tls_flags = args.etcd_ca.is_some() || args.etcd_cert.is_some();
        if args.etcd_cert.is_some() != args.etcd_key.is_some() {
            return Err(CliError::Usage(
                "--etcd-cert and --etcd-key go together (BREAKWATER_ETCD_CERT, BREAKWATER_ETCD_KEY)"
                    .into(),
            ));
        }
        if https == 0 {
            if tls_flags {
                return Err(CliError::Usage(format!(
                    "--etcd-ca, --etcd-cert and --etcd-key are for https:// endpoints; --etcd {} \
                     is plain http://",
                    endpoints.join(",")
                )));
            }
            return Ok(Self {
                endpoints,
                tls: None,
            });
        }
        let ca = args.etcd_ca.as_deref().ok_or_else(|| {
            CliError::Usage(
                "https:// etcd needs --etcd-ca (or BREAKWATER_ETCD_CA): the CA certificate that \
                 etcd's certificate chains to"
                    .into(),
            )
        })?;
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem("--etcd-ca", ca)?));
        if let (Some(cert), Some(key)) = (&args.etcd_cert, &args.etcd_key) {
            tls = tls.identity(Identity::from_pem(
                read_pem("--etcd-cert", cert)?,
                read_pem("--etcd-key", key)?,
            ));
        }
        Ok(Self {
            endpoints,
            tls: Some(tls),
        })
    }
}

/// `--etcd`: http://HOST:PORT or https://HOST:PORT (a trailing `/` is dropped).
pub fn check_url(text: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(
            "invalid etcd endpoint {text:?}: {why}; expected http://HOST:PORT or https://HOST:PORT"
        )
    };
    let trimmed = text.trim();
    let Some((scheme, rest)) = trimmed.split_once("://") else {
        return Err(bad("no scheme"));
    };
    if !matches!(scheme, "http" | "https") {
        return Err(bad(&format!("unknown scheme {scheme:?}")));
    }
    let host_port = rest.strip_suffix('/').unwrap_or(rest);
    if host_port.contains('/') || host_port.contains('@') {
        return Err(bad("only HOST:PORT may follow the scheme"));
    }
    crate::config::check_host_port(host_port).map_err(|why| bad(&why))?;
    Ok(format!("{scheme}://{host_port}"))
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {flag} {}: {e}", path.display())))
}

/// A key and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// 0: none.
    pub lease: i64,
}

impl From<&etcd_client::KeyValue> for Kv {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            lease: kv.lease(),
        }
    }
}

/// What a put did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put {
    /// etcd's revision after it.
    pub revision: i64,
    /// The key held a value before.
    pub replaced: bool,
    /// The lease it went on: id and TTL in seconds.
    pub lease: Option<(i64, i64)>,
}

/// What a delete did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub revision: i64,
    /// The key was there.
    pub deleted: bool,
}

/// A connected etcd.
pub struct Etcd {
    client: Client,
    /// The endpoints, for messages.
    endpoints: String,
}

impl Etcd {
    /// A client for the endpoints. etcd is dialed on the first call, which fails (exit 1) if
    /// none answers.
    pub async fn connect(settings: &Settings) -> Result<Self, CliError> {
        let endpoints = settings.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        if let Some(tls) = &settings.tls {
            options = options.with_tls(tls.clone());
        }
        let etcd = Self {
            client: Client::connect(&settings.endpoints, Some(options))
                .await
                .map_err(|e| {
                    CliError::Failed(anyhow::anyhow!("etcd at {endpoints}: {}", error_text(&e)))
                })?,
            endpoints,
        };
        Ok(etcd)
    }

    /// `call`, bounded by [`CALL_TIMEOUT`], its error the CLI's.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(etcd_error(&self.endpoints, &e)),
            Err(_) => Err(CliError::Failed(anyhow::anyhow!(
                "cannot reach etcd at {}: no answer within {}s",
                self.endpoints,
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Every key under each prefix, all read at one revision.
    pub async fn list(&self, prefixes: &[String]) -> Result<Vec<Vec<Kv>>, CliError> {
        let ops: Vec<TxnOp> = prefixes
            .iter()
            .map(|p| TxnOp::get(p.as_str(), Some(GetOptions::new().with_prefix())))
            .collect();
        let mut kv = self.client.kv_client();
        let r = self.call(kv.txn(Txn::new().and_then(ops))).await?;
        Ok(r.op_responses()
            .iter()
            .map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().iter().map(Kv::from).collect(),
                _ => Vec::new(),
            })
            .collect())
    }

    /// Seconds left of a lease; None if it is gone.
    pub async fn lease_remaining(&self, lease: i64) -> Result<Option<i64>, CliError> {
        let mut leases = self.client.lease_client();
        let r = self.call(leases.time_to_live(lease, None)).await?;
        Ok((r.ttl() >= 0).then_some(r.ttl()))
    }

    /// Puts the record, on a new lease if it has one. A lease the key held before is revoked
    /// once the key has left it (a trip replaced), so that none is left behind.
    pub async fn put(&self, write: &Write) -> Result<Put, CliError> {
        let mut options = PutOptions::new().with_prev_key();
        let mut lease = None;
        if let Some(ttl) = write.lease_secs {
            let mut leases = self.client.lease_client();
            let granted = self.call(leases.grant(ttl, None)).await?;
            options = options.with_lease(granted.id());
            lease = Some((granted.id(), granted.ttl()));
        }
        let mut kv = self.client.kv_client();
        let put = self
            .call(kv.put(write.key.as_str(), write.json.as_str(), Some(options)))
            .await;
        let put = match put {
            Ok(put) => put,
            Err(e) => {
                if let Some((id, _)) = lease {
                    // It would expire by itself; revoke it now if etcd lets us.
                    let mut leases = self.client.lease_client();
                    let _ = self.call(leases.revoke(id)).await;
                }
                return Err(e);
            }
        };
        let before = put.prev_key().map(Kv::from);
        if let Some(old) = before.as_ref().map(|kv| kv.lease).filter(|&l| l != 0) {
            let mut leases = self.client.lease_client();
            let _ = self.call(leases.revoke(old)).await;
        }
        Ok(Put {
            revision: put.header().map_or(0, |h| h.revision()),
            replaced: before.is_some(),
            lease,
        })
    }

    /// Deletes the key; revokes the lease it was on, if any.
    pub async fn delete(&self, key: &str) -> Result<Deleted, CliError> {
        let mut kv = self.client.kv_client();
        let r = self
            .call(kv.delete(key, Some(DeleteOptions::new().with_prev_key())))
            .await?;
        for old in r.prev_kvs().iter().map(|kv| kv.lease()).filter(|&l| l != 0) {
            let mut leases = self.client.lease_client();
            let _ = self.call(leases.revoke(old)).await;
        }
        Ok(Deleted {
            revision: r.header().map_or(0, |h| h.revision()),
            deleted: r.deleted() > 0,
        })
    }

    /// Watches every key under `prefix`, with each change's previous value.
    pub async fn watch(&self, prefix: &str) -> Result<WatchStream, CliError> {
        let mut watch = self.client.watch_client();
        self.call(watch.watch(
            prefix,
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        ))
        .await
    }

    /// The stream's next response, its error the CLI's (no time limit: a watch waits).
    pub async fn next(
        &self,
        stream: &mut WatchStream,
    ) -> Result<Option<etcd_client::WatchResponse>, CliError> {
        stream
            .message()
            .await
            .map_err(|e| etcd_error(&self.endpoints, &e))
    }
}

/// etcd's error as the CLI's: refused (permission, bad request) exits 2; the rest, 1, said as
/// "cannot reach" when etcd did not answer.
pub fn etcd_error(endpoints: &str, e: &etcd_client::Error) -> CliError {
    let why = error_text(e);
    match e {
        etcd_client::Error::GRpcStatus(s)
            if matches!(
                s.code(),
                Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument
            ) =>
        {
            CliError::Usage(format!("etcd at {endpoints} refused: {why}"))
        }
        etcd_client::Error::GRpcStatus(s)
            if !matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) =>
        {
            CliError::Failed(anyhow::anyhow!("etcd at {endpoints}: {why}"))
        }
        _ => CliError::Failed(anyhow::anyhow!("cannot reach etcd at {endpoints}: {why}")),
    }
}

/// An etcd error on one line: a status's message and what caused it, not its metadata.
fn error_text(e: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return crate::error::chain(e);
    };
    let mut out = s.message().to_owned();
    let mut source = std::error::Error::source(s);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out = if out.is_empty() {
                text
            } else {
                format!("{out}: {text}")
            };
        }
        source = cause.source();
    }
    if out.is_empty() {
        format!("{:?}", s.code())
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_or_https_host_port() {
        assert_eq!(
            check_url("http://127.0.0.1:2379/").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            check_url("https://[fd00::5]:2379").unwrap(),
            "https://[fd00::5]:2379"
        );
        for (bad, why) in [
            ("127.0.0.1:2379", "no scheme"),
            ("unix:///run/etcd.sock", "unknown scheme \"unix\""),
            ("http://etcd", "expected HOST:PORT"),
            ("http://etcd:2379/v3", "only HOST:PORT"),
        ] {
            let e = check_url(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains("expected http://"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn refusals_exit_2_and_the_rest_1() {
        let status = |code| etcd_client::Error::GRpcStatus(tonic::Status::new(code, "nope"));
        let e = etcd_error("http://a:2379", &status(Code::PermissionDenied));
        assert_eq!(e.exit_code(), 2);
        assert_eq!(e.to_string(), "etcd at http://a:2379 refused: nope");
        let e = etcd_error("http://a:2379", &status(Code::Unavailable));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.to_string(), "cannot reach etcd at http://a:2379: nope");
        let e = etcd_error("http://a:2379", &status(Code::ResourceExhausted));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.to_string(), "etcd at http://a:2379: nope");
    }
}
