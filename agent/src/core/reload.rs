//! `ReloadConfig` and SIGHUP: re-read the config file and apply the difference to the running
//! agent (services, breaker policies, enforced cgroups), keeping the programs attached and every
//! count and breaker state. The new file is checked whole first: if anything in it cannot be
//! applied, nothing is.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use super::policy::Rules;
use tracing::{info, warn};

use super::{owners::Owner, protected::Protected, service::parse_endpoints, Core, Kernel};
use crate::{
    config::{AuthzConfig, Config, ServiceConfig},
    error::{Error, Result},
};

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reloaded {
    pub config_path: String,
    pub services_added: Vec<String>,
    pub services_changed: Vec<String>,
    pub services_removed: Vec<String>,
    /// Services whose breaker policy was set, changed or cleared.
    pub policies_changed: Vec<String>,
    /// Cgroups the breakers are now enforced on, or no longer.
    pub scope_added: Vec<String>,
    pub scope_removed: Vec<String>,
    /// The new `[agent.authz]` if it changed: who may change state, which the API applies.
    pub authz: Option<AuthzConfig>,
    /// What the API applied now: listeners moved, stopped or started, certificates re-read.
    pub applied: Vec<String>,
    /// Keys whose new values wait for the next start (`[features] disable`, `[agent] socket`, ...).
    pub pending_restart: Vec<String>,
}

/// For each listed field of `next` that differs from `running`: `section.key` pushed to `out`,
/// and the running value put back into `next`.
macro_rules! read_at_start {
    ($out:expr, $section:literal, $next:expr, $running:expr, [$($field:ident),+ $(,)?]) => {
        $(
            if $next.$field != $running.$field {
                $out.push(concat!($section, ".", stringify!($field)).to_owned());
                $next.$field = $running.$field.clone();
            }
        )+
    };
}

fn policies(config: &Config) -> Result<BTreeMap<String, Rules>> {
    Ok(config.policies()?.into_iter().collect())
}

fn by_name(config: &Config) -> BTreeMap<&str, &ServiceConfig> {
    config
        .services
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect()
}

impl<K: Kernel + ?Sized> Core<K> {
    /// Re-reads the config file and applies what changed since the config last applied.
    pub fn reload(&mut self) -> Result<Reloaded> {
        let (path, next) = self.next_config()?;
        self.reload_to(&path, next, None)
    }

    /// The config file as a reload would apply it (flags and environment over it), checked.
    pub fn next_config(&self) -> Result<(PathBuf, Config)> {
        let path = self.config_path.clone().ok_or_else(|| {
            Error::invalid("the agent was started without --config: there is no file to reload")
        })?;
        let mut next = Config::load(&path)?;
        self.overrides.apply(&mut next)?;
        Ok((path, next))
    }

    /// Applies `next` (read from `path` by [`Core::next_config`]) if all of it can be; `own`:
    /// the agent's own protected destinations from now on, if its listeners move.
    pub fn reload_to(
        &mut self,
        path: &Path,
        mut next: Config,
        own: Option<Vec<Protected>>,
    ) -> Result<Reloaded> {
        if next.maps != self.config.maps {
            return Err(Error::invalid(format!(
                "{}: [maps] changed: map sizes take effect only when the agent restarts",
                path.display()
            )));
        }
        // Read at start only: reported, and kept as they run until the next start (so that
        // every reload until then reports them).
        let mut pending_restart = Vec::new();
        let running = &self.config;
        read_at_start!(
            pending_restart,
            "features",
            next.features,
            running.features,
            [disable]
        );
        read_at_start!(
            pending_restart,
            "agent",
            next.agent,
            running.agent,
            [
                socket,
                socket_mode,
                socket_group,
                pin_dir,
                log_format,
                connection_sweep
            ]
        );
        // The fleet itself (endpoints, on or off) changes at the next start: its TLS files now.
        read_at_start!(
            pending_restart,
            "fleet",
            next.fleet,
            running.fleet,
            [etcd, prefix, node_name, labels]
        );
        read_at_start!(
            pending_restart,
            "metrics",
            next.metrics,
            running.metrics,
            [top_destinations]
        );
        if !pending_restart.is_empty() {
            warn!(
                keys = ?pending_restart,
                "settings changed that take effect when the agent restarts"
            );
        }
        let authz_changed = next.agent.authz != self.config.agent.authz;
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
        let scope_added: Vec<String> = new_scope.difference(&old_scope).cloned().collect();
        let scope_removed: Vec<String> = old_scope.difference(&new_scope).cloned().collect();
        for rel in &scope_added {
            self.kernel.check_scope(rel).map_err(|e| match e {
                Error::InvalidArgument(why) => Error::invalid(format!("{}: {why}", path.display())),
                e => e,
            })?;
        }

        // Everything checked: apply, protection first.
        if let Some(own) = own {
            self.own_protected = own;
        }
        self.apply_protected(&next)?;
        for name in &removed {
            if self.services.get(name).is_some() {
                self.delete_service(Owner::Config, name)?;
            }
        }
        for (name, eps) in shrinks.iter().chain(puts.iter()) {
            self.put_service(Owner::Config, name, eps)?;
        }
        for name in &policies_changed {
            match new_policies.get(name) {
                Some(p) => {
                    self.set_policy(Owner::Config, name, *p)?;
                }
                None if old_policies.contains_key(name) => {
                    self.clear_policy(Owner::Config, name)?
                }
                None => {}
            }
        }
        for (name, quorum) in next.quorums()? {
            if self.services.get(&name).is_some() {
                self.set_quorum(Owner::Config, &name, quorum)?;
            }
        }
        for rel in &scope_added {
            self.kernel.attach_scope(rel)?;
        }
        for rel in &scope_removed {
            self.kernel.detach_scope(rel)?;
        }
        let reloaded = Reloaded {
            config_path: path.display().to_string(),
            services_added: added,
            services_changed: changed,
            services_removed: removed,
            policies_changed,
            scope_added,
            scope_removed,
            authz: authz_changed.then(|| next.agent.authz.clone()),
            applied: Vec::new(),
            pending_restart,
        };
        self.config = next;
        info!(?reloaded, "config reloaded");
        Ok(reloaded)
    }
}
