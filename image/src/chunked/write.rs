//! Writing zstd:chunked: the layer tar is walked block by block and copied byte for byte into
//! zstd frames — tar headers (with padding) in one frame, each chunk of a regular file's content
//! in its own — so the blob decompresses to exactly the input tar (its diff_id is unchanged).
//! Then the TOC, the tar-split stream and the footer follow as skippable frames.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use base64::Engine;
use sha2::{Digest as _, Sha256};

use super::toc::{clean, Entry, Toc};
use super::{
    ChunkedError, Position, ANNOTATION_TARSPLIT_CHECKSUM, ANNOTATION_TARSPLIT_POSITION,
    ANNOTATION_TOC_CHECKSUM, ANNOTATION_TOC_POSITION, FOOTER_MAGIC, SKIPPABLE_MAGIC, TOC_TYPE_CRFS,
};
use crate::content::Digest;

/// How to write.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Regular files larger than this are cut in chunks of this size, each its own frame.
    pub chunk_size: u64,
    pub level: i32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_size: 4 << 20,
            level: 3,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// sha256 of the blob.
    pub digest: String,
    pub size: u64,
    /// sha256 of the uncompressed tar (equal to the input's).
    pub diff_id: String,
    pub annotations: BTreeMap<String, String>,
    pub toc: Toc,
}

/// Counts and hashes what goes to the output.
struct Out<W: Write> {
    inner: W,
    written: u64,
    hash: Sha256,
}

impl<W: Write> Out<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), ChunkedError> {
        self.inner
            .write_all(bytes)
            .map_err(ChunkedError::io("write the layer"))?;
        self.hash.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// One zstd frame of `data`; returns its `[start, end)`.
    fn frame(&mut self, data: &[u8], level: i32) -> Result<(u64, u64), ChunkedError> {
        let start = self.written;
        let z = zstd::bulk::compress(data, level).map_err(ChunkedError::io("compress"))?;
        self.put(&z)?;
        Ok((start, self.written))
    }

    /// A skippable frame holding `data` zstd-compressed; returns where the compressed bytes are
    /// and their digest.
    fn skippable(&mut self, data: &[u8], level: i32) -> Result<(Position, String), ChunkedError> {
        let z = zstd::bulk::compress(data, level).map_err(ChunkedError::io("compress"))?;
        let mut header = SKIPPABLE_MAGIC.to_le_bytes().to_vec();
        header.extend_from_slice(&(z.len() as u32).to_le_bytes());
        self.put(&header)?;
        let offset = self.written;
        self.put(&z)?;
        let position = Position {
            offset,
            compressed: z.len() as u64,
            uncompressed: data.len() as u64,
        };
        Ok((position, Digest::of(&z).to_string()))
    }
}

