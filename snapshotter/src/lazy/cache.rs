//! The chunk cache shared by every lazy layer on the machine: verified, uncompressed chunks in
//! files named by their sha256, bounded in size (oldest first out), written atomically (a
//! temporary name, then rename) so a killed process never leaves a partial chunk behind.
//!
//! Whole files live in the same place under the same rule (named by the sha256 of their
//! content): they back FUSE passthrough and serve reads directly. A file of one chunk is its
//! chunk; a file of several is assembled from its cached chunks, verified against its TOC
//! digest, and then replaces them, so no content is kept twice.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use strata_image::chunked::toc::Chunk;
use strata_image::content::Digest;

pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    used: AtomicU64,
    evicting: Mutex<()>,
}

fn name(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

impl ChunkCache {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<ChunkCache> {
        fs::create_dir_all(dir)?;
        let used = fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        Ok(ChunkCache {
            dir: dir.to_path_buf(),
            max_bytes,
            used: AtomicU64::new(used),
            evicting: Mutex::new(()),
        })
    }

    pub fn has(&self, digest: &str) -> bool {
        name(digest).is_some_and(|n| self.dir.join(n).is_file())
    }

    /// The chunk's bytes, when cached with the expected size.
    pub fn get(&self, digest: &str, size: u64) -> Option<Vec<u8>> {
        let data = fs::read(self.dir.join(name(digest)?)).ok()?;
        (data.len() as u64 == size).then_some(data)
    }

    /// Stores a chunk the caller has verified.
    pub fn put(&self, digest: &str, data: &[u8]) {
        let Some(n) = name(digest) else { return };
        let path = self.dir.join(n);
        if path.exists() {
            return;
        }
        let tmp = self.tmp(n);
        let written = fs::File::create(&tmp).and_then(|mut f| f.write_all(data));
        if written.is_err() || fs::rename(&tmp, &path).is_err() {
            let _ = fs::remove_file(&tmp);
            return;
        }
        let used = self.used.fetch_add(data.len() as u64, Ordering::SeqCst) + data.len() as u64;
        if used > self.max_bytes {
            self.evict();
        }
    }

    /// The file whose content has sha256 `digest`, `size` bytes made of `chunks`: cached, or
    /// assembled now when every chunk is cached. None while a chunk is missing or the assembled
    /// bytes do not match `digest` (then nothing is kept).
    pub fn whole_file(&self, digest: &str, size: u64, chunks: &[Chunk]) -> Option<PathBuf> {
        if let Some(path) = self.file(digest, size) {
            return Some(path);
        }
        let path = self.dir.join(name(digest)?);
        if !chunks.iter().all(|c| c.zeros || self.has(&c.digest)) {
            return None;
        }
        let tmp = self.tmp(name(digest)?);
        let assembled = (|| -> std::io::Result<String> {
            let mut out = BufWriter::new(fs::File::create(&tmp)?);
            let mut hash = Sha256::new();
            let mut at = 0;
            for c in chunks {
                let data = if c.zeros {
                    vec![0; c.size as usize]
                } else {
                    self.get(&c.digest, c.size)
                        .ok_or_else(|| std::io::Error::other("chunk evicted"))?
                };
                if c.file_offset != at {
                    return Err(std::io::Error::other("chunks leave a gap"));
                }
                at += c.size;
                hash.update(&data);
                out.write_all(&data)?;
            }
            if at != size {
                return Err(std::io::Error::other("chunks do not cover the file"));
            }
            out.into_inner()?.sync_data()?;
            Ok(Digest::from_hasher(hash).to_string())
        })();
        match assembled {
            Ok(d) if d == digest && fs::rename(&tmp, &path).is_ok() => {
                self.used.fetch_add(size, Ordering::SeqCst);
                // The file now serves the chunks' bytes (see `read`).
                for c in chunks.iter().filter(|c| !c.zeros && c.digest != digest) {
                    let chunk = name(&c.digest).map(|n| self.dir.join(n));
                    if chunk.is_some_and(|p| fs::remove_file(p).is_ok()) {
                        self.used.fetch_sub(c.size, Ordering::SeqCst);
                    }
                }
                if self.used() > self.max_bytes {
                    self.evict();
                }
                Some(path)
            }
            _ => {
                let _ = fs::remove_file(&tmp);
                None
            }
        }
    }

    /// The cached whole file with sha256 `digest` and `size` bytes.
    pub fn file(&self, digest: &str, size: u64) -> Option<PathBuf> {
        let path = self.dir.join(name(digest)?);
        fs::metadata(&path)
            .is_ok_and(|m| m.is_file() && m.len() == size)
            .then_some(path)
    }

    /// Bytes `offset..offset+len` (cut at the end) of the cached whole file with sha256
    /// `digest` and `size` bytes, when it is cached.
    pub fn read(&self, digest: &str, size: u64, offset: u64, len: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = fs::File::open(self.file(digest, size)?).ok()?;
        let mut buf = vec![0; len.min(size.saturating_sub(offset)) as usize];
        f.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// A temporary name no other writer uses, even of the same content.
    fn tmp(&self, name: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!(".tmp-{name}-{}-{n}", std::process::id()))
    }

    /// Removes the oldest chunks until the cache holds 90% of its bound.
    fn evict(&self) {
        let Ok(_guard) = self.evicting.try_lock() else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = match fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((m.modified().ok()?, m.len(), e.path()))
                })
                .collect(),
            Err(_) => return,
        };
        let mut used: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        let target = self.max_bytes / 10 * 9;
        for (_, len, path) in files {
            if used <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                used -= len;
            }
        }
        self.used.store(used, Ordering::SeqCst);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_addressed_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1000).unwrap();
        let d = |i: u8| format!("sha256:{}", hex::encode([i; 32]));
        for i in 0..5u8 {
            c.put(&d(i), &[i; 300]);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(c.used() <= 1000, "{}", c.used());
        assert!(c.get(&d(4), 300).is_some(), "the newest stays");
        assert!(c.get(&d(0), 300).is_none(), "the oldest went");
        assert!(c.get(&d(4), 299).is_none(), "a size mismatch is a miss");
        let before = std::fs::read_dir(dir.path()).unwrap().count();
        c.put("sha256:../../etc/x", b"x");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            before,
            "not a digest: not stored"
        );
    }

    #[test]
    fn whole_files_are_assembled_from_cached_chunks_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let sha = |b: &[u8]| Digest::of(b).to_string();
        let (a, b) = (vec![1u8; 300], vec![2u8; 200]);
        let chunk = |at: u64, data: &[u8], zeros: bool| Chunk {
            file_offset: at,
            size: data.len() as u64,
            start: 0,
            end: 0,
            digest: if zeros { String::new() } else { sha(data) },
            zeros,
            inner: 0,
        };
        let hole = vec![0u8; 100];
        let chunks = [
            chunk(0, &a, false),
            chunk(300, &hole, true),
            chunk(400, &b, false),
        ];
        let whole = [a.clone(), hole.clone(), b.clone()].concat();
        let digest = sha(&whole);
        c.put(&chunks[0].digest, &a);
        assert_eq!(
            c.whole_file(&digest, 600, &chunks),
            None,
            "a chunk is missing"
        );
        // A file of one chunk is that chunk.
        assert_eq!(
            c.whole_file(&chunks[0].digest, 300, &chunks[..1]),
            Some(dir.path().join(&chunks[0].digest[7..]))
        );
        c.put(&chunks[2].digest, &b);
        let path = c.whole_file(&digest, 600, &chunks).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        assert_eq!(c.whole_file(&digest, 600, &chunks), Some(path), "kept");
        // Chunks that do not make the named content leave nothing behind.
        let wrong = sha(b"something else");
        assert_eq!(c.whole_file(&wrong, 600, &chunks), None);
        assert_eq!(c.whole_file(&digest, 500, &chunks), None, "size");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "the file replaced its chunks: {names:?}");
        assert_eq!(c.read(&digest, 600, 290, 20).unwrap(), whole[290..310]);
        assert_eq!(c.read(&digest, 600, 590, 20).unwrap(), whole[590..]);
        assert_eq!(c.read(&digest, 600, 700, 20).unwrap(), b"");
        assert!(c.read(&wrong, 600, 0, 1).is_none());
    }
}
