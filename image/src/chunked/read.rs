//! Reading zstd:chunked: locating the TOC (from the descriptor's annotations, or from the footer
//! at the end of the blob), verifying it against the annotated checksum, and reading chunks,
//! each verified against its digest before a byte of it is used.

use std::collections::BTreeMap;

use super::toc::{parse_toc, verify_toc, Chunk, Fetch, Toc, MAX_TOC};
use super::{
    ChunkedError, Codec, Position, ANNOTATION_TOC_CHECKSUM, ANNOTATION_TOC_POSITION, FOOTER_MAGIC,
    FOOTER_SIZE, SKIPPABLE_MAGIC, TOC_TYPE_CRFS,
};
use crate::content::Digest;

/// Parses the 72-byte footer: the TOC's and the tar-split's positions.
pub fn parse_footer(footer: &[u8]) -> Result<(Position, Position), ChunkedError> {
    let bad = |why: &str| {
        ChunkedError::Format(format!(
            "footer: {why}; the layer is truncated or not zstd:chunked"
        ))
    };
    if footer.len() != FOOTER_SIZE {
        return Err(bad("shorter than 72 bytes"));
    }
    let magic = u32::from_le_bytes(footer[0..4].try_into().expect("4 bytes"));
    if magic & 0xFFFF_FFF0 != SKIPPABLE_MAGIC || footer[4..8] != 64u32.to_le_bytes() {
        return Err(bad("not a 64-byte skippable frame"));
    }
    if &footer[64..72] != FOOTER_MAGIC {
        return Err(bad("no GNUlInUx magic"));
    }
    let n =
        |i: usize| u64::from_le_bytes(footer[8 + i * 8..16 + i * 8].try_into().expect("8 bytes"));
    if n(3) != TOC_TYPE_CRFS {
        return Err(bad("unknown TOC type"));
    }
    Ok((
        Position {
            offset: n(0),
            compressed: n(1),
            uncompressed: n(2),
        },
        Position {
            offset: n(4),
            compressed: n(5),
            uncompressed: n(6),
        },
    ))
}

fn annotation<'a>(a: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    a.get(key)
        .or_else(|| a.get(&key.replace("io.github.containers.", "io.containers.")))
        .map(String::as_str)
}

/// The TOC position and checksum from a layer descriptor's annotations, when it has them.
pub fn from_annotations(
    a: &BTreeMap<String, String>,
) -> Result<Option<(Position, Option<String>)>, ChunkedError> {
    let Some(pos) = annotation(a, ANNOTATION_TOC_POSITION) else {
        return Ok(None);
    };
    let parts: Vec<u64> = pos
        .split(':')
        .map(|p| p.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ChunkedError::Format(format!(
                "manifest-position annotation {pos:?} is not offset:size:size:type"
            ))
        })?;
    match parts.as_slice() {
        [offset, compressed, uncompressed, kind] if *kind == TOC_TYPE_CRFS => Ok(Some((
            Position {
                offset: *offset,
                compressed: *compressed,
                uncompressed: *uncompressed,
            },
            annotation(a, ANNOTATION_TOC_CHECKSUM).map(str::to_string),
        ))),
        _ => Err(ChunkedError::Format(format!(
            "manifest-position annotation {pos:?} is not offset:size:size:1"
        ))),
    }
}

/// Whether a descriptor is a zstd:chunked layer (it carries the TOC annotations).
pub fn is_chunked_descriptor(d: &crate::oci::Descriptor) -> bool {
    is_chunked(&d.annotations)
}

/// Whether annotations are a zstd:chunked layer's (they carry the TOC position).
pub fn is_chunked(a: &BTreeMap<String, String>) -> bool {
    annotation(a, ANNOTATION_TOC_POSITION).is_some()
}

