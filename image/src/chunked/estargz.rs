//! Reading eStargz, the gzip lazy-pull format of stargz-snapshotter: a `tar+gzip` layer whose
//! regular files' contents (or their chunks) each start a gzip member, with the TOC — the same
//! CRFS JSON as zstd:chunked's — as the last tar entry `stargz.index.json` in a member of its
//! own, and a 51-byte footer: an empty gzip member whose extra field holds the TOC's offset.
//! The descriptor annotation `containerd.io/snapshot/stargz/toc.digest` is the sha256 of the
//! TOC JSON, which is how the TOC is verified.

use std::collections::BTreeMap;
use std::io::Read;

use super::toc::{parse_toc, verify_toc, Fetch, Toc, MAX_TOC};
use super::ChunkedError;

pub const ANNOTATION_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The size of the layer's tar, which a puller may use to size its work.
pub const ANNOTATION_UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
pub const FOOTER_SIZE: u64 = 51;
pub const TOC_NAME: &str = "stargz.index.json";
/// Marker files of the prefetch area: part of the format, not of the image.
const LANDMARKS: [&str; 2] = [".prefetch.landmark", ".no.prefetch.landmark"];

/// Whether a layer descriptor is eStargz: it carries the TOC digest annotation and not the
/// zstd:chunked ones (stargz-snapshotter's zstd:chunked layers carry both).
pub fn is_estargz(a: &BTreeMap<String, String>) -> bool {
    a.contains_key(ANNOTATION_TOC_DIGEST) && !super::read::is_chunked(a)
}

/// The landmark entry (a tar header, its one byte 0xf, padding): `.prefetch.landmark` where the
/// files to prefetch end, or `.no.prefetch.landmark` first when there are none.
pub fn landmark(prefetch: bool) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(LANDMARKS[usize::from(!prefetch)])
        .expect("a short name");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut entry = h.as_bytes().to_vec();
    entry.push(0xf);
    entry.resize(1024, 0);
    entry
}

/// The footer for a TOC member at `at`: an empty gzip member whose extra field `SG` holds the
/// offset in 16 hex digits and `STARGZ` (as Go's gzip writes it: 51 bytes).
pub fn footer(at: u64) -> Vec<u8> {
    let mut f = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    f.extend_from_slice(format!("{at:016x}STARGZ").as_bytes());
    // An empty final stored block, then CRC-32 and size, both 0.
    f.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    f.extend_from_slice(&[0; 8]);
    f
}

/// The TOC's offset from the footer.
pub fn parse_footer(footer: &[u8]) -> Result<u64, ChunkedError> {
    let bad = |why: &str| {
        ChunkedError::Format(format!(
            "eStargz footer: {why}; the layer is truncated or not eStargz"
        ))
    };
    if footer.len() != FOOTER_SIZE as usize {
        return Err(bad("shorter than 51 bytes"));
    }
    // gzip magic, deflate, FEXTRA; XLEN 26 holding one subfield `SG` of 22 bytes.
    if footer[..3] != [0x1f, 0x8b, 8] || footer[3] & 4 == 0 {
        return Err(bad("not a gzip header with an extra field"));
    }
    if footer[10..16] != [26, 0, b'S', b'G', 22, 0] || &footer[32..38] != b"STARGZ" {
        return Err(bad("no SG extra field ending in STARGZ"));
    }
    std::str::from_utf8(&footer[16..32])
        .ok()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| bad("the TOC offset is not 16 hex digits"))
}

/// Fetches the TOC of a blob of `blob_size` bytes, verifies it against the annotation (refused
/// without one unless `allow_unverified`) and checks it.
pub fn read_toc(
    annotations: &BTreeMap<String, String>,
    blob_size: u64,
    fetch: &Fetch,
    allow_unverified: bool,
) -> Result<Toc, ChunkedError> {
    if blob_size < FOOTER_SIZE {
        return Err(ChunkedError::Format(
            "the blob is shorter than an eStargz footer".into(),
        ));
    }
    let footer_at = blob_size - FOOTER_SIZE;
    let footer = fetch(footer_at, blob_size).map_err(ChunkedError::io("fetch the footer"))?;
    let toc_at = parse_footer(&footer)?;
    if toc_at >= footer_at {
        return Err(ChunkedError::Format(format!(
            "eStargz footer: the TOC offset {toc_at} is past the {blob_size}-byte blob"
        )));
    }
    let member = fetch(toc_at, footer_at).map_err(ChunkedError::io("fetch the TOC"))?;
    let json = toc_json(&member)?;
    verify_toc(
        &json,
        annotations.get(ANNOTATION_TOC_DIGEST).map(String::as_str),
        ANNOTATION_TOC_DIGEST,
        allow_unverified,
    )?;
    let mut toc = parse_toc(&json)?;
    // Content ends where the TOC's member begins.
    toc.fill_end_offsets(toc_at);
    toc.check(blob_size, toc_at)?;
    Ok(toc)
}

/// Drops the landmark entries from a lazy layer's TOC, as stargz-snapshotter does, keeping where
/// the prefetch area ends. eStargz has them; so do stargz-snapshotter's zstd:chunked layers and
/// Strata's zstd:chunked layers written with a prefetch list.
pub fn hide_landmarks(toc: &mut Toc) {
    let landmark = |e: &super::toc::Entry| {
        e.kind == "reg" && LANDMARKS.contains(&super::toc::clean(&e.name).as_str())
    };
    toc.prefetch_end = toc
        .entries
        .iter()
        .find(|e| landmark(e) && super::toc::clean(&e.name) == LANDMARKS[0])
        .map(|e| e.offset);
    toc.entries.retain(|e| !landmark(e));
}

