//! Layouts and names shared by the eBPF programs and the agent.
//!
//! Every struct here crosses the user/kernel boundary through a map or a global, so each one is
//! `#[repr(C)]` with explicit padding and a size assertion. The `user` feature adds `aya::Pod`.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod breaker;
#[cfg(feature = "std")]
pub mod mounts;

/// Names of programs, maps and globals. The eBPF side declares statics with these exact names
/// (aya's attribute macros only take literals); the loader looks every one of them up and fails
/// with the missing name, so a rename on one side cannot go unnoticed.
pub mod names {
    /// `tp_btf/inet_sock_set_state`: every TCP state change, every namespace.
    pub const PROG_SOCK_STATE: &str = "bw_sock_state";
    /// `iter/tcp`: seeds the gauges from the sockets that exist when the agent starts.
    pub const PROG_SEED_TCP: &str = "bw_seed_tcp";
    /// `iter/tcp`: writes a `ConnRecord` for every tracked live socket (ListConnections).
    pub const PROG_LIST_TCP: &str = "bw_list_tcp";
    /// `iter/tcp`: writes a `SockRecord` for every TCP socket, TIME_WAIT included (GetTimeWait).
    pub const PROG_SOCKS_TCP: &str = "bw_socks_tcp";
    /// `iter/tcp`: stamps the `BW_CONNS` entry of every live tracked socket with the time, so
    /// that the agent can reap the entries of sockets that are gone.
    pub const PROG_STAMP_TCP: &str = "bw_stamp_tcp";

    /// `tp_btf/tcp_sendmsg_locked`: a send on a client connection starts a request's clock.
    pub const PROG_SOCK_SEND: &str = "bw_sock_send";
    /// `tp_btf/sk_data_ready`: the first data after it stops the clock.
    pub const PROG_DATA_READY: &str = "bw_data_ready";

    /// `fentry/tcp_sendmsg_locked`: `PROG_SOCK_SEND` where the tracepoint is missing.
    pub const PROG_SOCK_SEND_FENTRY: &str = "bw_sock_send_fentry";
    /// `fentry/do_tcp_sendpages`: sends by `sendfile()`/`splice()` on kernels where they do not
    /// pass through `tcp_sendmsg_locked` (6.1).
    pub const PROG_SOCK_SENDPAGES_FENTRY: &str = "bw_sock_sendpages_fentry";
    /// `fentry/tcp_data_ready`: `PROG_DATA_READY` where the tracepoint is missing.
    pub const PROG_DATA_READY_FENTRY: &str = "bw_data_ready_fentry";

    /// `tp_btf/tcp_retransmit_skb`: retransmits per destination.
    pub const PROG_RETRANSMIT: &str = "bw_retransmit";
    /// `tp_btf/tcp_retransmit_skb` in its older, two-argument form (no error).
    pub const PROG_RETRANSMIT_SENT: &str = "bw_retransmit_sent";

    pub const TRACEPOINT_SOCK_STATE: &str = "inet_sock_set_state";
    pub const TRACEPOINT_RETRANSMIT: &str = "tcp_retransmit_skb";
    pub const TRACEPOINT_SOCK_SEND: &str = "tcp_sendmsg_locked";
    pub const TRACEPOINT_DATA_READY: &str = "sk_data_ready";
    /// Kernel functions the `fentry` fallbacks attach to.
    pub const FUNC_SOCK_SEND: &str = "tcp_sendmsg_locked";
    pub const FUNC_DATA_READY: &str = "tcp_data_ready";
    pub const FUNC_SOCK_SENDPAGES: &str = "do_tcp_sendpages";
    pub const ITER_TCP: &str = "tcp";

