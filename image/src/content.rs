//! A content-addressed blob store: `<root>/blobs/sha256/<hex>`, written through a temp file that is
//! verified and renamed into place, so a blob is either whole and correct or absent.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// A validated `sha256:<64 hex>` digest (never a path trick).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, ContentError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ContentError::BadDigest(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ContentError::BadDigest(s.to_string()));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    /// The digest of what `hash` has been fed.
    pub fn from_hasher(hash: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex::encode(hash.finalize())))
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A reader or writer that hashes the bytes passing through it: a layer's diff ID while it is
/// applied, a blob's digest while it is written.
pub struct Hashing<T> {
    inner: T,
    hash: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    pub fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    /// The digest of the bytes so far.
    pub fn digest(&self) -> Digest {
        Digest::from_hasher(self.hash.clone())
    }

    /// How many bytes passed.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    fn add(&mut self, buf: &[u8]) {
        self.hash.update(buf);
        self.bytes += buf.len() as u64;
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.add(&buf[..n]);
        Ok(n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.add(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{0:?} is not a sha256 digest (expected sha256:<64 lowercase hex>)")]
    BadDigest(String),
    #[error("blob {0} is not in the content store")]
    Missing(Digest),
    #[error("content of blob {expected} has digest {actual}: the source is corrupt or was tampered with")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("content store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The blob store under one directory.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
}

impl ContentStore {
    pub fn open(root: &Path) -> Result<ContentStore, ContentError> {
        for d in [root.join("blobs/sha256"), root.join("ingest")] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(ContentStore {
            root: root.to_path_buf(),
        })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub fn size(&self, digest: &Digest) -> Result<u64, ContentError> {
        let p = self.path(digest);
        fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|_| ContentError::Missing(digest.clone()))
    }

    /// Deletes a blob (one that a refused import brought in); a missing blob is no error.
    pub fn remove(&self, digest: &Digest) -> Result<(), ContentError> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&self.root)(e)),
            _ => Ok(()),
        }
    }

    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ContentError> {
        fs::read(self.path(digest)).map_err(|_| ContentError::Missing(digest.clone()))
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<fs::File, ContentError> {
        fs::File::open(self.path(digest)).map_err(|_| ContentError::Missing(digest.clone()))
    }

    /// Stores `data`, returning its digest.
    pub fn put(&self, data: &[u8]) -> Result<Digest, ContentError> {
        let mut w = self.writer()?;
        w.write_all(data).map_err(io_err(&self.root))?;
        w.commit(None)
    }

    /// Copies `reader` in, checking it against `expected` when given.
    pub fn put_reader(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), ContentError> {
        let mut w = self.writer()?;
        let n = io::copy(&mut reader, &mut w).map_err(io_err(&self.root))?;
        Ok((w.commit(expected)?, n))
    }

    /// A writer whose bytes become a blob at [`BlobWriter::commit`].
    pub fn writer(&self) -> Result<BlobWriter, ContentError> {
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("ingest"))
            .map_err(io_err(&self.root))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp: Hashing::new(tmp),
        })
    }
}

/// An in-progress blob; dropped without commit, it leaves nothing behind.
pub struct BlobWriter {
    store: ContentStore,
    tmp: Hashing<tempfile::NamedTempFile>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tmp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

impl BlobWriter {
    /// Verifies against `expected` (if any) and moves the blob into place.
    pub fn commit(self, expected: Option<&Digest>) -> Result<Digest, ContentError> {
        let actual = self.tmp.digest();
        if let Some(expected) = expected {
            if *expected != actual {
                return Err(ContentError::Mismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let dest = self.store.path(&actual);
        let tmp = self.tmp.into_inner();
        tmp.as_file().sync_all().map_err(io_err(&dest))?;
        tmp.persist(&dest).map_err(|e| ContentError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        Ok(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_strict() {
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }

    #[test]
    fn put_verifies_and_leaves_nothing_on_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = store.put(b"hello").unwrap();
        assert_eq!(store.read(&d).unwrap(), b"hello");
        let wrong = Digest::of(b"other");
        let err = store.put_reader(&b"hello!"[..], Some(&wrong)).unwrap_err();
        assert!(matches!(err, ContentError::Mismatch { .. }));
        assert!(!store.has(&wrong));
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    }
}
