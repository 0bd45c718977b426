//! The circuit breaker: its layouts, and the state machine itself.
//!
//! The state machine is plain `no_std` Rust over plain structs so that the very code the kernel
//! runs (under the entry's `bpf_spin_lock`) is unit-tested on the host. It follows sony/gobreaker:
//! a request is counted when it is admitted; its outcome counts only if the breaker is still in
//! the generation that admitted it (every state change and every interval rollover starts a new
//! one); Open turns Half-Open lazily, at the first connect after the deadline.

/// Breaker states.
pub mod state {
    pub const CLOSED: u32 = 0;
    pub const OPEN: u32 = 1;
    pub const HALF_OPEN: u32 = 2;

    pub const fn name(s: u32) -> &'static str {
        match s {
            CLOSED => "closed",
            OPEN => "open",
            HALF_OPEN => "half_open",
            _ => "unknown",
        }
    }
}

/// Why a breaker changed state.
pub mod cause {
    pub const NONE: u32 = 0;
    /// `failures / requests >= failure_ratio` with `requests >= min_requests`.
    pub const FAILURE_RATIO: u32 = 1;
    /// `consecutive_failures` reached.
    pub const CONSECUTIVE_FAILURES: u32 = 2;
    /// `max_failures` failures within one interval.
    pub const MAX_FAILURES: u32 = 3;
    /// An operator tripped it.
    pub const MANUAL: u32 = 4;
    /// Open for `open_timeout`: now Half-Open.
    pub const TIMEOUT: u32 = 5;
    /// `half_open_max` probes succeeded.
    pub const PROBE_SUCCESS: u32 = 6;
    /// A probe failed.
    pub const PROBE_FAILURE: u32 = 7;
    /// An operator reset it.
    pub const RESET: u32 = 8;
    /// A manual trip's time to live ran out.
    pub const TTL_EXPIRED: u32 = 9;
    /// A policy was set or changed.
    pub const POLICY: u32 = 10;

    pub const COUNT: u32 = 11;
    pub const NAMES: [&str; COUNT as usize] = [
        "none",
        "failure_ratio",
        "consecutive_failures",
        "max_failures",
        "manual",
        "timeout",
        "probe_success",
        "probe_failure",
        "reset",
        "ttl_expired",
        "policy",
    ];
}

/// Bits of [`Policy::flags`].
pub mod policy_flags {
    /// The service has a breaker; without it connects pass uncounted.
    pub const ENABLED: u32 = 1;
    /// Destroy established connections to the service when it trips.
    pub const TERMINATE: u32 = 2;
}

/// `failure_ratio` is kept in parts per million: no floats in the kernel.
pub const RATIO_ONE: u32 = 1_000_000;

/// Value of `BW_POLICIES`, indexed by service id. Written only by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub min_requests: u32,
    /// Parts per million (`RATIO_ONE` = 1.0); 0 turns the ratio rule off.
    pub failure_ratio_ppm: u32,
    /// 0 = off.
    pub consecutive_failures: u32,
    /// 0 = off.
    pub max_failures: u32,
    /// Counting window in Closed; 0 = counts are never cleared by time.
    pub interval_ns: u64,
    pub open_timeout_ns: u64,
    /// An established connect slower than this is a failure; 0 = off.
    pub slow_connect_ns: u64,
    pub half_open_max: u32,
    /// Positive errno a rejected `connect()` returns.
    pub errno: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// The counted part of a breaker, guarded by the map entry's spin lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub state: u32,
    /// 1 while an operator's trip holds it open.
    pub forced: u32,
    pub generation: u64,
    pub requests: u64,
    pub failures: u64,
    pub successes: u64,
    pub consecutive_failures: u64,
    pub consecutive_successes: u64,
    /// Probes admitted in this Half-Open period.
    pub probes: u64,
    /// Closed: when the counting interval ends (0 = never).
    pub interval_end_ns: u64,
    /// Open: when it turns Half-Open, or when a forced trip's TTL ends (0 = never).
    pub open_until_ns: u64,
    /// When the state last changed (CLOSE_MONOTONIC ns).
    pub changed_ns: u64,
}

/// Layout of the kernel's `struct bpf_spin_lock`. The type must carry this exact name in BTF
/// for the verifier to accept the map.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// Value of `BW_BREAKERS`, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerEntry {
    pub lock: bpf_spin_lock,
    pub _pad: u32,
    pub counts: Counts,
}

/// Value of `BW_BRK_TOTALS`, indexed by service id: monotonic, updated with atomic adds
/// outside the lock so that the agent never has to read-modify-write them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub rejected: u64,
    pub trips: u64,
    pub probes: u64,
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
}

