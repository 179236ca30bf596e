//! Writing zstd:chunked and eStargz: the layer tar is walked block by block and copied byte for
//! byte into zstd frames (gzip members for eStargz) — tar headers (with padding) in one frame,
//! each chunk of a regular file's content in its own. zstd:chunked then appends the TOC, the
//! tar-split stream and the footer as skippable frames: the blob decompresses to exactly the
//! input tar (its diff_id is unchanged). eStargz instead ends the tar with a prefetch landmark
//! entry and the TOC as the entry `stargz.index.json` in a member of its own, then its footer:
//! the tar, and so the diff_id, changes.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use base64::Engine;
use sha2::{Digest as _, Sha256};

use super::toc::{clean, Entry, Toc};
use super::{
    ChunkedError, Position, ANNOTATION_TARSPLIT_CHECKSUM, ANNOTATION_TARSPLIT_POSITION,
    ANNOTATION_TOC_CHECKSUM, ANNOTATION_TOC_POSITION, FOOTER_MAGIC, SKIPPABLE_MAGIC, TOC_TYPE_CRFS,
};
use crate::content::{Digest, Hashing};

/// How to write.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Regular files larger than this are cut in chunks of this size, each its own frame.
    pub chunk_size: u64,
    /// zstd's level, or gzip's (at most 9) for eStargz.
    pub level: i32,
    pub format: Format,
    /// eStargz: how many bytes at the start of the tar are the files to prefetch (0: none);
    /// the landmark entry that says so goes there.
    pub prefetched: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunk_size: 4 << 20,
            level: 3,
            format: Format::ZstdChunked,
            prefetched: 0,
        }
    }
}

/// The lazily pullable layer formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// containers/storage's: zstd frames, diff_id kept.
    ZstdChunked,
    /// stargz-snapshotter's: gzip members, TOC inside the tar.
    Estargz,
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

/// The output: counted and hashed as it goes.
struct Out<W: Write>(Hashing<W>);

impl<W: Write> Out<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), ChunkedError> {
        self.0
            .write_all(bytes)
            .map_err(ChunkedError::io("write the layer"))
    }

    fn written(&self) -> u64 {
        self.0.bytes()
    }

    /// One zstd frame (or gzip member) of `data`; returns its `[start, end)`.
    fn frame(&mut self, data: &[u8], opts: &Options) -> Result<(u64, u64), ChunkedError> {
        let start = self.written();
        let z = match opts.format {
            Format::ZstdChunked => {
                zstd::bulk::compress(data, opts.level).map_err(ChunkedError::io("compress"))?
            }
            Format::Estargz => gzip(data, opts.level)?,
        };
        self.put(&z)?;
        Ok((start, self.written()))
    }

    /// A skippable frame holding `data` zstd-compressed; returns where the compressed bytes are
    /// and their digest.
    fn skippable(&mut self, data: &[u8], level: i32) -> Result<(Position, String), ChunkedError> {
        let z = zstd::bulk::compress(data, level).map_err(ChunkedError::io("compress"))?;
        let mut header = SKIPPABLE_MAGIC.to_le_bytes().to_vec();
        header.extend_from_slice(&(z.len() as u32).to_le_bytes());
        self.put(&header)?;
        let offset = self.written();
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

/// One gzip member of `data`.
fn gzip(data: &[u8], level: i32) -> Result<Vec<u8>, ChunkedError> {
    let level = flate2::Compression::new(level.clamp(1, 9) as u32);
    let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 2 + 64), level);
    e.write_all(data).map_err(ChunkedError::io("compress"))?;
    e.finish().map_err(ChunkedError::io("compress"))
}

