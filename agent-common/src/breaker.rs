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
    /// A destination's rule was met, but ejecting it would exceed `max_ejection_percent`:
    /// it stays closed (reported, never a state change).
    pub const EJECTION_CAPPED: u32 = 11;

    pub const COUNT: u32 = 12;
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
        "ejection_capped",
    ];
}

/// Bits of [`Policy::flags`].
pub mod policy_flags {
    /// The service has a breaker; without it connects pass uncounted.
    pub const ENABLED: u32 = 1;
    /// Destroy established connections to the service when it trips.
    pub const TERMINATE: u32 = 2;
    /// Each destination (address:port) of the service has its own breaker (`DestBreaker`),
    /// under the same rules; the service's own breaker only holds operators' trips.
    pub const DESTINATION: u32 = 4;
    /// Audit mode: the breaker counts, trips and reports as ever, and refuses nothing (what
    /// it would have refused is counted in `MoreTotals::audited`).
    pub const AUDIT: u32 = 8;
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
    /// Destination granularity: how many of the service's destinations of this epoch are not
    /// Closed (ejected). Kept under `lock` by the kernel only; any write by the agent starts a
    /// new epoch (`counts.changed_ns`) with this at 0.
    pub ejected: u32,
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
    /// Counted in a destination's breaker, whose key is in `BW_DEST_SOCKS`.
    pub const DEST: u32 = 8;
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
    /// The destination whose breaker changed (destination granularity); port 0: the service's.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
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
            addr: [0; 16],
            port: 0,
            _pad: [0; 6],
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
            // Saturating: a policy pinned by a damaged agent may hold any duration (the agent's
            // own are at most 30 days); a wrapped deadline would be one already past.
            state::CLOSED if p.interval_ns > 0 => {
                self.interval_end_ns = now.saturating_add(p.interval_ns)
            }
            state::OPEN => self.open_until_ns = now.saturating_add(p.open_timeout_ns),
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
                now.saturating_add(p.interval_ns)
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
        self.outcome(p, generation, failed, reset, now, true).0
    }

    /// [`Counts::on_outcome`], where a trip from Closed happens only if `may_trip`; the second
    /// value says a rule was met but the trip was not allowed (the counts go on).
    #[inline(always)]
    pub fn outcome(
        &mut self,
        p: &Policy,
        generation: u64,
        failed: bool,
        reset: bool,
        now: u64,
        may_trip: bool,
    ) -> (Option<Transition>, bool) {
        self.roll(p, now);
        if generation != self.generation {
            return (None, false);
        }
        if !failed {
            self.successes += 1;
            self.consecutive_successes += 1;
            self.consecutive_failures = 0;
            if self.state == state::HALF_OPEN
                && self.consecutive_successes >= u64::from(p.half_open_max)
            {
                return (
                    Some(self.enter(state::CLOSED, cause::PROBE_SUCCESS, p, now)),
                    false,
                );
            }
            return (None, false);
        }
        if reset {
            self.successes = self.successes.saturating_sub(1);
        }
        self.failures += 1;
        self.consecutive_failures += 1;
        self.consecutive_successes = 0;
        match self.state {
            state::HALF_OPEN => (
                Some(self.enter(state::OPEN, cause::PROBE_FAILURE, p, now)),
                false,
            ),
            state::CLOSED => match self.trip_cause(p) {
                cause::NONE => (None, false),
                _ if !may_trip => (None, true),
                cause => (Some(self.enter(state::OPEN, cause, p, now)), false),
            },
            _ => (None, false),
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
        self.open_until_ns = if ttl_ns == 0 {
            0
        } else {
            now.saturating_add(ttl_ns)
        };
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

/// Key of `BW_DEST_BREAKERS`: one destination (address:port) of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestBreakerKey {
    pub svc: u32,
    pub port: u16,
    pub _pad: u16,
    /// IPv6, or IPv4-mapped IPv6.
    pub addr: [u8; 16],
}

/// Value of `BW_DEST_POLICIES`, indexed by service id: what destination granularity adds to
/// the service's `Policy`. Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestPolicy {
    /// Cap on the growing open timeout; 0 = the timeout does not grow.
    pub max_open_timeout_ns: u64,
    /// The agent forgets destinations not seen for this long (and stops counting them).
    pub destination_ttl_ns: u64,
    /// At most this share (percent) of `live` destinations ejected at once; never less than one.
    pub max_ejection_percent: u32,
    /// Destinations seen within the destination TTL, as the agent last counted them.
    pub live: u32,
}

/// Value of `BW_MORE_TOTALS`, indexed by service id: monotonic, atomic adds by the kernel.
/// Totals that came after `Totals`, whose pinned layout stays as it was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoreTotals {
    /// Trips refused because `max_ejection_percent` destinations were ejected already.
    pub capped: u64,
    /// New destinations not tracked (and let through) because `BW_DEST_BREAKERS` was full.
    pub untracked: u64,
    /// Audit mode: connects the breaker would have refused, let through.
    pub audited: u64,
}

