//! Map declarations. Names match `breakwater_common::names` (checked by the loader).

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::{self, SkStorage},
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use breakwater_common::{
    breaker::{
        BreakerEntry, BreakerSock, DestBreaker, DestBreakerKey, DestPolicy, MoreTotals, Policy,
        SvcMeta, Totals,
    },
    counter, defaults, hist_kind, scratch_slot, ConnEvent, ConnInfo, ConnState, ConnStats, DestKey,
    HistKey, ListenKey, ListenerInfo, Offsets, RequestTiming, SvcLpmData, HIST_BUCKETS,
};

#[map]
pub static BW_DESTS: LruHashMap<DestKey, ConnStats> =
    LruHashMap::with_max_entries(defaults::MAX_DESTS, 0);

/// The send/receive path's state lives with the socket: no hashing per packet, freed with it.
#[btf_map]
pub static BW_SOCKS: SkStorage<RequestTiming> = SkStorage::new();

/// Not preallocated: entries come and go with connections, memory as used.
#[map]
pub static BW_CONNS: HashMap<u64, ConnState> =
    HashMap::with_max_entries(defaults::MAX_CONNS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// The key of a socket in `BW_CONNS`: its address, which stays the same while it lives.
#[inline(always)]
pub fn conn_key(sk: *const u8) -> u64 {
    sk as u64
}

#[map]
pub static BW_SVC_LPM: LpmTrie<SvcLpmData, u32> =
    LpmTrie::with_max_entries(defaults::MAX_SERVICE_ENDPOINTS, 0);

#[map]
pub static BW_PROTECTED: LpmTrie<SvcLpmData, u32> =
    LpmTrie::with_max_entries(defaults::MAX_PROTECTED, 0);

/// Service ids run 1..=max_services (slot 0 is "no service"), two directions each; the loader
/// sizes it from the config the same way.
#[map]
pub static BW_SVC_STATS: Array<ConnStats> =
    Array::with_max_entries((defaults::MAX_SERVICES + 1) * 2, BPF_F_MMAPABLE);

#[map]
pub static BW_LISTENERS: LruHashMap<ListenKey, ListenerInfo> =
    LruHashMap::with_max_entries(defaults::MAX_LISTENERS, 0);

#[map]
pub static BW_DEST_HIST: LruHashMap<HistKey, u64> =
    LruHashMap::with_max_entries(defaults::MAX_HIST_BUCKETS, 0);

/// Mmapable, as `BW_SVC_STATS`: the agent reads every service's slots in one view.
#[map]
pub static BW_SVC_HIST: Array<u64> = Array::with_max_entries(
    (defaults::MAX_SERVICES + 1) * hist_kind::COUNT * HIST_BUCKETS,
    BPF_F_MMAPABLE,
);

/// Breaker maps are indexed by service id (1..=max_services; 0 is "no service").
const SVC_SLOTS: u32 = defaults::MAX_SERVICES + 1;

#[map]
pub static BW_POLICIES: Array<Policy> = Array::with_max_entries(SVC_SLOTS, 0);

/// BTF-described so that the verifier accepts the `bpf_spin_lock` inside each entry.
#[btf_map]
pub static BW_BREAKERS: btf_maps::Array<BreakerEntry, { SVC_SLOTS as usize }> =
    btf_maps::Array::new();

#[map]
pub static BW_BRK_TOTALS: Array<Totals> = Array::with_max_entries(SVC_SLOTS, 0);

#[btf_map]
pub static BW_BRK_SOCKS: SkStorage<BreakerSock> = SkStorage::new();

/// Not LRU: an ejected destination must never be evicted. The agent reaps closed ones not seen
/// for the destination TTL (through `bw_dest_cmd`); when full, new destinations pass uncounted.
#[map]
pub static BW_DEST_BREAKERS: HashMap<DestBreakerKey, DestBreaker> =
    HashMap::with_max_entries(defaults::MAX_DEST_BREAKERS, 0);

#[map]
pub static BW_DEST_POLICIES: Array<DestPolicy> = Array::with_max_entries(SVC_SLOTS, 0);

#[map]
pub static BW_MORE_TOTALS: Array<MoreTotals> = Array::with_max_entries(SVC_SLOTS, 0);

#[btf_map]
pub static BW_DEST_SOCKS: SkStorage<DestBreakerKey> = SkStorage::new();

#[map]
pub static BW_BRK_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Written and read by the agent only; here so that it is created and pinned with the rest.
#[map]
pub static BW_LAYOUT: Array<u32> = Array::with_max_entries(breakwater_common::layout::ENTRIES, 0);

/// Written and read by the agent only; here so that it is created, sized and pinned with the rest.
#[map]
pub static BW_SVC_META: Array<SvcMeta> = Array::with_max_entries(SVC_SLOTS, 0);

/// ~50 ms of a churning node's events (120 bytes each) while the agent's reader is off CPU.
#[map]
pub static BW_CONN_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

#[map]
pub static BW_AUDIT: Array<u32> = Array::with_max_entries(1, 0);

/// Room in the audit ring buffer for one event, if someone is watching (and None otherwise, at
/// the cost of one array lookup). The caller fills in every field and submits it.
#[inline(always)]
pub fn audit_entry() -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<ConnEvent>> {
    if !auditing() {
        return None;
    }
    let entry = BW_CONN_EVENTS.reserve::<ConnEvent>(0);
    if entry.is_none() {
        bump(counter::AUDIT_LOST);
    }
    entry
}

/// Whether someone watches the audit stream.
#[inline(always)]
pub fn auditing() -> bool {
    BW_AUDIT.get(0).copied().unwrap_or(0) != 0
}

#[map]
pub static BW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Per-CPU room to build a `ConnInfo` in (see `sock::scratch`).
#[map]
pub static BW_SCRATCH: PerCpuArray<ConnInfo> =
    PerCpuArray::with_max_entries(scratch_slot::COUNT, 0);

/// Filled in by the loader before load (`EbpfLoader::override_global`). Kept in `.rodata`
/// (an all-zero static would land in `.bss`) so the map is frozen and read-only to programs,
/// and the verifier knows every offset as a constant.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".rodata")]
pub static BW_OFFSETS: Offsets = Offsets::ZERO;

/// 1 (set by the loader) when the hooks are to do nothing: see `names::GLOBAL_EMPTY`.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".rodata")]
pub static BW_EMPTY: u32 = 0;

/// 0 (set by the loader) when histograms are kept per service only: see
/// `names::GLOBAL_DEST_HIST`.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".rodata")]
pub static BW_DEST_HIST_ON: u32 = 1;

/// Whether samples go into the destinations' histograms too. A constant to the verifier, like
/// [`empty`]: off, the destination histogram's hashing is not even in the program.
#[inline(always)]
pub fn destination_histograms() -> bool {
    // SAFETY: a plain load of a read-only global.
    unsafe { core::ptr::read_volatile(&BW_DEST_HIST_ON) != 0 }
}

/// Whether the hooks are to return at once. A constant to the verifier, which prunes the
/// branch: no cost in a normal load.
#[inline(always)]
pub fn empty() -> bool {
    // SAFETY: a plain load of a read-only global.
    unsafe { core::ptr::read_volatile(&BW_EMPTY) != 0 }
}

/// The offsets, to be read field by field with `sock::read` at each use: a load straight from
/// the frozen map is a constant to the verifier, a copy on the stack may not be.
#[inline(always)]
pub fn offsets() -> &'static Offsets {
    &BW_OFFSETS
}

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(p) = BW_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

