//! eStargz footer + TOC (gzip members, `stargz.index.json`) as read from a registry blob.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strata_image::chunked::estargz::{parse_footer, read_toc};

fuzz_target!(|blob: &[u8]| {
    let _ = parse_footer(blob);
    let fetch = |from: u64, to: u64| -> std::io::Result<Vec<u8>> {
        blob.get(from as usize..to as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::Error::other("range past the blob"))
    };
    if let Ok(toc) = read_toc(&BTreeMap::new(), blob.len() as u64, &fetch, true) {
        let _ = toc.chunks();
    }
});
