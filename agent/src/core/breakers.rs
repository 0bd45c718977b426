//! Breakers: policies, manual trips and resets, the state the kernel keeps, and the state
//! changes (the kernel's and the operators') as events. Everything here acts on the kernel's
//! (pinned) maps, so it works the same after a restart.

use std::time::{Duration, SystemTime};

use std::net::SocketAddr;

use breakwater_common::breaker::{
    self as brk, cause, dest_op, policy_flags, state, Counts, DestBreakerKey, DestCommand,
    DestPolicy, MoreTotals, Policy, Totals,
};
use tracing::{info, warn};

use super::{
    audit::Subscription,
    features::Feature,
    owners::{Owner, Shadowed, Verdict},
    policy::{self, Rules},
    service::display_addr,
    Core, Kernel,
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
    /// Destination granularity: its rules (with `live`, the destinations seen within the
    /// TTL), totals, and each destination's breaker.
    pub dest: DestPolicy,
    pub more_totals: MoreTotals,
    pub destinations: Vec<DestinationView>,
    /// Protected destinations the service's endpoints cover: never refused.
    pub protected: Vec<super::protected::Protected>,
}

impl BreakerView {
    /// Destinations not Closed now.
    pub fn ejected(&self) -> usize {
        self.destinations
            .iter()
            .filter(|d| d.counts.state != state::CLOSED)
            .count()
    }
}

/// One destination's breaker (destination granularity).
#[derive(Clone, Debug)]
pub struct DestinationView {
    pub destination: SocketAddr,
    /// As the next connect will find them.
    pub counts: Counts,
    pub open_remaining_ms: u64,
    /// Trips since it last closed after probes: its open timeout is `open_timeout` × this,
    /// capped.
    pub trips: u32,
    /// Nanoseconds since its last connect.
    pub idle_ns: u64,
    /// Why an operator tripped it, and who (while forced).
    pub reason: String,
    pub tripped_by: Option<Owner>,
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
    /// The destination whose breaker changed (destination granularity); None: the service's.
    pub destination: Option<SocketAddr>,
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

    /// A service's policy as the core keeps it (the kernel's `live` count left out).
    pub(super) fn rules(&self, id: u32) -> Result<Rules> {
        let mut dest = self.kernel.dest_policy(id)?;
        dest.live = 0;
        Ok(Rules {
            policy: self.kernel.policy(id)?,
            dest,
        })
    }