    /// Per destination (outbound) or local endpoint (inbound) aggregates: `DestKey -> ConnStats`.
    pub const MAP_DESTS: &str = "BW_DESTS";
    /// Socket-local storage: the send/receive path's `RequestTiming` of each socket that has
    /// sent data, made at its first send and freed with the socket.
    pub const MAP_SOCKS: &str = "BW_SOCKS";
    /// Each tracked connection's `ConnState`, by the socket's address (`u64 -> ConnState`), from
    /// connect or accept to close. A hash entry costs far less to make and free than
    /// socket-local storage, and most short connections (probes, health checks) never send.
    pub const MAP_CONNS: &str = "BW_CONNS";
    /// Service endpoints: LPM key (`SvcLpmData`) -> service id.
    pub const MAP_SVC_LPM: &str = "BW_SVC_LPM";
    /// Per service aggregates: index `svc_id * 2 + direction` -> `ConnStats`.
    pub const MAP_SVC_STATS: &str = "BW_SVC_STATS";
    /// Listening sockets and the process that called `listen()`: `ListenKey -> ListenerInfo`.
    /// Inbound connections are attributed to their listener's process.
    pub const MAP_LISTENERS: &str = "BW_LISTENERS";
    /// Latency histograms per destination: `HistKey -> count` (LRU, sparse: one entry per bucket
    /// in use).
    pub const MAP_DEST_HIST: &str = "BW_DEST_HIST";
    /// Latency histograms per service: index [`crate::svc_hist_index`] -> count.
    pub const MAP_SVC_HIST: &str = "BW_SVC_HIST";
    /// Per-CPU counters, indexed by [`crate::counter`].
    pub const MAP_COUNTERS: &str = "BW_COUNTERS";
    /// Per-CPU room to build a `ConnInfo` in, one slot per program that may interrupt another.
    pub const MAP_SCRATCH: &str = "BW_SCRATCH";

    /// `cgroup/connect4` and `cgroup/connect6`: the breaker's gate, in the enforced cgroups.
    pub const PROG_CONNECT4: &str = "bw_connect4";
    pub const PROG_CONNECT6: &str = "bw_connect6";
    /// `sock_ops`: outcomes of the connects the gate admitted (established, failed, reset).
    pub const PROG_SOCKOPS: &str = "bw_sockops";
    /// `iter/tcp`: writes a `BreakerSockRecord` for every socket the gate admitted to a
    /// service, so that the agent can destroy a tripped service's connections.
    pub const PROG_BREAKER_TCP: &str = "bw_breaker_tcp";

    /// Breaker policies: service id -> `breaker::Policy`.
    pub const MAP_POLICIES: &str = "BW_POLICIES";
    /// Breaker state: service id -> `breaker::BreakerEntry` (spin-locked).
    pub const MAP_BREAKERS: &str = "BW_BREAKERS";
    /// Breaker totals: service id -> `breaker::Totals`.
    pub const MAP_BREAKER_TOTALS: &str = "BW_BRK_TOTALS";
    /// Socket-local storage: `breaker::BreakerSock` of each admitted connect.
    pub const MAP_BREAKER_SOCKS: &str = "BW_BRK_SOCKS";
    /// Ring buffer of `breaker::Event`s.
    pub const MAP_BREAKER_EVENTS: &str = "BW_BRK_EVENTS";
    /// Service id -> `breaker::SvcMeta` (name, trip reason), to rebuild the table on restart.
    pub const MAP_SVC_META: &str = "BW_SVC_META";
    /// `breaker::DestBreakerKey` -> `breaker::DestBreaker`: destination granularity's breakers.
    pub const MAP_DEST_BREAKERS: &str = "BW_DEST_BREAKERS";
    /// Service id -> `breaker::DestPolicy` (written by the agent).
    pub const MAP_DEST_POLICIES: &str = "BW_DEST_POLICIES";
    /// Service id -> `breaker::MoreTotals`.
    pub const MAP_MORE_TOTALS: &str = "BW_MORE_TOTALS";
    /// Socket-local storage: the `breaker::DestBreakerKey` an admitted connect counts in.
    pub const MAP_DEST_SOCKS: &str = "BW_DEST_SOCKS";
    /// Protected destinations: LPM key (`SvcLpmData`) -> 1. The gate never refuses them,
    /// whatever service they belong to (the agent's own control paths and `[breaker]
    /// protected`). Rebuilt by each agent at start: not pinned.
    pub const MAP_PROTECTED: &str = "BW_PROTECTED";
    /// `tc` program never attached: the agent test-runs it with a `breaker::DestCommand` as
    /// packet data, so that destination breakers change only in programs, under the lock.
    pub const PROG_DEST_CMD: &str = "bw_dest_cmd";

