//! Durations as people write them (`30s`, `500ms`, `2m`, `1h 30m`): the policy fields, the
//! trip's `--for`, the quorum window. What parses is within the limit and reads back the same
//! from the form the agent prints it in (`humantime::format_duration`, in its tables and
//! messages); a trip's TTL in milliseconds is checked the same way.
#![no_main]

use breakwater::core::policy::{parse_duration, trip_ttl, MAX_DURATION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(ms) = data.get(..8) {
        let ms = u64::from_le_bytes(ms.try_into().expect("8 bytes"));
        if let Ok(Some(d)) = trip_ttl(Some(ms)) {
            assert!(d <= MAX_DURATION && !d.is_zero(), "{ms} ms");
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = parse_duration("interval", text) {
        assert!(d <= MAX_DURATION, "{text:?} is {d:?}");
        let shown = humantime::format_duration(d).to_string();
        assert_eq!(
            parse_duration("interval", &shown).ok(),
            Some(d),
            "{text:?} -> {shown:?}"
        );
    }
});