    fn destination_views(&self, id: u32, policy: &Policy) -> Result<Vec<DestinationView>> {
        if policy.flags & policy_flags::DESTINATION == 0 {
            return Ok(Vec::new());
        }
        let now = self.kernel.now_ns();
        let epoch = self.kernel.counts(id)?.changed_ns;
        let mut out: Vec<DestinationView> = self
            .kernel
            .dest_breakers()
            .into_iter()
            // A breaker of an older epoch starts over at its next connect: not shown till then.
            .filter(|(k, d)| k.svc == id && d.epoch == epoch)
            .map(|(k, d)| {
                let counts = d.counts.effective(policy, now);
                let destination = SocketAddr::new(display_addr(&k.addr), k.port);
                let forced = self
                    .dest_trips
                    .get(&(id, destination))
                    .filter(|_| counts.forced != 0);
                DestinationView {
                    destination,
                    counts,
                    open_remaining_ms: counts.open_remaining_ms(now),
                    trips: d.trips,
                    idle_ns: now.saturating_sub(d.last_seen_ns),
                    reason: forced.map(|(r, _)| r.clone()).unwrap_or_default(),
                    tripped_by: (counts.forced != 0)
                        .then(|| forced.map(|(_, by)| *by).unwrap_or_default()),
                }
            })
            .collect();
        out.sort_by_key(|d| d.destination);
        Ok(out)
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
            dest: self.kernel.dest_policy(id)?,
            more_totals: self.kernel.more_totals(id)?,
            destinations: self.destination_views(id, &policy)?,
            protected: self
                .services
                .get(service)
                .map(|s| self.protected_in(&s.endpoints))
                .unwrap_or_default(),
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
        rules: impl Into<Rules>,
    ) -> Result<BreakerView> {
        let id = self.service_id(service)?;
        let mut rules: Rules = rules.into();
        rules.policy.flags |= policy_flags::ENABLED;
        rules.dest.live = 0;
        let policy = rules.policy;
        if self.owners.check_policy(owner, service)? == Verdict::Shadow {
            self.owners.shadowed_policies.insert(
                service.to_owned(),
                Shadowed {
                    owner,
                    value: rules,
                },
            );
            return self.breaker(service);
        }
        let mut counts = self.kernel.counts(id)?;
        let current = self.rules(id)?;
        let had_policy = current.policy.flags & policy_flags::ENABLED != 0;
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
        // Only the mode changes: the breaker goes on as it is (an audit's trip is enforced).
        let mode_only = had_policy
            && Rules {
                policy: Policy {
                    flags: current.policy.flags ^ policy_flags::AUDIT,
                    ..current.policy
                },
                dest: current.dest,
            } == rules;
        if mode_only {
            self.kernel.set_policy(id, &policy)?;
            self.owners.set_policy(service, owner);
            self.save_owners(service)?;
            info!(
                service,
                audit = policy.flags & policy_flags::AUDIT != 0,
                owner = owner.name(),
                "breaker mode set"
            );
            return self.view(id, service, policy);
        }
        // A new epoch: every destination breaker of the service starts over.
        let t = counts.reset(&policy, cause::POLICY, self.kernel.now_ns());
        self.kernel.set_counts(id, counts)?;
        self.kernel.set_policy(id, &policy)?;
        let live = self.kernel.dest_policy(id)?.live;
        self.kernel
            .set_dest_policy(id, &DestPolicy { live, ..rules.dest })?;
        self.dest_trips.retain(|(svc, _), _| *svc != id);
        self.kernel.set_service_meta(id, service, "")?;
        self.owners.set_policy(service, owner);
        self.owners.set_tripped_by(service, None);
        self.save_owners(service)?;
        if had_policy && (t.from != t.to || t.from == state::OPEN) {
            self.publish(service, &t, "");
        }
        info!(service, ?policy, dest = ?rules.dest, owner = owner.name(), "breaker policy set");
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
        self.kernel.set_dest_policy(id, &DestPolicy::default())?;
        self.kernel.set_counts(id, Counts::default())?;
        self.dest_trips.retain(|(svc, _), _| *svc != id);
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
        let termination = self.terminate_on_trip(id, service, None);
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
            destination: None,
        });
    }

    /// Transitions the kernel made (from its ring buffer), in order.
    pub fn on_kernel_events(&mut self, events: &[brk::Event]) {
        for ev in events {
            self.on_kernel_event(ev);
        }
    }

    /// A transition the kernel made: published, and on a trip the service's connections (the
    /// destination's, for a destination's breaker) are terminated if its policy says so.
    fn on_kernel_event(&mut self, ev: &brk::Event) {
        let Some(service) = self.services.name_of(ev.svc).map(str::to_owned) else {
            return;
        };
        let t = ev.transition();
        let destination = (ev.port != 0).then(|| SocketAddr::new(display_addr(&ev.addr), ev.port));
        let shown = destination.map(|d| d.to_string()).unwrap_or_default();
        if t.cause == cause::EJECTION_CAPPED {
            // Each failure of a destination the cap keeps in: counted (`ejections_capped`) and
            // sent to watchers, so not a warning each time.
            info!(
                service,
                destination = %shown,
                "destination not ejected: max_ejection_percent of the service's destinations are ejected already"
            );
        } else {
            info!(
                service,
                destination = %shown,
                from = state::name(t.from),
                to = state::name(t.to),
                cause = policy::cause_name(t.cause),
                requests = t.requests,
                failures = t.failures,
                "breaker changed state"
            );
        }
        let time = self.wall_time(ev.time_ns);
        let _ = self.events.send(BreakerEvent {
            service: service.clone(),
            transition: t,
            time,
            reason: String::new(),
            destination,
        });
        if t.to == state::OPEN && t.from != state::OPEN {
            let dest = destination.map(|_| (ev.addr, ev.port));
            self.terminate_on_trip(ev.svc, &service, dest);
        }
    }

    /// Destroys the connections a trip leaves behind if the policy says so; what it did.
    fn terminate_on_trip(
        &mut self,
        id: u32,
        service: &str,
        dest: Option<([u8; 16], u16)>,
    ) -> Termination {
        let mut termination = Termination::default();
        let (terminate, audit) = self.kernel.policy(id).map_or((false, false), |p| {
            (
                p.flags & policy_flags::TERMINATE != 0,
                p.flags & policy_flags::AUDIT != 0,
            )
        });
        if !terminate {
            return termination;
        }
        if audit {
            info!(service, "audit mode: established connections kept");
            termination.not_terminated = "audit mode: the breaker refuses nothing".into();
            return termination;
        }
        match self.kernel.features().require(Feature::TerminateOnTrip) {
            Ok(()) => match self.kernel.terminate(id, dest) {
                Ok(destroyed) => {
                    termination.terminated = destroyed;
                    info!(service, destroyed, "connections terminated");
                }
                Err(e) => warn!(service, error = %e, "cannot terminate connections"),
            },
            Err(off) => {
                warn!(service, reason = %off, "established connections not terminated");
                termination.not_terminated = off.to_string();
            }
        }
        termination
    }

    /// The service's policy, which must be of destination granularity, and the key of one of
    /// its destinations.
    fn destination_of(
        &self,
        service: &str,
        destination: SocketAddr,
    ) -> Result<(u32, Policy, DestBreakerKey)> {
        let (id, policy) = self.breaker_of(service)?;
        if policy.flags & policy_flags::DESTINATION == 0 {
            return Err(Error::invalid(format!(
                "service {service:?} has one breaker for all its destinations: trip or reset it \
                 without a destination, or set its policy's granularity to destination"
            )));
        }
        let addr = match destination.ip() {
            std::net::IpAddr::V4(v4) => breakwater_common::v4_mapped(v4.octets()),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        if self.services.get(service).is_some_and(|s| {
            !s.endpoints
                .iter()
                .any(|e| e.port == destination.port() && e.net.contains(&destination.ip()))
        }) {
            return Err(Error::invalid(format!(
                "{destination} is not a destination of service {service:?}"
            )));
        }
        Ok((
            id,
            policy,
            DestBreakerKey {
                svc: id,
                port: destination.port(),
                _pad: 0,
                addr,
            },
        ))
    }

    /// Forces one destination's breaker open (destination granularity), for `ttl` (None: until
    /// reset), whatever the ejection cap; its established connections are terminated if the
    /// policy says so.
    pub fn trip_destination(
        &mut self,
        by: Owner,
        service: &str,
        destination: SocketAddr,
        ttl: Option<Duration>,
        reason: &str,
    ) -> Result<(BreakerView, Termination)> {
        policy::check_reason(reason)?;
        let (id, policy, key) = self.destination_of(service, destination)?;
        let ttl_ns = ttl.map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX / 2)) as u64);
        let before = self.dest_state(&key);
        let done = self.kernel.dest_command(&DestCommand {
            key,
            op: dest_op::TRIP,
            _pad: 0,
            arg_ns: ttl_ns,
        })?;
        if done != dest_op::DONE {
            return Err(Error::ResourceExhausted(format!(
                "cannot trip {destination} of {service:?}: no room for its breaker \
                 (maps.max_destination_breakers is reached)"
            )));
        }
        self.dest_trips
            .insert((id, destination), (reason.to_owned(), by));
        let t = brk::Transition {
            from: before,
            to: state::OPEN,
            cause: cause::MANUAL,
            requests: 0,
            failures: 0,
            consecutive_failures: 0,
        };
        self.publish_destination(service, destination, &t, reason);
        info!(service, %destination, ?ttl, reason, by = by.name(), "destination tripped by hand");
        let termination = self.terminate_on_trip(id, service, Some((key.addr, key.port)));
        Ok((self.view(id, service, policy)?, termination))
    }

    /// One destination's breaker back to Closed, its open timeout back to the base.
    pub fn reset_destination(
        &mut self,
        service: &str,
        destination: SocketAddr,
    ) -> Result<BreakerView> {
        let (id, policy, key) = self.destination_of(service, destination)?;
        let before = self.dest_state(&key);
        let done = self.kernel.dest_command(&DestCommand {
            key,
            op: dest_op::RESET,
            _pad: 0,
            arg_ns: 0,
        })?;
        self.dest_trips.remove(&(id, destination));
        if done == dest_op::DONE {
            let t = brk::Transition {
                from: before,
                to: state::CLOSED,
                cause: cause::RESET,
                requests: 0,
                failures: 0,
                consecutive_failures: 0,
            };
            self.publish_destination(service, destination, &t, "");
            info!(service, %destination, "destination reset by hand");
        }
        self.view(id, service, policy)
    }

    fn dest_state(&self, key: &DestBreakerKey) -> u32 {
        let epoch = self
            .kernel
            .counts(key.svc)
            .map(|c| c.changed_ns)
            .unwrap_or(0);
        self.kernel
            .dest_breakers()
            .into_iter()
            .find(|(k, d)| k == key && d.epoch == epoch)
            .map_or(state::CLOSED, |(_, d)| d.counts.state)
    }

    fn publish_destination(
        &self,
        service: &str,
        destination: SocketAddr,
        t: &brk::Transition,
        reason: &str,
    ) {
        let _ = self.events.send(BreakerEvent {
            service: service.to_owned(),
            transition: *t,
            time: SystemTime::now(),
            reason: reason.to_owned(),
            destination: Some(destination),
        });
    }

    /// Forgets destinations idle for their service's `destination_ttl` (unless ejected), and
    /// counts the live ones of each service, which the ejection cap is a share of.
    pub fn reap_destinations(&mut self) -> Result<()> {
        let now = self.kernel.now_ns();
        let mut live: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        let mut policies: std::collections::HashMap<u32, (Policy, DestPolicy, u64)> =
            std::collections::HashMap::new();
        for (key, d) in self.kernel.dest_breakers() {
            let (policy, dest, epoch) = match policies.entry(key.svc) {
                std::collections::hash_map::Entry::Occupied(e) => *e.get(),
                std::collections::hash_map::Entry::Vacant(e) => *e.insert((
                    self.kernel.policy(key.svc)?,
                    self.kernel.dest_policy(key.svc)?,
                    self.kernel.counts(key.svc)?.changed_ns,
                )),
            };
            let oldest = now.saturating_sub(dest.destination_ttl_ns);
            let current = d.epoch == epoch && policy.flags & policy_flags::DESTINATION != 0;
            if current && d.last_seen_ns >= oldest {
                *live.entry(key.svc).or_default() += 1;
                continue;
            }
            let cmd = DestCommand {
                key,
                op: dest_op::REAP,
                _pad: 0,
                // A destination of a service no longer per destination goes at once.
                arg_ns: if current { oldest } else { u64::MAX },
            };
            if self.kernel.dest_command(&cmd)? == dest_op::DONE {
                let destination = SocketAddr::new(display_addr(&key.addr), key.port);
                self.dest_trips.remove(&(key.svc, destination));
            }
        }
        for s in self.services.iter() {
            let mut dest = self.kernel.dest_policy(s.id)?;
            let n = live.get(&s.id).copied().unwrap_or(0);
            if dest.live != n && (dest.destination_ttl_ns != 0 || dest.live != 0) {
                dest.live = n;
                self.kernel.set_dest_policy(s.id, &dest)?;
            }
        }
        Ok(())
    }
}

impl<K: Kernel + ?Sized> Core<K> {
    /// The wall-clock time of an instant of the kernel's clock.
    pub(super) fn wall_time(&self, kernel_ns: u64) -> SystemTime {
        clock::wall_time(kernel_ns, self.kernel.now_ns())
    }
}
