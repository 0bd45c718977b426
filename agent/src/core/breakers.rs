//! Breakers: policies, manual trips and resets, the state the kernel keeps, and the state
//! changes (the kernel's and the operators') as events. Everything here acts on the kernel's
//! (pinned) maps, so it works the same after a restart.

use std::time::{Duration, SystemTime};

use breakwater_common::breaker::{self as brk, cause, policy_flags, state, Counts, Policy, Totals};
use tracing::{info, warn};

use super::{
    audit::Subscription,
    features::Feature,
    owners::{Owner, Shadowed, Verdict},
    policy, Core, Kernel,
};
use crate::{
    clock,
    error::{Error, Result},
};

/// One service's breaker.
#[derive(Clone, Debug)]
pub struct BreakerView {
    pub service: String,
    pub policy: Policy,
    /// As the next connect will find them (see `Counts::effective`).
    pub counts: Counts,
    pub totals: Totals,
    /// Why an operator tripped it (while forced).
    pub reason: String,
    pub open_remaining_ms: u64,
    /// Who set the policy.
    pub policy_owner: Owner,
    /// Who forced it open (while forced).
    pub tripped_by: Option<Owner>,
    /// The fleet quorum rule, kept by the agent beside the kernel's policy.
    pub quorum: Option<policy::Quorum>,
}

/// A breaker state change, from the kernel's ring buffer or from an operator's action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerEvent {
    pub service: String,
    /// From, to, why (`breakwater_common::breaker::{state, cause}`), and the counts before they
    /// were cleared.
    pub transition: brk::Transition,
    pub time: SystemTime,
    /// An operator's reason, for a trip by hand.
    pub reason: String,
}

/// What a trip did to the service's established connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Termination {
    /// Connections destroyed.
    pub terminated: usize,
    /// Why the connections were kept although the policy says to terminate them; empty
    /// otherwise.
    pub not_terminated: String,
}

impl<K: Kernel + ?Sized> Core<K> {
    /// A service's id and policy; InvalidArgument if the service is unknown or has no breaker.
    fn breaker_of(&self, service: &str) -> Result<(u32, Policy)> {
        let id = self.service_id(service)?;
        let policy = self.kernel.policy(id)?;
        if policy.flags & policy_flags::ENABLED == 0 {
            return Err(Error::invalid(format!(
                "service {service:?} has no breaker policy (set one with `breakwater policy set {service} --preset gobreaker`)"
            )));
        }
        Ok((id, policy))
    }

    fn service_id(&self, service: &str) -> Result<u32> {
        self.services
            .get(service)
            .map(|s| s.id)
            .ok_or_else(|| Error::invalid(format!("no service named {service:?}")))
    }

    fn view(&self, id: u32, service: &str, policy: Policy) -> Result<BreakerView> {
        let now = self.kernel.now_ns();
        let counts = self.kernel.counts(id)?.effective(&policy, now);
        Ok(BreakerView {
            service: service.to_owned(),
            policy,
            counts,
            totals: self.kernel.totals(id)?,
            reason: if counts.forced != 0 {
                self.kernel.trip_reason(id)
            } else {
                String::new()
            },
            open_remaining_ms: counts.open_remaining_ms(now),
            policy_owner: self.owners.policy(service).unwrap_or_default(),
            tripped_by: if counts.forced != 0 {
                Some(self.owners.tripped_by(service).unwrap_or_default())
            } else {
                None
            },
            quorum: self.quorums.get(service).copied(),
        })
    }

    /// Every service with a policy, by name.
    pub fn breakers(&self) -> Result<Vec<BreakerView>> {
        let mut out = Vec::new();
        for s in self.services.iter() {
            let policy = self.kernel.policy(s.id)?;
            if policy.flags & policy_flags::ENABLED != 0 {
                out.push(self.view(s.id, &s.name, policy)?);
            }
        }
        Ok(out)
    }

    /// One service's breaker; InvalidArgument for an unknown service or one without a policy.
    pub fn breaker(&self, service: &str) -> Result<BreakerView> {
        let (id, policy) = self.breaker_of(service)?;
        self.view(id, service, policy)
    }

