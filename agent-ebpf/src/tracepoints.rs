//! `tp_btf` programs: TCP state changes for every socket in every network namespace.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, generated::bpf_get_socket_cookie,
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use breakwater_common::{
    conn_flags, counter, direction, scratch_slot, tcp_state::*, ListenerInfo, Offsets,
};

use crate::{
    maps::{bump, listen_key, offsets, service_of, BW_CONNS, BW_LISTENERS},
    sock::{key_of, read, read_sock, record, scratch, Error, Event, IPPROTO_TCP},
};

const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bw_sock_state(ctx: BtfTracePointContext) -> i32 {
    // Fail safe: an error leaves the socket alone and is only counted.
    if let Err(e) = unsafe { try_sock_state(&ctx) } {
        e.count();
    }
    0
}

unsafe fn try_sock_state(ctx: &BtfTracePointContext) -> Result<(), Error> {
    let o = offsets();
    if unsafe { core::ptr::read_volatile(&o.ready) } == 0 {
        bump(counter::NO_OFFSETS);
        return Ok(());
    }
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if read::<u16>(sk, &o.sk_protocol) != IPPROTO_TCP {
        return Ok(());
    }
    let (old, new) = (old as u8, new as u8);
    let cookie = bpf_get_socket_cookie(sk as *mut _);
    match (old, new) {
        (CLOSE, SYN_SENT) => on_connect(sk, o, cookie),
        (SYN_SENT, ESTABLISHED) => on_established(sk, o, cookie, direction::OUTBOUND),
        (SYN_RECV, ESTABLISHED) => on_established(sk, o, cookie, direction::INBOUND),
        (ESTABLISHED, _) => on_leave_established(cookie, new),
        (SYN_SENT, CLOSE) => on_connect_failed(sk, o, cookie),
        (CLOSE, LISTEN) => on_listen(sk, o),
        (LISTEN, CLOSE) => {
            let c = scratch(scratch_slot::TRACEPOINT)?;
            if read_sock(sk, o, c)? {
                let _ = BW_LISTENERS.remove(&listen_key(c.netns, c.sport));
            }
            Ok(())
        }
        (_, CLOSE) => {
            forget(cookie);
            Ok(())
        }
        _ => {
            if let Some(c) = BW_CONNS.get_ptr_mut(&cookie) {
                (*c).state = new;
            }
            Ok(())
        }
    }
}

/// `connect()` sent a SYN: we are in the connecting process, so attribute the socket to it.
/// The source port is not bound yet; it is read again when the connection is established.
unsafe fn on_connect(sk: *const u8, o: &Offsets, cookie: u64) -> Result<(), Error> {
    let c = scratch(scratch_slot::TRACEPOINT)?;
    if !read_sock(sk, o, c)? {
        return Ok(());
    }
    c.start_ns = bpf_ktime_get_ns();
    c.cgroup_id = bpf_get_current_cgroup_id();
    c.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    c.comm = bpf_get_current_comm().unwrap_or_default();
    c.state = SYN_SENT;
    c.direction = direction::OUTBOUND;
    BW_CONNS.insert(&cookie, &*c, 0).map_err(|_| Error::Map)?;
    bump(counter::CONN_INSERTS);
    Ok(())
}

unsafe fn on_established(sk: *const u8, o: &Offsets, cookie: u64, dir: u8) -> Result<(), Error> {
    let c = scratch(scratch_slot::TRACEPOINT)?;
    if !read_sock(sk, o, c)? {
        return Ok(());
    }
    c.direction = dir;
    let key = key_of(c);
    let svc = service_of(&key.addr, key.port);
    record(&key, svc, Event::Opened)?;
    if let Some(e) = BW_CONNS.get_ptr_mut(&cookie) {
        let e = &mut *e;
        e.saddr = c.saddr;
        e.daddr = c.daddr;
        e.sport = c.sport;
        e.dport = c.dport;
        e.svc = svc;
        e.state = ESTABLISHED;
        e.direction = dir;
        e.flags |= conn_flags::COUNTED;
        return Ok(());
    }
    // Inbound, or an outbound entry lost to the LRU. This runs in softirq context, so the
    // current task is not the socket's owner: an inbound connection belongs to the process
    // that listens for it.
    if dir == direction::INBOUND {
        if let Some(l) = BW_LISTENERS.get(&listen_key(c.netns, c.sport)) {
            c.pid = l.pid;
            c.comm = l.comm;
            c.cgroup_id = l.cgroup_id;
        }
    }
    c.start_ns = bpf_ktime_get_ns();
    c.svc = svc;
    c.state = ESTABLISHED;
    c.flags = conn_flags::COUNTED;
    BW_CONNS.insert(&cookie, &*c, 0).map_err(|_| Error::Map)?;
    bump(counter::CONN_INSERTS);
    Ok(())
}

/// `listen()`: process context, so remember who listens for the inbound connections to come.
unsafe fn on_listen(sk: *const u8, o: &Offsets) -> Result<(), Error> {
    let c = scratch(scratch_slot::TRACEPOINT)?;
    if !read_sock(sk, o, c)? {
        return Ok(());
    }
    let info = ListenerInfo {
        cgroup_id: bpf_get_current_cgroup_id(),
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    BW_LISTENERS
        .insert(&listen_key(c.netns, c.sport), &info, 0)
        .map_err(|_| Error::Map)
}

unsafe fn on_leave_established(cookie: u64, new: u8) -> Result<(), Error> {
    let Some(c) = BW_CONNS.get_ptr_mut(&cookie) else {
        bump(counter::CONN_MISSING);
        return Ok(());
    };
    let c = &mut *c;
    if c.flags & conn_flags::COUNTED != 0 {
        c.flags &= !conn_flags::COUNTED;
        record(&key_of(c), c.svc, Event::Closed)?;
    }
    if new == CLOSE {
        forget(cookie);
    } else {
        c.state = new;
    }
    Ok(())
}

/// SYN_SENT -> CLOSE: the connect failed; `sk_err` says why (set before `tcp_done`).
unsafe fn on_connect_failed(sk: *const u8, o: &Offsets, cookie: u64) -> Result<(), Error> {
    forget(cookie);
    let c = scratch(scratch_slot::TRACEPOINT)?;
    if !read_sock(sk, o, c)? {
        return Ok(());
    }
    c.direction = direction::OUTBOUND;
    let key = key_of(c);
    let svc = service_of(&key.addr, key.port);
    let ev = match read::<i32>(sk, &o.sk_err) {
        ECONNREFUSED => Event::FailedRefused,
        ETIMEDOUT => Event::FailedTimeout,
        _ => Event::FailedOther,
    };
    record(&key, svc, ev)
}

#[inline(always)]
fn forget(cookie: u64) {
    if BW_CONNS.remove(&cookie).is_ok() {
        bump(counter::CONN_DELETES);
    }
}
