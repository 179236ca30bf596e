//! The chunk cache shared by every lazy layer on the machine: verified, uncompressed chunks in
//! files named by their sha256, bounded in size (oldest first out), written atomically (a
//! temporary name, then rename) so a killed process never leaves a partial chunk behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

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
        let tmp = self.dir.join(format!(".tmp-{n}-{}", std::process::id()));
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
}