/// Converts the layer tar `input` into a zstd:chunked or eStargz blob written to `output`.
pub fn write(input: impl Read, output: impl Write, opts: Options) -> Result<Written, ChunkedError> {
    // A landmark entry spliced in where the prefetch area ends: eStargz always has one;
    // zstd:chunked when files were put first (as stargz-snapshotter's converter writes it).
    let prefetch = opts.prefetched > 0;
    let input: Box<dyn Read + '_> = match (opts.format, prefetch) {
        (Format::ZstdChunked, false) => Box::new(input),
        _ => {
            let mut input = input;
            let mut front = Vec::new();
            (&mut input)
                .take(opts.prefetched)
                .read_to_end(&mut front)
                .map_err(ChunkedError::io("read the layer tar"))?;
            let landmark = super::estargz::landmark(prefetch);
            Box::new(
                std::io::Cursor::new(front)
                    .chain(std::io::Cursor::new(landmark))
                    .chain(input),
            )
        }
    };
    let mut w = Writer {
        input,
        out: Out(Hashing::new(output)),
        opts,
        diff: Sha256::new(),
        toc: Toc {
            version: 1,
            ..Default::default()
        },
        split: TarSplit::default(),
        pending: Vec::new(),
        end_of_entries: 0,
        uncompressed: 0,
        ext: Extensions::default(),
    };
    while let Some((header, size)) = w.next_header()? {
        let (entry, name) = toc_entry(&header, &mut w.ext)?;
        if entry.kind == "reg" && size > 0 {
            w.content(entry, &name, size)?;
        } else {
            w.other(entry, &name, size)?;
        }
    }
    match opts.format {
        Format::ZstdChunked => {
            w.flush_pending()?;
            w.finish()
        }
        Format::Estargz => {
            // The end-of-archive blocks come after the TOC's entry.
            w.pending.truncate(w.end_of_entries);
            if !w.pending.is_empty() {
                w.flush_pending()?;
            }
            w.finish_estargz()
        }
    }
}

/// PAX and GNU long-name records, which apply to the next header.
#[derive(Default)]
struct Extensions {
    pax: BTreeMap<String, Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// A conversion in progress.
struct Writer<R: Read, W: Write> {
    input: R,
    out: Out<W>,
    opts: Options,
    /// The diff ID: sha256 of the tar as read.
    diff: Sha256,
    toc: Toc,
    split: TarSplit,
    /// Raw tar bytes not yet written: headers, extension records, padding.
    pending: Vec<u8>,
    /// Where in `pending` the end-of-archive blocks began, once seen.
    end_of_entries: usize,
    /// Bytes of tar written so far.
    uncompressed: u64,
    ext: Extensions,
}

impl<R: Read, W: Write> Writer<R, W> {
    /// `size` bytes (padded to whole blocks) of the input; `what` names the place for errors.
    fn read(&mut self, size: u64, what: &str) -> Result<Vec<u8>, ChunkedError> {
        let mut data = vec![0u8; padded(size) as usize];
        if !read_exact_or_eof(&mut self.input, &mut data)? && size > 0 {
            return Err(ChunkedError::Format(format!("the tar ends inside {what}")));
        }
        Ok(data)
    }

    /// The next entry's header and size, extension records taken in on the way; None at the
    /// end of the archive (whose zero blocks are kept as they are).
    fn next_header(&mut self) -> Result<Option<(tar::Header, u64)>, ChunkedError> {
        loop {
            let mut block = [0u8; 512];
            if !read_exact_or_eof(&mut self.input, &mut block)? {
                return Err(ChunkedError::Format(
                    "the tar has no end-of-archive blocks: it is truncated".into(),
                ));
            }
            self.end_of_entries = self.pending.len();
            self.pending.extend_from_slice(&block);
            if block.iter().all(|b| *b == 0) {
                self.input
                    .read_to_end(&mut self.pending)
                    .map_err(ChunkedError::io("read the layer tar"))?;
                return Ok(None);
            }
            let header = tar::Header::from_byte_slice(&block).clone();
            if header.as_ustar().is_none() && header.as_gnu().is_none() {
                return Err(ChunkedError::Format(
                    "a header block is neither ustar nor GNU tar".into(),
                ));
            }
            let size = header
                .entry_size()
                .map_err(ChunkedError::io("tar header size"))?;
            if !self.extension(&header, size)? {
                return Ok(Some((header, size)));
            }
        }
    }

    /// Takes in an extension record (PAX, GNU long name or link); false for any other entry.
    fn extension(&mut self, header: &tar::Header, size: u64) -> Result<bool, ChunkedError> {
        let kind = header.entry_type();
        let pax = kind.is_pax_local_extensions() || kind.is_pax_global_extensions();
        if !(pax || kind.is_gnu_longname() || kind.is_gnu_longlink()) {
            return Ok(false);
        }
        let data = self.read(size, "an extension record")?;
        self.pending.extend_from_slice(&data);
        let data = &data[..size as usize];
        let until_nul = || data.split(|b| *b == 0).next().unwrap_or(&[]).to_vec();
        if kind.is_pax_local_extensions() {
            for ext in tar::PaxExtensions::new(data).flatten() {
                if let Ok(k) = ext.key() {
                    self.ext
                        .pax
                        .insert(k.to_string(), ext.value_bytes().to_vec());
                }
            }
        } else if kind.is_gnu_longname() {
            self.ext.long_name = Some(until_nul());
        } else if kind.is_gnu_longlink() {
            self.ext.long_link = Some(until_nul());
        }
        Ok(true)
    }