/// tar-split's CRC-64 (ISO polynomial, as Go's `hash/crc64` with `crc64.ISO`), continued from
/// `crc` (0 to start).
fn crc64_iso(crc: u64, data: &[u8]) -> u64 {
    const POLY: u64 = 0xD800_0000_0000_0000;
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut crc = i as u64;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
            *slot = crc;
        }
        t
    });
    let mut crc = !crc;
    for b in data {
        crc = table[((crc as u8) ^ b) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The JSON lines of tar-split: raw segments and file references.
#[derive(Default)]
struct TarSplit {
    lines: Vec<u8>,
    position: u64,
}

impl TarSplit {
    fn segment(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let payload = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.line(serde_json::json!({"type": 2, "payload": payload, "position": self.position}));
    }

    fn file(&mut self, name: &str, size: u64, crc: Option<u64>) {
        let mut v = serde_json::json!({"type": 1, "name": name, "position": self.position});
        if size > 0 {
            v["size"] = size.into();
        }
        if let Some(c) = crc {
            v["payload"] = base64::engine::general_purpose::STANDARD
                .encode(c.to_be_bytes())
                .into();
        }
        self.line(v);
    }

    fn line(&mut self, v: serde_json::Value) {
        self.lines.extend_from_slice(v.to_string().as_bytes());
        self.lines.push(b'\n');
        self.position += 1;
    }
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, ChunkedError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(ChunkedError::Format(
                    "the tar ends inside a block: it is truncated".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ChunkedError::io("read the layer tar")(e)),
        }
    }
    Ok(true)
}

fn padded(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

fn rfc3339(secs: u64) -> String {
    crate::oci::rfc3339(secs)
}

/// Converts the layer tar `input` into a zstd:chunked blob written to `output`.
pub fn write(
    mut input: impl Read,
    output: impl Write,
    opts: Options,
) -> Result<Written, ChunkedError> {
    let mut out = Out {
        inner: output,
        written: 0,
        hash: Sha256::new(),
    };
    let mut diff = Sha256::new();
    let mut toc = Toc {
        version: 1,
        entries: Vec::new(),
    };
    let mut split = TarSplit::default();
    // Raw tar bytes not yet written: headers, extension records, padding.
    let mut pending: Vec<u8> = Vec::new();
    // PAX and GNU long-name records apply to the next header.
    let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut block = [0u8; 512];
    loop {
        if !read_exact_or_eof(&mut input, &mut block)? {
            return Err(ChunkedError::Format(
                "the tar has no end-of-archive blocks: it is truncated".into(),
            ));
        }
        if block.iter().all(|b| *b == 0) {
            // End of archive: this block and whatever follows (more zeros) as they are.
            pending.extend_from_slice(&block);
            input
                .read_to_end(&mut pending)
                .map_err(ChunkedError::io("read the layer tar"))?;
            break;
        }
        let header = tar::Header::from_byte_slice(&block);
        header
            .as_ustar()
            .map(|_| ())
            .or_else(|| header.as_gnu().map(|_| ()))
            .ok_or_else(|| {
                ChunkedError::Format("a header block is neither ustar nor GNU tar".into())
            })?;
        let size = header
            .entry_size()
            .map_err(ChunkedError::io("tar header size"))?;
        let kind = header.entry_type();
        pending.extend_from_slice(&block);
        if kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            let mut data = vec![0u8; padded(size) as usize];
            if !read_exact_or_eof(&mut input, &mut data)? {
                return Err(ChunkedError::Format(
                    "the tar ends inside an extension record".into(),
                ));
            }
            pending.extend_from_slice(&data);
            let data = &data[..size as usize];
            if kind.is_pax_local_extensions() {
                for ext in tar::PaxExtensions::new(data).flatten() {
                    if let Ok(k) = ext.key() {
                        pax.insert(k.to_string(), ext.value_bytes().to_vec());
                    }
                }
            } else if kind.is_gnu_longname() {
                long_name = Some(data.split(|b| *b == 0).next().unwrap_or(&[]).to_vec());
            } else if kind.is_gnu_longlink() {
                long_link = Some(data.split(|b| *b == 0).next().unwrap_or(&[]).to_vec());
            }
            continue;
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let name = pax
            .remove("path")
            .or(long_name.take())
            .map(|b| text(&b))
            .unwrap_or_else(|| text(&header.path_bytes()));
        let link = pax
            .remove("linkpath")
            .or(long_link.take())
            .map(|b| text(&b))
            .or_else(|| header.link_name_bytes().map(|b| text(&b)))
            .unwrap_or_default();
        let num = |key: &str, fallback: u64| -> u64 {
            pax.get(key)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.split('.').next()?.parse().ok())
                .unwrap_or(fallback)
        };
        let mut entry = Entry {
            kind: match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
                tar::EntryType::Link => "hardlink",
                tar::EntryType::Symlink => "symlink",
                tar::EntryType::Char => "char",
                tar::EntryType::Block => "block",
                tar::EntryType::Directory => "dir",
                tar::EntryType::Fifo => "fifo",
                other => {
                    return Err(ChunkedError::Format(format!(
                        "tar entry {name:?} has type {:?}, which a layer cannot hold",
                        other.as_byte() as char
                    )))
                }
            }
            .to_string(),
            name: clean(&name),
            link_name: if matches!(kind, tar::EntryType::Link | tar::EntryType::Symlink) {
                link
            } else {
                String::new()
            },
            mode: header.mode().unwrap_or(0) & 0o7777,
            uid: num("uid", header.uid().unwrap_or(0)) as u32,
            gid: num("gid", header.gid().unwrap_or(0)) as u32,
            modtime: Some(rfc3339(num("mtime", header.mtime().unwrap_or(0)))),
            dev_major: header.device_major().ok().flatten().unwrap_or(0),
            dev_minor: header.device_minor().ok().flatten().unwrap_or(0),
            ..Default::default()
        };
        for (k, v) in std::mem::take(&mut pax) {
            if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                entry.xattrs.insert(
                    x.to_string(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                );
            }
        }
        if entry.name.is_empty() {
            entry.name = ".".into();
        }
        let has_content = entry.kind == "reg" && size > 0;
        if !has_content {
            // Content of other types (none in practice) stays in the raw stream.
            let mut data = vec![0u8; padded(size) as usize];
            if !read_exact_or_eof(&mut input, &mut data)? && size > 0 {
                return Err(ChunkedError::Format(format!(
                    "{name}: the tar ends inside its data"
                )));
            }
            pending.extend_from_slice(&data);
            split.segment(&pending);
            split.file(&name, 0, None);
            diff.update(&pending);
            out.frame(&pending, opts.level)?;
            pending.clear();
            toc.entries.push(entry);
            continue;
        }
        // Headers so far: one frame; then the content, chunk by chunk.
        split.segment(&pending);
        diff.update(&pending);
        out.frame(&pending, opts.level)?;
        pending.clear();
        entry.size = size;
        let mut file_hash = Sha256::new();
        let mut crc = 0u64;
        let mut chunks: Vec<Entry> = Vec::new();
        let mut left = size;
        let mut file_offset = 0u64;
        while left > 0 {
            let n = left.min(opts.chunk_size.max(1));
            let mut data = vec![0u8; n as usize];
            if !read_exact_or_eof(&mut input, &mut data)? {
                return Err(ChunkedError::Format(format!(
                    "{name}: the tar ends inside its data"
                )));
            }
            file_hash.update(&data);
            crc = crc64_iso(crc, &data);
            diff.update(&data);
            let (start, end) = out.frame(&data, opts.level)?;
            chunks.push(Entry {
                kind: "chunk".into(),
                name: entry.name.clone(),
                offset: start,
                end_offset: end,
                chunk_size: n,
                chunk_offset: file_offset,
                chunk_digest: Digest::of(&data).to_string(),
                ..Default::default()
            });
            file_offset += n;
            left -= n;
        }
        entry.digest = Digest::from_hasher(file_hash).to_string();
        entry.offset = chunks[0].offset;
        entry.end_offset = chunks.last().expect("size > 0").end_offset;
        entry.chunk_size = chunks[0].chunk_size;
        entry.chunk_digest = chunks[0].chunk_digest.clone();
        split.file(&name, size, Some(crc));
        toc.entries.push(entry);
        toc.entries.extend(chunks.into_iter().skip(1));
        // The padding after the content starts the next header frame.
        let pad = (padded(size) - size) as usize;
        let mut padding = vec![0u8; pad];
        if pad > 0 && !read_exact_or_eof(&mut input, &mut padding)? {
            return Err(ChunkedError::Format(format!(
                "{name}: the tar ends inside its padding"
            )));
        }
        pending.extend_from_slice(&padding);
    }
    split.segment(&pending);
    diff.update(&pending);
    out.frame(&pending, opts.level)?;

    let toc_json = serde_json::to_vec(&toc).expect("TOC serializes");
    let (toc_pos, toc_digest) = out.skippable(&toc_json, opts.level)?;
    let (split_pos, split_digest) = out.skippable(&split.lines, opts.level)?;
    let mut footer = SKIPPABLE_MAGIC.to_le_bytes().to_vec();
    footer.extend_from_slice(&64u32.to_le_bytes());
    for v in [
        toc_pos.offset,
        toc_pos.compressed,
        toc_pos.uncompressed,
        TOC_TYPE_CRFS,
        split_pos.offset,
        split_pos.compressed,
        split_pos.uncompressed,
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    footer.extend_from_slice(FOOTER_MAGIC);
    out.put(&footer)?;
    out.inner
        .flush()
        .map_err(ChunkedError::io("write the layer"))?;
    let blob = Digest::from_hasher(out.hash.clone());
    // The checksums cover the compressed bytes of the TOC and tar-split frames.
    let annotations = BTreeMap::from([
        (ANNOTATION_TOC_CHECKSUM.to_string(), toc_digest),
        (
            ANNOTATION_TOC_POSITION.to_string(),
            format!(
                "{}:{}:{}:{TOC_TYPE_CRFS}",
                toc_pos.offset, toc_pos.compressed, toc_pos.uncompressed
            ),
        ),
        (ANNOTATION_TARSPLIT_CHECKSUM.to_string(), split_digest),
        (
            ANNOTATION_TARSPLIT_POSITION.to_string(),
            format!(
                "{}:{}:{}",
                split_pos.offset, split_pos.compressed, split_pos.uncompressed
            ),
        ),
    ]);
    Ok(Written {
        digest: blob.to_string(),
        size: out.written,
        diff_id: Digest::from_hasher(diff).to_string(),
        annotations,
        toc,
    })
}
