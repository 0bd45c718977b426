//! Protected destinations: what no breaker ever refuses, whatever service covers it. The
//! agent's own control paths (its etcd endpoints, its API, health and metrics listeners) always
//! are, and `[breaker] protected` adds more (the kube-apiserver, DNS, SSH). The gate checks them
//! before any breaker, so a refused connect to one cannot happen.

use std::net::SocketAddr;

use ipnet::IpNet;

use super::{service::Endpoint, Core, Kernel};
use crate::{config::Config, error::Result};

/// A protected destination, and why it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protected {
    pub endpoint: Endpoint,
    pub why: String,
}

impl std::fmt::Display for Protected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.endpoint, self.why)
    }
}

/// The destinations a local address stands for: itself, or every address on its port when
/// it is unspecified (`0.0.0.0`, `::`), as a listener bound there is reached on any of them.
pub fn of_address(addr: SocketAddr, why: &str) -> Vec<Protected> {
    let nets: Vec<IpNet> = if addr.ip().is_unspecified() {
        vec![
            "0.0.0.0/0".parse().expect("a network"),
            "::/0".parse().expect("a network"),
        ]
    } else {
        vec![IpNet::from(addr.ip())]
    };
    nets.into_iter()
        .map(|net| Protected {
            endpoint: Endpoint {
                net,
                port: addr.port(),
            },
            why: why.to_owned(),
        })
        .collect()
}

/// Whether two endpoints can match one destination: the same port, and networks that overlap.
fn overlap(a: &Endpoint, b: &Endpoint) -> bool {
    a.port == b.port && (a.net.contains(&b.net.network()) || b.net.contains(&a.net.network()))
}

impl<K: Kernel + ?Sized> Core<K> {
    /// The agent's own control paths (set once at start, before anything is enforced).
    pub fn set_own_protected(&mut self, own: Vec<Protected>) {
        self.own_protected = own;
    }

    /// Every protected destination: the agent's own, then the config's.
    pub fn protected(&self) -> Vec<Protected> {
        self.protected_with(&self.config)
    }

    fn protected_with(&self, config: &Config) -> Vec<Protected> {
        // A config is validated (its entries parse) before the core gets it.
        let configured = config.breaker.protected().unwrap_or_default();
        self.own_protected
            .iter()
            .cloned()
            .chain(configured.into_iter().map(|endpoint| Protected {
                endpoint,
                why: "breaker.protected".into(),
            }))
            .collect()
    }

    /// Writes `config`'s protected destinations into the kernel: at start, and on a reload
    /// before anything else of it is applied.
    pub(super) fn apply_protected(&mut self, config: &Config) -> Result<()> {
        let endpoints: Vec<Endpoint> = self
            .protected_with(config)
            .into_iter()
            .map(|p| p.endpoint)
            .collect();
        self.kernel.set_protected(&endpoints)
    }

    /// The protected destinations a service's endpoints cover: never refused by its breaker.
    pub fn protected_in(&self, endpoints: &[Endpoint]) -> Vec<Protected> {
        protected_among(&self.protected(), endpoints)
    }
}

/// The entries of `protected` that `endpoints` cover.
pub fn protected_among(protected: &[Protected], endpoints: &[Endpoint]) -> Vec<Protected> {
    protected
        .iter()
        .filter(|p| endpoints.iter().any(|e| overlap(e, &p.endpoint)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    #[test]
    fn an_unspecified_address_protects_its_port_everywhere() {
        let p = of_address("0.0.0.0:9478".parse().unwrap(), "metrics");
        let shown: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["0.0.0.0/0:9478 (metrics)", "[::/0]:9478 (metrics)"]);
        let one = of_address("10.0.0.5:2379".parse().unwrap(), "etcd");
        assert_eq!(one[0].endpoint, ep("10.0.0.5/32:2379"));
    }

    #[test]
    fn overlaps_need_the_port_and_a_shared_network() {
        assert!(overlap(&ep("10.0.0.0/8:443"), &ep("10.96.0.1:443")));
        assert!(overlap(&ep("10.96.0.1:443"), &ep("0.0.0.0/0:443")));
        assert!(!overlap(&ep("10.0.0.0/8:443"), &ep("10.96.0.1:80")));
        assert!(!overlap(&ep("10.0.0.0/8:443"), &ep("192.168.0.1:443")));
    }
}