/// Value of `BW_BRK_SOCKS` (socket-local storage): a connection to a service, as admitted
/// by the connect hook in the enforced scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerSock {
    pub svc: u32,
    pub flags: u32,
    pub generation: u64,
    pub connect_ns: u64,
}

/// Bits of [`BreakerSock::flags`].
pub mod sock_flags {
    /// The outcome (established or failed) has been counted.
    pub const DONE: u32 = 1;
    /// The connect was counted as a request of its generation (a policy was set).
    pub const COUNTED: u32 = 2;
    /// Counted as a success: a later reset turns it into a failure.
    pub const SUCCEEDED: u32 = 4;
}

/// A state change, sent through `BW_BRK_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub time_ns: u64,
    pub svc: u32,
    pub from: u32,
    pub to: u32,
    pub cause: u32,
    /// The counts at the moment of the change (before they were cleared).
    pub requests: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
}

/// One entry of `BW_SVC_META`, indexed by service id: what the agent needs to rebuild its
/// service table after a restart (endpoints are the `BW_SVC_LPM` keys).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcMeta {
    pub name_len: u16,
    /// Who made the service and its policy ([`owner`]); in layout 1 these bytes were the
    /// upper half of a `u32` `name_len`, so zero: local.
    pub owner: u8,
    pub policy_owner: u8,
    pub reason_len: u16,
    /// Who forced it open, while forced ([`owner`]).
    pub tripped_by: u8,
    pub _pad: u8,
    pub name: [u8; 64],
    /// Why an operator tripped it, while forced.
    pub reason: [u8; 128],
}

impl Default for SvcMeta {
    fn default() -> Self {
        Self {
            name_len: 0,
            owner: owner::LOCAL,
            policy_owner: owner::LOCAL,
            reason_len: 0,
            tripped_by: owner::LOCAL,
            _pad: 0,
            name: [0; 64],
            reason: [0; 128],
        }
    }
}

/// Who made a service or a policy, or forced a breaker open, as `SvcMeta` keeps it.
pub mod owner {
    /// The local API (and anything from before owners were kept).
    pub const LOCAL: u8 = 0;
    pub const CONFIG: u8 = 1;
    pub const FLEET: u8 = 2;
}

/// A transition the state machine made: from, to, cause, and the counts before clearing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: u32,
    pub to: u32,
    pub cause: u32,
    pub requests: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
}

impl Event {
    /// Service `svc`'s transition at `time_ns`, as the ring buffer carries it.
    #[inline(always)]
    pub fn new(time_ns: u64, svc: u32, t: &Transition) -> Self {
        Self {
            time_ns,
            svc,
            from: t.from,
            to: t.to,
            cause: t.cause,
            requests: t.requests,
            failures: t.failures,
            consecutive_failures: t.consecutive_failures,
        }
    }

    /// The transition it reports.
    pub fn transition(&self) -> Transition {
        Transition {
            from: self.from,
            to: self.to,
            cause: self.cause,
            requests: self.requests,
            failures: self.failures,
            consecutive_failures: self.consecutive_failures,
        }
    }
}

/// What the connect hook does with a connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Let it through; `generation` is the one its outcome will count in.
    Admit {
        generation: u64,
        probe: bool,
    },
    Reject,
}

/// One volatile store of zero: see [`Counts::clear`].
#[inline(always)]
fn zero(field: &mut u64) {
    // SAFETY: a store through a valid reference.
    unsafe { core::ptr::write_volatile(field, 0) };
}

impl Counts {
    /// Zeroes the counts one store at a time: plain stores of neighbouring fields are merged
    /// into a call to `memset`, and 6.1's verifier refuses any call under a spin lock.
    #[inline(always)]
    fn clear(&mut self) {
        zero(&mut self.requests);
        zero(&mut self.failures);
        zero(&mut self.successes);
        zero(&mut self.consecutive_failures);
        zero(&mut self.consecutive_successes);
        zero(&mut self.probes);
    }

    /// Moves to `to`, starting a new generation with cleared counts.
    #[inline(always)]
    fn enter(&mut self, to: u32, cause: u32, p: &Policy, now: u64) -> Transition {
        let t = Transition {
            from: self.state,
            to,
            cause,
            requests: self.requests,
            failures: self.failures,
            consecutive_failures: self.consecutive_failures,
        };
        self.state = to;
        self.generation = self.generation.wrapping_add(1);
        self.changed_ns = now;
        self.clear();
        // SAFETY: a store through a valid reference (volatile: see `clear`).
        unsafe { core::ptr::write_volatile(&mut self.forced, 0) };
        zero(&mut self.interval_end_ns);
        zero(&mut self.open_until_ns);
        match to {
            state::CLOSED if p.interval_ns > 0 => self.interval_end_ns = now + p.interval_ns,
            state::OPEN => self.open_until_ns = now + p.open_timeout_ns,
            _ => {}
        }
        t
    }

