//! The agent's configuration: a TOML file, or the embedded defaults (observe everything, no
//! services) when none is given.

use std::path::{Path, PathBuf};

use breakwater_common::defaults;
use serde::Deserialize;

use crate::{
    error::{Error, Result},
    service::{parse_endpoints, ServiceTable},
};

pub const DEFAULT_SOCKET: &str = "/run/breakwater/agent.sock";

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    pub maps: MapSizes,
    #[serde(rename = "service")]
    pub services: Vec<ServiceConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the gRPC API listens (a unix socket, mode 0600).
    pub socket: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
        }
    }
}

/// Capacities of the kernel maps. The LRU maps drop their least recently used entries when full
/// (and the agent reports those evictions); the others refuse new entries.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MapSizes {
    /// Distinct destinations and local endpoints tracked (LRU).
    pub max_destinations: u32,
    pub max_services: u32,
    /// Endpoints over all services (LPM trie entries).
    pub max_service_endpoints: u32,
    /// Latency histogram buckets in use over all destinations (LRU; one entry per non-empty
    /// bucket of a destination's histogram).
    pub max_histogram_buckets: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_destinations: defaults::MAX_DESTS,
            max_services: defaults::MAX_SERVICES,
            max_service_endpoints: defaults::MAX_SERVICE_ENDPOINTS,
            max_histogram_buckets: defaults::MAX_HIST_BUCKETS,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub endpoints: Vec<String>,
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Config =
            toml::from_str(text).map_err(|e| Error::invalid(format!("invalid config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
    }

    fn validate(&self) -> Result<()> {
        let m = &self.maps;
        for (name, v, min) in [
            ("maps.max_destinations", m.max_destinations, 16),
            ("maps.max_services", m.max_services, 1),
            ("maps.max_service_endpoints", m.max_service_endpoints, 1),
            ("maps.max_histogram_buckets", m.max_histogram_buckets, 16),
        ] {
            if v < min || v > 1 << 24 {
                return Err(Error::invalid(format!(
                    "{name} = {v} is out of range ({min}..={})",
                    1 << 24
                )));
            }
        }
        self.service_table().map(drop)
    }

    /// The configured services as a table (checks names, endpoints, conflicts and limits).
    pub fn service_table(&self) -> Result<ServiceTable> {
        let mut table = ServiceTable::new(self.maps.max_services, self.maps.max_service_endpoints);
        for s in &self.services {
            if table.get(&s.name).is_some() {
                return Err(Error::invalid(format!(
                    "service {:?} is defined twice",
                    s.name
                )));
            }
            table.put(&s.name, parse_endpoints(&s.name, &s.endpoints)?)?;
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.agent.socket, Path::new(DEFAULT_SOCKET));
        assert!(c.services.is_empty());
    }

    #[test]
    fn services_and_sizes_parse() {
        let c = Config::from_toml(
            r#"
            [agent]
            socket = "/tmp/bw.sock"
            [maps]
            max_destinations = 1024
            [[service]]
            name = "inventory"
            endpoints = ["10.0.0.7:5000", "[fd00::/64]:5000"]
            [[service]]
            name = "db"
            endpoints = ["10.1.0.0/16:5432"]
            "#,
        )
        .unwrap();
        assert_eq!(c.maps.max_destinations, 1024);
        assert_eq!(c.maps.max_services, defaults::MAX_SERVICES);
        let t = c.service_table().unwrap();
        assert_eq!(t.get("inventory").unwrap().endpoints.len(), 2);
        assert_eq!(t.get("db").unwrap().id, 2);
    }

    /// The example in the repository stays a valid config that says what the defaults are.
    #[test]
    fn example_config_is_valid_and_shows_the_defaults() {
        let c = Config::from_toml(include_str!("../../config/breakwater.example.toml")).unwrap();
        assert_eq!(c.agent, AgentConfig::default());
        assert_eq!(c.maps, MapSizes::default());
        assert_eq!(c.service_table().unwrap().iter().count(), 2);
    }

    #[test]
    fn bad_configs_say_why() {
        let cases = [
            ("[agent]\nsockett = \"x\"", "unknown field `sockett`"),
            ("[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.4\"]", "invalid endpoint \"1.2.3.4\""),
            ("[[service]]\nname = \"a\"\nendpoints = []", "has no endpoints"),
            (
                "[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.4:1\"]\n[[service]]\nname = \"a\"\nendpoints = [\"1.2.3.5:1\"]",
                "defined twice",
            ),
            ("[maps]\nmax_services = 0", "maps.max_services = 0 is out of range"),
        ];
        for (text, why) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err:?} lacks {why:?}");
        }
    }
}