    /// Two `u32`s, `[layout::MAGIC, layout::VERSION]`: the layout of the pinned maps beside it.
    /// Written and read by the agent only.
    pub const MAP_LAYOUT: &str = "BW_LAYOUT";

    /// Maps pinned under the agent's bpffs directory: enforcement state that outlives the
    /// agent process and is picked up again by the next one.
    pub const PINNED_MAPS: [&str; 12] = [
        MAP_LAYOUT,
        MAP_SVC_LPM,
        MAP_SVC_META,
        MAP_POLICIES,
        MAP_BREAKERS,
        MAP_BREAKER_TOTALS,
        MAP_BREAKER_SOCKS,
        MAP_BREAKER_EVENTS,
        MAP_DEST_BREAKERS,
        MAP_DEST_POLICIES,
        MAP_MORE_TOTALS,
        MAP_DEST_SOCKS,
    ];

    /// Ring buffer of `ConnEvent`s for `WatchConnections` (written only while `BW_AUDIT` is on).
    pub const MAP_CONN_EVENTS: &str = "BW_CONN_EVENTS";
    /// One `u32`: 1 while someone watches connection events.
    pub const MAP_AUDIT: &str = "BW_AUDIT";

    /// Kernel struct offsets, resolved from BTF by the loader (read-only global).
    pub const GLOBAL_OFFSETS: &str = "BW_OFFSETS";
    /// A `u32`, 1 when every hook is to return at once: what the hooks alone cost, for the
    /// bench (read-only global; the verifier drops the branch it does not take).
    pub const GLOBAL_EMPTY: &str = "BW_EMPTY";
    /// A `u32`, 1 (the default) when latency histograms are kept per destination as well as per
    /// service; 0 when `destination_latency` is disabled (read-only global, as `GLOBAL_EMPTY`).
    pub const GLOBAL_DEST_HIST: &str = "BW_DEST_HIST_ON";

    /// Every map the loader expects, for its presence check.
    pub const ALL_MAPS: [&str; 24] = [
        MAP_LAYOUT,
        MAP_PROTECTED,
        MAP_DEST_BREAKERS,
        MAP_DEST_POLICIES,
        MAP_MORE_TOTALS,
        MAP_DEST_SOCKS,
        MAP_CONN_EVENTS,
        MAP_AUDIT,
        MAP_POLICIES,
        MAP_BREAKERS,
        MAP_BREAKER_TOTALS,
        MAP_BREAKER_SOCKS,
        MAP_BREAKER_EVENTS,
        MAP_SVC_META,
        MAP_DESTS,
        MAP_SOCKS,
        MAP_CONNS,
        MAP_SVC_LPM,
        MAP_SVC_STATS,
        MAP_LISTENERS,
        MAP_COUNTERS,
        MAP_SCRATCH,
        MAP_DEST_HIST,
        MAP_SVC_HIST,
    ];
}