    /// Closed: a new counting interval when the current one has ended (gobreaker's rollover).
    #[inline(always)]
    fn roll(&mut self, p: &Policy, now: u64) {
        if self.state == state::CLOSED && self.interval_end_ns != 0 && now >= self.interval_end_ns {
            self.clear();
            self.generation = self.generation.wrapping_add(1);
            self.interval_end_ns = if p.interval_ns > 0 {
                now + p.interval_ns
            } else {
                0
            };
        }
    }

    /// A `connect()` from the enforced scope to the service.
    #[inline(always)]
    pub fn on_connect(&mut self, p: &Policy, now: u64) -> (Admission, Option<Transition>) {
        let mut t = None;
        if self.state == state::OPEN && self.open_until_ns != 0 && now >= self.open_until_ns {
            t = Some(if self.forced != 0 {
                self.enter(state::CLOSED, cause::TTL_EXPIRED, p, now)
            } else {
                self.enter(state::HALF_OPEN, cause::TIMEOUT, p, now)
            });
        } else if self.state == state::HALF_OPEN
            && self.probes >= u64::from(p.half_open_max)
            && now >= self.changed_ns.saturating_add(p.open_timeout_ns)
        {
            // Probes whose outcome never came (a connect that failed before sending its SYN,
            // say) must not hold the breaker Half-Open for good: after another open_timeout,
            // admit fresh ones. A late outcome of the old ones is of an old generation.
            t = Some(self.enter(state::HALF_OPEN, cause::TIMEOUT, p, now));
        }
        self.roll(p, now);
        let a = match self.state {
            state::CLOSED => {
                self.requests += 1;
                Admission::Admit {
                    generation: self.generation,
                    probe: false,
                }
            }
            state::HALF_OPEN if self.probes < u64::from(p.half_open_max) => {
                self.probes += 1;
                self.requests += 1;
                Admission::Admit {
                    generation: self.generation,
                    probe: true,
                }
            }
            _ => Admission::Reject,
        };
        (a, t)
    }

    /// The outcome of a connect admitted in `generation`. `failed` is a refused, timed-out,
    /// otherwise failed or too slow connect; a success later reset by the peer calls this
    /// again with `reset` set, turning that success into a failure.
    #[inline(always)]
    pub fn on_outcome(
        &mut self,
        p: &Policy,
        generation: u64,
        failed: bool,
        reset: bool,
        now: u64,
    ) -> Option<Transition> {
        self.roll(p, now);
        if generation != self.generation {
            return None;
        }
        if !failed {
            self.successes += 1;
            self.consecutive_successes += 1;
            self.consecutive_failures = 0;
            if self.state == state::HALF_OPEN
                && self.consecutive_successes >= u64::from(p.half_open_max)
            {
                return Some(self.enter(state::CLOSED, cause::PROBE_SUCCESS, p, now));
            }
            return None;
        }
        if reset {
            self.successes = self.successes.saturating_sub(1);
        }
        self.failures += 1;
        self.consecutive_failures += 1;
        self.consecutive_successes = 0;
        match self.state {
            state::HALF_OPEN => Some(self.enter(state::OPEN, cause::PROBE_FAILURE, p, now)),
            state::CLOSED => {
                let cause = self.trip_cause(p);
                (cause != cause::NONE).then(|| self.enter(state::OPEN, cause, p, now))
            }
            _ => None,
        }
    }

    /// Which rule, if any, the counts now meet.
    #[inline(always)]
    fn trip_cause(&self, p: &Policy) -> u32 {
        if p.consecutive_failures > 0
            && self.consecutive_failures >= u64::from(p.consecutive_failures)
        {
            cause::CONSECUTIVE_FAILURES
        } else if p.max_failures > 0 && self.failures >= u64::from(p.max_failures) {
            cause::MAX_FAILURES
        } else if p.failure_ratio_ppm > 0
            && self.requests >= u64::from(p.min_requests)
            && self.failures * u64::from(RATIO_ONE)
                >= u64::from(p.failure_ratio_ppm) * self.requests
        {
            cause::FAILURE_RATIO
        } else {
            cause::NONE
        }
    }

