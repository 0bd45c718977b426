//! Tracing programs: TCP state changes, sends, data arrivals and retransmits, for every socket
//! in every network namespace. `tp_btf` where the kernel has the tracepoint; `fentry` on the
//! function that fires it, or a tracepoint's older form, where it does not (the loader chooses).

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock,
    },
    macros::{btf_tracepoint, fentry},
    programs::{BtfTracePointContext, FEntryContext},
};
use breakwater_common::{
    conn_event, conn_flags, counter, direction, fail_reason, hist_bucket, hist_kind, scratch_slot,
    tcp_state::*, timing_flags, ConnState, DestKey, ListenerInfo, Offsets, RequestTiming,
    SockRecord, FR_RUNS, FR_RUN_MAX,
};

use crate::{
    maps::{
        attribute_to_listener, auditing, bump, conn_key, empty, listen_key, offsets, service_of,
        timing, BW_CONNS, BW_LISTENERS,
    },
    sock::{
        audit, conn_of, observe, observe_n, read, read_sock, record, scratch, track, Error, Event,
        IPPROTO_TCP,
    },
};

const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bw_sock_state(ctx: BtfTracePointContext) -> i32 {
    // Fail safe: an error leaves the socket alone and is only counted.
    if empty() {
        return 0;
    }
    // SAFETY: `ctx` is this program's own context.
    if let Err(e) = unsafe { try_sock_state(&ctx) } {
        e.count();
    }
    0
}

