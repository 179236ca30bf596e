//! The background fetch: after a layer is mounted, every chunk not yet cached is fetched, the
//! recorded access order first, in ranged requests that each cover a run of nearby chunks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tracing::info;

use super::fetch::Fetcher;
use super::nodes::Nodes;
use super::passthrough::Passthrough;
use strata_image::chunked::toc::Chunk;

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

/// The most of a prefetch area fetched before a mount is served: a bound on the wait.
const MAX_AREA: u64 = 64 << 20;

/// Fetches the layer's prefetch area (the files its writer put first, up to its landmark) in
/// one ranged request, before the mount is served: the container's first reads are then hits.
pub fn fetch_prefetch_area(index: &Nodes, fetcher: &Fetcher) {
    let Some(end) = index.prefetch_end else {
        return;
    };
    let mut chunks: Vec<Chunk> = index
        .files()
        .into_iter()
        .filter_map(|i| index.node(i))
        .flat_map(|n| n.chunks)
        .filter(|c| !c.zeros && c.end <= end.min(MAX_AREA))
        .collect();
    chunks.sort_by_key(|c| c.start);
    if !chunks.is_empty() {
        info!(layer = %fetcher.digest, chunks = chunks.len(), "fetching the prefetch area");
        fetcher.prefetch(&chunks);
    }
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
