//! What the running kernel lets the agent do: each feature, whether it is on, and through which
//! hook. The loader probes the kernel and fills in a [`Features`]; `info`, `GetAgentInfo`,
//! `/metrics` and the start-up log report it, and calls that need an off feature say so.

use std::fmt;

/// A feature of the agent that depends on what the kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// Connections opened, closed, failed and active, per destination and service (core).
    ConnectionTracking,
    /// TIME_WAIT per destination and ephemeral-port pressure.
    TimeWait,
    /// SYN sent -> established.
    ConnectLatency,
    /// A request's send -> the first data that answers it.
    FirstResponseLatency,
    /// SRTT, bytes sent and received, connection lifetime.
    TcpStats,
    /// The latency histograms per destination as well as per service.
    DestinationLatency,
    /// Retransmitted segments per destination.
    Retransmits,
    /// The breaker's `connect()` gate, with the policy's errno (core).
    BreakerGate,
    /// Admitted connects' outcomes, which trip the breaker in the kernel.
    BreakerOutcomes,
    /// Terminating a tripped service's established connections.
    TerminateOnTrip,
    /// The connection event stream (`WatchConnections`).
    AuditStream,
}

impl Feature {
    pub const ALL: [Feature; 11] = [
        Feature::ConnectionTracking,
        Feature::TimeWait,
        Feature::ConnectLatency,
        Feature::FirstResponseLatency,
        Feature::TcpStats,
        Feature::DestinationLatency,
        Feature::Retransmits,
        Feature::BreakerGate,
        Feature::BreakerOutcomes,
        Feature::TerminateOnTrip,
        Feature::AuditStream,
    ];

    /// The name used by the API, the CLI and `/metrics`.
    pub const fn name(self) -> &'static str {
        match self {
            Feature::ConnectionTracking => "connection_tracking",
            Feature::TimeWait => "time_wait",
            Feature::ConnectLatency => "connect_latency",
            Feature::FirstResponseLatency => "first_response_latency",
            Feature::TcpStats => "tcp_stats",
            Feature::DestinationLatency => "destination_latency",
            Feature::Retransmits => "retransmits",
            Feature::BreakerGate => "breaker_gate",
            Feature::BreakerOutcomes => "breaker_outcomes",
            Feature::TerminateOnTrip => "terminate_on_trip",
            Feature::AuditStream => "audit_stream",
        }
    }

    /// A core feature that cannot run stops the agent; any other is turned off.
    pub const fn is_core(self) -> bool {
        matches!(self, Feature::ConnectionTracking | Feature::BreakerGate)
    }

    /// The feature of that name (see [`Feature::name`]).
    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The feature an operator names to turn off (`[features] disable`, `--disable-feature`):
    /// an unknown name or a core feature is refused, with the names that may be given.
    pub fn optional(name: &str) -> Result<Feature, String> {
        let optional = || {
            Feature::ALL
                .iter()
                .filter(|f| !f.is_core())
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match Feature::from_name(name) {
            None => Err(format!(
                "unknown feature {name:?} (optional features: {})",
                optional()
            )),
            Some(f) if f.is_core() => Err(format!(
                "{f} is a core feature and cannot be disabled (optional features: {})",
                optional()
            )),
            Some(f) => Ok(f),
        }
    }

    /// The latency histogram kind (`breakwater_common::hist_kind`) and the feature that
    /// measures it.
    pub const fn of_histogram(kind: u32) -> Feature {
        use breakwater_common::hist_kind;
        match kind {
            hist_kind::CONNECT => Feature::ConnectLatency,
            hist_kind::FIRST_RESPONSE => Feature::FirstResponseLatency,
            // SRTT and LIFETIME are read when a connection leaves ESTABLISHED.
            _ => Feature::TcpStats,
        }
    }
}

/// The reason of a feature the operator turned off.
pub const DISABLED_BY_CONFIG: &str = "disabled by configuration (features.disable)";

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Fully on, through the best hook for it.
    On,
    /// On, with less than on the kernels that have the best hook (the reason says what).
    Degraded,
    /// Not available on this kernel (the reason says why).
    Off,
}

