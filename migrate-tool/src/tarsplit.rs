//! tar-split: the metadata dockerd keeps per layer (`tar-split.json.gz`) to rebuild the exact
//! original layer tar from the layer's files. JSON lines; `type` 2 entries carry raw tar bytes
//! (headers, padding, the end blocks) in `payload`, `type` 1 entries name a file whose `size` bytes
//! come from the layer's tree.

use std::io::{BufRead, BufReader, PipeReader, Read, Write};
use std::path::Path;

use base64::Engine;
use nix::fcntl::OFlag;
use serde::Deserialize;
use strata_image::content::{Digest, Hashing};
use strata_image::fsutil;

#[derive(Debug, Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    name_raw: Option<String>,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    payload: Option<String>,
}

/// One piece of the original tar.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// Bytes to copy as they are.
    Segment(Vec<u8>),
    /// `size` bytes of the file at `name` in the layer's tree.
    File { name: String, size: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum TarSplitError {
    #[error("tar-split data {path}: line {line}: {reason}; the layer store is damaged (restore it from a backup)")]
    Corrupt {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("tar-split data {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer file {name}: {reason}")]
    File { name: String, reason: String },
    #[error("the tar rebuild thread panicked")]
    Panicked,
}

impl TarSplitError {
    /// Whether the rebuild stopped only because its reader went away (the reader's own error is
    /// then the one to report).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, TarSplitError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Reads a `tar-split.json.gz`.
pub fn read(path: &Path) -> Result<Vec<Entry>, TarSplitError> {
    let shown = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| TarSplitError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .enumerate()
    {
        let line = line.map_err(|e| TarSplitError::Corrupt {
            path: shown.clone(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let raw: Raw = serde_json::from_str(&line).map_err(|e| TarSplitError::Corrupt {
            path: shown.clone(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        let b64 = |s: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| TarSplitError::Corrupt {
                    path: shown.clone(),
                    line: i + 1,
                    reason: e.to_string(),
                })
        };
        out.push(match raw.kind {
            2 => Entry::Segment(b64(raw.payload.as_deref().unwrap_or(""))?),
            1 => {
                let name = match (raw.name, raw.name_raw) {
                    (Some(n), _) => n,
                    (None, Some(r)) => String::from_utf8_lossy(&b64(&r)?).into_owned(),
                    (None, None) => {
                        return Err(TarSplitError::Corrupt {
                            path: shown,
                            line: i + 1,
                            reason: "file entry without a name".into(),
                        })
                    }
                };
                Entry::File {
                    name,
                    size: raw.size,
                }
            }
            k => {
                return Err(TarSplitError::Corrupt {
                    path: shown,
                    line: i + 1,
                    reason: format!("unknown entry type {k}"),
                })
            }
        });
    }
    Ok(out)
}

/// The original tar of `entries` over the files under `root`, streamed: a reader of the tar, and
/// the thread writing it, which returns the tar's digest (the diff ID it must match).
pub fn rebuild(entries: Vec<Entry>, root: &Path) -> std::io::Result<(PipeReader, Rebuild)> {
    let (reader, writer) = std::io::pipe()?;
    let root = root.to_path_buf();
    let thread = std::thread::spawn(move || {
        let mut out = Hashing::new(writer);
        assemble(&entries, &root, &mut out)?;
        Ok(out.digest())
    });
    Ok((reader, Rebuild(thread)))
}

/// The thread of [`rebuild`].
pub struct Rebuild(std::thread::JoinHandle<Result<Digest, TarSplitError>>);

impl Rebuild {
    /// The rebuilt tar's digest, once the reader has been read to its end (or dropped).
    pub fn digest(self) -> Result<Digest, TarSplitError> {
        self.0.join().map_err(|_| TarSplitError::Panicked)?
    }
}

/// Writes the original tar, taking file contents from the tree at `root`. Every file is opened
/// beneath `root` without following symlinks: a tree where `dir/file` passes through a symlink is
/// refused rather than read from wherever the symlink points.
pub fn assemble(entries: &[Entry], root: &Path, out: &mut dyn Write) -> Result<u64, TarSplitError> {
    let dir = std::fs::File::open(root).map_err(|source| TarSplitError::Io {
        path: root.display().to_string(),
        source,
    })?;
    let mut total = 0;
    for e in entries {
        match e {
            Entry::Segment(bytes) => {
                out.write_all(bytes).map_err(|source| TarSplitError::Io {
                    path: "output".into(),
                    source,
                })?;
                total += bytes.len() as u64;
            }
            Entry::File { size: 0, .. } => {}
            Entry::File { name, size } => total += copy_file(&dir, name, *size, out)?,
        }
    }
    Ok(total)
}

/// Copies exactly `size` bytes of layer file `name` (beneath `dir`) to `out`.
fn copy_file(
    dir: &std::fs::File,
    name: &str,
    size: u64,
    out: &mut dyn Write,
) -> Result<u64, TarSplitError> {
    let err = |reason: String| TarSplitError::File {
        name: name.to_string(),
        reason,
    };
    let rel = Path::new(name.trim_start_matches("./"));
    let fd = fsutil::open_beneath_fd(dir, rel, OFlag::O_RDONLY).map_err(|e| err(e.to_string()))?;
    let f = std::fs::File::from(fd);
    let n = std::io::copy(&mut f.take(size), out).map_err(|e| err(e.to_string()))?;
    if n != size {
        return Err(err(format!(
            "{n} bytes on disk, {size} in the layer: the file was changed"
        )));
    }
    Ok(n)
}
