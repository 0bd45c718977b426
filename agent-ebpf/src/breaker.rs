//! The circuit breaker's programs, attached to the enforced cgroups: `cgroup/connect4|6` admits
//! or rejects each `connect()` to a service, `sock_ops` counts the outcome of each admitted one
//! and trips the breaker on the failing connection's own event. The state machine is
//! `breakwater_common::breaker`, run under each entry's spin lock; nothing here needs the agent.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns,
        generated::{bpf_set_retval, bpf_skc_to_tcp_sock, bpf_spin_lock, bpf_spin_unlock},
    },
    macros::{cgroup_sock_addr, classifier, sock_ops},
    programs::{SockAddrContext, SockOpsContext, TcContext},
};
use breakwater_common::{
    breaker::{
        cause, dest_flags, dest_op, policy_flags, sock_flags, state, Admission, BreakerEntry,
        DestBreaker, DestBreakerKey, DestCommand, DestPolicy, Event, MoreTotals, Outcome, Policy,
        Transition,
    },
    conn_event, direction, tcp_state, v4_mapped,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use crate::{
    maps::{
        audit_entry, empty, offsets, protected, service_of, sk_storage, BW_BREAKERS, BW_BRK_EVENTS,
        BW_BRK_SOCKS, BW_BRK_TOTALS, BW_DEST_BREAKERS, BW_DEST_POLICIES, BW_DEST_SOCKS,
        BW_MORE_TOTALS, BW_POLICIES,
    },
    sock::{netns, read, Error, IPPROTO_TCP},
};

/// What a `cgroup/connect*` program returns to let the connect go on.
const ALLOW: i32 = 1;
const ECONNRESET: i32 = 104;

#[cgroup_sock_addr(connect4)]
pub fn bw_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // Context fields must be loaded at constant offsets: read them here, per program.
    // SAFETY: `sock_addr` is the kernel's `bpf_sock_addr` for this call, readable as a whole.
    let (protocol, ip, port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sa).protocol),
            core::ptr::read_volatile(&raw const (*sa).user_ip4),
            core::ptr::read_volatile(&raw const (*sa).user_port),
        )
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return ALLOW;
    }
    gate(&ctx, &v4_mapped(ip.to_ne_bytes()), port)
}

#[cgroup_sock_addr(connect6)]
pub fn bw_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `bw_connect4`.
    let (protocol, w0, w1, w2, w3, port) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sa).protocol),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]).to_ne_bytes(),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]).to_ne_bytes(),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]).to_ne_bytes(),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]).to_ne_bytes(),
            core::ptr::read_volatile(&raw const (*sa).user_port),
        )
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return ALLOW;
    }
    let addr = [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ];
    gate(&ctx, &addr, port)
}

/// Fail safe: any error lets the connect through.
#[inline(always)]
fn gate(ctx: &SockAddrContext, addr: &[u8; 16], port_be: u32) -> i32 {
    if empty() {
        return ALLOW;
    }
    // SAFETY: `ctx` is this program's own context.
    match unsafe { try_connect(ctx, addr, u16::from_be(port_be as u16)) } {
        Ok(verdict) => verdict,
        Err(e) => {
            e.count();
            ALLOW
        }
    }
}

