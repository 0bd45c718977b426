//! Who made each service and each breaker policy: the config file, an operator through the
//! local API, or the fleet (etcd). Only the owner changes an object. The fleet's wins over a
//! local or configured one of the same name, which is kept aside (shadowed) and comes back
//! when the fleet's goes.

use std::collections::BTreeMap;

use breakwater_common::breaker::owner as code;

use super::policy::Rules;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// The local API (and what a previous agent left pinned that nobody claimed).
    #[default]
    Local,
    /// The config file.
    Config,
    /// The fleet's desired state in etcd.
    Fleet,
}

impl Owner {
    /// As the kernel keeps it (`SvcMeta`).
    pub fn code(self) -> u8 {
        match self {
            Owner::Local => code::LOCAL,
            Owner::Config => code::CONFIG,
            Owner::Fleet => code::FLEET,
        }
    }

    pub fn from_code(c: u8) -> Self {
        match c {
            code::CONFIG => Owner::Config,
            code::FLEET => Owner::Fleet,
            _ => Owner::Local,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Owner::Local => "local",
            Owner::Config => "config",
            Owner::Fleet => "fleet",
        }
    }
}

/// What a change by `by` to an object `owner` owns does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Make it (and own it).
    Apply,
    /// The fleet owns it: keep the change aside as the shadowed definition.
    Shadow,
}

/// A definition the fleet's hides.
#[derive(Clone, Debug, PartialEq)]
pub struct Shadowed<T> {
    pub owner: Owner,
    pub value: T,
}

/// The owners of services and policies, and what the fleet's hide.
#[derive(Clone, Debug, Default)]
pub struct Owners {
    services: BTreeMap<String, Owner>,
    policies: BTreeMap<String, Owner>,
    pub(super) shadowed_services: BTreeMap<String, Shadowed<Vec<String>>>,
    pub(super) shadowed_policies: BTreeMap<String, Shadowed<Rules>>,
    /// Who forced each forced-open breaker.
    tripped_by: BTreeMap<String, Owner>,
}

fn what(kind: &str, name: &str, fix: &str) -> Error {
    Error::Owned(format!(
        "{kind} {name:?} is owned by the fleet (etcd): change it with `breakwater fleet {fix}`, \
         or on this node only after the fleet's is deleted"
    ))
}

impl Owners {
    pub fn service(&self, name: &str) -> Option<Owner> {
        self.services.get(name).copied()
    }

    pub fn policy(&self, name: &str) -> Option<Owner> {
        self.policies.get(name).copied()
    }

    pub fn tripped_by(&self, name: &str) -> Option<Owner> {
        self.tripped_by.get(name).copied()
    }

    /// The owner of the definition the fleet's service `name` hides.
    pub fn shadowed_service(&self, name: &str) -> Option<Owner> {
        self.shadowed_services.get(name).map(|s| s.owner)
    }

    pub fn shadowed_policy(&self, name: &str) -> Option<Owner> {
        self.shadowed_policies.get(name).map(|s| s.owner)
    }

    /// May `by` put or delete the service `name`?
    pub fn check_service(&self, by: Owner, name: &str) -> Result<Verdict> {
        check(self.service(name), by).map_err(|()| what("service", name, "service put|delete"))
    }

    pub fn check_policy(&self, by: Owner, name: &str) -> Result<Verdict> {
        check(self.policy(name), by)
            .map_err(|()| what("policy of service", name, "policy set|clear"))
    }

    pub(super) fn set_service(&mut self, name: &str, owner: Owner) {
        self.services.insert(name.to_owned(), owner);
    }

    /// The service is gone, and with it its policy and trip.
    pub(super) fn remove_service(&mut self, name: &str) {
        self.services.remove(name);
        self.policies.remove(name);
        self.tripped_by.remove(name);
        self.shadowed_services.remove(name);
        self.shadowed_policies.remove(name);
    }

    pub(super) fn set_policy(&mut self, name: &str, owner: Owner) {
        self.policies.insert(name.to_owned(), owner);
    }

    pub(super) fn remove_policy(&mut self, name: &str) {
        self.policies.remove(name);
        self.tripped_by.remove(name);
    }

    /// What the kernel keeps of `name`'s owners: service, policy, trip.
    pub(super) fn codes(&self, name: &str) -> [u8; 3] {
        [self.service(name), self.policy(name), self.tripped_by(name)]
            .map(|o| o.unwrap_or_default().code())
    }

    /// Owners a previous agent kept in the kernel; `policy` if the service has one.
    pub(super) fn restore(
        &mut self,
        name: &str,
        [service, policy, trip]: [u8; 3],
        has_policy: bool,
    ) {
        self.set_service(name, Owner::from_code(service));
        if has_policy {
            self.set_policy(name, Owner::from_code(policy));
            self.set_tripped_by(name, Some(Owner::from_code(trip)));
        }
    }

    pub(super) fn set_tripped_by(&mut self, name: &str, by: Option<Owner>) {
        match by {
            Some(by) => self.tripped_by.insert(name.to_owned(), by),
            None => self.tripped_by.remove(name),
        };
    }
}

fn check(owner: Option<Owner>, by: Owner) -> std::result::Result<Verdict, ()> {
    match (owner, by) {
        (Some(Owner::Fleet), Owner::Fleet) => Ok(Verdict::Apply),
        (Some(Owner::Fleet), Owner::Config) => Ok(Verdict::Shadow),
        (Some(Owner::Fleet), Owner::Local) => Err(()),
        _ => Ok(Verdict::Apply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_fleet_changes_what_the_fleet_owns() {
        let mut o = Owners::default();
        assert_eq!(o.check_service(Owner::Local, "db").unwrap(), Verdict::Apply);
        o.set_service("db", Owner::Fleet);
        let e = o.check_service(Owner::Local, "db").unwrap_err().to_string();
        assert!(
            e.starts_with("service \"db\" is owned by the fleet (etcd)"),
            "{e}"
        );
        assert_eq!(
            o.check_service(Owner::Config, "db").unwrap(),
            Verdict::Shadow
        );
        assert_eq!(o.check_service(Owner::Fleet, "db").unwrap(), Verdict::Apply);
        o.set_service("web", Owner::Config);
        assert_eq!(
            o.check_service(Owner::Local, "web").unwrap(),
            Verdict::Apply
        );
        assert_eq!(
            o.check_service(Owner::Fleet, "web").unwrap(),
            Verdict::Apply
        );
    }
}