impl Status {
    pub const fn name(self) -> &'static str {
        match self {
            Status::On => "on",
            Status::Degraded => "degraded",
            Status::Off => "off",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One feature's state on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureState {
    pub feature: Feature,
    pub status: Status,
    /// The hooks that implement it here (`tp_btf/inet_sock_set_state`, `fentry/...`); empty
    /// when off.
    pub hook: String,
    /// Why it is degraded or off (what is missing, and which kernel brings it); empty when on.
    pub reason: String,
}

/// Every feature's state, in [`Feature::ALL`] order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features(Vec<FeatureState>);

impl Default for Features {
    /// Nothing probed yet: everything off.
    fn default() -> Self {
        Self(
            Feature::ALL
                .iter()
                .map(|&feature| FeatureState {
                    feature,
                    status: Status::Off,
                    hook: String::new(),
                    reason: "not probed".into(),
                })
                .collect(),
        )
    }
}

impl Features {
    pub fn get(&self, feature: Feature) -> &FeatureState {
        self.0
            .iter()
            .find(|s| s.feature == feature)
            .expect("every feature has a state")
    }

    pub fn is_on(&self, feature: Feature) -> bool {
        self.get(feature).status != Status::Off
    }

    pub fn set(
        &mut self,
        feature: Feature,
        status: Status,
        hook: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let s = self
            .0
            .iter_mut()
            .find(|s| s.feature == feature)
            .expect("every feature has a state");
        s.status = status;
        s.hook = hook.into();
        s.reason = reason.into();
    }

    pub fn on(&mut self, feature: Feature, hook: impl Into<String>) {
        self.set(feature, Status::On, hook, "");
    }

    pub fn off(&mut self, feature: Feature, reason: impl Into<String>) {
        self.set(feature, Status::Off, "", reason);
    }

    pub fn iter(&self) -> impl Iterator<Item = &FeatureState> {
        self.0.iter()
    }

    /// Turns off what the operator disabled ([`DISABLED_BY_CONFIG`]), whatever the kernel
    /// offers.
    pub fn disable(&mut self, features: &[Feature]) {
        for &f in features {
            self.off(f, DISABLED_BY_CONFIG);
        }
    }

    /// For a call that needs `feature`: `FeatureOff` (FAILED_PRECONDITION) with the feature's
    /// name and why it is off, when it is off.
    pub fn require(&self, feature: Feature) -> Result<(), crate::error::Error> {
        let s = self.get(feature);
        if s.status == Status::Off {
            return Err(crate::error::Error::FeatureOff(format!(
                "{feature} is off: {}",
                s.reason
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_has_a_state_and_a_unique_name() {
        let f = Features::default();
        let mut names: Vec<_> = f.iter().map(|s| s.feature.name()).collect();
        assert_eq!(names.len(), Feature::ALL.len());
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Feature::ALL.len());
    }

    #[test]
    fn require_says_why() {
        let mut f = Features::default();
        f.off(Feature::FirstResponseLatency, "no send hook");
        let e = f.require(Feature::FirstResponseLatency).unwrap_err();
        assert_eq!(e.to_string(), "first_response_latency is off: no send hook");
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::FailedPrecondition
        );
        f.on(Feature::FirstResponseLatency, "tp_btf/x");
        assert!(f.require(Feature::FirstResponseLatency).is_ok());
        // Degraded is on.
        f.set(Feature::FirstResponseLatency, Status::Degraded, "x", "y");
        assert!(f.require(Feature::FirstResponseLatency).is_ok());
    }

    #[test]
    fn names_parse_back_and_only_optional_features_may_be_disabled() {
        for f in Feature::ALL {
            assert_eq!(Feature::from_name(f.name()), Some(f));
            assert_eq!(Feature::optional(f.name()).is_ok(), !f.is_core(), "{f}");
        }
        let err = Feature::optional("nonsense").unwrap_err();
        assert!(err.starts_with("unknown feature \"nonsense\""), "{err}");
        assert!(err.contains("first_response_latency"), "{err}");
        assert!(!err.contains("breaker_gate"), "{err}");
        let err = Feature::optional("breaker_gate").unwrap_err();
        assert!(err.starts_with("breaker_gate is a core feature"), "{err}");
    }

    #[test]
    fn disabled_features_are_off_with_the_configuration_as_reason() {
        let mut f = Features::default();
        for feature in Feature::ALL {
            f.on(feature, "hook");
        }
        f.disable(&[Feature::AuditStream]);
        let s = f.get(Feature::AuditStream);
        assert_eq!((s.status, s.hook.as_str()), (Status::Off, ""));
        assert_eq!(s.reason, DISABLED_BY_CONFIG);
        assert!(f.is_on(Feature::TcpStats));
    }
}