/// The gate: admits or rejects a connect to `addr`:`port` by its service's breaker.
///
/// # Safety
/// `ctx` is the context the kernel passed to the running `cgroup/connect*` program.
#[inline(always)]
unsafe fn try_connect(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) -> Result<i32, Error> {
    let svc = service_of(addr, port);
    // Protected: never refused, nor marked for termination, whatever service it is in.
    if svc == 0 || protected(addr, port) {
        return Ok(ALLOW);
    }
    let now = bpf_ktime_get_ns();
    // Every connect to a service from the scope is marked, policy or not: these are the
    // connections a trip terminates.
    let bs = BW_BRK_SOCKS
        .get_or_insert_ptr_mut(ctx, None)
        .as_mut()
        .ok_or(Error::Map)?;
    bs.svc = svc;
    bs.flags = 0;
    bs.generation = 0;
    bs.connect_ns = now;
    let Some(policy) = BW_POLICIES.get(svc) else {
        return Ok(ALLOW);
    };
    if policy.flags & policy_flags::ENABLED == 0 {
        return Ok(ALLOW);
    }
    let entry = BW_BREAKERS.get_ptr_mut(svc).ok_or(Error::Map)?;
    let per_dest = policy.flags & policy_flags::DESTINATION != 0;
    let admission = if per_dest {
        let key = DestBreakerKey {
            svc,
            port,
            _pad: 0,
            addr: *addr,
        };
        let Some(admission) = dest_connect(entry, policy, &key, now) else {
            return Ok(ALLOW);
        };
        if let Admission::Admit { .. } = admission {
            let k = BW_DEST_SOCKS
                .get_or_insert_ptr_mut(ctx, None)
                .as_mut()
                .ok_or(Error::Map)?;
            *k = key;
        }
        admission
    } else {
        lock(entry);
        let (admission, transition) = (*entry).counts.on_connect(policy, now);
        unlock(entry);
        if let Some(t) = transition {
            emit(svc, &t, None, now);
        }
        admission
    };
    match admission {
        Admission::Admit { generation, probe } => {
            bs.generation = generation;
            bs.flags = sock_flags::COUNTED;
            if per_dest {
                bs.flags |= sock_flags::DEST;
            }
            if probe {
                total(svc, |t| &raw mut t.probes);
            }
            Ok(ALLOW)
        }
        Admission::Reject if policy.flags & policy_flags::AUDIT != 0 => {
            // Would have been refused: let through, uncounted (it was not admitted).
            bs.flags = sock_flags::DONE;
            more_total(svc, |t| &raw mut t.audited);
            Ok(ALLOW)
        }
        Admission::Reject => {
            bs.flags = sock_flags::DONE;
            total(svc, |t| &raw mut t.rejected);
            audit_rejected(ctx, addr, port, svc, policy.errno, now);
            // Without a retval the caller would see EPERM.
            bpf_set_retval(-(policy.errno as i32));
            Ok(0)
        }
    }
}

/// A rejected connect, for the audit stream: process context, so the caller is the current task.
#[inline(always)]
fn audit_rejected(
    ctx: &SockAddrContext,
    addr: &[u8; 16],
    port: u16,
    svc: u32,
    errno: u32,
    now: u64,
) {
    let Some(mut entry) = audit_entry() else {
        return;
    };
    // A context field: loaded at its constant offset, as the verifier requires.
    // SAFETY: `sock_addr` is the kernel's `bpf_sock_addr` for this call; its `sk` is the
    // connecting socket (checked for null by `netns_of`).
    let netns = unsafe {
        netns_of(
            core::ptr::read_volatile(&raw const (*ctx.sock_addr).__bindgen_anon_1.sk) as *const u8,
        )
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry; every field is written before it is submitted.
    unsafe {
        (*e).time_ns = now;
        (*e).cgroup_id = bpf_get_current_cgroup_id();
        (*e).bytes_sent = 0;
        (*e).bytes_received = 0;
        (*e).duration_us = 0;
        (*e).saddr = [0; 16];
        (*e).daddr = *addr;
        (*e).comm = bpf_get_current_comm().unwrap_or_default();
        (*e).netns = netns;
        (*e).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*e).svc = svc;
        (*e).errno = errno;
        (*e).sport = 0;
        (*e).dport = port;
        (*e).kind = conn_event::REJECTED;
        (*e).reason = 0;
        (*e).direction = direction::OUTBOUND;
        (*e)._pad = 0;
    }
    entry.submit(0);
}

/// The network namespace (inode) of the connecting socket; 0 if it cannot be read.
///
/// # Safety
/// `sk` is null or the `sk` of this program's `bpf_sock_addr` context.
#[inline(always)]
unsafe fn netns_of(sk: *const u8) -> u32 {
    if sk.is_null() {
        return 0;
    }
    // A BTF-typed pointer, which the verifier lets us read kernel fields through.
    let tp = bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
    if tp.is_null() {
        return 0;
    }
    netns(tp, offsets()).unwrap_or(0)
}

