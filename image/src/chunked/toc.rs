//! The table of contents: one entry per tar entry, plus `chunk` entries after a regular file that
//! is split in several frames. Field names are containers/storage's (`FileMetadata`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ChunkedError;

/// The largest TOC accepted, uncompressed (about two million entries).
pub const MAX_TOC: u64 = 256 << 20;

/// Reads `[start, end)` of the blob (an HTTP Range request, a file read, ...).
pub type Fetch<'a> = dyn Fn(u64, u64) -> std::io::Result<Vec<u8>> + 'a;

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<Entry>,
    /// Where the files to prefetch end in the blob (the `.prefetch.landmark` entry's offset,
    /// taken out of the entries when read; a snapshotter keeps it with its verified copy).
    #[serde(
        default,
        rename = "strataPrefetchEnd",
        skip_serializing_if = "Option::is_none"
    )]
    pub prefetch_end: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// `reg`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`, or `chunk`.
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// Permission and set-id bits (no file type bits).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u32,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modtime: Option<String>,
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero")]
    pub dev_major: u32,
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero")]
    pub dev_minor: u32,
    /// Values base64-encoded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// sha256 of the whole file's content (regular files with content).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// The compressed frame(s) of the content (for `reg`: all its chunks; for `chunk`: one).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(rename = "endOffset", default, skip_serializing_if = "is_zero")]
    pub end_offset: u64,
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    /// sha256 of this chunk's uncompressed bytes.
    #[serde(
        rename = "chunkDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    /// `""` (data) or `zeros` (a hole).
    #[serde(
        rename = "chunkType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_type: String,
    /// eStargz: where this chunk starts in the decompressed stream of the member at `offset`
    /// (several small files may share one gzip member).
    #[serde(rename = "innerOffset", default, skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
}

/// One frame of a regular file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// Offset in the file.
    pub file_offset: u64,
    pub size: u64,
    /// The compressed frame in the blob: `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// sha256 of the uncompressed bytes (`sha256:...`); empty only for a `zeros` hole.
    pub digest: String,
    pub zeros: bool,
    /// Bytes of the decompressed frame before this chunk (eStargz members shared by files).
    #[serde(default)]
    pub inner: u64,
}