    /// Writes the raw bytes gathered so far as one frame (and a tar-split segment).
    fn flush_pending(&mut self) -> Result<(), ChunkedError> {
        self.split.segment(&self.pending);
        self.diff.update(&self.pending);
        self.uncompressed += self.pending.len() as u64;
        self.out.frame(&self.pending, &self.opts)?;
        self.pending.clear();
        Ok(())
    }

    /// An entry without content of its own: its header (and any data, none in practice) stay in
    /// the raw stream.
    fn other(&mut self, entry: Entry, name: &str, size: u64) -> Result<(), ChunkedError> {
        let data = self.read(size, &format!("the data of {name}"))?;
        self.pending.extend_from_slice(&data);
        self.flush_pending()?;
        self.split.file(name, 0, None);
        self.toc.entries.push(entry);
        Ok(())
    }

    /// A regular file (`name` as in its header): the headers so far in one frame, then its
    /// content chunk by chunk, each its own frame and TOC entry.
    fn content(&mut self, mut entry: Entry, name: &str, size: u64) -> Result<(), ChunkedError> {
        self.flush_pending()?;
        entry.size = size;
        let (mut file_hash, mut crc) = (Sha256::new(), 0u64);
        let mut chunks: Vec<Entry> = Vec::new();
        let mut file_offset = 0u64;
        while file_offset < size {
            let n = (size - file_offset).min(self.opts.chunk_size.max(1));
            let mut data = vec![0u8; n as usize];
            if !read_exact_or_eof(&mut self.input, &mut data)? {
                return Err(ChunkedError::Format(format!(
                    "{name}: the tar ends inside its data"
                )));
            }
            file_hash.update(&data);
            crc = crc64_iso(crc, &data);
            self.diff.update(&data);
            self.uncompressed += n;
            let (start, end) = self.out.frame(&data, &self.opts)?;
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
        }
        entry.digest = Digest::from_hasher(file_hash).to_string();
        entry.offset = chunks[0].offset;
        entry.end_offset = chunks.last().expect("size > 0").end_offset;
        entry.chunk_size = chunks[0].chunk_size;
        entry.chunk_digest = chunks[0].chunk_digest.clone();
        self.split.file(name, size, Some(crc));
        // The padding after the content starts the next header frame.
        let pad = padded(size) - size;
        let mut padding = vec![0u8; pad as usize];
        if pad > 0 && !read_exact_or_eof(&mut self.input, &mut padding)? {
            return Err(ChunkedError::Format(format!(
                "{name}: the tar ends inside its padding"
            )));
        }
        self.pending.extend_from_slice(&padding);
        self.toc.entries.push(entry);
        self.toc.entries.extend(chunks.into_iter().skip(1));
        Ok(())
    }

    /// The TOC and tar-split as skippable frames, the footer, and the descriptor's annotations.
    fn finish(mut self) -> Result<Written, ChunkedError> {
        let toc_json = serde_json::to_vec(&self.toc).expect("TOC serializes");
        let (toc_pos, toc_digest) = self.out.skippable(&toc_json, self.opts.level)?;
        let (split_pos, split_digest) = self.out.skippable(&self.split.lines, self.opts.level)?;
        self.out.put(&footer(toc_pos, split_pos))?;
        self.out
            .0
            .flush()
            .map_err(ChunkedError::io("write the layer"))?;
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
        Ok(self.written(annotations))
    }
}

impl<R: Read, W: Write> Writer<R, W> {
    /// What was written, with the descriptor's `annotations`.
    fn written(self, annotations: BTreeMap<String, String>) -> Written {
        Written {
            digest: self.out.0.digest().to_string(),
            size: self.out.written(),
            diff_id: Digest::from_hasher(self.diff).to_string(),
            annotations,
            toc: self.toc,
        }
    }

