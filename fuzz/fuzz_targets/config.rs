//! `/etc/strata/snapshotter.toml`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_snapshotter::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = toml::from_str::<Config>(text);
    }
});
