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
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use breakwater_common::{
    breaker::{policy_flags, sock_flags, state, Admission, BreakerEntry, Event, Transition},
    conn_event, direction, tcp_state, v4_mapped,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use crate::{
    maps::{
        audit_entry, empty, offsets, service_of, sk_storage, BW_BREAKERS, BW_BRK_EVENTS,
        BW_BRK_SOCKS, BW_BRK_TOTALS, BW_POLICIES,
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
    if svc == 0 {
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
    lock(entry);
    let (admission, transition) = (*entry).counts.on_connect(policy, now);
    unlock(entry);
    if let Some(t) = transition {
        emit(svc, &t, now);
    }
    match admission {
        Admission::Admit { generation, probe } => {
            bs.generation = generation;
            bs.flags = sock_flags::COUNTED;
            if probe {
                total(svc, |t| &raw mut t.probes);
            }
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

/// Reports a transition to the agent (if it is there to read it) and counts trips.
#[inline(always)]
fn emit(svc: u32, t: &Transition, now: u64) {
    if t.to == state::OPEN {
        total(svc, |t| &raw mut t.trips);
    }
    let ev = Event::new(now, svc, t);
    if BW_BRK_EVENTS.output::<Event>(&ev, 0).is_err() {
        total(svc, |t| &raw mut t.events_lost);
    }
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
            outcome(bs.svc, bs.generation, slow, false, now)
        }
        _ => {
            let (old, new) = (ctx.arg(0) as u8, ctx.arg(1) as u8);
            if new != tcp_state::CLOSE {
                return Ok(());
            }
            let now = bpf_ktime_get_ns();
            if old == tcp_state::SYN_SENT && bs.flags & sock_flags::DONE == 0 {
                bs.flags |= sock_flags::DONE;
                return outcome(bs.svc, bs.generation, true, false, now);
            }
            if old == tcp_state::ESTABLISHED && bs.flags & sock_flags::SUCCEEDED != 0 {
                // Only the peer's RST: our own close, or a destroy on trip, is no failure.
                let tp = bpf_skc_to_tcp_sock(sk.cast()) as *const u8;
                if tp.is_null() || read::<i32>(tp, &offsets().sk_err) != ECONNRESET {
                    return Ok(());
                }
                bs.flags &= !sock_flags::SUCCEEDED;
                return outcome(bs.svc, bs.generation, true, true, now);
            }
            Ok(())
        }
    }
}

/// Counts an admitted connect's outcome, possibly changing the breaker's state.
///
/// # Safety
/// Nothing for the caller to uphold: `unsafe` for the lock it takes, with [`lock`]'s
/// requirements met here (the entry is looked up just before, no call while it is held).
#[inline(always)]
unsafe fn outcome(
    svc: u32,
    generation: u64,
    failed: bool,
    reset: bool,
    now: u64,
) -> Result<(), Error> {
    let Some(policy) = BW_POLICIES.get(svc) else {
        return Ok(());
    };
    if policy.flags & policy_flags::ENABLED == 0 {
        return Ok(());
    }
    let entry = BW_BREAKERS.get_ptr_mut(svc).ok_or(Error::Map)?;
    lock(entry);
    let transition = (*entry)
        .counts
        .on_outcome(policy, generation, failed, reset, now);
    unlock(entry);
    if let Some(t) = transition {
        emit(svc, &t, now);
    }
    Ok(())
}
