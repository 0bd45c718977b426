//! Endpoints (`IP:port`, `CIDR:port`, `[IPv6]:port`, `[CIDR6]:port`) and the other address
//! forms of the API and the CLI: a destination (`IP:PORT`), a listener (`HOST:PORT`), a
//! latency target, a trip's name. What parses prints back to the same value, and goes to its
//! kernel key and back.
#![no_main]

use breakwater::core::{aggregate::LatencyOf, service::Endpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(e) = text.parse::<Endpoint>() {
        let shown = e.to_string();
        let again: Endpoint = shown
            .parse()
            .unwrap_or_else(|err| panic!("{text:?} parsed, its display {shown:?} does not: {err}"));
        assert_eq!(again, e, "{text:?} -> {shown:?}");
        let (len, data) = e.lpm_key();
        assert_eq!(Endpoint::from_lpm_key(len, &data), Some(e), "{text:?}");
    }
    // A list, as `service put` and the config give it.
    let list: Vec<&str> = text.split(',').collect();
    let _ = breakwater::core::service::parse_endpoints("svc", &list);
    let _ = breakwater::core::service::validate_name(text);
    if let Ok(d) = breakwater::api::convert::destination_field(text) {
        if let Some(d) = d {
            assert_eq!(
                breakwater::api::convert::destination_field(&d.to_string()).ok(),
                Some(Some(d))
            );
        }
    }
    let _ = breakwater::config::check_host_port(text);
    let _ = LatencyOf::parse("", text, 0);
    let _ = breakwater::fleet::schema::trip_target(text);
    let _ = breakwater::fleet::schema::check_node_name(text);
});
