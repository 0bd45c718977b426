//! Services: named sets of `IP|CIDR : port` endpoints, and matching a destination to one.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use breakwater_common::{SvcLpmData, SVC_LPM_PORT_BITS};
use ipnet::{IpNet, Ipv6Net};

use crate::error::{Error, Result};

/// One endpoint of a service: an address or network, and an exact port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub net: IpNet,
    pub port: u16,
}

impl FromStr for Endpoint {
    type Err = Error;

    /// `IP:port`, `CIDR:port`, `[IPv6]:port`, `[CIDR6]:port`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "invalid endpoint {s:?}: {why} (expected IP:port, CIDR:port, [IPv6]:port or [CIDR6]:port)"
            ))
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| bad("missing \"]:port\""))?;
            if !host.contains(':') {
                return Err(bad("brackets are for IPv6 addresses"));
            }
            (host, port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("missing \":port\""))?;
            if host.contains(':') {
                return Err(bad("IPv6 addresses must be in brackets"));
            }
            (host, port)
        };
        let port: u16 = port
            .parse()
            .map_err(|_| bad("port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("port must be a number from 1 to 65535"));
        }
        let net = if host.contains('/') {
            let net: IpNet = host.parse().map_err(|_| bad("not a valid CIDR"))?;
            if net.trunc() != net {
                return Err(bad(&format!(
                    "host bits set in CIDR; did you mean {}?",
                    net.trunc()
                )));
            }
            net
        } else {
            let ip: IpAddr = host.parse().map_err(|_| bad("not a valid IP address"))?;
            IpNet::from(ip)
        };
        Ok(Self { net, port })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.net.prefix_len() == self.net.max_prefix_len() {
            self.net.addr().to_string()
        } else {
            self.net.to_string()
        };
        match self.net {
            IpNet::V4(_) => write!(f, "{host}:{}", self.port),
            IpNet::V6(_) => write!(f, "[{host}]:{}", self.port),
        }
    }
}

impl Endpoint {
    /// The endpoint as an IPv6 (IPv4-mapped for IPv4) network, the form the kernel keys by.
    fn as_v6(&self) -> Ipv6Net {
        match self.net {
            IpNet::V4(n) => {
                Ipv6Net::new(n.addr().to_ipv6_mapped(), 96 + n.prefix_len()).expect("prefix <= 128")
            }
            IpNet::V6(n) => n,
        }
    }

    /// Prefix length and data of this endpoint's `BW_SVC_LPM` key.
    pub fn lpm_key(&self) -> (u32, SvcLpmData) {
        let n = self.as_v6();
        (
            SVC_LPM_PORT_BITS + u32::from(n.prefix_len()),
            SvcLpmData {
                port_be: self.port.to_be_bytes(),
                addr: n.addr().octets(),
            },
        )
    }

    pub fn matches(&self, addr: &Ipv6Addr, port: u16) -> bool {
        port == self.port && self.as_v6().contains(addr)
    }

    fn specificity(&self) -> u8 {
        self.as_v6().prefix_len()
    }
}

/// What `BW_SVC_LPM` finds for `addr:port` among `endpoints`: the value of the endpoint with
/// the exact port and the longest prefix that contains the address.
pub fn longest_match<'a, T>(
    endpoints: impl IntoIterator<Item = (&'a Endpoint, T)>,
    addr: &[u8; 16],
    port: u16,
) -> Option<T> {
    let addr = Ipv6Addr::from(*addr);
    endpoints
        .into_iter()
        .filter(|(e, _)| e.matches(&addr, port))
        .max_by_key(|(e, _)| e.specificity())
        .map(|(_, v)| v)
}

/// Canonical display of a kernel address: IPv4-mapped addresses as plain IPv4.
pub fn display_addr(addr: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Checks a service name: 1-63 characters of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid service name {name:?}: use 1-63 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )))
    }
}

/// Parses and checks a service definition.
pub fn parse_endpoints<S: AsRef<str>>(name: &str, endpoints: &[S]) -> Result<Vec<Endpoint>> {
    validate_name(name)?;
    if endpoints.is_empty() {
        return Err(Error::invalid(format!("service {name:?} has no endpoints")));
    }
    let mut parsed = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        let e: Endpoint = e.as_ref().trim().parse()?;
        if !parsed.contains(&e) {
            parsed.push(e);
        }
    }
    parsed.sort();
    Ok(parsed)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index of the service's slots in the kernel maps (1-based; 0 means "no service").
    pub id: u32,
    pub name: String,
    pub endpoints: Vec<Endpoint>,
}