/// The JSON of `stargz.index.json`, the one tar entry in the gzip member `member`.
fn toc_json(member: &[u8]) -> Result<Vec<u8>, ChunkedError> {
    let bad = |why: String| ChunkedError::Format(format!("eStargz TOC: {why}"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(member));
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("not a gzip'd tar: {e}")))?;
    let mut entry = entries
        .next()
        .ok_or_else(|| bad("no tar entry".into()))?
        .map_err(|e| bad(format!("not a gzip'd tar: {e}")))?;
    let name = entry.path_bytes().into_owned();
    if name != TOC_NAME.as_bytes() {
        return Err(bad(format!(
            "the entry is {:?}, not {TOC_NAME}",
            String::from_utf8_lossy(&name)
        )));
    }
    if entry.size() > MAX_TOC {
        return Err(bad(format!("{} bytes is too large", entry.size())));
    }
    let mut json = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("truncated: {e}")))?;
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    fn header(name: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.resize(data.len().div_ceil(512) * 512, 0);
        v
    }

    /// A blob as the format lays it out: a member of the first header, a member holding "a"'s
    /// payload, "b"'s header and payload (b at an inner offset), the landmark, then the TOC's
    /// member and the footer. Returns the blob and its annotations.
    fn blob() -> (Vec<u8>, BTreeMap<String, String>) {
        let sha = |b: &[u8]| crate::content::Digest::of(b).to_string();
        let mut blob = gzip(&header("a", 5));
        let a_at = blob.len();
        let shared = [padded(b"hello"), header("b", 3), padded(b"xyz")].concat();
        blob.extend(gzip(&[shared, header(".no.prefetch.landmark", 1)].concat()));
        let l_at = blob.len();
        blob.extend(gzip(&padded(&[0xf])));
        let toc_at = blob.len();
        let entry = |name: &str, at: usize, inner: u64, data: &[u8]| {
            serde_json::json!({"name": name, "type": "reg", "size": data.len(), "mode": 0o100644,
                "offset": at, "innerOffset": inner, "digest": sha(data), "chunkDigest": sha(data)})
        };
        let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": [
            entry("a", a_at, 0, b"hello"),
            entry("b", a_at, 1024, b"xyz"),
            entry(".no.prefetch.landmark", l_at, 0, &[0xf]),
        ]}))
        .unwrap();
        let toc = [
            header(TOC_NAME, json.len() as u64),
            padded(&json),
            vec![0; 1024],
        ]
        .concat();
        blob.extend(gzip(&toc));
        blob.extend(footer(toc_at as u64));
        let a = BTreeMap::from([(ANNOTATION_TOC_DIGEST.to_string(), sha(&json))]);
        (blob, a)
    }

    #[test]
    fn reads_verified_toc_and_chunks_of_shared_members() {
        use super::super::lazy::read_toc;
        use super::super::read::read_chunk;
        use super::super::Codec;
        let (blob, a) = blob();
        // Still one valid gzip stream of a tar.
        let mut whole = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut whole)
            .unwrap();
        assert_eq!(&whole[512..517], b"hello");
        let fetch = |s: u64, e: u64| Ok(blob[s as usize..e as usize].to_vec());
        let toc = read_toc(&a, blob.len() as u64, &fetch, false).unwrap();
        let names: Vec<&str> = toc.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "the landmark is hidden");
        assert_eq!(super::super::lazy::codec(&a), Codec::Gzip);
        let chunks = toc.chunks();
        let read = |i: usize| read_chunk(&chunks[&i][0], Codec::Gzip, &fetch).unwrap();
        assert_eq!((read(0), read(1)), (b"hello".to_vec(), b"xyz".to_vec()));

        // Another digest annotation, or none: refused; a flipped TOC byte: refused.
        let other = BTreeMap::from([(
            ANNOTATION_TOC_DIGEST.to_string(),
            format!("sha256:{}", "0".repeat(64)),
        )]);
        let err = read_toc(&other, blob.len() as u64, &fetch, false).unwrap_err();
        assert!(matches!(err, ChunkedError::TocDigest { .. }), "{err}");
        assert!(estargz_toc(&BTreeMap::new(), &blob, false).is_err());
        assert!(estargz_toc(&BTreeMap::new(), &blob, true).is_ok());
        let mut bad = blob.clone();
        let toc_at = parse_footer(&blob[blob.len() - 51..]).unwrap() as usize;
        bad[toc_at + 30] ^= 0x40;
        assert!(estargz_toc(&a, &bad, false).is_err());
        // Truncated: no footer.
        assert!(estargz_toc(&a, &blob[..blob.len() - 7], false).is_err());
    }

    fn estargz_toc(
        a: &BTreeMap<String, String>,
        blob: &[u8],
        allow: bool,
    ) -> Result<Toc, ChunkedError> {
        let fetch = |s: u64, e: u64| Ok(blob[s as usize..e as usize].to_vec());
        read_toc(a, blob.len() as u64, &fetch, allow)
    }

    #[test]
    fn footer_offsets_and_bad_footers() {
        assert_eq!(footer(0x1234).len(), 51);
        assert_eq!(parse_footer(&footer(0x1234)).unwrap(), 0x1234);
        assert!(parse_footer(&footer(1)[..50]).is_err());
        let mut f = footer(1);
        f[33] = b'X';
        assert!(parse_footer(&f).is_err());
        let mut f = footer(1);
        f[16] = b'g';
        assert!(parse_footer(&f).is_err());
    }
}