    /// eStargz's end: the TOC as the tar's last entry (with the end-of-archive blocks) in a
    /// member of its own, the footer pointing at it, and the TOC digest annotation.
    fn finish_estargz(mut self) -> Result<Written, ChunkedError> {
        use super::estargz::{
            footer, ANNOTATION_TOC_DIGEST, ANNOTATION_UNCOMPRESSED_SIZE, TOC_NAME,
        };
        let toc_json = serde_json::to_vec(&self.toc).expect("TOC serializes");
        let mut h = tar::Header::new_ustar();
        h.set_path(TOC_NAME)
            .map_err(ChunkedError::io("the TOC's tar header"))?;
        h.set_size(toc_json.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut tail = h.as_bytes().to_vec();
        tail.extend_from_slice(&toc_json);
        tail.resize(512 + padded(toc_json.len() as u64) as usize + 1024, 0);
        self.diff.update(&tail);
        let (toc_at, _) = self.out.frame(&tail, &self.opts)?;
        self.out.put(&footer(toc_at))?;
        self.out
            .0
            .flush()
            .map_err(ChunkedError::io("write the layer"))?;
        let uncompressed = self.uncompressed + tail.len() as u64;
        let annotations = BTreeMap::from([
            (
                ANNOTATION_TOC_DIGEST.to_string(),
                Digest::of(&toc_json).to_string(),
            ),
            (
                ANNOTATION_UNCOMPRESSED_SIZE.to_string(),
                uncompressed.to_string(),
            ),
        ]);
        Ok(self.written(annotations))
    }
}

/// The zstd:chunked footer: a skippable frame with the TOC's and tar-split's positions.
fn footer(toc: Position, split: Position) -> Vec<u8> {
    let mut footer = SKIPPABLE_MAGIC.to_le_bytes().to_vec();
    footer.extend_from_slice(&64u32.to_le_bytes());
    for v in [
        toc.offset,
        toc.compressed,
        toc.uncompressed,
        TOC_TYPE_CRFS,
        split.offset,
        split.compressed,
        split.uncompressed,
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    footer.extend_from_slice(FOOTER_MAGIC);
    footer
}

/// The TOC entry of `header`, with the extension records before it applied (and used up), and
/// the entry's name as the tar has it (tar-split keeps that one).
fn toc_entry(header: &tar::Header, ext: &mut Extensions) -> Result<(Entry, String), ChunkedError> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let name = ext
        .pax
        .remove("path")
        .or(ext.long_name.take())
        .map(|b| text(&b))
        .unwrap_or_else(|| text(&header.path_bytes()));
    let link = ext
        .pax
        .remove("linkpath")
        .or(ext.long_link.take())
        .map(|b| text(&b))
        .or_else(|| header.link_name_bytes().map(|b| text(&b)))
        .unwrap_or_default();
    let pax = std::mem::take(&mut ext.pax);
    let num = |key: &str, fallback: u64| -> u64 {
        pax.get(key)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.split('.').next()?.parse().ok())
            .unwrap_or(fallback)
    };
    let kind = header.entry_type();
    let linked = matches!(kind, tar::EntryType::Link | tar::EntryType::Symlink);
    let mut entry = Entry {
        kind: entry_kind(kind, &name)?.to_string(),
        name: clean(&name),
        link_name: if linked { link } else { String::new() },
        mode: header.mode().unwrap_or(0) & 0o7777,
        uid: num("uid", header.uid().unwrap_or(0)) as u32,
        gid: num("gid", header.gid().unwrap_or(0)) as u32,
        modtime: Some(rfc3339(num("mtime", header.mtime().unwrap_or(0)))),
        dev_major: header.device_major().ok().flatten().unwrap_or(0),
        dev_minor: header.device_minor().ok().flatten().unwrap_or(0),
        ..Default::default()
    };
    for (k, v) in pax {
        if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
            let value = base64::engine::general_purpose::STANDARD.encode(v);
            entry.xattrs.insert(x.to_string(), value);
        }
    }
    if entry.name.is_empty() {
        entry.name = ".".into();
    }
    Ok((entry, name))
}

/// The TOC's name for a tar entry type; types a layer cannot hold are refused.
fn entry_kind(kind: tar::EntryType, name: &str) -> Result<&'static str, ChunkedError> {
    Ok(match kind {
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
    })
}
