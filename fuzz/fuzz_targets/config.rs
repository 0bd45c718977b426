//! The TOML config file as `breakwater agent --config` and a reload read it: any text either
//! is refused with a reason or gives a config whose every derived value (services, policies,
//! quorums, features, protected destinations, socket mode) can be computed.
#![no_main]

use breakwater::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    // `from_toml` validated it: what the agent derives from it at start must not fail.
    config
        .validate()
        .expect("a config that loaded validates again");
    let table = config.service_table().expect("services were validated");
    assert_eq!(table.iter().count(), config.services.len());
    config.policies().expect("policies were validated");
    config.quorums().expect("quorums were validated");
    config.features.disabled().expect("features were validated");
    config.breaker.protected().expect("protected was validated");
    let _ = config.agent.socket_mode();
});