    /// An operator's trip: Open now, until `ttl_ns` from now (0 = until reset).
    pub fn trip(&mut self, p: &Policy, ttl_ns: u64, now: u64) -> Transition {
        let t = self.enter(state::OPEN, cause::MANUAL, p, now);
        self.forced = 1;
        self.open_until_ns = if ttl_ns == 0 { 0 } else { now + ttl_ns };
        t
    }

    /// An operator's reset (or a new policy): Closed, counts cleared, any force lifted.
    pub fn reset(&mut self, p: &Policy, cause: u32, now: u64) -> Transition {
        self.enter(state::CLOSED, cause, p, now)
    }

    /// The counts as the next connect will find them: an Open breaker past its deadline is
    /// Half-Open (or, forced, Closed) although the kernel moves it only at that connect.
    pub fn effective(&self, p: &Policy, now: u64) -> Counts {
        let mut c = *self;
        if c.state == state::OPEN && c.open_until_ns != 0 && now >= c.open_until_ns {
            let to = if c.forced != 0 {
                state::CLOSED
            } else {
                state::HALF_OPEN
            };
            c.enter(to, cause::TIMEOUT, p, now);
        }
        c
    }

    /// Milliseconds until an Open breaker turns Half-Open (or a forced one closes); 0 otherwise.
    pub fn open_remaining_ms(&self, now: u64) -> u64 {
        if self.state == state::OPEN && self.open_until_ns > now {
            (self.open_until_ns - now).div_ceil(1_000_000)
        } else {
            0
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<Policy>() == 56);
    assert!(core::mem::size_of::<Counts>() == 88);
    assert!(core::mem::size_of::<BreakerEntry>() == 96);
    assert!(core::mem::size_of::<Totals>() == 32);
    assert!(core::mem::size_of::<BreakerSock>() == 24);
    assert!(core::mem::size_of::<Event>() == 48);
    assert!(core::mem::size_of::<SvcMeta>() == 200);
};

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn gobreaker() -> Policy {
        Policy {
            min_requests: 3,
            failure_ratio_ppm: 600_000,
            interval_ns: 60 * S,
            open_timeout_ns: 30 * S,
            half_open_max: 1,
            errno: 111,
            flags: policy_flags::ENABLED,
            ..Default::default()
        }
    }

    /// Runs connects with the given outcomes (true = failed), one at a time, returning the
    /// state after each.
    fn run(c: &mut Counts, p: &Policy, outcomes: &[bool], now: u64) -> [u32; 8] {
        let mut states = [u32::MAX; 8];
        for (i, &failed) in outcomes.iter().enumerate() {
            if let (Admission::Admit { generation, .. }, _) = c.on_connect(p, now) {
                c.on_outcome(p, generation, failed, false, now);
            }
            states[i] = c.state;
        }
        states
    }

    #[test]
    fn ratio_needs_min_requests() {
        let p = gobreaker();
        let mut c = Counts::default();
        let s = run(&mut c, &p, &[true, true, true], 1);
        assert_eq!(&s[..3], &[state::CLOSED, state::CLOSED, state::OPEN]);
        let mut c = Counts::default();
        let s = run(&mut c, &p, &[false, false, true, true, true], 1);
        // 1/3, 2/4, 3/5 = 0.6
        assert_eq!(&s[..5], &[0, 0, 0, 0, state::OPEN]);
    }

    #[test]
    fn open_rejects_then_half_open_admits_max_probes() {
        let mut p = gobreaker();
        p.half_open_max = 2;
        let mut c = Counts::default();
        run(&mut c, &p, &[true, true, true], 1);
        assert_eq!(c.on_connect(&p, 2).0, Admission::Reject);
        let later = 1 + 30 * S;
        let (a, t) = c.on_connect(&p, later);
        assert!(matches!(a, Admission::Admit { probe: true, .. }));
        assert_eq!(t.map(|t| t.cause), Some(cause::TIMEOUT));
        let Admission::Admit { generation: g, .. } = a else {
            unreachable!()
        };
        assert!(matches!(c.on_connect(&p, later).0, Admission::Admit { .. }));
        assert_eq!(c.on_connect(&p, later).0, Admission::Reject);
        assert_eq!(c.on_outcome(&p, g, false, false, later), None);
        let t = c.on_outcome(&p, g, false, false, later).unwrap();
        assert_eq!((t.to, t.cause), (state::CLOSED, cause::PROBE_SUCCESS));
    }

