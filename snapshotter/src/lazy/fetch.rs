//! Fetching a lazy layer's chunks: from a small in-memory hot set, the shared chunk cache, or the
//! registry with a Range read (one fetch per chunk at a time, however many readers wait for
//! it), each verified against its sha256 before use; and the background fetch of the rest of the
//! layer, merging close chunks into one request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use tracing::{info, warn};

use super::cache::ChunkCache;
use super::nodes::Nodes;
use super::passthrough::Passthrough;
use super::{LayerSpec, Stats};
use strata_image::chunked::read::read_chunk;
use strata_image::chunked::toc::Chunk;
use strata_image::chunked::Codec;
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
            codec: Codec::of(&spec.annotations),
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

/// How long after mounting the background fetch starts.
const BACKGROUND_DELAY: std::time::Duration = std::time::Duration::from_secs(2);
/// Largest byte range fetched in one request by the background fetcher.
const MAX_RUN: u64 = 8 << 20;
/// Bytes between two chunks' frames (tar headers) still fetched to merge their ranges.
const MAX_GAP: u64 = 64 << 10;

/// Groups chunks (in fetch order) into runs whose frames lie close together in the blob, so
/// that one Range request fetches a run.
fn runs(chunks: Vec<Chunk>) -> Vec<Vec<Chunk>> {
    let mut out: Vec<Vec<Chunk>> = Vec::new();
    for c in chunks {
        if let Some(run) = out.last_mut() {
            let (first, last) = (&run[0], &run[run.len() - 1]);
            if c.start >= last.end
                && c.start - last.end <= MAX_GAP
                && c.end - first.start <= MAX_RUN
            {
                run.push(c);
                continue;
            }
        }
        out.push(vec![c]);
    }
    out
}

/// Fetches every chunk not yet cached, in `order` first (paths), then in TOC order, with
/// `concurrency` threads; stops when `stop` is set. Then, when the kernel passes files
/// through, assembles the whole copies of files of several chunks, so no open waits for that.
pub fn background_fetch(
    index: Arc<Nodes>,
    fetcher: Arc<Fetcher>,
    order: Vec<String>,
    concurrency: usize,
    stop: Arc<AtomicBool>,
    passthrough: Arc<Passthrough>,
) {
    let mut queue: Vec<u64> = order.iter().filter_map(|p| index.file(p)).collect();
    let first: HashSet<u64> = queue.iter().copied().collect();
    queue.extend(index.files().into_iter().filter(|i| !first.contains(i)));
    let chunks: Vec<Chunk> = queue
        .iter()
        .filter_map(|i| index.node(*i))
        // A whole cached file has no chunks of its own left to fetch.
        .filter(|n| fetcher.cache.file(&n.digest, n.size).is_none())
        .flat_map(|n| n.chunks)
        .filter(|c| !c.zeros)
        .collect();
    let runs = Arc::new(runs(chunks));
    // The first reads of a new container come before the background.
    std::thread::sleep(BACKGROUND_DELAY);
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (runs, next, fetcher, stop) =
            (runs.clone(), next.clone(), fetcher.clone(), stop.clone());
        workers.push(std::thread::spawn(move || loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let i = next.fetch_add(1, Ordering::SeqCst) as usize;
            let Some(run) = runs.get(i) else { return };
            fetcher.prefetch(run);
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    info!(layer = %fetcher.digest, "background fetch finished");
    for ino in queue {
        if stop.load(Ordering::Relaxed) || !passthrough.enabled() {
            return;
        }
        if let Some(n) = index.node(ino).filter(|n| n.chunks.len() > 1) {
            fetcher.cache.whole_file(&n.digest, n.size, &n.chunks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(start: u64, end: u64) -> Chunk {
        Chunk {
            file_offset: 0,
            size: 1,
            start,
            end,
            digest: format!("sha256:{start}"),
            zeros: false,
            inner: 0,
        }
    }

    #[test]
    fn close_chunks_merge_into_bounded_runs() {
        let r = runs(vec![
            chunk(0, 100),
            chunk(612, 1000),                   // a header frame between: merged
            chunk(1000 + MAX_GAP + 1, 2 << 20), // too far: new run
            chunk(2 << 20, 9 << 20),            // adjacent but the run would pass MAX_RUN
            chunk(500, 600),                    // behind: new run
        ]);
        let sizes: Vec<usize> = r.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1, 1, 1]);
    }
}
