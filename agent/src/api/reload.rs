//! `ReloadConfig` and SIGHUP: re-read the config file and apply the difference to the running
//! agent (services, breaker policies, enforced cgroups), keeping the programs attached and every
//! count and breaker state. The new file is checked whole first: if anything in it cannot be
//! applied, nothing is.

use std::collections::{BTreeMap, BTreeSet};

use breakwater_common::breaker::Policy;
use breakwater_proto::v1 as pb;
use tracing::{info, warn};

use super::Core;
use crate::{
    config::{Config, ServiceConfig},
    core::service::parse_endpoints,
    error::{Error, Result},
};

/// What flags and environment set over the file; they still win after a reload.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub pin_dir: Option<std::path::PathBuf>,
    pub scope: Vec<String>,
    /// --listen, --tls-*, --socket-mode, ...
    pub remote: crate::config::RemoteOverrides,
    pub health_listen: Option<String>,
    pub metrics_listen: Option<String>,
    /// --disable-feature: added to the file's `[features] disable`.
    pub disable_features: Vec<crate::core::features::Feature>,
}

impl Overrides {
    pub fn apply(&self, config: &mut Config) -> Result<()> {
        if let Some(dir) = &self.pin_dir {
            config.agent.pin_dir = dir.clone();
        }
        if !self.scope.is_empty() {
            config.breaker.scope = self.scope.clone();
        }
        self.remote.apply(&mut config.agent);
        if self.health_listen.is_some() {
            config.agent.health_listen.clone_from(&self.health_listen);
        }
        if self.metrics_listen.is_some() {
            config.metrics.listen.clone_from(&self.metrics_listen);
        }
        config.features.add(&self.disable_features);
        config.validate()
    }
}

fn policies(config: &Config) -> Result<BTreeMap<String, Policy>> {
    Ok(config.policies()?.into_iter().collect())
}

fn by_name(config: &Config) -> BTreeMap<&str, &ServiceConfig> {
    config
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect()
}

impl Core {
    /// Re-reads the config file and applies what changed since the config last applied.
    pub fn reload(&mut self) -> Result<pb::ReloadConfigResponse> {
        let path = self.config_path.clone().ok_or_else(|| {
            Error::invalid("the agent was started without --config: there is no file to reload")
        })?;
        let mut next = Config::load(&path)?;
        self.overrides.apply(&mut next)?;
        if next.maps != self.config.maps {
            return Err(Error::invalid(format!(
                "{}: [maps] changed: map sizes take effect only when the agent restarts",
                path.display()
            )));
        }
        if next.features != self.config.features {
            // The programs were chosen at start; the running set stays until the next one.
            warn!(
                running = ?self.config.features.disable,
                file = ?next.features.disable,
                "[features] disable changed: it takes effect when the agent restarts"
            );
            next.features = self.config.features.clone();
        }
        let authz_changed = next.agent.authz != self.config.agent.authz;
        let mut agent = next.agent.clone();
        agent.authz = self.config.agent.authz.clone();
        if agent != self.config.agent {
            warn!("[agent] settings changed: they take effect when the agent restarts (except [agent.authz], applied now)");
        }
        let old = by_name(&self.config);
        let new = by_name(&next);
        let old_policies = policies(&self.config)?;
        let new_policies = policies(&next)?;

        // Check the service changes on a copy of the table, in the order they will be made.
        let removed: Vec<String> = old
            .keys()
            .filter(|n| !new.contains_key(*n))
            .map(|n| n.to_string())
            .collect();
        let mut added = Vec::new();
        let mut changed = Vec::new();
        let mut table = self.services.clone();
        for name in &removed {
            if table.get(name).is_some() {
                table.delete(name)?;
            }
        }
        let mut puts = Vec::new();
        for (name, s) in &new {
            let endpoints = parse_endpoints(name, &s.endpoints)?;
            match table.get(name) {
                Some(current) if current.endpoints == endpoints => {}
                Some(_) => {
                    changed.push(name.to_string());
                    puts.push((name.to_string(), s.endpoints.clone()));
                }
                None => {
                    added.push(name.to_string());
                    puts.push((name.to_string(), s.endpoints.clone()));
                }
            }
        }
        // An endpoint may move from one service to another: take every service's lost
        // endpoints away first, then give the new ones.
        let mut shrinks = Vec::new();
        for (name, eps) in &puts {
            if let Some(current) = table.get(name) {
                let wanted = parse_endpoints(name, eps)?;
                let kept: Vec<_> = current
                    .endpoints
                    .iter()
                    .filter(|e| wanted.contains(e))
                    .map(ToString::to_string)
                    .collect();
                if !kept.is_empty() && kept.len() < current.endpoints.len() {
                    shrinks.push((name.clone(), kept));
                }
            }
        }
        for (name, eps) in shrinks.iter().chain(puts.iter()) {
            table
                .put(name, parse_endpoints(name, eps)?)
                .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        }
        let mut policies_changed = Vec::new();
        for name in new.keys() {
            if old_policies.get(*name) != new_policies.get(*name) {
                policies_changed.push(name.to_string());
            }
        }
        let old_scope: BTreeSet<_> = self.config.breaker.scope.iter().cloned().collect();
        let new_scope: BTreeSet<_> = next.breaker.scope.iter().cloned().collect();
        let root = crate::ebpf::breaker::cgroup2_mount()
            .map_err(|e| Error::Internal(format!("cgroup2: {e}")))?;
        let scope_added: Vec<String> = new_scope.difference(&old_scope).cloned().collect();
        let scope_removed: Vec<String> = old_scope.difference(&new_scope).cloned().collect();
        for rel in &scope_added {
            let dir = root.join(rel.trim_start_matches('/'));
            if !dir.is_dir() {
                return Err(Error::invalid(format!(
                    "{}: breaker.scope {rel:?}: no such cgroup ({})",
                    path.display(),
                    dir.display()
                )));
            }
        }

        // Everything checked: apply.
        for name in &removed {
            if self.services.get(name).is_some() {
                self.delete_service(name)?;
            }
        }
        for (name, eps) in shrinks.iter().chain(puts.iter()) {
            self.put_service(name, eps)?;
        }
        for name in &policies_changed {
            match new_policies.get(name) {
                Some(p) => {
                    self.set_policy(name, *p)?;
                }
                None if old_policies.contains_key(name) => self.clear_policy(name)?,
                None => {}
            }
        }
        for rel in &scope_added {
            self.kernel
                .attach_scope(rel)
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        for rel in &scope_removed {
            self.kernel
                .detach_scope(rel)
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        if authz_changed {
            self.authz.update(&next.agent.authz);
            info!(authz = ?next.agent.authz, "authorization updated");
        }
        self.config = next;
        let response = pb::ReloadConfigResponse {
            config_path: path.display().to_string(),
            services_added: added,
            services_changed: changed,
            services_removed: removed,
            policies_changed,
            scope_added,
            scope_removed,
        };
        info!(?response, "config reloaded");
        Ok(response)
    }
}
