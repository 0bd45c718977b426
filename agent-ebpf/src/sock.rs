//! Reading kernel sockets through the BTF-resolved offsets, and updating the aggregates.
//!
//! **Socket pointers.** The `unsafe fn`s here and in the other modules that take `sk: *const u8`
//! require it to be a *BTF socket pointer*: a kernel socket the program was handed (a hook's
//! argument, an iterator's `sk_common`, `bpf_skc_to_tcp_sock`'s result, non-null), which the
//! verifier types by the kernel's BTF. Loads through it at the loader's offsets (`BW_OFFSETS`,
//! resolved from that BTF for the socket's type) are checked by the verifier when the program
//! loads, and one that faults at run time reads as zero instead. A field beyond `struct sock`
//! (`tcp_sock`'s) needs the pointer `bpf_skc_to_tcp_sock` returned.

use aya_ebpf::bindings::BPF_NOEXIST;
use breakwater_common::{
    counter, hist_bucket, svc_hist_index, svc_stats_index, v4_mapped, ConnInfo, ConnState,
    ConnStats, DestKey, HistKey, Offsets, SockRecord,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use crate::maps::{
    bump, conn_key, destination_histograms, BW_CONNS, BW_DESTS, BW_DEST_HIST, BW_SCRATCH,
    BW_SVC_HIST, BW_SVC_STATS,
};

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Why a program gave up on an event; the event passes uncounted and a counter says so.
pub enum Error {
    Read,
    Map,
}

impl Error {
    pub fn count(&self) {
        bump(counter::PROG_ERRORS);
        bump(match self {
            Error::Read => counter::READ_ERRORS,
            Error::Map => counter::MAP_ERRORS,
        });
    }
}

/// A direct load from a BTF-typed kernel pointer. The offset comes from the frozen, read-only
/// `BW_OFFSETS`, so the verifier knows it exactly and checks the access against the kernel's
/// BTF; a fault reads as zero. Far cheaper than `bpf_probe_read_kernel` on the hot path.
///
/// # Safety
/// `base` is a BTF socket pointer (see the module doc) or a kernel pointer read from one
/// (`skc_net`), `off` a field of `BW_OFFSETS` resolved for `base`'s type, and `T` that field's
/// type or a prefix of it.
#[inline(always)]
pub unsafe fn read<T: Copy>(base: *const u8, off: &u32) -> T {
    // Volatile so that the compiler loads the offset from the map here, not from a stack copy.
    let off = core::ptr::read_volatile(off);
    core::ptr::read_volatile(base.add(off as usize) as *const T)
}

/// An IPv6 address as the kernel's `in6_addr` allows it to be read: four 32-bit words.
///
/// # Safety
/// As [`read`], for an `in6_addr` field.
#[inline(always)]
unsafe fn read_in6(base: *const u8, off: &u32) -> [u8; 16] {
    let p = base.add(core::ptr::read_volatile(off) as usize) as *const [u8; 4];
    let w = |i| core::ptr::read_volatile(p.add(i));
    let (a, b, c, d) = (w(0), w(1), w(2), w(3));
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The identity fields a socket read fills in, shared by `ConnInfo` and `SockRecord`.
pub struct Ids<'a> {
    pub saddr: &'a mut [u8; 16],
    pub daddr: &'a mut [u8; 16],
    pub sport: &'a mut u16,
    pub dport: &'a mut u16,
    pub netns: &'a mut u32,
}

pub trait SockIds {
    fn ids(&mut self) -> Ids<'_>;
}

impl SockIds for ConnInfo {
    #[inline(always)]
    fn ids(&mut self) -> Ids<'_> {
        Ids {
            saddr: &mut self.saddr,
            daddr: &mut self.daddr,
            sport: &mut self.sport,
            dport: &mut self.dport,
            netns: &mut self.netns,
        }
    }
}

impl SockIds for SockRecord {
    #[inline(always)]
    fn ids(&mut self) -> Ids<'_> {
        Ids {
            saddr: &mut self.saddr,
            daddr: &mut self.daddr,
            sport: &mut self.sport,
            dport: &mut self.dport,
            netns: &mut self.netns,
        }
    }
}

