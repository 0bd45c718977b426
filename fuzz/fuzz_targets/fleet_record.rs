//! The fleet's records in etcd, as the agents and `breakwater fleet` read them: a key under the
//! prefix (`P/services/NAME`, `P/policies/NAME`, `P/trips/NAME[/IP:PORT]`, `P/nodes/NODE`,
//! `P/breakers/NODE/NAME`, `P/autotrips/NAME/NODE`) and its JSON value. A record that passes
//! `Record::parse` writes back to JSON that parses to the same record, and its selector can
//! be applied.
//!
//! Input: a byte choosing the kind, the key's bytes up to a NUL, then the value.
#![no_main]

use std::collections::BTreeMap;

use breakwater::fleet::schema::{
    AutoTripRecord, BreakerRecord, Keys, Kind, NodeRecord, Record, DEFAULT_PREFIX,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = match rest.iter().position(|&c| c == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    let keys = Keys::new(DEFAULT_PREFIX).expect("the default prefix");
    let _ = Keys::new(key);
    let node_labels: BTreeMap<String, String> = [("zone".to_owned(), "a".to_owned())].into();
    match which % 4 {
        // A desired-state record: the key names its kind and object, or the byte does.
        0 => {
            let (kind, name) = keys.parse(key).unwrap_or_else(|| {
                let kind = Kind::ALL[usize::from(which / 4) % Kind::ALL.len()];
                (kind, key)
            });
            if let Ok(record) = Record::parse(kind, name, value) {
                let json = record.to_json();
                let again = Record::parse(kind, name, json.as_bytes())
                    .unwrap_or_else(|e| panic!("{json} does not read back: {e}"));
                assert_eq!(again, record, "{json}");
                let _ = record.selector().selects("node1", &node_labels);
            }
        }
        1 => {
            if let Some(node) = keys.parse_node(key) {
                let _ = node.len();
            }
            if let Ok(r) = serde_json::from_slice::<NodeRecord>(value) {
                let json = serde_json::to_vec(&r).expect("serializes");
                assert_eq!(serde_json::from_slice::<NodeRecord>(&json).ok(), Some(r));
            }
        }
        2 => {
            let _ = keys.parse_breaker(key);
            if let Ok(r) = serde_json::from_slice::<BreakerRecord>(value) {
                let json = serde_json::to_vec(&r).expect("serializes");
                assert_eq!(serde_json::from_slice::<BreakerRecord>(&json).ok(), Some(r));
            }
        }
        _ => {
            let _ = keys.parse_autotrip(key);
            if let Ok(r) = serde_json::from_slice::<AutoTripRecord>(value) {
                let json = serde_json::to_vec(&r).expect("serializes");
                assert_eq!(
                    serde_json::from_slice::<AutoTripRecord>(&json).ok(),
                    Some(r)
                );
            }
        }
    }
});