/// Takes an entry's spin lock.
///
/// # Safety
/// `entry` points to a `BW_BREAKERS` value looked up in this program run, no other lock is held,
/// and [`unlock`] follows on the same entry with no call in between: no helper, no subprogram,
/// no `memset` (the verifier refuses the program otherwise; keep the code between inlined).
#[inline(always)]
unsafe fn lock(entry: *mut BreakerEntry) {
    bpf_spin_lock((&raw mut (*entry).lock).cast());
}

/// Releases the spin lock [`lock`] took.
///
/// # Safety
/// `entry` is the entry this program locked with [`lock`].
#[inline(always)]
unsafe fn unlock(entry: *mut BreakerEntry) {
    bpf_spin_unlock((&raw mut (*entry).lock).cast());
}

/// Adds one to a service's total, atomically (outside the lock).
#[inline(always)]
fn total(svc: u32, field: impl FnOnce(&mut breakwater_common::breaker::Totals) -> *mut u64) {
    if let Some(t) = BW_BRK_TOTALS.get_ptr_mut(svc) {
        // SAFETY: a map value; the BPF atomic add keeps concurrent CPUs exact.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field(&mut *t), 1) };
    }
}

/// Reports a transition of the service's breaker or of one of its destinations' to the agent
/// (if it is there to read it) and counts trips.
#[inline(always)]
fn emit(svc: u32, t: &Transition, dest: Option<&DestBreakerKey>, now: u64) {
    if t.to == state::OPEN {
        total(svc, |t| &raw mut t.trips);
    }
    let mut ev = Event::new(now, svc, t);
    if let Some(k) = dest {
        ev.addr = k.addr;
        ev.port = k.port;
    }
    if BW_BRK_EVENTS.output::<Event>(&ev, 0).is_err() {
        total(svc, |t| &raw mut t.events_lost);
    }
}

/// Adds one to a service's destination total, atomically.
#[inline(always)]
fn more_total(svc: u32, field: impl FnOnce(&mut MoreTotals) -> *mut u64) {
    if let Some(t) = BW_MORE_TOTALS.get_ptr_mut(svc) {
        // SAFETY: a map value; the BPF atomic add keeps concurrent CPUs exact.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field(&mut *t), 1) };
    }
}

/// A destination's breaker, made Closed if it has none yet; None when the map is full (counted:
/// the destination is let through uncounted) or the breaker is being reaped.
#[inline(always)]
fn dest_breaker(key: &DestBreakerKey) -> Option<*mut DestBreaker> {
    if let Some(d) = BW_DEST_BREAKERS.get_ptr_mut(key) {
        return live(d);
    }
    // Epoch 0 is stale for any service with a policy: its first use starts it over.
    if BW_DEST_BREAKERS
        .insert(
            key,
            &DestBreaker::default(),
            u64::from(aya_ebpf::bindings::BPF_NOEXIST),
        )
        .is_err()
    {
        // Made meanwhile on another CPU, or the map is full.
        if let Some(d) = BW_DEST_BREAKERS.get_ptr_mut(key) {
            return live(d);
        }
        more_total(key.svc, |t| &raw mut t.untracked);
        return None;
    }
    BW_DEST_BREAKERS.get_ptr_mut(key).and_then(live)
}

#[inline(always)]
fn live(d: *mut DestBreaker) -> Option<*mut DestBreaker> {
    // SAFETY: a map value; a racing reap at worst makes this one connect uncounted.
    let dead = unsafe { core::ptr::read_volatile(&raw const (*d).flags) } & dest_flags::DEAD;
    (dead == 0).then_some(d)
}