/// The layout stamp of the pinned maps (`names::MAP_LAYOUT`), so that an agent never misreads
/// state pinned by another version of itself.
pub mod layout {
    /// `BWLY`: the map is a breakwater layout stamp.
    pub const MAGIC: u32 = u32::from_le_bytes(*b"BWLY");
    /// Bump on any change to the key or value layout, or the meaning, of a map in
    /// `names::PINNED_MAPS`, and teach the agent to migrate the older layout or say it cannot.
    /// 1: the layout of every agent before stamps (what an unstamped pin directory holds).
    /// 2: `SvcMeta`'s lengths became `u16`, with owners in their upper halves; layout 1 reads
    /// as layout 2 with every owner local, so it is migrated by stamping it.
    /// 3: the destination breakers' maps were added (made empty when absent) and
    /// `BreakerEntry`'s padding became `ejected` (0 in older layouts, which is right for them):
    /// layouts 1 and 2 are migrated by stamping too.
    pub const VERSION: u32 = 3;
    /// The oldest layout this agent migrates (by stamping it: see [`VERSION`]).
    pub const MIGRATES_FROM: u32 = 1;
    /// Entries of the stamp map: `[MAGIC, VERSION]`.
    pub const ENTRIES: u32 = 2;
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// The name `ss` prints for a state.
    pub const fn name(state: u8) -> &'static str {
        match state {
            ESTABLISHED => "ESTAB",
            SYN_SENT => "SYN-SENT",
            SYN_RECV => "SYN-RECV",
            FIN_WAIT1 => "FIN-WAIT-1",
            FIN_WAIT2 => "FIN-WAIT-2",
            TIME_WAIT => "TIME-WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE-WAIT",
            LAST_ACK => "LAST-ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW-SYN-RECV",
            _ => "UNKNOWN",
        }
    }
}

/// Direction of a connection as seen from this node.
pub mod direction {
    /// We connected out: keyed by the remote (destination) address and port.
    pub const OUTBOUND: u8 = 0;
    /// Someone connected to us: keyed by the local address and port.
    pub const INBOUND: u8 = 1;
}

/// Bits of [`ConnState::flags`] (and [`ConnInfo::flags`]).
pub mod conn_flags {
    /// The connection was counted in `active` and must be uncounted exactly once.
    pub const COUNTED: u8 = 1;
    /// The connection existed before the agent started (seeded from the socket iterator).
    pub const SEEDED: u8 = 2;
    /// `start_ns` is when `connect()` sent the SYN, so SYN -> ESTABLISHED can be timed.
    pub const CONNECT_TIMED: u8 = 4;
}

/// Bits of [`RequestTiming::flags`].
pub mod timing_flags {
    /// The socket is a counted client connection: its requests are timed. A socket's first
    /// send decides; without it, the storage only records that the socket is not one.
    pub const CLIENT: u8 = 1;
    /// A request was sent at `send_us` and no data has arrived since.
    pub const AWAITING: u8 = 2;
}

/// Indexes of the per-CPU counter array.
pub mod counter {
    /// A program hit an internal error and let the event pass uncounted.
    pub const PROG_ERRORS: u32 = 0;
    /// A kernel pointer a program follows was NULL (a socket without its namespace or its
    /// `tcp_sock`): the event passed uncounted.
    pub const READ_ERRORS: u32 = 1;
    /// A map update failed (map full for non-LRU maps).
    pub const MAP_ERRORS: u32 = 2;
    /// New keys inserted into `BW_DESTS`.
    pub const DEST_INSERTS: u32 = 3;
    /// Connections given a `BW_CONNS` entry (connect, accept or seed).
    pub const CONNS_TRACKED: u32 = 4;
    /// Listening sockets seen.
    pub const LISTENS: u32 = 5;
    /// An established socket left ESTABLISHED without having been counted (it predates the
    /// agent and the seed missed it).
    pub const UNTRACKED_CLOSES: u32 = 6;
    /// A decrement found the gauge at zero and was dropped (never underflow).
    pub const UNDERFLOWS: u32 = 7;
    /// Established sockets counted by the start-up seed.
    pub const SEEDED: u32 = 8;
    /// The offsets global was not filled in by the loader.
    pub const NO_OFFSETS: u32 = 9;
    /// New keys inserted into `BW_DEST_HIST`.
    pub const HIST_INSERTS: u32 = 10;
    /// Connection events the ring buffer had no room for.
    pub const AUDIT_LOST: u32 = 11;
    /// Connections left uncounted because `BW_CONNS` was full.
    pub const CONNS_FULL: u32 = 12;
    /// `BW_CONNS` entries of sockets that were gone, which the agent's sweep removed: a
    /// program that did not run to the end (a recursion miss, an error) left them. Only the
    /// agent adds to it (no program does, so its read-add-write races with none).
    pub const CONNS_REAPED: u32 = 13;