/// Fetches, verifies and checks the TOC of a zstd:chunked blob of `blob_size` bytes (see
/// [`super::lazy::read_toc`]).
pub fn read_chunked_toc(
    annotations: &BTreeMap<String, String>,
    blob_size: u64,
    fetch: &Fetch,
    allow_unverified: bool,
) -> Result<Toc, ChunkedError> {
    let (pos, checksum) = match from_annotations(annotations)? {
        Some(p) => p,
        None => {
            if blob_size < FOOTER_SIZE as u64 {
                return Err(ChunkedError::Format(
                    "the blob is shorter than a footer".into(),
                ));
            }
            let footer = fetch(blob_size - FOOTER_SIZE as u64, blob_size)
                .map_err(ChunkedError::io("fetch the footer"))?;
            (parse_footer(&footer)?.0, None)
        }
    };
    if pos
        .offset
        .checked_add(pos.compressed)
        .is_none_or(|end| end > blob_size)
        || pos.uncompressed > MAX_TOC
    {
        return Err(ChunkedError::Format(format!(
            "the TOC position {}+{} ({} uncompressed) does not fit the {blob_size}-byte blob",
            pos.offset, pos.compressed, pos.uncompressed
        )));
    }
    let compressed = fetch(pos.offset, pos.offset + pos.compressed)
        .map_err(ChunkedError::io("fetch the TOC"))?;
    verify_toc(
        &compressed,
        checksum.as_deref(),
        ANNOTATION_TOC_CHECKSUM,
        allow_unverified,
    )?;
    let json = zstd::bulk::decompress(&compressed, pos.uncompressed as usize)
        .map_err(ChunkedError::io("decompress the TOC"))?;
    let mut toc = parse_toc(&json)?;
    toc.fill_end_offsets(pos.offset.saturating_sub(8));
    toc.check(blob_size, pos.offset)?;
    Ok(toc)
}

