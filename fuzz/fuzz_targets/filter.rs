//! containerd's filter syntax (`Walk` filters from any gRPC client).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_snapshotter::filter::Filter;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let filters: Vec<&str> = text.split('\n').take(4).collect();
    if let Ok(f) = Filter::parse_all(&filters) {
        let _ = f.matches(|path| match path.first().map(String::as_str) {
            Some("name") => Some("a/b".into()),
            Some("labels") => Some("x".into()),
            _ => None,
        });
    }
});