/// Reads the `sock_common` identity fields into `c` (addresses, ports, namespace); works for
/// full, request and timewait sockets alike. `Ok(false)` for families other than IPv4/IPv6.
///
/// # Safety
/// `sk` is a BTF socket pointer (see the module doc) and `o` is [`crate::maps::offsets`].
#[inline(always)]
pub unsafe fn read_sock(sk: *const u8, o: &Offsets, c: &mut impl SockIds) -> Result<bool, Error> {
    let c = c.ids();
    let family: u16 = read(sk, &o.skc_family);
    match family {
        AF_INET => {
            *c.saddr = v4_mapped(read(sk, &o.skc_rcv_saddr));
            *c.daddr = v4_mapped(read(sk, &o.skc_daddr));
        }
        AF_INET6 => {
            *c.saddr = read_in6(sk, &o.skc_v6_rcv_saddr);
            *c.daddr = read_in6(sk, &o.skc_v6_daddr);
        }
        _ => return Ok(false),
    }
    *c.dport = u16::from_be(read::<u16>(sk, &o.skc_dport));
    *c.sport = read(sk, &o.skc_num);
    *c.netns = netns(sk, o)?;
    Ok(true)
}

/// The inode of a socket's network namespace.
///
/// # Safety
/// As [`read_sock`].
#[inline(always)]
pub unsafe fn netns(sk: *const u8, o: &Offsets) -> Result<u32, Error> {
    let net: *const u8 = read(sk, &o.skc_net);
    if net.is_null() {
        return Err(Error::Read);
    }
    Ok(read(net, &o.net_inum))
}

#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // SAFETY: `p` points into a map value; the BPF atomic add keeps concurrent CPUs exact.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Which counter of `ConnStats` an event moves.
#[derive(Clone, Copy)]
pub enum Event {
    Opened,
    /// Left ESTABLISHED, with the payload bytes the connection moved.
    Closed {
        sent: u64,
        received: u64,
    },
    Seeded,
    FailedRefused,
    FailedTimeout,
    FailedOther,
    TimeWait,
    Retransmit,
}

/// Moves the counters of `ev` in `*stats`, each with an atomic add.
///
/// # Safety
/// `stats` points to a `ConnStats` value of a map (`BW_DESTS`, `BW_SVC_STATS`), from a lookup
/// in this program run: the kernel keeps it alive until the run ends.
#[inline(always)]
unsafe fn apply(stats: *mut ConnStats, ev: Event) {
    let s = &raw mut *stats;
    match ev {
        Event::Opened => {
            add(&raw mut (*s).opened, 1);
            add(&raw mut (*s).active, 1);
        }
        Event::Seeded => add(&raw mut (*s).active, 1),
        Event::Closed { sent, received } => {
            add(&raw mut (*s).bytes_sent, sent);
            add(&raw mut (*s).bytes_received, received);
            add(&raw mut (*s).closed, 1);
            // A gauge never underflows: the entry may have been evicted and re-created since.
            if core::ptr::read_volatile(&raw const (*s).active) == 0 {
                bump(counter::UNDERFLOWS);
            } else {
                add(&raw mut (*s).active, u64::MAX);
            }
        }
        Event::FailedRefused => add(&raw mut (*s).failed_refused, 1),
        Event::FailedTimeout => add(&raw mut (*s).failed_timeout, 1),
        Event::FailedOther => add(&raw mut (*s).failed_other, 1),
        Event::TimeWait => add(&raw mut (*s).time_wait_entered, 1),
        Event::Retransmit => add(&raw mut (*s).retransmits, 1),
    }
}

/// Applies an event to a destination's and, if it has one, its service's aggregates.
#[inline(always)]
pub fn record(key: &DestKey, svc: u32, ev: Event) -> Result<(), Error> {
    let stats = match BW_DESTS.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            // An error: another CPU inserted it first; fine, use theirs.
            if let Ok(()) = BW_DESTS.insert(key, &ConnStats::default(), BPF_NOEXIST as u64) {
                bump(counter::DEST_INSERTS);
            }
            BW_DESTS.get_ptr_mut(key).ok_or(Error::Map)?
        }
    };
    // SAFETY: `stats` was just looked up in `BW_DESTS`.
    unsafe { apply(stats, ev) };
    if svc != 0 {
        if let Some(p) = BW_SVC_STATS.get_ptr_mut(svc_stats_index(svc, key.direction)) {
            // SAFETY: `p` was just looked up in `BW_SVC_STATS`.
            unsafe { apply(p, ev) };
        }
    }
    Ok(())
}

/// A zeroed per-CPU `ConnInfo` to build an entry in: it does not fit the 512-byte stack
/// together with the keys and helper frames.
#[inline(always)]
pub fn scratch(slot: u32) -> Result<&'static mut ConnInfo, Error> {
    let p = BW_SCRATCH.get_ptr_mut(slot).ok_or(Error::Map)?;
    // SAFETY: per-CPU slot per program; the kernel does not nest a tracing program in itself.
    let c = unsafe { &mut *p };
    zero(c);
    Ok(c)
}

