//! Fetching a lazy layer's chunks: from a small in-memory hot set, the shared chunk cache, or the
//! registry with a Range read (one fetch per chunk at a time, however many readers wait for
//! it), each verified against its sha256 before use; and the background fetch of the rest of the
//! layer, merging close chunks into one request.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use tracing::warn;

use super::cache::ChunkCache;
use super::{LayerSpec, Stats};
use strata_image::chunked::read::read_chunk;
use strata_image::chunked::toc::Chunk;
use strata_image::chunked::{lazy, Codec};
use strata_image::registry::{Client, Reference};

/// Uncompressed chunks kept in memory for the many small reads of one chunk.
const HOT_CHUNKS: usize = 16;

/// Fetches, verifies and caches chunks of one layer blob.
pub struct Fetcher {
    client: Client,
    reference: Reference,
    pub(super) digest: String,
    codec: Codec,
    pub(super) cache: ChunkCache,
    hot: Mutex<VecDeque<(String, Arc<Vec<u8>>)>>,
    /// One lock per chunk being fetched: concurrent readers of a chunk wait for one fetch.
    inflight: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Reads waiting on the registry: the background fetch yields to them.
    foreground: AtomicUsize,
    pub stats: Stats,
    /// Where `stats.json` goes, rewritten after every fetch so `status` is never stale.
    state: PathBuf,
}

impl Fetcher {
    pub fn new(spec: &LayerSpec, cache: ChunkCache, state: &Path) -> anyhow::Result<Fetcher> {
        Ok(Fetcher {
            client: Client::new(spec.registry_options()),
            reference: Reference::parse(&spec.reference)?,
            digest: spec.digest.clone(),
            codec: lazy::codec(&spec.annotations),
            cache,
            hot: Mutex::new(VecDeque::new()),
            inflight: Mutex::new(HashMap::new()),
            foreground: AtomicUsize::new(0),
            stats: Stats::default(),
            state: state.to_path_buf(),
        })
    }

    /// Writes the counters to `stats.json`.
    pub fn publish(&self) {
        self.stats.write(&self.state);
    }

    /// The bytes of chunk `c`: from memory, the disk cache, or the registry (verified).
    pub fn chunk(&self, c: &Chunk) -> Result<Arc<Vec<u8>>, String> {
        if let Some(hit) = self.hot(c) {
            return Ok(hit);
        }
        let lock = self
            .inflight
            .lock()
            .entry(c.digest.clone())
            .or_default()
            .clone();
        let result = {
            let _one = lock.lock();
            self.load(c)
        };
        self.publish();
        let mut inflight = self.inflight.lock();
        if Arc::strong_count(&lock) <= 2 {
            inflight.remove(&c.digest);
        }
        result
    }

    fn hot(&self, c: &Chunk) -> Option<Arc<Vec<u8>>> {
        self.hot
            .lock()
            .iter()
            .find(|(d, _)| *d == c.digest)
            .map(|(_, v)| v.clone())
    }

    /// [`Self::chunk`] under the chunk's lock.
    fn load(&self, c: &Chunk) -> Result<Arc<Vec<u8>>, String> {
        if let Some(hit) = self
            .hot
            .lock()
            .iter()
            .find(|(d, _)| *d == c.digest)
            .map(|(_, v)| v.clone())
        {
            return Ok(hit);
        }
        let data = match self.cache.get(&c.digest, c.size) {
            Some(d) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                d
            }
            None => {
                let fetch = |start: u64, end: u64| -> std::io::Result<Vec<u8>> {
                    self.client
                        .blob_range(&self.reference, &self.digest, start, end)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                };
                self.foreground.fetch_add(1, Ordering::SeqCst);
                let result = read_chunk(c, self.codec, &fetch);
                self.foreground.fetch_sub(1, Ordering::SeqCst);
                match result {
                    Ok(d) => {
                        self.stats
                            .fetched_bytes
                            .fetch_add(c.end - c.start, Ordering::Relaxed);
                        self.cache.put(&c.digest, &d);
                        d
                    }
                    Err(e) => {
                        let verify =
                            matches!(e, strata_image::chunked::ChunkedError::ChunkDigest { .. });
                        let counter = if verify {
                            &self.stats.verify_failures
                        } else {
                            &self.stats.fetch_errors
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        warn!(layer = %self.digest, error = %e, "chunk not served");
                        return Err(e.to_string());
                    }
                }
            }
        };
        let data = Arc::new(data);
        let mut hot = self.hot.lock();
        hot.push_back((c.digest.clone(), data.clone()));
        if hot.len() > HOT_CHUNKS {
            hot.pop_front();
        }
        Ok(data)
    }

    pub fn cached(&self, c: &Chunk) -> bool {
        c.zeros || self.cache.has(&c.digest)
    }

    /// Fetches the chunks of `run` that are not cached with one Range request, verifies each
    /// and caches it. Failures are counted; reads retry them.
    pub fn prefetch(&self, run: &[Chunk]) {
        // Containers' reads first: the link is theirs while they wait.
        while self.foreground.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let missing: Vec<&Chunk> = run.iter().filter(|c| !self.cached(c)).collect();
        let (Some(first), Some(last)) = (missing.first(), missing.last()) else {
            return;
        };
        let (start, end) = (first.start, last.end);
        let bytes = match self
            .client
            .blob_range(&self.reference, &self.digest, start, end)
        {
            Ok(b) => b,
            Err(e) => {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                warn!(layer = %self.digest, error = %e, "background fetch failed");
                return;
            }
        };
        self.stats
            .fetched_bytes
            .fetch_add(end - start, Ordering::Relaxed);
        let slice = |a: u64, b: u64| -> std::io::Result<Vec<u8>> {
            bytes
                .get((a - start) as usize..(b - start) as usize)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::other("short range"))
        };
        for c in missing {
            match read_chunk(c, self.codec, &slice) {
                Ok(d) => self.cache.put(&c.digest, &d),
                Err(e) => {
                    self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(layer = %self.digest, error = %e, "chunk not cached");
                }
            }
        }
        self.publish();
    }
}
