//! FUSE passthrough (Linux 6.9+): a fully fetched file is opened on a whole verified copy in the
//! chunk cache, and the kernel reads that copy directly — no round trip through this process.
//!
//! The kernel lets an inode be open either through the page cache (reads answered by
//! [`super::fs`]) or passed through to one backing file, never both at once, and every
//! passthrough open of an inode must name the same backing id. So opens are counted per inode:
//! an inode already open through the cache stays there until its last such open is released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use tracing::warn;

use super::fetch::Fetcher;
use super::index::{Kind, Node};

/// The handle of an open answered by the filesystem's reads.
pub const CACHED: FileHandle = FileHandle(1);
/// The handle of an open passed through to a backing file.
pub const PASSED: FileHandle = FileHandle(2);

#[derive(Default)]
struct Opens {
    cached: u32,
    passed: Option<(Arc<BackingId>, u32)>,
}

#[derive(Default)]
pub struct Passthrough {
    /// The kernel granted passthrough at init, and it has not failed since.
    on: AtomicBool,
    opens: Mutex<HashMap<u64, Opens>>,
}

impl Passthrough {
    pub fn enable(&self) {
        self.on.store(true, Ordering::SeqCst);
    }

    pub fn enabled(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Answers the open of regular file `ino`: passed through when the inode already is, or
    /// when it is open nowhere and its whole content is cached; through the cache otherwise.
    pub fn open(&self, ino: u64, n: &Node, fetcher: &Fetcher, reply: ReplyOpen) {
        let candidate = self.enabled()
            && n.kind == Kind::File
            && n.size > 0
            && !n.digest.is_empty()
            && self.opens.lock().get(&ino).is_none_or(|o| o.cached == 0);
        // Assembling may copy a large file: not under the lock.
        let backing = candidate
            .then(|| fetcher.cache.whole_file(&n.digest, n.size, &n.chunks))
            .flatten();
        let mut opens = self.opens.lock();
        let o = opens.entry(ino).or_default();
        let mut fresh = false;
        if o.passed.is_none() && o.cached == 0 {
            if let Some(path) = backing {
                match std::fs::File::open(&path).and_then(|f| reply.open_backing(f)) {
                    Ok(id) => {
                        o.passed = Some((Arc::new(id), 0));
                        fresh = true;
                    }
                    Err(e) => {
                        // An old kernel or a backing store it refuses (e.g. on overlayfs):
                        // every later open goes through the cache.
                        self.on.store(false, Ordering::SeqCst);
                        warn!(file = %n.path, error = %e, "FUSE passthrough refused; reads go through the cache");
                    }
                }
            }
        }
        match &mut o.passed {
            Some((id, count)) => {
                *count += 1;
                fetcher
                    .stats
                    .passthrough_opens
                    .fetch_add(1, Ordering::Relaxed);
                reply.opened_passthrough(PASSED, FopenFlags::empty(), id);
            }
            None => {
                o.cached += 1;
                reply.opened(CACHED, FopenFlags::FOPEN_KEEP_CACHE);
            }
        }
        drop(opens);
        if fresh {
            // A file newly passed through shows in `status` now, not at the next tick.
            fetcher.publish();
        }
    }

    /// The kernel released one open of `ino` made with handle `fh`.
    pub fn release(&self, ino: u64, fh: FileHandle) {
        let mut opens = self.opens.lock();
        let Some(o) = opens.get_mut(&ino) else { return };
        if fh == PASSED {
            if let Some((_, count)) = &mut o.passed {
                *count -= 1;
                if *count == 0 {
                    // Dropping the last reference closes the backing id.
                    o.passed = None;
                }
            }
        } else {
            o.cached = o.cached.saturating_sub(1);
        }
        if o.cached == 0 && o.passed.is_none() {
            opens.remove(&ino);
        }
    }
}
