//! `.dockerignore` and COPY patterns: polynomial matching, no panic, for any pattern and path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_solver::pattern::{matches, Ignore};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (patterns, path) = text.split_once('\0').unwrap_or((&text, "a/b/c.txt"));
    let ignore = Ignore::parse(patterns);
    let _ = ignore.excludes(path);
    for p in patterns.lines().take(8) {
        let _ = matches(p, path);
    }
});
