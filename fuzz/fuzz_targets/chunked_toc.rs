//! zstd:chunked footer + TOC as read from a registry blob (the input is the whole blob).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strata_image::chunked::lazy::read_toc;
use strata_image::chunked::read::parse_footer;

fuzz_target!(|blob: &[u8]| {
    let _ = parse_footer(blob);
    let fetch = |from: u64, to: u64| -> std::io::Result<Vec<u8>> {
        let (from, to) = (from as usize, to as usize);
        blob.get(from..to)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::Error::other("range past the blob"))
    };
    if let Ok(toc) = read_toc(&BTreeMap::new(), blob.len() as u64, &fetch, true) {
        let _ = toc.chunks();
    }
});