/// What changed in the table, for the kernel maps to follow.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub id: u32,
    pub added: Vec<Endpoint>,
    pub removed: Vec<Endpoint>,
    /// A new service (its kernel counters must start from zero).
    pub created: bool,
    pub replaced: bool,
}

/// The services known to the agent, with ids for the kernel and longest-prefix matching that
/// agrees with the kernel's LPM trie.
#[derive(Clone, Debug)]
pub struct ServiceTable {
    by_name: BTreeMap<String, Service>,
    /// Indexes over `by_name`, so that a put, and a name looked up for every event, cost the
    /// same with 10,000 services as with 10: the service of each endpoint (by its kernel key),
    /// the name of each id, and the endpoints in use.
    endpoint_owner: HashMap<EndpointKey, String>,
    id_names: HashMap<u32, String>,
    endpoints_in_use: u32,
    max_services: u32,
    max_endpoints: u32,
    next_id: u32,
}

/// An endpoint as the kernel's LPM trie keys it: two endpoints with the same key (`10.0.0.1:80`
/// and `[::ffff:10.0.0.1]:80`) are one.
type EndpointKey = (u32, [u8; 2], [u8; 16]);

fn endpoint_key(e: &Endpoint) -> EndpointKey {
    let (len, data) = e.lpm_key();
    (len, data.port_be, data.addr)
}