    pub const COUNT: u32 = 14;

    /// Names as reported by the API, index for index.
    pub const NAMES: [&str; COUNT as usize] = [
        "prog_errors",
        "read_errors",
        "map_errors",
        "dest_inserts",
        "conns_tracked",
        "listens",
        "untracked_closes",
        "underflows",
        "seeded",
        "no_offsets",
        "hist_inserts",
        "audit_lost",
        "conns_full",
        "conns_reaped",
    ];
}

/// Slots of `BW_SCRATCH`: a softirq tracepoint may interrupt the iterator on the same CPU.
pub mod scratch_slot {
    pub const TRACEPOINT: u32 = 0;
    pub const ITER: u32 = 1;
    pub const RETRANSMIT: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Default map sizes; the agent's config overrides them at load time.
pub mod defaults {
    pub const MAX_DESTS: u32 = 65_536;
    pub const MAX_SERVICES: u32 = 1_024;
    pub const MAX_SERVICE_ENDPOINTS: u32 = 16_384;
    pub const MAX_LISTENERS: u32 = 16_384;
    pub const MAX_HIST_BUCKETS: u32 = 262_144;
    pub const MAX_CONNS: u32 = 262_144;
    /// Destination breakers (destination granularity), across services.
    pub const MAX_DEST_BREAKERS: u32 = 16_384;
    /// Protected destinations (`[breaker] protected` and the agent's own addresses).
    pub const MAX_PROTECTED: u32 = 1_024;
}

/// Byte offsets into kernel structs, resolved from `/sys/kernel/btf/vmlinux` by the loader
/// (aya's Rust programs get no CO-RE field relocations). `ready` is 1 once filled in; the
/// programs count `NO_OFFSETS` and let everything pass while it is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `struct net` -> `ns.inum`: the namespace's inode number, as in `/proc/PID/ns/net`.
    pub net_inum: u32,
    pub sk_protocol: u32,
    pub sk_err: u32,
    /// `sock_common.skc_nulls_node.pprev`: NULL once the socket left the established hash
    /// (a timewait socket took its place).
    pub skc_node_pprev: u32,
    /// `struct tcp_sock` fields read when a connection leaves ESTABLISHED.
    pub tcp_srtt_us: u32,
    pub tcp_bytes_acked: u32,
    pub tcp_bytes_received: u32,
    /// `tcp_sock.tcp_mstamp`: the kernel's cached clock (µs), refreshed when a segment is sent
    /// or received, so a send and the data that answers it are timed with no clock read.
    pub tcp_mstamp: u32,
    pub ready: u32,
}

impl Offsets {
    pub const ZERO: Self = Self {
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_state: 0,
        skc_net: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        net_inum: 0,
        sk_protocol: 0,
        sk_err: 0,
        skc_node_pprev: 0,
        tcp_srtt_us: 0,
        tcp_bytes_acked: 0,
        tcp_bytes_received: 0,
        tcp_mstamp: 0,
        ready: 0,
    };
}

/// Key of `BW_DESTS`. Addresses are IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), so one key
/// type serves both families; ports are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestKey {
    pub addr: [u8; 16],
    /// Network namespace inode: 127.0.0.1 in two namespaces is two places.
    pub netns: u32,
    pub port: u16,
    pub direction: u8,
    pub _pad: u8,
}

/// Connection aggregates, kept per destination and per service.
///
/// `active` = sockets in ESTABLISHED now; `opened` = connections that reached ESTABLISHED;
/// `closed` = established connections that left ESTABLISHED. So `active = seeded + opened - closed`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub active: u64,
    pub opened: u64,
    pub closed: u64,
    pub failed_refused: u64,
    pub failed_timeout: u64,
    pub failed_other: u64,
    /// Connections that entered TIME_WAIT (this side closed first).
    pub time_wait_entered: u64,
    /// Segments retransmitted (SYNs included).
    pub retransmits: u64,
    /// Payload bytes acknowledged by the peer / received, over connections that have closed.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A tracked connection as the programs build it (from its `ConnState` and the socket) and
