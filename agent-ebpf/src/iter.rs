//! `iter/tcp` programs: seeding the gauges from the sockets that exist when the agent starts,
//! and listing the tracked live sockets.
//!
//! The kernel runs these with each socket locked and skips sockets unhashed meanwhile, so a
//! socket is either seeded here or its state change is seen by the tracepoint, never both.
//! Listening sockets come before established ones in the walk, which lets an established socket
//! on a listening port be told inbound.

use aya_ebpf::helpers::{
    bpf_ktime_get_ns,
    generated::{bpf_get_socket_cookie, bpf_seq_write, bpf_skc_to_tcp_sock},
};
use breakwater_common::{
    conn_flags, counter, direction, scratch_slot, tcp_state, timing_flags, BreakerSockRecord,
    ConnInfo, ConnState, ListenerInfo, SockRecord,
};

use crate::{
    maps::{
        attribute_to_listener, bump, conn_key, listen_key, offsets, service_of, sk_storage, timing,
        BW_BRK_SOCKS, BW_CONNS, BW_LISTENERS,
    },
    sock::{conn_of, read, read_sock, record, scratch, track, Error, Event},
};

/// `struct bpf_iter_meta`.
#[repr(C)]
pub struct IterMeta {
    pub seq: *mut core::ffi::c_void,
    pub session_id: u64,
    pub seq_num: u64,
}

