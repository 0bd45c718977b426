//! `iter/tcp`: seeds the gauges from the sockets that already exist when the agent starts.
//!
//! The kernel runs this with each socket locked and skips sockets unhashed meanwhile, so a socket
//! is either seeded here or its state change is seen by the tracepoint, never both. Listening
//! sockets come before established ones in the walk, which lets an established socket on a
//! listening port be told inbound.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_socket_cookie},
};
use breakwater_common::{conn_flags, counter, direction, scratch_slot, tcp_state, ListenerInfo};

use crate::{
    maps::{bump, listen_key, offsets, service_of, BW_CONNS, BW_LISTENERS},
    sock::{key_of, read, read_sock, record, scratch, Error, Event},
};

/// `struct bpf_iter__tcp`: the context of `iter/tcp` programs.
#[repr(C)]
pub struct IterTcpCtx {
    pub meta: *const u8,
    pub sk_common: *const u8,
    pub uid: u32,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn bw_seed_tcp(ctx: *const IterTcpCtx) -> i32 {
    if let Err(e) = unsafe { try_seed_tcp(ctx) } {
        e.count();
    }
    0
}

unsafe fn try_seed_tcp(ctx: *const IterTcpCtx) -> Result<(), Error> {
    let sk = (*ctx).sk_common;
    if sk.is_null() {
        return Ok(());
    }
    let o = offsets();
    if unsafe { core::ptr::read_volatile(&o.ready) } == 0 {
        bump(counter::NO_OFFSETS);
        return Ok(());
    }
    let state: u8 = read(sk, &o.skc_state);
    if state != tcp_state::LISTEN && state != tcp_state::ESTABLISHED {
        return Ok(());
    }
    let c = scratch(scratch_slot::ITER)?;
    if !read_sock(sk, o, c)? {
        return Ok(());
    }
    let listening = listen_key(c.netns, c.sport);
    if state == tcp_state::LISTEN {
        // Keep what the tracepoint knows of a listener opened since the agent started.
        let _ = BW_LISTENERS.insert(&listening, &ListenerInfo::default(), BPF_NOEXIST as u64);
        return Ok(());
    }
    c.direction = match BW_LISTENERS.get(&listening) {
        Some(l) => {
            c.pid = l.pid;
            c.comm = l.comm;
            c.cgroup_id = l.cgroup_id;
            direction::INBOUND
        }
        None => direction::OUTBOUND,
    };
    let key = key_of(c);
    let key_svc = service_of(&key.addr, key.port);
    c.svc = key_svc;
    c.start_ns = bpf_ktime_get_ns();
    c.state = tcp_state::ESTABLISHED;
    c.flags = conn_flags::COUNTED | conn_flags::SEEDED;
    let cookie = bpf_get_socket_cookie(sk as *mut _);
    // Already tracked (established after the tracepoint was attached): nothing to seed.
    if BW_CONNS.insert(&cookie, &*c, BPF_NOEXIST as u64).is_err() {
        return Ok(());
    }
    bump(counter::CONN_INSERTS);
    bump(counter::SEEDED);
    record(&key, key_svc, Event::Seeded)
}