/// `bw_list_tcp` writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when first seen.
    pub start_ns: u64,
    pub cgroup_id: u64,
    pub netns: u32,
    /// Thread-group id of the process that connected (outbound) or listens (inbound); 0 when
    /// unknown (the socket or its listener predates the agent).
    pub pid: u32,
    pub sport: u16,
    pub dport: u16,
    /// Service id at the time the connection was counted; 0 = none.
    pub svc: u32,
    pub comm: [u8; 16],
    pub state: u8,
    pub direction: u8,
    pub flags: u8,
    pub _pad: u8,
    /// First-response samples not yet added to the histograms (a client's `RequestTiming`):
    /// `fr_count[i]` of them in bucket `fr_bucket[i]`. The smallest run is added when a sample
    /// falls in none of these buckets, all of them when the connection closes; readers add those
    /// of live connections themselves.
    pub fr_bucket: [u8; FR_RUNS],
    pub fr_count: [u32; FR_RUNS],
    /// `RequestTiming::send_us`.
    pub send_us: u64,
}

impl ConnInfo {
    /// The key its aggregates are kept under: see [`DestKey::of`].
    #[inline(always)]
    pub fn dest_key(&self) -> DestKey {
        DestKey::of(
            self.direction,
            (self.saddr, self.sport),
            (self.daddr, self.dport),
            self.netns,
        )
    }
}

impl SockRecord {
    /// The key a connection on this socket is counted under, in `direction`.
    #[inline(always)]
    pub fn dest_key(&self, direction: u8) -> DestKey {
        DestKey::of(
            direction,
            (self.saddr, self.sport),
            (self.daddr, self.dport),
            self.netns,
        )
    }
}

impl DestKey {
    /// A connection's aggregate key: the remote end for outbound, the local end for inbound.
    #[inline(always)]
    pub fn of(direction: u8, local: ([u8; 16], u16), remote: ([u8; 16], u16), netns: u32) -> Self {
        let (addr, port) = if direction == direction::OUTBOUND {
            remote
        } else {
            local
        };
        DestKey {
            addr,
            netns,
            port,
            direction,
            _pad: 0,
        }
    }
}

/// How many buckets of first-response samples a connection keeps before adding them to the maps:
/// enough for the two octaves (8 buckets) a steady stream's latencies usually spread over.
pub const FR_RUNS: usize = 8;
/// The most samples of one bucket a connection keeps before adding them to the maps.
pub const FR_RUN_MAX: u32 = 1 << 20;

/// What is kept of a tracked connection (`BW_CONNS`); the rest is read from the socket, and an
/// inbound connection's process from its listener, when needed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// `bpf_ktime_get_ns()` when `connect()` sent the SYN, or when it was accepted (or seeded).
    pub start_ns: u64,
    /// The connecting process (outbound; 0 when unknown): its cgroup, name and thread group.
    pub cgroup_id: u64,
    pub comm: [u8; 16],
    pub pid: u32,
    /// Service id of the remote (outbound) or local (inbound) endpoint; 0 = none.
    pub svc: u32,
    /// The local port once known: by the time the socket reaches CLOSE the kernel has released
    /// it (`inet_put_port` zeroes `skc_num` before the state change is traced).
    pub port: u16,
    pub direction: u8,
    /// `conn_flags`.
    pub flags: u8,
    /// When the agent's sweep (`bw_stamp_tcp`) last found the socket alive, in seconds of
    /// `bpf_ktime_get_ns()`; 0 = not yet.
    pub seen_s: u32,
}

/// Value of `BW_SOCKS`: request -> first-response timing of a client connection, the only
/// per-send/per-receive state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestTiming {
    /// When the request now awaiting its response was sent (`timing_flags::AWAITING`):
    /// `CLOCK_MONOTONIC` in microseconds, the clock of `tcp_sock.tcp_mstamp` that the response
    /// is read from.
    pub send_us: u64,
    /// First-response samples not yet added to the histograms, as in [`ConnInfo::fr_count`].
    pub fr_count: [u32; FR_RUNS],
    /// The connection's service id, for its histograms.
    pub svc: u32,
    pub fr_bucket: [u8; FR_RUNS],
    /// `timing_flags`.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// What `bw_list_tcp` writes per socket: the cookie, the storage, and the live TCP state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    pub cookie: u64,
    pub info: ConnInfo,
    pub state: u64,
}