/// `struct bpf_iter__tcp`: the context of `iter/tcp` programs.
#[repr(C)]
pub struct IterTcpCtx {
    pub meta: *const IterMeta,
    pub sk_common: *const u8,
    pub uid: u32,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn bw_seed_tcp(ctx: *const IterTcpCtx) -> i32 {
    // SAFETY: the kernel calls this program with its `bpf_iter__tcp` context.
    if let Err(e) = unsafe { try_seed_tcp(ctx) } {
        e.count();
    }
    0
}

/// Seeds the gauges from an established socket that no tracepoint counted, and remembers
/// listeners.
///
/// # Safety
/// `ctx` is the `bpf_iter__tcp` context the kernel passed to the running `iter/tcp` program.
unsafe fn try_seed_tcp(ctx: *const IterTcpCtx) -> Result<(), Error> {
    let sk = (*ctx).sk_common;
    if sk.is_null() {
        return Ok(());
    }
    let o = offsets();
    if core::ptr::read_volatile(&o.ready) == 0 {
        bump(counter::NO_OFFSETS);
        return Ok(());
    }
    let state: u8 = read(sk, &o.skc_state);
    if state == tcp_state::LISTEN {
        let c = scratch(scratch_slot::ITER)?;
        if read_sock(sk, o, c)? {
            // Keep what the tracepoint knows of a listener opened since the agent started.
            let _ = BW_LISTENERS.insert(
                &listen_key(c.netns, c.sport),
                &ListenerInfo::default(),
                aya_ebpf::bindings::BPF_NOEXIST as u64,
            );
        }
        return Ok(());
    }
    if state != tcp_state::ESTABLISHED {
        return Ok(());
    }
    // Full TCP sockets only (not timewait or request socks); storage hangs off `struct sock`.
    let tp = bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    // Established after the tracepoint was attached: already counted.
    let id = conn_key(tp);
    if BW_CONNS
        .get(&id)
        .is_some_and(|s| s.flags & conn_flags::COUNTED != 0)
    {
        return Ok(());
    }
    let c = scratch(scratch_slot::ITER)?;
    if !read_sock(sk, o, c)? {
        return Ok(());
    }
    c.direction = if BW_LISTENERS.get(&listen_key(c.netns, c.sport)).is_some() {
        direction::INBOUND
    } else {
        direction::OUTBOUND
    };
    let key = c.dest_key();
    let st = ConnState {
        start_ns: bpf_ktime_get_ns(),
        svc: service_of(&key.addr, key.port),
        port: c.sport,
        direction: c.direction,
        flags: conn_flags::COUNTED | conn_flags::SEEDED,
        ..Default::default()
    };
    if !track(tp, &st) {
        return Ok(());
    }
    bump(counter::SEEDED);
    record(&key, st.svc, Event::Seeded)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn bw_list_tcp(ctx: *const IterTcpCtx) -> i32 {
    // SAFETY: the kernel calls this program with its `bpf_iter__tcp` context.
    if let Err(e) = unsafe { try_list_tcp(ctx) } {
        e.count();
    }
    0
}

/// Writes a `ConnRecord` (cookie, what is known of the connection, live state) for each
/// tracked socket.
///
/// # Safety
/// `ctx` is the `bpf_iter__tcp` context the kernel passed to the running `iter/tcp` program.
unsafe fn try_list_tcp(ctx: *const IterTcpCtx) -> Result<(), Error> {
    let sk = (*ctx).sk_common;
    if sk.is_null() {
        return Ok(());
    }
    let tp = bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    let o = offsets();
    let Some(st) = BW_CONNS.get(&conn_key(tp)) else {
        return Ok(());
    };
    let Some(c) = conn_of(sk, o, st, scratch_slot::ITER)? else {
        return Ok(());
    };
    if c.direction == direction::INBOUND {
        attribute_to_listener(c);
    } else if let Some(t) = timing(tp, false) {
        if t.flags & timing_flags::CLIENT != 0 {
            c.fr_bucket = t.fr_bucket;
            c.fr_count = t.fr_count;
            c.send_us = t.send_us;
        }
    }
    let seq = (*(*ctx).meta).seq;
    let cookie = bpf_get_socket_cookie(sk as *mut _);
    let state = u64::from(read::<u8>(sk, &o.skc_state));
    bpf_seq_write(seq.cast(), (&raw const cookie).cast(), 8);
    bpf_seq_write(
        seq.cast(),
        (&raw const *c).cast(),
        core::mem::size_of::<ConnInfo>() as u32,
    );
    bpf_seq_write(seq.cast(), (&raw const state).cast(), 8);
    Ok(())
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn bw_stamp_tcp(ctx: *const IterTcpCtx) -> i32 {
    // SAFETY: the kernel calls this program with its `bpf_iter__tcp` context.
    if let Err(e) = unsafe { try_stamp_tcp(ctx) } {
        e.count();
    }
    0
}

/// Stamps the `BW_CONNS` entry of each tracked socket with the time: an entry the agent's
/// sweeps of every namespace stop stamping belongs to a socket that is gone.
///
/// # Safety
/// `ctx` is the `bpf_iter__tcp` context the kernel passed to the running `iter/tcp` program.
unsafe fn try_stamp_tcp(ctx: *const IterTcpCtx) -> Result<(), Error> {
    let sk = (*ctx).sk_common;
    if sk.is_null() {
        return Ok(());
    }
    let tp = bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    if let Some(st) = BW_CONNS.get_ptr_mut(&conn_key(tp)) {
        (*st).seen_s = (bpf_ktime_get_ns() / 1_000_000_000) as u32;
    }
    Ok(())
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn bw_socks_tcp(ctx: *const IterTcpCtx) -> i32 {
    // SAFETY: the kernel calls this program with its `bpf_iter__tcp` context.
    if let Err(e) = unsafe { try_socks_tcp(ctx) } {
        e.count();
    }
    0
}

/// Writes a `SockRecord` for every TCP socket: listeners, request and TIME_WAIT sockets too.
///
/// # Safety
/// `ctx` is the `bpf_iter__tcp` context the kernel passed to the running `iter/tcp` program.
unsafe fn try_socks_tcp(ctx: *const IterTcpCtx) -> Result<(), Error> {
    let sk = (*ctx).sk_common;
    if sk.is_null() {
        return Ok(());
    }
    let o = offsets();
    let mut rec = SockRecord::default();
    if !read_sock(sk, o, &mut rec)? {
        return Ok(());
    }
    rec.state = read(sk, &o.skc_state);
    let seq = (*(*ctx).meta).seq;
    bpf_seq_write(
        seq.cast(),
        (&raw const rec).cast(),
        core::mem::size_of::<SockRecord>() as u32,
    );
    Ok(())
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn bw_breaker_tcp(ctx: *const IterTcpCtx) -> i32 {
    // SAFETY: the kernel calls this program with its `bpf_iter__tcp` context.
    if let Err(e) = unsafe { try_breaker_tcp(ctx) } {
        e.count();
    }
    0
}

/// Writes a `BreakerSockRecord` for every established socket the breaker's gate marked: the
/// connections a trip of their service terminates.
///
/// # Safety
/// `ctx` is the `bpf_iter__tcp` context the kernel passed to the running `iter/tcp` program.
unsafe fn try_breaker_tcp(ctx: *const IterTcpCtx) -> Result<(), Error> {
    let sk = (*ctx).sk_common;
    if sk.is_null() {
        return Ok(());
    }
    let tp = bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    let Some(bs) = sk_storage(&BW_BRK_SOCKS, tp, false) else {
        return Ok(());
    };
    let o = offsets();
    let mut rec = BreakerSockRecord {
        svc: bs.svc,
        ..Default::default()
    };
    rec.sock.state = read(sk, &o.skc_state);
    if rec.sock.state != tcp_state::ESTABLISHED || !read_sock(sk, o, &mut rec.sock)? {
        return Ok(());
    }
    let seq = (*(*ctx).meta).seq;
    bpf_seq_write(
        seq.cast(),
        (&raw const rec).cast(),
        core::mem::size_of::<BreakerSockRecord>() as u32,
    );
    Ok(())
}