/// A normalized entry name: no leading `./` or `/`, no trailing `/`.
pub fn clean(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

fn unsafe_entry(name: &str, why: impl Into<String>) -> ChunkedError {
    ChunkedError::Unsafe {
        name: name.to_string(),
        why: why.into(),
    }
}

impl Toc {
    /// Fills in the `endOffset`s that writers may omit (containers/storage leaves them out of
    /// `chunk` entries, older versions out of some files): a frame run ends where the next entry
    /// with content starts, the last one where the TOC starts (`data_end`). Readers decompress
    /// only the entry's size from such a range.
    pub fn fill_end_offsets(&mut self, data_end: u64) {
        let data: Vec<usize> = (0..self.entries.len())
            .filter(|i| {
                let e = &self.entries[*i];
                (e.kind == "reg" && e.size > 0) || e.kind == "chunk"
            })
            .collect();
        for (n, &i) in data.iter().enumerate() {
            if self.entries[i].end_offset != 0 {
                continue;
            }
            let start = self.entries[i].offset;
            let next = data[n + 1..]
                .iter()
                .map(|j| self.entries[*j].offset)
                .find(|o| *o > start)
                .unwrap_or(data_end);
            self.entries[i].end_offset = next;
        }
    }

    /// Refuses what could reach outside the layer or confuse a reader: names with `..` or NUL,
    /// relative symlinks that climb above the root, hard links to names not earlier in the
    /// layer, content ranges past `blob_size` or overlapping the TOC, chunks of unknown files.
    pub fn check(&self, blob_size: u64, toc_offset: u64) -> Result<(), ChunkedError> {
        if self.version != 1 {
            return Err(ChunkedError::Format(format!(
                "TOC version {} (only 1 is known)",
                self.version
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut last_reg: Option<(String, u64)> = None;
        for e in &self.entries {
            let name = clean(&e.name);
            if name.split('/').any(|c| c == "..") || name.contains('\0') {
                return Err(unsafe_entry(&e.name, "the name leaves the layer"));
            }
            match e.kind.as_str() {
                "reg" | "chunk" => {
                    if e.kind == "chunk" {
                        match &last_reg {
                            Some((reg, _)) if *reg != name => {
                                return Err(unsafe_entry(
                                    &e.name,
                                    "a chunk that follows no regular file of that name",
                                ))
                            }
                            None => {
                                return Err(unsafe_entry(
                                    &e.name,
                                    "a chunk that follows no regular file of that name",
                                ))
                            }
                            Some((_, size))
                                if e.chunk_offset >= *size
                                    || e.chunk_offset.saturating_add(e.chunk_size) > *size =>
                            {
                                return Err(unsafe_entry(
                                    &e.name,
                                    format!(
                                        "chunk {}+{} lies outside its {size}-byte file",
                                        e.chunk_offset, e.chunk_size
                                    ),
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                    if e.end_offset < e.offset || e.end_offset > toc_offset.min(blob_size) {
                        return Err(unsafe_entry(
                            &e.name,
                            format!(
                                "content range {}..{} is outside the layer's data",
                                e.offset, e.end_offset
                            ),
                        ));
                    }
                    if e.kind == "reg" {
                        last_reg = Some((name.clone(), e.size));
                    }
                }
                "symlink" => {
                    if e.link_name.is_empty() {
                        return Err(unsafe_entry(&e.name, "a symlink without a target"));
                    }
                    if !e.link_name.starts_with('/') {
                        // Depth of the link's directory, then walk the target.
                        let mut depth: i64 = name.matches('/').count() as i64;
                        for c in e.link_name.split('/') {
                            match c {
                                ".." => depth -= 1,
                                "" | "." => {}
                                _ => depth += 1,
                            }
                            if depth < 0 {
                                return Err(unsafe_entry(
                                    &e.name,
                                    format!(
                                        "symlink to {:?} climbs above the layer's root",
                                        e.link_name
                                    ),
                                ));
                            }
                        }
                    }
                }
                "hardlink" => {
                    let target = clean(&e.link_name);
                    if target.split('/').any(|c| c == "..") || !seen.contains(&target) {
                        return Err(unsafe_entry(
                            &e.name,
                            format!(
                                "hard link to {:?}, which is not an earlier entry of the layer",
                                e.link_name
                            ),
                        ));
                    }
                }
                "dir" | "char" | "block" | "fifo" => last_reg = None,
                other => {
                    return Err(unsafe_entry(
                        &e.name,
                        format!("unknown entry type {other:?}"),
                    ));
                }
            }
            if e.kind != "chunk" {
                seen.insert(name);
            }
        }
        Ok(())
    }

    /// The chunks of each regular file with content, by index of its `reg` entry.
    pub fn chunks(&self) -> BTreeMap<usize, Vec<Chunk>> {
        let mut out: BTreeMap<usize, Vec<Chunk>> = BTreeMap::new();
        let mut current: Option<usize> = None;
        for (i, e) in self.entries.iter().enumerate() {
            match e.kind.as_str() {
                "reg" if e.size > 0 => {
                    current = Some(i);
                    // Without chunk fields, the whole content is one frame.
                    let size = if e.chunk_size > 0 {
                        e.chunk_size
                    } else {
                        e.size
                    };
                    let digest = if e.chunk_digest.is_empty() {
                        e.digest.clone()
                    } else {
                        e.chunk_digest.clone()
                    };
                    out.insert(
                        i,
                        vec![Chunk {
                            file_offset: 0,
                            size,
                            start: e.offset,
                            end: e.end_offset,
                            digest,
                            zeros: e.chunk_type == "zeros",
                            inner: e.inner_offset,
                        }],
                    );
                }
                "chunk" => {
                    if let Some(list) = current.and_then(|c| out.get_mut(&c)) {
                        let size = if e.chunk_size > 0 {
                            e.chunk_size
                        } else {
                            self.entries[current.expect("set")]
                                .size
                                .saturating_sub(e.chunk_offset)
                        };
                        // The first chunk's frame ends where the second begins.
                        if let Some(prev) = list.last_mut() {
                            if prev.end > e.offset && e.offset > prev.start {
                                prev.end = e.offset;
                            }
                        }
                        list.push(Chunk {
                            file_offset: e.chunk_offset,
                            size,
                            start: e.offset,
                            end: e.end_offset,
                            digest: e.chunk_digest.clone(),
                            zeros: e.chunk_type == "zeros",
                            inner: e.inner_offset,
                        });
                    }
                }
                _ => current = None,
            }
        }
        out
    }
}

/// Checks the TOC's `bytes` (what annotation `annotation` is the digest of) against `expected`.
/// Without an expected digest the TOC cannot be verified: refused unless `allow_unverified`, then
/// served with a warning.
pub fn verify_toc(
    bytes: &[u8],
    expected: Option<&str>,
    annotation: &str,
    allow_unverified: bool,
) -> Result<(), ChunkedError> {
    let actual = crate::content::Digest::of(bytes).to_string();
    match expected {
        Some(expected) if expected != actual => Err(ChunkedError::TocDigest {
            expected: expected.to_string(),
            actual,
        }),
        Some(_) => Ok(()),
        None if allow_unverified => {
            tracing::warn!(toc = %actual, annotation, "TOC without its checksum annotation: serving it UNVERIFIED (allow_unverified is set)");
            Ok(())
        }
        None => Err(ChunkedError::Format(format!(
            "the layer descriptor has no {annotation} annotation, so its TOC cannot be verified; refusing it (set allow_unverified to serve such layers)"
        ))),
    }
}

/// Parses a TOC's JSON.
pub fn parse_toc(json: &[u8]) -> Result<Toc, ChunkedError> {
    serde_json::from_slice(json)
        .map_err(|e| ChunkedError::Format(format!("the TOC is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_outside_their_file_are_refused() {
        let reg = Entry {
            kind: "reg".into(),
            name: "f".into(),
            size: 10,
            chunk_size: 4,
            offset: 0,
            end_offset: 5,
            ..Default::default()
        };
        let chunk = |chunk_offset: u64, chunk_size: u64| Entry {
            kind: "chunk".into(),
            name: "f".into(),
            chunk_offset,
            chunk_size,
            offset: 5,
            end_offset: 9,
            ..Default::default()
        };
        let toc = |c: Entry| Toc {
            version: 1,
            entries: vec![reg.clone(), c],
            prefetch_end: None,
        };
        assert!(toc(chunk(4, 0)).check(100, 50).is_ok());
        for bad in [chunk(10, 0), chunk(40, 0), chunk(4, 7)] {
            let err = toc(bad).check(100, 50).unwrap_err();
            assert!(
                err.to_string().contains("outside its 10-byte file"),
                "{err}"
            );
        }
    }
}