/// The gate with destination granularity: the service's breaker (only operators trip it) and
/// then the destination's, both under the service's lock. None: let it through uncounted.
///
/// # Safety
/// `entry` is the service's `BW_BREAKERS` value, looked up in this program run.
#[inline(always)]
unsafe fn dest_connect(
    entry: *mut BreakerEntry,
    policy: &Policy,
    key: &DestBreakerKey,
    now: u64,
) -> Option<Admission> {
    let dp = dest_policy(key.svc);
    let dest = dest_breaker(key)?;
    lock(entry);
    let (mut admission, svc_t) = (*entry).counts.on_connect(policy, now);
    if svc_t.is_some() {
        // A new epoch: every destination starts over, none ejected.
        core::ptr::write_volatile(&raw mut (*entry).ejected, 0);
    }
    let mut dest_t = None;
    if let Admission::Admit { .. } = admission {
        let (a, t) = (*dest).on_connect(&mut *entry, policy, &dp, now);
        admission = a;
        dest_t = t;
    }
    unlock(entry);
    if let Some(t) = svc_t {
        emit(key.svc, &t, None, now);
    }
    if let Some(t) = dest_t {
        emit(key.svc, &t, Some(key), now);
    }
    Some(admission)
}

#[inline(always)]
fn dest_policy(svc: u32) -> DestPolicy {
    BW_DEST_POLICIES.get(svc).copied().unwrap_or_default()
}

#[sock_ops]
pub fn bw_sockops(ctx: SockOpsContext) -> u32 {
    if empty() {
        return 1;
    }
    // SAFETY: `ctx` is this program's own context.
    if let Err(e) = unsafe { try_sockops(&ctx) } {
        e.count();
    }
    1
}

/// Counts the outcome of a connect the gate admitted: established, failed, or reset by the peer.
///
/// # Safety
/// `ctx` is the context the kernel passed to the running `sock_ops` program.
unsafe fn try_sockops(ctx: &SockOpsContext) -> Result<(), Error> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    let sk = (*ctx.ops).__bindgen_anon_2.sk;
    if sk.is_null() {
        return Ok(());
    }
    let Some(bs) = sk_storage(&BW_BRK_SOCKS, sk as *const u8, false) else {
        return Ok(());
    };
    if bs.flags & sock_flags::COUNTED == 0 {
        return Ok(());
    }
    match op {
        // Ask for state changes: how an admitted connect ends is seen there.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            Ok(())
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if bs.flags & sock_flags::DONE != 0 {
                return Ok(());
            }
            bs.flags |= sock_flags::DONE;
            let now = bpf_ktime_get_ns();
            let slow = match BW_POLICIES.get(bs.svc) {
                Some(p) => p.slow_connect_ns != 0 && now - bs.connect_ns > p.slow_connect_ns,
                None => false,
            };
            if !slow {
                bs.flags |= sock_flags::SUCCEEDED;
            }
            outcome(sk.cast(), bs, slow, false, now)
        }
        _ => {
            let (old, new) = (ctx.arg(0) as u8, ctx.arg(1) as u8);
            if new != tcp_state::CLOSE {
                return Ok(());
            }
            let now = bpf_ktime_get_ns();
            if old == tcp_state::SYN_SENT && bs.flags & sock_flags::DONE == 0 {
                bs.flags |= sock_flags::DONE;
                return outcome(sk.cast(), bs, true, false, now);
            }
            if old == tcp_state::ESTABLISHED && bs.flags & sock_flags::SUCCEEDED != 0 {
                // Only the peer's RST: our own close, or a destroy on trip, is no failure.
                let tp = bpf_skc_to_tcp_sock(sk.cast()) as *const u8;
                if tp.is_null() || read::<i32>(tp, &offsets().sk_err) != ECONNRESET {
                    return Ok(());
                }
                bs.flags &= !sock_flags::SUCCEEDED;
                return outcome(sk.cast(), bs, true, true, now);
            }
            Ok(())
        }
    }
}

