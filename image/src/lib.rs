//! Images as data, shared by the snapshotter, the builder and the migration tool:
//!
//! - [`content`]: digests and a verified content-addressed blob store.
//! - [`oci`]: manifests, indexes, configs and OCI layout archives.
//! - [`registry`]: the distribution API client; [`transfer`]: whole-image pull and push.
//! - [`layer`]: applying and writing layer tars (whiteouts, attributes, never outside the root).
//! - [`chunked`]: zstd:chunked and eStargz, the lazily pullable layer formats.
//! - [`fsutil`]: file attributes, sparse copies and paths opened beneath a root.
//! - [`labels`]: the remote-snapshot labels between a lazy pull and the snapshotter.
//! - [`containerd`] (feature `containerd`): importing images into containerd over its API.

pub mod chunked;
#[cfg(feature = "containerd")]
pub mod containerd;
pub mod content;
pub mod fsutil;
pub mod labels;
pub mod layer;
pub mod oci;
pub mod registry;
pub mod transfer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A name no other process or call uses (temporary snapshot keys, leases): pid, time, counter.
pub fn nonce() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}-{t:x}-{n}", std::process::id())
}