impl ServiceTable {
    /// `max_services` ids are usable (1..=max_services); `max_endpoints` bounds the LPM trie.
    pub fn new(max_services: u32, max_endpoints: u32) -> Self {
        Self {
            by_name: BTreeMap::new(),
            endpoint_owner: HashMap::new(),
            id_names: HashMap::new(),
            endpoints_in_use: 0,
            max_services,
            max_endpoints,
            next_id: 1,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Service> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Service> {
        self.by_name.values()
    }

    pub fn name_of(&self, id: u32) -> Option<&str> {
        self.id_names.get(&id).map(String::as_str)
    }

    /// Looks a service up by name, with the error the API returns for an unknown one.
    pub fn require(&self, name: &str) -> Result<&Service> {
        self.get(name)
            .ok_or_else(|| Error::NotFound(format!("no service named {name:?}")))
    }

    /// The service an endpoint belongs to: the longest matching prefix, as the kernel does.
    pub fn match_endpoint(&self, addr: &[u8; 16], port: u16) -> Option<&Service> {
        longest_match(
            self.by_name
                .values()
                .flat_map(|s| s.endpoints.iter().map(move |e| (e, s))),
            addr,
            port,
        )
    }

    /// Creates or replaces a service. Validates everything first: on error nothing changed.
    pub fn put(&mut self, name: &str, endpoints: Vec<Endpoint>) -> Result<Change> {
        validate_name(name)?;
        for e in &endpoints {
            match self.endpoint_owner.get(&endpoint_key(e)) {
                Some(other) if other != name => {
                    return Err(Error::invalid(format!(
                        "endpoint {e} already belongs to service {other:?}"
                    )));
                }
                _ => {}
            }
        }
        let old = self.by_name.get(name);
        let in_use = self.endpoints_in_use - old.map_or(0, |o| o.endpoints.len() as u32);
        if in_use + endpoints.len() as u32 > self.max_endpoints {
            return Err(Error::ResourceExhausted(format!(
                "service endpoints would exceed the configured limit of {} (maps.max_service_endpoints)",
                self.max_endpoints
            )));
        }
        let change = match old {
            Some(old) => Change {
                id: old.id,
                added: endpoints
                    .iter()
                    .filter(|e| !old.endpoints.contains(e))
                    .copied()
                    .collect(),
                removed: old
                    .endpoints
                    .iter()
                    .filter(|e| !endpoints.contains(e))
                    .copied()
                    .collect(),
                created: false,
                replaced: true,
            },
            None => Change {
                id: self.free_id()?,
                added: endpoints.clone(),
                removed: Vec::new(),
                created: true,
                replaced: false,
            },
        };
        self.insert(Service {
            id: change.id,
            name: name.to_owned(),
            endpoints,
        });
        Ok(change)
    }

    /// Adds or replaces a service, its index entries with it.
    fn insert(&mut self, service: Service) {
        self.remove(&service.name);
        for e in &service.endpoints {
            self.endpoint_owner
                .insert(endpoint_key(e), service.name.clone());
        }
        self.endpoints_in_use += service.endpoints.len() as u32;
        self.id_names.insert(service.id, service.name.clone());
        self.by_name.insert(service.name.clone(), service);
    }

    /// Removes a service and its index entries.
    fn remove(&mut self, name: &str) -> Option<Service> {
        let old = self.by_name.remove(name)?;
        // Only what is this service's: pinned state restored from a damaged agent may repeat.
        for e in &old.endpoints {
            let key = endpoint_key(e);
            if self.endpoint_owner.get(&key).is_some_and(|o| o == name) {
                self.endpoint_owner.remove(&key);
            }
        }
        self.endpoints_in_use -= old.endpoints.len() as u32;
        if self.id_names.get(&old.id).is_some_and(|o| o == name) {
            self.id_names.remove(&old.id);
        }
        Some(old)
    }

    /// Puts back a service a previous agent left in the pinned maps, under its old id.
    pub fn restore(&mut self, id: u32, name: &str, endpoints: Vec<Endpoint>) {
        self.insert(Service {
            id,
            name: name.to_owned(),
            endpoints,
        });
        if id >= self.next_id {
            self.next_id = if id >= self.max_services { 1 } else { id + 1 };
        }
    }

    pub fn delete(&mut self, name: &str) -> Result<Service> {
        self.require(name)?;
        Ok(self.remove(name).expect("checked above"))
    }

    /// Ids are not reused right away, so late decrements for a deleted service's connections
    /// do not land on a new one.
    fn free_id(&mut self) -> Result<u32> {
        for _ in 0..self.max_services {
            let id = self.next_id;
            self.next_id = if id >= self.max_services { 1 } else { id + 1 };
            if !self.id_names.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(Error::ResourceExhausted(format!(
            "all {} service slots are in use (maps.max_services)",
            self.max_services
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    fn mapped(s: &str) -> [u8; 16] {
        match s.parse::<IpAddr>().unwrap() {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        }
    }

    #[test]
    fn parses_every_endpoint_form() {
        assert_eq!(ep("10.0.0.7:5000").to_string(), "10.0.0.7:5000");
        assert_eq!(ep("10.0.0.0/8:80").to_string(), "10.0.0.0/8:80");
        assert_eq!(ep("[::1]:443").to_string(), "[::1]:443");
        assert_eq!(ep("[fd00::/64]:53").to_string(), "[fd00::/64]:53");
        assert_eq!(ep("10.0.0.7:5000").net.prefix_len(), 32);
    }

    #[test]
    fn rejects_bad_endpoints_precisely() {
        let cases = [
            ("10.0.0.7", "missing \":port\""),
            ("10.0.0.7:0", "port must be"),
            ("10.0.0.7:70000", "port must be"),
            ("10.0.0.300:80", "not a valid IP address"),
            (
                "10.0.0.1/8:80",
                "host bits set in CIDR; did you mean 10.0.0.0/8?",
            ),
            ("10.0.0.0/33:80", "not a valid CIDR"),
            ("::1:80", "IPv6 addresses must be in brackets"),
            ("[10.0.0.1]:80", "brackets are for IPv6"),
            ("[::1]80", "missing \"]:port\""),
            ("", "missing \":port\""),
        ];
        for (input, why) in cases {
            let err = input.parse::<Endpoint>().unwrap_err().to_string();
            assert!(err.contains(why), "{input:?}: {err:?} lacks {why:?}");
            assert!(
                err.contains(&format!("{input:?}")),
                "{err:?} names the input"
            );
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["inventory", "a", "svc-1.prod_x"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-x", "has space", "ünï", &"x".repeat(64)] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn lpm_keys_put_port_first_and_map_ipv4() {
        let (len, data) = ep("10.0.0.0/8:80").lpm_key();
        assert_eq!(len, 16 + 96 + 8);
        assert_eq!(data.port_be, [0, 80]);
        assert_eq!(&data.addr[10..13], &[0xff, 0xff, 10]);
        let (len, _) = ep("[fd00::/64]:53").lpm_key();
        assert_eq!(len, 16 + 64);
    }

    #[test]
    fn longest_prefix_wins_and_port_is_exact() {
        let mut t = ServiceTable::new(8, 64);
        t.put("wide", vec![ep("10.0.0.0/8:80")]).unwrap();
        t.put("narrow", vec![ep("10.1.0.0/16:80"), ep("[::1]:80")])
            .unwrap();
        let name = |a: &str, p| t.match_endpoint(&mapped(a), p).map(|s| s.name.clone());
        assert_eq!(name("10.1.2.3", 80).as_deref(), Some("narrow"));
        assert_eq!(name("10.2.2.3", 80).as_deref(), Some("wide"));
        assert_eq!(name("10.2.2.3", 81), None);
        assert_eq!(name("11.0.0.1", 80), None);
        assert_eq!(name("::1", 80).as_deref(), Some("narrow"));
    }

    #[test]
    fn the_indexes_follow_puts_replacements_and_deletes() {
        let mut t = ServiceTable::new(8, 4);
        t.put("a", vec![ep("10.0.0.1:80"), ep("10.0.0.2:80")])
            .unwrap();
        t.put("b", vec![ep("10.0.0.3:80")]).unwrap();
        assert_eq!(
            (t.name_of(1), t.name_of(2), t.name_of(3)),
            (Some("a"), Some("b"), None)
        );
        // The same kernel key written as IPv6: still a's.
        let e = t.put("c", vec![ep("[::ffff:10.0.0.1]:80")]).unwrap_err();
        assert!(
            e.to_string().contains("already belongs to service \"a\""),
            "{e}"
        );
        // Replacing a's endpoints frees the one it dropped; the limit counts a's new ones only.
        t.put("a", vec![ep("10.0.0.2:80"), ep("10.0.0.4:80")])
            .unwrap();
        t.put("c", vec![ep("10.0.0.1:80")]).unwrap();
        let full = t.put("d", vec![ep("10.0.0.5:80")]).unwrap_err();
        assert!(matches!(full, Error::ResourceExhausted(_)), "{full}");
        t.delete("a").unwrap();
        assert_eq!(t.name_of(1), None);
        t.put("d", vec![ep("10.0.0.4:80"), ep("10.0.0.2:80")])
            .unwrap();
        assert_eq!(t.name_of(4), Some("d"), "ids are not reused at once");
        assert_eq!(
            t.match_endpoint(&mapped("10.0.0.2"), 80)
                .map(|s| s.name.as_str()),
            Some("d")
        );
    }

    #[test]
    fn put_reports_the_diff_and_keeps_ids() {
        let mut t = ServiceTable::new(8, 64);
        let c = t
            .put("a", vec![ep("10.0.0.1:80"), ep("10.0.0.2:80")])
            .unwrap();
        assert!(c.created && !c.replaced);
        assert_eq!(c.id, 1);
        let c = t
            .put("a", vec![ep("10.0.0.2:80"), ep("10.0.0.3:80")])
            .unwrap();
        assert_eq!(c.id, 1);
        assert!(c.replaced && !c.created);
        assert_eq!(c.added, vec![ep("10.0.0.3:80")]);
        assert_eq!(c.removed, vec![ep("10.0.0.1:80")]);
    }

    #[test]
    fn conflicting_endpoint_changes_nothing() {
        let mut t = ServiceTable::new(8, 64);
        t.put("a", vec![ep("10.0.0.1:80")]).unwrap();
        let err = t
            .put("b", vec![ep("10.0.0.2:80"), ep("10.0.0.1:80")])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "endpoint 10.0.0.1:80 already belongs to service \"a\""
        );
        assert!(t.get("b").is_none());
    }

    #[test]
    fn limits_are_enforced_without_change() {
        let mut t = ServiceTable::new(2, 3);
        t.put("a", vec![ep("10.0.0.1:80")]).unwrap();
        t.put("b", vec![ep("10.0.0.2:80")]).unwrap();
        assert!(matches!(
            t.put("c", vec![ep("10.0.0.3:80")]),
            Err(Error::ResourceExhausted(_))
        ));
        assert!(matches!(
            t.put(
                "a",
                vec![ep("10.0.0.4:80"), ep("10.0.0.5:80"), ep("10.0.0.6:80")]
            ),
            Err(Error::ResourceExhausted(_))
        ));
        assert_eq!(t.get("a").unwrap().endpoints, vec![ep("10.0.0.1:80")]);
    }

    #[test]
    fn ids_are_not_reused_immediately() {
        let mut t = ServiceTable::new(4, 64);
        assert_eq!(t.put("a", vec![ep("10.0.0.1:80")]).unwrap().id, 1);
        t.delete("a").unwrap();
        assert_eq!(t.put("b", vec![ep("10.0.0.1:80")]).unwrap().id, 2);
        assert!(matches!(t.delete("zzz"), Err(Error::NotFound(_))));
    }

    #[test]
    fn display_addr_unmaps_ipv4() {
        assert_eq!(display_addr(&mapped("127.0.0.1")).to_string(), "127.0.0.1");
        assert_eq!(display_addr(&mapped("::1")).to_string(), "::1");
    }
}