/// Fetches chunk `c`, decompresses it and returns its bytes only if they match its digest.
pub fn read_chunk(c: &Chunk, codec: Codec, fetch: &Fetch) -> Result<Vec<u8>, ChunkedError> {
    if c.zeros {
        return Ok(vec![0u8; c.size as usize]);
    }
    let compressed = fetch(c.start, c.end).map_err(ChunkedError::io(format!(
        "fetch bytes {}..{}",
        c.start, c.end
    )))?;
    // The range may run on into the next entry's header: only `size` bytes, after `inner`
    // bytes of other files sharing the frame, are the chunk.
    let mut data = Vec::with_capacity(c.size as usize);
    let decoded = match codec {
        Codec::Zstd => zstd::stream::read::Decoder::new(&compressed[..])
            .map(|d| Box::new(d) as Box<dyn std::io::Read>),
        Codec::Gzip => {
            Ok(Box::new(flate2::read::GzDecoder::new(&compressed[..])) as Box<dyn std::io::Read>)
        }
    }
    .and_then(|mut d| {
        std::io::copy(
            &mut std::io::Read::take(&mut d, c.inner),
            &mut std::io::sink(),
        )?;
        std::io::Read::read_to_end(&mut std::io::Read::take(d, c.size), &mut data)
    });
    if let Err(e) = decoded {
        // Bytes that are not even zstd are as altered as bytes with the wrong digest.
        return Err(ChunkedError::ChunkDigest {
            start: c.start,
            expected: c.digest.clone(),
            actual: format!("undecodable data ({e})"),
        });
    }
    let actual = Digest::of(&data).to_string();
    if data.len() as u64 != c.size || actual != c.digest {
        return Err(ChunkedError::ChunkDigest {
            start: c.start,
            expected: c.digest.clone(),
            actual,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::super::lazy::read_toc;
    use super::super::write::{write, Options};
    use super::*;
    use std::io::Cursor;

    fn layer() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h.clone(), "etc/", &[][..]).unwrap();
        let mut f = tar::Header::new_gnu();
        f.set_mode(0o640);
        f.set_uid(7);
        f.set_gid(8);
        f.set_mtime(1_700_000_000);
        for (name, data) in [
            ("etc/small", b"hello\n".to_vec()),
            ("etc/empty", Vec::new()),
            ("big.bin", big_bin()),
        ] {
            f.set_size(data.len() as u64);
            b.append_data(&mut f.clone(), name, &data[..]).unwrap();
        }
        let long = format!("deep/{}/file", "d".repeat(150));
        f.set_size(3);
        b.append_data(&mut f.clone(), &long, &b"abc"[..]).unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "etc/link", "small").unwrap();
        let mut hl = tar::Header::new_gnu();
        hl.set_entry_type(tar::EntryType::Link);
        hl.set_size(0);
        b.append_link(&mut hl, "etc/hard", "etc/small").unwrap();
        b.into_inner().unwrap()
    }

    /// What `layer` holds in big.bin.
    fn big_bin() -> Vec<u8> {
        (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect()
    }

    /// big.bin read chunk by chunk (each at its file offset) through `toc`.
    fn big_content(
        toc: &Toc,
        codec: Codec,
        fetch: &dyn Fn(u64, u64) -> std::io::Result<Vec<u8>>,
    ) -> Vec<u8> {
        let big = toc
            .entries
            .iter()
            .position(|e| e.name == "big.bin")
            .unwrap();
        let mut content = Vec::new();
        for c in &toc.chunks()[&big] {
            assert_eq!(c.file_offset, content.len() as u64);
            content.extend(read_chunk(c, codec, fetch).unwrap());
        }
        content
    }

    fn fetcher(blob: &[u8]) -> impl Fn(u64, u64) -> std::io::Result<Vec<u8>> + '_ {
        move |s, e| Ok(blob[s as usize..e as usize].to_vec())
    }

    /// eStargz from the same tar: one gzip stream of the tar with a landmark and the TOC entry
    /// added (its diff_id), the TOC verified by its digest annotation, chunks served.
    #[test]
    fn estargz_round_trip() {
        use super::super::write::Format;
        use std::io::Read;
        let tar = layer();
        // 512: the first entry (a directory) is the prefetch area.
        for prefetched in [0, 512] {
            let mut blob = Vec::new();
            let opts = Options {
                chunk_size: 256 << 10,
                format: Format::Estargz,
                prefetched,
                ..Default::default()
            };
            let w = write(Cursor::new(&tar), &mut blob, opts).unwrap();
            let mut whole = Vec::new();
            flate2::read::MultiGzDecoder::new(&blob[..])
                .read_to_end(&mut whole)
                .unwrap();
            assert_eq!(w.diff_id, Digest::of(&whole).to_string());
            let mut names = Vec::new();
            for e in tar::Archive::new(&whole[..]).entries().unwrap() {
                names.push(e.unwrap().path().unwrap().display().to_string());
            }
            let landmark = match prefetched {
                0 => ".no.prefetch.landmark",
                _ => ".prefetch.landmark",
            };
            let at = names.iter().position(|n| n == landmark).unwrap();
            assert_eq!(at, usize::from(prefetched > 0), "{names:?}");
            assert_eq!(names.last().unwrap(), "stargz.index.json");
            let fetch = fetcher(&blob);
            let toc =
                super::super::lazy::read_toc(&w.annotations, blob.len() as u64, &fetch, false)
                    .unwrap();
            assert_eq!(big_content(&toc, Codec::Gzip, &fetch), big_bin());
            // The landmark is hidden; a prefetch area's end is kept.
            assert!(!toc.entries.iter().any(|e| e.name.contains("landmark")));
            assert_eq!(toc.prefetch_end.is_some(), prefetched > 0);
            // zstd:chunked with files put first marks the area the same way (diff_id changes).
            let opts = Options {
                format: Format::ZstdChunked,
                ..opts
            };
            let mut zblob = Vec::new();
            let z = write(Cursor::new(&tar), &mut zblob, opts).unwrap();
            let zfetch = fetcher(&zblob);
            let ztoc =
                super::super::lazy::read_toc(&z.annotations, zblob.len() as u64, &zfetch, false)
                    .unwrap();
            assert_eq!(ztoc.prefetch_end.is_some(), prefetched > 0);
            assert_eq!(z.diff_id == Digest::of(&tar).to_string(), prefetched == 0);
        }
    }

    #[test]
    fn round_trip_keeps_the_tar_and_serves_verified_chunks() {
        let tar = layer();
        let mut blob = Vec::new();
        let opts = Options {
            chunk_size: 256 << 10,
            ..Default::default()
        };
        let w = write(Cursor::new(&tar), &mut blob, opts).unwrap();
        // A plain zstd reader gets the original tar back: diff_id unchanged.
        assert_eq!(zstd::stream::decode_all(&blob[..]).unwrap(), tar);
        assert_eq!(w.diff_id, Digest::of(&tar).to_string());
        assert_eq!(w.digest, Digest::of(&blob).to_string());

        let fetch = fetcher(&blob);
        let toc = read_toc(&w.annotations, blob.len() as u64, &fetch, false).unwrap();
        assert_eq!(toc, w.toc);
        // Also through the footer alone (no annotations): unverified, so only when allowed.
        assert!(read_toc(&BTreeMap::new(), blob.len() as u64, &fetch, false).is_err());
        assert_eq!(
            read_toc(&BTreeMap::new(), blob.len() as u64, &fetch, true).unwrap(),
            toc
        );

        let chunks = toc.chunks();
        let big = toc
            .entries
            .iter()
            .position(|e| e.name == "big.bin")
            .unwrap();
        assert_eq!(chunks[&big].len(), 5, "1.2 MB in 256 KiB chunks");
        assert_eq!(big_content(&toc, Codec::Zstd, &fetch), big_bin());
        let e = &toc.entries[big];
        assert_eq!((e.mode, e.uid, e.gid), (0o640, 7, 8));
        assert!(toc
            .entries
            .iter()
            .any(|e| e.name.ends_with("/file") && e.name.len() > 150));
        assert!(toc
            .entries
            .iter()
            .any(|e| e.kind == "hardlink" && e.link_name == "etc/small"));

        // A flipped byte in a chunk's frame: refused, never served.
        let mut bad = blob.clone();
        let c = &chunks[&big][2];
        bad[(c.start + c.end) as usize / 2] ^= 0xff;
        assert!(read_chunk(c, Codec::Zstd, &fetcher(&bad)).is_err());
        // A flipped byte in the TOC: its checksum no longer matches.
        let (pos, _) = from_annotations(&w.annotations).unwrap().unwrap();
        let mut bad = blob.clone();
        bad[(pos.offset + 5) as usize] ^= 0xff;
        let err = read_toc(&w.annotations, blob.len() as u64, &fetcher(&bad), false).unwrap_err();
        assert!(matches!(err, ChunkedError::TocDigest { .. }), "{err}");
        // A truncated blob: no footer.
        let short = &blob[..blob.len() - 10];
        assert!(read_toc(&BTreeMap::new(), short.len() as u64, &fetcher(short), true).is_err());
    }

    #[test]
    fn hostile_tocs_are_refused() {
        let entry = |kind: &str, name: &str, link: &str| super::super::toc::Entry {
            kind: kind.into(),
            name: name.into(),
            link_name: link.into(),
            ..Default::default()
        };
        for entries in [
            vec![entry("reg", "../etc/passwd", "")],
            vec![entry("dir", "a", ""), entry("symlink", "a/l", "../../etc")],
            vec![entry("hardlink", "h", "/etc/shadow")],
            vec![entry("chunk", "x", "")],
            vec![entry("socket", "s", "")],
        ] {
            let toc = Toc {
                version: 1,
                entries,
                prefetch_end: None,
            };
            assert!(toc.check(1000, 900).is_err(), "{toc:?}");
        }
        let ok = Toc {
            version: 1,
            entries: vec![
                entry("dir", "a", ""),
                entry("symlink", "a/l", "../b"),
                entry("symlink", "bin", "/usr/bin"),
            ],
            prefetch_end: None,
        };
        ok.check(1000, 900).unwrap();
    }
}