/// Service id of an endpoint, 0 when it belongs to no service.
#[inline(always)]
pub fn service_of(addr: &[u8; 16], port: u16) -> u32 {
    let key = Key::new(
        breakwater_common::SVC_LPM_PORT_BITS + 128,
        SvcLpmData {
            port_be: port.to_be_bytes(),
            addr: *addr,
        },
    );
    BW_SVC_LPM.get(&key).copied().unwrap_or(0)
}

/// Whether a destination is protected: the gate never refuses it.
#[inline(always)]
pub fn protected(addr: &[u8; 16], port: u16) -> bool {
    let key = Key::new(
        breakwater_common::SVC_LPM_PORT_BITS + 128,
        SvcLpmData {
            port_be: port.to_be_bytes(),
            addr: *addr,
        },
    );
    BW_PROTECTED.get(&key).is_some()
}

/// An inbound connection's process: the one that listens on its port.
///
/// # Safety
/// Nothing for the caller to uphold; unsafe as aya's `HashMap::get` is: the listener's entry is
/// read in place, and an update racing on another CPU can at worst mix two listeners' fields.
#[inline(always)]
pub unsafe fn attribute_to_listener(c: &mut ConnInfo) {
    if let Some(l) = BW_LISTENERS.get(&listen_key(c.netns, c.sport)) {
        c.pid = l.pid;
        c.comm = l.comm;
        c.cgroup_id = l.cgroup_id;
    }
}

#[inline(always)]
pub fn listen_key(netns: u32, port: u16) -> ListenKey {
    ListenKey {
        netns,
        port,
        _pad: 0,
    }
}

/// The socket's `RequestTiming`, created zeroed if `create` and absent.
///
/// # Safety
/// As [`sk_storage`].
#[inline(always)]
pub unsafe fn timing(sk: *const u8, create: bool) -> Option<&'static mut RequestTiming> {
    sk_storage(&BW_SOCKS, sk, create)
}

/// The socket's entry in a socket-local storage map, created zeroed if `create` and absent.
///
/// # Safety
/// `sk` is a BTF pointer to a full socket (`struct sock` or a struct that starts with one: see
/// `crate::sock`), and the caller holds no other reference to that socket's entry in `map`
/// while it uses this one (it lives as long as the socket, hence `'static`).
#[inline(always)]
pub unsafe fn sk_storage<T>(
    map: &SkStorage<T>,
    sk: *const u8,
    create: bool,
) -> Option<&'static mut T> {
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    let map = core::ptr::from_ref(map).cast_mut().cast();
    let p = bpf_sk_storage_get(map, sk as *mut _, core::ptr::null_mut(), flags) as *mut T;
    p.as_mut()
}