/// Counts an admitted connect's outcome, possibly changing the breaker's state (the
/// destination's, with destination granularity).
///
/// # Safety
/// `sk` is the `sock_ops` socket `bs` belongs to. `unsafe` for the lock it takes, with
/// [`lock`]'s requirements met here (the entry is looked up just before, no call while held).
#[inline(always)]
unsafe fn outcome(
    sk: *const u8,
    bs: &breakwater_common::breaker::BreakerSock,
    failed: bool,
    reset: bool,
    now: u64,
) -> Result<(), Error> {
    let svc = bs.svc;
    let Some(policy) = BW_POLICIES.get(svc) else {
        return Ok(());
    };
    if policy.flags & policy_flags::ENABLED == 0 {
        return Ok(());
    }
    let entry = BW_BREAKERS.get_ptr_mut(svc).ok_or(Error::Map)?;
    if bs.flags & sock_flags::DEST != 0 {
        if policy.flags & policy_flags::DESTINATION == 0 {
            return Ok(());
        }
        let Some(key) = sk_storage(&BW_DEST_SOCKS, sk, false) else {
            return Ok(());
        };
        let key = *key;
        let Some(dest) = BW_DEST_BREAKERS.get_ptr_mut(&key).and_then(live) else {
            return Ok(());
        };
        let dp = dest_policy(svc);
        lock(entry);
        let o = Outcome {
            generation: bs.generation,
            failed,
            reset,
        };
        let step = (*dest).on_outcome(&mut *entry, policy, &dp, o, now);
        unlock(entry);
        if let Some(t) = step.transition {
            emit(svc, &t, Some(&key), now);
        }
        if step.capped {
            more_total(svc, |t| &raw mut t.capped);
            let t = Transition {
                from: state::CLOSED,
                to: state::CLOSED,
                cause: cause::EJECTION_CAPPED,
                requests: 0,
                failures: 0,
                consecutive_failures: 0,
            };
            emit(svc, &t, Some(&key), now);
        }
        return Ok(());
    }
    lock(entry);
    let transition = (*entry)
        .counts
        .on_outcome(policy, bs.generation, failed, reset, now);
    unlock(entry);
    if let Some(t) = transition {
        emit(svc, &t, None, now);
    }
    Ok(())
}

/// Never attached: the agent test-runs it with a `DestCommand` as the packet, so that an
/// operator's trip or reset of a destination, and the reaping of idle ones, happen under the
/// service's lock like every other change (the count of ejected destinations stays exact).
#[classifier]
pub fn bw_dest_cmd(ctx: TcContext) -> i32 {
    // SAFETY: `ctx` is this program's own context.
    unsafe { try_dest_cmd(&ctx) }.unwrap_or(dest_op::FAILED)
}

/// # Safety
/// `ctx` is the context of the running `bw_dest_cmd`.
unsafe fn try_dest_cmd(ctx: &TcContext) -> Result<i32, Error> {
    let cmd: DestCommand = ctx.load(0).map_err(|_| Error::Map)?;
    let key = cmd.key;
    let policy = BW_POLICIES.get(key.svc).ok_or(Error::Map)?;
    let dp = dest_policy(key.svc);
    let entry = BW_BREAKERS.get_ptr_mut(key.svc).ok_or(Error::Map)?;
    let now = bpf_ktime_get_ns();
    match cmd.op {
        dest_op::TRIP => {
            let Some(dest) = dest_breaker(&key) else {
                return Ok(dest_op::FAILED);
            };
            lock(entry);
            (*dest).trip(&mut *entry, policy, &dp, cmd.arg_ns, now);
            unlock(entry);
            total(key.svc, |t| &raw mut t.trips);
            Ok(dest_op::DONE)
        }
        dest_op::RESET => {
            let Some(dest) = BW_DEST_BREAKERS.get_ptr_mut(&key).and_then(live) else {
                return Ok(dest_op::UNCHANGED);
            };
            lock(entry);
            let t = (*dest).reset(&mut *entry, policy, &dp, now);
            unlock(entry);
            Ok(if t.is_some() {
                dest_op::DONE
            } else {
                dest_op::UNCHANGED
            })
        }
        dest_op::REAP => {
            let Some(dest) = BW_DEST_BREAKERS.get_ptr_mut(&key).and_then(live) else {
                return Ok(dest_op::UNCHANGED);
            };
            lock(entry);
            let reap = (*dest).reapable(&*entry, cmd.arg_ns);
            if reap {
                (*dest).flags |= dest_flags::DEAD;
            }
            unlock(entry);
            if !reap {
                return Ok(dest_op::UNCHANGED);
            }
            let _ = BW_DEST_BREAKERS.remove(&key);
            Ok(dest_op::DONE)
        }
        _ => Ok(dest_op::FAILED),
    }
}
