//! A lazily pullable layer of either format (zstd:chunked or eStargz): telling them apart and
//! reading their TOC, whichever they are.

use std::collections::BTreeMap;

use super::toc::{Fetch, Toc};
use super::{estargz, read, ChunkedError, Codec};

/// Whether a descriptor is a layer that can be served lazily: zstd:chunked or eStargz.
pub fn is_lazy(a: &BTreeMap<String, String>) -> bool {
    read::is_chunked(a) || estargz::is_estargz(a)
}

/// Fetches, verifies and checks the TOC of a zstd:chunked or eStargz blob of `blob_size`
/// bytes. Without a checksum in the annotations the TOC cannot be verified: refused unless
/// `allow_unverified`.
pub fn read_toc(
    annotations: &BTreeMap<String, String>,
    blob_size: u64,
    fetch: &Fetch,
    allow_unverified: bool,
) -> Result<Toc, ChunkedError> {
    let mut toc = if estargz::is_estargz(annotations) {
        estargz::read_toc(annotations, blob_size, fetch, allow_unverified)?
    } else {
        read::read_chunked_toc(annotations, blob_size, fetch, allow_unverified)?
    };
    estargz::hide_landmarks(&mut toc);
    Ok(toc)
}

/// How the chunk frames of a lazy layer with these annotations are compressed.
pub fn codec(annotations: &BTreeMap<String, String>) -> Codec {
    if estargz::is_estargz(annotations) {
        Codec::Gzip
    } else {
        Codec::Zstd
    }
}