/// What `bw_socks_tcp` writes per socket of any state (listeners and TIME_WAIT included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub netns: u32,
    pub sport: u16,
    pub dport: u16,
    pub state: u8,
    pub _pad: [u8; 7],
}

/// Kinds of [`ConnEvent`].
pub mod conn_event {
    pub const OPENED: u8 = 1;
    pub const CLOSED: u8 = 2;
    pub const FAILED: u8 = 3;
    pub const REJECTED: u8 = 4;
}

/// Why a connect failed ([`ConnEvent::reason`] of a `FAILED` event).
pub mod fail_reason {
    pub const REFUSED: u8 = 1;
    pub const TIMEOUT: u8 = 2;
    pub const OTHER: u8 = 3;
}

/// One connection event of the audit stream (`BW_CONN_EVENTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    /// CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    pub cgroup_id: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// closed: lifetime; opened outbound: connect time.
    pub duration_us: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; 16],
    pub netns: u32,
    pub pid: u32,
    /// Service id; 0 = none.
    pub svc: u32,
    /// rejected: the errno the caller got.
    pub errno: u32,
    pub sport: u16,
    pub dport: u16,
    /// [`conn_event`]
    pub kind: u8,
    /// failed: [`fail_reason`]
    pub reason: u8,
    pub direction: u8,
    pub _pad: u8,
}

/// What `bw_breaker_tcp` writes per socket the breaker's gate admitted to a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerSockRecord {
    pub sock: SockRecord,
    pub svc: u32,
    pub _pad: u32,
}

/// Data part of a `BW_SVC_LPM` key: the port (big endian) first, then the address, so that a
/// prefix length of `16 + n` matches the port exactly and the first `n` address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcLpmData {
    pub port_be: [u8; 2],
    pub addr: [u8; 16],
}

/// Bits of the port part of an LPM key.
pub const SVC_LPM_PORT_BITS: u32 = 16;

/// Key of `BW_LISTENERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `BW_LISTENERS`. Zero pid for listeners that existed before the agent started.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerInfo {
    pub cgroup_id: u64,
    pub pid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}

/// Latency histograms: what is measured.
pub mod hist_kind {
    /// SYN sent -> ESTABLISHED, on outbound connections.
    pub const CONNECT: u32 = 0;
    /// A send on an outbound connection -> the first data that arrives after it.
    pub const FIRST_RESPONSE: u32 = 1;
    /// Smoothed RTT of an outbound connection when it leaves ESTABLISHED.
    pub const SRTT: u32 = 2;
    /// How long a connection stayed ESTABLISHED (from connect or accept); per destination in
    /// both directions, per service for outbound connections.
    pub const LIFETIME: u32 = 3;
    pub const COUNT: u32 = 4;
    pub const NAMES: [&str; COUNT as usize] = ["connect", "first_response", "srtt", "lifetime"];
}

/// Buckets per histogram: log2 of the value in microseconds with 4 sub-buckets each, so a bucket
/// is at most 25% wide; the last bucket holds everything from about 2.4 hours up.
pub const HIST_BUCKETS: u32 = 128;

/// Bucket of a value in microseconds: 0..=3 exactly, then 4 buckets per power of two.
#[inline(always)]
pub const fn hist_bucket(us: u64) -> u32 {
    if us < 4 {
        return us as u32;
    }
    let major = 63 - us.leading_zeros();
    let sub = ((us >> (major - 2)) & 3) as u32;
    let idx = 4 * (major - 1) + sub;
    if idx >= HIST_BUCKETS {
        HIST_BUCKETS - 1
    } else {
        idx
    }
}

