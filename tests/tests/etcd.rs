//! The etcd harness (tests/src/etcd.rs) against Debian's real etcd: what the fleet tests build
//! on. No root needed; `/usr/bin/etcd` missing skips outside CI and fails under `CI=true`
//! (`cargo xtask setup` installs it).

use std::time::Duration;

use breakwater_tests::{
    etcd::{self, Etcd},
    serial,
};
use etcd_client::{Certificate, Client, ConnectOptions, TlsOptions};

#[test]
fn etcd_harness_starts_serves_and_survives_restart() {
    // No kernel state, but other tests pick free ports too.
    let _serial = serial();
    if !etcd::available() {
        return;
    }
    let mut etcd = Etcd::start();
    assert!(
        etcd.url().starts_with("http://127.0.0.1:"),
        "{}",
        etcd.url()
    );

    etcd.put("/breakwater/a", "1");
    etcd.put("/breakwater/b", "2");
    etcd.put("/other", "3");
    assert_eq!(etcd.get("/breakwater/a").as_deref(), Some("1"));
    assert_eq!(etcd.get("/missing"), None);
    assert_eq!(
        etcd.get_prefix("/breakwater/"),
        [
            ("/breakwater/a".to_string(), "1".to_string()),
            ("/breakwater/b".to_string(), "2".to_string())
        ]
    );
    assert!(etcd.delete("/breakwater/b"));
    assert!(!etcd.delete("/breakwater/b"));

    let url = etcd.url();
    etcd.kill();
    etcd.restart();
    assert_eq!(etcd.url(), url, "a restart keeps the ports");
    assert_eq!(
        etcd.get("/breakwater/a").as_deref(),
        Some("1"),
        "the data survives a SIGKILL"
    );
    assert_eq!(etcd.get_prefix("/breakwater/").len(), 1);

    // An async client of its own sees the same data.
    let mut client = etcd.client();
    let response = etcd
        .block_on(client.get("/other", None))
        .expect("get with the async client");
    assert_eq!(response.kvs()[0].value(), b"3");
}

#[test]
fn etcd_harness_tls_requires_a_client_certificate() {
    let _serial = serial();
    if !etcd::available() {
        return;
    }
    let etcd = Etcd::start_tls();
    assert!(
        etcd.url().starts_with("https://127.0.0.1:"),
        "{}",
        etcd.url()
    );
    for path in [
        etcd.ca_path(),
        etcd.client_cert_path(),
        etcd.client_key_path(),
    ] {
        let pem = std::fs::read_to_string(path).expect("read PEM");
        assert!(pem.starts_with("-----BEGIN "), "{}: {pem}", path.display());
    }

    // With the client certificate (the harness's own options).
    etcd.put("/breakwater/tls", "yes");
    assert_eq!(etcd.get("/breakwater/tls").as_deref(), Some("yes"));

    // The same CA, so the server is trusted, but no client certificate: refused.
    let ca = Certificate::from_pem(std::fs::read(etcd.ca_path()).expect("read CA"));
    let options = ConnectOptions::new()
        .with_tls(TlsOptions::new().ca_certificate(ca))
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5));
    let url = etcd.url();
    let refused = etcd.block_on(async {
        let mut client = Client::connect([url.as_str()], Some(options)).await?;
        client.get("/breakwater/tls", None).await
    });
    match refused {
        Ok(response) => panic!("a client without a certificate read {:?}", response.kvs()),
        Err(e) => eprintln!("without a client certificate: {e}"),
    }
    // For that reason (not, say, an untrusted server certificate): Go's TLS error, in etcd's log.
    let log = etcd.log();
    assert!(
        log.contains("client didn't provide a certificate"),
        "etcd did not log refusing a client without a certificate:\n{log}"
    );

    // Plain HTTP on the TLS port: refused too.
    let plain = url.replacen("https://", "http://", 1);
    let refused = etcd.block_on(async {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5));
        let mut client = Client::connect([plain.as_str()], Some(options)).await?;
        client.get("/breakwater/tls", None).await
    });
    assert!(refused.is_err(), "plain HTTP on the TLS port was served");
}