/// Value of `BW_DEST_BREAKERS`: one destination's breaker. Changed only by programs, under the
/// lock of the service's `BreakerEntry` (one lock for the service and all its destinations),
/// so that the number ejected is exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestBreaker {
    pub counts: Counts,
    /// The service's `counts.changed_ns` this breaker belongs to: an older one is stale, and
    /// starts over Closed (a new policy, a service trip or reset).
    pub epoch: u64,
    pub last_seen_ns: u64,
    /// Trips since the last close after probes: the open timeout grows with them.
    pub trips: u32,
    pub flags: u32,
}

/// Bits of [`DestBreaker::flags`].
pub mod dest_flags {
    /// Being removed (reaped): treat as absent.
    pub const DEAD: u32 = 1;
}

/// What the agent asks `bw_dest_cmd` to do, passed as its (test-run) packet data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestCommand {
    pub key: DestBreakerKey,
    pub op: u32,
    pub _pad: u32,
    /// Trip: the time to live in ns (0 = until reset). Reap: the oldest `last_seen_ns` kept.
    pub arg_ns: u64,
}

/// [`DestCommand::op`] values, and what `bw_dest_cmd` returns.
pub mod dest_op {
    pub const TRIP: u32 = 1;
    pub const RESET: u32 = 2;
    /// Remove the breaker if it is Closed and was last seen before `arg_ns`.
    pub const REAP: u32 = 3;

    /// Done (a state change for trip and reset; removed for reap).
    pub const DONE: i32 = 0;
    /// Nothing to do: already in that state, not there, or (reap) kept.
    pub const UNCHANGED: i32 = 1;
    /// The breaker could not be made or found (the map is full).
    pub const FAILED: i32 = 2;
}

/// How an admitted connect of `generation` ended: `failed`, and `reset` for a success the peer
/// later reset (see [`Counts::on_outcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub generation: u64,
    pub failed: bool,
    pub reset: bool,
}

/// What a destination's connect or outcome did, beside the service's own transition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestStep {
    pub transition: Option<Transition>,
    /// A rule was met and the ejection refused (the cap).
    pub capped: bool,
}

/// The most destinations of `live` that may be ejected at once: `percent` of them, rounded
/// down, and at least one (as Envoy's outlier detection does, so that small services eject).
#[inline(always)]
pub fn ejection_cap(percent: u32, live: u32) -> u32 {
    if percent >= 100 {
        return u32::MAX;
    }
    let cap = (u64::from(live) * u64::from(percent) / 100) as u32;
    if cap == 0 {
        1
    } else {
        cap
    }
}

impl DestBreaker {
    /// Starts this breaker over, Closed, in `epoch`.
    #[inline(always)]
    fn renew(&mut self, p: &Policy, epoch: u64, now: u64) {
        self.counts.enter(state::CLOSED, cause::POLICY, p, now);
        self.epoch = epoch;
        self.trips = 0;
    }

    /// Brings a stale breaker (of an older epoch) into `entry`'s.
    #[inline(always)]
    fn current(&mut self, entry: &BreakerEntry, p: &Policy, now: u64) {
        if self.epoch != entry.counts.changed_ns {
            self.renew(p, entry.counts.changed_ns, now);
        }
    }

    /// Keeps `ejected` equal to the destinations not Closed, and grows the open timeout on
    /// each automatic trip.
    #[inline(always)]
    fn account(&mut self, entry: &mut BreakerEntry, t: &Transition, dp: &DestPolicy) {
        if t.from == state::CLOSED && t.to != state::CLOSED {
            entry.ejected += 1;
        } else if t.from != state::CLOSED && t.to == state::CLOSED {
            entry.ejected = entry.ejected.saturating_sub(1);
        }
        if t.to == state::CLOSED && t.cause != cause::TTL_EXPIRED {
            self.trips = 0;
        }
        if t.to == state::OPEN && t.cause != cause::MANUAL {
            self.trips += 1;
            if dp.max_open_timeout_ns > 0 {
                let base = self.counts.open_until_ns - self.counts.changed_ns;
                let (n, max) = (u64::from(self.trips), dp.max_open_timeout_ns);
                // No 128-bit multiply in BPF: compare by division instead of saturating.
                let grown = if base != 0 && n > max / base {
                    max
                } else {
                    (base * n).min(max)
                };
                self.counts.open_until_ns = self.counts.changed_ns + grown;
            }
        }
    }