/// A tracked connection as a `ConnInfo`, built in scratch `slot`: what `BW_CONNS` keeps of it,
/// the rest read from the socket (not an inbound connection's process: see
/// `attribute_to_listener`). None for families we do not track.
///
/// # Safety
/// As [`read_sock`]; and no reference to scratch `slot` from before is used after this call
/// (it is overwritten).
#[inline(always)]
pub unsafe fn conn_of(
    sk: *const u8,
    o: &Offsets,
    st: &ConnState,
    slot: u32,
) -> Result<Option<&'static mut ConnInfo>, Error> {
    let c = scratch(slot)?;
    if !read_sock(sk, o, c)? {
        return Ok(None);
    }
    c.start_ns = st.start_ns;
    c.cgroup_id = st.cgroup_id;
    c.comm = st.comm;
    c.pid = st.pid;
    c.svc = st.svc;
    c.direction = st.direction;
    c.flags = st.flags;
    if st.port != 0 {
        c.sport = st.port;
    }
    Ok(Some(c))
}

/// Gives a connection its `BW_CONNS` entry (replacing what a socket at the same address left).
/// False when the map is full: the connection is left uncounted, and so is its close.
#[inline(always)]
pub fn track(sk: *const u8, st: &ConnState) -> bool {
    if BW_CONNS.insert(&conn_key(sk), st, 0).is_err() {
        bump(counter::CONNS_FULL);
        return false;
    }
    bump(counter::CONNS_TRACKED);
    true
}

/// Zeroes a `ConnInfo` with word stores: `*c = ConnInfo::default()` compiles to a call to a
/// byte-wise memset loop.
#[inline(always)]
pub fn zero(c: &mut ConnInfo) {
    let words = (c as *mut ConnInfo).cast::<u64>();
    for i in 0..core::mem::size_of::<ConnInfo>() / 8 {
        // SAFETY: ConnInfo is 8-byte aligned, a multiple of 8 long, and all-zero is valid.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// Reports a connection event to the audit stream, if someone watches: the connection as
/// `c` describes it.
#[inline(always)]
pub fn audit(c: &ConnInfo, kind: u8, reason: u8, sent: u64, received: u64, duration_us: u64) {
    let Some(mut entry) = crate::maps::audit_entry() else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry; every field is written before it is submitted.
    unsafe {
        (*e).time_ns = aya_ebpf::helpers::bpf_ktime_get_ns();
        (*e).cgroup_id = c.cgroup_id;
        (*e).bytes_sent = sent;
        (*e).bytes_received = received;
        (*e).duration_us = duration_us;
        (*e).saddr = c.saddr;
        (*e).daddr = c.daddr;
        (*e).comm = c.comm;
        (*e).netns = c.netns;
        (*e).pid = c.pid;
        (*e).svc = c.svc;
        (*e).errno = 0;
        (*e).sport = c.sport;
        (*e).dport = c.dport;
        (*e).kind = kind;
        (*e).reason = reason;
        (*e).direction = c.direction;
        (*e)._pad = 0;
    }
    entry.submit(0);
}

/// Adds one sample (µs) to a destination's and, if it has one, its service's histogram.
#[inline(always)]
pub fn observe(key: &DestKey, svc: u32, kind: u32, us: u64) -> Result<(), Error> {
    observe_n(key, svc, kind, hist_bucket(us), 1)
}

/// Adds `n` samples of one bucket to a destination's and its service's histogram.
#[inline(always)]
pub fn observe_n(key: &DestKey, svc: u32, kind: u32, bucket: u32, n: u64) -> Result<(), Error> {
    if destination_histograms() {
        let hk = HistKey {
            dest: *key,
            kind,
            bucket,
        };
        let count = match BW_DEST_HIST.get_ptr_mut(&hk) {
            Some(p) => p,
            None => {
                if BW_DEST_HIST.insert(&hk, &0, BPF_NOEXIST as u64).is_ok() {
                    bump(counter::HIST_INSERTS);
                }
                BW_DEST_HIST.get_ptr_mut(&hk).ok_or(Error::Map)?
            }
        };
        add(count, n);
    }
    if svc != 0 {
        if let Some(p) = BW_SVC_HIST.get_ptr_mut(svc_hist_index(svc, kind, bucket)) {
            add(p, n);
        }
    }
    Ok(())
}
