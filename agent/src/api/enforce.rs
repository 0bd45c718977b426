//! The breaker side of the core: policies, manual trips and resets, and the state the kernel
//! keeps. Everything here acts on the pinned maps, so it works the same after a restart.

use std::time::{Duration, SystemTime};

use breakwater_common::breaker::{Counts, Policy, Totals};

use super::Core;
use crate::error::{Error, Result};

/// One service's breaker as the API reports it.
#[derive(Clone, Debug)]
pub struct BreakerView {
    pub service: String,
    pub policy: Policy,
    pub counts: Counts,
    pub totals: Totals,
    /// Why an operator tripped it (while forced).
    pub reason: String,
    pub open_remaining_ms: u64,
}

/// A breaker state change, from the kernel's ring buffer or from an operator's action.
#[derive(Clone, Debug)]
pub struct BreakerEventView {
    pub service: String,
    /// `breakwater_common::breaker::state`
    pub from: u32,
    pub to: u32,
    /// `breakwater_common::breaker::cause`
    pub cause: u32,
    pub requests: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    pub time: SystemTime,
    pub reason: String,
}

impl Core {
    /// Every service with a policy, by name.
    pub fn breakers(&self) -> Result<Vec<BreakerView>> {
        Err(Error::Internal("not yet".into()))
    }

    /// One service's breaker; NotFound for an unknown service, InvalidArgument if it has no
    /// policy.
    pub fn breaker(&self, _service: &str) -> Result<BreakerView> {
        Err(Error::Internal("not yet".into()))
    }

    /// Sets (or replaces) a service's policy: the breaker starts Closed with counts cleared.
    pub fn set_policy(&mut self, _service: &str, _policy: Policy) -> Result<BreakerView> {
        Err(Error::Internal("not yet".into()))
    }

    pub fn clear_policy(&mut self, _service: &str) -> Result<()> {
        Err(Error::Internal("not yet".into()))
    }

    /// Forces the breaker open, for `ttl` (None: until reset).
    pub fn trip(
        &mut self,
        _service: &str,
        _ttl: Option<Duration>,
        _reason: &str,
    ) -> Result<BreakerView> {
        Err(Error::Internal("not yet".into()))
    }

    pub fn reset(&mut self, _service: &str) -> Result<BreakerView> {
        Err(Error::Internal("not yet".into()))
    }

    /// A receiver of every state change from now on (`Lagged(n)` tells a slow subscriber how
    /// many it lost).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BreakerEventView> {
        self.events.subscribe()
    }
}