/// Dispatches a state change to what it means for the counters.
///
/// # Safety
/// `ctx` is the context the kernel passed to the running `tp_btf/inet_sock_set_state` program.
unsafe fn try_sock_state(ctx: &BtfTracePointContext) -> Result<(), Error> {
    let o = offsets();
    if core::ptr::read_volatile(&o.ready) == 0 {
        bump(counter::NO_OFFSETS);
        return Ok(());
    }
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if read::<u16>(sk, &o.sk_protocol) != IPPROTO_TCP {
        return Ok(());
    }
    // Only the transitions that move a counter do any work: this runs ~10 times per connection.
    match (old as u8, new as u8) {
        (CLOSE, SYN_SENT) => on_connect(sk),
        (SYN_SENT, ESTABLISHED) => on_established(sk, o),
        (SYN_RECV, ESTABLISHED) => on_accepted(sk, o),
        (ESTABLISHED, _) => on_leave_established(sk, o, new as u8),
        (SYN_SENT, CLOSE) => on_connect_failed(sk, o),
        (FIN_WAIT2 | CLOSING, CLOSE) => on_time_wait(sk, o),
        // The other ways out of a connection that left ESTABLISHED: it is gone for good.
        (FIN_WAIT1 | CLOSE_WAIT | LAST_ACK, CLOSE) => {
            let _ = BW_CONNS.remove(&conn_key(sk));
            Ok(())
        }
        (CLOSE, LISTEN) => on_listen(sk, o),
        (LISTEN, CLOSE) => {
            let c = scratch(scratch_slot::TRACEPOINT)?;
            if read_sock(sk, o, c)? {
                let _ = BW_LISTENERS.remove(&listen_key(c.netns, c.sport));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `connect()` sent a SYN: we are in the connecting process, so attribute the connection to it.
///
/// # Safety
/// Nothing for the caller to uphold (`sk` is only a key): `unsafe` for the clock helper.
unsafe fn on_connect(sk: *const u8) -> Result<(), Error> {
    let process = current_process();
    let st = ConnState {
        start_ns: bpf_ktime_get_ns(),
        cgroup_id: process.cgroup_id,
        comm: process.comm,
        pid: process.pid,
        direction: direction::OUTBOUND,
        flags: conn_flags::CONNECT_TIMED,
        ..Default::default()
    };
    // A socket may connect again after a failed attempt: start over.
    track(sk, &st);
    Ok(())
}

/// The process the program runs in (`connect()`, `listen()`): what connections and listeners are
/// attributed to.
#[inline(always)]
fn current_process() -> ListenerInfo {
    ListenerInfo {
        // SAFETY: a helper without arguments, for the current task.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

/// An outbound connection was established: counted, and its connect latency observed.
///
/// # Safety
/// `sk` is `inet_sock_set_state`'s socket, a BTF socket pointer (see `crate::sock`); `o` is
/// `offsets()`.
unsafe fn on_established(sk: *const u8, o: &Offsets) -> Result<(), Error> {
    let id = conn_key(sk);
    let st = match BW_CONNS.get_ptr_mut(&id) {
        Some(p) => &mut *p,
        None => {
            // Connecting when the agent started: the owner is unknown.
            let st = ConnState {
                start_ns: bpf_ktime_get_ns(),
                direction: direction::OUTBOUND,
                ..Default::default()
            };
            if !track(sk, &st) {
                return Ok(());
            }
            &mut *BW_CONNS.get_ptr_mut(&id).ok_or(Error::Map)?
        }
    };
    let mut rec = SockRecord::default();
    if !read_sock(sk, o, &mut rec)? {
        return Ok(());
    }
    let key = rec.dest_key(direction::OUTBOUND);
    let svc = service_of(&key.addr, key.port);
    let timed = st.flags & conn_flags::CONNECT_TIMED != 0;
    st.svc = svc;
    st.port = rec.sport;
    st.flags = (st.flags & !conn_flags::CONNECT_TIMED) | conn_flags::COUNTED;
    // A socket that connects again keeps its storage: time its requests afresh.
    if let Some(t) = timing(sk, false) {
        *t = RequestTiming {
            svc,
            flags: timing_flags::CLIENT,
            ..Default::default()
        };
    }
    record(&key, svc, Event::Opened)?;
    let mut connect_us = 0;
    if timed {
        // TCP refreshed the socket's clock on the SYN-ACK that established it.
        connect_us = mstamp(sk)?.saturating_sub(st.start_ns / 1000);
        observe(&key, svc, hist_kind::CONNECT, connect_us)?;
    }
    if auditing() {
        if let Some(c) = conn_of(sk, o, st, scratch_slot::TRACEPOINT)? {
            audit(c, conn_event::OPENED, 0, 0, 0, connect_us);
        }
    }
    Ok(())
}

/// An inbound connection was accepted: softirq context, so the current task is not the owner;
/// it belongs to its listener's process, looked up only when someone needs it.
///
/// # Safety
/// `sk` is `inet_sock_set_state`'s socket, a BTF socket pointer (see `crate::sock`); `o` is
/// `offsets()`.
unsafe fn on_accepted(sk: *const u8, o: &Offsets) -> Result<(), Error> {
    let mut rec = SockRecord::default();
    if !read_sock(sk, o, &mut rec)? {
        return Ok(());
    }
    let key = rec.dest_key(direction::INBOUND);
    let st = ConnState {
        // TCP refreshed the socket's clock on the ACK that established it.
        start_ns: mstamp(sk)? * 1000,
        svc: service_of(&key.addr, key.port),
        port: rec.sport,
        direction: direction::INBOUND,
        flags: conn_flags::COUNTED,
        ..Default::default()
    };
    if !track(sk, &st) {
        return Ok(());
    }
    record(&key, st.svc, Event::Opened)?;
    if auditing() {
        if let Some(c) = conn_of(sk, o, &st, scratch_slot::TRACEPOINT)? {
            attribute_to_listener(c);
            audit(c, conn_event::OPENED, 0, 0, 0, 0);
        }
    }
    Ok(())
}

/// A connection left ESTABLISHED: the end of a counted one (a reset also frees its entry).
///
/// # Safety
/// `sk` is `inet_sock_set_state`'s socket, a BTF socket pointer (see `crate::sock`); `o` is
/// `offsets()`.
unsafe fn on_leave_established(sk: *const u8, o: &Offsets, new: u8) -> Result<(), Error> {
    let id = conn_key(sk);
    let Some(p) = BW_CONNS.get_ptr_mut(&id) else {
        bump(counter::UNTRACKED_CLOSES);
        return Ok(());
    };
    let st = *p;
    (*p).flags &= !conn_flags::COUNTED;
    if new == CLOSE {
        // Reset: no TIME_WAIT or last ACK to wait for.
        let _ = BW_CONNS.remove(&id);
    }
    if st.flags & conn_flags::COUNTED == 0 {
        bump(counter::UNTRACKED_CLOSES);
        return Ok(());
    }
    on_closed(sk, o, &st, new)
}

/// A counted connection left ESTABLISHED: what it moved, how long it lived, and for outbound
/// ones the latency samples it still held and its SRTT.
///
/// # Safety
/// `sk` is `inet_sock_set_state`'s socket, a BTF socket pointer (see `crate::sock`); `o` is
/// `offsets()`.
unsafe fn on_closed(sk: *const u8, o: &Offsets, st: &ConnState, new: u8) -> Result<(), Error> {
    let mut rec = SockRecord::default();
    if !read_sock(sk, o, &mut rec)? {
        return Ok(());
    }
    if st.port != 0 {
        // A reset releases the local port before the state change is traced.
        rec.sport = st.port;
    }
    let key = rec.dest_key(st.direction);
    let outbound = st.direction == direction::OUTBOUND;
    // What the connection did, from the kernel's own accounting in `struct tcp_sock` (the
    // verifier wants a pointer typed as one for fields beyond `struct sock`).
    let tp = bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
    // A connection enters CLOSE_WAIT only on the peer's FIN, which TCP read the clock for as it
    // arrived (`tcp_rcv_established`): a clock read saved. Any other way out may come from a
    // syscall or a timer, after an idle spell: read the time.
    let now_us = if new == CLOSE_WAIT && !tp.is_null() {
        read::<u64>(tp, &o.tcp_mstamp)
    } else {
        bpf_ktime_get_ns() / 1000
    };
    let lifetime_us = now_us.saturating_sub(st.start_ns / 1000);
    let (mut sent, mut received) = (0, 0);
    if !tp.is_null() {
        // Both count sequence space: an active opener's SYN is in `bytes_acked`, and when the
        // peer closed first (-> CLOSE_WAIT) its FIN is in `bytes_received`.
        sent = read::<u64>(tp, &o.tcp_bytes_acked).saturating_sub(u64::from(outbound));
        received =
            read::<u64>(tp, &o.tcp_bytes_received).saturating_sub(u64::from(new == CLOSE_WAIT));
    }
    record(&key, st.svc, Event::Closed { sent, received })?;
    if auditing() {
        if let Some(c) = conn_of(sk, o, st, scratch_slot::TRACEPOINT)? {
            if !outbound {
                attribute_to_listener(c);
            }
            audit(c, conn_event::CLOSED, 0, sent, received, lifetime_us);
        }
    }
    if !outbound {
        // Service histograms are outbound only; the local endpoint's row keeps inbound ones.
        return observe(&key, 0, hist_kind::LIFETIME, lifetime_us);
    }
    if let Some(t) = timing(sk, false) {
        flush_first_responses(t, &key)?;
        // Closed: no more requests to time, unless it connects again.
        t.flags = 0;
    }
    observe(&key, st.svc, hist_kind::LIFETIME, lifetime_us)?;
    if tp.is_null() {
        return Ok(());
    }
    let srtt_us = u64::from(read::<u32>(tp, &o.tcp_srtt_us) >> 3);
    if srtt_us > 0 {
        observe(&key, st.svc, hist_kind::SRTT, srtt_us)?;
    }
    Ok(())
}

/// FIN_WAIT2/CLOSING -> CLOSE is `tcp_time_wait()` handing the connection to a timewait
/// socket, which by now has replaced it in the established hash. If the socket is still hashed,
/// no timewait socket was made (`tcp_max_tw_buckets` reached): nothing entered TIME_WAIT.
///
/// # Safety
/// `sk` is `inet_sock_set_state`'s socket, a BTF socket pointer (see `crate::sock`); `o` is
/// `offsets()`.
unsafe fn on_time_wait(sk: *const u8, o: &Offsets) -> Result<(), Error> {
    let id = conn_key(sk);
    let (dir, svc, port) = match BW_CONNS.get(&id).map(|s| (s.direction, s.svc, s.port)) {
        Some(kept) => {
            let _ = BW_CONNS.remove(&id);
            kept
        }
        None => (direction::OUTBOUND, u32::MAX, 0),
    };
    let pprev: *const u8 = read(sk, &o.skc_node_pprev);
    if !pprev.is_null() {
        return Ok(());
    }
    let mut rec = SockRecord::default();
    if !read_sock(sk, o, &mut rec)? {
        return Ok(());
    }
    // The kernel has released the local port by now (`inet_put_port`): use the one kept.
    rec.sport = port;
    let key = rec.dest_key(dir);
    let svc = if svc == u32::MAX {
        service_of(&key.addr, key.port)
    } else {
        svc
    };
    record(&key, svc, Event::TimeWait)
}

/// `listen()`: process context, so remember who listens for the inbound connections to come.
///
/// # Safety
/// `sk` is `inet_sock_set_state`'s socket, a BTF socket pointer (see `crate::sock`); `o` is
/// `offsets()`.
unsafe fn on_listen(sk: *const u8, o: &Offsets) -> Result<(), Error> {
    let mut rec = SockRecord::default();
    if !read_sock(sk, o, &mut rec)? {
        return Ok(());
    }
    bump(counter::LISTENS);
    BW_LISTENERS
        .insert(&listen_key(rec.netns, rec.sport), &current_process(), 0)
        .map_err(|_| Error::Map)
}

/// SYN_SENT -> CLOSE: the connect failed; `sk_err` says why (set before `tcp_done`).
///
/// # Safety
/// `sk` is `inet_sock_set_state`'s socket, a BTF socket pointer (see `crate::sock`); `o` is
/// `offsets()`.
unsafe fn on_connect_failed(sk: *const u8, o: &Offsets) -> Result<(), Error> {
    let c = scratch(scratch_slot::TRACEPOINT)?;
    // Softirq or timer context: the connecting process is the one `connect()` recorded.
    let id = conn_key(sk);
    if let Some(owner) = BW_CONNS.get(&id) {
        c.pid = owner.pid;
        c.comm = owner.comm;
        c.cgroup_id = owner.cgroup_id;
        let _ = BW_CONNS.remove(&id);
    }
    if !read_sock(sk, o, c)? {
        return Ok(());
    }
    c.direction = direction::OUTBOUND;
    let key = c.dest_key();
    c.svc = service_of(&key.addr, key.port);
    let (ev, reason) = match read::<i32>(sk, &o.sk_err) {
        ECONNREFUSED => (Event::FailedRefused, fail_reason::REFUSED),
        ETIMEDOUT => (Event::FailedTimeout, fail_reason::TIMEOUT),
        _ => (Event::FailedOther, fail_reason::OTHER),
    };
    record(&key, c.svc, ev)?;
    audit(c, conn_event::FAILED, reason, 0, 0, 0);
    Ok(())
}

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn bw_sock_send(ctx: BtfTracePointContext) -> i32 {
    sock_send(ctx.arg(0))
}

/// Kernels without the `tcp_sendmsg_locked` tracepoint (6.12 has none): the function it fires in,
/// with the same first argument and at the same point (before any of the data leaves).
#[fentry(function = "tcp_sendmsg_locked")]
pub fn bw_sock_send_fentry(ctx: FEntryContext) -> i32 {
    sock_send(ctx.arg(0))
}

/// On those kernels' older lines (6.1), `sendfile()` and `splice()` (and kTLS) send through
/// `do_tcp_sendpages` instead; later ones pass them through `tcp_sendmsg_locked` too.
#[fentry(function = "do_tcp_sendpages")]
pub fn bw_sock_sendpages_fentry(ctx: FEntryContext) -> i32 {
    sock_send(ctx.arg(0))
}

#[inline(always)]
fn sock_send(sk: *const u8) -> i32 {
    if empty() {
        return 0;
    }
    // SAFETY: every caller passes its hook's own socket argument.
    if let Err(e) = unsafe { try_sock_send(sk) } {
        e.count();
    }
    0
}

/// Data is about to be queued on a TCP socket (the tracepoint fires for each chunk of a send,
/// before any of it leaves, so no response can beat it): on a tracked client connection that
/// starts the clock, unless a request is already waiting for its response (a request sent in
/// several writes is timed from its first).
///
/// # Safety
/// `sk` is the socket argument of the running hook, a BTF pointer to a full TCP socket (see
/// `crate::sock`).
unsafe fn try_sock_send(sk: *const u8) -> Result<(), Error> {
    let t = match timing(sk, false) {
        Some(t) => t,
        None => first_send(sk)?,
    };
    if t.flags & timing_flags::CLIENT != 0 && t.flags & timing_flags::AWAITING == 0 {
        // TCP's own clock is refreshed only when the data goes out: read the time.
        t.send_us = bpf_ktime_get_ns() / 1000;
        t.flags |= timing_flags::AWAITING;
    }
    Ok(())
}

/// A socket's first send makes its storage, which says from then on whether it is a counted
/// client connection whose requests are timed. Connections that never send (probes, health
/// checks, connect-and-close churn) never pay for storage.
///
/// # Safety
/// As `try_sock_send`; and the socket has no `RequestTiming` yet, so no other reference to it.
#[inline(always)]
unsafe fn first_send(sk: *const u8) -> Result<&'static mut RequestTiming, Error> {
    let client = BW_CONNS.get(&conn_key(sk)).and_then(|s| {
        (s.direction == direction::OUTBOUND && s.flags & conn_flags::COUNTED != 0).then_some(s.svc)
    });
    let t = timing(sk, true).ok_or(Error::Map)?;
    if let Some(svc) = client {
        t.svc = svc;
        t.flags = timing_flags::CLIENT;
    }
    Ok(t)
}

/// Whether `sk` is a TCP socket (and the offsets are there to tell).
///
/// # Safety
/// `sk` is the socket argument of the running hook, a BTF socket pointer (see `crate::sock`);
/// any protocol.
#[inline(always)]
unsafe fn is_tcp(sk: *const u8) -> bool {
    let o = offsets();
    core::ptr::read_volatile(&o.ready) != 0 && read::<u16>(sk, &o.sk_protocol) == IPPROTO_TCP
}

/// The kernel's clock (`CLOCK_MONOTONIC`, µs) as TCP last read it for this socket: refreshed
/// when it received the data that just arrived, and on the transitions that use it.
///
/// # Safety
/// `sk` is the socket argument of the running hook, a BTF socket pointer (see `crate::sock`);
/// any protocol.
#[inline(always)]
unsafe fn mstamp(sk: *const u8) -> Result<u64, Error> {
    let tp = bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
    if tp.is_null() {
        return Err(Error::Read);
    }
    Ok(read::<u64>(tp, &offsets().tcp_mstamp))
}

#[btf_tracepoint(function = "sk_data_ready")]
pub fn bw_data_ready(ctx: BtfTracePointContext) -> i32 {
    data_ready(ctx.arg(0))
}

/// Kernels without the `sk_data_ready` tracepoint (6.1 has none): TCP's own call of a socket's
/// `sk_data_ready`, right after the data was queued (and `tcp_mstamp` refreshed).
#[fentry(function = "tcp_data_ready")]
pub fn bw_data_ready_fentry(ctx: FEntryContext) -> i32 {
    data_ready(ctx.arg(0))
}

#[inline(always)]
fn data_ready(sk: *const u8) -> i32 {
    if empty() {
        return 0;
    }
    // SAFETY: every caller passes its hook's own socket argument.
    if let Err(e) = unsafe { try_data_ready(sk) } {
        e.count();
    }
    0
}

/// The first data after a send stops the clock: request -> first response. Samples are counted
/// in the connection, in up to `FR_RUNS` buckets, so that a steady request/response stream
/// touches no map: a sample that falls in none of those buckets hands the smallest run to the
/// maps, and the connection's close hands them all.
///
/// # Safety
/// `sk` is the socket argument of the running hook, a BTF socket pointer (see `crate::sock`).
unsafe fn try_data_ready(sk: *const u8) -> Result<(), Error> {
    if !is_tcp(sk) {
        return Ok(());
    }
    let Some(t) = timing(sk, false) else {
        return Ok(());
    };
    let awaiting = timing_flags::CLIENT | timing_flags::AWAITING;
    if t.flags & awaiting != awaiting {
        return Ok(());
    }
    t.flags &= !timing_flags::AWAITING;
    let bucket = hist_bucket(mstamp(sk)?.saturating_sub(t.send_us)) as u8;
    let mut slot = FR_RUNS;
    let mut least = 0;
    for i in 0..FR_RUNS {
        let n = t.fr_count[i];
        if n == 0 {
            slot = slot.min(i);
        } else if t.fr_bucket[i] == bucket && n < FR_RUN_MAX {
            t.fr_count[i] = n + 1;
            return Ok(());
        } else if n < t.fr_count[least] {
            least = i;
        }
    }
    if slot == FR_RUNS {
        let mut rec = SockRecord::default();
        if !read_sock(sk, offsets(), &mut rec)? {
            return Ok(());
        }
        slot = least;
        let n = u64::from(t.fr_count[slot]);
        let key = rec.dest_key(direction::OUTBOUND);
        let run = u32::from(t.fr_bucket[slot]);
        observe_n(&key, t.svc, hist_kind::FIRST_RESPONSE, run, n)?;
    }
    if slot < FR_RUNS {
        t.fr_bucket[slot] = bucket;
        t.fr_count[slot] = 1;
    }
    Ok(())
}

/// Adds the connection's pending first-response samples to the histograms.
#[inline(always)]
fn flush_first_responses(t: &mut RequestTiming, key: &DestKey) -> Result<(), Error> {
    for i in 0..FR_RUNS {
        let n = u64::from(t.fr_count[i]);
        if n != 0 {
            t.fr_count[i] = 0;
            observe_n(
                key,
                t.svc,
                hist_kind::FIRST_RESPONSE,
                u32::from(t.fr_bucket[i]),
                n,
            )?;
        }
    }
    Ok(())
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn bw_retransmit(ctx: BtfTracePointContext) -> i32 {
    // This form fires for failed attempts too, with their error.
    let err: i32 = ctx.arg(2);
    if err != 0 {
        return 0;
    }
    retransmit(ctx.arg(0))
}

/// The tracepoint's older form (6.1's): two arguments, fired only for segments that went
/// out, so there is no error to read (the verifier refuses a third argument).
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn bw_retransmit_sent(ctx: BtfTracePointContext) -> i32 {
    retransmit(ctx.arg(0))
}

#[inline(always)]
fn retransmit(sk: *const u8) -> i32 {
    if empty() {
        return 0;
    }
    // SAFETY: every caller passes its hook's own socket argument.
    if let Err(e) = unsafe { try_retransmit(sk) } {
        e.count();
    }
    0
}

/// A segment (a SYN too) went out again: counted for the connection's destination.
///
/// # Safety
/// `sk` is the socket argument of the running hook, a BTF pointer to a full TCP socket (see
/// `crate::sock`).
unsafe fn try_retransmit(sk: *const u8) -> Result<(), Error> {
    let Some(st) = BW_CONNS.get(&conn_key(sk)).copied() else {
        return Ok(());
    };
    let Some(c) = conn_of(sk, offsets(), &st, scratch_slot::RETRANSMIT)? else {
        return Ok(());
    };
    let key = c.dest_key();
    let svc = if st.flags & conn_flags::COUNTED != 0 {
        st.svc
    } else {
        // Still connecting: the service is decided when it is established.
        service_of(&key.addr, key.port)
    };
    record(&key, svc, Event::Retransmit)
}