    /// A connect to this destination, the service's entry locked by the caller (whose own
    /// gate admitted it).
    #[inline(always)]
    pub fn on_connect(
        &mut self,
        entry: &mut BreakerEntry,
        p: &Policy,
        dp: &DestPolicy,
        now: u64,
    ) -> (Admission, Option<Transition>) {
        self.current(entry, p, now);
        self.last_seen_ns = now;
        let (a, t) = self.counts.on_connect(p, now);
        if let Some(t) = &t {
            self.account(entry, t, dp);
        }
        (a, t)
    }

    /// The outcome of a connect admitted in `generation`, the service's entry locked by the
    /// caller: a trip from Closed only while fewer than the cap are ejected.
    #[inline(always)]
    pub fn on_outcome(
        &mut self,
        entry: &mut BreakerEntry,
        p: &Policy,
        dp: &DestPolicy,
        o: Outcome,
        now: u64,
    ) -> DestStep {
        let Outcome {
            generation,
            failed,
            reset,
        } = o;
        if self.epoch != entry.counts.changed_ns {
            // Counted in an older epoch: nothing of it is left to count in.
            return DestStep::default();
        }
        let may_trip = entry.ejected < ejection_cap(dp.max_ejection_percent, dp.live);
        let (t, capped) = self
            .counts
            .outcome(p, generation, failed, reset, now, may_trip);
        if let Some(t) = &t {
            self.account(entry, t, dp);
        }
        DestStep {
            transition: t,
            capped,
        }
    }

    /// An operator's trip of this destination: Open until `ttl_ns` from now (0 = until reset),
    /// whatever the cap.
    #[inline(always)]
    pub fn trip(
        &mut self,
        entry: &mut BreakerEntry,
        p: &Policy,
        dp: &DestPolicy,
        ttl_ns: u64,
        now: u64,
    ) -> Transition {
        self.current(entry, p, now);
        let t = self.counts.trip(p, ttl_ns, now);
        self.account(entry, &t, dp);
        t
    }

    /// An operator's reset of this destination: Closed, its open timeout back to the base.
    #[inline(always)]
    pub fn reset(
        &mut self,
        entry: &mut BreakerEntry,
        p: &Policy,
        dp: &DestPolicy,
        now: u64,
    ) -> Option<Transition> {
        self.current(entry, p, now);
        self.trips = 0;
        if self.counts.state == state::CLOSED {
            return None;
        }
        let t = self.counts.reset(p, cause::RESET, now);
        self.account(entry, &t, dp);
        Some(t)
    }

    /// Whether the reaper may remove it: Closed (or stale) and not seen since `oldest_ns`.
    #[inline(always)]
    pub fn reapable(&self, entry: &BreakerEntry, oldest_ns: u64) -> bool {
        (self.counts.state == state::CLOSED || self.epoch != entry.counts.changed_ns)
            && self.last_seen_ns < oldest_ns
    }
}