/// Smallest value (µs) that falls in bucket `idx`; the bucket ends where `idx + 1` begins.
pub const fn hist_bucket_low(idx: u32) -> u64 {
    if idx < 4 {
        return idx as u64;
    }
    let major = idx / 4 + 1;
    let sub = (idx % 4) as u64;
    (4 + sub) << (major - 2)
}

/// Key of `BW_DEST_HIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HistKey {
    pub dest: DestKey,
    pub kind: u32,
    pub bucket: u32,
}

/// Index of one bucket of a service's histogram in `BW_SVC_HIST`.
pub const fn svc_hist_index(svc: u32, kind: u32, bucket: u32) -> u32 {
    (svc * hist_kind::COUNT + kind) * HIST_BUCKETS + bucket
}

/// Index of a service's stats for one direction in `BW_SVC_STATS`.
pub const fn svc_stats_index(svc: u32, direction: u8) -> u32 {
    svc * 2 + direction as u32
}

/// IPv4-mapped IPv6 form of an IPv4 address.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

const _: () = {
    assert!(core::mem::size_of::<Offsets>() == 72);
    assert!(core::mem::size_of::<DestKey>() == 24);
    assert!(core::mem::size_of::<ConnStats>() == 80);
    assert!(core::mem::size_of::<ConnInfo>() == 136);
    assert!(core::mem::size_of::<ConnRecord>() == 152);
    assert!(core::mem::size_of::<SockRecord>() == 48);
    assert!(core::mem::size_of::<HistKey>() == 32);
    assert!(core::mem::size_of::<SvcLpmData>() == 18);
    assert!(core::mem::size_of::<ListenKey>() == 8);
    assert!(core::mem::size_of::<ListenerInfo>() == 32);
    assert!(core::mem::size_of::<ConnState>() == 48);
    assert!(core::mem::size_of::<RequestTiming>() == 56);
    assert!(core::mem::size_of::<BreakerSockRecord>() == 56);
    assert!(core::mem::size_of::<ConnEvent>() == 112);
};

#[cfg(feature = "user")]
#[expect(
    clippy::undocumented_unsafe_blocks,
    reason = "the one SAFETY note covers every impl"
)]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::ConnStats {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::SockRecord {}
    unsafe impl aya::Pod for super::HistKey {}
    unsafe impl aya::Pod for super::SvcLpmData {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::ListenerInfo {}
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::RequestTiming {}
    unsafe impl aya::Pod for super::BreakerSockRecord {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::breaker::Policy {}
    unsafe impl aya::Pod for super::breaker::BreakerEntry {}
    unsafe impl aya::Pod for super::breaker::Totals {}
    unsafe impl aya::Pod for super::breaker::BreakerSock {}
    unsafe impl aya::Pod for super::breaker::Event {}
    unsafe impl aya::Pod for super::breaker::SvcMeta {}
    unsafe impl aya::Pod for super::breaker::DestBreakerKey {}
    unsafe impl aya::Pod for super::breaker::DestBreaker {}
    unsafe impl aya::Pod for super::breaker::DestPolicy {}
    unsafe impl aya::Pod for super::breaker::MoreTotals {}
    unsafe impl aya::Pod for super::breaker::DestCommand {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_at_most_a_quarter_wide() {
        for v in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            9,
            15,
            16,
            1000,
            1_000_000,
            123_456_789,
        ] {
            let b = hist_bucket(v);
            assert!(hist_bucket_low(b) <= v, "{v} below its bucket {b}");
            assert!(v < hist_bucket_low(b + 1), "{v} beyond its bucket {b}");
        }
        for b in 0..HIST_BUCKETS - 1 {
            assert_eq!(hist_bucket(hist_bucket_low(b)), b);
            let (lo, hi) = (hist_bucket_low(b), hist_bucket_low(b + 1));
            assert!(hi > lo);
            if lo >= 4 {
                assert!(
                    (hi - lo) * 4 <= lo,
                    "bucket {b} [{lo}, {hi}) is wider than 25%"
                );
            }
        }
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
    }
}
