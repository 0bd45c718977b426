//! The pinned state a previous agent left in its pin directory, as the agent reads it back at
//! start: the layout stamp (`BW_LAYOUT`), the services (`BW_SVC_LPM` keys and `BW_SVC_META`
//! entries), and a breaker (`BW_POLICIES`, `BW_BREAKERS`, `BW_BRK_TOTALS`, ...) as the API shows
//! it. The maps' raw bytes come from the input, as an older or damaged agent may have left
//! them: every value is read into something the agent can show and manage, without panic.
//!
//! Input: a byte saying which stamp entries read, the two `u32` stamp entries, a count of
//! LPM entries (prefix length `u32`, key data, service id `u32`), a count of meta entries
//! (service id `u32`, `SvcMeta`), then `Policy`, `BreakerEntry`, `Totals`, `DestPolicy`,
//! `MoreTotals` and the clock; missing bytes are zero.
#![no_main]

use std::{collections::BTreeMap, mem::size_of};

use breakwater::{
    api::convert::breaker_message,
    core::{
        breakers::BreakerView,
        owners::Owner,
        policy::Rules,
        service::{Endpoint, ServiceTable},
    },
    ebpf::breaker::{pinned_services, read_stamp, Layout},
};
use breakwater_common::{
    breaker::{BreakerEntry, DestPolicy, MoreTotals, Policy, SvcMeta, Totals},
    layout, SvcLpmData,
};
use libfuzzer_sys::fuzz_target;

/// The input, read front to back; past its end every byte is zero.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// A map value as the kernel hands it over: its bytes, whatever they are.
    fn pod<T: aya::Pod>(&mut self) -> T {
        let mut buf = vec![0u8; size_of::<T>()];
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        // SAFETY: `T: Pod` (plain integers and arrays, explicit padding): every bit pattern is
        // a value; `buf` holds `size_of::<T>()` bytes; the read is unaligned.
        unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) }
    }
}

/// The longest prefix a `BW_SVC_LPM` key can have: the kernel refuses longer ones.
const MAX_PREFIX: u32 = 8 * size_of::<SvcLpmData>() as u32;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);

    // The layout stamp.
    let readable = b.u8();
    let (magic, version) = (b.u32(), b.u32());
    let magic = (readable & 1 != 0).then_some(magic);
    let version = (readable & 2 != 0).then_some(version);
    match read_stamp(magic, version) {
        Ok(Layout::Current) => {
            assert_eq!(
                (magic, version),
                (Some(layout::MAGIC), Some(layout::VERSION))
            )
        }
        Ok(Layout::Older(v)) => assert!(v < layout::VERSION && magic == Some(layout::MAGIC)),
        Ok(other) => panic!("a stamp read as {other:?}"),
        Err(_) => assert!(magic != Some(layout::MAGIC) || version != Some(layout::VERSION)),
    }

    // The services.
    let keys: Vec<(u32, SvcLpmData, u32)> = (0..b.u8() % 32)
        .map(|_| (b.u32(), b.pod::<SvcLpmData>(), b.u32()))
        .collect();
    let metas: BTreeMap<u32, SvcMeta> = (0..b.u8() % 8).map(|_| (b.u32(), b.pod())).collect();
    let services = pinned_services(keys.iter().copied(), |id| metas.get(&id).copied());
    let mut table = ServiceTable::new(1024, 16384);
    for (id, name, endpoints) in &services {
        for e in endpoints {
            // The key the agent would write (or remove) for it is the key it read.
            let (len, data) = e.lpm_key();
            assert_eq!(Endpoint::from_lpm_key(len, &data), Some(*e), "{e:?}");
            // ... one the kernel holds as the same key as one it was read from (the trie
            // compares the first `len` bits).
            assert!(
                keys.iter().any(|(l, d, i)| i == id
                    && *l == len
                    && *l <= MAX_PREFIX
                    && Endpoint::from_lpm_key(*l, d) == Some(*e)),
                "{e} is not a key it was read from"
            );
            // What `services` prints, and `service put` or the config would give back. Port 0
            // no call can name: such a key is still read, so that the next `service put` of
            // the service removes it.
            let shown = e.to_string();
            if e.port != 0 {
                assert_eq!(shown.parse::<Endpoint>().ok(), Some(*e), "{shown}");
            }
        }
        table.restore(*id, name, endpoints.clone());
    }
    for code in [b.u8(), b.u8(), b.u8()] {
        let _ = Owner::from_code(code).name();
    }
    // A new service after the pinned ones: a fresh id, or a clear refusal.
    let _ = table.put("new", vec!["10.0.0.1:80".parse().expect("an endpoint")]);

    // A breaker, as `breakers` shows it.
    let policy: Policy = b.pod();
    let entry: BreakerEntry = b.pod();
    let totals: Totals = b.pod();
    let dest: DestPolicy = b.pod();
    let more_totals: MoreTotals = b.pod();
    let now = b.u64();
    let rules = Rules::from(policy);
    let _ = rules.per_destination();
    let counts = entry.counts.effective(&policy, now);
    let view = BreakerView {
        service: "svc".into(),
        policy,
        counts,
        totals,
        reason: String::new(),
        open_remaining_ms: counts.open_remaining_ms(now),
        policy_owner: Owner::default(),
        tripped_by: None,
        quorum: None,
        dest,
        more_totals,
        destinations: Vec::new(),
        protected: Vec::new(),
    };
    let _ = breaker_message(&view);
});