const _: () = {
    assert!(core::mem::size_of::<Policy>() == 56);
    assert!(core::mem::size_of::<Counts>() == 88);
    assert!(core::mem::size_of::<BreakerEntry>() == 96);
    assert!(core::mem::size_of::<Totals>() == 32);
    assert!(core::mem::size_of::<BreakerSock>() == 24);
    assert!(core::mem::size_of::<Event>() == 72);
    assert!(core::mem::size_of::<DestBreakerKey>() == 24);
    assert!(core::mem::size_of::<DestPolicy>() == 24);
    assert!(core::mem::size_of::<MoreTotals>() == 24);
    assert!(core::mem::size_of::<DestBreaker>() == 112);
    assert!(core::mem::size_of::<DestCommand>() == 40);
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

    /// Found by the `pinned` fuzz target: the agent read a forced-open breaker past its TTL
    /// under a policy pinned with an interval near `u64::MAX` (a damaged agent's), and the
    /// new interval's end overflowed (a panic with overflow checks, a deadline already past
    /// without).
    #[test]
    fn deadlines_of_huge_durations_saturate() {
        let p = Policy {
            interval_ns: u64::MAX - 1,
            open_timeout_ns: u64::MAX,
            flags: policy_flags::ENABLED,
            ..Default::default()
        };
        let forced = Counts {
            state: state::OPEN,
            forced: 1,
            open_until_ns: 5,
            ..Default::default()
        };
        let c = forced.effective(&p, 10);
        assert_eq!((c.state, c.interval_end_ns), (state::CLOSED, u64::MAX));
        let mut c = Counts::default();
        c.trip(&p, u64::MAX, 10);
        assert_eq!(c.open_until_ns, u64::MAX);
        let mut c = Counts::default();
        c.reset(&p, cause::RESET, 10);
        assert_eq!(c.interval_end_ns, u64::MAX);
        c.interval_end_ns = 5;
        c.roll(&p, 10);
        assert_eq!(c.interval_end_ns, u64::MAX);
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

    fn per_destination(consecutive: u32) -> (Policy, DestPolicy) {
        (
            Policy {
                consecutive_failures: consecutive,
                open_timeout_ns: S,
                half_open_max: 1,
                flags: policy_flags::ENABLED | policy_flags::DESTINATION,
                ..Default::default()
            },
            DestPolicy {
                max_open_timeout_ns: 3 * S,
                destination_ttl_ns: 600 * S,
                max_ejection_percent: 50,
                live: 3,
            },
        )
    }

    /// A connect to `d` and its outcome; the transition and whether the cap refused a trip.
    fn attempt(
        d: &mut DestBreaker,
        e: &mut BreakerEntry,
        p: &Policy,
        dp: &DestPolicy,
        failed: bool,
        now: u64,
    ) -> Option<DestStep> {
        let (Admission::Admit { generation, .. }, _) = d.on_connect(e, p, dp, now) else {
            return None;
        };
        let o = Outcome {
            generation,
            failed,
            reset: false,
        };
        Some(d.on_outcome(e, p, dp, o, now))
    }

    #[test]
    fn the_cap_is_a_share_of_live_destinations_and_at_least_one() {
        assert_eq!(ejection_cap(50, 3), 1);
        assert_eq!(ejection_cap(50, 4), 2);
        assert_eq!(ejection_cap(10, 3), 1);
        assert_eq!(ejection_cap(10, 0), 1);
        assert_eq!(ejection_cap(100, 0), u32::MAX);
    }

    #[test]
    fn a_second_ejection_past_the_cap_is_refused_and_counting_goes_on() {
        let (p, dp) = per_destination(2);
        let mut e = BreakerEntry::default();
        e.counts.changed_ns = 7;
        let (mut a, mut b) = (DestBreaker::default(), DestBreaker::default());
        attempt(&mut a, &mut e, &p, &dp, true, 10);
        let step = attempt(&mut a, &mut e, &p, &dp, true, 10).unwrap();
        assert_eq!(step.transition.map(|t| t.to), Some(state::OPEN));
        assert_eq!((e.ejected, a.trips), (1, 1));
        attempt(&mut b, &mut e, &p, &dp, true, 10);
        let step = attempt(&mut b, &mut e, &p, &dp, true, 10).unwrap();
        assert_eq!(
            step,
            DestStep {
                transition: None,
                capped: true
            }
        );
        assert_eq!((b.counts.state, e.ejected), (state::CLOSED, 1));
        // Room again: the next failure trips it (the rule is still met).
        assert!(a.reset(&mut e, &p, &dp, 11).is_some());
        assert_eq!(e.ejected, 0);
        let step = attempt(&mut b, &mut e, &p, &dp, true, 12).unwrap();
        assert_eq!(step.transition.map(|t| t.to), Some(state::OPEN));
        assert_eq!(e.ejected, 1);
    }

    #[test]
    fn open_timeout_grows_per_trip_up_to_the_cap_and_resets_after_a_close() {
        let (p, dp) = per_destination(1);
        let mut e = BreakerEntry::default();
        let mut d = DestBreaker::default();
        let mut now = 100;
        for (trip, open) in [(1, S), (2, 2 * S), (3, 3 * S), (4, 3 * S)] {
            attempt(&mut d, &mut e, &p, &dp, true, now);
            assert_eq!((d.counts.state, d.trips), (state::OPEN, trip));
            assert_eq!(d.counts.open_until_ns - now, open, "trip {trip}");
            now = d.counts.open_until_ns;
        }
        // The probe succeeds: closed, and the next trip is for the base again.
        attempt(&mut d, &mut e, &p, &dp, false, now);
        assert_eq!((d.counts.state, d.trips, e.ejected), (state::CLOSED, 0, 0));
        attempt(&mut d, &mut e, &p, &dp, true, now + 1);
        assert_eq!(d.counts.open_until_ns - (now + 1), S);
    }

    #[test]
    fn a_new_epoch_starts_every_destination_over() {
        let (p, dp) = per_destination(1);
        let mut e = BreakerEntry::default();
        e.counts.changed_ns = 1;
        let mut d = DestBreaker::default();
        attempt(&mut d, &mut e, &p, &dp, true, 10);
        assert_eq!(d.counts.state, state::OPEN);
        // The agent sets a policy: a new epoch with none ejected.
        e = BreakerEntry::default();
        e.counts.changed_ns = 20;
        assert!(matches!(
            d.on_connect(&mut e, &p, &dp, 30).0,
            Admission::Admit { .. }
        ));
        assert_eq!((d.counts.state, d.epoch, d.trips), (state::CLOSED, 20, 0));
        assert!(!d.reapable(&e, 30) && d.reapable(&e, 31));
    }
}