    /// Sets (or replaces) a service's policy as `owner`: the breaker starts Closed with counts
    /// cleared. A change to a fleet-owned policy by the config is kept aside; by the local API
    /// it is refused.
    pub fn set_policy(
        &mut self,
        owner: Owner,
        service: &str,
        policy: Policy,
    ) -> Result<BreakerView> {
        let id = self.service_id(service)?;
        let policy = Policy {
            flags: policy.flags | policy_flags::ENABLED,
            ..policy
        };
        if self.owners.check_policy(owner, service)? == Verdict::Shadow {
            self.owners.shadowed_policies.insert(
                service.to_owned(),
                Shadowed {
                    owner,
                    value: policy,
                },
            );
            return self.breaker(service);
        }
        let mut counts = self.kernel.counts(id)?;
        let current = self.kernel.policy(id)?;
        let had_policy = current.flags & policy_flags::ENABLED != 0;
        if owner == Owner::Fleet && had_policy {
            if let Some(p @ (Owner::Local | Owner::Config)) = self.owners.policy(service) {
                self.owners.shadowed_policies.insert(
                    service.to_owned(),
                    Shadowed {
                        owner: p,
                        value: current,
                    },
                );
            }
        }
        let t = counts.reset(&policy, cause::POLICY, self.kernel.now_ns());
        self.kernel.set_counts(id, counts)?;
        self.kernel.set_policy(id, &policy)?;
        self.kernel.set_service_meta(id, service, "")?;
        self.owners.set_policy(service, owner);
        self.owners.set_tripped_by(service, None);
        self.save_owners(service)?;
        if had_policy && (t.from != t.to || t.from == state::OPEN) {
            self.publish(service, &t, "");
        }
        info!(service, ?policy, owner = owner.name(), "breaker policy set");
        self.view(id, service, policy)
    }

    /// Sets or removes the fleet quorum rule of a service's policy, as `owner` (the policy's
    /// owner rules it). Refused on an agent without a fleet: no other node would count.
    pub fn set_quorum(
        &mut self,
        owner: Owner,
        service: &str,
        quorum: Option<policy::Quorum>,
    ) -> Result<()> {
        if quorum.is_some() {
            self.require_fleet()?;
        }
        if self.owners.check_policy(owner, service)? == Verdict::Shadow {
            return Ok(());
        }
        match quorum {
            Some(q) => {
                self.breaker_of(service)?;
                self.quorums.insert(service.to_owned(), q);
            }
            None => {
                self.quorums.remove(service);
            }
        }
        Ok(())
    }

    /// InvalidArgument unless the agent is in a fleet (quorum rules need other nodes).
    pub fn require_fleet(&self) -> Result<()> {
        if self.fleet.is_none() {
            return Err(Error::invalid(
                "fleet_quorum needs an agent in a fleet (started with --etcd, or [fleet] etcd \
                 in its config)",
            ));
        }
        Ok(())
    }

    /// The fleet quorum rules, by service.
    pub fn quorums(&self) -> &std::collections::BTreeMap<String, policy::Quorum> {
        &self.quorums
    }

    /// Removes a service's breaker as `owner`: its connects pass uncounted from now on. When the
    /// fleet clears its own, the policy it hid comes back.
    pub fn clear_policy(&mut self, owner: Owner, service: &str) -> Result<()> {
        if self.owners.check_policy(owner, service)? == Verdict::Shadow {
            if self.owners.shadowed_policy(service) == Some(owner) {
                self.owners.shadowed_policies.remove(service);
            }
            return Ok(());
        }
        if owner == Owner::Fleet && self.owners.policy(service) == Some(Owner::Fleet) {
            if let Some(hidden) = self.owners.shadowed_policies.remove(service) {
                self.owners.set_policy(service, hidden.owner);
                self.set_policy(hidden.owner, service, hidden.value)?;
                return Ok(());
            }
        }
        let (id, _) = self.breaker_of(service)?;
        self.kernel.set_policy(id, &Policy::default())?;
        self.kernel.set_counts(id, Counts::default())?;
        self.kernel.set_service_meta(id, service, "")?;
        self.owners.remove_policy(service);
        self.quorums.remove(service);
        self.save_owners(service)?;
        info!(service, owner = owner.name(), "breaker policy cleared");
        Ok(())
    }