    #[test]
    fn probe_failure_reopens_and_stale_outcomes_are_ignored() {
        let p = gobreaker();
        let mut c = Counts::default();
        let (
            Admission::Admit {
                generation: old, ..
            },
            _,
        ) = c.on_connect(&p, 1)
        else {
            panic!()
        };
        run(&mut c, &p, &[true, true, true], 1);
        assert_eq!(c.state, state::OPEN);
        // An outcome from before the trip does not count.
        assert_eq!(c.on_outcome(&p, old, true, false, 2), None);
        let later = 1 + 30 * S;
        let (Admission::Admit { generation, .. }, _) = c.on_connect(&p, later) else {
            panic!()
        };
        let t = c.on_outcome(&p, generation, true, false, later).unwrap();
        assert_eq!((t.to, t.cause), (state::OPEN, cause::PROBE_FAILURE));
        assert_eq!(c.open_until_ns, later + 30 * S);
    }

    #[test]
    fn probes_without_an_outcome_are_given_up_after_open_timeout() {
        let p = gobreaker();
        let mut c = Counts::default();
        run(&mut c, &p, &[true, true, true], 1);
        let half = 1 + 30 * S;
        let (
            Admission::Admit {
                generation: lost, ..
            },
            _,
        ) = c.on_connect(&p, half)
        else {
            panic!()
        };
        assert_eq!(c.on_connect(&p, half + S).0, Admission::Reject);
        // No outcome for 30 s: a fresh probe, and the lost one's late outcome does not count.
        let (a, t) = c.on_connect(&p, half + 30 * S);
        assert!(matches!(a, Admission::Admit { probe: true, .. }));
        assert_eq!(
            t.map(|t| (t.from, t.to, t.cause)),
            Some((state::HALF_OPEN, state::HALF_OPEN, cause::TIMEOUT))
        );
        assert_eq!(c.on_outcome(&p, lost, true, false, half + 31 * S), None);
        assert_eq!(c.state, state::HALF_OPEN);
    }

    #[test]
    fn max_failures_within_an_interval() {
        let p = Policy {
            max_failures: 3,
            interval_ns: 30 * S,
            open_timeout_ns: 30 * S,
            half_open_max: 1,
            ..Default::default()
        };
        let mut c = Counts::default();
        run(&mut c, &p, &[true, true], 1);
        // The interval ends: counts start over.
        c.reset(&p, cause::POLICY, 1);
        run(&mut c, &p, &[true, false, true], 1);
        assert_eq!(c.state, state::CLOSED);
        run(&mut c, &p, &[false], 31 * S);
        assert_eq!(c.failures, 0, "rolled over");
        run(&mut c, &p, &[true, true, true], 32 * S);
        assert_eq!(c.state, state::OPEN);
    }

    #[test]
    fn consecutive_failures_and_reset_after_success() {
        let p = Policy {
            consecutive_failures: 2,
            open_timeout_ns: S,
            half_open_max: 1,
            ..Default::default()
        };
        let mut c = Counts::default();
        run(&mut c, &p, &[true, false, true], 1);
        assert_eq!(c.state, state::CLOSED);
        run(&mut c, &p, &[true], 1);
        assert_eq!(c.state, state::OPEN);
    }

    #[test]
    fn forced_trip_expires_to_closed() {
        let p = gobreaker();
        let mut c = Counts::default();
        c.trip(&p, 2 * S, 10);
        assert_eq!(c.on_connect(&p, 10 + S).0, Admission::Reject);
        assert_eq!(c.open_remaining_ms(10 + S), 1000);
        let (a, t) = c.on_connect(&p, 10 + 2 * S);
        assert!(matches!(a, Admission::Admit { probe: false, .. }));
        assert_eq!(t.map(|t| t.cause), Some(cause::TTL_EXPIRED));
        c.trip(&p, 0, 10);
        assert_eq!(c.on_connect(&p, u64::MAX / 2).0, Admission::Reject);
    }

    #[test]
    fn reset_of_an_established_connection_is_a_failure() {
        let p = Policy {
            consecutive_failures: 1,
            open_timeout_ns: S,
            half_open_max: 1,
            ..Default::default()
        };
        let mut c = Counts::default();
        let (Admission::Admit { generation, .. }, _) = c.on_connect(&p, 1) else {
            panic!()
        };
        assert_eq!(c.on_outcome(&p, generation, false, false, 1), None);
        let t = c.on_outcome(&p, generation, true, true, 2).unwrap();
        assert_eq!(t.cause, cause::CONSECUTIVE_FAILURES);
        assert_eq!((t.requests, t.failures), (1, 1));
    }
}