    /// Forces the breaker open, for `ttl` (None: until reset), and terminates the service's
    /// established connections if its policy says so and terminate_on_trip is on.
    pub fn trip(
        &mut self,
        by: Owner,
        service: &str,
        ttl: Option<Duration>,
        reason: &str,
    ) -> Result<(BreakerView, Termination)> {
        policy::check_reason(reason)?;
        let (id, policy) = self.breaker_of(service)?;
        let ttl_ns = ttl.map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX / 2)) as u64);
        let mut counts = self.kernel.counts(id)?;
        let t = counts.trip(&policy, ttl_ns, self.kernel.now_ns());
        self.kernel.set_service_meta(id, service, reason)?;
        self.kernel.set_counts(id, counts)?;
        self.kernel.count_trip(id)?;
        self.owners.set_tripped_by(service, Some(by));
        self.save_owners(service)?;
        self.publish(service, &t, reason);
        info!(
            service,
            ?ttl,
            reason,
            by = by.name(),
            "breaker tripped by hand"
        );
        let mut termination = Termination::default();
        if policy.flags & policy_flags::TERMINATE != 0 {
            match self.kernel.features().require(Feature::TerminateOnTrip) {
                Ok(()) => {
                    termination.terminated = self.kernel.terminate(id)?;
                    info!(
                        service,
                        destroyed = termination.terminated,
                        "connections terminated"
                    );
                }
                Err(off) => {
                    warn!(service, reason = %off, "established connections not terminated");
                    termination.not_terminated = off.to_string();
                }
            }
        }
        Ok((self.view(id, service, policy)?, termination))
    }

    /// Back to Closed, counts cleared, any force lifted.
    pub fn reset(&mut self, service: &str) -> Result<BreakerView> {
        let (id, policy) = self.breaker_of(service)?;
        let mut counts = self.kernel.counts(id)?;
        let t = counts.reset(&policy, cause::RESET, self.kernel.now_ns());
        self.kernel.set_counts(id, counts)?;
        self.kernel.set_service_meta(id, service, "")?;
        self.owners.set_tripped_by(service, None);
        self.save_owners(service)?;
        self.publish(service, &t, "");
        info!(service, "breaker reset by hand");
        self.view(id, service, policy)
    }

    /// The state changes from now on, only `service`'s unless it is empty (NotFound for an
    /// unknown one), each with the number this subscriber lost just before it.
    pub fn watch_breakers(&self, service: &str) -> Result<Subscription<BreakerEvent>> {
        self.require_known(service)?;
        Ok(Subscription::new(self.events.subscribe(), service))
    }

    fn publish(&self, service: &str, t: &brk::Transition, reason: &str) {
        self.publish_at(service, t, reason, SystemTime::now());
    }

    fn publish_at(&self, service: &str, t: &brk::Transition, reason: &str, time: SystemTime) {
        // No subscribers is no error.
        let _ = self.events.send(BreakerEvent {
            service: service.to_owned(),
            transition: *t,
            time,
            reason: reason.to_owned(),
        });
    }

    /// Transitions the kernel made (from its ring buffer), in order.
    pub fn on_kernel_events(&mut self, events: &[brk::Event]) {
        for ev in events {
            self.on_kernel_event(ev);
        }
    }

    /// A transition the kernel made: published, and on a trip the service's connections are
    /// terminated if its policy says so.
    fn on_kernel_event(&mut self, ev: &brk::Event) {
        let Some(service) = self.services.name_of(ev.svc).map(str::to_owned) else {
            return;
        };
        let t = ev.transition();
        info!(
            service,
            from = state::name(t.from),
            to = state::name(t.to),
            cause = policy::cause_name(t.cause),
            requests = t.requests,
            failures = t.failures,
            "breaker changed state"
        );
        let time = self.wall_time(ev.time_ns);
        self.publish_at(&service, &t, "", time);
        if t.to == state::OPEN && t.from != state::OPEN {
            let terminate = self
                .kernel
                .policy(ev.svc)
                .is_ok_and(|p| p.flags & policy_flags::TERMINATE != 0);
            let off = self.kernel.features().require(Feature::TerminateOnTrip);
            if let (true, Err(off)) = (terminate, &off) {
                warn!(service, reason = %off, "established connections not terminated");
            } else if terminate {
                match self.kernel.terminate(ev.svc) {
                    Ok(destroyed) => info!(service, destroyed, "connections terminated"),
                    Err(e) => warn!(service, error = %e, "cannot terminate connections"),
                }
            }
        }
    }
}

impl<K: Kernel + ?Sized> Core<K> {
    /// The wall-clock time of an instant of the kernel's clock.
    pub(super) fn wall_time(&self, kernel_ns: u64) -> SystemTime {
        clock::wall_time(kernel_ns, self.kernel.now_ns())
    }
}
